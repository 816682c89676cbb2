"""Regenerate recipes/<model>/plan-<budget>.json from recipes/<model>/recipe.json.

    .venv/bin/python scripts/make_recipes.py recipes/smollm2-135m/recipe.json

Profiles once (into outputs/recipes/<model>/profile, resumable), then searches every budget and
copies each chosen plan next to the recipe.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from kvtune.profiling import ProfileSettings, run_profile
from kvtune.search import SearchSettings, run_search


def main(recipe_path: str) -> None:
    recipe_file = Path(recipe_path)
    recipe = json.loads(recipe_file.read_text())
    work = Path("outputs/recipes") / recipe["model"]
    p = dict(recipe["profile"])
    p["pairs"] = p["pairs"].split(",")
    p["seq_len"] = p.pop("max_tokens")
    run_profile(ProfileSettings(model=recipe["model"], data=recipe["data"], **p), work / "profile")
    s = dict(recipe["search"])
    for budget in s.pop("budgets"):
        result = run_search(SearchSettings(profile=str(work / "profile"), budget=budget, **s), work / f"search-{budget}")
        target = recipe_file.parent / f"plan-{budget}.json"
        shutil.copyfile(work / f"search-{budget}" / "plan.json", target)
        md = result.plan.metadata
        print(f"{target}: {md['nominal_bits']:.3f} nominal bits, {md['effective_bits']:.2f} effective, verified NLL {md['verified_nll']:.4f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/smollm2-135m/recipe.json")
