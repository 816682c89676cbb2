"""Decode through the packed cache on CUDA: attention reads what the cache stores.

transformers calls ``cache.update(k, v, layer_idx)`` and then the attention function with whatever
``update`` returned. Inside :func:`attending` every attention module carries the cache layer of its
index: that layer's ``update`` stores the new tokens and keeps its packed streams for this call,
tagged with the tensor it returns, and the attention registered as ``kvtune_fused`` takes them when
it is called with that same tensor and runs the Triton decode kernel. Anything not handed over (a
prefill into an empty cache, another cache, a step whose new tokens are already quantized) goes to
transformers' SDPA attention unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from kvtune.arch import describe, layer_attributes, using_attention

ATTN_NAME = "kvtune_fused"
_CACHE_LAYER = "_kvtune_fused_layer"  # the cache layer an attention module reads, inside attending()


def _key_mask(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, -1, :tokens]  # the newest query sees every non-padding key
    return last_row if last_row.dtype == torch.bool else last_row == 0


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    layer = getattr(module, _CACHE_LAYER, None)
    streams = None if layer is None else layer.take_handed_over(key)
    if streams is None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    from kvtune.kernels.decode_attention import decode_attention, stream_tokens  # Triton: loaded on the first decode step

    key_streams, value_streams = streams
    key_mask = _key_mask(attention_mask, stream_tokens(key_streams))
    out = decode_attention(query, key_streams, value_streams, scale=scaling, key_mask=key_mask)
    return out.transpose(1, 2).contiguous(), None


def available(model) -> bool:
    """Whether the fused path can run for ``model``: its weights are on a CUDA device and its
    attention is plain softmax (the kernel implements neither soft-capping nor sinks)."""
    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.is_cuda and not describe(model).extras


@contextmanager
def attending(model, layers: dict):
    """Within the block ``model`` attends through ``kvtune_fused`` (plain SDPA for anything not
    handed over), the attention of model layer ``i`` reading what ``layers[i]`` hands over (a
    cache layer with ``take_handed_over(tag)``); after it the model attends as before."""
    with using_attention(model, ATTN_NAME, _attention, mask="sdpa"), layer_attributes(model, _CACHE_LAYER, layers):
        yield model
