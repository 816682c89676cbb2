"""Simulated KV quantization inside one prefill forward, for fast and faithful perplexity.

A plain prefill attends over the K/V it has just computed, in full precision, so it shows no
effect of a quantized cache at all. Here every query ``t`` instead sees key/value ``i`` the way
token-by-token decoding through :class:`~kvtune.cache.MixedPrecisionCache` would show it:
dequantized when ``i < QuantSpec.quantized_tokens(t + 1, residual)`` and ``i < t``, exact
otherwise (the residual window, and the token the query itself just produced). Engine formats
store a token before it attends (:attr:`QuantSpec.reads_itself`): there ``i <= t`` reads rounded. Quantization
groups never depend on when they were formed, so one fake-quantized copy of K and of V serves
all queries; a mask per query picks which copy each score and each value comes from.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from kvtune.arch import attention_extras, describe, layer_attributes, using_attention
from kvtune.plan import LayerPlan, Plan
from kvtune.quant import QuantSpec, fake_quantize

ATTN_NAME = "kvtune_simulated"
_LAYER_PLAN = "_kvtune_simulated_layer"  # the attention module's LayerPlan, inside simulate_quantization()


def fake_quantize_prefix(x: torch.Tensor, spec: QuantSpec, residual: int) -> torch.Tensor:
    n = spec.quantized_tokens(x.shape[-2], residual)
    if n == 0:
        return x
    return torch.cat([fake_quantize(x[..., :n, :], spec), x[..., n:, :]], dim=-2)


def seen_quantized(spec: QuantSpec, residual: int, length: int, device=None) -> torch.Tensor:
    """Bool (length, length): does query t read position i from the quantized store?"""
    t = torch.arange(length, device=device)
    if not spec.is_quantized:
        return torch.zeros(length, length, dtype=torch.bool, device=device)
    step = spec.token_granularity
    quantized_upto = (t + 1 - spec.window(residual)).clamp(min=0) // step * step  # quantized_tokens(t + 1), vectorised
    i = t[None, :]
    before = (i <= t[:, None]) if spec.reads_itself else (i < t[:, None])
    return (i < quantized_upto[:, None]) & before


def simulated_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    layer: LayerPlan,
    scaling: float,
    attention_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (B, Hq, T, D) of one prefill as a quantized cache would produce it.

    query (B, Hq, T, D); key, value (B, Hkv, T, D) with Hq a multiple of Hkv (GQA).
    ``attention_mask`` is an additive float mask (B, 1, T, T) (a sliding window is part of it);
    None means plain causal. ``softcap`` and ``sinks`` as in Gemma 2 and gpt-oss.
    """
    length = query.shape[-2]
    if key.shape[-2] != length:
        raise ValueError("simulated quantization covers a whole prefill: query and key lengths must match")
    if not (layer.key.is_quantized or layer.value.is_quantized) and softcap is None and sinks is None:
        return _exact_attention(query, key, value, scaling, attention_mask)
    return two_view_attention(
        query,
        key,
        value,
        fake_quantize_prefix(key, layer.key, layer.residual),
        fake_quantize_prefix(value, layer.value, layer.residual),
        seen_quantized(layer.key, layer.residual, length, query.device),
        seen_quantized(layer.value, layer.residual, length, query.device),
        scaling,
        attention_mask,
        softcap,
        sinks,
    )


def causal_softmax(
    scores: torch.Tensor,
    scaling: float,
    attention_mask: torch.Tensor | None,
    dtype: torch.dtype,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scores · scaling + mask) over keys, causal when no (additive) mask is given; in float32 at least.

    ``softcap``: logits become softcap · tanh(logits / softcap) before the mask (Gemma 2).
    ``sinks``: one learned logit per query head joins the softmax and is dropped after it (gpt-oss).
    """
    length = scores.shape[-2]
    scores = scores * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is None:
        causal = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    else:
        scores = scores + attention_mask[..., : scores.shape[-1]]
    work = torch.promote_types(dtype, torch.float32)
    if sinks is None:
        return torch.softmax(scores, dim=-1, dtype=work).to(dtype)
    sink = sinks.to(scores.device, work).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores.to(work), sink], dim=-1), dim=-1)[..., :-1].to(dtype)


def two_view_attention(query, key, value, key_hat, value_hat, key_seen_hat, value_seen_hat, scaling, attention_mask=None,
                       softcap=None, sinks=None):
    """Causal attention where query t reads position i from ``key_hat``/``value_hat`` where the
    (T, T) bool masks say so and from ``key``/``value`` elsewhere. GQA heads are repeated here."""
    groups = query.shape[1] // key.shape[1]

    def rep(x):  # GQA: each KV head serves `groups` query heads
        return x.repeat_interleave(groups, dim=1)

    scores = torch.matmul(query, rep(key).transpose(-1, -2))
    if key_seen_hat.any():
        scores_hat = torch.matmul(query, rep(key_hat).transpose(-1, -2))
        scores = torch.where(key_seen_hat, scores_hat, scores)
    probs = causal_softmax(scores, scaling, attention_mask, query.dtype, softcap, sinks)
    if not value_seen_hat.any():
        return torch.matmul(probs, rep(value))
    from_hat = value_seen_hat.to(probs.dtype)
    return torch.matmul(probs * from_hat, rep(value_hat)) + torch.matmul(probs * (1 - from_hat), rep(value))


def _exact_attention(query, key, value, scaling, attention_mask):
    mask = None if attention_mask is None else attention_mask[..., : key.shape[-2]]
    return torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=True
    )


def _attention_interface(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(module, _LAYER_PLAN, None)
    if layer is None:
        raise RuntimeError(f"attention '{ATTN_NAME}' has no plan entry for layer {getattr(module, 'layer_idx', '?')}: "
                           "it runs only inside kvtune.simulate_quantization(), on the planned layers")
    softcap, sinks = attention_extras(module, kwargs, attention_mask, dropout)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = simulated_attention(query, key, value, layer, scaling, attention_mask, softcap, sinks)
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def simulate_quantization(model, plan: Plan):
    """Within the block, ``model(input_ids, use_cache=False)`` attends as if K/V came from a cache
    quantized by ``plan``; each attention module carries its layer's plan entry for the block, and
    the model attends as before after it."""
    arch = describe(model)
    plan.check_model(arch.shape, getattr(model, "name_or_path", "the model"))
    # A layer that shares another's K/V reads that layer's store: it attends through the same entry.
    layers = {model_layer: plan.layers[i] for model_layer, i in arch.attending_index.items()}
    # eager masks: simulated_attention takes additive float masks
    with using_attention(model, ATTN_NAME, _attention_interface, mask="eager"), layer_attributes(model, _LAYER_PLAN, layers):
        yield model
