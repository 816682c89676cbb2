"""``kvtune export``: a plan in the forms serving code reads.

=====================  ==========================================================================
format                 what it writes
=====================  ==========================================================================
``kvtune``             the versioned per-layer JSON plan (docs/plan-format.md); load it with
                       ``kvtune.cache.load_cache(model, Plan.load(path))``
``hf-quantized-cache`` keyword arguments for transformers' own ``QuantizedCache`` (KIVI-style,
                       ``generate(cache_implementation="quantized", cache_config=...)``): one
                       width for K and V in every layer
``llama.cpp``          ``--cache-type-k`` / ``--cache-type-v`` flags: one type for K and one for V
                       in every layer
=====================  ==========================================================================

A plan a target cannot express is refused with the first layer and what the target lacks,
unless ``nearest=True``: then every layer moves to the nearest expressible setting with no fewer
bits, and the memory change is reported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kvtune.errors import PlanError
from kvtune.plan import LayerPlan, ModelShape, Plan
from kvtune.quant import QuantSpec

FORMATS = ("kvtune", "hf-quantized-cache", "llama.cpp")
# transformers' QuantizedCache backends and the widths each accepts (its own checks).
_HF_BITS = {"quanto": (2, 4), "hqq": (1, 2, 3, 4, 8)}
# llama.cpp KV cache types by their bits per element (block scales included in the name's width).
_LLAMA_CPP = {16: "f16", 8: "q8_0", 4: "q4_1"}


@dataclass
class Exported:
    format: str
    path: Path
    notes: list[str]


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
        raise PlanError(f"{target} has no width of at least {max(k_target, v_target)} bits")
    if (k_bits, v_bits) != (plan.layers[0].key.bits, plan.layers[0].value.bits) or len(set(plan.pairs)) > 1:
        notes.append(f"rounded up to K{k_bits}V{v_bits} in every layer (nearest expressible with no fewer bits)")
    return k_bits, v_bits, notes


def _memory_note(before: Plan, after: Plan, shape: ModelShape | None, context: int = 32768) -> str:
    if shape is None:
        return f"nominal bits {before.nominal_bits():.3f} -> {after.nominal_bits():.3f}"
    a, b = before.cache_bytes(shape, context), after.cache_bytes(shape, context)
    return (f"memory at {context} tokens: {a / 2**20:.1f} MiB -> {b / 2**20:.1f} MiB ({(b - a) / a:+.1%}); "
            f"nominal bits {before.nominal_bits():.3f} -> {after.nominal_bits():.3f}")


def export_plan(plan: Plan, fmt: str, out: str | Path, nearest: bool = False, backend: str = "quanto") -> Exported:
    out = Path(out)
    if fmt not in FORMATS:
        raise PlanError(f"unknown export format {fmt!r}; available: {list(FORMATS)}")
    if fmt == "kvtune":
        plan.save(out)
        return Exported(fmt, out, [])
    first = plan.layers[0]
    if fmt == "hf-quantized-cache":
        if backend not in _HF_BITS:
            raise PlanError(f"unknown QuantizedCache backend {backend!r}; available: {sorted(_HF_BITS)}")
        bits, _, notes = _uniform_widths(plan, _HF_BITS[backend], f"transformers QuantizedCache[{backend}]", nearest, same_kv=True)
        # QuantizedCache groups every tensor along one axis with one group size and window.
        config = {"backend": backend, "nbits": bits, "axis_key": 0, "axis_value": 0,
                  "q_group_size": first.key.group_size, "residual_length": first.residual}
        notes.append("QuantizedCache quantizes K and V per-channel with one group size: kvtune's per-token values are not expressible")
        rounded = Plan.uniform(f"k{bits}v{bits}", len(plan), group_size=first.key.group_size, residual=first.residual)
        payload = {"cache_implementation": "quantized", "cache_config": config}
    else:
        k_bits, v_bits, notes = _uniform_widths(plan, tuple(_LLAMA_CPP), "llama.cpp", nearest, same_kv=False)
        payload = {"cache_type_k": _LLAMA_CPP[k_bits], "cache_type_v": _LLAMA_CPP[v_bits],
                   "args": ["--cache-type-k", _LLAMA_CPP[k_bits], "--cache-type-v", _LLAMA_CPP[v_bits]]}
        rounded = Plan(tuple(LayerPlan(QuantSpec(k_bits), QuantSpec(v_bits), 0) for _ in plan.layers))
        notes.append("llama.cpp stores q8_0/q4_1 in blocks of 32 along head_dim and keeps no full-precision window")
    if notes and notes[0].startswith("rounded"):
        notes.append(_memory_note(plan, rounded, plan.shape))
    payload["kvtune"] = {"source_plan": plan.name, "notes": notes}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    return Exported(fmt, out, notes)
