"""Decode through the packed cache on CUDA: attention reads what the cache stores.

transformers calls ``past_key_values.update(k, v, layer_idx)`` and then the attention function
with whatever ``update`` returned. A fused cache layer's ``update`` stores the new tokens and hands
its packed streams over here, tagged with the tensor it returns; the attention registered as
``kvtune_fused`` takes them when it is called with that same tensor and runs the Triton decode
kernel. Anything not handed over (a prefill into an empty cache, another cache, a step whose new
tokens are already quantized) goes to transformers' SDPA attention unchanged, so a model switched
to this attention stays correct with any cache.
"""

from __future__ import annotations

import torch

ATTN_NAME = "kvtune_fused"
_handed_over: dict[int, tuple] = {}
_registered = False


def hand_over(layer_idx: int, tag: torch.Tensor, key: tuple, value: tuple) -> None:
    """Called by the cache: the attention for ``layer_idx`` that receives ``tag`` reads these streams."""
    _handed_over[layer_idx] = (tag, key, value)


def _key_mask(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    if attention_mask is None:
        return None
    last_row = attention_mask[:, 0, -1, :tokens]  # the newest query sees every non-padding key
    return last_row if last_row.dtype == torch.bool else last_row == 0


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    entry = _handed_over.pop(module.layer_idx, None)
    if entry is None or entry[0] is not key:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    from kvtune.kernels.decode_attention import decode_attention, stream_tokens

    _, key_streams, value_streams = entry
    key_mask = _key_mask(attention_mask, stream_tokens(key_streams))
    out = decode_attention(query, key_streams, value_streams, scale=scaling, key_mask=key_mask)
    return out.transpose(1, 2).contiguous(), None


def available(model) -> bool:
    """Whether the fused path can run for ``model``: its weights are on a CUDA device and its
    attention is plain softmax (the kernel implements neither soft-capping nor sinks)."""
    from kvtune.arch import describe

    parameter = next(model.parameters(), None)
    return parameter is not None and parameter.is_cuda and not describe(model).extras


def enable(model) -> None:
    """Switch ``model`` to the ``kvtune_fused`` attention (plain SDPA for any other cache)."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, _attention)
        AttentionMaskInterface.register(ATTN_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        _registered = True
    model.set_attn_implementation(ATTN_NAME)
