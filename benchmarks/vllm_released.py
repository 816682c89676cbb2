"""What a released-vLLM user can pick, against the plans kvtune's search over ``vllm-released``
chooses at the same memory and between (issue 27's README table).

    .venv/bin/kvtune profile --formats vllm-released --validate-windows 0 --out outputs/profile-vllm
    .venv/bin/python benchmarks/vllm_released.py

vLLM's own points: each --kv-cache-dtype of vLLM 0.32 with vLLM's own skip rule (TurboQuant keeps
its first and last two layers unquantized; the others none), and int4_per_token_head also with the
first and last two layers kept. For each point's cache bytes at 32K tokens (batch 1), and at a few
budgets between them, ``kvtune search --formats vllm-released --budget <MiB>@32k`` (target vllm:
one dtype plus skipped layers; race on verification text with vLLM's points that fit). Every plan,
FP16 and kvtune's own 3.25-bit recipe are then measured on 16 held-out windows × 512 tokens (seed
0); gaps are paired per-window NLL differences ± standard error, inside two standard errors a tie.
Per-plan NLLs are kept in outputs/vllm-released/ so a cut-off run resumes. Writes
benchmarks/results/vllm_released.{json,md}.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvtune.data import load_windows  # noqa: E402
from kvtune.formats import VLLM_DTYPES, vllm_forced_skips, vllm_pair  # noqa: E402
from kvtune.models import load_model, model_shape  # noqa: E402
from kvtune.perplexity import token_nll  # noqa: E402
from kvtune.plan import LayerPlan, Plan  # noqa: E402
from kvtune.search import SearchSettings, run_search  # noqa: E402
from kvtune.search.verify import paired_gap  # noqa: E402

PROFILE = ROOT / "outputs" / "profile-vllm"
WORK = ROOT / "outputs" / "vllm-released"
RECIPE = ROOT / "recipes" / "smollm2-135m" / "plan-3.25bits.json"
# 16 held-out windows, not the README's usual 32: 17 plans × 32 windows take about 45 min on 2 cores.
WINDOWS, SEQ_LEN, SEED, CONTEXT = 16, 512, 0, 32768
# vLLM's points: (dtype, layers kept 16-bit beyond vLLM's own rule)
POINTS = [("fp8_e4m3", ()), ("fp8_per_token_head", ()), ("int8_per_token_head", ()), ("nvfp4", ()),
          ("int4_per_token_head", ()), ("int4_per_token_head", (0, 1, 28, 29)), ("turboquant_k8v4", ()),
          ("turboquant_4bit_nc", ()), ("turboquant_k3v4_nc", ()), ("turboquant_3bit_nc", ())]
BETWEEN_MIB = (220.0, 237.0, 300.0)  # budgets between vLLM's points


def vllm_point(dtype: str, extra: tuple, layers: int) -> Plan:
    kept = set(vllm_forced_skips(dtype, layers)) | set(extra)
    name = f"vllm:{dtype}" + (f" keep {sorted(extra)}" if extra else "")
    return Plan(tuple(LayerPlan.from_pair("k16v16" if i in kept else vllm_pair(dtype)) for i in range(layers)), name=name)


def measured(model, windows, plan: Plan | None) -> torch.Tensor:
    """Per-window NLL, kept by the plan's layers (equal plans are measured once)."""
    key = "fp16" if plan is None else hashlib.sha1(json.dumps(plan.to_dict()["layers"]).encode()).hexdigest()[:16]
    path = WORK / f"{key}-w{WINDOWS}.nll.pt"
    if path.is_file():
        return torch.load(path)
    nll = token_nll(model, windows, plan).double().mean(dim=1)
    torch.save(nll, path)
    return nll


def mib(plan: Plan, shape) -> float:
    return plan.cache_bytes(shape, CONTEXT) / 2**20


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model()
    shape = model_shape(model)
    windows = load_windows(tokenizer, "heldout", SEQ_LEN, WINDOWS, SEED)
    points = [vllm_point(d, extra, shape.num_layers) for d, extra in POINTS]
    budgets = sorted({math.ceil(mib(p, shape) * 100) / 100 for p in points} | set(BETWEEN_MIB))  # rounded up: the point fits
    searched = []
    for budget in budgets:
        out = WORK / f"search-{budget:.2f}MiB"
        if (out / "plan.json").is_file():
            plan = Plan.load(out / "plan.json")
        else:
            settings = SearchSettings(profile=str(PROFILE), budget=f"{budget:.2f}MiB@32k", formats="vllm-released", verify=1,
                                      verify_windows=8)
            plan = run_search(settings, out, overwrite=True).plan
        plan.name = f"kvtune search @ {budget:.2f} MiB"
        searched.append((budget, plan))
        print(f"searched {budget:.2f} MiB: {plan_flags(plan)}", flush=True)

    fp16 = measured(model, windows, None)
    recipe = Plan.load(RECIPE)
    rows = [row("FP16", None, fp16, fp16, shape, "reference")]
    nll = {}
    for plan in points:
        nll[plan.name] = measured(model, windows, plan)
        rows.append(row(plan.name, plan, nll[plan.name], fp16, shape, "vLLM's own point"))
    for budget, plan in searched:
        mine = measured(model, windows, plan)
        r = row(plan.name, plan, mine, fp16, shape, "kvtune --target vllm")
        # Against every vLLM point that fits the same memory: the best of them is the user's alternative.
        fits = [p for p in points if mib(p, shape) <= budget + 1e-9]
        if fits:
            best = min(fits, key=lambda p: nll[p.name].mean().item())
            gap, se = paired_gap(mine.numpy(), nll[best.name].numpy())
            r["vs_best_vllm_point_that_fits"] = {"point": best.name, "nll_gap": round(gap, 5), "gap_se": round(se, 5),
                                                 "verdict": "tie" if abs(gap) <= 2 * se else ("better" if gap < 0 else "worse")}
        rows.append(r)
    mine = measured(model, windows, recipe)
    rows.append(row("kvtune 3.25-bit recipe (kvtune's own cache)", recipe, mine, fp16, shape, "kvtune cache"))
    result = {"protocol": {"split": "heldout", "windows": WINDOWS, "seq_len": SEQ_LEN, "seed": SEED, "context": CONTEXT},
              "profile": str(PROFILE.relative_to(ROOT)), "rows": rows}
    results = ROOT / "benchmarks" / "results"
    (results / "vllm_released.json").write_text(json.dumps(result, indent=1) + "\n")
    (results / "vllm_released.md").write_text(table(rows) + "\n")
    print(table(rows))


def plan_flags(plan: Plan) -> str:
    from kvtune.export import _released_vllm

    payload, _, _ = _released_vllm(plan, nearest=False)
    return " ".join(payload["vllm_args"])


def row(name: str, plan: Plan | None, nll: torch.Tensor, fp16: torch.Tensor, shape, kind: str) -> dict:
    gap, se = paired_gap(nll.numpy(), fp16.numpy())
    out = {"plan": name, "kind": kind, "ppl": round(math.exp(nll.mean().item()), 3),
           "vs_fp16": {"nll_gap": round(gap, 5), "gap_se": round(se, 5)}}
    if plan is None:
        return {**out, "cache_MiB@32k": round(mib(Plan.uniform("k16v16", shape.num_layers), shape), 2), "nominal_bits": 16.0}
    out.update({"cache_MiB@32k": round(mib(plan, shape), 2), "nominal_bits": round(plan.nominal_bits(), 3)})
    if kind != "kvtune cache":
        out["vllm_args"] = plan_flags(plan)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| plan | vLLM flags | cache MiB @32k | nominal bits | PPL | vs FP16, nats/token | vs best vLLM point that fits |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = r.get("vs_best_vllm_point_that_fits")
        versus = f"{vs['nll_gap']:+.4f} ± {vs['gap_se']:.4f} ({vs['verdict']}; {vs['point']})" if vs else ""
        flags = f"`{r['vllm_args']}`" if r.get("vllm_args") else ""
        lines.append(f"| {r['plan']} | {flags} | {r['cache_MiB@32k']:.1f} | {r['nominal_bits']:g} | {r['ppl']:.3f} | "
                     f"{r['vs_fp16']['nll_gap']:+.4f} ± {r['vs_fp16']['gap_se']:.4f} | {versus} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
