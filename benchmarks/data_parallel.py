"""Data-parallel profile and perplexity (issue 31): the same work in one process and under torchrun
with N processes, wall time of each, and that the results agree.

    .venv/bin/python benchmarks/data_parallel.py [--nproc 2] [--windows 8] [--seq-len 256]

On a CPU machine the processes share the cores: one process uses all of them (torch's threads), each of
N processes 1/N of them, so the ratio measures what splitting the data costs or saves at equal
hardware. Results: benchmarks/results/data_parallel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], nproc: int, threads: int, cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    launcher = [sys.executable, "-m", "kvtune"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m", "kvtune"]
    start = time.perf_counter()
    done = subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    profile = ["profile", "--windows", str(args.windows), "--batch-size", "1", "--max-tokens", str(args.seq_len),
               "--validate-windows", "0", "--formats", "int"]
    ppl = ["ppl", "--plan", "fp16", "--plan", "uniform:k4v2", "--windows", str(4 * args.windows), "--seq-len", str(args.seq_len)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run(["ppl", "--plan", "fp16", "--windows", "1", "--seq-len", "16", "--out", "warm"], 1, cores, tmp)  # model and data cached
        for nproc in (1, args.nproc):
            threads = max(cores // nproc, 1)
            for name, command in (("profile", profile), ("ppl", ppl)):
                seconds = run([*command, "--out", f"{name}-{nproc}"], nproc, threads, tmp)
                rows.append({"command": name, "processes": nproc, "threads_each": threads, "seconds": round(seconds, 1)})
                print(rows[-1], flush=True)
        one, many = (pd.read_csv(tmp / f"profile-{n}" / "profile.csv") for n in (1, args.nproc))
        numbers = one.select_dtypes("number").columns
        profile_gap = float(((one[numbers] - many[numbers]).abs() / one[numbers].abs().clip(lower=1e-30)).max().max())
        ppl_one, ppl_many = (pd.read_csv(tmp / f"ppl-{n}" / "ppl.csv")["ppl"].tolist() for n in (1, args.nproc))
    table = pd.DataFrame(rows)
    ratios = {name: float(g.set_index("processes")["seconds"][1] / g.set_index("processes")["seconds"][args.nproc])
              for name, g in table.groupby("command")}
    result = {"cores": cores, "settings": vars(args), "rows": rows, "speedup": ratios,
              "profile_max_relative_difference": profile_gap, "ppl_one_process": ppl_one, "ppl_data_parallel": ppl_many}
    out = ROOT / "benchmarks" / "results" / "data_parallel.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table.to_string(index=False))
    print(f"speedup with {args.nproc} processes: {ratios}; profile max relative difference {profile_gap:.1e}")


if __name__ == "__main__":
    main()
