"""Held-out tables on the real models (issue 29): FP16, the uniform plans and given plan files,
with each plan's paired per-window NLL gap to FP16 and to uniform K3V3.

    .venv/bin/python benchmarks/real_models.py heldout --model gemma3-270m [--windows 32] [--seq-len 512]
        [--plan recipes/gemma3-270m/plan-3.25bits.json ...] [--data enwiki|pystdlib]
        [--baselines fp16,uniform:k3v3 --merge]
    .venv/bin/python benchmarks/real_models.py race-check --model gemma3-270m

``race-check`` repeats issue 29's short run (profile --windows 4 --max-tokens 512
--validate-windows 0; search --budget 3.25bits --verify-windows 4) and measures, on 8 held-out
windows, the chosen plan against the profile's best prediction among the raced plans.
Results: benchmarks/results/real_models/<model>-<what>.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from kvtune.data import load_windows
from kvtune.models import canonical_name, load_model
from kvtune.perplexity import token_nll
from kvtune.plan import resolve_plan
from kvtune.search.verify import paired_gap

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "real_models"
UNIFORM = ["fp16", "uniform:k8v8", "uniform:k4v4", "uniform:k4v3", "uniform:k3v3", "uniform:k4v2", "uniform:k3v2", "uniform:k2v2"]


def heldout(model_name: str, plans: list[str], windows: int, seq_len: int, data: str = "enwiki", seed: int = 0,
            after_each=None) -> dict:
    """Held-out NLL of each plan over the same windows; ``after_each(result)`` gets the table so far
    after every plan (long runs save as they go)."""
    model, tokenizer = load_model(model_name)
    from kvtune.models import model_shape

    shape = model_shape(model)
    ids = load_windows(tokenizer, "heldout", seq_len, windows, seed, data)
    nll = {}
    for spec in plans:
        plan = resolve_plan(spec, shape.num_layers, shape.group_dim)
        plan.check_model(shape, model_name)
        nll[spec] = (token_nll(model, ids, plan).mean(dim=1).double().numpy(), plan.nominal_bits(shape))
        print(f"{spec}: PPL {np.exp(nll[spec][0].mean()):.4f}", flush=True)
        rows = [{"plan": spec, "nominal_bits": bits, "ppl": float(np.exp(values.mean())),
                 "window_nll": values.tolist()}  # per window, so later plans can be paired with these
                for spec, (values, bits) in nll.items()]
        result = {"model": canonical_name(model_name), "data": data, "split": "heldout", "windows": windows,
                  "seq_len": seq_len, "rows": pair_rows(rows)}
        if after_each is not None:
            after_each(result)
    return result


def pair_rows(rows: list[dict]) -> list[dict]:
    """Each row's paired gap to FP16 and to uniform K3V3 over the same windows, wherever those rows
    are present (they may come from an earlier run that --merge kept)."""
    by_plan = {row["plan"]: np.asarray(row["window_nll"]) for row in rows if "window_nll" in row}
    for row in rows:
        for key, reference in (("gap_vs_fp16", "fp16"), ("gap_vs_k3v3", "uniform:k3v3")):
            if row["plan"] in by_plan and reference in by_plan:
                row[key] = paired_gap(by_plan[row["plan"]], by_plan[reference])
        if "window_nll" in row:
            row["window_nll"] = row.pop("window_nll")  # keep the long list last in each row
    return rows


def _kvtune(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "kvtune", *args], check=True, cwd=ROOT)


def race_check(model_name: str) -> dict:
    import pandas as pd

    work = ROOT / "outputs" / canonical_name(model_name) / "race-check"
    _kvtune("profile", "--model", model_name, "--windows", "4", "--max-tokens", "512", "--validate-windows", "0",
            "--out", str(work / "profile"))
    _kvtune("search", "--profile", str(work / "profile"), "--budget", "3.25bits", "--verify-windows", "4",
            "--out", str(work / "search"), "--overwrite")
    front = pd.read_csv(work / "search" / "front.csv")
    meta = json.loads((work / "search" / "search.json").read_text())
    raced = front[front["verified_nll"].notna()]
    best = raced.loc[raced["predicted_loss"].idxmin()]
    chosen = front.loc[front["chosen"]].iloc[0]
    plans = {"chosen": str(work / "search" / "plan.json")}
    table = heldout(model_name, ["fp16", *plans.values()], 8, 512)
    return {"model": canonical_name(model_name), "race": meta.get("race"), "notes": meta.get("notes"),
            "chosen_pairs": chosen["pairs"], "best_predicted_pairs": best["pairs"],
            "chosen_is_best_predicted": bool(chosen["id"] == best["id"]), "heldout": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["heldout", "race-check"])
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", action="append", default=[])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--data", default="enwiki")
    parser.add_argument("--tag", default="")
    parser.add_argument("--baselines", default=",".join(UNIFORM), help="uniform plans to measure beside --plan (fp16 always)")
    parser.add_argument("--merge", action="store_true", help="keep the earlier result's rows of plans not measured now "
                        "(same windows: same model, data, length, count and seed)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.what == "heldout":
        baselines = list(dict.fromkeys(["fp16", *[b for b in args.baselines.split(",") if b]]))
        name = f"{canonical_name(args.model)}-heldout-{args.data}-{args.seq_len}x{args.windows}{args.tag}.json"
        earlier = json.loads((RESULTS / name).read_text())["rows"] if args.merge and (RESULTS / name).is_file() else []

        def merged(result: dict) -> dict:
            measured = {row["plan"] for row in result["rows"]}
            kept = [r for r in earlier if r["plan"] not in measured]
            rows = [r for r in kept if r["plan"] in UNIFORM] + result["rows"] + [r for r in kept if r["plan"] not in UNIFORM]
            rows.sort(key=lambda r: (r["plan"] not in UNIFORM, UNIFORM.index(r["plan"]) if r["plan"] in UNIFORM else 0))
            return {**result, "rows": pair_rows(rows)}

        def save(result: dict) -> None:
            (RESULTS / name).write_text(json.dumps(merged(result), indent=2, default=float) + "\n")

        result = merged(heldout(args.model, list(dict.fromkeys(baselines + args.plan)), args.windows, args.seq_len, args.data,
                                after_each=save))
    else:
        result = race_check(args.model)
        name = f"{canonical_name(args.model)}-race-check.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2, default=float) + "\n")
    print(f"written {RESULTS / name}")


if __name__ == "__main__":
    main()
