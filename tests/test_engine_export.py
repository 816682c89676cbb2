"""Engine exporters against golden files written from the engines' public descriptions."""

import json
from pathlib import Path

import pytest

from kvtune.errors import PlanError
from kvtune.export import export_plan
from kvtune.plan import LayerPlan, ModelShape, Plan

GOLDEN = Path(__file__).parent / "golden"
SHAPE = ModelShape(6, 3, 64)


def _plan(*pairs, name="p"):
    return Plan(tuple(LayerPlan.from_pair(p) for p in pairs), name=name, shape=SHAPE)


VLLM_MIXED = _plan("k16v16", "k[fp8]v[fp8]", "k[fp8]v[nvfp4]", "k[nvfp4]v[nvfp4]", "k[nvfp4]v[nvfp4]", "k[fp8]v[nvfp4]", name="vllm-mixed")
PER_LAYER = _plan("k16v16", "k[fp8]v[fp8]", "k[fp8]v[fp8]", "k[nvfp4]v[nvfp4]", "k[nvfp4]v[nvfp4]", "k16v16", name="per-layer")
LLAMA_UNIFORM = _plan(*["k[q8_0]v[q4_1]"] * 6, name="llama-uniform")
RELEASED_VLLM = _plan("k16v16", *["k[fp8_e4m3]v[fp8_e4m3]"] * 4, "k16v16", name="released-vllm")
ENDS = _plan("k[q8_0]v[q8_0]", "k[q8_0]v[q4_1]", "k[q4_0]v[q4_1]", "k[q4_0]v[q4_1]", "k[q4_0]v[q4_1]", "k[q8_0]v[q8_0]", name="ends")


@pytest.mark.parametrize("fmt, plan", [("vllm", RELEASED_VLLM), ("modelopt-hf", VLLM_MIXED), ("trtllm", PER_LAYER), ("sglang", PER_LAYER),
                                       ("llama.cpp", LLAMA_UNIFORM), ("ik-llama.cpp", ENDS)])
def test_exporters_write_the_golden_files(fmt, plan, tmp_path):
    from kvtune.export import _version

    written = json.loads(export_plan(plan, fmt, tmp_path / "out.json").path.read_text())
    assert written == json.loads((GOLDEN / f"{fmt}.json").read_text().replace("KVTUNE_VERSION", _version()))


def test_uniform_engine_plans_take_the_simple_forms(tmp_path):
    fp8 = json.loads(export_plan(_plan(*["k[fp8]v[fp8]"] * 6), "modelopt-hf", tmp_path / "m.json").path.read_text())
    assert fp8["quantization"] == {"kv_cache_quant_algo": "FP8", "kv_cache_schema_version": 1,  # PR #2272: the map too
                                   "kv_cache_quantized_layers": {f"model.layers.{i}.self_attn": {"quant_algo": "FP8"} for i in range(6)}}
    assert fp8["producer"]["name"] == "kvtune" and "vllm_args" not in fp8
    ik = json.loads(export_plan(LLAMA_UNIFORM, "ik-llama.cpp", tmp_path / "ik.json").path.read_text())
    assert ik["args"] == ["--cache-type-k", "q8_0", "--cache-type-v", "q4_1"]


@pytest.mark.parametrize("fmt, plan, message", [
    ("modelopt-hf", _plan(*["k4v4"] * 6), "ModelOpt \\(vLLM\\) cannot express layer 0: K4V4 is none of its per-layer settings"),
    ("modelopt-hf", _plan("k[fp8]v[fp8]", "k[nvfp4]v[fp8]", *["k[fp8]v[fp8]"] * 4), "cannot express layer 1: K\\[nvfp4\\]V\\[fp8\\]"),
    ("trtllm", VLLM_MIXED, "TensorRT-LLM cannot express layer 2: K\\[fp8\\]V\\[nvfp4\\]"),
    ("sglang", VLLM_MIXED, "SGLang cannot express layer 2: K\\[fp8\\]V\\[nvfp4\\]"),
    ("llama.cpp", ENDS, "llama.cpp cannot express layer 2: its K type differs"),
    ("llama.cpp", VLLM_MIXED, "llama.cpp cannot express layer 1: K is fp8"),
    ("ik-llama.cpp", _plan("k[q8_0]v16", "k[q4_0]v16", "k[q8_0]v16", "k[q4_0]v16", "k[q8_0]v16", "k[q8_0]v16"), "ik_llama.cpp cannot express layer 2: its K type differs"),
])
def test_plans_an_engine_cannot_load_are_refused(fmt, plan, message, tmp_path):
    with pytest.raises(PlanError, match=message):
        export_plan(plan, fmt, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_nearest_rounds_up_and_reports_memory(tmp_path):
    result = export_plan(VLLM_MIXED, "trtllm", tmp_path / "t.json", nearest=True)
    assert json.loads(result.path.read_text())["kv_cache_config"]["dtype"] == "0:auto,1-2:fp8,3-4:nvfp4,5:fp8"
    assert result.notes[0].startswith("--nearest cost: memory") and "MiB" in result.notes[0] and "+" in result.notes[0]
    assert result.notes[1].startswith("rounded 2 layer(s) up") and result.plan.name.endswith("rounded up for trtllm")
    result = export_plan(_plan(*["k4v2"] * 6), "modelopt-hf", tmp_path / "m.json", nearest=True)
    assert json.loads(result.path.read_text())["quantization"]["kv_cache_quant_algo"] == "NVFP4"
    result = export_plan(ENDS, "llama.cpp", tmp_path / "c.json", nearest=True)
    assert json.loads(result.path.read_text())["args"] == ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"]
    assert "MiB" in result.notes[0]


def test_vllm_skip_list_is_written_as_separate_values(tmp_path):
    """vLLM honours --kv-cache-dtype-skip-layers 0 5 (a list of strings); "0,5" is silently ignored."""
    plan = _plan("k16v16", "k[fp8]v[fp8]", "k[fp8]v[fp8]", "k[fp8]v[fp8]", "k[fp8]v[fp8]", "k16v16")
    written = json.loads(export_plan(plan, "modelopt-hf", tmp_path / "m.json").path.read_text())
    assert written["vllm_args"] == ["--kv-cache-dtype-skip-layers", "0", "5"]
    assert written["vllm_llm_kwargs"] == {"kv_cache_dtype_skip_layers": ["0", "5"]}


@pytest.mark.needs_vllm
def test_vllm_skip_list_round_trips_through_vllms_own_parser(tmp_path):
    """Where vLLM is importable, its engine argument parser reads the exported flags back as the layers skipped."""
    args_module = pytest.importorskip("vllm.engine.arg_utils", reason="vLLM is not installed (an optional engine)")
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser  # vLLM ≥ 0.11
    except ImportError:
        from vllm.utils import FlexibleArgumentParser

    plan = _plan("k16v16", "k[fp8]v[fp8]", "k[fp8]v[fp8]", "k[fp8]v[fp8]", "k[fp8]v[fp8]", "k16v16")
    written = json.loads(export_plan(plan, "modelopt-hf", tmp_path / "m.json").path.read_text())
    parser = args_module.EngineArgs.add_cli_args(FlexibleArgumentParser())
    parsed = parser.parse_args(["--model", "m", "--kv-cache-dtype", "fp8", *written["vllm_args"]])
    assert [str(x) for x in parsed.kv_cache_dtype_skip_layers] == ["0", "5"]
    released = json.loads(export_plan(RELEASED_VLLM, "vllm", tmp_path / "v.json").path.read_text())
    parsed = parser.parse_args(["--model", "m", *released["vllm_args"]])
    assert parsed.kv_cache_dtype == "fp8_e4m3" and [str(x) for x in parsed.kv_cache_dtype_skip_layers] == ["0", "5"]


def test_ik_end_runs_of_the_base_type_get_no_flags(tmp_path):
    """Rounding may lift an end run to the middle's type: then no -first/-last flag repeats the base type."""
    plan = _plan("k2v4", "k[q4_1]v[q4_1]", "k[q4_1]v[q4_1]", "k[q4_1]v[q4_1]", "k[q4_1]v[q4_1]", "k[q8_0]v[q4_1]")  # 2 bits lift to q4_1
    written = json.loads(export_plan(plan, "ik-llama.cpp", tmp_path / "ik.json", nearest=True).path.read_text())
    assert written["args"] == ["--cache-type-k", "q4_1", "--cache-type-v", "q4_1", "--cache-type-k-last", "q8_0,1"]


def test_llama_cpp_5_bit_types(tmp_path):
    """q5_0/q5_1 are llama.cpp cache types: written as they are; kvtune's 5-bit integers and any K of
    5 bits round up to q5_1 (asymmetric, like kvtune's) rather than to q8_0."""
    exact = json.loads(export_plan(_plan(*["k[q5_0]v[q5_1]"] * 6), "llama.cpp", tmp_path / "a.json").path.read_text())
    assert exact["args"] == ["--cache-type-k", "q5_0", "--cache-type-v", "q5_1"]
    lifted = json.loads(export_plan(_plan(*["k5v4"] * 6), "llama.cpp", tmp_path / "b.json", nearest=True).path.read_text())
    assert lifted["args"] == ["--cache-type-k", "q5_1", "--cache-type-v", "q4_1"]
    mixed = json.loads(export_plan(_plan("k[q5_0]v[q4_0]", *["k[q4_0]v[q4_0]"] * 5), "llama.cpp", tmp_path / "c.json",
                                   nearest=True).path.read_text())
    assert mixed["args"] == ["--cache-type-k", "q5_0", "--cache-type-v", "q4_0"]


def test_released_vllm_takes_one_dtype_and_a_skipped_set(tmp_path):
    with pytest.raises(PlanError, match="one --kv-cache-dtype.*fp8_e4m3.*nvfp4"):
        export_plan(_plan("k16v16", "k[fp8_e4m3]v[fp8_e4m3]", "k[nvfp4]v[nvfp4]", *["k16v16"] * 3), "vllm", tmp_path / "a.json")
    with pytest.raises(PlanError, match="layer 1: K4V4 is none of"):
        export_plan(_plan("k16v16", "k4v4", *["k16v16"] * 4), "vllm", tmp_path / "b.json")
    # --nearest: every quantized layer to the widest dtype the plan uses, so no layer loses bits.
    result = export_plan(_plan("k16v16", "k[fp8_e4m3]v[fp8_e4m3]", "k[nvfp4]v[nvfp4]", "k4v4", "k16v16", "k[nvfp4]v[nvfp4]"),
                         "vllm", tmp_path / "c.json", nearest=True)
    written = json.loads(result.path.read_text())
    assert written["vllm_args"] == ["--kv-cache-dtype", "fp8_e4m3", "--kv-cache-dtype-skip-layers", "0", "4"]
    assert result.plan.pairs == ["K16V16", *["K[fp8_e4m3]V[fp8_e4m3]"] * 3, "K16V16", "K[fp8_e4m3]V[fp8_e4m3]"]
    # Nothing quantized: vLLM's own cache, no skip list.
    plain = json.loads(export_plan(_plan(*["k16v16"] * 6), "vllm", tmp_path / "d.json").path.read_text())
    assert plain["vllm_args"] == ["--kv-cache-dtype", "auto"] and plain["skip_layers"] == []
    scaled = export_plan(_plan(*["k[fp8]v[fp8]"] * 6), "vllm", tmp_path / "e.json")
    assert any("scales from the checkpoint" in note for note in scaled.notes)


def test_vllm_export_of_the_new_dtypes_and_turboquants_forced_skips(tmp_path):
    from kvtune.formats import vllm_pair

    shape = ModelShape(30, 3, 64)
    plan = Plan.uniform(vllm_pair("int4_per_token_head"), 30)
    plan.shape = shape
    written = json.loads(export_plan(plan, "vllm", tmp_path / "a.json").path.read_text())
    assert written["vllm_args"] == ["--kv-cache-dtype", "int4_per_token_head"]
    tq = Plan.uniform(vllm_pair("turboquant_k3v4_nc"), 30)
    tq.shape = shape
    with pytest.raises(PlanError, match=r"keeps layers \[0, 1, 28, 29\] unquantized for turboquant_k3v4_nc"):
        export_plan(tq, "vllm", tmp_path / "b.json")
    rounded = export_plan(tq, "vllm", tmp_path / "c.json", nearest=True)
    assert json.loads(rounded.path.read_text())["skip_layers"] == [0, 1, 28, 29]
    assert [rounded.plan.pairs[i] for i in (0, 1, 2, 28, 29)] == ["K16V16"] * 2 + ["K[turboquant_k3]V[turboquant_v4]"] + ["K16V16"] * 2
    assert rounded.notes[0].startswith("--nearest cost")
