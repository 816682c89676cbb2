"""Engine-native formats on the default model: the vLLM-format search at 5 bits, held out.

    .venv/bin/kvtune profile --formats all --validate-windows 0 --out outputs/profile-all    # once
    .venv/bin/python benchmarks/engine_formats.py

1. `kvtune search --formats vllm --budget 5bits`: the chosen plan of FP8 / NVFP4 / FP8-K-NVFP4-V
   layers (5 bits is halfway between uniform NVFP4, 4, and uniform FP8-K/NVFP4-V, 6), exported
   with `--format modelopt-hf`.
2. Fronts measured on held-out text (32 windows × 512 tokens, as benchmarks/search_quality.py):
   the vLLM-format front (searches at 4.5, 5, 5.5 and 7 bits and the uniform vLLM plans) and the
   integer front (searches at 2.5, 3.25, 4 and 6 bits and uniform K8V4, K4V4, K4V2, K2V2), as PPL against real
   bytes at 32K, drawn on one set of axes.
3. The recovery at 5 bits: (PPL of uniform NVFP4 − PPL of the chosen plan) / (PPL of uniform
   NVFP4 − PPL of uniform FP8-K/NVFP4-V); the target is at least 0.5.
Writes benchmarks/results/engine_formats.csv, .json and .png.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pandas as pd

from kvtune.data import load_windows
from kvtune.export import export_plan
from kvtune.models import load_model
from kvtune.perplexity import token_nll
from kvtune.plan import Plan
from kvtune.profiling.artifact import Profile
from kvtune.search import SearchSettings, run_search

PROFILE = "outputs/profile-all"
WINDOWS, SEQ_LEN, SEED, CONTEXT = 32, 512, 0, 32768
ENGINE_UNIFORM = ("k[nvfp4]v[nvfp4]", "k[fp8]v[nvfp4]", "k[fp8]v[fp8]")
INT_UNIFORM = ("k8v4", "k4v4", "k4v2", "k2v2")
ENGINE_BUDGETS = (4.5, 5.0, 5.5, 7.0)
INT_BUDGETS = (2.5, 3.25, 4.0, 6.0)


def main() -> None:
    profile = Profile.load(PROFILE)
    results = Path(__file__).parent / "results"
    shape, layers = profile.shape, profile.num_layers
    chosen = run_search(SearchSettings(profile=PROFILE, budget="5bits", formats="vllm"), "outputs/search-vllm", progress=False)
    exported = export_plan(chosen.plan, "modelopt-hf", "outputs/search-vllm/modelopt-hf.json")

    searched = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family, budgets in (("vllm", ENGINE_BUDGETS), ("int", INT_BUDGETS)):
            for bits in budgets:
                if (family, bits) == ("vllm", 5.0):
                    searched[(family, bits)] = chosen.plan
                    continue
                settings = SearchSettings(profile=PROFILE, budget=f"{bits:g}bits", formats=family)
                searched[(family, bits)] = run_search(settings, f"{tmp}/{family}-{bits:g}", progress=False).plan

    model, tokenizer = load_model(profile.meta["settings"]["model"])
    windows = load_windows(tokenizer, "heldout", SEQ_LEN, WINDOWS, SEED)

    def row(label: str, family: str, plan: Plan) -> dict:
        return {"plan": label, "family": family, "nominal_bits": plan.nominal_bits(),
                "cache_MiB": plan.cache_bytes(shape, CONTEXT) / 2**20, "effective_bits": plan.effective_bits(shape, CONTEXT),
                "ppl": math.exp(token_nll(model, windows, plan).mean().item()), "pairs": ",".join(plan.pairs)}

    rows = [row("fp16", "fp16", Plan.uniform("k16v16", layers))]
    rows += [row(f"uniform:{p}", "vllm", Plan.uniform(p, layers)) for p in ENGINE_UNIFORM]
    rows += [row(f"uniform:{p}", "int", Plan.uniform(p, layers)) for p in INT_UNIFORM]
    for (family, bits), plan in searched.items():
        rows.append(row(f"kvtune {family} {bits:g}bits" + (" (chosen)" if plan is chosen.plan else ""), family, plan))
    table = pd.DataFrame(rows)

    by_name = table.set_index("plan")
    nvfp4 = by_name.loc["uniform:k[nvfp4]v[nvfp4]", "ppl"]
    fp8_nvfp4 = by_name.loc["uniform:k[fp8]v[nvfp4]", "ppl"]
    picked = by_name.loc["kvtune vllm 5bits (chosen)", "ppl"]
    summary = {
        "heldout": f"{WINDOWS} windows x {SEQ_LEN} tokens, seed {SEED}",
        "chosen_plan": {"pairs": sorted(set(chosen.plan.pairs)), "nominal_bits": chosen.plan.nominal_bits(),
                        "modelopt_hf": json.loads(exported.path.read_text())["quantization"]["kv_cache_quant_algo"]},
        "recovery_at_5bits": (nvfp4 - picked) / (nvfp4 - fp8_nvfp4) if nvfp4 != fp8_nvfp4 else None,
        "ppl": {"uniform_nvfp4": nvfp4, "uniform_fp8k_nvfp4v": fp8_nvfp4, "chosen_5bits": picked},
    }
    results.mkdir(exist_ok=True)
    table.to_csv(results / "engine_formats.csv", index=False)
    (results / "engine_formats.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(table, results / "engine_formats.png")
    print(table.drop(columns=["pairs"]).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(json.dumps(summary, indent=2))


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for family, color in (("int", "tab:blue"), ("vllm", "tab:green")):
        part = table[table["family"] == family].sort_values("effective_bits")
        searched = part[part["plan"].str.startswith("kvtune")]
        uniform = part[part["plan"].str.startswith("uniform")]
        ax.plot(searched["effective_bits"], searched["ppl"], "o-", color=color, label=f"kvtune front ({family} formats)")
        ax.plot(uniform["effective_bits"], uniform["ppl"], "s", color=color, mfc="none", label=f"uniform ({family})")
        for _, r in uniform.iterrows():
            ax.annotate(r["plan"].removeprefix("uniform:"), (r["effective_bits"], r["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    fp16 = table[table["plan"] == "fp16"].iloc[0]
    ax.axhline(fp16["ppl"], color="gray", ls="--", lw=1, label="FP16")
    ax.set_xlabel("real bits per cached element at 32K (scales and full-precision window included)")
    ax.set_ylabel("held-out perplexity")
    ax.set_ylim(fp16["ppl"] - 0.2, table["ppl"].quantile(0.9) + 0.5)
    ax.legend(fontsize=7)
    ax.set_title("SmolLM2-135M: measured fronts, engine formats vs integer formats", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
