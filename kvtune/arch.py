"""What kvtune can quantize in a model, decided from the model itself, not from its name.

A layer is served when it is softmax attention over a growing K/V that goes through
transformers' attention interface and cache: the attention function receives, per layer, the
same per-head K/V the cache stores. :func:`describe` checks that with one short forward pass
(a recording attention and a recording cache) on top of the config's layer types:

* ``full_attention``: every token is held; ``sliding_attention``/``chunked_attention``: the
  model's own cache holds a window, and so does kvtune's (byte accounting counts the window);
* ``linear_attention``, ``conv``, ``dummy`` (no K/V, or K/V shared from another layer): left
  outside the plan, their state kept by transformers' own cache layers;
* a layer that attends over another layer's K/V (Gemma 3n, Gemma 4: later layers reuse the K/V
  of the last earlier layer of their kind) is left outside the plan too: it reads what the layer
  that owns the K/V caches, so it attends through that layer's plan entry (:attr:`Architecture.shared`);
* layers may differ in KV heads and head size, and K and V heads in size (Gemma 4, MiMo-V2-Flash):
  the plan's :class:`~kvtune.plan.ModelShape` lists them per layer;
* anything else, attention that bypasses the interface (it calls SDPA itself), a cache that
  stores something other than the attended K/V (MLA's compressed latent), a model that will not
  run with transformers' standard cache: refused with a :class:`~kvtune.errors.ModelError` naming
  the family and the reason, never a traceback.

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
    shared: tuple[tuple[int, int], ...] = ()  # (model layer, model layer whose K/V it attends over)

    @property
    def plan_index(self) -> dict[int, int]:
        """Model layer index → position in the plan."""
        return {self.shape.model_layer(i): i for i in range(self.shape.num_layers)}

    @property
    def attending_index(self) -> dict[int, int]:
        """Every model layer that attends over a planned K/V → that K/V's position in the plan:
        the planned layers and the layers that share their K/V."""
        index = self.plan_index
        return {**index, **{layer: index[owner] for layer, owner in self.shared}}


def _attr(obj, name: str):
    """A config attribute, or None where reading it fails: some configs raise on attributes that
    differ between layers (Gemma 4's ``head_dim``) rather than answer."""
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - any failure means "the config does not say plainly"
        return None


def layer_types(config) -> tuple[list[str], list[dict]]:
    """transformers' own per-layer cache types and their arguments (sliding windows)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    return get_layer_types_and_kwargs(config.get_text_config(decoder=True))


def check_config(config, name: str = "the model") -> None:
    """Refusals that need no forward pass: architectures whose cache is not per-head K/V."""
    text = config.get_text_config(decoder=True)
    model_type = getattr(config, "model_type", "?")
    if _attr(config, "is_encoder_decoder"):
        raise ModelError(f"{name} is an encoder-decoder ({model_type!r}); kvtune tunes decoder-only models")
    if _attr(text, "kv_lora_rank"):
        raise ModelError(
            f"{name} ({model_type!r}) uses multi-head latent attention: engines (vLLM's fp8_ds_mla, SGLang) cache the "
            f"compressed latent (kv_lora_rank {_attr(text, 'kv_lora_rank')}) and the rope key, but transformers' "
            "attention for this family caches the up-projected per-head K and V instead; kvtune's cache, probe and "
            "simulation work on what transformers caches, which here is a cache no engine keeps (other bytes, "
            "other error), and quantizing the latent itself is not built yet, so kvtune refuses the family rather "
            "than quantize the wrong tensor"
        )
    try:
        types, _ = layer_types(config)
    except Exception as e:  # noqa: BLE001 - a config transformers' own cache cannot read
        raise ModelError(f"{name} ({model_type!r}): transformers cannot tell this config's cache layer types "
                         f"({type(e).__name__}: {e}); kvtune cannot serve it") from None
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
    before a model is loaded; None where the config does not say plainly (then the loaded model
    decides). tests/test_families.py checks it equals :func:`describe`'s shape wherever it answers."""
    check_config(config, name)
    text = config.get_text_config(decoder=True)
    if getattr(config, "model_type", None) in _CODE_SHAPED:
        return None
    types, kwargs = layer_types(config)
    attention = [i for i, t in enumerate(types) if t in ATTENTION_TYPES]
    per_layer, hidden = _attr(text, "per_layer_config"), _attr(text, "hidden_size")
    heads, key_dims, value_dims = [], [], []
    for i in attention:
        layer = _layer_view(per_layer, i) or text
        q_heads = _attr(layer, "num_attention_heads") or _attr(text, "num_attention_heads")
        kv = _attr(layer, "num_key_value_heads") or q_heads
        dim = _attr(layer, "head_dim") or (hidden // q_heads if isinstance(hidden, int) and isinstance(q_heads, int) else None)
        value_dim = _attr(layer, "v_head_dim") or dim
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (kv, dim, value_dim)):
            return None
        heads.append(kv)
        key_dims.append(dim)
        value_dims.append(value_dim)
    windows = [kwargs[i].get("sliding_window", 0) or 0 for i in attention]
    return ModelShape.from_layers(heads, key_dims, value_dims, layer_ids=tuple(attention), windows=tuple(windows))


# Families whose K/V shapes are set in the modelling code, not the config (MiMo-V2-Flash doubles
# the KV heads of its sliding layers; GPT-BigCode's multi_query flag means one KV head whatever
# num_key_value_heads says): only the loaded model can tell. tests/test_sweep.py finds such families.
_CODE_SHAPED = {"mimo_v2_flash", "gpt_bigcode"}


def _layer_view(per_layer, i: int):
    try:
        return per_layer[i] if per_layer is not None else None
    except Exception:  # noqa: BLE001 - not indexable per layer
        return None


def attention_extras(module, kwargs: dict, attention_mask, dropout: float = 0.0) -> tuple[float | None, torch.Tensor | None]:
    """(softcap, sinks) of one attention call; refuses what kvtune's attentions cannot honour.

    A sliding window arrives as ``sliding_window`` and is already in the additive mask transformers
    builds for these attentions, so it needs a mask to be present."""
    if dropout and module.training:
        raise ModelError("attention dropout is active (the model is in training mode); kvtune measures the model in eval mode")
    # An argument passed as None asks for nothing (Gemma 4's wrapper hands ``labels=None`` down).
    unknown = sorted(k for k, v in kwargs.items() if v is not None and k not in _PASSIVE_KWARGS | {"softcap", "s_aux", "sliding_window"})
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
    family = f"{name} ({config.model_type!r})"
    types, kwargs = layer_types(config)
    seen = _probe_forward(model, family)
    attention = [i for i, t in enumerate(types) if t in ATTENTION_TYPES]
    missing = [i for i in attention if i not in seen]
    if missing:
        raise ModelError(
            f"{family}: the attention of layer(s) {missing} does not go through transformers' "
            "attention interface (the model calls its attention kernel itself), so kvtune cannot quantize what "
            "it reads; this family is not served"
        )
    shared, unexplained = [], []
    for i in sorted(set(seen) - set(attention)):
        owner = next((j for j in attention if j < i and seen[j]["kv_id"] == seen[i]["kv_id"]), None)
        if owner is None:
            unexplained.append(i)
        else:
            shared.append((i, owner))
    if unexplained:
        raise ModelError(
            f"{family}: layers {unexplained} attend through the interface over K/V that no attention layer of the "
            f"config caches (their cache type is {sorted({types[i] for i in unexplained})}); kvtune cannot tell what "
            "their cache holds, so this family is not served"
        )
    for i in attention:
        if not seen[i]["cache_matches"]:
            stored, read = seen[i]["cache_shape"], seen[i]["kv_shape"]
            what = (f"other values than the attention reads (both {read} per head)" if stored == read
                    else f"{stored} per head but the attention reads {read}")
            raise ModelError(
                f"{family} layer {i}: the cache stores {what}; kvtune quantizes only caches that hold the attended "
                "K/V, so this family is not served"
            )
    windows = [kwargs[i].get("sliding_window", 0) or 0 for i in attention]
    shape = ModelShape.from_layers([seen[i]["heads"] for i in attention], [seen[i]["key_dim"] for i in attention],
                                   [seen[i]["value_dim"] for i in attention], layer_ids=tuple(attention), windows=tuple(windows))
    owners = dict(shared)
    left_out = tuple((i, f"shares K/V with layer {owners[i]}" if i in owners else OUTSIDE_TYPES[t])
                     for i, t in enumerate(types) if t in OUTSIDE_TYPES)
    extras = tuple(sorted({x for i in seen for x in seen[i]["extras"]}))
    arch = Architecture(shape, config.model_type, tuple(types), left_out, extras, tuple(shared))
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


def _probe_forward(model, family: str = "the model") -> dict[int, dict]:
    """One forward of a few tokens recording, per layer, what the attention and the cache receive.
    A failure of the model's own forward under the recording cache is a refusal naming it."""
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
            raise ModelError(f"{family}: {type(module).__name__} has no layer_idx; kvtune cannot tell its layers apart")
        softcap, sinks = attention_extras(module, kwargs, attention_mask, dropout)
        k_cached, v_cached = cached.get(layer, (None, None))
        matches = (
            k_cached is not None and v_cached is not None and k_cached.shape == key.shape and value.shape == v_cached.shape
            and torch.equal(k_cached.to(key.device), key.detach()) and torch.equal(v_cached.to(value.device), value.detach())
        )
        k_dim, v_dim = key.shape[-1], value.shape[-1]
        seen[layer] = {
            "heads": key.shape[1], "key_dim": k_dim, "value_dim": v_dim,
            "kv_shape": (key.shape[1], k_dim) if k_dim == v_dim else (key.shape[1], f"K {k_dim} / V {v_dim}"),
            "cache_shape": None if k_cached is None else (
                (k_cached.shape[1], k_cached.shape[-1]) if v_cached is None or v_cached.shape[-1] == k_cached.shape[-1]
                else (k_cached.shape[1], f"K {k_cached.shape[-1]} / V {v_cached.shape[-1]}")),
            "cache_matches": matches,
            # The very tensors attended: a layer handed another layer's K/V gets the same storage.
            "kv_id": (key.data_ptr(), tuple(key.shape), value.data_ptr(), tuple(value.shape)),
            "extras": [name for name, x in (("softcap", softcap), ("s_aux", sinks)) if x is not None],
        }
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None

    vocab = model.get_input_embeddings().weight.shape[0]
    ids = (torch.arange(8, device=input_device(model)) % max(vocab - 1, 1) + 1).unsqueeze(0)
    with using_attention(model, _PROBE_NAME, record), torch.no_grad():
        try:
            model(input_ids=ids, cache=RecordingCache(config=model.config), use_cache=True)
        except ModelError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the family's code raises becomes a refusal
            raise ModelError(
                f"{family} does not run with transformers' standard cache and kvtune's recording attention "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no message'}); kvtune cannot serve this family"
            ) from None
    return seen
