"""Plain-PyTorch reference of vLLM's TurboQuant KV-cache formats (vLLM 0.32).

Mirrors model_executor/layers/quantization/turboquant/{config,centroids}.py,
v1/attention/ops/triton_turboquant_{store,decode}.py and
v1/attention/backends/turboquant_attn.py. quantize_keys/quantize_values give the
bytes vLLM's store kernel writes, bit for bit; fake_quantize_keys/_values give
what its decode kernel effectively attends with, in the unrotated domain.

One slot per token per KV head, fp16 fields little-endian, padded to even size:
    key, FP8 preset:  D bytes of float8 e4m3 (no rotation, no scale)
    key, MSE presets: ceil(D*bits/8) bytes of packed centroid indices | ||k|| fp16
    value:            ceil(D*bits/8) bytes of packed levels | scale fp16 | min fp16
4-bit fields hold element 2i in the low nibble of byte i; 3-bit fields pack
each run of 8 elements into 3 bytes, element j at bits 3j..3j+2.
"""

import functools
import math
from dataclasses import dataclass

import torch

FP8_MAX = 448.0  # largest finite e4m3; Triton's fp32->fp8 cast saturates (satfinite)


@dataclass(frozen=True)
class TurboQuantPreset:
    name: str
    key_bits: int  # 8: keys cast to FP8 e4m3; 3 or 4: Lloyd-Max codes of rotated unit keys
    value_bits: int  # uniform min/max levels per (token, head), fp16 scale and min
    norm_correction: bool  # "_nc": decode rescales the centroid vector to unit norm

    @property
    def key_fp8(self) -> bool:
        return self.key_bits == 8


# TurboQuantConfig's TQ_PRESETS (config.py).
PRESETS = {
    p.name: p
    for p in (
        TurboQuantPreset("turboquant_k8v4", 8, 4, False),
        TurboQuantPreset("turboquant_4bit_nc", 4, 4, True),
        TurboQuantPreset("turboquant_k3v4_nc", 3, 4, True),
        TurboQuantPreset("turboquant_3bit_nc", 3, 3, True),
    )
}


def _preset(preset) -> TurboQuantPreset:
    return preset if isinstance(preset, TurboQuantPreset) else PRESETS[preset]


# ---------------------------------------------------------------- sizes


def key_packed_size(preset, head_dim: int) -> int:
    p = _preset(preset)
    if p.key_fp8:
        return head_dim
    return math.ceil(head_dim * p.key_bits / 8) + 2  # codes + fp16 norm


def value_packed_size(preset, head_dim: int) -> int:
    return math.ceil(head_dim * _preset(preset).value_bits / 8) + 4  # + fp16 scale, min


def bytes_per_token(preset, head_dim: int) -> int:
    """Bytes vLLM allocates per token per KV head for K and V together.

    TurboQuantConfig.slot_size_aligned: the backend's customize_spec makes it
    the spec's state_content_bytes, so a page is block_size * num_kv_heads * this.
    """
    s = key_packed_size(preset, head_dim) + value_packed_size(preset, head_dim)
    return s + s % 2  # rounded up to even so the cache can be viewed as 2-byte halves


def nominal_bits(preset) -> tuple[int, int]:
    """(key bits, value bits) per element, without norms, scales or padding."""
    p = _preset(preset)
    return p.key_bits, p.value_bits


# ---------------------------------------------------------------- layer skipping


def boundary_skip_layers(num_layers: int, hybrid: bool = False) -> list[int]:
    """Layers vLLM always keeps at the model dtype for turboquant_* presets.

    TurboQuantConfig.get_boundary_skip_layers: the first and last
    n = min(2, num_layers // 2) layers (so 1 layer: none, 3: [0, 2], 4: all),
    counted over hf_text_config.num_hidden_layers; nothing for hybrid
    (attention + Mamba/linear) models.
    """
    if hybrid or num_layers <= 0:
        return []
    n = min(2, num_layers // 2)
    return sorted(set(range(n)) | set(range(num_layers - n, num_layers)))


# ---------------------------------------------------------------- codebook


def hadamard(head_dim: int) -> torch.Tensor:
    """vLLM's rotation: Sylvester Hadamard / sqrt(D), float32, symmetric, no random signs."""
    if head_dim < 1 or head_dim & (head_dim - 1):
        # vLLM would build a larger matrix and fail in the store's matmul.
        raise ValueError(f"TurboQuant MSE keys need a power-of-two head_dim, got {head_dim}")
    h = torch.tensor([[1.0]])
    while h.shape[0] < head_dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(head_dim)


def lloyd_max_centroids(head_dim: int, bits: int) -> torch.Tensor:
    """centroids.solve_lloyd_max, same float64 arithmetic, rounded to float32 at the end.

    Lloyd-Max levels for N(0, 1/D), the distribution of one coordinate of a
    rotated unit vector; integrals by a 200-step trapezoid rule.
    """
    return torch.tensor(_lloyd_max_levels(head_dim, bits), dtype=torch.float32)


# A memo of a pure function (same arguments, same levels): the solve takes ~0.5 s and the
# simulation asks for it at every layer of every forward.
@functools.lru_cache(maxsize=64)
def _lloyd_max_levels(head_dim: int, bits: int) -> tuple[float, ...]:
    n_levels = 2**bits
    sigma2 = 1.0 / head_dim
    sigma = math.sqrt(sigma2)

    def pdf(x):
        return (1.0 / math.sqrt(2 * math.pi * sigma2)) * math.exp(-x * x / (2 * sigma2))

    def trapz(f, a, b, n=200):
        h = (b - a) / n
        result = 0.5 * (f(a) + f(b))
        for i in range(1, n):
            result += f(a + i * h)
        return result * h

    lo, hi = -3.5 * sigma, 3.5 * sigma
    centroids = [lo + (hi - lo) * (i + 0.5) / n_levels for i in range(n_levels)]
    for _ in range(200):
        bounds = [(centroids[i] + centroids[i + 1]) / 2.0 for i in range(n_levels - 1)]
        edges = [lo * 3] + bounds + [hi * 3]
        new = []
        for i in range(n_levels):
            a, b = edges[i], edges[i + 1]
            num = trapz(lambda x: x * pdf(x), a, b)
            den = trapz(pdf, a, b)
            new.append(num / den if den > 1e-15 else centroids[i])
        if max(abs(new[i] - centroids[i]) for i in range(n_levels)) < 1e-10:
            break  # vLLM keeps the previous iterate on convergence
        centroids = new
    return tuple(centroids)


@dataclass(frozen=True)
class Codebook:
    rotation: torch.Tensor  # (D, D) PiT: the store computes y = (k / ||k||) @ rotation
    centroids: torch.Tensor  # (2**bits,) float32, sorted
    midpoints: torch.Tensor  # (2**bits - 1,) float32, computed in float32 as vLLM does


def codebook(preset, head_dim: int) -> Codebook | None:
    """Tables for an MSE-key preset (None for FP8 keys); pass it to the functions below to reuse it."""
    p = _preset(preset)
    if p.key_fp8:
        return None
    c = lloyd_max_centroids(head_dim, p.key_bits)
    return Codebook(hadamard(head_dim), c, (c[:-1] + c[1:]) / 2)


# ---------------------------------------------------------------- bit packing


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (..., D) into uint8 (..., ceil(D*bits/8)), store-kernel layout."""
    c = codes.to(torch.int32)
    d = c.shape[-1]
    if bits == 4:
        if d % 2:
            raise ValueError("4-bit packing needs an even head_dim")
        return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)
    if bits == 3:
        if d % 8:
            raise ValueError("3-bit packing needs head_dim % 8 == 0")  # vLLM drops the tail
        shifts = torch.arange(8, dtype=torch.int32, device=c.device) * 3
        word = (c.reshape(*c.shape[:-1], d // 8, 8) << shifts).sum(-1)
        out = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], -1)
        return out.reshape(*c.shape[:-1], d // 8 * 3).to(torch.uint8)
    raise ValueError(f"unsupported bit width {bits}")


def _unpack(data: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """Decode-kernel unpacking: read 16 bits at byte (i*bits)//8, shift by (i*bits)%8."""
    off = torch.arange(d, device=data.device) * bits
    b = torch.cat([data, torch.zeros_like(data[..., :1])], -1).to(torch.int32)
    raw16 = b[..., off // 8] | (b[..., off // 8 + 1] << 8)
    return ((raw16 >> (off % 8)) & ((1 << bits) - 1)).to(torch.uint8)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32 (...,) -> uint8 (..., 2): fp16 (round to nearest even) little-endian."""
    u = x.to(torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    return torch.stack([u & 0xFF, u >> 8], -1).to(torch.uint8)


def _f16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    u = b[..., 0].to(torch.int32) | (b[..., 1].to(torch.int32) << 8)
    return (u - ((u >> 15) << 16)).to(torch.int16).view(torch.float16)


# ---------------------------------------------------------------- keys


@dataclass(frozen=True)
class KeyCodes:
    data: torch.Tensor  # (..., key_packed_size) uint8: the slot's key bytes
    codes: torch.Tensor  # (..., D) uint8: FP8 bit patterns or centroid indices
    norm: torch.Tensor | None  # (...,) float16 ||k|| as stored (MSE presets)


def quantize_keys(k: torch.Tensor, preset, cb: Codebook | None = None) -> KeyCodes:
    p, d = _preset(preset), k.shape[-1]
    if p.key_fp8:
        # Clamp first: torch turns out-of-range values into NaN, the GPU cast saturates.
        fp8 = k.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
        return KeyCodes(fp8, fp8, None)
    cb = cb or codebook(p, d)
    # Same torch ops, same order, as triton_turboquant_store's launcher, so y is
    # bit-identical on the same device; the kernel then only compares and packs.
    x = k.float().reshape(-1, d)
    norms = x.norm(dim=1, keepdim=True)
    y = (x / (norms + 1e-8)) @ cb.rotation.to(x.device)
    # The kernel's binary search over sorted midpoints == count of midpoints <= y.
    idx = (y.unsqueeze(-1) >= cb.midpoints.to(x.device)).sum(-1).to(torch.uint8).reshape(k.shape)
    norm = norms.reshape(k.shape[:-1]).to(torch.float16)
    return KeyCodes(torch.cat([_pack(idx, p.key_bits), _f16_bytes(norm)], -1), idx, norm)


def _decode_keys(p, codes, norm, cb, d) -> torch.Tensor:
    if p.key_fp8:
        return codes.view(torch.float8_e4m3fn).float()
    # In float64: the kernel's float32 sums run in its own order anyway, and float64 keeps the
    # result the same whatever number of tokens is decoded at once (a float32 matmul's rounding
    # depends on the batch shape), so prefill simulation and token-by-token decoding agree.
    c = cb.centroids.to(codes.device, torch.float64)[codes.long()]
    if p.norm_correction:
        c = c * (1.0 / torch.sqrt((c * c).sum(-1, keepdim=True) + 1e-16))
    # Decode scores (q @ PiT) . c == q . (c @ PiT.T): un-rotate the centroids
    # instead of rotating the query; the fp16 norm scales the score.
    return norm.double().unsqueeze(-1) * (c @ cb.rotation.to(c.device, torch.float64).T)


def dequantize_keys(data: torch.Tensor, preset, head_dim: int, cb: Codebook | None = None,
                    dtype=torch.float32) -> torch.Tensor:
    """Key bytes (..., key_packed_size) -> effective keys (..., D), unrotated."""
    p = _preset(preset)
    if p.key_fp8:
        return _decode_keys(p, data[..., :head_dim].contiguous(), None, None, head_dim).to(dtype)
    cb = cb or codebook(p, head_dim)
    nbytes = key_packed_size(p, head_dim) - 2
    codes = _unpack(data[..., :nbytes], p.key_bits, head_dim)
    norm = _f16_from_bytes(data[..., nbytes:nbytes + 2])
    return _decode_keys(p, codes, norm, cb, head_dim).to(dtype)


def fake_quantize_keys(k: torch.Tensor, preset, cb: Codebook | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """Keys as vLLM's decode kernel scores them, in the original domain.

    Computed in float32 (the kernel's precision) and cast to `dtype`, default
    k.dtype; pass torch.float32 to keep the exact effective values.
    """
    p = _preset(preset)
    cb = None if p.key_fp8 else (cb or codebook(p, k.shape[-1]))
    kc = quantize_keys(k, p, cb)
    return _decode_keys(p, kc.codes, kc.norm, cb, k.shape[-1]).to(dtype or k.dtype)


# ---------------------------------------------------------------- values


@dataclass(frozen=True)
class ValueCodes:
    data: torch.Tensor  # (..., value_packed_size) uint8: the slot's value bytes
    codes: torch.Tensor  # (..., D) uint8 levels 0 .. 2**bits - 1
    scale: torch.Tensor  # (...,) float16 step, as stored
    zero: torch.Tensor  # (...,) float16 row minimum, as stored


def quantize_values(v: torch.Tensor, preset) -> ValueCodes:
    bits = _preset(preset).value_bits
    top = float(2**bits - 1)
    x = v.float()
    lo = x.amin(-1, keepdim=True)
    scale = (x.amax(-1, keepdim=True) - lo) / top
    scale = torch.where(scale > 1e-8, scale, torch.full_like(scale, 1e-8))
    # float32 scale and min for the levels; the stored fp16 copies are what decode uses.
    q = ((x - lo) / scale + 0.5).to(torch.int32).clamp(0, int(top)).to(torch.uint8)
    scale16, zero16 = scale.squeeze(-1).to(torch.float16), lo.squeeze(-1).to(torch.float16)
    data = torch.cat([_pack(q, bits), _f16_bytes(scale16), _f16_bytes(zero16)], -1)
    return ValueCodes(data, q, scale16, zero16)


def _decode_values(codes, scale, zero) -> torch.Tensor:
    return codes.float() * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)


def dequantize_values(data: torch.Tensor, preset, head_dim: int, dtype=torch.float32) -> torch.Tensor:
    """Value bytes (..., value_packed_size) -> effective values (..., D)."""
    bits = _preset(preset).value_bits
    n = math.ceil(head_dim * bits / 8)
    codes = _unpack(data[..., :n], bits, head_dim)
    scale, zero = _f16_from_bytes(data[..., n:n + 2]), _f16_from_bytes(data[..., n + 2:n + 4])
    return _decode_values(codes, scale, zero).to(dtype)


def fake_quantize_values(v: torch.Tensor, preset, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Values as vLLM's decode kernel accumulates them (float32, cast to `dtype`, default v.dtype)."""
    vc = quantize_values(v, preset)
    return _decode_values(vc.codes, vc.scale, vc.zero).to(dtype or v.dtype)


# ---------------------------------------------------------------- slots


def pack_slot(keys: KeyCodes, values: ValueCodes) -> torch.Tensor:
    """(..., bytes_per_token) uint8 slot: key bytes | value bytes | zero pad byte.

    vLLM never writes the pad byte, so compare only the first
    key_packed_size + value_packed_size bytes against a real cache.
    """
    s = torch.cat([keys.data, values.data], -1)
    return torch.cat([s, torch.zeros_like(s[..., : s.shape[-1] % 2])], -1)
