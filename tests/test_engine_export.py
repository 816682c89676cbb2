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
ENDS = _plan("k[q8_0]v[q8_0]", "k[q8_0]v[q4_1]", "k[q4_0]v[q4_1]", "k[q4_0]v[q4_1]", "k[q4_0]v[q4_1]", "k[q8_0]v[q8_0]", name="ends")


@pytest.mark.parametrize("fmt, plan", [("modelopt-hf", VLLM_MIXED), ("trtllm", PER_LAYER), ("sglang", PER_LAYER),
                                       ("llama.cpp", LLAMA_UNIFORM), ("ik-llama.cpp", ENDS)])
def test_exporters_write_the_golden_files(fmt, plan, tmp_path):
    written = json.loads(export_plan(plan, fmt, tmp_path / "out.json").path.read_text())
    assert written == json.loads((GOLDEN / f"{fmt}.json").read_text())


def test_uniform_engine_plans_take_the_simple_forms(tmp_path):
    fp8 = json.loads(export_plan(_plan(*["k[fp8]v[fp8]"] * 6), "modelopt-hf", tmp_path / "m.json").path.read_text())
    assert fp8["quantization"] == {"kv_cache_quant_algo": "FP8", "kv_cache_schema_version": 1}
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
    assert result.notes[0].startswith("rounded 2 layer(s) up") and "MiB" in result.notes[1] and "+" in result.notes[1]
    result = export_plan(_plan(*["k4v2"] * 6), "modelopt-hf", tmp_path / "m.json", nearest=True)
    assert json.loads(result.path.read_text())["quantization"]["kv_cache_quant_algo"] == "NVFP4"
    result = export_plan(ENDS, "llama.cpp", tmp_path / "c.json", nearest=True)
    assert json.loads(result.path.read_text())["args"] == ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"]
    assert "MiB" in result.notes[1]
