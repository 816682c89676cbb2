"""Launch settings and unpacking variants of the decode kernel at 32K: picks the defaults.

    python -m benchmarks.decode_sweep > benchmarks/results/decode_sweep_<gpu>.jsonl   # needs a CUDA GPU

One JSON line per (batch, bit pair, block_n, num_warps, num_stages, gather_codes, gather_scales);
all variants compute the same result (tests/test_kernels.py), only their speed differs.
"""

from __future__ import annotations

import itertools
import json

import torch
from triton.testing import do_bench

from benchmarks.decode_attention import HEAD_DIM, KV_HEADS, Q_HEADS, stream
from kvtune.kernels.decode_attention import decode_attention

SETTINGS = dict(block_n=(32, 64), num_warps=(2, 4), num_stages=(2,), gather_codes=(False, True), gather_scales=(False, True))


def main() -> None:
    for batch, (k_bits, v_bits) in itertools.product((1, 8), ((4, 4), (2, 2), (8, 8))):
        torch.manual_seed(0)
        k = torch.randn(batch, KV_HEADS, 32768, HEAD_DIM, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
        key, value = stream(k, k_bits, "per-channel"), stream(v, v_bits, "per-token")
        for values in itertools.product(*SETTINGS.values()):
            setting = dict(zip(SETTINGS, values))
            try:
                ms = do_bench(lambda: decode_attention(q, key, value, **setting), warmup=10, rep=30, return_mode="median")
            except Exception as error:  # a setting may not fit in shared memory or registers
                ms, setting["error"] = None, str(error)[:120]
            print(json.dumps(dict(batch=batch, pair=f"k{k_bits}v{v_bits}", ms=ms, **setting)), flush=True)


if __name__ == "__main__":
    main()
