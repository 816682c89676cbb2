"""What a profile costs as models grow (issue 29): wall time and peak memory of `kvtune profile`
(the sensitivity stage, and the measured validation apart) on the real models at several window
lengths, a cost model fitted to them, and its projection for Llama-3.1-8B and 70B.

    .venv/bin/python benchmarks/profile_cost.py [--models smollm2-135m gemma3-270m qwen2.5-coder-1.5b]
        [--seq-lens 512 1024 2048] [--windows 2]

Each run is a fresh process (`/usr/bin/time` reads its peak resident memory); the profile's own
timings split sensitivity (stage 1) from validation (stage 2, one window at 512 tokens only).
Results: benchmarks/results/profile_cost.json (runs, fit, projection). A run that does not fit in
this machine's memory is recorded as such.

The model: time = a · P · T + b · L · H · T² (per window: P parameters, T tokens, L attention
layers, H query heads; the second term is the probe's T × T score and probability views), and
memory = w · P + c · L · d · T + e · L · H · T² (weights, per-token activations of model width d,
the attention views kept for the backward pass). Fitted by non-negative least squares.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
KVTUNE = [sys.executable, "-m", "kvtune"]

# Architectures of the projected models (their configs on the hub): parameters, attention layers,
# query heads, model width.
PROJECTED = {
    "Llama-3.1-8B": {"params": 8.03e9, "layers": 32, "heads": 32, "width": 4096},
    "Llama-3.1-70B": {"params": 70.6e9, "layers": 80, "heads": 64, "width": 8192},
}


def describe(model: str) -> dict:
    from kvtune.models import load_config, resolve_model_path

    config = load_config(resolve_model_path(model)).get_text_config(decoder=True)
    from transformers import AutoModelForCausalLM
    import torch

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return {"params": params, "layers": config.num_hidden_layers, "heads": config.num_attention_heads,
            "width": config.hidden_size}


def profile_run(model: str, seq_len: int, windows: int, validate: int, extra: tuple[str, ...] = ()) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile"
        cmd = ["/usr/bin/time", "-f", "%M %e", *KVTUNE, "profile", "--model", model, "--max-tokens", str(seq_len),
               "--windows", str(windows), "--batch-size", "1", "--validate-windows", str(validate), "--out", str(out),
               *extra]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        last = done.stderr.strip().splitlines()[-1].split() if done.stderr.strip() else []
        row = {"model": model, "seq_len": seq_len, "windows": windows, "validate_windows": validate,
               "exit": done.returncode}
        if len(last) == 2 and last[0].isdigit():
            row.update(peak_rss_gib=int(last[0]) / 2**20, wall_s=float(last[1]))
        if done.returncode != 0 or not (out / "profile.json").is_file():
            row["error"] = (done.stderr.strip().splitlines() or ["?"])[-2 if len(last) == 2 else -1][-300:]
            return row
        timings = json.loads((out / "profile.json").read_text()).get("timings", {})
        row.update(sensitivity_s=timings.get("stage1_s"), validation_s=timings.get("stage2_s"))
        return row


# Random-weight models of a real model's layer shape, with 1 and 2 layers: the difference is one
# layer's cost at that shape, measured rather than fitted across unlike models. The vocabulary is
# the default model's (its tokenizer cuts the text); the real embedding and logits are added
# analytically in the projection.
LAYER_SHAPES = {
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
                     "head_dim": 128, "rope_theta": 500000.0, "vocab": 128256, "layers": 32},
}


def build_layers(shape: str, layers: int) -> Path:
    """A random-weight Llama of ``shape``'s layers, saved once under outputs/cost-models (float32)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvtune.models import resolve_model_path

    folder = ROOT / "outputs" / "cost-models" / f"{shape}-{layers}L"
    if (folder / "config.json").is_file():
        return folder
    spec = {k: v for k, v in LAYER_SHAPES[shape].items() if k not in ("vocab", "layers")}
    tokenizer_dir = Path(resolve_model_path("default"))
    config = LlamaConfig(**spec, num_hidden_layers=layers, vocab_size=49152, max_position_embeddings=8192,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


def layer_cost(rows: list[dict], shape: str) -> dict:
    """Per layer and fixed part at each window length and probe mode: peak(2 layers) − peak(1 layer)."""
    out = {}
    for mode in ("recompute", "keep"):
        by = {(r["layers"], r["seq_len"]): r for r in rows if r.get("shape") == shape and r["mode"] == mode and "wall_s" in r}
        for T in sorted({t for _, t in by}):
            if (1, T) in by and (2, T) in by:
                one, two = by[(1, T)], by[(2, T)]
                out.setdefault(mode, {})[str(T)] = {
                    "layer_gib": two["peak_rss_gib"] - one["peak_rss_gib"], "fixed_gib": 2 * one["peak_rss_gib"] - two["peak_rss_gib"],
                    "layer_s": two["sensitivity_s"] - one["sensitivity_s"], "fixed_s": 2 * one["sensitivity_s"] - two["sensitivity_s"]}
    return out


LLAMA_31 = {  # the hub configs' sizes; both have 8 KV heads of 128 and a 128,256-token vocabulary
    "Llama-3.1-8B": {"layers": 32, "width": 4096, "mlp": 14336, "heads": 32},
    "Llama-3.1-70B": {"layers": 80, "width": 8192, "mlp": 28672, "heads": 64},
}


def _layer_params(width: int, mlp: int, heads: int, kv_heads: int = 8, head_dim: int = 128) -> int:
    return 2 * width * heads * head_dim + 2 * width * kv_heads * head_dim + 3 * width * mlp + 2 * width


def project_layers(costs: dict, shape: str, seq_lens: tuple[int, ...] = (2048, 8192, 32768)) -> list[dict]:
    """Llama-3.1-8B and 70B in bf16 from one measured float32 layer of 8B's shape: weights at 2
    bytes; the layer's activations (measured less its weights) halved, as the model keeps them in
    its dtype, and doubled for 70B, whose width, MLP and query heads are all twice 8B's; the real
    vocabulary's embedding and head, and float32 logits with their gradient, added. Between and
    beyond the measured lengths a layer's activations are a·T + b·T² fitted to the measurements."""
    s = LAYER_SHAPES[shape]
    measured_params = _layer_params(s["hidden_size"], s["intermediate_size"], s["num_attention_heads"])
    rows = []
    for mode, by_T in costs.items():
        Ts = np.array([int(t) for t in by_T], float)
        acts = np.array([(c["layer_gib"] * 2**30 - 4 * measured_params) / 2 for c in by_T.values()])
        if len(Ts) >= 2:
            (a, b), _ = nnls(np.stack([Ts, Ts**2], axis=1), acts)
        else:  # one length measured: its own figure, at that length only
            a, b = acts[0] / Ts[0], 0.0
        for T in seq_lens if len(Ts) >= 2 else [int(Ts[0])]:
            activations = a * T + b * T**2
            for name, m in LLAMA_31.items():
                params = m["layers"] * _layer_params(m["width"], m["mlp"], m["heads"]) + 2 * 128256 * m["width"]
                act = m["layers"] * activations * m["width"] / s["hidden_size"]
                logits = T * 128256 * (2 + 4 + 4)
                total = 2 * params + act + logits
                rows.append({"model": name, "seq_len": T, "probe": mode, "measured_up_to": int(Ts.max()),
                             "bytes_per_layer_token": a, "bytes_per_layer_token2": b, "weights_gib": 2 * params / 2**30,
                             "activations_gib": act / 2**30, "logits_gib": logits / 2**30, "total_gib": total / 2**30,
                             "gpus_80gb": int(-(-total // (76 * 2**30)))})
    return rows


def fit(rows: list[dict], shapes: dict) -> dict:
    ok = [r for r in rows if "sensitivity_s" in r and r["validate_windows"] == 0]
    T = np.array([r["seq_len"] for r in ok], float)
    P = np.array([shapes[r["model"]]["params"] for r in ok], float)
    L = np.array([shapes[r["model"]]["layers"] for r in ok], float)
    H = np.array([shapes[r["model"]]["heads"] for r in ok], float)
    D = np.array([shapes[r["model"]]["width"] for r in ok], float)
    per_window = np.array([r["sensitivity_s"] / r["windows"] for r in ok])
    time_x = np.stack([P * T, L * H * T**2], axis=1)
    a, _ = nnls(time_x / per_window[:, None], np.ones(len(ok)))  # relative error
    memory = np.array([r["peak_rss_gib"] * 2**30 for r in ok])
    mem_x = np.stack([P, L * D * T, L * H * T**2], axis=1)
    m, _ = nnls(mem_x / memory[:, None], np.ones(len(ok)))
    return {"time_per_window": {"a_s_per_param_token": a[0], "b_s_per_layer_head_token2": a[1],
                                "max_relative_error": float(np.max(np.abs(time_x @ a / per_window - 1)))},
            "memory": {"w_bytes_per_param": m[0], "c_bytes_per_layer_width_token": m[1], "e_bytes_per_layer_head_token2": m[2],
                       "max_relative_error": float(np.max(np.abs(mem_x @ m / memory - 1)))},
            "points": len(ok)}


def project(model_fit: dict, seq_lens: list[int]) -> list[dict]:
    """Memory in bf16 on GPUs: the fitted float32 coefficients halved (weights 2 bytes, activations
    and attention views 2 bytes where the probe keeps them in the model's dtype)."""
    m = model_fit["memory"]
    rows = []
    for name, s in PROJECTED.items():
        for T in seq_lens:
            weights = s["params"] * 2
            activations = m["c_bytes_per_layer_width_token"] / 2 * s["layers"] * s["width"] * T
            views = m["e_bytes_per_layer_head_token2"] / 2 * s["layers"] * s["heads"] * T**2
            total = weights + activations + views
            rows.append({"model": name, "seq_len": T, "weights_gib": weights / 2**30, "activations_gib": activations / 2**30,
                         "attention_views_gib": views / 2**30, "total_gib": total / 2**30,
                         "gpus_80gb_for_weights_and_activations": int(np.ceil(total / (76 * 2**30)))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"])
    parser.add_argument("--seq-lens", nargs="+", type=int, default=[512, 1024, 2048])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--layer-shapes", nargs="*", default=[], help=f"also measure layers of these shapes: {list(LAYER_SHAPES)}")
    args = parser.parse_args()
    if args.layer_shapes:
        return measure_layers(args)
    out = ROOT / "benchmarks" / "results" / "profile_cost.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    rows = [r for r in previous.get("runs", []) if not (r["model"] in args.models and r["seq_len"] in args.seq_lens)]
    shapes = previous.get("shapes", {})
    for model in args.models:
        shapes[model] = describe(model)
        for seq_len in args.seq_lens:
            for validate in ([0, 1] if seq_len == min(args.seq_lens) else [0]):
                row = profile_run(model, seq_len, args.windows, validate)
                print(json.dumps(row), flush=True)
                rows.append(row)
                out.write_text(json.dumps({"runs": rows, "shapes": shapes}, indent=2) + "\n")
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU, float32)",
              "runs": rows, "shapes": shapes}
    if sum("sensitivity_s" in r and r["validate_windows"] == 0 for r in rows) >= 3:
        result["fit"] = fit(rows, shapes)
        result["projection_bf16"] = project(result["fit"], [2048, 8192])
    out.write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(json.dumps({k: result.get(k) for k in ("fit", "projection_bf16")}, indent=2, default=float))


def measure_layers(args) -> None:
    out = ROOT / "benchmarks" / "results" / "profile_cost_layers.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    wanted = {(s, m) for s in args.layer_shapes for m in ("recompute", "keep")}
    rows = [r for r in previous.get("runs", []) if not ((r["shape"], r["mode"]) in wanted and r["seq_len"] in args.seq_lens)]
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU, float32)"}
    for shape in args.layer_shapes:
        for layers in (1, 2):
            folder = build_layers(shape, layers)
            for seq_len in args.seq_lens:
                # keeping the views is measured at the longest window only (where it matters; CPU time is short)
                for mode in ("recompute", "keep") if seq_len == max(args.seq_lens) else ("recompute",):
                    row = profile_run(str(folder), seq_len, 1, 0, () if mode == "recompute" else ("--keep-attention",))
                    row.update(shape=shape, layers=layers, mode=mode, model=f"{shape}-{layers}L")
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    out.write_text(json.dumps({**result, "runs": rows}, indent=2) + "\n")
        result.setdefault("per_layer", {})[shape] = layer_cost(rows, shape)
        result.setdefault("projection_bf16", []).extend(project_layers(result["per_layer"][shape], shape))
    out.write_text(json.dumps({**result, "runs": rows}, indent=2, default=float) + "\n")
    print(json.dumps({k: result[k] for k in ("per_layer", "projection_bf16")}, indent=2, default=float))


if __name__ == "__main__":
    main()
