import itertools

import pytest
import torch

from kvtune.errors import PlanError
from kvtune.quant import (
    QuantSpec,
    choose_qparams,
    fake_quantize,
    pack,
    quantize,
    quantize_codes,
    unpack,
)

SPECS = [QuantSpec(b, m, g) for b, m, g in itertools.product((2, 4, 8), ("per-token", "per-channel"), (8, 32))]


def _reference_codes(x: torch.Tensor, spec: QuantSpec):
    """Element-by-element loops over one (T, D) matrix: independent of the vectorised code."""
    T, D = x.shape
    codes = torch.zeros(T, D, dtype=torch.uint8)
    levels = 2**spec.bits - 1
    scale, zero = choose_qparams(x, spec)
    for t in range(T):
        for d in range(D):
            st, sd = (t, d // spec.group_size) if spec.mode == "per-token" else (t // spec.group_size, d)
            s, z = scale[st, sd].item(), zero[st, sd].item()
            codes[t, d] = int(min(max(round((x[t, d].item() - z) / s), 0), levels))
    return codes, scale, zero


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.mode}-g{s.group_size}")
def test_round_trip_error_is_within_half_a_step(spec):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64) * torch.logspace(-2, 2, 64)  # channels of very different scales
    x[0, 0, :32, :32] = 0.75  # constant fp16-representable groups must round-trip exactly
    qt = quantize(x, spec)
    x_hat = qt.dequantize()
    groups_per_elem = (
        qt.scale.float().repeat_interleave(spec.group_size, dim=-1)
        if spec.mode == "per-token"
        else qt.scale.float().repeat_interleave(spec.group_size, dim=-2)
    )
    err = (x - x_hat).abs()
    assert torch.all(err <= groups_per_elem / 2 * (1 + 1e-5) + 1e-6)
    assert torch.equal(x_hat[0, 0, :32, :32], x[0, 0, :32, :32])
    assert qt.scale.dtype == torch.float16 and qt.zero.dtype == torch.float16


@pytest.mark.parametrize("spec", SPECS[:4], ids=lambda s: f"{s.bits}b-{s.mode}")
def test_codes_match_elementwise_reference(spec):
    torch.manual_seed(2)
    x = torch.randn(32, 32) * 3
    ref_codes, scale, zero = _reference_codes(x, spec)
    codes = quantize_codes(x, scale, zero, spec)
    assert torch.equal(codes, ref_codes)
    assert torch.equal(unpack(quantize(x, spec).packed, spec.bits), ref_codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_packing_is_lossless_and_really_packed(bits):
    torch.manual_seed(3)
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack(packed, bits), codes)


def test_packing_layout_is_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack(torch.tensor([[0xA, 0x5]], dtype=torch.uint8), 4).tolist() == [[0x5A]]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.mode}-g{s.group_size}")
def test_byte_accounting_matches_stored_tensors(spec):
    x = torch.randn(2, 3, 64, 64)
    qt = quantize(x, spec)
    assert qt.nbytes == spec.nbytes(64, 64, rows=6)


def test_byte_accounting_by_hand():
    # 4-bit per-token, group 32, head_dim 64: 32 code bytes + 2 groups × (scale + zero) × 2 bytes = 40 bytes/token
    spec = QuantSpec(4, "per-token", 32)
    assert spec.nbytes(10, 64) == 400
    assert spec.effective_bits(10, 64) == 5.0
    # 2-bit per-channel, group 32 tokens: 16 code bytes/token; 64 channels × 2 × 2 bytes per 32 tokens
    spec = QuantSpec(2, "per-channel", 32)
    assert spec.nbytes(32, 64) == 32 * 16 + 64 * 4
    assert QuantSpec(16).nbytes(10, 64, rows=3) == 3 * 10 * 64 * 2


def test_quantized_tensors_concatenate_along_tokens():
    spec = QuantSpec(2, "per-channel", 8)
    x = torch.randn(1, 2, 24, 16)
    whole = quantize(x, spec)
    parts = quantize(x[..., :8, :], spec).cat(quantize(x[..., 8:, :], spec))
    assert torch.equal(whole.packed, parts.packed) and torch.equal(whole.scale, parts.scale)
    assert parts.num_tokens == 24


def test_fake_quantize_equals_quantize_dequantize_and_16_bits_is_identity():
    x = torch.randn(1, 1, 32, 64)
    spec = QuantSpec(4, "per-channel", 16)
    assert torch.equal(fake_quantize(x, spec), quantize(x, spec).dequantize())
    assert fake_quantize(x, QuantSpec(16)) is x


def test_quantization_is_idempotent():
    x = torch.randn(1, 1, 32, 64)
    spec = QuantSpec(4, "per-token", 32)
    once = fake_quantize(x, spec)
    assert torch.allclose(fake_quantize(once, spec), once, atol=1e-6)


def test_invalid_specs_and_shapes():
    with pytest.raises(PlanError, match="unknown bit width 7"):
        QuantSpec(7)
    with pytest.raises(PlanError, match="unknown quantization mode"):
        QuantSpec(4, "per-head")
    with pytest.raises(PlanError, match="group_size"):
        QuantSpec(4, "per-token", 0)
    with pytest.raises(ValueError, match="does not divide head_dim"):
        quantize(torch.randn(4, 48), QuantSpec(4, "per-token", 32))
    with pytest.raises(ValueError, match="whole groups"):
        quantize(torch.randn(20, 64), QuantSpec(4, "per-channel", 32))


def test_quantized_tokens_rule():
    per_token, per_channel = QuantSpec(4, "per-token"), QuantSpec(4, "per-channel", 32)
    assert per_token.quantized_tokens(100, residual=32) == 68
    assert per_token.quantized_tokens(10, residual=32) == 0
    assert per_channel.quantized_tokens(100, residual=32) == 64
    assert per_channel.quantized_tokens(95, residual=32) == 32
    assert QuantSpec(16).quantized_tokens(1000, 0) == 0
