import os

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before they are defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The default model and data are prepared once into $KVTUNE_HOME (default ~/.cache/kvtune),
# shared with `kvtune run`, so the tests pay the GGUF conversion only on a fresh machine.


def tiny_llama(layers: int = 3, heads: int = 4, kv_heads: int = 2, head_dim: int = 32, vocab: int = 256, dtype=torch.float64):
    """A random-weight Llama of the default model's architecture (GQA), small enough for seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def default_model():
    from kvtune.models import load_model

    return load_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model):
    """A random tiny Llama with the default model's tokenizer, saved as a local HF directory."""
    _, tokenizer = default_model
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_llama(vocab=len(tokenizer), dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
