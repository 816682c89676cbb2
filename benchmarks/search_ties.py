"""Settle the close rows of benchmarks/search_quality.py on more held-out text.

    .venv/bin/python benchmarks/search_ties.py            # after search_quality.py; ~45 min on 2 CPU cores

search_quality.py compares, at each uniform plan's memory, the front's plan with the uniform plan
on 32 held-out windows. Where the front's plan measured higher there, the gap was within about two
standard errors. This measures those pairs again, paired, on 256 held-out windows (a separate
draw of the same held-out split: text neither calibration nor verification saw), so that the
standard error shrinks about threefold and a gap either shows or stays within noise.
Writes benchmarks/results/search_ties.json.

    .venv/bin/kvtune profile --formats int --out outputs/profile-int             # the int set
    .venv/bin/kvtune search --profile outputs/profile-int --budget 6bits --verify-windows 128 \
        --out outputs/search-6bits-verify128                                    # ~18 min
    .venv/bin/python benchmarks/search_ties.py --plan outputs/search-6bits-verify128/plan.json --uniform k8v4 \
        --out benchmarks/results/search_ties_6bits_verify128.json

measures one plan file against one uniform plan the same way (~22 min).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from kvtune.data import load_windows
from kvtune.models import load_model
from kvtune.perplexity import token_nll
from kvtune.plan import LayerPlan, Plan
from kvtune.search.verify import paired_gap

WINDOWS, SEQ_LEN, SEED = 256, 512, 1
RESULTS = Path(__file__).parent / "results"


def close_rows(table: pd.DataFrame) -> list[tuple[str, str]]:
    """(uniform pair, the front plan's pairs) where the front plan measured higher PPL."""
    rows = table.set_index("plan")
    out = []
    for name in rows.index:
        if not name.startswith("uniform:"):
            continue
        pair = name.split(":")[1]
        front = rows.loc[f"front at {pair.upper()} memory"]
        if front["ppl"] > rows.loc[name, "ppl"]:
            out.append((pair, front["pairs"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", help="a plan file to measure instead of search_quality's close rows")
    parser.add_argument("--uniform", help="the uniform pair to measure --plan against, e.g. k8v4")
    parser.add_argument("--out", default=str(RESULTS / "search_ties.json"))
    args = parser.parse_args()
    if bool(args.plan) != bool(args.uniform):
        parser.error("--plan and --uniform go together")
    model, tokenizer = load_model()
    layers = model.config.num_hidden_layers
    if args.plan:
        comparisons = [(args.uniform.lower(), Plan.load(args.plan))]
    else:  # the front plans with search_quality's default settings: quantization defaults, as the profile's
        comparisons = [(pair, Plan(tuple(LayerPlan.from_pair(p) for p in pairs.split(","))))
                       for pair, pairs in close_rows(pd.read_csv(RESULTS / "search_quality.csv"))]
    windows = load_windows(tokenizer, "heldout", SEQ_LEN, WINDOWS, SEED)
    results = []
    for pair, front in comparisons:
        uniform = Plan.uniform(pair, layers)
        pairs = ",".join(front.pairs)
        nll = {name: token_nll(model, windows, plan).mean(dim=1).numpy() for name, plan in (("uniform", uniform), ("front", front))}
        gap, se = paired_gap(nll["front"], nll["uniform"])
        results.append({"uniform": pair, "front_nominal_bits": front.nominal_bits(), "front_pairs": pairs,
                        "ppl_uniform": math.exp(nll["uniform"].mean()), "ppl_front": math.exp(nll["front"].mean()),
                        "nll_gap": gap, "nll_gap_se": se, "gap_in_se": gap / se if se else None})
        print(json.dumps(results[-1]), flush=True)
    summary = {"heldout": f"{WINDOWS} windows x {SEQ_LEN} tokens, seed {SEED}", "rows": results}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
