"""The vLLM FP8 gap of issue 19, re-measured on kvtune's side after engine formats read a token's
own K/V rounded (issue 27, item 3).

vLLM's CPU FP8 cache needs AVX-512 or AMX, which the machine of this rerun lacks, so the engine side
is the one issue 19 measured (benchmarks/results/engine_check.json at commit a38b3ed: same model, windows,
seed, 32 held-out windows × 512 tokens). kvtune's simulation of the same plans is recomputed with
today's code, rounding toward zero as vLLM's CPU kernels do. Only the mean effects are compared:
issue 19 kept the engine's per-window NLLs in no file, so there is no paired standard error.

    .venv/bin/python benchmarks/vllm_fp8_gap.py      # writes benchmarks/results/vllm_fp8_gap.json
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtune import formats  # noqa: E402
from kvtune.data import load_windows  # noqa: E402
from kvtune.models import load_model  # noqa: E402
from kvtune.perplexity import token_nll  # noqa: E402
from kvtune.plan import Plan, resolve_plan  # noqa: E402

# Issue 19's engine run and the 10-bit plan it ran, as committed then (later runs replace both files).
PLAN_COMMIT = "a38b3ed"
EARLIER = "benchmarks/results/engine_check.json"


def _committed(path: str) -> str:
    return subprocess.run(["git", "show", f"{PLAN_COMMIT}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def main() -> None:
    rows = [r for r in json.loads(_committed(EARLIER)) if r["engine"] == "vllm"]
    model, tokenizer = load_model()
    windows = load_windows(tokenizer, "heldout", 512, rows[0]["windows"], 0)
    fp16 = token_nll(model, windows, None).double().mean().item()
    out = []
    for r in rows:
        if r["plan"].startswith("uniform:"):
            plan = resolve_plan(r["plan"], 30, 64)
        else:
            plan = Plan.from_dict(json.loads(_committed(r["plan"])))
        with formats.fp8_rounding("toward-zero"):
            sim = token_nll(model, windows, plan).double().mean().item()
        engine_effect = math.log(r["ppl_engine_plan"] / r["ppl_engine_baseline"])
        kvtune_effect = sim - fp16
        row = {"row": r["row"], "ppl_engine_plan": r["ppl_engine_plan"], "ppl_engine_baseline": r["ppl_engine_baseline"],
               "ppl_kvtune_plan_issue19": r["ppl_kvtune_plan"], "ppl_kvtune_plan_now": round(math.exp(sim), 3),
               "ppl_kvtune_fp16": round(math.exp(fp16), 3), "effect_gap_issue19": round(r["effect_gap"], 4),
               "effect_gap_now": round(engine_effect - kvtune_effect, 4)}
        print(json.dumps(row), flush=True)
        out.append(row)
    (ROOT / "benchmarks" / "results" / "vllm_fp8_gap.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
