"""Launch settings of the decode kernel at 32K (block_n, num_warps, splits): picks the defaults.

    python benchmarks/decode_sweep.py       # needs a CUDA GPU; prints one JSON line per setting
"""

from __future__ import annotations

import itertools
import json

import torch
from triton.testing import do_bench

from benchmarks.decode_attention import HEAD_DIM, KV_HEADS, Q_HEADS, stream
from kvtune.kernels.decode_attention import decode_attention


def main() -> None:
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for batch, (k_bits, v_bits) in itertools.product((1, 8), ((4, 4), (16, 16), (2, 2))):
        torch.manual_seed(0)
        k = torch.randn(batch, KV_HEADS, 32768, HEAD_DIM, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        q = torch.randn(batch, Q_HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.float16)
        key, value = stream(k, k_bits, "per-channel"), stream(v, v_bits, "per-token")
        for block_n, warps, stages, waves in itertools.product((32, 64, 128), (2, 4, 8), (1, 2), (1, 2, 4)):
            splits = max(1, waves * sms // (batch * KV_HEADS))
            try:
                ms = do_bench(lambda: decode_attention(q, key, value, num_splits=splits, block_n=block_n,
                                                       num_warps=warps, num_stages=stages),
                              warmup=10, rep=30, return_mode="median")
            except Exception as error:  # a setting may not fit in shared memory or registers
                ms = None
                print(json.dumps({"error": str(error)[:120]}))
            print(json.dumps(dict(batch=batch, pair=f"k{k_bits}v{v_bits}", block_n=block_n, warps=warps,
                                  stages=stages, waves=waves, splits=splits, ms=ms)), flush=True)


if __name__ == "__main__":
    main()
