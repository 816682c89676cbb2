"""Decode attention at real sizes: FP16 SDPA against the fused kernel over packed 8/4/2-bit K/V.

    python benchmarks/decode_attention.py                 # needs a CUDA GPU; writes results/decode_attention_<gpu>.json
    python benchmarks/decode_attention.py --quick         # 4K and 32K only
    python benchmarks/decode_attention.py --render benchmarks/results/decode_attention_nvidia-h100-80gb-hbm3.json

One attention layer shaped like Llama-3-8B's (32 query heads, 8 KV heads, head_dim 128), one new
token per sequence, contexts 4K/32K/128K, batch 1 and 8. K is stored per-channel and V per-token,
groups of 32, with a 32-token fp16 residual tail, exactly as the cache stores them.

For each case: the kernel's max abs error against the plain-PyTorch reference (float32), the
median time (triton.testing.do_bench, L2 flushed between runs), the bytes that must be read (codes,
scales, zeros, tail, query) and the achieved bandwidth as a fraction of the device's peak (the
datasheet figure) and of a measured device-to-device copy. FP16 baselines: SDPA with
``enable_gqa=True``, and SDPA with the query heads folded onto their KV head (one MHA call with
``group`` query rows, the fastest SDPA form for GQA decode); the speed-up is against the faster.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kvtune.kernels.decode_attention import decode_attention, decode_attention_reference
from kvtune.quant import QuantSpec, quantize

Q_HEADS, KV_HEADS, HEAD_DIM, RESIDUAL, GROUP_SIZE = 32, 8, 128, 32, 32
PAIRS = [(16, 16), (8, 8), (4, 4), (4, 2), (2, 2)]
# Datasheet HBM bandwidth (bytes/s) of the GPUs this was run on; others report the copy fraction only.
PEAK_BANDWIDTH = {"H100 80GB HBM3": 3.35e12, "H100": 3.35e12, "H200": 4.8e12}


def peak_bandwidth(name: str) -> float | None:
    for key, value in PEAK_BANDWIDTH.items():
        if key in name:
            return value
    return None


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy: what is reachable in practice."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def stream(x: torch.Tensor, bits: int, mode: str):
    """(quantized prefix, fp16 tail) as the cache holds ``x`` with the residual window."""
    if bits == 16:
        return None, x
    spec = QuantSpec(bits, mode, GROUP_SIZE)
    n = spec.quantized_tokens(x.shape[-2], RESIDUAL)
    return quantize(x[..., :n, :], spec), x[..., n:, :].contiguous()


def nbytes(*tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        if hasattr(t, "packed"):
            total += t.nbytes
        else:
            total += t.numel() * t.element_size()
    return total


def max_error(q, key, value) -> float:
    """Kernel vs reference, one sequence at a time so the float32 reference fits at 128K."""
    worst = 0.0
    ours = decode_attention(q, key, value)
    for b in range(q.shape[0]):
        pick = lambda part: None if part is None else (part.map(lambda t: t[b : b + 1]) if hasattr(part, "map") else part[b : b + 1])  # noqa: E731
        ref = decode_attention_reference(q[b : b + 1], tuple(map(pick, key)), tuple(map(pick, value)))
        worst = max(worst, (ours[b : b + 1].float() - ref.float()).abs().max().item())
    return worst


def run_case(batch: int, tokens: int, peak: float | None, copy_bw: float, launch: dict) -> list[dict]:
    torch.manual_seed(0)
    k = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.float16)
    v = torch.randn(batch, KV_HEADS, tokens, HEAD_DIM, device="cuda", dtype=torch.float16)
    q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
    group = Q_HEADS // KV_HEADS
    rows = []

    def record(name, ms, read_bytes, error=None):
        bw = read_bytes / (ms * 1e-3)
        rows.append({
            "kernel": name, "batch": batch, "context": tokens, "ms": round(ms, 4), "bytes_read": read_bytes,
            "bandwidth_GBps": round(bw / 1e9, 1),
            "fraction_of_peak": round(bw / peak, 3) if peak else None,
            "fraction_of_copy": round(bw / copy_bw, 3),
            "max_abs_error": error,
        })
        print(json.dumps(rows[-1]), flush=True)

    fp16_bytes = nbytes(k, v, q, q)
    ms = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), return_mode="median")
    record("sdpa_fp16_enable_gqa", ms, fp16_bytes)
    folded = q.view(batch, KV_HEADS, group, HEAD_DIM)  # query heads of one KV head as query rows
    ms = do_bench(lambda: F.scaled_dot_product_attention(folded, k, v), return_mode="median")
    record("sdpa_fp16_folded_gqa", ms, fp16_bytes)

    for k_bits, v_bits in PAIRS:
        key, value = stream(k, k_bits, "per-channel"), stream(v, v_bits, "per-token")
        error = max_error(q, key, value)
        ms = do_bench(lambda: decode_attention(q, key, value, **launch), return_mode="median")
        record(f"kvtune_k{k_bits}v{v_bits}", ms, nbytes(*key, *value, q, q), round(error, 6))
    return rows


def markdown_table(result: dict) -> str:
    """The results as the table in docs/kernels.md."""
    lines = [
        "| batch | context | FP16 SDPA (best) ms | kernel | ms | vs FP16 | GB/s | of peak | max abs err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    for batch, tokens in sorted({(r["batch"], r["context"]) for r in rows}):
        case = [r for r in rows if r["batch"] == batch and r["context"] == tokens]
        fp16 = min(r["ms"] for r in case if r["kernel"].startswith("sdpa"))
        for r in case:
            if r["kernel"].startswith("kvtune"):
                peak = f"{r['fraction_of_peak']:.2f}" if r["fraction_of_peak"] is not None else "–"
                lines.append(
                    f"| {batch} | {tokens // 1024}K | {fp16:.4f} | {r['kernel'].removeprefix('kvtune_').upper()} | {r['ms']:.4f} "
                    f"| {fp16 / r['ms']:.2f}× | {r['bandwidth_GBps']:.0f} | {peak} | {r['max_abs_error']:.1e} |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4K and 32K only")
    parser.add_argument("--launch", default="{}", help='launch settings for the packed kernel as JSON, e.g. \'{"block_n": 32}\' (default: the kernel\'s own)')
    parser.add_argument("--render", metavar="RESULTS_JSON", help="print a results file as a markdown table and exit")
    parser.add_argument("--out", default=None, help="results file (default: benchmarks/results/decode_attention_<gpu>.json)")
    args = parser.parse_args()
    if args.render:
        print(markdown_table(json.loads(Path(args.render).read_text())))
        return
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (the kernels' correctness on CPU is in tests/test_kernels.py)")

    name = torch.cuda.get_device_name()
    peak, copy_bw = peak_bandwidth(name), copy_bandwidth()
    contexts = [4096, 32768] if args.quick else [4096, 32768, 131072]
    launch = json.loads(args.launch)
    rows = [row for batch in (1, 8) for tokens in contexts for row in run_case(batch, tokens, peak, copy_bw, launch)]

    summary = {}
    for batch in (1, 8):
        for tokens in contexts:
            case = {r["kernel"]: r for r in rows if r["batch"] == batch and r["context"] == tokens}
            fp16 = min(case["sdpa_fp16_enable_gqa"]["ms"], case["sdpa_fp16_folded_gqa"]["ms"])
            summary[f"batch{batch}_ctx{tokens}"] = {
                kernel: round(fp16 / r["ms"], 2) for kernel, r in case.items() if kernel.startswith("kvtune")
            }
    result = {
        "device": name,
        "machine": f"{platform.machine()}, torch {torch.__version__}, triton {triton.__version__}",
        "shape": f"Llama-3-8B layer: {Q_HEADS} query heads, {KV_HEADS} KV heads, head_dim {HEAD_DIM}, 1 new token, fp16",
        "storage": f"K per-channel, V per-token, group {GROUP_SIZE}, residual {RESIDUAL} fp16 tokens",
        "launch": launch or "kernel defaults",
        "peak_bandwidth_GBps": peak / 1e9 if peak else None,
        "measured_copy_bandwidth_GBps": round(copy_bw / 1e9, 1),
        "speedup_vs_best_fp16_sdpa": summary,
        "rows": rows,
    }
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()
    out = Path(args.out or Path(__file__).parent / "results" / f"decode_attention_{slug}.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown_table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
