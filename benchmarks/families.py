"""Which causal-LM families kvtune serves (issue 28): every model type transformers registers,
built small from its config (tests/sweep.py), through kvtune's architecture check.

    .venv/bin/python benchmarks/families.py

Writes benchmarks/results/families.csv and docs/families.md (the table the README links). "served"
means the check accepts the family (its shape is printed); the families tests/test_families.py
also runs end to end are marked. Takes about a minute.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pandas as pd
import transformers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.families import FAMILIES, REFUSED  # noqa: E402
from tests.sweep import causal_lm_types, classify  # noqa: E402


def main() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    warnings.simplefilter("ignore")
    rows = []
    for model_type in causal_lm_types():
        row = classify(model_type)
        print(f"{model_type:28s} {row['status']:10s} {row['detail'][:100]}", flush=True)
        rows.append(row)
    table = pd.DataFrame(rows)
    tested = {v[0] for v in FAMILIES.values()} | {v[0] for v in REFUSED.values()}
    table["end_to_end_test"] = table["model_type"].isin(tested)
    out = ROOT / "benchmarks" / "results" / "families.csv"
    table.to_csv(out, index=False)
    counts = table["status"].value_counts().to_dict()
    lines = [
        "# Causal-LM families: served, refused, not built",
        "",
        f"Every causal-LM model type transformers {transformers.__version__} registers ({len(table)}), built small from "
        "its config class with default settings and small sizes (`tests/sweep.py`) and put through kvtune's architecture "
        "check (`kvtune.arch.describe`: config layer types, then one recorded forward). Written by "
        "`.venv/bin/python benchmarks/families.py`; `tests/test_sweep.py` asserts that none crashes.",
        "",
        f"**{counts.get('served', 0)} served, {counts.get('refused', 0)} refused with a reason, "
        f"{counts.get('not built', 0)} not buildable small from defaults** (their configs need more than the sizes "
        "the sweep sets; Gemma 3, Gemma 3n and Gemma 4 variants among them are built by hand in `tests/families.py`). "
        "\"tested\" marks the families `tests/test_families.py` also runs end to end (simulated = decoded, bytes = "
        "predicted, 16-bit generate unchanged, profile → search → PPL) or checks the refusal of through the CLI.",
        "",
        "| model_type | status | tested | shape or reason |",
        "|---|---|---|---|",
    ]
    for row in table.sort_values(["status", "model_type"]).itertuples():
        detail = row.detail.replace("|", "/").replace("\n", " ")
        lines.append(f"| {row.model_type} | {row.status} | {'yes' if row.end_to_end_test else ''} | {detail} |")
    (ROOT / "docs" / "families.md").write_text("\n".join(lines) + "\n")
    print(f"{counts}; written {out} and docs/families.md")


if __name__ == "__main__":
    main()
