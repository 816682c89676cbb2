"""Wall time of `kvtune profile` as a ratio to one forward+backward pass over the same calibration set.

    .venv/bin/python benchmarks/profile_speed.py                    # default model, settings and candidates
    .venv/bin/python benchmarks/profile_speed.py --formats int      # another candidate set: profile_speed-int.json
    .venv/bin/python benchmarks/profile_speed.py --keep-attention   # the probe keeps its T×T views: profile_speed-keep.json

The baseline is what any gradient-based sensitivity needs at least: the model's own forward and
loss.backward() over the same windows, in the same batches (weights requiring grad, as in a
training step without the optimizer). The two are measured three times, interleaved (the first
profile whole, with its measured validation; the others the sensitivity stage alone), and the
ratio is the median of the three. Writes benchmarks/results/profile_speed.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from kvtune.data import load_windows
from kvtune.models import load_model
from kvtune.plan import resolve_formats
from kvtune.profiling import ProfileSettings, run_profile
from kvtune.profiling.profile import DEFAULT_FORMATS


def forward_backward_seconds(model, windows: torch.Tensor, batch_size: int) -> float:
    model.requires_grad_(True)
    start = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        ids = windows[i : i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(repeats: int = 3, formats: str = DEFAULT_FORMATS, keep_attention: bool = False) -> None:
    """The baseline and the sensitivity stage measured ``repeats`` times, interleaved, so that a
    slower or faster stretch of a shared machine moves both; the ratio is the median of the pairs."""
    settings = ProfileSettings(pairs=resolve_formats(formats), recompute_attention=not keep_attention)
    model, tokenizer = load_model(settings.model)
    windows = load_windows(tokenizer, "calibration", settings.seq_len, settings.windows, settings.seed, settings.data)
    forward_backward_seconds(model, windows[: settings.batch_size], settings.batch_size)  # warm-up
    baselines, stage1, profile, total = [], [], None, None
    for i in range(repeats):
        baselines.append(forward_backward_seconds(model, windows, settings.batch_size))
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            # The first repeat is the whole profile (validation included); the others the sensitivity stage.
            run = settings if i == 0 else replace(settings, validate_windows=0)
            result = run_profile(run, out, fresh=True, progress=False)
            if i == 0:
                profile, total = result, time.perf_counter() - start
        stage1.append(result.meta["timings"]["stage1_s"])
    timings = profile.meta["timings"]
    ratios = [s / b for s, b in zip(stage1, baselines)]
    result = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)",
        "model": settings.model,
        "calibration": f"{settings.windows} windows x {settings.seq_len} tokens, batch {settings.batch_size}",
        "formats": formats,
        "probe_attention": "kept" if keep_attention else "recomputed in the backward pass",
        "candidates": len(profile.pairs),
        "measured_points": profile.meta["summary"]["measured_points"],
        "forward_backward_s": [round(b, 1) for b in baselines],
        "profile_sensitivity_s": [round(s, 1) for s in stage1],
        "ratio_sensitivity": [round(r, 2) for r in ratios],
        "ratio_sensitivity_median": round(statistics.median(ratios), 2),
        "profile_measured_validation_s": round(timings.get("stage2_s", 0.0), 1),
        "profile_total_s": round(total, 1),
        "ratio_total": round(total / baselines[0], 2),
        "spearman_taylor_vs_kl": round(profile.meta["summary"]["spearman"]["taylor_vs_kl"], 3),
        "spearman_taylor_vs_dnll": round(profile.meta["summary"]["spearman"]["taylor_vs_dnll"], 3),
    }
    name = "profile_speed" + ("" if formats == DEFAULT_FORMATS else f"-{formats}") + ("-keep" if keep_attention else "")
    path = Path(__file__).parent / "results" / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help="candidate set (default: the profile's default)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keep-attention", action="store_true", help="the probe keeps its T×T views (the default until issue 29)")
    args = parser.parse_args()
    main(args.repeats, args.formats, args.keep_attention)
