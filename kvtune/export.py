"""``kvtune export``: a plan in the forms serving code reads.

=====================  ==========================================================================
format                 what it writes
=====================  ==========================================================================
``kvtune``             the versioned per-layer JSON plan (docs/plan-format.md); load it with
                       ``kvtune.load_cache(model, path)``
``hf-quantized-cache`` keyword arguments for transformers' own ``QuantizedCache`` (KIVI-style,
                       ``generate(cache_implementation="quantized", cache_config=...)``): one
                       width for K and V in every layer
``vllm``               released vLLM's flags: one ``--kv-cache-dtype`` for every layer and the layers
                       kept 16-bit as ``--kv-cache-dtype-skip-layers`` (plans searched with the
                       ``vllm-fp8`` / ``vllm-nvfp4`` … format sets), and the same as ``LLM(...)``
                       keyword arguments
``modelopt-hf``        the KV part of a ModelOpt Hugging Face checkpoint's quantization metadata:
                       a per-layer map of ``FP8`` / ``NVFP4`` / ``FP8_K_NVFP4_V`` under
                       ``MIXED_PRECISION`` (what vLLM's layer-wise mixed KV reads)
``trtllm``             TensorRT-LLM's per-layer KV dtype, as a range string and as a dict
``sglang``             a default ``--kv-cache-dtype`` plus per-layer overrides (range string, map)
``llama.cpp``          ``--cache-type-k`` / ``--cache-type-v``: one type for K and one for V
``ik-llama.cpp``       as llama.cpp, plus other types for the first/last N layers of K and of V
=====================  ==========================================================================

A plan a target cannot express is refused with the first layer and what the target lacks,
unless ``nearest=True``: then every layer moves to the nearest expressible setting with no fewer
(nominal) bits on K and on V, and the memory change is reported. docs/eval-export.md has the
table of engines and what each accepts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvtune.errors import PlanError
from kvtune.formats import VLLM_DTYPES, vllm_forced_skips
from kvtune.plan import Label, LayerPlan, ModelShape, Plan, label_of, pair_name
from kvtune.quant import QuantSpec

FORMATS = ("kvtune", "hf-quantized-cache", "vllm", "modelopt-hf", "trtllm", "sglang", "llama.cpp", "ik-llama.cpp")
# transformers' QuantizedCache backends and the widths each accepts (its own checks).
_HF_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8), "fp8": ()}
# (axis_key, axis_value) closest to kvtune's per-channel keys and per-token values. The same axis
# means opposite groupings on the two backends: quanto's axis 0 groups each token, hqq's each channel.
# quanto's per-channel keys (-1) need every prompt's tokens × heads to be a multiple of the group,
# so they are not written: quanto keys are grouped per token.
_HF_AXES = {"quanto": (0, 0), "hqq": (0, 1)}
# llama.cpp KV cache types (kvtune label → type name); an integer width maps to the type of
# that nominal width, asymmetric 4-bit (q4_1) for kvtune's asymmetric int4.
_LLAMA_CPP_TYPES = {16: "f16", "q8_0": "q8_0", "q4_1": "q4_1", "q4_0": "q4_0", "q5_1": "q5_1", "q5_0": "q5_0"}
_LLAMA_CPP_FROM_INT = {16: 16, 8: "q8_0", 5: "q5_1", 4: "q4_1"}
# Per-layer options of the engines that take one setting per layer: name → (K label, V label).
_MODELOPT = {"NVFP4": ("nvfp4", "nvfp4"), "FP8_K_NVFP4_V": ("fp8", "nvfp4"), "FP8": ("fp8", "fp8"), None: (16, 16)}
_TRTLLM = {"nvfp4": ("nvfp4", "nvfp4"), "fp8": ("fp8", "fp8"), "auto": (16, 16)}
# Why released vLLM's numbers may differ from kvtune's model of each --kv-cache-dtype (the dtypes
# and their K/V formats are kvtune.formats.VLLM_DTYPES).
_PER_TOKEN_HEAD_NOTE = ("one fp32 scale per token and KV head, computed as each token is stored (no calibration); "
                        "vLLM runs it with the Triton attention backend (GPUs), not on its CPU backend")
_VLLM_NOTES = {
    "fp8": "per-tensor scales from the checkpoint (ModelOpt's k_scale/v_scale); a checkpoint without them runs "
           "at scale 1.0, which kvtune models as fp8_e4m3",
    "fp8_e4m3": "kvtune modelled vLLM's default scale of 1.0 (a checkpoint without KV scales); scales in the "
                "checkpoint would be used instead",
    "fp8_e5m2": "kvtune modelled vLLM's default scale of 1.0 (a checkpoint without KV scales)",
    "nvfp4": "NVFP4 KV cache runs on NVIDIA Blackwell GPUs only; per-tensor scales from the checkpoint",
    "int8_per_token_head": _PER_TOKEN_HEAD_NOTE,
    "fp8_per_token_head": _PER_TOKEN_HEAD_NOTE,
    "int4_per_token_head": _PER_TOKEN_HEAD_NOTE + "; K and V randomized-Hadamard-rotated before 4-bit rounding",
    **{name: "vLLM's TurboQuant backend (GPUs; not its CPU build); vLLM always keeps the first and last two layers "
             "unquantized; decode reads the quantized cache, a whole-prompt prefill attends the fresh K/V"
       for name in VLLM_DTYPES if name.startswith("turboquant_")},
}
# SGLang's released --kv-cache-dtype names (0.5.23: auto, fp8_e5m2, fp8_e4m3, mxfp8, bf16, nvfp4, fp4_mx_block16).
_SGLANG = {"nvfp4": ("nvfp4", "nvfp4"), "fp8_e4m3": ("fp8", "fp8"), "bf16": (16, 16)}


@dataclass
class Exported:
    format: str
    path: Path
    notes: list[str]
    plan: Plan  # the plan as the target stores it: the input, or where --nearest rounded it, the rounded plan


@dataclass(frozen=True)
class Skipped:
    """A format that cannot hold the plan even rounded up, and why."""

    format: str
    reason: str


def _uniform_widths(plan: Plan, allowed: tuple[int, ...], target: str, nearest: bool, same_kv: bool) -> tuple[int, int, list[str]]:
    """One (K bits, V bits) for every layer, or a refusal naming the first layer that breaks it."""
    notes = []

    def lift(bits: int) -> int | None:
        return min((b for b in allowed if b >= bits), default=None)

    k_target = max(layer.key.bits for layer in plan.layers)
    v_target = max(layer.value.bits for layer in plan.layers)
    if same_kv:
        k_target = v_target = max(k_target, v_target)
    for i, layer in enumerate(plan.layers):
        problems = []
        if (layer.key.bits, layer.value.bits) != (plan.layers[0].key.bits, plan.layers[0].value.bits):
            problems.append(f"a different pair ({layer.pair}) from layer 0 ({plan.layers[0].pair}); {target} takes one setting for all layers")
        if same_kv and layer.key.bits != layer.value.bits:
            problems.append(f"K{layer.key.bits} differs from V{layer.value.bits}; {target} takes one width for K and V")
        for which, bits in (("K", layer.key.bits), ("V", layer.value.bits)):
            if bits not in allowed:
                problems.append(f"{which}{bits} is not among {target}'s widths {list(allowed)}")
        if problems and not nearest:
            raise PlanError(f"{target} cannot express layer {i}: {problems[0]} (use --nearest to round up)")
    k_bits, v_bits = lift(k_target), lift(v_target)
    if k_bits is None or v_bits is None:
        raise PlanError(f"{target} has no width of at least {max(k_target, v_target)} bits (its widths: {list(allowed)})")
    if (k_bits, v_bits) != (plan.layers[0].key.bits, plan.layers[0].value.bits) or len(set(plan.pairs)) > 1:
        notes.append(f"rounded up to K{k_bits}V{v_bits} in every layer (nearest expressible with no fewer bits)")
    return k_bits, v_bits, notes


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvtune")
    except PackageNotFoundError:  # a source tree that is not installed
        return "unknown"


def _memory_note(before: Plan, after: Plan, shape: ModelShape | None, context: int = 32768) -> str:
    if shape is None:
        return f"nominal bits {before.nominal_bits():.3f} -> {after.nominal_bits():.3f}"
    a, b = before.cache_bytes(shape, context), after.cache_bytes(shape, context)
    return (f"memory at {context} tokens: {a / 2**20:.1f} MiB -> {b / 2**20:.1f} MiB ({(b - a) / a:+.1%}); "
            f"nominal bits {before.nominal_bits():.3f} -> {after.nominal_bits():.3f}")


def _bits(label: Label) -> int:
    return label if isinstance(label, int) else QuantSpec.engine(label).bits


def _layer_of(label_k: Label, label_v: Label, like: LayerPlan) -> LayerPlan:
    spec = lambda label, old: old if label_of(old) == label else (  # noqa: E731
        QuantSpec.engine(label) if isinstance(label, str) else QuantSpec(label, old.mode if old.is_quantized and not old.is_engine else "per-token"))
    return LayerPlan(spec(label_k, like.key), spec(label_v, like.value), like.residual)


def _per_layer(plan: Plan, options: dict, target: str, nearest: bool) -> tuple[list, Plan, list[str]]:
    """The option of ``options`` (name → (K label, V label)) that stores each layer exactly, or with
    ``nearest`` the one with the fewest bytes among those with no fewer bits on K and on V."""
    names, layers, moved = [], [], 0
    offered = ", ".join(pair_name(*kv) for kv in options.values())
    for i, layer in enumerate(plan.layers):
        want = (label_of(layer.key), label_of(layer.value))
        exact = [name for name, kv in options.items() if kv == want]
        if exact:
            names.append(exact[0])
            layers.append(layer)
            continue
        if not nearest:
            raise PlanError(f"{target} cannot express layer {i}: {layer.pair} is none of its per-layer settings "
                            f"({offered}) (use --nearest to round up)")
        fits = [(name, kv) for name, kv in options.items() if _bits(kv[0]) >= layer.key.bits and _bits(kv[1]) >= layer.value.bits]
        if not fits:
            raise PlanError(f"{target} has no setting with at least the bits of layer {i} ({layer.pair})")
        cost = lambda kv: _layer_of(*kv, layer).cache_bytes(32768, plan.shape or ModelShape(len(plan), 1, 128), layer=i)  # noqa: E731
        name, kv = min(fits, key=lambda item: cost(item[1]))
        names.append(name)
        layers.append(_layer_of(*kv, layer))
        moved += 1
    notes = [f"rounded {moved} layer(s) up to the nearest {target} setting with no fewer bits"] if moved else []
    return names, Plan(tuple(layers), name=plan.name, shape=plan.shape), notes


def _released_vllm(plan: Plan, nearest: bool) -> tuple[dict, Plan, list[str]]:
    """One vLLM cache dtype for every layer but a skipped set kept 16-bit: released vLLM's whole choice."""
    options = {**VLLM_DTYPES, None: (16, 16)}
    names, rounded, notes = _per_layer(plan, options, "released vLLM", nearest)
    dtypes = list(dict.fromkeys(name for name in names if name is not None))
    if len(dtypes) > 1:
        first = {d: names.index(d) for d in dtypes}
        if not nearest:
            raise PlanError(f"released vLLM takes one --kv-cache-dtype, but the plan stores layers as {dtypes} (first at layers "
                            f"{list(first.values())}); search with one of the vllm-fp8 / vllm-nvfp4 format sets, or use "
                            "--nearest to move every quantized layer to the widest of them")
        widest = lambda d: (sum(map(_bits, VLLM_DTYPES[d])), names.count(d))  # noqa: E731
        dtype = max(dtypes, key=widest)  # no layer loses bits
        names = [dtype if name is not None else None for name in names]
        rounded = Plan(tuple(layer if name is None else _layer_of(*VLLM_DTYPES[dtype], layer) for name, layer in zip(names, rounded.layers)),
                       name=plan.name, shape=plan.shape)
        notes.append(f"rounded up: every quantized layer to {dtype} (released vLLM takes one --kv-cache-dtype)")
    dtype = next((name for name in names if name is not None), "auto")  # "auto": every layer skipped
    shape = plan.shape or ModelShape(len(plan), 1, 1)
    forced = vllm_forced_skips(dtype, shape.model_layer(len(plan) - 1) + 1, shape.layer_ids is not None)
    clash = [i for i, name in enumerate(names) if name is not None and shape.model_layer(i) in forced]
    if clash:
        if not nearest:
            raise PlanError(f"vLLM keeps layers {forced} unquantized for {dtype} whatever the skip list says, but the plan "
                            f"quantizes layers {[shape.model_layer(i) for i in clash]}; search with --target vllm (or a "
                            f"vllm-{dtype} set), or use --nearest to keep them 16-bit")
        names = [None if i in clash else name for i, name in enumerate(names)]
        rounded = Plan(tuple(LayerPlan(QuantSpec(16), QuantSpec(16), layer.residual) if i in clash else layer
                             for i, layer in enumerate(rounded.layers)), name=plan.name, shape=plan.shape)
        notes.append(f"layers {[shape.model_layer(i) for i in clash]} kept 16-bit: vLLM always skips {forced} for {dtype}")
    # vLLM names layers by their model index (the number in the module's name).
    skipped = [shape.model_layer(i) for i, name in enumerate(names) if name is None]
    args, kwargs = ["--kv-cache-dtype", dtype], {"kv_cache_dtype": dtype}
    if dtype != "auto" and skipped:
        # Separate values ("0 5"): vLLM's parser reads "0,5" as one string and the layers stay quantized.
        args += ["--kv-cache-dtype-skip-layers", *map(str, skipped)]
        kwargs["kv_cache_dtype_skip_layers"] = [str(i) for i in skipped]
        notes.append(f"{len(skipped)} of {len(names)} layers stay 16-bit: {skipped}"
                     + (f" (vLLM would keep {forced} unquantized for {dtype} anyway)" if forced else ""))
    if dtype != "auto":
        notes.append(f"{dtype}: {_VLLM_NOTES[dtype]}")
    payload = {"vllm_args": args, "vllm_llm_kwargs": kwargs, "kv_cache_dtype": dtype, "skip_layers": skipped if dtype != "auto" else []}
    return payload, rounded, notes


def _llama_cpp_type(label: Label) -> Label | None:
    """A kvtune label as a llama.cpp cache type label, if it is one exactly."""
    return label if label in _LLAMA_CPP_TYPES else None


def _lift_llama_cpp(labels: list[Label]) -> Label:
    """The one llama.cpp type with no fewer bits than every label (their own type where they share one)."""
    exact = {_llama_cpp_type(x) for x in labels}
    if len(exact) == 1 and None not in exact:
        return exact.pop()
    need = max(_bits(x) for x in labels)
    if need > 8:
        return 16
    if need > 5:
        return "q8_0"
    asymmetric = any(x in ("q4_1", "q5_1") or isinstance(x, int) for x in labels)  # kvtune's integers have a minimum too
    if need > 4:
        return "q5_1" if asymmetric else "q5_0"
    return "q4_1" if asymmetric else "q4_0"


def _stream_pattern(labels: list[Label]) -> tuple[Label, int, Label, int, Label] | None:
    """(first type, N, base type, M, last type) with the fewest N + M that reproduces ``labels``."""
    n = len(labels)
    for total in range(n):
        for first in range(total + 1):
            last = total - first
            middle = labels[first : n - last]
            if not middle or len(set(middle)) != 1:
                continue
            head, tail = labels[:first], labels[n - last :]
            if len(set(head)) <= 1 and len(set(tail)) <= 1:
                return (head[0] if head else middle[0], first, middle[0], last, tail[0] if tail else middle[0])
    return None


def _llama_cpp_streams(plan: Plan, target: str, nearest: bool, ends: bool) -> tuple[dict, Plan, list[str]]:
    """K and V types for llama.cpp (one each) or ik_llama.cpp (``ends``: also first/last N layers)."""
    chosen, notes, new_labels = {}, [], {}
    for which in ("k", "v"):
        labels = [label_of(layer.key if which == "k" else layer.value) for layer in plan.layers]
        pattern = _stream_pattern(labels) if ends else (_stream_pattern(labels) if len(set(labels)) == 1 else None)
        ok = pattern is not None and all(_llama_cpp_type(x) is not None for x in (pattern[0], pattern[2], pattern[4]))
        if not ok:
            if not nearest:
                first_bad = next((i for i, x in enumerate(labels) if _llama_cpp_type(x) is None), None)
                if first_bad is not None:
                    reason = f"{which.upper()} is {plan.layers[first_bad].pair.split('V')[0 if which == 'k' else 1].lstrip('K')}, not a {target} cache type ({sorted(map(str, _LLAMA_CPP_TYPES.values()))})"
                    raise PlanError(f"{target} cannot express layer {first_bad}: {reason} (use --nearest to round up)")
                i = next(i for i, x in enumerate(labels) if x != labels[0])
                if ends:  # the first layer between the two end runs that differs from the middle's type
                    head = i
                    tail = next(j for j, x in enumerate(reversed(labels)) if x != labels[-1])
                    middle = range(head, len(labels) - tail)
                    i = next((j for j in middle if labels[j] != labels[head]), head)
                shape = "one type for all layers" if not ends else "one type for all layers except the first and last N"
                raise PlanError(f"{target} cannot express layer {i}: its {which.upper()} type differs and {target} takes {shape} "
                                "(use --nearest to round up)")
            if ends:  # keep the runs at both ends, lift the middle to one type
                head = next((i for i, x in enumerate(labels) if x != labels[0]), len(labels))
                tail = next((i for i, x in enumerate(reversed(labels)) if x != labels[-1]), len(labels))
                if head + tail >= len(labels):
                    head, tail = 0, 0
                first_t, base_t, last_t = (_lift_llama_cpp(labels[:head]) if head else None,
                                           _lift_llama_cpp(labels[head : len(labels) - tail]),
                                           _lift_llama_cpp(labels[len(labels) - tail :]) if tail else None)
                pattern = (first_t or base_t, head, base_t, tail, last_t or base_t)
            else:
                base_t = _lift_llama_cpp(labels)
                pattern = (base_t, 0, base_t, 0, base_t)
            notes.append(f"rounded {which.upper()} up to {target} types with no fewer bits")
        first_t, n_first, base_t, n_last, last_t = pattern
        # An end run of the base type is no end run: ik_llama.cpp needs no -first/-last flag for it.
        n_first, n_last = (0 if first_t == base_t else n_first), (0 if last_t == base_t else n_last)
        pattern = (first_t, n_first, base_t, n_last, last_t)
        chosen[which] = pattern
        new_labels[which] = [first_t if i < n_first else last_t if i >= len(labels) - n_last else base_t for i in range(len(labels))]
    layers = tuple(_layer_of(k, v, layer) for k, v, layer in zip(new_labels["k"], new_labels["v"], plan.layers))
    return chosen, Plan(layers, name=plan.name, shape=plan.shape), notes


def _ranges(values: list) -> list[tuple[int, int, object]]:
    """[(first layer, last layer, value)] runs of equal values."""
    runs = []
    for i, value in enumerate(values):
        if runs and runs[-1][2] == value:
            runs[-1] = (runs[-1][0], i, value)
        else:
            runs.append((i, i, value))
    return runs


def _range_string(runs) -> str:
    return ",".join(f"{a}-{b}:{v}" if a != b else f"{a}:{v}" for a, b, v in runs)


def check_settings(fmt: str, out: str | Path, backend: str = "quanto") -> Path:
    """The format, backend and output file, checked before anything is computed or written."""
    from kvtune import inputs

    if fmt not in FORMATS:
        raise PlanError(f"unknown export format {fmt!r}; available: {list(FORMATS)}")
    if fmt == "hf-quantized-cache" and backend not in _HF_BITS:
        raise PlanError(f"unknown QuantizedCache backend {backend!r}; available: {sorted(_HF_BITS)}")
    return inputs.check_out_file(out, "export")


def export_plan(plan: Plan, fmt: str, out: str | Path, nearest: bool = False, backend: str = "quanto",
                overwrite: bool = False) -> Exported:
    """Write ``plan`` as ``fmt`` to the file ``out``; a file holding something else is replaced only with ``overwrite``."""
    from kvtune import files, inputs

    out = check_settings(fmt, out, backend)
    if fmt == "kvtune":
        text = files.dumps(plan.to_dict())
        inputs.refuse_replacing(out, text, overwrite)
        files.write_text(out, text)
        return Exported(fmt, out, [], plan)
    first = plan.layers[0]
    if fmt == "hf-quantized-cache" and backend == "fp8":
        # transformers' fp8 backend: E4M3 with one per-tensor scale, calibrated on the first update and frozen; every layer.
        _, rounded, notes = _per_layer(plan, {"fp8": ("fp8", "fp8")}, "transformers QuantizedCache[fp8]", nearest)
        notes.append("the fp8 backend freezes each layer's scale on the prompt and keeps no full-precision window")
        payload = {"cache_implementation": "quantized", "cache_config": {"backend": "fp8"}}
    elif fmt == "hf-quantized-cache":
        bits, _, notes = _uniform_widths(plan, _HF_BITS[backend], f"transformers QuantizedCache[{backend}]", nearest, same_kv=True)
        # QuantizedCache groups every tensor along one axis with one group size and window.
        # One group and one window for all layers: the finest group and the longest window any layer has.
        settings = {(s.group_size, layer.residual) for layer in plan.layers for s in layer.integer_specs}
        group = min((g for g, _ in settings), default=first.key.group_size)
        residual = max((r for _, r in settings), default=first.residual)
        if len(settings) > 1:
            notes.append(f"layers differ in group size or window; QuantizedCache takes one: group {group} (the finest) and "
                         f"window {residual} (the longest), no less accurate and a little more memory")
        axis_key, axis_value = _HF_AXES[backend]
        config = {"backend": backend, "nbits": bits, "axis_key": axis_key, "axis_value": axis_value,
                  "q_group_size": group, "residual_length": residual}
        if backend == "quanto":
            notes.append("quanto groups K and V per token (axis 0): kvtune's per-channel keys are not written, quanto's "
                         "per-channel keys fail on prompts whose tokens × heads the group does not divide")
        else:
            notes.append("hqq: keys per channel (axis 0) and values per token (axis 1), as kvtune stores them")
        notes.append(f"residual_length {residual}: transformers keeps between 0 and {max(residual - 1, 0)} recent tokens "
                     "unquantized (it quantizes all of them once the window fills), not always the last ones as kvtune does")
        rounded = Plan.uniform(f"k{bits}v{bits}", len(plan), group_size=group, residual=residual)
        payload = {"cache_implementation": "quantized", "cache_config": config}
    elif fmt == "vllm":
        payload, rounded, notes = _released_vllm(plan, nearest)
    elif fmt == "modelopt-hf":
        names, rounded, notes = _per_layer(plan, _MODELOPT, "ModelOpt (vLLM)", nearest)
        skipped = [i for i, name in enumerate(names) if name is None]
        quantized = {f"model.layers.{i}.self_attn": {"quant_algo": name} for i, name in enumerate(names) if name is not None}
        algos = set(names) - {None}
        kv = {"kv_cache_quant_algo": algos.pop() if len(algos) == 1 and not skipped else "MIXED_PRECISION"}
        kv["kv_cache_quantized_layers"] = quantized  # PR #2272's schema lists the layers for a uniform plan too
        kv["kv_cache_schema_version"] = 1
        payload = {"producer": {"name": "kvtune", "version": _version()}, "quantization": kv}
        if skipped:
            # vLLM's --kv-cache-dtype-skip-layers takes layers as separate values ("0 5"); "0,5" is ignored.
            payload["vllm_args"] = ["--kv-cache-dtype-skip-layers", *map(str, skipped)]
            payload["vllm_llm_kwargs"] = {"kv_cache_dtype_skip_layers": [str(i) for i in skipped]}
            notes.append(f"layers {skipped} stay unquantized: left out of the map; vLLM keeps them with --kv-cache-dtype-skip-layers")
        notes.append("the per-layer map is read by ModelOpt after PR #2272 and by vLLM's open layer-wise PRs; released vLLM "
                     "and ModelOpt 0.47 take one --kv-cache-dtype plus --kv-cache-dtype-skip-layers")
        notes.append("FP8 and NVFP4 per-tensor scales are the engine's own calibration; kvtune writes which format each layer uses")
    elif fmt == "trtllm":
        names, rounded, notes = _per_layer(plan, _TRTLLM, "TensorRT-LLM", nearest)
        payload = {"kv_cache_config": {"dtype": _range_string(_ranges(names))}, "dtype_by_layer": dict(enumerate(names))}
        notes.append("'auto' keeps a layer in the model's own dtype")
    elif fmt == "sglang":
        names, rounded, notes = _per_layer(plan, _SGLANG, "SGLang", nearest)
        default = max(dict.fromkeys(names), key=names.count)  # most layers; the first such on a tie
        overrides = [(a, b, v) for a, b, v in _ranges(names) if v != default]
        payload = {"args": ["--kv-cache-dtype", default if default != "bf16" else "auto"],
                   "kv_cache_dtype_layers": _range_string(overrides),
                   "kv_cache_dtype_map": {i: name for i, name in enumerate(names) if name != default}}
        if overrides:
            notes.append("per-layer KV dtypes are in no SGLang release (0.5.23 takes one --kv-cache-dtype); the overrides "
                         "are for builds that add them")
    else:
        ends = fmt == "ik-llama.cpp"
        target = "ik_llama.cpp" if ends else "llama.cpp"
        int_free = plan
        if not nearest:  # integer widths are not llama.cpp types; name the first such layer
            for i, layer in enumerate(plan.layers):
                for which, spec in (("K", layer.key), ("V", layer.value)):
                    if _llama_cpp_type(label_of(spec)) is None:
                        raise PlanError(f"{target} cannot express layer {i}: {which} is {spec.label.strip('[]')}-bit kvtune "
                                        f"integers, not one of {target}'s types {sorted(map(str, _LLAMA_CPP_TYPES.values()))} "
                                        "(use --nearest to round up)")
        else:  # kvtune integers become the llama.cpp type of their width first (2 bits is lifted later)
            as_type = lambda spec: _LLAMA_CPP_FROM_INT.get(label_of(spec), label_of(spec)) if not spec.is_engine else spec.format  # noqa: E731
            int_free = Plan(tuple(_layer_of(as_type(layer.key), as_type(layer.value), layer) for layer in plan.layers),
                            name=plan.name, shape=plan.shape)
        streams, rounded, notes = _llama_cpp_streams(int_free, target, nearest, ends)
        if int_free is not plan and int_free.pairs != plan.pairs:
            notes.insert(0, f"rounded up to {target} types with no fewer bits")
        name = lambda label: _LLAMA_CPP_TYPES[label]  # noqa: E731
        args = ["--cache-type-k", name(streams["k"][2]), "--cache-type-v", name(streams["v"][2])]
        payload = {"cache_type_k": name(streams["k"][2]), "cache_type_v": name(streams["v"][2])}
        if ends:
            for which, flag in (("k", "--cache-type-k"), ("v", "--cache-type-v")):
                first_t, n_first, _, n_last, last_t = streams[which]
                if n_first:
                    args += [f"{flag}-first", f"{name(first_t)},{n_first}"]
                if n_last:
                    args += [f"{flag}-last", f"{name(last_t)},{n_last}"]
        payload["args"] = args
        notes.append(f"{target} stores q8_0/q5_x/q4_x in blocks of 32 along head_dim and keeps no full-precision window")
    if rounded.layers != plan.layers:  # --nearest changed what is stored: say what it cost, and rename it
        notes.insert(0, f"--nearest cost: {_memory_note(plan, rounded, plan.shape)}")
        rounded = Plan(rounded.layers, name=f"{plan.name or 'plan'} rounded up for {fmt}", model=plan.model, shape=plan.shape,
                       metadata=plan.metadata)
    payload["kvtune"] = {"source_plan": plan.name, "notes": notes}
    text = json.dumps(payload, indent=2) + "\n"
    inputs.refuse_replacing(out, text, overwrite)
    files.write_text(out, text)
    return Exported(fmt, out, notes, rounded)


def export_formats(plan: Plan, folder: str | Path, formats: tuple[str, ...] = FORMATS) -> list[Exported | Skipped]:
    """``plan`` in every format that can hold it, rounded up where needed (``kvtune run``'s last step):
    ``folder/<format>.json`` each. transformers' QuantizedCache is written for quanto, or for hqq where
    quanto lacks a width (8 bits); a format that cannot hold the plan at all is skipped with the
    reason, and an older file of that format in ``folder`` is removed so that none is taken for this plan's."""
    results = []
    for fmt in formats:
        out = Path(folder) / f"{fmt}.json"
        reasons = []
        for backend in ("quanto", "hqq") if fmt == "hf-quantized-cache" else ("quanto",):
            try:
                exported = export_plan(plan, fmt, out, nearest=True, backend=backend, overwrite=True)
            except PlanError as refused:
                reasons.append(str(refused))
                continue
            if reasons:
                exported.notes.insert(0, f"written for the {backend} backend: {reasons[-1]}")
            results.append(exported)
            break
        else:
            out.unlink(missing_ok=True)
            results.append(Skipped(fmt, "; ".join(reasons)))
    return results
