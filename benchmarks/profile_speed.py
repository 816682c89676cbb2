"""Wall time of `kvtune profile` as a ratio to one forward+backward pass over the same calibration set.

    .venv/bin/python benchmarks/profile_speed.py            # default model and settings

The baseline is what any gradient-based sensitivity needs at least: the model's own forward and
loss.backward() over the same windows, in the same batches (weights requiring grad, as in a
training step without the optimizer). Writes benchmarks/results/profile_speed.json.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kvtune.data import load_windows
from kvtune.models import load_model
from kvtune.profiling import ProfileSettings, run_profile


def forward_backward_seconds(model, windows: torch.Tensor, batch_size: int) -> float:
    model.requires_grad_(True)
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    settings = ProfileSettings()
    model, tokenizer = load_model(settings.model)
    windows = load_windows(tokenizer, "calibration", settings.seq_len, settings.windows, settings.seed, settings.data)
    forward_backward_seconds(model, windows[: settings.batch_size], settings.batch_size)  # warm-up
    baseline = forward_backward_seconds(model, windows, settings.batch_size)
    del model

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        profile = run_profile(settings, out, fresh=True, progress=False)
        total = time.perf_counter() - start
    timings = profile.meta["timings"]
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "model": settings.model,
        "calibration": f"{settings.windows} windows x {settings.seq_len} tokens, batch {settings.batch_size}",
        "candidates": len(profile.pairs),
        "measured_points": profile.meta["summary"]["measured_points"],
        "forward_backward_s": round(baseline, 1),
        "profile_sensitivity_s": round(timings["stage1_s"], 1),
        "profile_measured_validation_s": round(timings.get("stage2_s", 0.0), 1),
        "profile_total_s": round(total, 1),
        "ratio_sensitivity": round(timings["stage1_s"] / baseline, 2),
        "ratio_total": round(total / baseline, 2),
        "spearman_taylor_vs_kl": round(profile.meta["summary"]["spearman"]["taylor_vs_kl"], 3),
        "spearman_taylor_vs_dnll": round(profile.meta["summary"]["spearman"]["taylor_vs_dnll"], 3),
    }
    path = Path(__file__).parent / "results" / "profile_speed.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
