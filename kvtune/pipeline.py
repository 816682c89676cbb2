"""``kvtune run``'s up-front check (the inputs of all four steps, before the first one starts) and
its resumption (the steps a rerun of the same command keeps).

A budget the search will reject, an eval folder holding another result or an unwritable export
folder would otherwise surface only after minutes of profiling; a run stopped in its eval or
export step would otherwise redo a search that took most of its hour.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd

from kvtune import inputs
from kvtune.eval import EvalSettings
from kvtune.eval import check_settings as check_eval
from kvtune.plan import LayerPlan, Plan
from kvtune.profiling import ProfileSettings
from kvtune.profiling.artifact import META_FILE as PROFILE_META
from kvtune.search.budget import parse_budget
from kvtune.search.search import FRONT_FILE, META_FILE, PLAN_FILE, SearchResult, SearchSettings, check_budget_fits, memory_tables


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


def _newer(result: Path, source: Path) -> bool:
    """``result`` was finished after ``source``: made from it, not from a file it has since replaced."""
    return result.is_file() and source.is_file() and result.stat().st_mtime >= source.stat().st_mtime


def finished_search(out: str | Path) -> SearchResult | None:
    """The search an earlier run with these settings (check_run compared them) finished after the
    profile it reads, or None. search.json is written last, so it marks a finished search."""
    out = Path(out)
    folder = out / "search"
    if not _newer(folder / META_FILE, out / "profile" / PROFILE_META):
        return None
    meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    return SearchResult(pd.read_csv(folder / FRONT_FILE), Plan.load(folder / PLAN_FILE), meta)


def finished_eval(out: str | Path) -> pd.DataFrame | None:
    """The eval table an earlier run with these settings finished after the plan it measures, or None."""
    out = Path(out)
    if not _newer(out / "eval" / "eval.json", out / "search" / PLAN_FILE):
        return None
    return pd.read_csv(out / "eval" / "eval.csv")
