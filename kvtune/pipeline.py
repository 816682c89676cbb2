"""``kvtune run``'s up-front check: the inputs of all four steps, before the first one starts.

A budget the search will reject, an eval folder holding another result or an unwritable export
folder would otherwise surface only after minutes of profiling.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from kvtune import inputs
from kvtune.eval import EvalSettings
from kvtune.eval import check_settings as check_eval
from kvtune.plan import LayerPlan
from kvtune.profiling import ProfileSettings
from kvtune.search.budget import parse_budget
from kvtune.search.search import META_FILE, SearchSettings, check_budget_fits, memory_tables


def check_run(profile: ProfileSettings, search: SearchSettings, evaluate: EvalSettings, out: str | Path,
              overwrite: bool = False) -> None:
    out = Path(out)
    inputs.check_out_dir(out, "run")
    fitted, shape = profile.check(out / "profile", overwrite)
    budget = parse_budget(search.budget, search.batch)
    if shape is not None:  # the budget against the plans the profile's candidate pairs can make
        candidates = [LayerPlan.from_pair(p, fitted.key_mode, fitted.value_mode, fitted.group_size, fitted.residual)
                      for p in fitted.pairs]
        bits, nbytes, _ = memory_tables(candidates, shape, budget, search.context)
        check_budget_fits(budget, search.budget, bits if budget.kind == "bits" else nbytes)
    inputs.check_out_dir(out / "search", "search", META_FILE, search, overwrite)
    # The chosen plan does not exist yet: the baselines are checked now, the plan after the search.
    check_eval(replace(evaluate, plans=[p for p in evaluate.plans if not p.endswith(".json")]))
    inputs.check_out_dir(out / "eval", "eval", "eval.json", evaluate, overwrite)
    inputs.check_out_dir(out / "export", "export")
