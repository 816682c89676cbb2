"""Asymmetric uniform integer quantization of K/V tensors: the plain-PyTorch reference.

Every tensor here is laid out like a transformers cache entry, ``(..., tokens, head_dim)``.
A :class:`QuantSpec` picks the bit width and which elements share one scale/zero pair:

=============  ======================================  ===========================  ==================
mode           elements sharing a scale                scale/zero shape             used by
=============  ======================================  ===========================  ==================
per-token      ``group_size`` channels of one token    ``(..., T, D // G)``         values (KIVI)
per-channel    ``group_size`` tokens of one channel    ``(..., T // G, D)``         keys (KIVI)
=============  ======================================  ===========================  ==================

Both modes store codes in the same token-major layout, ``(..., T, D * bits // 8)`` bytes, so that
quantized chunks concatenate along the token axis and a kernel reads one token row at a time.
Scale and zero point (the group minimum) are fp16. The minimum is rounded *down* and the scale
*up* to fp16, so every element of a group lies inside the representable range and the round-trip
error is at most ``scale / 2`` with the stored scale.

The three steps are plain functions: :func:`choose_qparams` → :func:`quantize_codes` →
:func:`dequantize`; :func:`quantize` runs them and packs the codes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from kvtune import formats
from kvtune.errors import PlanError
from kvtune.formats import BLOCK, CALIBRATED, ENGINE_FORMATS, TOKEN_HEAD_FORMATS, shape_problem

INT_BITS = (2, 3, 4, 5, 6, 8)
# Widths that are not a power of two are stored as bit planes, each packed like a power-of-two
# width and placed one after the other in the token's row: 3 = a 2-bit plane (the low bits) then a
# 1-bit plane (the high bit). Every code takes exactly ``bits`` bits and rows stay token-major.
PLANES = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
FULL_BITS = 16
BITS = INT_BITS + (FULL_BITS,)
MODES = ("per-token", "per-channel")
FP8_MODES = ("per-tensor", "per-head")
MAX_GROUP = 1 << 16  # far above any head size or sensible token group; larger is a corrupt value
SCALE_DTYPE = torch.float16


def _is_int(x) -> bool:
    """An integer as JSON means one: not a bool, not 4.0."""
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How one of K or V is stored in one layer. ``bits == 16`` keeps the tensor as it is.

    ``format`` is ``"int"`` (this module's asymmetric integers, 16 = unquantized) or an engine's
    native format from :mod:`kvtune.formats` (``fp8``, ``nvfp4``, ``q8_0``, ``q5_0``, ``q5_1``, ``q4_0``, ``q4_1``);
    for those ``bits`` is the nominal width, and ``mode``/``group_size`` are the format's own
    (``fp8``: ``per-tensor`` or ``per-head`` scale; the block formats: ``per-block``; vLLM's
    ``*_per_token_head``: ``per-token-head``).
    """

    bits: int
    mode: str = "per-token"
    group_size: int = 32
    format: str = "int"
    # fp8 / nvfp4: the calibrated amax their per-tensor (fp8 per-head: per-head) scale maps to the
    # format's largest value; None: unit scale (kvtune.formats.fake_quantize).
    amax: float | tuple[float, ...] | None = None

    @classmethod
    def engine(cls, name: str, per_head: bool = False, amax=None) -> QuantSpec:
        if name not in ENGINE_FORMATS:
            raise PlanError(f"unknown KV format {name!r}: expected one of {sorted(ENGINE_FORMATS)} or an integer width")
        return cls(ENGINE_FORMATS[name], "per-head" if per_head else "per-tensor", 32, name, amax)

    @property
    def is_engine(self) -> bool:
        return self.format != "int"

    @property
    def label(self) -> str:
        """How this spec is written inside a pair name: ``8`` for int8, ``[fp8]`` for FP8."""
        return f"[{self.format}]" if self.is_engine else str(self.bits)

    def __post_init__(self):
        if self.is_engine:
            if self.format not in ENGINE_FORMATS:
                raise PlanError(f"unknown KV format {self.format!r}: expected 'int' or one of {sorted(ENGINE_FORMATS)}")
            self._check_amax(self.format in CALIBRATED)
            object.__setattr__(self, "bits", ENGINE_FORMATS[self.format])
            if self.format in TOKEN_HEAD_FORMATS:
                object.__setattr__(self, "mode", "per-token-head")
                object.__setattr__(self, "group_size", 32)
            elif BLOCK[self.format] is None:  # the FP8 formats: a scale per tensor (fp8 also per head), no blocks
                if self.mode not in FP8_MODES or self.format != "fp8":
                    object.__setattr__(self, "mode", "per-tensor")
                object.__setattr__(self, "group_size", 32)
            else:
                object.__setattr__(self, "mode", "per-block")
                object.__setattr__(self, "group_size", BLOCK[self.format])
            return
        self._check_amax(False)
        if not _is_int(self.bits) or self.bits not in BITS:
            raise PlanError(f"unknown bit width {self.bits!r}: expected one of the integers {list(BITS)}")
        if self.bits == FULL_BITS:  # mode and group mean nothing unquantized: one canonical form
            object.__setattr__(self, "mode", "per-token")
            object.__setattr__(self, "group_size", 32)
        if self.mode not in MODES:
            raise PlanError(f"unknown quantization mode {self.mode!r}: expected one of {list(MODES)}")
        if not _is_int(self.group_size) or not 0 < self.group_size <= MAX_GROUP:
            raise PlanError(f"group_size must be an integer from 1 to {MAX_GROUP}, got {self.group_size!r}")

    def _check_amax(self, allowed: bool) -> None:
        amax = self.amax
        if amax is None:
            return
        if not allowed:
            raise PlanError(f"a calibrated amax applies to fp8 and nvfp4 only, not {self.label}")
        values = amax if isinstance(amax, (list, tuple)) else (amax,)
        if not values or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 < a < float("inf") for a in values):
            raise PlanError(f"{self.format} amax must be a positive finite number (or one per KV head), got {amax!r}")
        if isinstance(amax, (list, tuple)):
            object.__setattr__(self, "amax", tuple(float(a) for a in amax))
            if self.mode != "per-head":
                raise PlanError(f"{self.format}: one amax per KV head needs mode 'per-head'")
        else:
            object.__setattr__(self, "amax", float(amax))

    @property
    def is_quantized(self) -> bool:
        return self.bits != FULL_BITS

    @property
    def token_granularity(self) -> int:
        """Tokens that must be present before they can be quantized together."""
        return self.group_size if self.mode == "per-channel" else 1

    def describe(self) -> str:
        """``per-channel/g32``, ``blocks of 32``, ``per-tensor amax 7.5``, ``per token and head``, ``fp16``."""
        if not self.is_quantized:
            return "fp16"
        if not self.is_engine:
            return f"{self.mode}/g{self.group_size}"
        if self.mode == "per-block":
            return f"blocks of {self.group_size}"
        if self.mode == "per-token-head":
            return "per token and head"
        if self.amax is not None:
            return f"{self.mode} amax {list(self.amax) if isinstance(self.amax, tuple) else self.amax}"
        return f"{self.mode} unit scale" if self.format in ("fp8", "nvfp4") else self.mode

    @property
    def reads_itself(self) -> bool:
        """Does a token attend to its own K/V as stored? Engines write a step's K/V into their cache
        and then attend over the cache (vLLM, llama.cpp), so a token reads itself rounded; kvtune's
        own cache hands a call its fresh tokens unrounded, as its fused kernel does."""
        return self.is_engine

    def window(self, residual: int) -> int:
        """The full-precision window this spec keeps: engines store every token in their format."""
        return 0 if self.is_engine else residual

    def quantized_tokens(self, total_tokens: int, residual: int) -> int:
        """How many of the oldest tokens are stored quantized once ``total_tokens`` are cached.

        The most recent ``residual`` tokens stay in full precision; per-channel groups are only
        quantized whole, so between ``residual`` and ``residual + group_size - 1`` tokens do.
        This single rule is shared by the cache and the simulated-quantization attention.
        """
        if not self.is_quantized:
            return 0
        step = self.token_granularity
        return max(total_tokens - self.window(residual), 0) // step * step

    def nbytes(self, tokens: int, head_dim: int, rows: int = 1) -> int:
        """Exact bytes to store ``rows`` (batch × heads) sequences of ``tokens`` quantized tokens."""
        if not self.is_quantized:
            return rows * tokens * head_dim * 2
        if self.is_engine:
            return formats.nbytes(self.format, tokens, head_dim, rows, per_head=self.mode == "per-head")
        check_shape(tokens, head_dim, self)
        codes = tokens * head_dim * self.bits // 8
        groups = tokens * head_dim // self.group_size
        return rows * (codes + 2 * groups * SCALE_DTYPE.itemsize)

    def effective_bits(self, tokens: int, head_dim: int) -> float:
        """Stored bits per element, scale and zero overhead included."""
        return 8 * self.nbytes(tokens, head_dim) / (tokens * head_dim)


def check_shape(tokens: int, head_dim: int, spec: QuantSpec) -> None:
    """The one place that states which shapes a spec can quantize."""
    if spec.is_engine:
        problem = shape_problem(spec.format, head_dim)
        if problem:
            raise ValueError(problem)
        return
    if any(head_dim % (8 // width) for width in PLANES[spec.bits]):
        raise ValueError(f"head_dim {head_dim} cannot be packed at {spec.bits} bits (planes of {PLANES[spec.bits]} bits)")
    if spec.mode == "per-token" and head_dim % spec.group_size != 0:
        raise ValueError(f"per-token group_size {spec.group_size} does not divide head_dim {head_dim}")
    if spec.mode == "per-channel" and tokens % spec.group_size != 0:
        raise ValueError(f"per-channel quantization needs whole groups: {tokens} tokens, group_size {spec.group_size}")


# ---------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------


def _to_groups(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View ``x`` (..., T, D) as (..., rows, groups, group_size) with one scale per last-dim group."""
    if spec.mode == "per-token":
        return x.unflatten(-1, (-1, spec.group_size))  # (..., T, D/G, G)
    return x.transpose(-1, -2).unflatten(-1, (-1, spec.group_size))  # (..., D, T/G, G)


def _from_groups(g: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.mode == "per-token":
        return g.flatten(-2)
    return g.flatten(-2).transpose(-1, -2)


def _qparams_layout(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-group tensor (..., a, b) in grouped order → storage layout with tokens on dim -2."""
    return q if spec.mode == "per-token" else q.transpose(-1, -2)


def _fp16_down(x: torch.Tensor) -> torch.Tensor:
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -float("inf"))), h)


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    h = x.to(SCALE_DTYPE)
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)


def choose_qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) per group, in storage layout. ``zero`` is the group minimum."""
    check_shape(x.shape[-2], x.shape[-1], spec)
    g = _to_groups(x.float(), spec)
    lo = _fp16_down(g.amin(-1))
    hi = g.amax(-1)
    levels = 2**spec.bits - 1
    # Divide by a tensor, not a Python number: CUDA turns division by a scalar into multiplication
    # by its reciprocal, which rounds differently, and the stored bytes must not depend on the device.
    scale = _fp16_up((hi - lo.float()) / torch.full_like(hi, levels))
    # A constant group is represented exactly by its (fp16) minimum; any positive scale works.
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    # Contiguous in storage layout, as the Triton kernels write and read them.
    return _qparams_layout(scale, spec).contiguous(), _qparams_layout(lo, spec).contiguous()


def _expand(q: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Storage-layout qparams → broadcastable against the grouped view."""
    return _qparams_layout(q, spec).float().unsqueeze(-1)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Integer codes in [0, 2**bits - 1], uint8, same shape as ``x``."""
    g = _to_groups(x.float(), spec)
    codes = torch.round((g - _expand(zero, spec)) / _expand(scale, spec)).clamp_(0, 2**spec.bits - 1)
    return _from_groups(codes, spec).to(torch.uint8)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, spec: QuantSpec, dtype=torch.float32
) -> torch.Tensor:
    g = _to_groups(codes.float(), spec)
    return _from_groups(g * _expand(scale, spec) + _expand(zero, spec), spec).to(dtype)


def _pack_plane(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return codes.to(torch.uint8)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    grouped = codes.to(torch.uint8).unflatten(-1, (-1, 8 // bits))
    return (grouped << shifts).sum(-1, dtype=torch.uint8)


def _unpack_plane(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).flatten(-2)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes of ``bits`` each along the last dim, lowest bits first: (..., D) → (..., D*bits/8).
    Widths of :data:`PLANES` with several planes store each plane's bits packed, low plane first."""
    codes = codes.to(torch.uint8)
    planes, low = [], 0
    for width in PLANES[bits]:
        planes.append(_pack_plane((codes >> low) & ((1 << width) - 1), width))
        low += width
    return planes[0] if len(planes) == 1 else torch.cat(planes, dim=-1)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    head_dim = packed.shape[-1] * 8 // bits
    codes, start, low = None, 0, 0
    for width in PLANES[bits]:
        size = head_dim * width // 8
        part = _unpack_plane(packed[..., start : start + size], width) << low
        codes = part if codes is None else codes | part
        start, low = start + size, low + width
    return codes


# ---------------------------------------------------------------------------------------------
# The stored form
# ---------------------------------------------------------------------------------------------


@dataclass
class QuantizedTensor:
    """Packed codes with their fp16 scale and zero point; tokens are on dim -2 of all three."""

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    spec: QuantSpec
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.packed.shape[:-1] + (self.packed.shape[-1] * 8 // self.spec.bits,)

    @property
    def num_tokens(self) -> int:
        return self.packed.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def dequantize(self) -> torch.Tensor:
        return dequantize_codes(unpack(self.packed, self.spec.bits), self.scale, self.zero, self.spec, self.dtype)

    def cat(self, other: QuantizedTensor) -> QuantizedTensor:
        """Append ``other`` along the token axis (whole per-channel groups keep this exact)."""
        return self.map2(other, lambda a, b: torch.cat([a, b], dim=-2))

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> QuantizedTensor:
        """Apply a batch-axis operation (index_select, repeat_interleave, .to) to every stored tensor."""
        return dataclasses.replace(self, packed=fn(self.packed), scale=fn(self.scale), zero=fn(self.zero))

    def map2(self, other: QuantizedTensor, fn) -> QuantizedTensor:
        return dataclasses.replace(
            self,
            packed=fn(self.packed, other.packed),
            scale=fn(self.scale, other.scale),
            zero=fn(self.zero, other.zero),
        )


def quantize(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    if not spec.is_quantized:
        raise ValueError("a 16-bit spec keeps tensors as they are; there is nothing to quantize")
    if spec.is_engine:
        raise ValueError(f"{spec.format} is stored by kvtune.formats, not as packed integer codes")
    scale, zero = choose_qparams(x, spec)
    codes = quantize_codes(x, scale, zero, spec)
    return QuantizedTensor(pack(codes, spec.bits), scale, zero, spec, x.dtype)


def fake_quantize(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """quantize → dequantize without packing; identity for 16-bit specs."""
    if not spec.is_quantized:
        return x
    if spec.is_engine:
        return formats.fake_quantize(x, spec.format, per_head=spec.mode == "per-head", amax=spec.amax)
    scale, zero = choose_qparams(x, spec)
    return dequantize_codes(quantize_codes(x, scale, zero, spec), scale, zero, spec, x.dtype)
