"""Every decoder family transformers serves, on tiny random-weight models built from its config:
detection, simulated prefill = decode through the cache, generate, profile → search → ppl, and the
sliding-window cache's real bytes. Families that cannot be served are refused with a reason."""

import pytest
import torch

from kvtune.arch import describe
from kvtune.cache import MixedPrecisionCache, MixedPrecisionLayer, load_cache
from kvtune.errors import ModelError
from kvtune.plan import LayerPlan, ModelShape, Plan
from kvtune.simulate import simulate_quantization
from tests.families import FAMILIES, REFUSED, VOCAB, config_for, tiny_model

# Grouped matmuls, or float32 inside (Llama 4's norms and rotary): no float64.
_MOE_OR_LINEAR = {"mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "qwen3_next", "llama4", "mimo_v2_flash"}
# family -> the config argument that sets its window (sliding, or Llama 4's attention chunk)
_WINDOWED = {"mistral-sliding": "sliding_window", "gemma2": "sliding_window", "gemma3": "sliding_window",
             "gpt_oss": "sliding_window", "llama4": "attention_chunk_size", "gemma4-shared": "sliding_window",
             "mimo_v2_flash": "sliding_window"}


def _dtype(family):
    return torch.float32 if family in _MOE_OR_LINEAR else torch.float64


def _ids(length, seed=1):
    return torch.randint(3, VOCAB - 1, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_simulated_prefill_equals_decode_through_the_cache(family):
    model = tiny_model(family, _dtype(family))
    arch = describe(model)
    plan = Plan.uniform("k2v2", arch.shape.num_layers, group_size=min(32, arch.shape.head_dim))
    ids = _ids(140)
    with torch.no_grad():
        exact = model(input_ids=ids, use_cache=False).logits
        with simulate_quantization(model, plan):
            simulated = model(input_ids=ids, use_cache=False).logits
        cache = load_cache(model, plan)
        decoded = torch.cat([model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True).logits
                             for t in range(ids.shape[1])], dim=1)
    # The reference attentions of some families (Gemma 2, gpt-oss) take their softmax in float32.
    tol = 1e-9 if _dtype(family) == torch.float64 and not arch.extras else 1e-4
    assert (simulated - decoded).abs().max() < tol * max(1.0, exact.abs().max().item())
    assert (simulated - exact).abs().max() > 1e-3  # quantized tokens were attended: K2V2 shows
    assert cache.nbytes() == plan.cache_bytes(arch.shape, ids.shape[1])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sixteen_bit_plan_generates_like_plain_generate(family):
    model = tiny_model(family, torch.float32)
    ids = _ids(24, seed=2)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(ids, **kwargs)
        through_cache = model.generate(ids, cache=load_cache(model, Plan.uniform("k16v16", describe(model).shape.num_layers)), **kwargs)
    assert torch.equal(plain, through_cache)


@pytest.mark.parametrize("family", sorted(_WINDOWED))
def test_generation_past_the_window_drops_what_transformers_drops(family):
    """The window shrunk to 16, a 10-token prompt and 30 new tokens run past it. Through the 16-bit
    plan's cache, generate gives exactly the tokens of transformers' own cache, and every windowed
    layer then holds exactly what transformers' layer holds (the last window - 1 tokens); a K2V2
    cache holds the bytes predicted after the drop (whole groups), fewer than without it."""
    from dataclasses import replace

    from transformers import DynamicCache

    from kvtune.plan import held_tokens

    model = tiny_model(family, _dtype(family), **{_WINDOWED[family]: 16})
    shape = describe(model).shape
    assert 16 in shape.windows
    ids, kwargs = _ids(10, seed=4), dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    sixteen, k2v2 = (Plan.uniform(pair, shape.num_layers, group_size=8, residual=4) for pair in ("k16v16", "k2v2"))
    with torch.no_grad():
        theirs = DynamicCache(config=model.config)
        plain = model.generate(ids, cache=theirs, **kwargs)
        ours = load_cache(model, sixteen)
        assert torch.equal(model.generate(ids, cache=ours, **kwargs), plain)
        quantized = load_cache(model, k2v2)
        model.generate(ids, cache=quantized, **kwargs)
    tokens = ours.get_seq_length()
    assert tokens == 39
    for i in range(shape.num_layers):
        layer, own = ours.layers[shape.model_layer(i)], theirs.layers[shape.model_layer(i)]
        assert torch.equal(layer._k.tail, own.keys) and torch.equal(layer._v.tail, own.values)
        assert layer._k.tail.shape[-2] == (15 if shape.window(i) else tokens)
        held = quantized.layers[shape.model_layer(i)]._k.num_quantized
        assert held == held_tokens(k2v2.layers[i].key, tokens, 4, shape.window(i))[0]
    assert ours.nbytes() == sixteen.cache_bytes(shape, tokens)
    assert quantized.nbytes() == k2v2.cache_bytes(shape, tokens) < k2v2.cache_bytes(replace(shape, windows=None), tokens)


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_families_kvtune_cannot_serve_are_refused_with_the_reason(family):
    with pytest.raises(ModelError, match=REFUSED[family][2]):
        describe(tiny_model(family, torch.float32))


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_families_get_one_clear_line_through_the_cli(family, tmp_path):
    from typer.testing import CliRunner

    from kvtune.cli import app
    from tests.families import save_tiny

    model_dir = save_tiny(family, tmp_path / "model")
    result = CliRunner().invoke(app, ["profile", "--model", model_dir, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert REFUSED[family][2] in result.output and family.split("_")[0] in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_shape_is_the_loaded_models_where_it_answers(family):
    from kvtune.arch import config_shape

    expected = config_shape(config_for(family))
    assert expected is None or expected == describe(tiny_model(family)).shape


def test_layers_of_different_shapes_are_planned_per_layer(tmp_path):
    """Gemma 4: sliding layers 2 × 32, global 1 × 64. The shape lists both; nominal bits weigh
    each layer by the elements it caches; the plan file says so (version 4) and reads back, while a
    plan of a model whose layers are alike keeps version 3 and its one-line shape."""
    shape = describe(tiny_model("gemma4")).shape
    assert [(shape.heads(i), shape.key_dim(i), shape.value_dim(i)) for i in range(4)] == [(2, 32, 32), (1, 64, 64)] * 2
    assert shape.group_dim == 32 and not shape.is_uniform
    plan = Plan((LayerPlan.from_pair("k4v4"), LayerPlan.from_pair("k2v2")) * 2, shape=shape)
    assert plan.nominal_bits() == 3.0  # 2 × 32 and 1 × 64 elements: equal weights here
    plan = Plan((LayerPlan.from_pair("k8v8"), LayerPlan.from_pair("k2v2"), LayerPlan.from_pair("k2v2"), LayerPlan.from_pair("k2v2")),
                shape=shape)
    assert plan.nominal_bits() == (8 * 128 + 2 * 128 * 3) / (128 * 4)
    saved = Plan.load(plan.save(tmp_path / "plan.json"))
    assert saved.to_dict()["schema_version"] == 4 and saved.shape == shape
    assert saved.to_dict()["shape"]["kv_heads"] == [2, 1, 2, 1]
    alike = describe(tiny_model("llama")).shape
    data = Plan(plan.layers[:3], shape=alike).to_dict()
    assert data["schema_version"] == 3 and set(data["shape"]) == {"num_layers", "num_kv_heads", "head_dim"}
    with pytest.raises(Exception, match="beyond any model|must list 4 integers"):
        ModelShape(4, 2, 32, key_dims=(32, 32, 0, 32))
    mimo = describe(tiny_model("mimo_v2_flash")).shape
    assert {mimo.key_dim(i) for i in range(4)} == {32} and {mimo.value_dim(i) for i in range(4)} == {128}
    k2v4 = Plan.uniform("k2v4", 4)
    assert k2v4.nominal_bits(mimo) == (2 * 32 + 4 * 128) / 160  # V's larger heads weigh more


def test_layers_that_share_k_v_are_left_out_and_named():
    for family, shared in (("gemma4-shared", ((4, 2), (5, 3))), ("gemma3n", ((2, 0), (3, 1)))):
        arch = describe(tiny_model(family))
        assert arch.shared == shared
        assert [(i, reason) for i, reason in arch.left_out] == [(i, f"shares K/V with layer {owner}") for i, owner in shared]
        assert arch.attending_index[shared[0][0]] == arch.plan_index[shared[0][1]]


def test_the_decode_kernel_reads_only_layers_it_can_serve_alone():
    """The kernel takes one head size for K and V and serves the layer that calls it: a K≠V layer
    (MiMo-V2-Flash) or a layer whose K/V other layers read (Gemma 4) stays on the reference path."""
    from kvtune.cache import MixedPrecisionCache

    for family, expected in (("gemma4", {0, 1, 2, 3}), ("gemma4-shared", {0, 1}), ("mimo_v2_flash", set())):
        model = tiny_model(family)
        arch = describe(model)
        plan = Plan.uniform("k4v4", arch.shape.num_layers, group_size=16)
        cache = MixedPrecisionCache(plan, True, arch.shape, model.config, None, frozenset(owner for _, owner in arch.shared))
        kernel = {layer.layer_idx for layer in cache.layers if isinstance(layer, MixedPrecisionLayer) and layer.fused_decode}
        windowed = {arch.shape.model_layer(i) for i in range(arch.shape.num_layers) if arch.shape.window(i)}
        assert kernel == expected - windowed, family


def test_layer_kinds_are_read_from_the_model():
    gemma3 = describe(tiny_model("gemma3"))
    assert gemma3.shape.windows == (80, 0, 80, 0) and gemma3.shape.layer_ids is None
    hybrid = describe(tiny_model("qwen3_next"))
    assert hybrid.shape.layer_ids == (1, 3) and [i for i, _ in hybrid.left_out] == [0, 2]
    assert "linear attention" in hybrid.left_out[0][1]
    assert describe(tiny_model("gemma2")).extras == ("softcap",)
    assert describe(tiny_model("gpt_oss")).extras == ("s_aux",)


def test_softcap_and_sinks_change_the_simulated_attention():
    from kvtune.simulate import simulated_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 8) * 4, torch.randn(1, 2, 6, 8) * 4, torch.randn(1, 2, 6, 8)
    layer = LayerPlan.from_pair("k16v16")
    plain = simulated_attention(q, k, v, layer, 1.0)
    capped = simulated_attention(q, k, v, layer, 1.0, softcap=2.0)
    sunk = simulated_attention(q, k, v, layer, 1.0, sinks=torch.tensor([3.0, -1.0]))
    scores = torch.tanh((q @ k.transpose(-1, -2)) / 2.0) * 2.0
    expected = torch.softmax(scores.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), -float("inf")), -1) @ v
    torch.testing.assert_close(capped, expected)
    assert not torch.allclose(plain, capped) and not torch.allclose(plain, sunk)
    # A sink takes probability mass: the output shrinks towards zero.
    assert sunk[:, 0].norm() < plain[:, 0].norm()


def test_unknown_attention_arguments_are_refused_not_dropped():
    from kvtune.arch import attention_extras

    module = torch.nn.Module()
    module.layer_idx = 3
    with pytest.raises(ModelError, match="alibi_slopes"):
        attention_extras(module, {"alibi_slopes": torch.ones(2)}, None)
    module.train()
    with pytest.raises(ModelError, match="dropout"):
        attention_extras(module, {}, None, dropout=0.1)


def test_sliding_cache_bytes_at_32k_equal_what_it_holds_and_beat_fp16_sliding():
    from transformers.cache_utils import DynamicSlidingWindowLayer

    window, context, chunk = 4096, 32768, 1024
    shape = ModelShape(2, 2, 64, windows=(window, 0))
    torch.manual_seed(0)
    for pair in ("k2v2", "k4v2", "k16v16", "k[fp8]v[fp8]"):
        plan = Plan.uniform(pair, 2)
        cache = MixedPrecisionCache(plan, shape=shape)
        fp16_sliding = DynamicSlidingWindowLayer(window)
        for _ in range(context // chunk):
            k, v = torch.randn(1, 2, chunk, 64, dtype=torch.float16), torch.randn(1, 2, chunk, 64, dtype=torch.float16)
            cache.update(k, v, 0)
            cache.update(k, v, 1)
            fp16_sliding.update(k, v)
        assert cache.nbytes() == plan.cache_bytes(shape, context), pair
        sliding_layer = cache.layers[0]
        held = sliding_layer.nbytes()
        fp16_held = fp16_sliding.keys.numel() * 2 + fp16_sliding.values.numel() * 2
        assert held == plan.layers[0].cache_bytes(context, shape, layer=0)
        if pair == "k16v16":
            assert held == fp16_held  # the same tokens as transformers' own sliding cache
        else:
            assert held < fp16_held


def test_head_dim_not_divisible_by_the_default_group_gets_a_fitting_group():
    from kvtune.plan import PlanError, fit_group_size, resolve_plan

    assert [fit_group_size(d) for d in (64, 80, 96, 72, 16)] == [32, 20, 32, 24, 16]
    plan = resolve_plan("uniform:k4v2", 3, head_dim=80)
    assert plan.layers[0].value.group_size == 20
    plan.check_model(ModelShape(3, 2, 80))
    with pytest.raises(PlanError, match="group_size 32 does not divide head_dim 80"):
        Plan.uniform("k4v2", 3, group_size=32).check_model(ModelShape(3, 2, 80))


def test_hybrid_plan_file_lists_attention_layers_by_model_index(tmp_path):
    shape = describe(tiny_model("qwen3_next")).shape
    plan = Plan.uniform("k4v2", shape.num_layers)
    plan.shape = shape
    saved = Plan.load(plan.save(tmp_path / "plan.json"))
    assert [entry["layer"] for entry in saved.to_dict()["layers"]] == [1, 3]
    assert saved.shape == shape


def test_model_dtype_follows_the_checkpoint_on_accelerators():
    from kvtune.models import resolve_dtype

    config = config_for("llama")
    config.dtype = torch.bfloat16
    assert resolve_dtype(None, "cpu", config) == torch.float32
    assert resolve_dtype(None, "cuda", config) == torch.bfloat16
    config.dtype = torch.float32
    assert resolve_dtype(None, "cuda", config) == torch.bfloat16
    assert resolve_dtype("float16", "cuda", config) == torch.float16
    with pytest.raises(ModelError, match="unknown --dtype"):
        resolve_dtype("int3", "cpu", config)


def test_dtype_and_device_follow_the_device_map(monkeypatch):
    """A map that keeps every module on the CPU runs in float32 even where GPUs are visible; a map or
    strategy that reaches a GPU runs in the accelerator dtype; --device beside a map is refused."""
    from kvtune.models import check_placement, mapped_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert mapped_device({"model": "cpu", "lm_head": "disk"}, None) == "cpu"
    assert mapped_device({"model.layers.0": 0, "lm_head": "cpu"}, None) == "cuda"
    assert mapped_device("auto", {"cpu": "20GiB"}) == "cpu"
    assert mapped_device("auto", None) == "cuda"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert mapped_device("balanced", None) == "cpu"
    with pytest.raises(ModelError, match="--device cuda:1 and --device-map both place the model"):
        check_placement("cuda:1", None, "auto", None)
    check_placement("cpu", None, "auto", None)  # the default --device beside a map


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_profile_search_and_ppl_run_end_to_end(family, tmp_path):
    from kvtune.eval import EvalSettings, evaluate_plans
    from kvtune.profiling import ProfileSettings, run_profile
    from kvtune.search import SearchSettings, run_search
    from tests.families import save_tiny

    model_dir = save_tiny(family, tmp_path / "model")
    profile = run_profile(ProfileSettings(model=model_dir, seq_len=128, windows=2, validate_windows=1, validate_layers=[0]),
                          tmp_path / "profile", progress=False)
    shape = profile.shape
    assert profile.meta["schema_version"] == (1 if shape.is_uniform else 2)  # files of alike layers as before
    assert profile.table["taylor"].notna().all() and (profile.table.query("pair == 'K2V2'")["taylor"] > 0).all()
    result = run_search(SearchSettings(profile=str(tmp_path / "profile"), budget="3.25bits", verify=0, generations=20),
                        tmp_path / "search", progress=False)
    plan = Plan.load(tmp_path / "search" / "plan.json")
    assert plan.shape == shape and plan.nominal_bits() <= 3.25 + 1e-9
    table = evaluate_plans(EvalSettings(model=model_dir, plans=["fp16", "uniform:k2v2", "uniform:k16v16", str(tmp_path / "search" / "plan.json")],
                                        seq_len=128, windows=2, tasks=[]), progress=False)
    ppl = dict(zip(table["plan"], table["ppl"]))
    assert ppl["uniform:k16v16"] == ppl["fp16"]
    assert ppl["uniform:k2v2"] != ppl["fp16"]
    assert result is not None


def test_accelerate_dispatch_with_offload_gives_the_same_numbers(tmp_path, monkeypatch):
    """Layers spread by accelerate (here: CPU and disk offload) profile, score and generate exactly
    as the model loaded whole; the probe's gradients flow back through the offloaded layers."""
    from kvtune.models import load_model
    from kvtune.perplexity import token_nll
    from kvtune.profiling.probe import Candidates
    from kvtune.profiling.profile import _new_stage1, _profile_batch
    from tests.families import save_tiny

    monkeypatch.setenv("KVTUNE_HOME", str(tmp_path / "home"))
    model_dir = save_tiny("llama", tmp_path / "model")
    whole, _ = load_model(model_dir)
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    spread, _ = load_model(model_dir, device_map=device_map)
    assert getattr(spread, "hf_device_map", None) and "disk" in spread.hf_device_map.values()
    ids = _ids(96, seed=3).repeat(2, 1)
    plan = Plan.uniform("k2v2", 3)
    torch.testing.assert_close(token_nll(spread, ids, plan), token_nll(whole, ids, plan), rtol=0, atol=1e-6)
    c = Candidates([(16, 16), (4, 2), (2, 2)], "per-channel", "per-token", 32, 32)
    stats = []
    for model in (whole, spread):
        model.requires_grad_(False)
        acc = _new_stage1(3, c)
        _profile_batch(model, ids, c, acc)
        stats.append(acc)
    for layer in range(3):
        for name, row in stats[0]["first_order"][layer].items():
            assert row == pytest.approx(stats[1]["first_order"][layer][name], rel=1e-5, abs=1e-12)
        assert stats[0]["joint"][layer] == pytest.approx(stats[1]["joint"][layer], rel=1e-6)
    assert any(v > 0 for v in stats[1]["first_order"][0]["K2V2"])  # gradients reached the first layer
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        torch.testing.assert_close(
            spread.generate(ids[:1, :20], cache=load_cache(spread, plan), **kwargs),
            whole.generate(ids[:1, :20], cache=load_cache(whole, plan), **kwargs), rtol=0, atol=0)
