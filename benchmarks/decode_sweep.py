"""Launch settings and unpacking variants of the decode kernel at 32K: picks the defaults.

    python -m benchmarks.decode_sweep > benchmarks/results/decode_sweep_<gpu>.jsonl   # needs a CUDA GPU
    python -m benchmarks.decode_sweep --pick benchmarks/results/decode_sweep_<gpu>.jsonl   # the defaults it implies

One JSON line per (batch, bit pair, block_n, num_warps, num_stages, gather_codes, gather_scales);
all variants compute the same result (tests/test_kernels.py), only their speed differs.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json

import torch
from triton.testing import do_bench

from benchmarks.decode_attention import HEAD_DIM, KV_HEADS, Q_HEADS, stream
from kvtune.kernels.decode_attention import decode_attention

# The packed loop waits more than it works (docs/kernels.md): deeper pipelines and larger blocks put
# more bytes in flight per program but fit fewer programs per SM (benchmarks/kernel_static.py), and
# only timing says which wins. Gathering codes was slower in every case of the first sweep.
SETTINGS = dict(block_n=(32, 64, 128), num_warps=(2, 4), num_stages=(2, 3, 4), gather_codes=(False,), gather_scales=(False, True))


def pick(lines: list[str]) -> dict:
    """The setting with the lowest summed K4V4 + K2V2 time, among those measured in every case."""
    total, count = collections.defaultdict(float), collections.Counter()
    for row in (json.loads(line) for line in lines if line.startswith('{"batch')):
        if row["ms"] is not None and row["pair"] in ("k4v4", "k2v2"):
            key = tuple(row[name] for name in SETTINGS)
            total[key] += row["ms"]
            count[key] += 1
    complete = max(count.values())
    return dict(zip(SETTINGS, min((ms, key) for key, ms in total.items() if count[key] == complete)[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pick", metavar="SWEEP_JSONL", help="print the best setting of a sweep's output and exit")
    args = parser.parse_args()
    if args.pick:
        print(json.dumps(pick(open(args.pick).read().splitlines())))
        return
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
