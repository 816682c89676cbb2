"""Triton kernels against their plain-PyTorch references (interpreter on CPU, compiled on CUDA)."""

import pytest
import torch
import triton
import triton.language as tl

from kvtune.cache import load_cache
from kvtune.kernels.decode_attention import _codes_as, decode_attention, decode_attention_reference
from kvtune.kernels.quantize import quantize_pack, supports
from kvtune.plan import LayerPlan, Plan
from kvtune.quant import QuantSpec, quantize

from .conftest import tiny_llama

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _assert_same_storage(a, b):
    for name in ("packed", "scale", "zero"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode, tokens", [("per-token", 37), ("per-channel", 64)])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_quantize_pack_writes_the_reference_bytes(bits, mode, tokens, dtype):
    torch.manual_seed(bits)
    spec = QuantSpec(bits, mode, 32)
    x = (torch.randn(2, 3, tokens, 64, device=DEVICE) * 3 - 1).to(dtype)
    x[0, 0, :32] = 1.5  # constant groups in both modes
    _assert_same_storage(quantize_pack(x, spec), quantize(x, spec))


@pytest.mark.parametrize("mode", ["per-token", "per-channel"])
def test_quantize_pack_rounds_ties_to_even_like_torch(mode):
    # Codes from 0..3 in half steps: min 0, max 3 → scale exactly 1, so x.5 values are exact ties.
    steps = torch.arange(32, dtype=torch.float32, device=DEVICE) % 7 * 0.5
    steps[0], steps[1] = 0.0, 3.0
    x = steps.expand(32, 32).clone()
    x = x if mode == "per-token" else x.T.contiguous()
    spec = QuantSpec(2, mode, 32)
    ours, ref = quantize_pack(x[None], spec), quantize(x[None], spec)
    _assert_same_storage(ours, ref)
    assert (ours.scale == 1).all()


def test_quantize_pack_refuses_shapes_it_cannot_tile():
    spec = QuantSpec(4, "per-token", 24)
    assert not supports(torch.Size([1, 4, 48]), spec)
    with pytest.raises(ValueError, match="power-of-two"):
        quantize_pack(torch.zeros(1, 4, 48), spec)
    with pytest.raises(ValueError, match="whole groups"):
        quantize_pack(torch.zeros(1, 5, 64), QuantSpec(4, "per-channel", 32))


def _streams(x, spec, quantized_tokens):
    """(quantized prefix, tail) as the cache holds them after ``quantized_tokens`` were flushed."""
    if not spec.is_quantized or quantized_tokens == 0:
        return None, x
    tail = x[..., quantized_tokens:, :] if quantized_tokens < x.shape[-2] else None
    return quantize(x[..., :quantized_tokens, :], spec), tail


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("k_bits", [2, 3, 4, 5, 6, 8, 16])
@pytest.mark.parametrize("v_bits", [2, 3, 4, 6, 8, 16])
def test_decode_attention_matches_the_reference_for_every_bit_pair(k_bits, v_bits, gather):
    torch.manual_seed(k_bits * 17 + v_bits)
    batch, kv_heads, group, tokens, head_dim = 2, 2, 3, 83, 64  # odd length, GQA 3:1
    k = torch.randn(batch, kv_heads, tokens, head_dim, device=DEVICE)
    v = torch.randn(batch, kv_heads, tokens, head_dim, device=DEVICE)
    q = torch.randn(batch, kv_heads * group, 1, head_dim, device=DEVICE)
    # Residual window of 19: per-channel K flushes whole groups of 16, per-token V every token.
    key = _streams(k, QuantSpec(k_bits, "per-channel", 16), (tokens - 19) // 16 * 16)
    value = _streams(v, QuantSpec(v_bits, "per-token", 32), tokens - 19)
    ours = decode_attention(q, key, value, num_splits=3, block_n=16, gather_codes=gather, gather_scales=gather)
    ref = decode_attention_reference(q, key, value)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    if (k_bits, v_bits) != (16, 16):  # the quantized prefix really is read
        exact = decode_attention_reference(q, (None, k), (None, v))
        assert not torch.allclose(ours, exact, atol=1e-4)


@pytest.mark.parametrize("k_bits, v_bits", [(3, 3), (4, 2)])
@pytest.mark.parametrize("gather", [False, True])
def test_decode_attention_with_groups_of_64(k_bits, v_bits, gather):
    """int+g's candidates: key groups of 64 tokens (longer than a block of 16) and value groups
    spanning the whole head."""
    torch.manual_seed(k_bits * 5 + v_bits)
    k = torch.randn(1, 2, 150, 64, device=DEVICE)
    v = torch.randn(1, 2, 150, 64, device=DEVICE)
    q = torch.randn(1, 6, 1, 64, device=DEVICE)
    key = _streams(k, QuantSpec(k_bits, "per-channel", 64), 128)
    value = _streams(v, QuantSpec(v_bits, "per-token", 64), 118)
    ours = decode_attention(q, key, value, num_splits=2, block_n=16, gather_codes=gather, gather_scales=gather)
    torch.testing.assert_close(ours, decode_attention_reference(q, key, value), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("splits, block_n, gather", [(1, 64, False), (2, 16, False), (5, 16, True)])  # 64: blocks span two key groups
def test_decode_attention_several_query_tokens_padding_and_splits(splits, block_n, gather):
    torch.manual_seed(splits)
    k = torch.randn(2, 1, 70, 32, device=DEVICE)
    v = torch.randn(2, 1, 70, 32, device=DEVICE)
    q = torch.randn(2, 4, 3, 32, device=DEVICE)  # 3 new tokens, causal among themselves
    mask = torch.ones(2, 70, dtype=torch.bool, device=DEVICE)
    mask[1, :9] = False  # left padding
    key = _streams(k, QuantSpec(4, "per-channel", 32), 64)
    value = _streams(v, QuantSpec(2, "per-token", 32), 67)
    ours = decode_attention(q, key, value, key_mask=mask, num_splits=splits, block_n=block_n,
                            gather_codes=gather, gather_scales=gather)
    ref = decode_attention_reference(q, key, value, key_mask=mask)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_decode_attention_in_half_precision_is_within_fp16_tolerance():
    torch.manual_seed(0)
    k = torch.randn(1, 2, 100, 64, device=DEVICE, dtype=torch.float16)
    v = torch.randn(1, 2, 100, 64, device=DEVICE, dtype=torch.float16)
    q = torch.randn(1, 8, 1, 64, device=DEVICE, dtype=torch.float16)
    key, value = _streams(k, QuantSpec(4, "per-channel", 32), 64), _streams(v, QuantSpec(4, "per-token", 32), 68)
    ours = decode_attention(q, key, value, num_splits=2, block_n=32)
    assert ours.dtype == torch.float16
    torch.testing.assert_close(ours, decode_attention_reference(q, key, value), atol=2e-3, rtol=2e-3)


@triton.jit
def _convert_codes(codes_ptr, out_ptr, DTYPE: tl.constexpr):
    offs = tl.arange(0, 256)
    tl.store(out_ptr + offs, _codes_as(tl.load(codes_ptr + offs), DTYPE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_codes_become_floats_exactly(dtype):
    """The magic-number conversion gives every 8-bit code exactly, as a plain cast does."""
    codes = torch.arange(256, dtype=torch.int32, device=DEVICE)
    out = torch.empty(256, dtype=dtype, device=DEVICE)
    _convert_codes[(1,)](codes, out, DTYPE={torch.float16: tl.float16, torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}[dtype])
    assert torch.equal(out, codes.to(dtype))


def test_decode_attention_refuses_mismatched_streams():
    q = torch.randn(1, 2, 1, 32)
    with pytest.raises(ValueError, match="K holds 10 tokens but V holds 9"):
        decode_attention(q, (None, torch.randn(1, 1, 10, 32)), (None, torch.randn(1, 1, 9, 32)))
    with pytest.raises(ValueError, match="cannot share"):
        decode_attention(torch.randn(1, 3, 1, 32), (None, torch.randn(1, 2, 4, 32)), (None, torch.randn(1, 2, 4, 32)))


def test_fused_decode_through_the_cache_equals_the_reference_path(monkeypatch):
    """generate() with the cache's fused path (kernel reads packed K/V) gives the reference scores."""
    import kvtune.kernels.decode_attention as kernel_module

    calls = []
    counted = lambda *args, **kwargs: calls.append(1) or decode_attention(*args, **kwargs)  # noqa: E731
    monkeypatch.setattr(kernel_module, "decode_attention", counted)
    model = tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=32, dtype=torch.float32).to(DEVICE)
    plan = Plan((LayerPlan.from_pair("k4v2", group_size=8, residual=4), LayerPlan.from_pair("k2v8", group_size=8, residual=4)))
    torch.manual_seed(5)
    ids = torch.randint(3, 256, (2, 10), device=DEVICE)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding

    def scores(fused):
        cache = load_cache(model, plan, fused_decode=fused)
        with cache.fused_decoding(model):
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=14, do_sample=False,
                                 cache=cache, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
        return torch.stack(out.scores), cache

    reference, _ = scores(False)
    assert not calls
    fused, cache = scores(True)
    assert len(calls) == 2 * 13  # every decode step of both layers went through the kernel
    assert model.config._attn_implementation == "sdpa"  # the fused attention was switched in for the block only
    assert cache.layers[0]._k.num_quantized > 0 and cache.layers[1]._v.num_quantized > 0  # packed data was read
    torch.testing.assert_close(fused, reference, atol=1e-4, rtol=1e-4)


def test_split_kernel_compiles_for_hopper_without_a_gpu():
    """The interpreter does not compile: this catches code that only a real sm_90 build rejects.
    In a child process, because this suite runs Triton in interpreter mode."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.kernel_static import NVDISASM

    if not NVDISASM.exists():
        pytest.skip("this Triton ships no nvdisasm")
    script = (
        "from benchmarks.kernel_static import compile_split_kernel, first_loop, opcode, sass\n"
        "setting = dict(block_n=32, num_warps=4, num_stages=2, gather_codes=False, gather_scales=False)\n"
        "compile_split_kernel(3, 3, setting)\n"  # bit planes build too
        "loop = first_loop(sass(compile_split_kernel(4, 2, setting).asm['cubin']))\n"
        "print(sum(opcode(i) == 'HMMA' for i in loop), sum(opcode(i) in ('I2F', 'I2FP') for i in loop))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    mma, int_to_float = map(int, done.stdout.split()[-2:])
    assert mma > 0  # the tile products run on tensor cores
    assert int_to_float == 0  # codes become floats by integer ops (_codes_as), not the slower conversion pipe
