"""Tiny random-weight models of the decoder families kvtune serves, built from transformers'
config classes (no downloads). Each keeps its family's attention quirks: GQA, sliding windows
(Mistral, Gemma 3's sliding + global mix, gpt-oss), chunked attention (Llama 4), soft-capping (Gemma 2), sinks (gpt-oss),
MoE blocks, hybrid stacks with linear-attention or convolution layers, layers of different K/V
shapes (Gemma 4), K and V heads of different sizes (MiMo-V2-Flash), and layers that attend over
another layer's K/V (Gemma 3n, Gemma 4)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 256
_COMMON = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_LLAMA_LIKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=32, max_position_embeddings=512)
_MOE = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32)

_GEMMA4 = {**_LLAMA_LIKE, "num_hidden_layers": 4, "sliding_window": 80, "global_head_dim": 64, "num_global_key_value_heads": 1,
           "attention_k_eq_v": True, "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": VOCAB,
           "layer_types": ["sliding_attention", "full_attention"] * 2}

# family -> (model_type, config arguments)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("llama", _LLAMA_LIKE),
    "mistral": ("mistral", {**_LLAMA_LIKE, "sliding_window": None}),
    "mistral-sliding": ("mistral", {**_LLAMA_LIKE, "sliding_window": 80}),
    "mixtral": ("mixtral", {**_LLAMA_LIKE, **_MOE, "sliding_window": None}),
    "qwen2": ("qwen2", _LLAMA_LIKE),
    "qwen2_moe": ("qwen2_moe", {**_LLAMA_LIKE, **_MOE}),
    "qwen3": ("qwen3", _LLAMA_LIKE),
    "qwen3_moe": ("qwen3_moe", {**_LLAMA_LIKE, **_MOE, "sliding_window": None}),
    "gemma2": ("gemma2", {**_LLAMA_LIKE, "num_hidden_layers": 4, "sliding_window": 80, "attn_logit_softcapping": 5.0,
                          "final_logit_softcapping": 30.0}),
    "gemma3": ("gemma3_text", {**_LLAMA_LIKE, "num_hidden_layers": 4, "sliding_window": 80,
                               "layer_types": ["sliding_attention", "full_attention"] * 2}),
    "phi3": ("phi3", {**{k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"}, "sliding_window": None}),
    "gpt_neox": ("gpt_neox", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
                              "max_position_embeddings": 512}),
    "opt": ("opt", {"hidden_size": 64, "ffn_dim": 128, "num_hidden_layers": 3, "num_attention_heads": 2,
                    "word_embed_proj_dim": 64, "max_position_embeddings": 512}),
    "gpt2": ("gpt2", {"n_embd": 64, "n_inner": 128, "n_layer": 3, "n_head": 2, "n_positions": 512}),
    "olmo2": ("olmo2", _LLAMA_LIKE),
    "granite": ("granite", _LLAMA_LIKE),
    "starcoder2": ("starcoder2", {**_LLAMA_LIKE, "sliding_window": None}),
    "gpt_oss": ("gpt_oss", {**_LLAMA_LIKE, "num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                            "sliding_window": 80, "layer_types": ["sliding_attention", "full_attention"]}),
    # Llama 4: chunked attention (a token attends within its chunk) on three layers of four, MoE.
    "llama4": ("llama4_text", {**_LLAMA_LIKE, "num_hidden_layers": 4, "num_local_experts": 2, "num_experts_per_tok": 1,
                               "intermediate_size_mlp": 128, "attention_chunk_size": 80}),
    "qwen3_next": ("qwen3_next", {**_LLAMA_LIKE, **_MOE, "num_hidden_layers": 4, "linear_num_value_heads": 2,
                                  "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                                  "layer_types": ["linear_attention", "full_attention"] * 2}),
    "lfm2": ("lfm2", {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                      "num_key_value_heads": 2, "max_position_embeddings": 512,
                      "layer_types": ["conv", "full_attention", "conv", "full_attention"]}),
    # Gemma 4: sliding layers of 2 KV heads × 32, global layers of 1 KV head × 64 whose V is
    # computed from K's projection (attention_k_eq_v); per-layer inputs kept small.
    "gemma4": ("gemma4_text", _GEMMA4),
    # ... and its last two layers attending over the K/V of the last earlier layer of their kind.
    "gemma4-shared": ("gemma4_text", {**_GEMMA4, "num_hidden_layers": 6, "num_kv_shared_layers": 2,
                                      "layer_types": ["sliding_attention", "full_attention"] * 3}),
    "gemma3n": ("gemma3n_text", {**_LLAMA_LIKE, "num_hidden_layers": 4, "sliding_window": 80, "num_kv_shared_layers": 2,
                                 "layer_types": ["sliding_attention", "full_attention"] * 2, "hidden_size_per_layer_input": 16,
                                 "vocab_size_per_layer_input": VOCAB, "laurel_rank": 8, "altup_num_inputs": 2,
                                 "intermediate_size": [128] * 4, "activation_sparsity_pattern": [0.0] * 4}),
    # MiMo-V2-Flash: K heads of 32, V heads of 128; its sliding layers have twice the KV heads; sinks.
    "mimo_v2_flash": ("mimo_v2_flash", {**_LLAMA_LIKE, "num_hidden_layers": 4, "n_routed_experts": 4, "moe_intermediate_size": 32,
                                        "num_experts_per_tok": 2, "v_head_dim": 128, "sliding_window": 80}),
}
_GPTJ = ("gptj", {"n_embd": 64, "n_layer": 2, "n_head": 4, "rotary_dim": 8, "n_positions": 512})
# GPT-J called its attention kernel itself until transformers 5.24, which routes it through the
# attention interface; kvtune decides by probing, so the same code refuses it before and serves it after.
_GPTJ_SERVED = tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24)
if _GPTJ_SERVED:
    FAMILIES["gptj"] = _GPTJ

REFUSED: dict[str, tuple[str, dict, str]] = {
    "falcon": ("falcon", {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}, "does not go through"),
    **({} if _GPTJ_SERVED else {"gptj": (*_GPTJ, "does not go through")}),
    "deepseek_v3": ("deepseek_v3", {**_LLAMA_LIKE, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
                                    "qk_nope_head_dim": 16, "v_head_dim": 16, "n_routed_experts": 4,
                                    "first_k_dense_replace": 3}, "latent"),
    # MiniMax's lightning-attention layers keep a cache class of their own.
    "minimax": ("minimax", {**_LLAMA_LIKE, **_MOE, "num_hidden_layers": 2}, "uses cache of its own"),
}


def config_for(family: str, **overrides):
    from transformers import AutoConfig

    model_type, kwargs = {**FAMILIES, **{k: v[:2] for k, v in REFUSED.items()}}[family]
    return AutoConfig.for_model(model_type, **_COMMON, **{**kwargs, **overrides})


def tiny_model(family: str, dtype=torch.float32, **overrides):
    """``overrides`` replace config arguments (a shorter ``sliding_window``, ``attention_chunk_size``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = config_for(family, **overrides)
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.name_or_path = f"tiny-{family}"
    return model


def byte_tokenizer():
    """A byte-level tokenizer with exactly VOCAB (256) ids, built offline: no merges, one id per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token=bytes_to_unicode()[10], pad_token=bytes_to_unicode()[0])


def save_tiny(family: str, path) -> str:
    """A tiny model of ``family`` with the byte tokenizer, as a local directory any command loads."""
    tiny_model(family, torch.float32).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return str(path)
