"""Whole-model decode latency with the mixed-precision cache on a GPU, FP16 cache as the baseline.

    python benchmarks/decode_model.py --context 32768 --layers 32     # writes results/decode_model_<gpu>.json

A Llama-3-8B-shaped model with random weights (decode speed does not depend on weight values;
accuracy is measured on CPU with the real default model). One prompt of ``--context`` random
tokens is prefilled, then ``--steps`` single-token decode steps are timed. Caches compared:
transformers' DynamicCache in fp16 (SDPA), and the mixed-precision cache at uniform K8V8/K4V4/K2V2
through the fused path (the Triton kernel reads packed K/V), and K4V4 through the reference path
(everything dequantized every step) to show what fusing buys.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from pathlib import Path

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from kvtune.cache import load_cache
from kvtune.plan import Plan


def llama3_8b(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.float16).eval()
    model.set_attn_implementation("sdpa")
    return model


@torch.inference_mode()
def decode_ms(model, cache, prompt: torch.Tensor, steps: int) -> tuple[float, int]:
    out = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    for _ in range(3):  # warm-up: compile kernels, settle the allocator
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        token = model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    held = cache.nbytes() if hasattr(cache, "nbytes") else sum(
        layer.keys.numel() * 2 + layer.values.numel() * 2 for layer in cache.layers
    )
    return (time.perf_counter() - start) / steps * 1e3, held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")

    model = llama3_8b(args.layers)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, args.context), device="cuda")
    rows = []

    def run(name, make_cache):
        cache = make_cache()
        with cache.fused_decoding(model) if hasattr(cache, "fused_decoding") else contextlib.nullcontext():
            ms, held = decode_ms(model, cache, prompt, args.steps)
        rows.append({"cache": name, "ms_per_token": round(ms, 3), "cache_GiB": round(held / 2**30, 3)})
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()

    run("fp16 DynamicCache (sdpa)", lambda: DynamicCache(config=model.config))
    for pair in ("k8v8", "k4v4", "k2v2"):
        run(f"kvtune {pair} fused", lambda: load_cache(model, Plan.uniform(pair, args.layers), fused_decode=True))
    run("kvtune k4v4 reference (dequantize all)", lambda: load_cache(model, Plan.uniform("k4v4", args.layers), fused_decode=False))

    name = torch.cuda.get_device_name()
    result = {
        "device": name,
        "torch": torch.__version__,
        "model": f"Llama-3-8B shape, {args.layers} layers, random fp16 weights",
        "context": args.context, "batch": args.batch, "steps": args.steps,
        "rows": rows,
    }
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_model_{slug}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
