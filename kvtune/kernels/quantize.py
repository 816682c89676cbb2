"""Quantize-and-pack in one Triton kernel: K/V in, the cache's stored form out.

The reference is :func:`kvtune.quant.quantize`; this kernel writes the same bytes. Each program
handles one scale group of one sequence row:

* per-token: ``BLOCK_T`` tokens × one group of ``G`` channels (one scale per token);
* per-channel: ``G`` tokens × all ``D`` channels (one scale per channel).

The tile is loaded as ``(rows, cols / per_byte, per_byte)`` so that the codes sharing one output
byte sit on the last axis and packing is a shift-and-sum over it, with no reshape.

Bit-exactness with the reference needs the same float32 arithmetic, so three things are spelled
out here: division rounds to nearest (``div_rn``, not the fast approximate ``/``), ``torch.round``
rounds half to even, and the fp16 minimum/scale are rounded down/up by stepping the fp16 bit
pattern (``torch.nextafter``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvtune.quant import PLANES, SCALE_DTYPE, QuantizedTensor, QuantSpec, check_shape


@triton.jit
def _round_half_even(y):
    f = tl.floor(y)
    frac = y - f  # exact: y and floor(y) are within one of each other
    odd = f - 2.0 * tl.floor(f * 0.5)
    return tl.where(frac > 0.5, f + 1.0, tl.where(frac < 0.5, f, f + odd))


@triton.jit
def _fp16_step(h, up: tl.constexpr):
    """The next fp16 value above (``up``) or below ``h``, as torch.nextafter."""
    bits = h.to(tl.int16, bitcast=True)
    positive = h > 0
    negative = h < 0
    if up:
        stepped = tl.where(positive, bits + 1, tl.where(negative, bits - 1, 1))
    else:
        stepped = tl.where(positive, bits - 1, tl.where(negative, bits + 1, -32767))  # -0 step → 0x8001
    return stepped.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _fp16_down(x):
    h = x.to(tl.float16)
    return tl.where(h.to(tl.float32) > x, _fp16_step(h, False), h)


@triton.jit
def _fp16_up(x):
    h = x.to(tl.float16)
    return tl.where(h.to(tl.float32) < x, _fp16_step(h, True), h)


@triton.jit
def _qparams(lo32, hi32, LEVELS: tl.constexpr):
    zero = _fp16_down(lo32)
    scale = _fp16_up(tl.math.div_rn(hi32 - zero.to(tl.float32), tl.full(hi32.shape, LEVELS, tl.float32)))
    scale = tl.where(scale == 0, 1.0, scale).to(tl.float16)
    return scale, zero


@triton.jit
def _codes(x, scale, zero, LEVELS: tl.constexpr):
    y = tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32))
    return tl.minimum(tl.maximum(_round_half_even(y), 0.0), LEVELS).to(tl.int32)


@triton.jit
def _store_plane(row_ptr, codes, mask, START: tl.constexpr, group, ROWS: tl.constexpr, N: tl.constexpr, WIDTH: tl.constexpr):
    """Pack one bit plane of ``codes`` (ROWS, N/8, 8), ``WIDTH`` bits each, and store its bytes from
    byte ``START`` of every row, at this group's place (``group`` × N·WIDTH/8)."""
    PB: tl.constexpr = 8 // WIDTH
    grouped = tl.reshape(codes, (ROWS, N // PB, PB))
    k = tl.arange(0, PB)
    packed = tl.sum(grouped << (k[None, None, :] * WIDTH), axis=2).to(tl.uint8)
    offs = START + group * (N // PB) + tl.arange(0, N // PB)
    tl.store(row_ptr + offs[None, :], packed, mask=mask)


@triton.jit
def _quantize_per_token_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr,
    T, stride_xr, stride_xt,
    BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    PLANES: tl.constexpr = BITS == 3 or BITS == 5 or BITS == 6
    PER_BYTE: tl.constexpr = 8 if PLANES else 8 // BITS  # codes that share one byte (of the 1-bit plane)
    LEVELS: tl.constexpr = (1 << BITS) - 1
    row = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    group = tl.program_id(2)
    j = tl.arange(0, G // PER_BYTE)
    k = tl.arange(0, PER_BYTE)
    col = group * G + j[:, None] * PER_BYTE + k[None, :]  # (G/pb, pb)
    tmask = t[:, None, None] < T
    x = tl.load(x_ptr + row * stride_xr + t[:, None, None].to(tl.int64) * stride_xt + col[None], mask=tmask).to(tl.float32)

    lo = tl.min(tl.min(x, axis=2), axis=1)
    hi = tl.max(tl.max(x, axis=2), axis=1)
    scale, zero = _qparams(lo, hi, LEVELS)
    codes = _codes(x, scale[:, None, None], zero[:, None, None], LEVELS)
    ROW_BYTES: tl.constexpr = D * BITS // 8
    row_start = row * T * ROW_BYTES + t[:, None].to(tl.int64) * ROW_BYTES
    if PLANES:
        LOW: tl.constexpr = 4 if BITS > 4 else 2
        _store_plane(packed_ptr + row_start, codes & ((1 << LOW) - 1), t[:, None] < T, 0, group, BLOCK_T, G, LOW)
        _store_plane(packed_ptr + row_start, codes >> LOW, t[:, None] < T, D * LOW // 8, group, BLOCK_T, G, BITS - LOW)
    else:
        packed = tl.sum(codes << (k[None, None, :] * BITS), axis=2).to(tl.uint8)  # (BLOCK_T, G/pb)
        tl.store(packed_ptr + row_start + group * (G // PER_BYTE) + j[None, :], packed, mask=t[:, None] < T)
    NG: tl.constexpr = D // G
    q = row * T * NG + t.to(tl.int64) * NG + group
    tl.store(scale_ptr + q, scale, mask=t < T)
    tl.store(zero_ptr + q, zero, mask=t < T)


@triton.jit
def _quantize_per_channel_kernel(
    x_ptr, packed_ptr, scale_ptr, zero_ptr,
    T, stride_xr, stride_xt,
    BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
):
    PLANES: tl.constexpr = BITS == 3 or BITS == 5 or BITS == 6
    PER_BYTE: tl.constexpr = 8 if PLANES else 8 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    t = group * G + tl.arange(0, G)
    j = tl.arange(0, D // PER_BYTE)
    k = tl.arange(0, PER_BYTE)
    col = j[:, None] * PER_BYTE + k[None, :]  # (D/pb, pb)
    x = tl.load(x_ptr + row * stride_xr + t[:, None, None].to(tl.int64) * stride_xt + col[None]).to(tl.float32)

    lo = tl.min(x, axis=0)  # (D/pb, pb): one group per channel
    hi = tl.max(x, axis=0)
    scale, zero = _qparams(lo, hi, LEVELS)
    codes = _codes(x, scale[None], zero[None], LEVELS)
    ROW_BYTES: tl.constexpr = D * BITS // 8
    row_start = row * T * ROW_BYTES + t[:, None].to(tl.int64) * ROW_BYTES
    if PLANES:
        LOW: tl.constexpr = 4 if BITS > 4 else 2
        _store_plane(packed_ptr + row_start, codes & ((1 << LOW) - 1), t[:, None] < T, 0, 0, G, D, LOW)
        _store_plane(packed_ptr + row_start, codes >> LOW, t[:, None] < T, D * LOW // 8, 0, G, D, BITS - LOW)
    else:
        packed = tl.sum(codes << (k[None, None, :] * BITS), axis=2).to(tl.uint8)  # (G, D/pb)
        tl.store(packed_ptr + row_start + j[None, :], packed)
    q = row * (T // G) * D + group * D + col
    tl.store(scale_ptr + q, scale)
    tl.store(zero_ptr + q, zero)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(shape: torch.Size, spec: QuantSpec) -> bool:
    """Whether :func:`quantize_pack` takes this shape (Triton tiles need power-of-two extents)."""
    tokens, head_dim = shape[-2], shape[-1]
    if not spec.is_quantized or spec.is_engine:
        return False
    per_byte = 8 if len(PLANES[spec.bits]) > 1 else 8 // spec.bits
    try:
        check_shape(tokens, head_dim, spec)
    except ValueError:
        return False
    extent = spec.group_size if spec.mode == "per-token" else head_dim
    return _is_pow2(spec.group_size) and _is_pow2(head_dim) and extent % per_byte == 0


def quantize_pack(x: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Triton twin of :func:`kvtune.quant.quantize`: same packed codes, scales and zeros."""
    if not supports(x.shape, spec):
        check_shape(x.shape[-2], x.shape[-1], spec)  # the reference's own message where it applies
        raise ValueError(f"quantize_pack needs power-of-two head_dim and group_size, got {tuple(x.shape)} with {spec}")
    lead, (tokens, head_dim) = x.shape[:-2], x.shape[-2:]
    rows = x.reshape(-1, tokens, head_dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    n = rows.shape[0]
    packed = torch.empty(n, tokens, head_dim * spec.bits // 8, dtype=torch.uint8, device=x.device)
    if spec.mode == "per-token":
        qshape = (n, tokens, head_dim // spec.group_size)
    else:
        qshape = (n, tokens // spec.group_size, head_dim)
    scale = torch.empty(qshape, dtype=SCALE_DTYPE, device=x.device)
    zero = torch.empty(qshape, dtype=SCALE_DTYPE, device=x.device)
    if n and tokens:
        common = (rows, packed, scale, zero, tokens, rows.stride(0), rows.stride(1))
        if spec.mode == "per-token":
            block_t = 16
            grid = (n, triton.cdiv(tokens, block_t), head_dim // spec.group_size)
            _quantize_per_token_kernel[grid](*common, BITS=spec.bits, G=spec.group_size, D=head_dim, BLOCK_T=block_t)
        else:
            grid = (n, tokens // spec.group_size)
            _quantize_per_channel_kernel[grid](*common, BITS=spec.bits, G=spec.group_size, D=head_dim)
    unflat = lambda t: t.reshape(*lead, *t.shape[-2:])  # noqa: E731
    return QuantizedTensor(unflat(packed), unflat(scale), unflat(zero), spec, x.dtype)
