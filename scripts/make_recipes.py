"""Regenerate recipes/<model>/plan-<budget>.json from recipes/<model>/recipe.json.

    .venv/bin/python scripts/make_recipes.py recipes/smollm2-135m/recipe.json [BUDGET ...]

(with budgets named, only those are searched again).

Profiles once (into outputs/recipes/<model>/profile, resumable), then searches every budget and
copies each chosen plan and its front plot next to the recipe.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from kvtune.errors import ProfileError
from kvtune.plan import resolve_formats
from kvtune.profiling import ProfileSettings, run_profile
from kvtune.search import SearchSettings, run_search


def main(recipe_path: str, only: list[str] | None = None) -> None:
    recipe_file = Path(recipe_path)
    recipe = json.loads(recipe_file.read_text())
    work = Path("outputs/recipes") / recipe["model"]
    p = dict(recipe["profile"])
    p["pairs"] = resolve_formats(p["pairs"])  # a set name (int+g) or a list of candidates
    p["seq_len"] = p.pop("max_tokens")
    settings = ProfileSettings(model=recipe["model"], data=recipe["data"], **p)
    try:
        run_profile(settings, work / "profile")
    except ProfileError as e:  # a profile of an earlier recipe: the recipe is what counts
        if "other settings" not in str(e):
            raise
        print(f"{work / 'profile'} holds an earlier recipe's profile; profiling afresh")
        run_profile(settings, work / "profile", fresh=True)
    s = dict(recipe["search"])
    per_budget = s.pop("per_budget", {})  # settings of one budget's search that differ from the rest
    for budget in s.pop("budgets"):
        settings = SearchSettings(profile=str(work / "profile"), budget=budget, **{**s, **per_budget.get(budget, {})})
        if only and budget not in only:
            continue
        result = run_search(settings, work / f"search-{budget}", overwrite=True)
        target = recipe_file.parent / f"plan-{budget}.json"
        shutil.copyfile(work / f"search-{budget}" / "plan.json", target)
        shutil.copyfile(work / f"search-{budget}" / "front.png", recipe_file.parent / f"front-{budget}.png")
        md = result.plan.metadata
        print(f"{target}: {md['nominal_bits']:.3f} nominal bits, {md['effective_bits']:.2f} effective, verified NLL {md['verified_nll']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/smollm2-135m/recipe.json", sys.argv[2:] or None)
