import json

import pytest

from kvtune.errors import PlanError
from kvtune.plan import LayerPlan, ModelShape, Plan, resolve_plan
from kvtune.quant import QuantSpec

SHAPE = ModelShape(num_layers=4, num_kv_heads=3, head_dim=64)


def mixed_plan() -> Plan:
    layers = (
        LayerPlan.from_pair("k16v16"),
        LayerPlan.from_pair("k8v4", residual=0),
        LayerPlan(QuantSpec(4, "per-token", 16), QuantSpec(2, "per-channel", 64), residual=128),
        LayerPlan.from_pair("k2v2"),
    )
    return Plan(layers, name="mixed", model="tiny", shape=SHAPE, metadata={"source": "test"})


def test_json_round_trip_is_lossless(tmp_path):
    plan = mixed_plan()
    path = plan.save(tmp_path / "plan.json")
    loaded = Plan.load(path)
    assert loaded == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    assert json.loads(path.read_text())["schema_version"] == 3


def test_friendly_forms_are_accepted():
    data = mixed_plan().to_dict()
    data["layers"][3] = "k4v2"
    data["layers"][0] = {"key": 8, "value": {"bits": 16}}
    del data["nominal_bits"]  # a hand-edited plan may leave the summary out
    plan = Plan.from_dict(data)
    assert plan.pairs == ["K8V16", "K8V4", "K4V2", "K4V2"]
    assert plan.layers[0].key.mode == "per-channel" and plan.layers[0].value.mode == "per-token"


def test_nominal_bits_and_bytes():
    plan = mixed_plan()
    assert plan.nominal_bits() == pytest.approx((16 + 6 + 3 + 2) / 4)
    fp = Plan.uniform("k16v16", 4)
    assert fp.cache_bytes(SHAPE, 1000) == 4 * 2 * 1000 * 3 * 64 * 2
    # K2V2 with residual 32 at 1000 tokens: K keeps 960 quantized (whole 32-groups) + 40 fp, V 968 + 32 fp
    layer = LayerPlan.from_pair("k2v2")
    k = QuantSpec(2, "per-channel", 32).nbytes(960, 64, rows=3) + 40 * 64 * 2 * 3
    v = QuantSpec(2, "per-token", 32).nbytes(968, 64, rows=3) + 32 * 64 * 2 * 3
    assert layer.cache_bytes(1000, SHAPE) == k + v


def _write(tmp_path, data, raw=False):
    path = tmp_path / "bad.json"
    path.write_text(data if raw else json.dumps(data))
    return path


def _mutated(fn):
    data = mixed_plan().to_dict()
    fn(data)
    return data


@pytest.mark.parametrize(
    "data, message",
    [
        ("{not json", "not valid JSON"),
        ([1, 2], "must be a JSON object"),
        (_mutated(lambda d: d.update(schema="other")), "not a kvtune plan"),
        (_mutated(lambda d: d.update(schema_version=5)), "schema_version 5 is not supported"),
        (_mutated(lambda d: d.pop("schema_version")), "schema_version None is not supported"),
        (_mutated(lambda d: d.update(extra=1)), r"unknown field\(s\) \['extra'\]"),
        (_mutated(lambda d: d.update(layers=[])), "non-empty list"),
        (_mutated(lambda d: d["layers"][1]["key"].update(bits=7)), "layer 1 key: unknown bit width 7"),
        (_mutated(lambda d: d["layers"][1]["value"].update(mode="per-head")), "layer 1 value: unknown quantization mode"),
        (_mutated(lambda d: d["layers"][1]["key"].update(group_size=-4)), "group_size must be an integer from 1 to 65536"),
        (_mutated(lambda d: d["layers"][2].update(residual=-1)), "layer 2: residual must be an integer from 0 to"),
        (_mutated(lambda d: d["layers"][2].update(layer=7)), "layers must be listed in order"),
        (_mutated(lambda d: d["layers"][2].pop("value")), "layer 2: missing 'value'"),
        (_mutated(lambda d: d["layers"][2]["key"].update(format="fp4")), "unknown format 'fp4'"),
        (_mutated(lambda d: d["layers"][2]["key"].update(colour="red")), r"layer 2 key: unknown field"),
        (_mutated(lambda d: d["layers"].__setitem__(0, "k7v2")), "layer 0: unknown bit width 7"),
        (_mutated(lambda d: d["layers"].__setitem__(0, 5)), "layer 0: expected an object"),
        (_mutated(lambda d: d["shape"].update(num_layers=5)), "'shape' says 5 layers"),
    ],
)
def test_invalid_plan_files_fail_clearly(tmp_path, data, message):
    path = _write(tmp_path, data, raw=isinstance(data, str))
    with pytest.raises(PlanError, match=message):
        Plan.load(path)


def test_missing_file():
    with pytest.raises(PlanError, match="plan file not found"):
        Plan.load("/nonexistent/plan.json")


def test_plan_for_another_model_is_refused():
    with pytest.raises(PlanError, match="has 4 layers but the model has 30"):
        mixed_plan().check_model(ModelShape(30, 3, 64))
    with pytest.raises(PlanError, match="was written for"):
        mixed_plan().check_model(ModelShape(4, 8, 128))
    plan = Plan.uniform("k4v4", 2, value_mode="per-token", group_size=64)
    with pytest.raises(PlanError, match="does not divide head_dim 32"):
        plan.check_model(ModelShape(2, 2, 32))


def test_presets():
    assert resolve_plan("fp16", 3).pairs == ["K16V16"] * 3
    assert resolve_plan("uniform:k4v2", 2).pairs == ["K4V2"] * 2
    kivi = resolve_plan("kivi:2", 2)
    assert kivi.layers[0].residual == 128 and kivi.layers[0].key.mode == "per-channel"
    assert resolve_plan("K8V4", 1).name == "uniform:k8v4"
    with pytest.raises(PlanError, match="Known forms: fp16"):
        resolve_plan("turbo", 2)
    assert resolve_plan("uniform:k3v3", 2).nominal_bits() == 3  # 3-bit planes
    with pytest.raises(PlanError, match="unknown bit width 7"):
        resolve_plan("uniform:k7v7", 2)
    with pytest.raises(PlanError, match="expected kivi:<bits>"):
        resolve_plan("kivi:two", 2)


def test_candidates_name_their_own_group_and_window():
    from kvtune.plan import LayerPlan, candidate_name, parse_candidate

    assert parse_candidate("k2v2g64r0") == (2, 2, 64, 0) and parse_candidate("K4V2") == (4, 2, None, None)
    assert candidate_name(*parse_candidate("k3v3G64R128")) == "K3V3g64r128"
    assert candidate_name(*parse_candidate("k[fp8]v2g16")) == "K[fp8]V2g16"
    layer = LayerPlan.from_pair("k2v2g64r0")
    assert (layer.key.group_size, layer.value.group_size, layer.residual, layer.pair, layer.candidate) == (64, 64, 0, "K2V2", "K2V2g64r0")
    assert LayerPlan.from_pair("k4v2").candidate == "K4V2"
    for bad, message in (("k16v16g64", "applies to integer widths"), ("k[fp8]v[nvfp4]r0", "applies to integer widths"),
                         ("k2v2g0", "group size must be"), ("k2v2x", "cannot read"), ("k7v2g64", "unknown bit width 7")):
        with pytest.raises(PlanError, match=message):
            parse_candidate(bad)
