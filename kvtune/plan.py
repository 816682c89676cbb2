"""The per-layer KV quantization plan and its versioned JSON file.

A plan holds one :class:`LayerPlan` per decoder layer: how K and how V are stored (a
:class:`~kvtune.quant.QuantSpec` each) and how many recent tokens stay in full precision.
The file format is documented in ``docs/plan-format.md``; :func:`Plan.from_dict` is the one
validating reader, and every problem it finds is a :class:`~kvtune.errors.PlanError` naming where.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvtune.errors import PlanError
from kvtune.formats import ENGINE_FORMATS, FORMAT_SETS, shape_problem
from kvtune.quant import FULL_BITS, MAX_GROUP, QuantSpec

SCHEMA = "kvtune.plan"
# 2: K and V may name an engine format (fp8, nvfp4, q8_0, …); 3: fp8/nvfp4 may carry a calibrated
# "amax"; 4: the shape may list K/V heads and head sizes per layer (written only by plans that do,
# so plans of models whose layers are alike stay version 3). Older files still load.
SCHEMA_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)

# KIVI's layout: keys per-channel (outlier channels get their own scale), values per-token.
DEFAULT_KEY_MODE = "per-channel"
DEFAULT_VALUE_MODE = "per-token"
DEFAULT_GROUP_SIZE = 32
DEFAULT_RESIDUAL = 32

MAX_TOKENS = 1 << 24  # residual windows and sliding windows; no context is longer
_SHAPE_LIMITS = {"num_layers": 1 << 12, "num_kv_heads": 1 << 12, "head_dim": 1 << 14}  # far beyond any model
_PAIR_RE = re.compile(r"^k(\d+|\[[a-z0-9_]+\])v(\d+|\[[a-z0-9_]+\])$", re.IGNORECASE)
# A candidate: a pair, optionally with its own group size (g) and full-precision window (r), e.g. K2V2g64r0.
_CANDIDATE_RE = re.compile(r"^(k(?:\d+|\[[a-z0-9_]+\])v(?:\d+|\[[a-z0-9_]+\]))(?:g(\d+))?(?:r(\d+))?$", re.IGNORECASE)
Label = int | str  # a K or V format inside a pair: an integer width, or an engine format's name


@dataclass(frozen=True)
class ModelShape:
    """What of a model's architecture a plan depends on.

    A plan has one entry per *attention* layer (layers with a growing K/V of their own); ``num_layers``
    counts those. ``layer_ids`` gives their indices in the model where they are not simply 0..n-1
    (hybrid models with linear-attention or convolution layers, layers that read another layer's
    K/V); ``windows`` gives, per planned layer, the tokens a sliding-window or chunked layer attends
    to (0: every token), where any layer has one.

    ``num_kv_heads`` and ``head_dim`` are the first planned layer's. Where layers differ (Gemma 4's
    global layers have larger heads than its sliding ones), or K and V heads differ in size
    (MiMo-V2-Flash), ``kv_heads``, ``key_dims`` and ``value_dims`` list them per planned layer; each
    is written only where some layer differs, so a model of one shape keeps one line.
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    layer_ids: tuple[int, ...] | None = None
    windows: tuple[int, ...] | None = None
    kv_heads: tuple[int, ...] | None = None
    key_dims: tuple[int, ...] | None = None
    value_dims: tuple[int, ...] | None = None

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlanError(f"model shape: {name} must be a positive integer, got {value!r}")
            if value > _SHAPE_LIMITS[name]:
                raise PlanError(f"model shape: {name} {value} is beyond any model (at most {_SHAPE_LIMITS[name]})")
        for name, low, high in (("layer_ids", 0, MAX_TOKENS), ("windows", 0, MAX_TOKENS), ("kv_heads", 1, _SHAPE_LIMITS["num_kv_heads"]),
                                ("key_dims", 1, _SHAPE_LIMITS["head_dim"]), ("value_dims", 1, _SHAPE_LIMITS["head_dim"])):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or len(value) != self.num_layers or not all(
                isinstance(x, int) and not isinstance(x, bool) and low <= x <= high for x in value
            ):
                raise PlanError(f"model shape: {name} must list {self.num_layers} integers from {low} to {high}, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.layer_ids is not None:
            if list(self.layer_ids) != sorted(set(self.layer_ids)):
                raise PlanError(f"model shape: layer_ids must increase, got {list(self.layer_ids)}")
            if self.layer_ids == tuple(range(self.num_layers)):
                object.__setattr__(self, "layer_ids", None)  # one spelling for "every layer"
        if self.windows is not None and not any(self.windows):
            object.__setattr__(self, "windows", None)
        # One spelling for "every layer alike": a per-layer list equal to the scalar is dropped.
        for name, scalar in (("kv_heads", self.num_kv_heads), ("key_dims", self.head_dim), ("value_dims", self.head_dim)):
            value = getattr(self, name)
            if value is not None and all(x == scalar for x in value):
                object.__setattr__(self, name, None)

    @classmethod
    def from_layers(cls, heads: list[int], key_dims: list[int], value_dims: list[int], layer_ids=None, windows=None) -> ModelShape:
        """The shape of planned layers given one by one (the first layer's heads and K head size are the scalars)."""
        return cls(len(heads), heads[0], key_dims[0], layer_ids=layer_ids, windows=windows, kv_heads=tuple(heads),
                   key_dims=tuple(key_dims), value_dims=tuple(value_dims))

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """Shape of a plain decoder where every layer is full attention (see :mod:`kvtune.arch` for the rest)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return cls(config.num_hidden_layers, kv_heads, head_dim)

    @classmethod
    def from_dict(cls, data: Any, where: str = "shape") -> ModelShape:
        if not isinstance(data, dict):
            raise PlanError(f"{where} must be an object with num_layers, num_kv_heads, head_dim")
        try:
            return cls(**data)
        except TypeError as e:
            raise PlanError(f"{where} must hold num_layers, num_kv_heads, head_dim (and optionally layer_ids, windows, "
                            f"kv_heads, key_dims, value_dims): {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {"num_layers": self.num_layers, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim}
        for name in ("layer_ids", "windows", "kv_heads", "key_dims", "value_dims"):
            if getattr(self, name) is not None:
                out[name] = list(getattr(self, name))
        return out

    @property
    def is_uniform(self) -> bool:
        """Every planned layer has the same KV heads, and K and V heads one size."""
        return self.kv_heads is None and self.key_dims is None and self.value_dims is None

    def heads(self, i: int) -> int:
        """KV heads of planned layer ``i``."""
        return self.num_kv_heads if self.kv_heads is None else self.kv_heads[i]

    def key_dim(self, i: int) -> int:
        """K head size of planned layer ``i``."""
        return self.head_dim if self.key_dims is None else self.key_dims[i]

    def value_dim(self, i: int) -> int:
        """V head size of planned layer ``i``."""
        return self.head_dim if self.value_dims is None else self.value_dims[i]

    def elements(self, i: int) -> int:
        """K and V elements planned layer ``i`` caches per token (batch 1)."""
        return self.heads(i) * (self.key_dim(i) + self.value_dim(i))

    @property
    def group_dim(self) -> int:
        """The largest size every K and V head size is a multiple of: what a per-token group shared
        by all layers must divide."""
        return math.gcd(*(d for i in range(self.num_layers) for d in (self.key_dim(i), self.value_dim(i))))

    def describe(self) -> str:
        """``30 attention layers × 3 KV heads × head_dim 64`` (and where the layers sit, where it matters)."""
        if self.is_uniform:
            text = f"{self.num_layers} attention layers × {self.num_kv_heads} KV heads × head_dim {self.head_dim}"
        else:
            kinds = dict.fromkeys(self._layer_text(i) for i in range(self.num_layers))
            text = f"{self.num_layers} attention layers of {len(kinds)} shapes ({', '.join(kinds)})"
        if self.layer_ids is not None:
            text += f" (model layers {list(self.layer_ids)})"
        if self.windows is not None:
            text += f" (sliding windows {list(self.windows)})"
        return text

    def _layer_text(self, i: int) -> str:
        k, v = self.key_dim(i), self.value_dim(i)
        return f"{self.heads(i)} KV heads × head_dim " + (str(k) if k == v else f"K {k} / V {v}")

    def model_layer(self, i: int) -> int:
        """The model's index of planned layer ``i``."""
        return i if self.layer_ids is None else self.layer_ids[i]

    def window(self, i: int) -> int:
        """Tokens planned layer ``i`` attends to; 0 means all."""
        return 0 if self.windows is None else self.windows[i]


def held_tokens(spec: QuantSpec, tokens: int, residual: int, window: int = 0) -> tuple[int, int]:
    """(quantized, full-precision) tokens one K or V stream holds after ``tokens`` tokens.

    Without a window every token is held. In a sliding-window layer the next query attends to the
    last ``window - 1`` tokens and itself, so older tokens are dropped, as transformers' own sliding
    cache does: full-precision tokens one by one, quantized ones in whole groups (a per-channel
    group shares its scales). Integer tokens wait in the full-precision tail until quantized, so a
    window shorter than the tail keeps the tail. The cache follows this rule exactly.
    """
    quantized = spec.quantized_tokens(tokens, residual) if spec.is_quantized else 0
    if not window:
        return quantized, tokens - quantized
    first = max(tokens - (window - 1), 0)  # oldest position still attended
    if not spec.is_quantized:
        return 0, tokens - first
    if spec.is_engine:
        return tokens - first, 0
    step = spec.token_granularity
    return quantized - min(first, quantized) // step * step, tokens - quantized


@dataclass(frozen=True)
class LayerPlan:
    key: QuantSpec
    value: QuantSpec
    residual: int = DEFAULT_RESIDUAL

    def __post_init__(self):
        if not isinstance(self.residual, int) or isinstance(self.residual, bool) or not 0 <= self.residual <= MAX_TOKENS:
            raise PlanError(f"residual must be an integer from 0 to {MAX_TOKENS}, got {self.residual!r}")

    @property
    def pair(self) -> str:
        return pair_name(label_of(self.key), label_of(self.value))

    @property
    def nominal_bits(self) -> float:
        return (self.key.bits + self.value.bits) / 2

    @property
    def integer_specs(self) -> list[QuantSpec]:
        """K and/or V where they are kvtune integers: the specs a group size and window apply to."""
        return [s for s in (self.key, self.value) if s.is_quantized and not s.is_engine]

    @property
    def candidate(self) -> str:
        """The pair with its group and window where they differ from kvtune's defaults: ``K2V2g64``."""
        integers = self.integer_specs
        groups = {s.group_size for s in integers}
        group = groups.pop() if len(groups) == 1 else None
        residual = self.residual if integers and self.residual != DEFAULT_RESIDUAL else None
        return candidate_name(label_of(self.key), label_of(self.value), None if group in (None, DEFAULT_GROUP_SIZE) else group, residual)

    @classmethod
    def from_pair(
        cls,
        pair: str,
        key_mode: str = DEFAULT_KEY_MODE,
        value_mode: str = DEFAULT_VALUE_MODE,
        group_size: int = DEFAULT_GROUP_SIZE,
        residual: int = DEFAULT_RESIDUAL,
    ) -> LayerPlan:
        """A pair or candidate name (``k4v2``, ``k2v2g64r0``); a candidate's own group and window
        replace ``group_size`` and ``residual``."""
        k_label, v_label, group, window = parse_candidate(pair)
        group = group_size if group is None else group
        residual = residual if window is None else window
        return cls(spec_from_label(k_label, key_mode, group), spec_from_label(v_label, value_mode, group), residual)

    def cache_bytes(self, tokens: int, shape: ModelShape, batch: int = 1, layer: int = 0) -> int:
        """Real bytes of this layer's K and V, as planned layer ``layer`` of ``shape``, after ``tokens``
        tokens: packed codes, fp16 scales/zeros, and the full-precision residual tokens (counted at 2
        bytes); a layer with a sliding window counts only what it still holds (:func:`held_tokens`)."""
        rows, window = batch * shape.heads(layer), shape.window(layer)
        total = 0
        for spec, dim in ((self.key, shape.key_dim(layer)), (self.value, shape.value_dim(layer))):
            quantized, full = held_tokens(spec, tokens, self.residual, window)
            total += (spec.nbytes(quantized, dim, rows) if spec.is_quantized else 0) + 2 * full * dim * rows
        return total

    def element_bits(self, shape: ModelShape | None = None, layer: int = 0) -> float:
        """Nominal K bits × K elements + V bits × V elements per token of planned layer ``layer``
        (per head and head size where no shape is given)."""
        if shape is None:
            return float(self.key.bits + self.value.bits)
        return shape.heads(layer) * (self.key.bits * shape.key_dim(layer) + self.value.bits * shape.value_dim(layer))


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


def parse_candidate(text: str) -> tuple[Label, Label, int | None, int | None]:
    """``k2v2g64r0`` → (2, 2, 64, 0); ``k4v2`` → (4, 2, None, None): None means the profile's own
    group size and window. Group and window apply to integer widths only (engine formats bring
    their own blocks and keep no window)."""
    match = _CANDIDATE_RE.match(text.strip())
    if not match:
        raise PlanError(f"cannot read {text!r} as a candidate: expected k<bits>v<bits> (e.g. k4v2) or engine formats "
                        "in brackets (e.g. k[fp8]v[nvfp4]), optionally with a group size and window (k2v2g64, k3v3g64r128)")
    k, v = parse_pair(match.group(1))
    group = None if match.group(2) is None else int(match.group(2))
    residual = None if match.group(3) is None else int(match.group(3))
    if (group is not None or residual is not None) and not any(isinstance(x, int) and x != FULL_BITS for x in (k, v)):
        raise PlanError(f"{text!r}: a group size (g) or window (r) applies to integer widths, and {pair_name(k, v)} has none")
    if group is not None and not 1 <= group <= MAX_GROUP:
        raise PlanError(f"{text!r}: group size must be 1..{MAX_GROUP}, got {group}")
    if residual is not None and residual > MAX_TOKENS:
        raise PlanError(f"{text!r}: window must be 0..{MAX_TOKENS}, got {residual}")
    return k, v, group, residual


def candidate_name(k: Label, v: Label, group: int | None = None, residual: int | None = None) -> str:
    """The one spelling of a candidate: ``K4V2``, ``K2V2g64``, ``K3V3g64r128``."""
    return pair_name(k, v) + candidate_suffix(group, residual)


def candidate_suffix(group: int | None, residual: int | None) -> str:
    """``g64r0``: a candidate's own group and window, each where it has one."""
    return ("" if group is None else f"g{group}") + ("" if residual is None else f"r{residual}")


def fit_candidate(text: str, group_size: int, residual: int, head_dim: int | None = None, per_token: bool = True) -> str:
    """A candidate's name in a profile of ``group_size`` and ``residual``: its own group or window
    equal to those is dropped (``K4V2g32`` is ``K4V2`` in a group-32 profile), and where a
    per-token side needs its group to divide ``head_dim``, a group that does not becomes the
    largest divisor below it (:func:`fit_group_size`), as the default group does."""
    k, v, group, window = parse_candidate(text)
    if group is not None and per_token and head_dim and head_dim % group:
        group = fit_group_size(head_dim, group)
    return candidate_name(k, v, None if group == group_size else group, None if window == residual else window)


def resolve_formats(text: str) -> list[str]:
    """A set name of :data:`~kvtune.formats.FORMAT_SETS` (``int``, ``int+``, ``int+g``, ``vllm``,
    ``llama.cpp``, ``engine``, ``all``, …) or a comma-separated list of candidates (``k4v2``,
    ``k2v2g64``, ``k3v3r128``) and set names → canonical candidate names, in order, without repeats."""
    text = text.strip()
    # Set names may stand inside a list too: "int+g,k3v3r128" is int+g and one more candidate.
    items = [p for part in text.split(",") if part.strip() for p in FORMAT_SETS.get(part.strip().lower(), (part,))]
    if not items:
        raise PlanError(f"--formats is empty: give one of {sorted(FORMAT_SETS)} or a list like k8v4,k[fp8]v[nvfp4]")
    try:
        return list(dict.fromkeys(candidate_name(*parse_candidate(p)) for p in items))
    except PlanError as e:
        raise PlanError(f"--formats {text!r}: {e}; named sets: {sorted(FORMAT_SETS)}") from None


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

    @property
    def candidates(self) -> list[str]:
        """Per layer, the pair with its own group and window (:attr:`LayerPlan.candidate`)."""
        return [layer.candidate for layer in self.layers]

    def nominal_bits(self, shape: ModelShape | None = None) -> float:
        """Mean nominal width of the cached K and V elements (KVTuner's '3.25 bits' convention).
        Where layers differ in shape (``shape``, else the plan's own), each layer weighs by the
        elements it caches; where they do not, this is the mean of (K bits + V bits) / 2 over layers."""
        shape = shape or self.shape
        if shape is None or shape.is_uniform:
            return sum(layer.nominal_bits for layer in self.layers) / len(self.layers)
        total = sum(shape.elements(i) for i in range(len(self.layers)))
        return sum(layer.element_bits(shape, i) for i, layer in enumerate(self.layers)) / total

    def cache_bytes(self, shape: ModelShape, tokens: int, batch: int = 1) -> int:
        return sum(layer.cache_bytes(tokens, shape, batch, i) for i, layer in enumerate(self.layers))

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
            raise PlanError(f"plan was written for a model of {self.shape.describe()}, but {model_name} has {shape.describe()}")
        for i, layer in enumerate(self.layers):
            for which, spec, dim in (("key", layer.key, shape.key_dim(i)), ("value", layer.value, shape.value_dim(i))):
                problem = shape_problem(spec.format, dim) if spec.is_engine else None
                if problem:
                    raise PlanError(f"layer {i} {which}: {problem} of {model_name}")
                if spec.is_quantized and spec.mode == "per-token" and dim % spec.group_size:
                    raise PlanError(
                        f"layer {i} {which}: per-token group_size {spec.group_size} does not divide "
                        f"head_dim {dim} of {model_name}"
                    )

    # ---- serialisation --------------------------------------------------------------------

    def _model_layer(self, i: int) -> int:
        return i if self.shape is None else self.shape.model_layer(i)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION if self.shape is not None and not self.shape.is_uniform else 3,
            "name": self.name,
            "model": self.model,
            "shape": None if self.shape is None else self.shape.to_dict(),
            "nominal_bits": round(self.nominal_bits(), 6),
            "layers": [
                {"layer": self._model_layer(i), "key": _spec_to_dict(l.key), "value": _spec_to_dict(l.value), "residual": l.residual}
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
        shape = data.get("shape")
        if shape is not None:
            shape = ModelShape.from_dict(shape, "plan 'shape'")
            if shape.num_layers != len(layers_data):
                raise PlanError(f"plan 'shape' says {shape.num_layers} layers but 'layers' has {len(layers_data)} entries")
        ids = [i if shape is None else shape.model_layer(i) for i in range(len(layers_data))]
        layers = tuple(_layer_from_data(i, entry) for i, entry in zip(ids, layers_data))
        metadata = data.get("metadata", {})
        if not isinstance(metadata, dict):
            raise PlanError("plan 'metadata' must be an object")
        for text in ("name", "model"):
            if not isinstance(data.get(text) or "", str):
                raise PlanError(f"plan '{text}' must be a string, got {data[text]!r}")
        plan = cls(layers, name=data.get("name") or "", model=data.get("model") or "", shape=shape, metadata=metadata)
        stated = data.get("nominal_bits")
        if stated is not None and (not isinstance(stated, (int, float)) or isinstance(stated, bool)
                                   or abs(stated - plan.nominal_bits()) > 1e-4):
            raise PlanError(f"plan 'nominal_bits' says {stated!r} but its layers average {plan.nominal_bits():.6g} bits; "
                            "fix or remove the field (it is only a summary)")
        return plan

    def save(self, path: str | Path) -> Path:
        from kvtune import files

        return files.write_text(path, files.dumps(self.to_dict()))  # never a half-written plan

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        from kvtune.files import read_json

        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}" if not path.exists() else f"plan {path} is not a file")
        data = read_json(path, PlanError, "plan file")
        try:
            return cls.from_dict(data)
        except PlanError as e:
            raise PlanError(f"{path}: {e}") from None


def _spec_to_dict(spec: QuantSpec) -> dict[str, Any]:
    if not spec.is_quantized:
        return {"format": "fp16", "bits": FULL_BITS}
    if spec.is_engine:
        out = {"format": spec.format, "bits": spec.bits, "mode": spec.mode, "group_size": spec.group_size}
        if spec.amax is not None:
            out["amax"] = list(spec.amax) if isinstance(spec.amax, tuple) else spec.amax
        return out
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
    _refuse_unknown(data, {"format", "bits", "mode", "group_size", "amax"}, where)
    fmt = data.get("format", "fp16" if data.get("bits") == FULL_BITS else "int")
    if fmt == "fp16":
        if data.get("bits", FULL_BITS) != FULL_BITS:
            raise PlanError(f"{where}: format 'fp16' has 16 bits, not {data.get('bits')!r}")
        return QuantSpec(FULL_BITS)
    if fmt in ENGINE_FORMATS:
        try:
            spec = QuantSpec.engine(fmt, per_head=data.get("mode") == "per-head", amax=data.get("amax"))
        except PlanError as e:
            raise PlanError(f"{where}: {e}") from None
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
    if "layer" in data and (not isinstance(data["layer"], int) or isinstance(data["layer"], bool) or data["layer"] != index):
        raise PlanError(
            f"{where}: entry says 'layer': {data['layer']!r}; layers must be listed in order, by their model index "
            "(0..n-1, or shape.layer_ids where only some layers are attention)"
        )
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
    "uniform:k<b>v<b>": "every layer at one pair with kvtune's defaults (e.g. uniform:k4v2), or a candidate with its own group and window (uniform:k2v2g64r0)",
    "kivi:<b>": "KIVI's setting at b bits for K and V (per-channel K, per-token V, group 32, residual 128)",
}


def fit_group_size(head_dim: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
    """The default per-token group for a head size: ``group_size`` where it divides ``head_dim``,
    else the largest divisor of ``head_dim`` below it (head_dim 80 → 20, 96 → 32, 72 → 24).
    An explicitly chosen group is never adjusted: :meth:`Plan.check_model` refuses it instead."""
    return max(d for d in range(1, min(group_size, head_dim) + 1) if head_dim % d == 0)


def resolve_plan(spec: str | Path, num_layers: int, head_dim: int | None = None) -> Plan:
    """A plan file path or a preset name, as accepted by every command that takes ``--plan``.
    Presets take a group that divides ``head_dim`` where it is given (:func:`fit_group_size`)."""
    text = str(spec).strip()
    lowered = text.lower()
    group = {} if head_dim is None else {"group_size": fit_group_size(head_dim)}
    if lowered == "fp16":
        return Plan.uniform("k16v16", num_layers, name="fp16")
    if lowered.startswith("uniform:"):
        return Plan.uniform(lowered.split(":", 1)[1], num_layers, **group)
    if lowered.startswith("kivi:"):
        bits = lowered.split(":", 1)[1]
        if not bits.isdigit():
            raise PlanError(f"cannot read {text!r}: expected kivi:<bits>, e.g. kivi:2")
        return Plan.uniform(f"k{bits}v{bits}", num_layers, name=lowered, **{**_KIVI, **group})
    if _CANDIDATE_RE.match(lowered):
        return Plan.uniform(lowered, num_layers, **group)
    path = Path(text)
    if path.suffix == ".json" or path.exists():
        return Plan.load(path)
    forms = "; ".join(f"{k}: {v}" for k, v in PRESET_FORMS.items())
    raise PlanError(f"{text!r} is neither a plan file nor a known plan name. Known forms: {forms}")
