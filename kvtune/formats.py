"""KV formats that serving engines store natively: the plain-PyTorch reference for each.

==========  =========================================================  ============  ==============
format      stored as                                                  nominal bits  bits / element
==========  =========================================================  ============  ==============
``fp8``     E4M3 values, one fp32 scale per tensor (or per KV head)     8             8 (+ the scale)
``fp8_e4m3``  E4M3 values, unit scale (vLLM's fp8 / fp8_e4m3 cache when  8             8
            the checkpoint holds no KV scales)
``fp8_e5m2``  E5M2 values, unit scale (vLLM's fp8_e5m2 cache)            8             8
``nvfp4``   E2M1 values in blocks of 16 along head_dim, an E4M3         4             4.5 (+ 32 bits
            scale per block, one fp32 scale per tensor                                per tensor)
``q8_0``    llama.cpp: int8 in blocks of 32, fp16 scale                 8             8.5
``q4_0``    llama.cpp: 4-bit in blocks of 32, fp16 scale (symmetric)    4             4.5
``q4_1``    llama.cpp: 4-bit in blocks of 32, fp16 scale and minimum    4             5
``q5_0``    llama.cpp: 5-bit in blocks of 32, fp16 scale (symmetric)    5             5.5
``q5_1``    llama.cpp: 5-bit in blocks of 32, fp16 scale and minimum    5             6
``int8_per_token_head``  vLLM: int8, one fp32 absmax scale per token    8             8 + 32 / head_dim
            and KV head
``fp8_per_token_head``   vLLM: E4M3, one fp32 absmax scale per token    8             8 + 32 / head_dim
            and KV head
``int4_per_token_head``  vLLM: randomized-Hadamard-rotated 4-bit        4             4 + 32 / head_dim
            asymmetric codes, one fp32 scale per token and KV head with
            the 4-bit zero point in its low mantissa bits
==========  =========================================================  ============  ==============

Each format is one function ``quantize(x) -> (codes, scales…)`` and one ``dequantize``; the
llama.cpp ones follow ``quantize_row_q*_ref`` in ggml-quants.c step for step (float32 arithmetic,
``roundf`` rounding half away from zero, the scale rounded to fp16 after the codes are chosen).
FP8 and NVFP4 scale by a per-tensor constant per layer, as engines store it: the amax of K (of V)
over calibration text (:mod:`kvtune.profiling.calibrate`; ModelOpt's max calibration), kept in
the plan, or the unit scale when there is none. Released vLLM reads that constant from the
checkpoint (ModelOpt writes it) and uses 1.0 when the checkpoint has none: ``fp8_e4m3`` and ``fp8_e5m2`` are those unit-scale caches, values saturated
at the format's largest finite value and rounded to nearest even as vLLM's conversion does.
Engines keep no full-precision window: every cached token is stored in the format.

vLLM's ``*_per_token_head`` caches follow its Triton store kernels step for step
(``triton_reshape_and_cache_flash.py``, ``int4_per_token_head.py``): float32 arithmetic, the
scale ``max(amax / QMAX, 1e-6)``, multiplication by its reciprocal, halves rounded away from zero.
Each token's scale comes from that token alone, so they are causal and batch-independent as stored.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from kvtune import turboquant

E4M3_MAX = 448.0
E5M2_MAX = 57344.0
E2M1_MAX = 6.0
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

# vLLM's caches with one fp32 scale per (token, KV head), stored beside the codes.
PER_TOKEN_HEAD = {"int8_per_token_head": 8, "fp8_per_token_head": 8, "int4_per_token_head": 4}
# vLLM's TurboQuant presets store K and V with different codecs (kvtune.turboquant); each codec is a
# format of its own, named by the preset whose codec it is: keys FP8 (k8) or Lloyd-Max codes of the
# Hadamard-rotated unit key with an fp16 norm (k4, k3; decode renormalises the centroids), values
# uniform per token and head with fp16 scale and minimum (v4, v3).
TURBOQUANT_KEYS = {"turboquant_k8": "turboquant_k8v4", "turboquant_k4": "turboquant_4bit_nc", "turboquant_k3": "turboquant_k3v4_nc"}
TURBOQUANT_VALUES = {"turboquant_v4": "turboquant_k8v4", "turboquant_v3": "turboquant_3bit_nc"}
TURBOQUANT = {"turboquant_k8": 8, "turboquant_k4": 4, "turboquant_k3": 3, "turboquant_v4": 4, "turboquant_v3": 3}
ENGINE_FORMATS = {"fp8": 8, "fp8_e4m3": 8, "fp8_e5m2": 8, "nvfp4": 4, "q8_0": 8, "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5,
                  **PER_TOKEN_HEAD, **TURBOQUANT}  # name -> nominal bits
BLOCK = {"fp8": None, "fp8_e4m3": None, "fp8_e5m2": None, "nvfp4": 16, "q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32,
         **{name: None for name in PER_TOKEN_HEAD}, **{name: None for name in TURBOQUANT}}
# Formats stored per token and KV head (a scale or norm each): QuantSpec mode "per-token-head".
TOKEN_HEAD_FORMATS = (*PER_TOKEN_HEAD, *TURBOQUANT)


def _blocks(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] % size:
        raise ValueError(f"head_dim {x.shape[-1]} is not a multiple of the format's block of {size}")
    return x.float().unflatten(-1, (-1, size))


def _roundf(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: halves away from zero (torch.round goes to even); also vLLM's (x ± 0.5) then truncation."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def _safe_inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d != 0, 1.0 / torch.where(d != 0, d, torch.ones_like(d)), torch.zeros_like(d))


# ---- FP8 E4M3 ----------------------------------------------------------------------------------


def fp8_scale(x: torch.Tensor, per_head: bool = False, amax=None) -> torch.Tensor:
    """fp32 scale so that ``amax`` (a calibrated constant: a number, or one per KV head) maps to
    E4M3's largest value; without one, the tensor's (or each head's) own amax."""
    if amax is not None:
        amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device)
        amax = amax.reshape(-1, 1, 1) if amax.ndim else amax.reshape(1)
    else:
        amax = x.float().abs().amax(dim=(-2, -1), keepdim=True) if per_head else x.float().abs().amax().reshape(1)
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def fp8_fake(x: torch.Tensor, per_head: bool = False, amax=None) -> torch.Tensor:
    scale = fp8_scale(x, per_head, amax)
    codes = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return (codes.float() * scale).to(x.dtype)


# torch dtype, largest finite value, mantissa bits, smallest normal value
_UNIT_SCALE_FP8 = {"fp8_e4m3": (torch.float8_e4m3fn, E4M3_MAX, 3, 2.0**-6), "fp8_e5m2": (torch.float8_e5m2, E5M2_MAX, 2, 2.0**-14)}
# How an engine build rounds into its unit-scale FP8 cache: to nearest even (vLLM's CUDA kernels,
# torch), or toward zero (vLLM's CPU kernels: measured bit for bit against its cpu_attn_reshape_and_cache).
FP8_ROUNDING = contextvars.ContextVar("FP8_ROUNDING", default="nearest")


@contextlib.contextmanager
def fp8_rounding(mode: str):
    """Simulate the unit-scale FP8 formats with ``mode`` ("nearest" or "toward-zero") inside the block."""
    if mode not in ("nearest", "toward-zero"):
        raise ValueError(f"unknown FP8 rounding {mode!r}")
    token = FP8_ROUNDING.set(mode)
    try:
        yield
    finally:
        FP8_ROUNDING.reset(token)


def fp8_unit_fake(x: torch.Tensor, name: str) -> torch.Tensor:
    """vLLM's FP8 cache with its default scale of 1.0: saturate, round to an FP8 value."""
    dtype, largest, mantissa, smallest_normal = _UNIT_SCALE_FP8[name]
    y = x.float().clamp(-largest, largest)
    if FP8_ROUNDING.get() == "toward-zero":
        # Drop the float32 mantissa bits FP8 lacks; below the normal range, whole subnormal steps.
        normal = (y.view(torch.int32) & ~((1 << (23 - mantissa)) - 1)).view(torch.float32)
        step = smallest_normal * 2.0**-mantissa
        y = torch.where(y.abs() < smallest_normal, torch.trunc(y / step) * step, normal)
    return y.to(dtype).float().to(x.dtype)


# ---- NVFP4 -------------------------------------------------------------------------------------


def e2m1_round(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value (sign kept, magnitude clamped to 6); a tie goes to the even code."""
    grid = E2M1_GRID.to(y.device)
    mag = y.abs().clamp(max=E2M1_MAX).contiguous()
    upper = torch.bucketize(mag, grid).clamp(1, len(grid) - 1)  # grid[upper-1] <= mag <= grid[upper]
    lo, hi = grid[upper - 1], grid[upper]
    pick_hi = (hi - mag < mag - lo) | ((hi - mag == mag - lo) & (upper % 2 == 0))
    return torch.sign(y) * torch.where(pick_hi, hi, lo)


def nvfp4_quantize(x: torch.Tensor, amax=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E2M1 values as float, E4M3 block scales, fp32 tensor scale); the tensor scale maps ``amax``
    (a calibrated constant; default the tensor's own) to E2M1's largest value times E4M3's."""
    blocks = _blocks(x, 16)
    amax = blocks.abs().amax() if amax is None else torch.tensor(float(amax), device=x.device)
    tensor_scale = torch.where(amax > 0, amax / (E2M1_MAX * E4M3_MAX), torch.ones_like(amax)).reshape(1)
    block_scale = (blocks.abs().amax(-1, keepdim=True) / E2M1_MAX / tensor_scale).to(torch.float8_e4m3fn)
    step = block_scale.float() * tensor_scale
    values = e2m1_round(blocks * _safe_inverse(step))
    return values, block_scale, tensor_scale


def nvfp4_dequantize(values, block_scale, tensor_scale, dtype=torch.float32) -> torch.Tensor:
    return (values * block_scale.float() * tensor_scale).flatten(-2).to(dtype)


def nvfp4_fake(x: torch.Tensor, amax=None) -> torch.Tensor:
    return nvfp4_dequantize(*nvfp4_quantize(x, amax), dtype=x.dtype)


# ---- llama.cpp block formats --------------------------------------------------------------------


def q8_0_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = _blocks(x, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127.0
    codes = _roundf(blocks * _safe_inverse(d)).to(torch.int8)
    return codes, d.to(torch.float16)


def q8_0_dequantize(codes, d, dtype=torch.float32) -> torch.Tensor:
    return (codes.float() * d.float()).flatten(-2).to(dtype)


def _symmetric_quantize(x: torch.Tensor, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q4_0 (``half`` 8) and q5_0 (16): the signed value of largest magnitude (the first one on a
    tie, as the C loop keeps it) maps to code 0, codes 0 .. 2·half − 1 around ``half``."""
    blocks = _blocks(x, 32)
    signed_max = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    d = signed_max / -float(half)
    codes = torch.clamp(torch.trunc(blocks * _safe_inverse(d) + (half + 0.5)), 0, 2 * half - 1).to(torch.uint8)
    return codes, d.to(torch.float16)


def _asymmetric_quantize(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q4_1 (``levels`` 15) and q5_1 (31): the block's minimum and (max − min) / levels."""
    blocks = _blocks(x, 32)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    d = (hi - lo) / float(levels)
    codes = torch.clamp(torch.trunc((blocks - lo) * _safe_inverse(d) + 0.5), 0, levels).to(torch.uint8)
    return codes, d.to(torch.float16), lo.to(torch.float16)


def _asymmetric_dequantize(codes, d, m, dtype=torch.float32) -> torch.Tensor:
    return (codes.float() * d.float() + m.float()).flatten(-2).to(dtype)


def q4_0_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _symmetric_quantize(x, 8)


def q4_0_dequantize(codes, d, dtype=torch.float32) -> torch.Tensor:
    return ((codes.float() - 8.0) * d.float()).flatten(-2).to(dtype)


def q4_1_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _asymmetric_quantize(x, 15)


q4_1_dequantize = _asymmetric_dequantize


def q5_0_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _symmetric_quantize(x, 16)


def q5_0_dequantize(codes, d, dtype=torch.float32) -> torch.Tensor:
    return ((codes.float() - 16.0) * d.float()).flatten(-2).to(dtype)


def q5_1_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _asymmetric_quantize(x, 31)


q5_1_dequantize = _asymmetric_dequantize

# llama.cpp block formats: (quantize, dequantize), and (code bits, scale/minimum bytes) per block of 32.
_BLOCK_CODECS = {"q8_0": (q8_0_quantize, q8_0_dequantize), "q4_0": (q4_0_quantize, q4_0_dequantize),
                 "q4_1": (q4_1_quantize, q4_1_dequantize), "q5_0": (q5_0_quantize, q5_0_dequantize),
                 "q5_1": (q5_1_quantize, q5_1_dequantize)}
_BLOCK_BYTES = {"q8_0": (8, 2), "q4_0": (4, 2), "q4_1": (4, 4), "q5_0": (5, 2), "q5_1": (5, 4)}


# ---- vLLM per-token-head formats -----------------------------------------------------------------


def token_head_scale(x: torch.Tensor, largest: float) -> torch.Tensor:
    """fp32 ``max(amax / largest, 1e-6)`` per token and head (over head_dim), keepdim."""
    return torch.clamp_min(x.float().abs().amax(-1, keepdim=True) / largest, 1e-6)


def int8_per_token_head_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = token_head_scale(x, 127.0)
    codes = _roundf(x.float() * (1.0 / scale)).clamp(-128.0, 127.0).to(torch.int8)
    return codes, scale


def fp8_per_token_head_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = token_head_scale(x, E4M3_MAX)
    return (x.float() * (1.0 / scale)).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


def per_token_head_dequantize(codes, scale, dtype=torch.float32) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


def _largest_power_of_two_divisor(n: int) -> int:
    return n & -n


def rht_signs(block: int) -> torch.Tensor:
    """vLLM's fixed ±1 signs of its randomized Hadamard transform (its seed, its generator)."""
    generator = torch.Generator(device="cpu").manual_seed(0x9E3779B9)
    return 2.0 * torch.bernoulli(torch.full((block,), 0.5), generator=generator) - 1.0


def _hadamard(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized Walsh-Hadamard transform of the last dim (a power of two), as vLLM's CPU butterfly."""
    d, h = x.shape[-1], 1
    while h < d:
        pairs = x.reshape(*x.shape[:-1], d // (2 * h), 2, h)
        x = torch.stack([pairs[..., 0, :] + pairs[..., 1, :], pairs[..., 0, :] - pairs[..., 1, :]], dim=-2).reshape(x.shape)
        h <<= 1
    return x


def rht(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """vLLM's ``single_rht``: H·D·x per block of b (the largest power of two dividing head_dim);
    the inverse is D·H·x. H·H = b·I, so ``rht(rht(x), inverse=True) == b · x``."""
    d = x.shape[-1]
    block = _largest_power_of_two_divisor(d)
    blocks = x.reshape(*x.shape[:-1], d // block, block)
    signs = rht_signs(block).to(x.device, x.dtype)
    out = _hadamard(blocks) * signs if inverse else _hadamard(blocks * signs)
    return out.reshape(x.shape)


def int4_per_token_head_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes 0..15 as uint8, unpacked, in the rotated domain; fp32 scale whose low 4 mantissa bits
    hold the zero point). vLLM rotates in float32 and rounds back to the model dtype first."""
    y = rht(x.float()).to(x.dtype).float()
    lo, hi = y.amin(-1, keepdim=True), y.amax(-1, keepdim=True)
    scale = torch.clamp_min((hi - lo) / 15.0, 1e-6)
    zero = _roundf(-lo / scale).clamp(0.0, 15.0)
    codes = _roundf(y * (1.0 / scale) + zero).clamp(0.0, 15.0).to(torch.uint8)
    packed_scale = ((scale.view(torch.int32) & -16) | zero.to(torch.int32)).view(torch.float32)
    return codes, packed_scale


def int4_per_token_head_dequantize(codes, packed_scale, dtype=torch.float32) -> torch.Tensor:
    """Back to the model's domain: the decode kernel's (code − zero) · scale (zero bits cleared),
    then the inverse rotation, divided by the block b as vLLM divides its output."""
    bits = packed_scale.view(torch.int32)
    zero, scale = (bits & 0xF).float(), (bits & -16).view(torch.float32)
    rotated = (codes.float() - zero) * scale
    return (rht(rotated, inverse=True) / _largest_power_of_two_divisor(codes.shape[-1])).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two codes per byte as vLLM stores them: element 2i in the low nibble, 2i+1 in the high one."""
    return (codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)


_PER_TOKEN_HEAD_CODECS = {
    "int8_per_token_head": (int8_per_token_head_quantize, per_token_head_dequantize),
    "fp8_per_token_head": (fp8_per_token_head_quantize, per_token_head_dequantize),
    "int4_per_token_head": (int4_per_token_head_quantize, int4_per_token_head_dequantize),
}


# ---- one entry point per use -------------------------------------------------------------------


# Formats whose per-tensor scale is a calibrated constant per layer (the checkpoint's k_scale/v_scale).
CALIBRATED = ("fp8", "nvfp4")


def fake_quantize(x: torch.Tensor, name: str, per_head: bool = False, amax=None) -> torch.Tensor:
    """quantize → dequantize in ``name``'s format, in ``x``'s dtype. ``fp8`` and ``nvfp4`` scale by a
    calibrated ``amax`` (a number, or one per KV head for per-head fp8); without one they run at the
    unit scale an engine uses when the checkpoint has no KV scales. Never a scale from ``x`` itself:
    that would read future tokens and other sequences of the batch."""
    if name == "fp8":
        return fp8_fake(x, per_head, E4M3_MAX if amax is None else amax)
    if name == "nvfp4":
        return nvfp4_fake(x, E2M1_MAX * E4M3_MAX if amax is None else amax)
    if name in _UNIT_SCALE_FP8:
        return fp8_unit_fake(x, name)
    if name in TURBOQUANT_KEYS:
        return turboquant.fake_quantize_keys(x, TURBOQUANT_KEYS[name])
    if name in TURBOQUANT_VALUES:
        return turboquant.fake_quantize_values(x, TURBOQUANT_VALUES[name])
    if name in _BLOCK_CODECS or name in _PER_TOKEN_HEAD_CODECS:
        quantize, dequantize = _BLOCK_CODECS.get(name) or _PER_TOKEN_HEAD_CODECS[name]
        return dequantize(*quantize(x), dtype=x.dtype)
    raise ValueError(f"unknown engine format {name!r}: expected one of {sorted(ENGINE_FORMATS)}")


def shape_problem(name: str, head_dim: int) -> str | None:
    """Why ``name`` cannot store heads of ``head_dim``, or None."""
    if BLOCK.get(name) and head_dim % BLOCK[name]:
        return f"{name} stores blocks of {BLOCK[name]} along head_dim, which does not divide head_dim {head_dim}"
    if name == "int4_per_token_head" and head_dim % 2:
        return f"{name} packs two values per byte: head_dim {head_dim} is odd"
    if name in ("turboquant_k4", "turboquant_k3") and head_dim & (head_dim - 1):
        return f"{name} rotates keys with a Hadamard matrix: head_dim {head_dim} is not a power of two"
    if name in ("turboquant_k3", "turboquant_v3") and head_dim % 8:
        return f"{name} packs 3-bit codes in runs of 8: head_dim {head_dim} is not a multiple of 8"
    return None


def nbytes(name: str, tokens: int, head_dim: int, rows: int = 1, per_head: bool = False) -> int:
    """Bytes an engine stores for ``rows`` (batch × KV heads) sequences of ``tokens`` tokens.

    Per-tensor fp32 scales are counted once per stream (4 bytes), per-head ones once per row.
    """
    elements = rows * tokens * head_dim
    if elements == 0:
        return 0
    if name == "fp8":
        return elements + 4 * (rows if per_head else 1)
    if name in _UNIT_SCALE_FP8:
        return elements
    if name == "nvfp4":
        return elements // 2 + elements // 16 + 4
    if name in PER_TOKEN_HEAD:  # codes, then an fp32 scale per token and head
        return elements * PER_TOKEN_HEAD[name] // 8 + 4 * rows * tokens
    if name in TURBOQUANT_KEYS:  # vLLM's slot: codes, then an fp16 norm (none for FP8 keys)
        return rows * tokens * turboquant.key_packed_size(TURBOQUANT_KEYS[name], head_dim)
    if name in TURBOQUANT_VALUES:  # codes, then fp16 scale and minimum
        return rows * tokens * turboquant.value_packed_size(TURBOQUANT_VALUES[name], head_dim)
    if name in _BLOCK_BYTES:  # codes, then an fp16 scale (and minimum) per block of 32
        code_bits, extra = _BLOCK_BYTES[name]
        return elements * code_bits // 8 + extra * (elements // 32)
    raise ValueError(f"unknown engine format {name!r}")


# ---- named sets of candidate pairs (`--formats`) -------------------------------------------------

_INT_PAIRS = ("k16v16", "k8v8", "k8v4", "k4v8", "k4v4", "k4v2", "k2v4", "k2v2")
# int with 3-bit K and V (packed as a 2-bit and a 1-bit plane): steps of one bit between 4 and 2.
_INT_PLUS_PAIRS = ("k16v16", "k8v8", "k8v4", "k4v8", "k4v4", "k4v3", "k3v4", "k3v3", "k4v2", "k2v4", "k3v2", "k2v3", "k2v2")
# int+ and, for every pair of 4 bits or less, the same pair in groups of 64: half the scale and zero
# bytes (0.5 instead of 1 bit per element) for more rounding error. Same nominal bits, so they only
# compete where budgets count real bytes.
_INT_PLUS_G_PAIRS = _INT_PLUS_PAIRS + tuple(f"{p}g64" for p in _INT_PLUS_PAIRS if max(map(int, p[1:].split("v"))) <= 4)
# vLLM / ModelOpt per-layer algorithms: FP8, NVFP4, FP8 keys with NVFP4 values; skipped layers stay 16-bit.
_VLLM_PAIRS = ("k16v16", "k[fp8]v[fp8]", "k[fp8]v[nvfp4]", "k[nvfp4]v[nvfp4]")
# vLLM's layer-wise PRs (#56116, #56155/#56156): FP8 or NVFP4 per layer, never FP8 keys with NVFP4 values.
_VLLM_LAYERWISE_PAIRS = ("k16v16", "k[fp8]v[fp8]", "k[nvfp4]v[nvfp4]")
# Released vLLM (0.32): one --kv-cache-dtype for every layer but the --kv-cache-dtype-skip-layers set,
# which stays 16-bit. dtype -> (K format, V format) as kvtune models it.
VLLM_DTYPES = {
    "fp8_e4m3": ("fp8_e4m3", "fp8_e4m3"),
    "fp8_e5m2": ("fp8_e5m2", "fp8_e5m2"),
    "fp8": ("fp8", "fp8"),
    "nvfp4": ("nvfp4", "nvfp4"),
    **{name: (name, name) for name in PER_TOKEN_HEAD},
    "turboquant_k8v4": ("turboquant_k8", "turboquant_v4"),
    "turboquant_4bit_nc": ("turboquant_k4", "turboquant_v4"),
    "turboquant_k3v4_nc": ("turboquant_k3", "turboquant_v4"),
    "turboquant_3bit_nc": ("turboquant_k3", "turboquant_v3"),
}
# The dtypes vLLM's CPU attention backend runs (cpu_attn.py's list; it checks nothing else and
# stores bf16 into the buffers of other dtypes, which is garbage).
VLLM_CPU_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")
# A search over one of these sets is a search over the skipped set for that dtype.
_VLLM_RELEASED = {"vllm-fp8": "fp8_e4m3", "vllm-fp8_e5m2": "fp8_e5m2", "vllm-fp8-scaled": "fp8", "vllm-nvfp4": "nvfp4",
                  **{f"vllm-{name}": name for name in VLLM_DTYPES if name.endswith("per_token_head") or name.startswith("turboquant")}}


def vllm_pair(dtype: str) -> str:
    """The candidate a vLLM dtype stores every quantized layer as: ``K[fp8_e4m3]V[fp8_e4m3]``."""
    k, v = VLLM_DTYPES[dtype]
    return f"k[{k}]v[{v}]"


def vllm_forced_skips(dtype: str, num_layers: int, hybrid: bool = False) -> list[int]:
    """Layers vLLM keeps unquantized whatever the skip list says (engine/arg_utils.py unions them in):
    TurboQuant's boundary layers (:func:`kvtune.turboquant.boundary_skip_layers`), none for the rest."""
    return turboquant.boundary_skip_layers(num_layers, hybrid) if dtype.startswith("turboquant_") else []


_LLAMA_CPP_TYPES = ("16", "[q8_0]", "[q4_0]", "[q4_1]")  # f16 and the block types; K and V chosen apart
_LLAMA_CPP_PAIRS = tuple(f"k{k}v{v}" for k in _LLAMA_CPP_TYPES for v in _LLAMA_CPP_TYPES)
# llama.cpp's cache types including its 5-bit ones (q5_0, q5_1): 36 pairs.
_LLAMA_CPP_PLUS_TYPES = _LLAMA_CPP_TYPES + ("[q5_0]", "[q5_1]")
_LLAMA_CPP_PLUS_PAIRS = tuple(f"k{k}v{v}" for k in _LLAMA_CPP_PLUS_TYPES for v in _LLAMA_CPP_PLUS_TYPES)
FORMAT_SETS = {
    "int": _INT_PAIRS,
    "int+": _INT_PLUS_PAIRS,
    "int+g": _INT_PLUS_G_PAIRS,
    "vllm": _VLLM_PAIRS,
    "vllm-layerwise": _VLLM_LAYERWISE_PAIRS,
    **{name: ("k16v16", vllm_pair(dtype)) for name, dtype in _VLLM_RELEASED.items()},
    "vllm-released": ("k16v16", *(vllm_pair(dtype) for dtype in _VLLM_RELEASED.values())),
    "llama.cpp": _LLAMA_CPP_PAIRS,
    "llama.cpp+": _LLAMA_CPP_PLUS_PAIRS,
    "engine": tuple(dict.fromkeys(_VLLM_PAIRS + _LLAMA_CPP_PAIRS)),
    "all": tuple(dict.fromkeys(_INT_PLUS_PAIRS + _VLLM_PAIRS + _LLAMA_CPP_PAIRS)),
}


def released_vllm_set(text: str) -> bool:
    """Is ``--formats`` made only of released-vLLM sets (``vllm-fp8``, ``vllm-released``, …)?"""
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    return bool(parts) and all(p in _VLLM_RELEASED or p == "vllm-released" for p in parts)

