"""What kvtune can quantize in a model, decided from the model itself, not from its name.

A layer is served when it is softmax attention over a growing K/V that goes through
transformers' attention interface and cache: the attention function receives, per layer, the
same per-head K/V the cache stores. :func:`describe` checks that with one short forward pass
(a recording attention and a recording cache) on top of the config's layer types:

* ``full_attention``: every token is held; ``sliding_attention``/``chunked_attention``: the
  model's own cache holds a window, and so does kvtune's (byte accounting counts the window);
* ``linear_attention``, ``conv``, ``dummy`` (no K/V, or K/V shared from another layer): left
  outside the plan, their state kept by transformers' own cache layers;
* anything else, attention that bypasses the interface (it calls SDPA itself), a cache that
  stores something other than the attended K/V (MLA's compressed latent), or K/V shapes that
  differ between layers: refused with a :class:`~kvtune.errors.ModelError` naming the reason.

The extra arguments an attention call carries are checked by :func:`attention_extras`, shared by
the simulated and probe attentions: soft-capping and attention sinks are honoured, sliding
windows come through the mask, dropout is refused in training mode, anything unknown is refused.

kvtune's attentions (the probe here, the simulated one, the fused decode, the profile's probe) are
switched in by :func:`using_attention` for the length of a ``with`` block, and find what serves
their layer on their module (:func:`layer_attributes`): the model is left as it was found.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from kvtune.errors import ModelError
from kvtune.plan import ModelShape

ATTENTION_TYPES = {"full_attention": "full", "sliding_attention": "sliding", "chunked_attention": "chunked"}
OUTSIDE_TYPES = {
    "linear_attention": "linear attention (a recurrent state, no K/V)",
    "conv": "convolution (a conv state, no K/V)",
    "dummy": "no K/V of its own (an MLP-only layer, or K/V shared from another layer)",
}
# Arguments attention functions receive that do not change the attention arithmetic.
_PASSIVE_KWARGS = {"position_ids", "use_cache", "output_router_logits", "cache_position", "output_attentions",
                   "is_causal", "past_key_values", "cache", "layer_idx", "position_embeddings"}
_PROBE_NAME = "kvtune_arch_probe"


@dataclass(frozen=True)
class Architecture:
    """The attention layers a plan covers, and what was left out."""

    shape: ModelShape
    model_type: str
    layer_types: tuple[str, ...]  # per model layer, as transformers names them
    left_out: tuple[tuple[int, str], ...]  # (model layer, reason)
    extras: tuple[str, ...] = ()  # attention arguments honoured beyond plain softmax: softcap, s_aux

    @property
    def plan_index(self) -> dict[int, int]:
        """Model layer index → position in the plan."""
        return {self.shape.model_layer(i): i for i in range(self.shape.num_layers)}


def layer_types(config) -> tuple[list[str], list[dict]]:
    """transformers' own per-layer cache types and their arguments (sliding windows)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(config.get_text_config(decoder=True))


def check_config(config, name: str = "the model") -> None:
    """Refusals that need no forward pass: architectures whose cache is not per-head K/V."""
    text = config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"{name} is an encoder-decoder ({model_type!r}); kvtune tunes decoder-only models")
    if getattr(text, "kv_lora_rank", None):
        raise ModelError(
            f"{name} ({model_type!r}) uses multi-head latent attention: its cache stores a compressed latent "
            f"(kv_lora_rank {text.kv_lora_rank}), not per-head K/V, so a per-head K/V plan would not describe "
            "what is stored; kvtune refuses it rather than quantize the wrong tensor"
        )
    types, _ = layer_types(config)
    unknown = sorted({t for t in types if t not in ATTENTION_TYPES and t not in OUTSIDE_TYPES})
    if unknown:
        raise ModelError(
            f"{name} ({model_type!r}) has layers of type {unknown}, whose cache kvtune cannot serve faithfully "
            f"(it serves {sorted(ATTENTION_TYPES)} and leaves {sorted(OUTSIDE_TYPES)} outside the plan)"
        )
    if not any(t in ATTENTION_TYPES for t in types):
        raise ModelError(f"{name} ({model_type!r}) has no attention layer with a K/V cache: nothing to quantize")


def config_shape(config, name: str = "the model") -> ModelShape | None:
    """The plan shape a model will have, read from its config alone (no weights), for checks made
    before a model is loaded; None where the config does not say (then the loaded model decides).
    tests/test_families.py checks it equals :func:`describe`'s shape for every family."""
    check_config(config, name)
    text = config.get_text_config(decoder=True)
    types, kwargs = layer_types(config)
    attention = [i for i, t in enumerate(types) if t in ATTENTION_TYPES]
    heads = getattr(text, "num_attention_heads", None)
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or (text.hidden_size // heads if heads and getattr(text, "hidden_size", None) else None)
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
        return None
    windows = [kwargs[i].get("sliding_window", 0) or 0 for i in attention]
    return ModelShape(len(attention), kv_heads, head_dim, layer_ids=tuple(attention), windows=tuple(windows))


def attention_extras(module, kwargs: dict, attention_mask, dropout: float = 0.0) -> tuple[float | None, torch.Tensor | None]:
    """(softcap, sinks) of one attention call; refuses what kvtune's attentions cannot honour.

    A sliding window arrives as ``sliding_window`` and is already in the additive mask transformers
    builds for these attentions, so it needs a mask to be present."""
    if dropout and module.training:
        raise ModelError("attention dropout is active (the model is in training mode); kvtune measures the model in eval mode")
    unknown = sorted(set(kwargs) - _PASSIVE_KWARGS - {"softcap", "s_aux", "sliding_window"})
    if unknown:
        raise ModelError(
            f"layer {getattr(module, 'layer_idx', '?')}: the attention call carries {unknown}, which kvtune's "
            "simulated attention does not implement; refusing rather than ignoring it"
        )
    if kwargs.get("sliding_window") and attention_mask is None:
        raise ModelError(f"layer {module.layer_idx}: a sliding window came without an attention mask to apply it")
    return kwargs.get("softcap"), kwargs.get("s_aux")


def _fingerprint(model) -> tuple:
    """What :func:`describe` decides from: the config, and which module class holds which weight
    shapes. A cached answer whose fingerprint differs was computed for another model."""
    return (model.config.to_json_string(use_diff=False),
            tuple((name, type(module)) for name, module in model.named_modules()),
            tuple((name, tuple(p.shape)) for name, p in model.named_parameters()))


def describe(model) -> Architecture:
    """The model's :class:`Architecture` (one short forward pass), kept on the model beside the
    fingerprint it was computed from, so a changed config or module is described afresh."""
    fingerprint = _fingerprint(model)
    cached = getattr(model, "_kvtune_architecture", None)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    name = getattr(model, "name_or_path", None) or "the model"
    config = model.config
    check_config(config, name)
    types, kwargs = layer_types(config)
    seen = _probe_forward(model)
    attention = [i for i, t in enumerate(types) if t in ATTENTION_TYPES]
    missing = [i for i in attention if i not in seen]
    if missing:
        raise ModelError(
            f"{name} ({config.model_type!r}): the attention of layer(s) {missing} does not go through transformers' "
            "attention interface (the model calls its attention kernel itself), so kvtune cannot quantize what "
            "it reads; this family is not served"
        )
    extra = sorted(set(seen) - set(attention))
    if extra:
        raise ModelError(f"{name}: layers {extra} attend through the interface but the config does not call them attention layers")
    shapes = {seen[i]["kv_shape"] for i in attention}
    if len(shapes) != 1:
        raise ModelError(f"{name}: K/V shapes (heads, head_dim) differ between layers ({sorted(shapes)}); kvtune needs one shape")
    for i in attention:
        if not seen[i]["cache_matches"]:
            raise ModelError(
                f"{name} layer {i}: the cache stores {seen[i]['cache_shape']} but the attention reads "
                f"{seen[i]['kv_shape']} per head; kvtune quantizes only caches that hold the attended K/V"
            )
    kv_heads, head_dim = shapes.pop()
    windows = [kwargs[i].get("sliding_window", 0) or 0 for i in attention]
    shape = ModelShape(len(attention), kv_heads, head_dim, layer_ids=tuple(attention), windows=tuple(windows))
    left_out = tuple((i, OUTSIDE_TYPES[t]) for i, t in enumerate(types) if t in OUTSIDE_TYPES)
    extras = tuple(sorted({x for i in attention for x in seen[i]["extras"]}))
    arch = Architecture(shape, config.model_type, tuple(types), left_out, extras)
    model._kvtune_architecture = (fingerprint, arch)
    return arch


def input_device(model) -> torch.device:
    """Where input ids go: the embedding's device (accelerate's hooks move them on from there)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


@contextmanager
def using_attention(model, name: str, attention, mask: str = "eager"):
    """Within the block ``model`` attends with ``attention``, registered with transformers as
    ``name`` (its masks built as for ``mask``); after it, whatever happened, the model attends as
    it did before. Every switch of a model's attention in kvtune goes through here."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(name, attention)  # a dict entry: registering again replaces it
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[mask])
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError) as e:
        raise ModelError(
            f"{getattr(model, 'name_or_path', 'the model')} cannot switch to another attention implementation "
            f"({e}); kvtune needs transformers' attention interface"
        ) from None
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@contextmanager
def layer_attributes(model, attribute: str, values: dict[int, object]):
    """Within the block every submodule whose ``layer_idx`` is a key of ``values`` carries that
    value as ``attribute``: how an attention function, called with its module, finds what serves
    that layer (a plan entry, a cache layer). Earlier values are put back after it."""
    modules = [m for m in model.modules() if getattr(m, "layer_idx", None) in values]
    missing = object()
    previous = [getattr(m, attribute, missing) for m in modules]
    for module in modules:
        setattr(module, attribute, values[module.layer_idx])
    try:
        yield model
    finally:
        for module, value in zip(modules, previous):
            if value is missing:
                delattr(module, attribute)
            else:
                setattr(module, attribute, value)


def _probe_forward(model) -> dict[int, dict]:
    """One forward of a few tokens recording, per layer, what the attention and the cache receive."""
    from transformers.cache_utils import DynamicCache

    seen: dict[int, dict] = {}
    cached: dict[int, tuple] = {}

    class RecordingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            cached[layer_idx] = (key_states.detach().clone(), None if value_states is None else value_states.detach().clone())
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def record(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ModelError(f"{type(module).__name__} has no layer_idx; kvtune cannot tell its layers apart")
        softcap, sinks = attention_extras(module, kwargs, attention_mask, dropout)
        k_cached, v_cached = cached.get(layer, (None, None))
        matches = (
            k_cached is not None and v_cached is not None and k_cached.shape == key.shape and value.shape == v_cached.shape
            and torch.equal(k_cached.to(key.device), key.detach()) and torch.equal(v_cached.to(value.device), value.detach())
        )
        seen[layer] = {
            "kv_shape": (key.shape[1], key.shape[-1]) if key.shape[-1] == value.shape[-1] else (key.shape[1], f"K {key.shape[-1]} / V {value.shape[-1]}"),
            "cache_shape": None if k_cached is None else tuple(k_cached.shape[1:2]) + tuple(k_cached.shape[-1:]),
            "cache_matches": matches,
            "extras": [name for name, x in (("softcap", softcap), ("s_aux", sinks)) if x is not None],
        }
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(8, device=input_device(model)) % max(vocab - 1, 1) + 1).unsqueeze(0)
    with using_attention(model, _PROBE_NAME, record), torch.no_grad():
        model(input_ids=ids, cache=RecordingCache(config=model.config), use_cache=True)
    return seen
