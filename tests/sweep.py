"""Every causal-LM model type transformers registers, built small from its config class (no
downloads) and put through :func:`kvtune.arch.describe`: served, refused with a reason, or not
buildable small from defaults. tests/test_sweep.py asserts that no type crashes kvtune;
benchmarks/families.py writes the table the README shows."""

from __future__ import annotations

import torch

VOCAB = 256
# Config arguments that make any family small, where the config has them.
_SMALL = {
    "vocab_size": VOCAB, "hidden_size": 64, "n_embd": 64, "d_model": 64, "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128,
    "num_attention_heads": 4, "n_head": 4, "num_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "max_position_embeddings": 512,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB, "tie_word_embeddings": False,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "rotary_dim": 16, "moe_k": 2, "num_kv_shared_layers": 2,
}
_LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
LAYERS = 6


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def small_config(model_type: str):
    """The type's default config with the sizes above (and at most LAYERS layers, the default
    per-layer lists cut to them)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    text = default.get_text_config(decoder=True)
    known = text.to_dict()
    kwargs = {k: v for k, v in _SMALL.items() if k in known}
    count = LAYERS
    try:  # hybrids whose first attention layer comes late keep it (Bamba's attention at layer 10)
        from kvtune.arch import ATTENTION_TYPES, layer_types

        first = next((i for i, t in enumerate(layer_types(default)[0]) if t in ATTENTION_TYPES), None)
        if first is not None and first < 4 * LAYERS:
            count = max(LAYERS, first + 1)
    except Exception:  # noqa: BLE001 - a config whose layer types transformers cannot read: kvtune refuses it below
        pass
    for name in _LAYER_COUNTS:
        if isinstance(known.get(name), int):
            kwargs[name] = min(known[name], count)
    layers = next((kwargs[n] for n in _LAYER_COUNTS if n in kwargs), None)
    for name, value in known.items():
        if layers and isinstance(value, list) and name.endswith(("layer_types", "_pattern", "layers_block_type")) and len(value) > layers:
            kwargs[name] = value[:layers]
        if layers and name == "per_layer_config" and isinstance(value, dict):
            kwargs[name] = {k: v for k, v in value.items() if int(k) < layers}
    if "num_kv_shared_layers" in kwargs and not known.get("num_kv_shared_layers"):
        del kwargs["num_kv_shared_layers"]
    key = next((k for k, v in vars(default).items() if v is text), None)
    if key is None:  # the config is its own decoder config
        return AutoConfig.for_model(model_type, **kwargs)
    # A multimodal wrapper: shrink its text part.
    sub = type(text)(**{**known, **kwargs})
    return AutoConfig.for_model(model_type, **{key: sub.to_dict()})


MAX_PARAMETERS = 50_000_000


def build(model_type: str):
    """The small model, or ValueError where the defaults leave it large (counted on the meta device
    first, so a large default never takes the memory)."""
    from transformers import AutoModelForCausalLM

    config = small_config(model_type)
    with torch.device("meta"):
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{size / 1e6:.0f}M parameters with default sizes")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.name_or_path = f"tiny-{model_type}"
    return model


def classify(model_type: str) -> dict:
    """{"model_type", "status": served | refused | not built, "detail"}; anything describe raises
    other than a ModelError propagates (the sweep test fails on it)."""
    from kvtune.arch import describe
    from kvtune.errors import ModelError

    try:
        model = build(model_type)
    except Exception as e:  # noqa: BLE001 - a config that needs more than defaults to be built
        return {"model_type": model_type, "status": "not built", "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    try:
        arch = describe(model)
    except ModelError as e:
        reason = str(e)
        for prefix in (f"{model.name_or_path} ({model_type!r})", model.name_or_path, "the model"):
            if reason.startswith(prefix):
                reason = reason[len(prefix):].lstrip(": ")
                break
        return {"model_type": model_type, "status": "refused", "detail": reason[:300]}
    from kvtune.arch import config_shape

    # The pre-check's shape read from the config alone must be the loaded model's, or say nothing.
    expected = config_shape(model.config)
    if expected is not None and expected != arch.shape:
        return {"model_type": model_type, "status": "config shape differs",
                "detail": f"config says {expected.describe()}, the model has {arch.shape.describe()}"}
    detail = arch.shape.describe()
    if arch.left_out:
        detail += "; left out: " + ", ".join(sorted({reason for _, reason in arch.left_out}))
    return {"model_type": model_type, "status": "served", "detail": detail}
