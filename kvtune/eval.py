"""Compare plans on held-out text: the table behind ``kvtune run`` and ``kvtune ppl``."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from kvtune.data import DEFAULT_DATA, load_windows
from kvtune.models import DEFAULT_MODEL, load_model, model_shape
from kvtune.perplexity import token_nll
from kvtune.plan import Plan, resolve_plan

UNIFORM_BASELINES = ("fp16", "uniform:k8v8", "uniform:k4v4", "uniform:k2v2")


@dataclass
class PerplexitySettings:
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    split: str = "heldout"
    seq_len: int = 512
    windows: int = 8
    seed: int = 0
    batch_size: int = 4
    device: str = "cpu"
    context_for_bytes: int = 32768  # memory column: the cache at this context, batch 1
    plans: list[str] = field(default_factory=lambda: list(UNIFORM_BASELINES))


def perplexity_table(settings: PerplexitySettings, progress: bool = True) -> pd.DataFrame:
    """One row per plan: nominal bits, real cache bytes at ``context_for_bytes``, and held-out PPL
    with K/V quantized as the plan says (simulated exactly as decoding through the cache)."""
    for spec in settings.plans:  # a typo in a plan name should not cost a model load first
        resolve_plan(spec, num_layers=1)
    model, tokenizer = load_model(settings.model, settings.device)
    shape = model_shape(model)
    plans: list[Plan] = [resolve_plan(p, shape.num_layers) for p in settings.plans]
    for plan in plans:  # refuse a bad plan before spending time on the others
        plan.check_model(shape, settings.model)
    windows = load_windows(tokenizer, settings.split, settings.seq_len, settings.windows, settings.seed, settings.data)
    fp_bytes = Plan.uniform("k16v16", shape.num_layers).cache_bytes(shape, settings.context_for_bytes)
    rows = []
    for plan in plans:
        start = time.perf_counter()
        nll = token_nll(model, windows, plan, settings.batch_size, progress=progress)
        cache_bytes = plan.cache_bytes(shape, settings.context_for_bytes)
        rows.append(
            {
                "plan": plan.name or "(file)",
                "nominal_bits": plan.nominal_bits(),
                f"cache_MiB@{settings.context_for_bytes // 1024}k": cache_bytes / 2**20,
                "effective_bits": 16 * cache_bytes / fp_bytes,
                "ppl": math.exp(nll.mean().item()),
                "seconds": time.perf_counter() - start,
            }
        )
    return pd.DataFrame(rows)


def save_table(table: pd.DataFrame, settings: PerplexitySettings, out_dir: str | Path, stem: str = "ppl") -> Path:
    import transformers

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table.to_csv(out_dir / f"{stem}.csv", index=False)
    meta = {
        "settings": vars(settings),
        "tokens_per_plan": settings.windows * (settings.seq_len - 1),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
    }
    (out_dir / f"{stem}.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir / f"{stem}.csv"
