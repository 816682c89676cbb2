"""NSGA-II against the exact optimum across budgets: does the front reach it everywhere?

    .venv/bin/kvtune profile --formats int --out outputs/profile-int   # once: the int set (the default until int+g)
    .venv/bin/python benchmarks/search_gaps.py            # ~1 min on 2 CPU cores
    .venv/bin/python benchmarks/search_gaps.py --max-pop-size 100 --out benchmarks/results/search_gaps_pop100.json

`kvtune search` checks NSGA-II's front against `scipy.optimize.milp` at 12 budgets from the
smallest feasible one up to the budget asked for. This runs that search (without verification, so
no model is loaded) at budgets from 3.25 bits to FP16's 16 and at a bytes budget, for two seeds,
and records the largest gap, the population NSGA-II ended with and its time.
Writes benchmarks/results/search_gaps.json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kvtune.search import SearchSettings, run_search

BUDGETS = ("3.25bits", "6bits", "8bits", "16bits", "2GiB@32k")
SEEDS = (0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="outputs/profile-int")
    parser.add_argument("--max-pop-size", type=int, default=SearchSettings.max_pop_size,
                        help="100 keeps NSGA-II's population fixed at its starting size, as before it could grow")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "search_gaps.json"))
    args = parser.parse_args()
    rows = []
    for budget in BUDGETS:
        for seed in SEEDS:
            with tempfile.TemporaryDirectory() as tmp:
                meta = run_search(SearchSettings(profile=args.profile, budget=budget, verify=0, seed=seed,
                                                 max_pop_size=args.max_pop_size), tmp, progress=False).meta
            rows.append({"budget": budget, "seed": seed, "max_gap": meta["exact_check"]["max_gap"],
                         "budgets_checked": len(meta["exact_check"]["budgets"]), "nsga2_pop_size": meta["nsga2_pop_size"],
                         "front_size": meta["front_size"], "nsga2_seconds": round(meta["nsga2_seconds"], 2)})
            print(json.dumps(rows[-1]), flush=True)
    Path(args.out).write_text(json.dumps({"profile": args.profile, "max_pop_size": args.max_pop_size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
