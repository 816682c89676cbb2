"""What the search's estimate predicts against what the PPL check measures, plan by plan.

    .venv/bin/python benchmarks/kl_vs_nll.py                     # ~22 min on 2 CPU cores

The profile's Taylor estimate approximates the mean KL(p_fp16 ‖ p_plan) per token: how far the
quantized model's predictions move from the FP16 model's. The held-out check (search_quality.py) measures
the change in NLL of the true next token. The two agree when quantization only adds damage; they
part where the FP16 model's errors on the text are such that moving its predictions costs nothing
or even helps. This measures both, paired on the same held-out windows, for the uniform plans
at 6 bits and the front's plans at that memory (benchmarks/results/search_ties*.json), so that
whether the front's plans lose to K8V4 on KL (the estimate is wrong) or only on NLL (the
estimate answers another question) can be read off. Each plan's predicted loss (Σ taylor) comes
from --profile (outputs/profile-int: `kvtune profile --formats int --out outputs/profile-int`, the set
these figures were made with). Writes benchmarks/results/kl_vs_nll.json;
`--render FILE` prints it as the Markdown table in README/docs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvtune.data import load_windows
from kvtune.models import load_model
from kvtune.plan import LayerPlan, Plan
from kvtune.profiling.artifact import Profile
from kvtune.search.verify import paired_gap
from kvtune.simulate import simulate_quantization

WINDOWS, SEQ_LEN, SEED = 128, 512, 1  # held-out, as search_ties.py (a draw of 128, not a prefix of its 256)
RESULTS = Path(__file__).parent / "results"


def front_plans() -> dict[str, str]:
    """The front's plans at K8V4's memory that search_ties.py measured, by name."""
    plans = {}
    for file in ("search_ties.json", "search_ties_6bits_verify128.json"):
        for row in json.loads((RESULTS / file).read_text())["rows"]:
            if row["uniform"] == "k8v4":
                plans[f"front {row['front_nominal_bits']:.2f} bits ({file})"] = row["front_pairs"]
    return plans


@torch.no_grad()
def per_window(model, windows: torch.Tensor, plans: dict[str, Plan], batch_size: int = 2) -> dict[str, dict[str, np.ndarray]]:
    """Per window: mean NLL per token under every plan and mean KL(fp16 ‖ plan) per token."""
    fp16 = Plan.uniform("k16v16", model.config.num_hidden_layers, name="fp16")
    out = {name: {"nll": [], "kl": []} for name in ["fp16", *plans]}
    for start in tqdm(range(0, len(windows), batch_size), desc="windows", leave=False):
        ids = windows[start : start + batch_size]
        targets = ids[:, 1:].unsqueeze(-1)
        # FP16 through the same simulated attention, so the only difference is the quantization.
        with simulate_quantization(model, fp16):
            reference = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        for name, plan in [("fp16", None), *plans.items()]:
            if plan is None:
                logprobs = reference
            else:
                with simulate_quantization(model, plan):
                    logprobs = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
            nll = -logprobs.gather(-1, targets).squeeze(-1)
            kl = F.kl_div(logprobs, reference, log_target=True, reduction="none").sum(-1)
            out[name]["nll"].append(nll.mean(1))
            out[name]["kl"].append(kl.mean(1))
    return {name: {k: torch.cat(v).numpy() for k, v in cols.items()} for name, cols in out.items()}


def predicted_loss(profile: Profile, plan: Plan) -> float:
    taylor = profile.matrix("taylor")
    columns = [profile.pairs.index(name) for name in plan.candidates]
    return float(sum(taylor[layer, j] for layer, j in enumerate(columns)))


def render(path: str) -> None:
    summary = json.loads(Path(path).read_text())
    print(f"held-out: {summary['heldout']}; per token, in nats; gaps paired over windows, ± their standard error\n")
    print("| plan | nominal bits | predicted loss | KL to FP16 | ΔNLL vs FP16 | PPL | KL − K8V4 | NLL − K8V4 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in summary["rows"]:
        print(f"| {r['plan']} | {r['nominal_bits']:.2f} | {r['predicted_loss']:.5f} | {r['kl']:.5f} | {r['nll_change_vs_fp16']:+.5f} | {r['ppl']:.3f} "
              f"| {r['kl_gap_vs_k8v4']:+.5f} ± {r['kl_gap_vs_k8v4_se']:.5f} | {r['nll_gap_vs_k8v4']:+.5f} ± {r['nll_gap_vs_k8v4_se']:.5f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=WINDOWS)
    parser.add_argument("--profile", default="outputs/profile-int")
    parser.add_argument("--out", default=str(RESULTS / "kl_vs_nll.json"))
    parser.add_argument("--render", metavar="FILE", help="print a results file as a table and exit")
    args = parser.parse_args()
    if args.render:
        return render(args.render)
    profile = Profile.load(args.profile)
    model, tokenizer = load_model()
    layers = model.config.num_hidden_layers
    plans = {pair: Plan.uniform(pair, layers, name=pair) for pair in ("k8v8", "k8v4", "k4v8")}
    for name, pairs in front_plans().items():
        plans[name] = Plan(tuple(LayerPlan.from_pair(p) for p in pairs.split(",")), name=name)
    windows = load_windows(tokenizer, "heldout", SEQ_LEN, args.windows, SEED)
    measured = per_window(model, windows, plans)
    rows = []
    for name, cols in measured.items():
        plan = plans.get(name)
        row = {"plan": name, "pairs": ",".join(plan.pairs) if plan else "K16V16",
               "nominal_bits": plan.nominal_bits() if plan else 16.0,
               "predicted_loss": predicted_loss(profile, plan) if plan else 0.0,
               "ppl": math.exp(cols["nll"].mean()), "kl": float(cols["kl"].mean())}
        # Paired against K8V4: what the README's 6-bit row compares.
        for key in ("nll", "kl"):
            row[f"{key}_gap_vs_k8v4"], row[f"{key}_gap_vs_k8v4_se"] = paired_gap(cols[key], measured["k8v4"][key])
        row["nll_change_vs_fp16"] = float((cols["nll"] - measured["fp16"]["nll"]).mean())
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"heldout": f"{args.windows} windows x {SEQ_LEN} tokens, seed {SEED}", "rows": rows}
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
