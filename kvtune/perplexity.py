"""Perplexity under a plan: fast (simulated quantization in one prefill) and by true decoding."""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvtune.arch import input_device
from kvtune.cache import load_cache
from kvtune.distributed import ranks
from kvtune.plan import Plan
from kvtune.simulate import simulate_quantization


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Flattened to (tokens, vocab): cross_entropy over a strided class dim loses ~1e-4 in fp32.
    flat = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return flat.view(targets.shape)


@torch.no_grad()
def token_nll(model, windows: torch.Tensor, plan: Plan | None = None, batch_size: int = 4, progress: bool = False) -> torch.Tensor:
    """Per-token negative log-likelihood (num_windows, seq_len - 1) with K/V quantized as ``plan``
    says (simulated inside one prefill per window; ``None`` = the model's own attention).

    Under torchrun each rank computes its share of the batches (the same batches one process
    makes) and every rank returns the whole result."""
    group = ranks()
    out = {}
    mine = group.share(range(0, len(windows), batch_size))
    with simulate_quantization(model, plan) if plan is not None else nullcontext():
        for start in tqdm(mine, desc=plan.name if plan else "fp", disable=not (progress and group.is_main), leave=False):
            ids = windows[start : start + batch_size].to(input_device(model))
            logits = model(input_ids=ids, use_cache=False).logits
            out[start] = _nll(logits[:, :-1], ids[:, 1:]).cpu()
    out = group.merge(out)
    return torch.cat([out[start] for start in sorted(out)])


def perplexity(model, windows: torch.Tensor, plan: Plan | None = None, batch_size: int = 4, progress: bool = False) -> float:
    return math.exp(token_nll(model, windows, plan, batch_size, progress).mean().item())


@torch.no_grad()
def decode_token_nll(model, window: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Per-token NLL of one window fed one token at a time through the mixed-precision cache:
    the slow ground truth that :func:`token_nll` simulates."""
    ids = window.view(1, -1).to(input_device(model))
    cache = load_cache(model, plan)
    nll = []
    with cache.fused_decoding(model):  # on CUDA the Triton kernel reads the packed cache
        for t in range(ids.shape[1] - 1):
            logits = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits
            nll.append(_nll(logits[:, -1:], ids[:, t + 1 : t + 2]))
    return torch.cat(nll, dim=1)[0].cpu()
