"""Plans searched with bytes budgets at the real memory of uniform K4V4 and K4V2 (32K tokens,
batch 1), held out against those uniform plans and K3V2 (issue 20's equal-memory comparisons).

    .venv/bin/kvtune profile --validate-windows 0 --out outputs/profile-intplusg   # default set int+g
    .venv/bin/python benchmarks/three_bit_bytes.py                                # that profile

    .venv/bin/kvtune profile --formats int+ --validate-windows 0 --out outputs/profile-intplus
    .venv/bin/python benchmarks/three_bit_bytes.py outputs/profile-intplus         # 3-bit widths, group 32 only

Same protocol as benchmarks/three_bit.py (32 held-out windows × 512 tokens, seed 0; paired
per-window NLL differences ± standard error; inside two standard errors is a tie).
Writes benchmarks/results/three_bit_bytes[-<profile folder>].json (the default profile: no suffix).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtune.data import load_windows  # noqa: E402
from kvtune.models import load_model, model_shape  # noqa: E402
from kvtune.perplexity import token_nll  # noqa: E402
from kvtune.plan import resolve_plan  # noqa: E402
from kvtune.search import SearchSettings, run_search  # noqa: E402
from kvtune.search.verify import paired_gap  # noqa: E402

DEFAULT_PROFILE = ROOT / "outputs" / "profile-intplusg"
WINDOWS, SEQ_LEN, SEED, CONTEXT = 32, 512, 0, 32768
TARGETS = {"k4v4": ["k4v4"], "k4v2": ["k4v2", "k3v2"]}  # memory of → uniform plans to compare with


def main(profile: Path = DEFAULT_PROFILE) -> None:
    model, tokenizer = load_model()
    shape = model_shape(model)
    uniform = {p: resolve_plan(f"uniform:{p}", shape.num_layers, shape.head_dim) for p in ("k4v4", "k4v2", "k3v2")}
    searched = {}
    with tempfile.TemporaryDirectory() as tmp:
        for pair in TARGETS:
            budget = f"{uniform[pair].cache_bytes(shape, CONTEXT) / 2**20 + 0.005:.2f}MiB@32k"  # rounded up: the uniform plan fits
            searched[pair] = (budget, run_search(SearchSettings(profile=str(profile), budget=budget), Path(tmp) / pair).plan)
    windows = load_windows(tokenizer, "heldout", SEQ_LEN, WINDOWS, SEED)
    nll = {p: token_nll(model, windows, plan).mean(dim=1) for p, plan in uniform.items()}
    rows = []
    for pair, (budget, plan) in searched.items():
        mine = token_nll(model, windows, plan).mean(dim=1)
        row = {"budget": budget, "pairs": plan.candidates, "nominal_bits": round(plan.nominal_bits(), 3),
               "cache_MiB@32k": round(plan.cache_bytes(shape, CONTEXT) / 2**20, 2), "ppl": round(math.exp(mine.mean().item()), 3)}
        for ref in TARGETS[pair]:
            gap, se = paired_gap(mine.numpy(), nll[ref].numpy())
            row[f"vs_uniform_{ref}"] = {"ppl": round(math.exp(nll[ref].mean().item()), 3),
                                        "cache_MiB@32k": round(uniform[ref].cache_bytes(shape, CONTEXT) / 2**20, 2),
                                        "nll_gap": round(gap, 5), "gap_se": round(se, 5),
                                        "verdict": "tie" if abs(gap) <= 2 * se else ("better" if gap < 0 else "worse")}
        rows.append(row)
        print(json.dumps(row))
    name = "three_bit_bytes" + ("" if profile == DEFAULT_PROFILE else f"-{profile.name}")
    (ROOT / "benchmarks" / "results" / f"{name}.json").write_text(json.dumps({
        "protocol": {"split": "heldout", "windows": WINDOWS, "seq_len": SEQ_LEN, "seed": SEED},
        "profile": str(profile.relative_to(ROOT)), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else DEFAULT_PROFILE)
