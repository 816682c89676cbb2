"""Fused decode attention over the mixed-precision cache's packed K/V (flash-decoding).

Decode reads the whole cache to produce one token, so its cost is the bytes it reads. This kernel
reads K and V in their stored form (packed 8/4/2-bit codes, fp16 scale and zero, plus the
full-precision residual tail), dequantizes in registers and never writes a dequantized copy.

Layout of the work:

* one program per (batch, KV head, split of the tokens): all query heads that share the KV head
  (GQA) and all query tokens of the step are the rows of one tile, so K/V are read once per KV head;
* each program walks its tokens in ``BLOCK_N`` blocks with an online softmax and writes an
  unnormalised partial (acc, max, sum); a second small kernel merges the splits (split-K), which
  keeps all SMs busy at batch 1 on long contexts;
* token ``i`` of K comes from the packed prefix if ``i < quantized tokens of K`` and from the tail
  otherwise; V has its own count (per-channel keys are quantized in whole groups, per-token values
  one token at a time), its own bit width and mode.

Query token ``j`` of ``Lq`` sits at position ``T - Lq + j`` and sees keys up to it (causal within
the step); an optional boolean key mask (batch, T) drops padding.

:func:`decode_attention_reference` is the plain-PyTorch path the kernel is tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvtune.quant import QuantizedTensor

LOG2E = 1.4426950408889634


@triton.jit
def _load_tile(
    packed_ptr, scale_ptr, zero_ptr, tail_ptr,
    stride_pt, stride_st, stride_tt,
    offs_n, offs_d, n_quant, n_total,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
):
    """(BLOCK_N, BLOCK_D) float32 K or V for tokens ``offs_n``: dequantized prefix, then the tail."""
    dmask = offs_d[None, :] < D
    in_tail = (offs_n >= n_quant) & (offs_n < n_total)
    tail_rows = (offs_n - n_quant).to(tl.int64)
    x = tl.load(tail_ptr + tail_rows[:, None] * stride_tt + offs_d[None, :], mask=in_tail[:, None] & dmask, other=0.0)
    x = x.to(tl.float32)
    if BITS < 16:
        in_q = offs_n < n_quant
        qmask = in_q[:, None] & dmask
        rows = offs_n.to(tl.int64)
        code = _gather_codes(packed_ptr + rows[:, None] * stride_pt, offs_d, qmask, D, BITS)
        if PER_CHANNEL:
            q = (rows // G)[:, None] * stride_st + offs_d[None, :]
        else:
            q = rows[:, None] * stride_st + (offs_d // G)[None, :]
        scale = tl.load(scale_ptr + q, mask=qmask, other=0.0).to(tl.float32)
        zero = tl.load(zero_ptr + q, mask=qmask, other=0.0).to(tl.float32)
        x = tl.where(in_q[:, None], code.to(tl.float32) * scale + zero, x)
    return x


@triton.jit
def _plane_codes(row_ptr, offs_d, mask, START: tl.constexpr, WIDTH: tl.constexpr):
    """Codes of one bit plane (``WIDTH`` bits each, packed from byte ``START`` of every row);
    ``mask`` None for whole blocks, whose loads stay unmasked."""
    PER_BYTE: tl.constexpr = 8 // WIDTH
    ptrs = row_ptr + START + (offs_d // PER_BYTE)[None, :]
    if mask is None:
        byte = tl.load(ptrs).to(tl.int32)
    else:
        byte = tl.load(ptrs, mask=mask, other=0).to(tl.int32)
    return (byte >> ((offs_d % PER_BYTE) * WIDTH)[None, :]) & ((1 << WIDTH) - 1)


@triton.jit
def _gather_codes(row_ptr, offs_d, mask, D: tl.constexpr, BITS: tl.constexpr):
    """(rows, channels) int32 codes, each channel loading its own byte of every plane (kvtune.quant.PLANES:
    3 = 2+1, 5 = 4+1, 6 = 4+2 bits, the low plane first)."""
    if BITS == 3:
        codes = _plane_codes(row_ptr, offs_d, mask, 0, 2) | (_plane_codes(row_ptr, offs_d, mask, D // 4, 1) << 2)
    elif BITS == 5:
        codes = _plane_codes(row_ptr, offs_d, mask, 0, 4) | (_plane_codes(row_ptr, offs_d, mask, D // 2, 1) << 4)
    elif BITS == 6:
        codes = _plane_codes(row_ptr, offs_d, mask, 0, 4) | (_plane_codes(row_ptr, offs_d, mask, D // 2, 2) << 4)
    else:
        codes = _plane_codes(row_ptr, offs_d, mask, 0, BITS)
    return codes


@triton.jit
def _unpack(packed, BITS: tl.constexpr):
    """(N, D·BITS/8) bytes → (N, D) int32 codes in channel order (lowest bits hold the first channel)."""
    b = packed.to(tl.int32)
    MASK: tl.constexpr = (1 << BITS) - 1
    if BITS == 8:
        codes = b
    elif BITS == 4:
        codes = tl.interleave(b & MASK, (b >> 4) & MASK)
    else:
        codes = tl.interleave(tl.interleave(b & MASK, (b >> 4) & MASK), tl.interleave((b >> 2) & MASK, (b >> 6) & MASK))
    return codes


@triton.jit
def _load_codes(packed_ptr, rows, stride_pt, D: tl.constexpr, BITS: tl.constexpr, GATHER: tl.constexpr):
    """(len(rows), D) int32 codes of a block of packed rows."""
    # Plane widths (3, 5, 6 bits) are gathered: a whole-row unpack of two planes is not written yet.
    if GATHER or BITS == 3 or BITS == 5 or BITS == 6:  # each channel loads its own byte(s) and shifts
        offs_d = tl.arange(0, D)
        codes = _gather_codes(packed_ptr + rows[:, None] * stride_pt, offs_d, None, D, BITS)
    else:  # whole-row byte loads, unpacked by shifts and interleaving
        offs_b = tl.arange(0, D * BITS // 8)
        codes = _unpack(tl.load(packed_ptr + rows[:, None] * stride_pt + offs_b[None, :]), BITS)
    return codes


@triton.jit
def _codes_as(codes, DTYPE: tl.constexpr):
    """int32 codes (< 256) as ``DTYPE``, exactly. For fp16 and fp32 by the magic-number trick: OR the
    code into the mantissa of 1024 (2^23 for fp32) and subtract it again, which is integer and
    add work the full-rate pipes do, instead of int-to-float conversions, a slower pipe on GPUs."""
    if DTYPE == tl.float16:
        x = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
    else:  # fp32, and bf16 through fp32 (its 8-bit significand holds every code)
        x = ((codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0).to(DTYPE)
    return x


@triton.jit
def _whole_block(
    packed_ptr, scale_ptr, zero_ptr, tail_ptr, stride_pt, stride_st, stride_tt, n0,
    BITS: tl.constexpr, PER_CHANNEL: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
    DTYPE: tl.constexpr, GATHER_CODES: tl.constexpr, GATHER_SCALES: tl.constexpr,
):
    """K or V for ``BLOCK_N`` tokens from ``n0`` that all lie in the packed prefix (or all in an
    unquantized stream): whole-row loads, no per-element masks, unpacking by shifts. Dequantized
    in ``DTYPE`` (fp16 for fp16 models: one rounding, as the reference's cast back to fp16)."""
    rows = tl.arange(0, BLOCK_N).to(tl.int64) + n0
    offs_d = tl.arange(0, D)
    if BITS == 16:
        x = tl.load(tail_ptr + rows[:, None] * stride_tt + offs_d[None, :]).to(DTYPE)
    else:
        codes = _codes_as(_load_codes(packed_ptr, rows, stride_pt, D, BITS, GATHER_CODES), DTYPE)
        if PER_CHANNEL:
            if G % BLOCK_N == 0:  # the block sits inside one group: one scale row for all its tokens
                q = (n0 // G) * stride_st + offs_d
                scale = tl.load(scale_ptr + q).to(DTYPE)[None, :]
                zero = tl.load(zero_ptr + q).to(DTYPE)[None, :]
            else:
                q = (rows // G)[:, None] * stride_st + offs_d[None, :]
                scale = tl.load(scale_ptr + q).to(DTYPE)
                zero = tl.load(zero_ptr + q).to(DTYPE)
        elif GATHER_SCALES:  # a few scales per token, each channel loads its group's
            q = rows[:, None] * stride_st + (offs_d // G)[None, :]
            scale = tl.load(scale_ptr + q).to(DTYPE)
            zero = tl.load(zero_ptr + q).to(DTYPE)
        else:  # a few scales per token, broadcast over their groups of channels
            NG: tl.constexpr = D // G
            q = rows[:, None] * stride_st + tl.arange(0, NG)[None, :]
            scale = tl.reshape(tl.broadcast_to(tl.load(scale_ptr + q).to(DTYPE)[:, :, None], (BLOCK_N, NG, G)), (BLOCK_N, D))
            zero = tl.reshape(tl.broadcast_to(tl.load(zero_ptr + q).to(DTYPE)[:, :, None], (BLOCK_N, NG, G)), (BLOCK_N, D))
        x = codes * scale + zero
    return x


@triton.jit
def _folded_key_scores(q, packed_ptr, scale_ptr, zero_ptr, stride_pt, stride_st, n0,
                       BITS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, GATHER_CODES: tl.constexpr):
    """q·k for a block of per-channel keys inside one group, without dequantizing K:
    q·(c⊙s + z) = (q⊙s)·c + q·z, so the codes go to the dot as they are."""
    rows = tl.arange(0, BLOCK_N).to(tl.int64) + n0
    codes = _codes_as(_load_codes(packed_ptr, rows, stride_pt, D, BITS, GATHER_CODES), q.dtype)
    offs_q = (n0 // G) * stride_st + tl.arange(0, D)
    qf = q.to(tl.float32)
    scaled_q = (qf * tl.load(scale_ptr + offs_q).to(tl.float32)[None, :]).to(q.dtype)
    bias = tl.sum(qf * tl.load(zero_ptr + offs_q).to(tl.float32)[None, :], axis=1)
    return tl.dot(scaled_q, tl.trans(codes), input_precision=DOT_PRECISION) + bias[:, None]


@triton.jit
def _online_softmax_step(scores, v, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    s = tl.where(visible, scores * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_split_kernel(
    q_ptr, acc_ptr, m_ptr, l_ptr,
    kp_ptr, ks_ptr, kz_ptr, kt_ptr,
    vp_ptr, vs_ptr, vz_ptr, vt_ptr,
    mask_ptr,
    stride_qb, stride_qh, stride_ql,
    stride_kpb, stride_kph, stride_kpt, stride_ksb, stride_ksh, stride_kst, stride_ktb, stride_kth, stride_ktt,
    stride_vpb, stride_vph, stride_vpt, stride_vsb, stride_vsh, stride_vst, stride_vtb, stride_vth, stride_vtt,
    stride_mb,
    n_quant_k, n_quant_v, n_total, n_whole, tokens_per_split, num_splits, qk_scale,
    HKV: tl.constexpr, GROUP: tl.constexpr, LQ: tl.constexpr, D: tl.constexpr,
    K_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, KG: tl.constexpr,
    V_BITS: tl.constexpr, V_PER_CHANNEL: tl.constexpr, VG: tl.constexpr,
    HAS_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr, DEQUANT_DTYPE: tl.constexpr,
    GATHER_CODES: tl.constexpr, GATHER_SCALES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = (pid_bh % HKV).to(tl.int64)

    rows = tl.arange(0, BLOCK_M)
    head = h * GROUP + rows // LQ
    qi = rows % LQ
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < GROUP * LQ
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_ql + offs_d[None, :],
        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0,
    )
    position = n_total - LQ + qi

    kp, ks, kz, kt = (kp_ptr + b * stride_kpb + h * stride_kph, ks_ptr + b * stride_ksb + h * stride_ksh,
                      kz_ptr + b * stride_ksb + h * stride_ksh, kt_ptr + b * stride_ktb + h * stride_kth)
    vp, vs, vz, vt = (vp_ptr + b * stride_vpb + h * stride_vph, vs_ptr + b * stride_vsb + h * stride_vsh,
                      vz_ptr + b * stride_vsb + h * stride_vsh, vt_ptr + b * stride_vtb + h * stride_vth)

    # A finite floor instead of -inf keeps exp2(m_old - m_new) defined for rows with nothing visible yet.
    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, n_total)

    # Blocks wholly inside both packed prefixes (the bulk of a long context): the fast path.
    whole_end = tl.minimum(end, n_whole)
    for n0 in range(start, whole_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        if K_BITS < 16 and K_PER_CHANNEL and KG % BLOCK_N == 0:
            scores = _folded_key_scores(q, kp, ks, kz, stride_kpt, stride_kst, n0, K_BITS, KG, D, BLOCK_N, DOT_PRECISION,
                                        GATHER_CODES)
        else:
            k = _whole_block(kp, ks, kz, kt, stride_kpt, stride_kst, stride_ktt, n0, K_BITS, K_PER_CHANNEL, KG, D, BLOCK_N,
                             DEQUANT_DTYPE, GATHER_CODES, GATHER_SCALES)
            scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        v = _whole_block(vp, vs, vz, vt, stride_vpt, stride_vst, stride_vtt, n0, V_BITS, V_PER_CHANNEL, VG, D, BLOCK_N,
                         DEQUANT_DTYPE, GATHER_CODES, GATHER_SCALES).to(q.dtype)
        visible = offs_n[None, :] <= position[:, None]
        if HAS_MASK:
            visible = visible & (tl.load(mask_ptr + b * stride_mb + offs_n)[None, :] != 0)
        m_i, l_i, acc = _online_softmax_step(scores, v, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    # The rest: where the prefixes end, the residual tails, a ragged last block. A few blocks at
    # most, so not pipelined: its staging buffers would cost every program ~40 KB of shared
    # memory and with it resident programs per SM (benchmarks/kernel_static.py).
    for n0 in tl.range(tl.maximum(start, whole_end), end, BLOCK_N, num_stages=1):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = _load_tile(kp, ks, kz, kt, stride_kpt, stride_kst, stride_ktt, offs_n, offs_d, n_quant_k, n_total,
                       K_BITS, K_PER_CHANNEL, KG, D)
        v = _load_tile(vp, vs, vz, vt, stride_vpt, stride_vst, stride_vtt, offs_n, offs_d, n_quant_v, n_total,
                       V_BITS, V_PER_CHANNEL, VG, D).to(q.dtype)
        scores = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
        visible = (offs_n[None, :] < end) & (offs_n[None, :] <= position[:, None])
        if HAS_MASK:
            keep = tl.load(mask_ptr + b * stride_mb + offs_n, mask=offs_n < end, other=0)
            visible = visible & (keep[None, :] != 0)
        m_i, l_i, acc = _online_softmax_step(scores, v, visible, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    part = pid_bh.to(tl.int64) * num_splits + split
    tl.store(m_ptr + part * BLOCK_M + rows, m_i)
    tl.store(l_ptr + part * BLOCK_M + rows, l_i)
    tl.store(acc_ptr + (part * BLOCK_M + rows[:, None]) * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _combine_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr,
    stride_ob, stride_oh, stride_ol, num_splits,
    HKV: tl.constexpr, GROUP: tl.constexpr, LQ: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    row = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    ok = splits < num_splits
    part = pid_bh.to(tl.int64) * num_splits + splits
    m = tl.load(m_ptr + part * BLOCK_M + row, mask=ok, other=-1.0e30)
    l = tl.load(l_ptr + part * BLOCK_M + row, mask=ok, other=0.0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(acc_ptr + (part[:, None] * BLOCK_M + row) * BLOCK_D + offs_d[None, :], mask=ok[:, None], other=0.0)
    weight = tl.where(ok, tl.math.exp2(m - tl.max(m, axis=0)), 0.0)
    total = tl.sum(weight * l, axis=0)
    out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0, total, 1.0)
    b = (pid_bh // HKV).to(tl.int64)
    head = (pid_bh % HKV) * GROUP + row // LQ
    tl.store(out_ptr + b * stride_ob + head * stride_oh + (row % LQ) * stride_ol + offs_d, out, mask=offs_d < D)


def _stream_args(quantized: QuantizedTensor | None, tail: torch.Tensor | None, anchor: torch.Tensor):
    """Pointers, strides and constexprs for one of K/V; absent parts become never-read placeholders."""
    dummy = anchor
    if tail is None:
        tail, tail_strides = dummy, (0, 0, 0)
    else:
        assert tail.stride(-1) == 1, "the tail's head_dim must be contiguous"
        tail_strides = (tail.stride(0), tail.stride(1), tail.stride(2))
    if quantized is None:
        return (dummy, dummy, dummy, tail), (0, 0, 0, 0, 0, 0) + tail_strides, 0, dict(BITS=16, PER_CHANNEL=False, G=1)
    p, s, z = quantized.packed, quantized.scale, quantized.zero
    assert p.stride(-1) == 1 and s.stride() == z.stride() and s.stride(-1) == 1, "packed storage must be contiguous"
    strides = (p.stride(0), p.stride(1), p.stride(2), s.stride(0), s.stride(1), s.stride(2)) + tail_strides
    spec = quantized.spec
    return (p, s, z, tail), strides, quantized.num_tokens, dict(
        BITS=spec.bits, PER_CHANNEL=spec.mode == "per-channel", G=spec.group_size
    )


def stream_tokens(stream: tuple[QuantizedTensor | None, torch.Tensor | None]) -> int:
    """Tokens held by a (quantized prefix, tail) stream."""
    quantized, tail = stream
    return (quantized.num_tokens if quantized is not None else 0) + (tail.shape[-2] if tail is not None else 0)


def _whole_tokens(meta: dict, n_quant: int, n_total: int, head_dim: int, block_n: int) -> int:
    """Leading tokens the fast path may read in whole blocks (0 where its tiling does not apply)."""
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    if not pow2(head_dim) or head_dim < 16:
        return 0
    if meta["BITS"] == 16:
        return n_total // block_n * block_n
    if not pow2(meta["G"]) or (not meta["PER_CHANNEL"] and meta["G"] > head_dim):
        return 0
    return n_quant // block_n * block_n


def _default_splits(batch_heads: int, tokens: int, block_n: int, device: torch.device) -> int:
    blocks = triton.cdiv(tokens, block_n)
    if device.type != "cuda":
        return min(blocks, 4)  # the interpreter: a few splits still exercise the merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(blocks, triton.cdiv(4 * sms, batch_heads)))


def _block_m(group: int, q_len: int) -> int:
    return max(16, triton.next_power_of_2(group * q_len))  # tl.dot needs 16 rows at least


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def split_kernel_constexprs(k_meta: dict, v_meta: dict, kv_heads: int, group: int, q_len: int, head_dim: int,
                            dtype: torch.dtype, has_mask: bool, block_n: int, gather_codes: bool, gather_scales: bool) -> dict:
    """The compile-time arguments of ``_decode_split_kernel`` for one launch."""
    return dict(
        HKV=kv_heads, GROUP=group, LQ=q_len, D=head_dim,
        K_BITS=k_meta["BITS"], K_PER_CHANNEL=k_meta["PER_CHANNEL"], KG=k_meta["G"],
        V_BITS=v_meta["BITS"], V_PER_CHANNEL=v_meta["PER_CHANNEL"], VG=v_meta["G"],
        HAS_MASK=has_mask, DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
        DEQUANT_DTYPE=tl.float16 if dtype == torch.float16 else tl.float32,
        GATHER_CODES=gather_codes, GATHER_SCALES=gather_scales,
        BLOCK_M=_block_m(group, q_len), BLOCK_N=block_n, BLOCK_D=_block_d(head_dim),
    )


@dataclass
class SplitLaunch:
    """One launch of ``_decode_split_kernel``: what ``decode_attention`` runs, and what
    benchmarks/kernel_static.py compiles for a GPU it does not have (same arguments, so the same
    specialisation: which integers Triton may assume divisible by 16)."""

    grid: tuple[int, int]
    args: tuple
    constexprs: dict
    options: dict
    partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # acc, m, l: the combine kernel's input


def plan_split_launch(
    query: torch.Tensor,
    key: tuple[QuantizedTensor | None, torch.Tensor | None],
    value: tuple[QuantizedTensor | None, torch.Tensor | None],
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    gather_codes: bool = False,
    gather_scales: bool = True,
) -> SplitLaunch:
    """Check the inputs of :func:`decode_attention` and lay out its first kernel's launch."""
    batch, q_heads, q_len, head_dim = query.shape
    (kq, kt), (vq, vt) = key, value
    k_tokens, v_tokens = stream_tokens(key), stream_tokens(value)
    if k_tokens != v_tokens:
        raise ValueError(f"K holds {k_tokens} tokens but V holds {v_tokens}")
    if k_tokens < q_len:
        raise ValueError(f"{q_len} query tokens need at least as many cached tokens, found {k_tokens}")
    kv_heads = next(t.shape[1] for t in (kt, kq.packed if kq is not None else None) if t is not None)
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads cannot share {kv_heads} KV heads")
    assert query.stride(-1) == 1
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    k_ptrs, k_strides, k_quant, k_meta = _stream_args(kq, kt, query)
    v_ptrs, v_strides, v_quant, v_meta = _stream_args(vq, vt, query)
    quantized = k_meta["BITS"] < 16 or v_meta["BITS"] < 16
    # Launch defaults: the setting with the lowest summed K4V4 + K2V2 time over batch 1 and 8 at 32K
    # in benchmarks/decode_sweep.py on an H100 (results/decode_sweep_nvidia-h100-80gb-hbm3.jsonl).
    block_n = block_n or 64
    num_warps = num_warps or (2 if quantized else 4)
    num_stages = num_stages or 2
    n_whole = _whole_tokens(k_meta, k_quant, k_tokens, head_dim, block_n)
    n_whole = min(n_whole, _whole_tokens(v_meta, v_quant, k_tokens, head_dim, block_n))
    constexprs = split_kernel_constexprs(k_meta, v_meta, kv_heads, group, q_len, head_dim, query.dtype,
                                         key_mask is not None, block_n, gather_codes, gather_scales)
    block_m, block_d = constexprs["BLOCK_M"], constexprs["BLOCK_D"]
    splits = num_splits or _default_splits(batch * kv_heads, k_tokens, block_n, query.device)
    per_split = triton.cdiv(triton.cdiv(k_tokens, splits), block_n) * block_n
    splits = triton.cdiv(k_tokens, per_split)

    f32 = dict(dtype=torch.float32, device=query.device)
    acc = torch.empty(batch * kv_heads, splits, block_m, block_d, **f32)
    m = torch.empty(batch * kv_heads, splits, block_m, **f32)
    l = torch.empty(batch * kv_heads, splits, block_m, **f32)
    if key_mask is not None:
        key_mask = key_mask.to(device=query.device, dtype=torch.int8).contiguous()
        assert key_mask.shape == (batch, k_tokens), f"key_mask must be (batch, tokens) = {(batch, k_tokens)}"
    mask_arg = key_mask if key_mask is not None else query
    args = (
        query, acc, m, l, *k_ptrs, *v_ptrs, mask_arg,
        query.stride(0), query.stride(1), query.stride(2), *k_strides, *v_strides,
        key_mask.stride(0) if key_mask is not None else 0,
        k_quant, v_quant, k_tokens, n_whole, per_split, splits, scale * LOG2E,
    )
    return SplitLaunch((batch * kv_heads, splits), args, constexprs, dict(num_warps=num_warps, num_stages=num_stages),
                       (acc, m, l))


def decode_attention(
    query: torch.Tensor,
    key: tuple[QuantizedTensor | None, torch.Tensor | None],
    value: tuple[QuantizedTensor | None, torch.Tensor | None],
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    gather_codes: bool = False,
    gather_scales: bool = True,
) -> torch.Tensor:
    """Attention of ``query`` (B, Hq, Lq, D) over a cache stream pair, as the cache stores them.

    ``key`` and ``value`` are each ``(quantized prefix or None, full-precision tail or None)``
    with tokens on dim -2, shapes (B, Hkv, ·, ·); prefix + tail lengths must agree between K and V.
    ``key_mask`` (B, T), true where a key may be attended, drops padding. Returns (B, Hq, Lq, D)
    in the query's dtype. ``block_n``, ``num_warps``, ``num_stages``, ``gather_codes`` and
    ``gather_scales`` are launch variants (same result) compared by benchmarks/decode_sweep.py.
    """
    launch = plan_split_launch(query, key, value, scale, key_mask, num_splits, block_n, num_warps, num_stages,
                               gather_codes, gather_scales)
    _decode_split_kernel[launch.grid](*launch.args, **launch.constexprs, **launch.options)
    acc, m, l = launch.partials
    splits, c = launch.grid[1], launch.constexprs
    out = torch.empty_like(query)
    _combine_kernel[(launch.grid[0], c["GROUP"] * c["LQ"])](
        acc, m, l, out, out.stride(0), out.stride(1), out.stride(2), splits,
        HKV=c["HKV"], GROUP=c["GROUP"], LQ=c["LQ"], D=c["D"],
        BLOCK_M=c["BLOCK_M"], BLOCK_D=c["BLOCK_D"], BLOCK_S=max(2, triton.next_power_of_2(splits)),
    )
    return out


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def _materialize(quantized: QuantizedTensor | None, tail: torch.Tensor | None) -> torch.Tensor:
    parts = ([quantized.dequantize().float()] if quantized is not None else []) + ([tail.float()] if tail is not None else [])
    return torch.cat(parts, dim=-2)


def decode_attention_reference(
    query: torch.Tensor,
    key: tuple[QuantizedTensor | None, torch.Tensor | None],
    value: tuple[QuantizedTensor | None, torch.Tensor | None],
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch: dequantize everything, then masked softmax attention in float32."""
    k, v = _materialize(*key), _materialize(*value)
    group = query.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q_len, tokens = query.shape[-2], k.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query.float() @ k.transpose(-1, -2) * scale
    positions = torch.arange(tokens - q_len, tokens, device=query.device)
    visible = torch.arange(tokens, device=query.device)[None, :] <= positions[:, None]  # (Lq, T)
    visible = visible[None, None]
    if key_mask is not None:
        visible = visible & key_mask.bool()[:, None, None, :]
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return (weights @ v).to(query.dtype)
