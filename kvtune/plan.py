"""The per-layer KV quantization plan and its versioned JSON file.

A plan holds one :class:`LayerPlan` per decoder layer: how K and how V are stored (a
:class:`~kvtune.quant.QuantSpec` each) and how many recent tokens stay in full precision.
The file format is documented in ``docs/plan-format.md``; :func:`Plan.from_dict` is the one
validating reader, and every problem it finds is a :class:`~kvtune.errors.PlanError` naming where.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtune.errors import PlanError
from kvtune.formats import ENGINE_FORMATS
from kvtune.quant import FULL_BITS, QuantSpec

SCHEMA = "kvtune.plan"
SCHEMA_VERSION = 2  # 2: K and V may name an engine format (fp8, nvfp4, q8_0, …); version 1 files still load
READABLE_VERSIONS = (1, 2)

# KIVI's layout: keys per-channel (outlier channels get their own scale), values per-token.
DEFAULT_KEY_MODE = "per-channel"
DEFAULT_VALUE_MODE = "per-token"
DEFAULT_GROUP_SIZE = 32
DEFAULT_RESIDUAL = 32

_PAIR_RE = re.compile(r"^k(\d+|\[[a-z0-9_]+\])v(\d+|\[[a-z0-9_]+\])$", re.IGNORECASE)
Label = int | str  # a K or V format inside a pair: an integer width, or an engine format's name


@dataclass(frozen=True)
class ModelShape:
    """What of a model's architecture a plan depends on."""

    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)


@dataclass(frozen=True)
class LayerPlan:
    key: QuantSpec
    value: QuantSpec
    residual: int = DEFAULT_RESIDUAL

    def __post_init__(self):
        if not isinstance(self.residual, int) or self.residual < 0:
            raise PlanError(f"residual must be a non-negative integer, got {self.residual!r}")

    @property
    def pair(self) -> str:
        return pair_name(label_of(self.key), label_of(self.value))

    @property
    def nominal_bits(self) -> float:
        return (self.key.bits + self.value.bits) / 2

    @classmethod
    def from_pair(
        cls,
        pair: str,
        key_mode: str = DEFAULT_KEY_MODE,
        value_mode: str = DEFAULT_VALUE_MODE,
        group_size: int = DEFAULT_GROUP_SIZE,
        residual: int = DEFAULT_RESIDUAL,
    ) -> LayerPlan:
        k_label, v_label = parse_pair(pair)
        return cls(spec_from_label(k_label, key_mode, group_size), spec_from_label(v_label, value_mode, group_size), residual)

    def cache_bytes(self, tokens: int, shape: ModelShape, batch: int = 1) -> int:
        """Real bytes of this layer's K and V after ``tokens`` tokens: packed codes, fp16
        scales/zeros, and the full-precision residual tokens (counted at 2 bytes)."""
        rows = batch * shape.num_kv_heads
        total = 0
        for spec in (self.key, self.value):
            quantized = spec.quantized_tokens(tokens, self.residual)
            total += spec.nbytes(quantized, shape.head_dim, rows) + 2 * (tokens - quantized) * shape.head_dim * rows
        return total


def _label(text: str) -> Label:
    if text.isdigit():
        QuantSpec(int(text))  # validates the width
        return int(text)
    name = text.strip("[]").lower()
    if name in ("f16", "fp16", "bf16"):
        return FULL_BITS
    QuantSpec.engine(name)  # validates the name
    return name


def parse_pair(pair: str) -> tuple[Label, Label]:
    """``k4v2`` → (4, 2); ``K[fp8]V[nvfp4]`` → ('fp8', 'nvfp4'); ``k[q8_0]v[q4_1]`` → ('q8_0', 'q4_1')."""
    match = _PAIR_RE.match(pair.strip())
    if not match:
        raise PlanError(
            f"cannot read {pair!r} as a K/V pair: expected k<bits>v<bits> (e.g. k4v2) or engine formats in "
            "brackets (e.g. k[fp8]v[nvfp4])"
        )
    return _label(match.group(1)), _label(match.group(2))


def pair_name(k: Label, v: Label) -> str:
    """The one spelling of a pair in tables and files: ``K4V2``, ``K[fp8]V[nvfp4]``."""
    show = lambda label: str(label) if isinstance(label, int) else f"[{label}]"  # noqa: E731
    return f"K{show(k)}V{show(v)}"


def label_of(spec: QuantSpec) -> Label:
    return spec.format if spec.is_engine else spec.bits


def spec_from_label(label: Label, mode: str, group_size: int) -> QuantSpec:
    """An integer width takes the given mode and group; an engine format brings its own."""
    return QuantSpec.engine(label) if isinstance(label, str) else QuantSpec(label, mode, group_size)


@dataclass
class Plan:
    layers: tuple[LayerPlan, ...]
    name: str = ""
    model: str = ""
    shape: ModelShape | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.layers = tuple(self.layers)
        if not self.layers:
            raise PlanError("a plan needs at least one layer")

    def __len__(self) -> int:
        return len(self.layers)

    @classmethod
    def uniform(cls, pair: str, num_layers: int, name: str = "", **layer_kwargs) -> Plan:
        layer = LayerPlan.from_pair(pair, **layer_kwargs)
        return cls((layer,) * num_layers, name=name or f"uniform:{pair.lower()}")

    @property
    def pairs(self) -> list[str]:
        return [layer.pair for layer in self.layers]

    def nominal_bits(self) -> float:
        """Average nominal K/V width over all layers (KVTuner's '3.25 bits' convention).
        Layers share one shape, so each weighs the same share of the KV elements."""
        return sum(layer.nominal_bits for layer in self.layers) / len(self.layers)

    def cache_bytes(self, shape: ModelShape, tokens: int, batch: int = 1) -> int:
        return sum(layer.cache_bytes(tokens, shape, batch) for layer in self.layers)

    def effective_bits(self, shape: ModelShape, tokens: int, batch: int = 1) -> float:
        """Real bytes relative to an unquantized cache of the same shape, in bits per element."""
        return 16 * self.cache_bytes(shape, tokens, batch) / Plan.uniform("k16v16", len(self.layers)).cache_bytes(shape, tokens, batch)

    def check_model(self, shape: ModelShape, model_name: str = "the model") -> None:
        """Refuse a plan written for another architecture, before any forward pass."""
        if len(self.layers) != shape.num_layers:
            raise PlanError(
                f"plan {self.name or '(unnamed)'} has {len(self.layers)} layers but {model_name} has "
                f"{shape.num_layers}; a plan only fits a model with the same layer count"
            )
        if self.shape is not None and self.shape != shape:
            raise PlanError(f"plan was written for {self.shape}, but {model_name} is {shape}")
        for i, layer in enumerate(self.layers):
            for which, spec in (("key", layer.key), ("value", layer.value)):
                if spec.is_engine and spec.format != "fp8" and shape.head_dim % spec.group_size:
                    raise PlanError(
                        f"layer {i} {which}: {spec.format} stores blocks of {spec.group_size} along head_dim, "
                        f"which does not divide head_dim {shape.head_dim} of {model_name}"
                    )
                if spec.is_quantized and spec.mode == "per-token" and shape.head_dim % spec.group_size:
                    raise PlanError(
                        f"layer {i} {which}: per-token group_size {spec.group_size} does not divide "
                        f"head_dim {shape.head_dim} of {model_name}"
                    )

    # ---- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "name": self.name,
            "model": self.model,
            "shape": None if self.shape is None else vars(self.shape).copy(),
            "nominal_bits": round(self.nominal_bits(), 6),
            "layers": [
                {"layer": i, "key": _spec_to_dict(l.key), "value": _spec_to_dict(l.value), "residual": l.residual}
                for i, l in enumerate(self.layers)
            ],
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if not isinstance(data, dict):
            raise PlanError(f"a plan must be a JSON object, got {type(data).__name__}")
        _refuse_unknown(data, {"schema", "schema_version", "name", "model", "shape", "nominal_bits", "layers", "metadata"}, "plan")
        if data.get("schema") != SCHEMA:
            raise PlanError(f"not a kvtune plan: 'schema' is {data.get('schema')!r}, expected {SCHEMA!r}")
        version = data.get("schema_version")
        if version not in READABLE_VERSIONS:
            raise PlanError(
                f"plan schema_version {version!r} is not supported: this kvtune reads versions {list(READABLE_VERSIONS)}"
            )
        layers_data = data.get("layers")
        if not isinstance(layers_data, list) or not layers_data:
            raise PlanError("plan 'layers' must be a non-empty list, one entry per decoder layer")
        layers = tuple(_layer_from_data(i, entry) for i, entry in enumerate(layers_data))
        shape = data.get("shape")
        if shape is not None:
            try:
                shape = ModelShape(**shape)
            except TypeError as e:
                raise PlanError(f"plan 'shape' must hold num_layers, num_kv_heads, head_dim: {e}") from None
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise PlanError("plan 'metadata' must be an object")
        plan = cls(layers, name=str(data.get("name") or ""), model=str(data.get("model") or ""), shape=shape, metadata=metadata)
        if shape is not None and shape.num_layers != len(layers):
            raise PlanError(f"plan 'shape' says {shape.num_layers} layers but 'layers' has {len(layers)} entries")
        return plan

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)  # never leave a half-written plan behind
        return path

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"plan file {path} is not valid JSON: {e}") from None
        try:
            return cls.from_dict(data)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None


def _spec_to_dict(spec: QuantSpec) -> dict[str, Any]:
    if not spec.is_quantized:
        return {"format": "fp16", "bits": FULL_BITS}
    if spec.is_engine:
        return {"format": spec.format, "bits": spec.bits, "mode": spec.mode, "group_size": spec.group_size}
    return {"format": "int", "bits": spec.bits, "mode": spec.mode, "group_size": spec.group_size}


def _refuse_unknown(data: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")


def _spec_from_data(data: Any, default_mode: str, where: str) -> QuantSpec:
    if isinstance(data, int) and not isinstance(data, bool):  # friendly form: just the width
        data = {"bits": data}
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected an object like {{'format': 'int', 'bits': 4}} or a bit width")
    _refuse_unknown(data, {"format", "bits", "mode", "group_size"}, where)
    fmt = data.get("format", "fp16" if data.get("bits") == FULL_BITS else "int")
    if fmt == "fp16":
        if data.get("bits", FULL_BITS) != FULL_BITS:
            raise PlanError(f"{where}: format 'fp16' has 16 bits, not {data.get('bits')!r}")
        return QuantSpec(FULL_BITS)
    if fmt in ENGINE_FORMATS:
        spec = QuantSpec.engine(fmt, per_head=data.get("mode") == "per-head")
        for name in ("bits", "mode", "group_size"):
            if name in data and data[name] != getattr(spec, name):
                raise PlanError(f"{where}: format {fmt!r} has {name} {getattr(spec, name)!r}, not {data[name]!r}")
        return spec
    if fmt != "int":
        raise PlanError(f"{where}: unknown format {fmt!r}; expected 'int', 'fp16' or one of {sorted(ENGINE_FORMATS)}")
    if "bits" not in data:
        raise PlanError(f"{where}: missing 'bits'")
    try:
        return QuantSpec(data["bits"], data.get("mode", default_mode), data.get("group_size", DEFAULT_GROUP_SIZE))
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None


def _layer_from_data(index: int, data: Any) -> LayerPlan:
    where = f"layer {index}"
    if isinstance(data, str):  # friendly form: "k4v2" with the default modes
        try:
            return LayerPlan.from_pair(data)
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None
    if not isinstance(data, dict):
        raise PlanError(f"{where}: expected an object with 'key', 'value' and 'residual', or a pair like 'k4v2'")
    _refuse_unknown(data, {"layer", "key", "value", "residual"}, where)
    if "layer" in data and data["layer"] != index:
        raise PlanError(f"{where}: entry says 'layer': {data['layer']!r}; layers must be listed in order 0..n-1")
    for required in ("key", "value"):
        if required not in data:
            raise PlanError(f"{where}: missing '{required}'")
    key = _spec_from_data(data["key"], DEFAULT_KEY_MODE, f"{where} key")
    value = _spec_from_data(data["value"], DEFAULT_VALUE_MODE, f"{where} value")
    try:
        return LayerPlan(key, value, data.get("residual", DEFAULT_RESIDUAL))
    except PlanError as e:
        raise PlanError(f"{where}: {e}") from None


# ---- named plans ------------------------------------------------------------------------------

# KIVI's published setting: group 32, a 128-token full-precision window.
_KIVI = dict(key_mode="per-channel", value_mode="per-token", group_size=32, residual=128)

PRESET_FORMS = {
    "fp16": "every layer keeps K and V as they are",
    "uniform:k<b>v<b>": "every layer at one pair with kvtune's defaults (e.g. uniform:k4v2)",
    "kivi:<b>": "KIVI's setting at b bits for K and V (per-channel K, per-token V, group 32, residual 128)",
}


def resolve_plan(spec: str | Path, num_layers: int) -> Plan:
    """A plan file path or a preset name, as accepted by every command that takes ``--plan``."""
    text = str(spec).strip()
    lowered = text.lower()
    if lowered == "fp16":
        return Plan.uniform("k16v16", num_layers, name="fp16")
    if lowered.startswith("uniform:"):
        return Plan.uniform(lowered.split(":", 1)[1], num_layers)
    if lowered.startswith("kivi:"):
        bits = lowered.split(":", 1)[1]
        if not bits.isdigit():
            raise PlanError(f"cannot read {text!r}: expected kivi:<bits>, e.g. kivi:2")
        return Plan.uniform(f"k{bits}v{bits}", num_layers, name=lowered, **_KIVI)
    if _PAIR_RE.match(lowered):
        return Plan.uniform(lowered, num_layers)
    path = Path(text)
    if path.suffix == ".json" or path.exists():
        return Plan.load(path)
    forms = "; ".join(f"{k}: {v}" for k, v in PRESET_FORMS.items())
    raise PlanError(f"{text!r} is neither a plan file nor a known plan name. Known forms: {forms}")
