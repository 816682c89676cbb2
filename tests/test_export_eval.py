import json

import pytest
import torch

from kvtune.errors import PlanError
from kvtune.export import FORMATS, Skipped, export_formats, export_plan
from kvtune.plan import LayerPlan, ModelShape, Plan

SHAPE = ModelShape(4, 3, 64)


def _mixed():
    return Plan(tuple(LayerPlan.from_pair(p) for p in ("k8v4", "k4v2", "k4v4", "k2v2")), name="mixed", shape=SHAPE)


def test_kvtune_export_round_trips_losslessly(tmp_path):
    plan = _mixed()
    result = export_plan(plan, "kvtune", tmp_path / "plan.json")
    assert Plan.load(result.path) == plan


def test_plan_for_a_different_layer_count_is_refused(tmp_path, tiny_model):
    from kvtune.cache import load_cache

    export_plan(_mixed(), "kvtune", tmp_path / "plan.json")
    with pytest.raises(PlanError, match="has 4 layers but"):
        load_cache(tiny_model, Plan.load(tmp_path / "plan.json"))


def test_uniform_plan_exports_to_transformers_and_llama_cpp(tmp_path):
    plan = Plan.uniform("k4v4", 4, group_size=64, residual=128)
    hf = json.loads(export_plan(plan, "hf-quantized-cache", tmp_path / "hf.json").path.read_text())
    assert hf["cache_implementation"] == "quantized"
    assert hf["cache_config"] == {"backend": "quanto", "nbits": 4, "axis_key": 0, "axis_value": 0, "q_group_size": 64, "residual_length": 128}
    cpp = json.loads(export_plan(Plan.uniform("k[q8_0]v[q4_1]", 4), "llama.cpp", tmp_path / "cpp.json").path.read_text())
    assert cpp["args"] == ["--cache-type-k", "q8_0", "--cache-type-v", "q4_1"]
    with pytest.raises(PlanError, match="layer 0: K is 8-bit kvtune integers"):  # kvtune's int8 is not q8_0
        export_plan(Plan.uniform("k8v4", 4), "llama.cpp", tmp_path / "x.json")


def test_mixed_plans_are_refused_or_rounded_up(tmp_path):
    with pytest.raises(PlanError, match="cannot express layer 0: K is 8-bit kvtune integers"):
        export_plan(_mixed(), "llama.cpp", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(PlanError, match="layer 0: a different pair|layer 0: K8 differs"):
        export_plan(_mixed(), "hf-quantized-cache", tmp_path / "x.json")
    with pytest.raises(PlanError, match="llama.cpp cannot express layer 0: K is 4-bit"):
        export_plan(Plan.uniform("k4v2", 4), "llama.cpp", tmp_path / "x.json")
    result = export_plan(_mixed(), "llama.cpp", tmp_path / "cpp.json", nearest=True)
    assert json.loads(result.path.read_text())["args"] == ["--cache-type-k", "q8_0", "--cache-type-v", "q4_1"]
    assert any("rounded up" in n for n in result.notes) and any("MiB" in n for n in result.notes)
    hf = export_plan(_mixed(), "hf-quantized-cache", tmp_path / "hf.json", nearest=True, backend="hqq")
    assert json.loads(hf.path.read_text())["cache_config"]["nbits"] == 8
    with pytest.raises(PlanError, match="unknown export format"):
        export_plan(_mixed(), "tensorrt", tmp_path / "t.json")


def test_eval_of_the_16_bit_plan_reproduces_fp16_exactly(tiny_model):
    from kvtune import tasks
    from kvtune.cache import MixedPrecisionCache
    from kvtune.perplexity import token_nll

    torch.manual_seed(0)
    windows = torch.randint(3, 256, (2, 48))
    assert torch.equal(token_nll(tiny_model, windows, Plan.uniform("k16v16", 3)), token_nll(tiny_model, windows, None))

    class ByteTokenizer:  # enough of a tokenizer for generate() on the tiny vocabulary
        pad_token_id = 0

        def __call__(self, texts, return_tensors=None, padding=None, padding_side=None):
            ids = [[3 + (ord(ch) % 250) for ch in t] for t in texts]
            width = max(map(len, ids))
            input_ids = torch.tensor([[0] * (width - len(r)) + r for r in ids])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
            return _Batch(input_ids=input_ids, attention_mask=mask)

    prompts = ["an example prompt", "another, longer example prompt"]
    reference = tiny_model.generate(**ByteTokenizer()(prompts), max_new_tokens=10, do_sample=False, pad_token_id=0)
    ours = tasks.generate(tiny_model, ByteTokenizer(), prompts, lambda mask: MixedPrecisionCache(Plan.uniform("k16v16", 3)), 10)
    assert [r[-10:].tolist() for r in reference] == ours
    assert tasks.agreement(ours, ours) == 1.0


class _Batch(dict):
    def to(self, device):
        return self


def test_task_scoring():
    from kvtune.tasks import agreement, is_correct

    assert is_correct(" Germany.\nParis", "Germany") and not is_correct(" France", "Germany")
    assert is_correct(" to take part in the", "to take part in")
    assert agreement([[1, 2, 3, 4]], [[1, 2, 9, 4]]) == 0.5


@pytest.mark.slow
def test_tasks_come_from_real_files(default_model):
    from kvtune.data import load_corpus
    from kvtune.tasks import analogy_items, needle_items

    items = analogy_items(5, seed=1)
    assert len(items) == 5 and all(it.prompt.count("\n") == 4 and it.prompt.endswith(" is to") for it in items)
    _, tokenizer = default_model
    documents = load_corpus()["heldout"]["text"]
    needles = needle_items(tokenizer, documents, 3, 512, seed=0)
    for item in needles:
        prefix = item.prompt.rsplit("Earlier in this text: ", 1)[1]
        assert (prefix + " " + item.answer) in item.prompt  # the planted sentence holds the answer


def test_every_format_export_rounds_up_falls_back_to_hqq_and_skips_what_cannot_hold_the_plan(tmp_path):
    """kvtune run's last step: an 8-bit layer has no quanto width, so QuantizedCache is written for hqq;
    a 16-bit layer has no QuantizedCache width at all, so that format is skipped and its older file removed."""
    written = {r.format: r for r in export_formats(_mixed(), tmp_path)}
    assert tuple(written) == FORMATS and not any(isinstance(r, Skipped) for r in written.values())
    hf = written["hf-quantized-cache"]
    assert json.loads(hf.path.read_text())["cache_config"]["backend"] == "hqq"
    assert json.loads(hf.path.read_text())["cache_config"]["nbits"] == 8
    assert hf.notes[0].startswith("written for the hqq backend: transformers QuantizedCache[quanto] has no width of at least 8")
    with_16 = Plan(tuple(LayerPlan.from_pair(p) for p in ("k16v16", "k4v2", "k4v4", "k2v2")), name="with16", shape=SHAPE)
    again = {r.format: r for r in export_formats(with_16, tmp_path)}
    assert isinstance(again["hf-quantized-cache"], Skipped) and "[hqq] has no width of at least 16" in again["hf-quantized-cache"].reason
    assert not (tmp_path / "hf-quantized-cache.json").exists()  # the 8-bit plan's file is not left to be taken for this one
    assert json.loads((tmp_path / "kvtune.json").read_text())["layers"][0]["key"]["bits"] == 16


def test_three_bit_plans_export_where_the_target_has_three_bits(tmp_path):
    k3v3 = Plan.uniform("k3v3", 4)
    hqq = json.loads(export_plan(k3v3, "hf-quantized-cache", tmp_path / "hqq.json", backend="hqq").path.read_text())
    assert hqq["cache_config"]["nbits"] == 3
    with pytest.raises(PlanError, match="K3 is not among"):  # quanto has 2 and 4 bits only
        export_plan(k3v3, "hf-quantized-cache", tmp_path / "q.json")
    quanto = export_plan(k3v3, "hf-quantized-cache", tmp_path / "q.json", nearest=True)
    assert json.loads(quanto.path.read_text())["cache_config"]["nbits"] == 4
    cpp = json.loads(export_plan(k3v3, "llama.cpp", tmp_path / "cpp.json", nearest=True).path.read_text())
    assert cpp["args"] == ["--cache-type-k", "q4_1", "--cache-type-v", "q4_1"]  # no llama.cpp type below 4 bits


def test_quantized_cache_axes_per_backend_and_the_fp8_backend(tiny_model, tmp_path):
    """quanto groups per token on axis 0 for K and V; hqq's axis 0 is per channel, so kvtune's layout
    is axis_key 0, axis_value 1 there. A uniform FP8 plan becomes the fp8 backend, which transformers
    accepts: generate() runs with the exported cache_config."""
    import torch

    plan = Plan.uniform("k4v4", 4)
    hqq = export_plan(plan, "hf-quantized-cache", tmp_path / "hqq.json", backend="hqq")
    assert json.loads(hqq.path.read_text())["cache_config"]["axis_key"] == 0
    assert json.loads(hqq.path.read_text())["cache_config"]["axis_value"] == 1
    assert any("between 0 and 31 recent tokens" in n for n in hqq.notes)
    quanto = export_plan(plan, "hf-quantized-cache", tmp_path / "quanto.json")
    assert any("quanto groups K and V per token" in n for n in quanto.notes)
    fp8 = json.loads(export_plan(Plan.uniform("k[fp8]v[fp8]", 4), "hf-quantized-cache", tmp_path / "fp8.json",
                                 backend="fp8").path.read_text())
    assert fp8["cache_config"] == {"backend": "fp8"}
    with pytest.raises(PlanError, match="QuantizedCache\\[fp8\\] cannot express layer 0"):
        export_plan(plan, "hf-quantized-cache", tmp_path / "x.json", backend="fp8")
    assert json.loads(export_plan(plan, "hf-quantized-cache", tmp_path / "y.json", backend="fp8",
                                  nearest=True).path.read_text())["cache_config"] == {"backend": "fp8"}
    ids = torch.randint(3, 200, (1, 12))
    out = tiny_model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                              **{k: v for k, v in fp8.items() if k != "kvtune"})
    assert out.sequences.shape[1] == 16
    assert type(out.past_key_values.layers[0]).__name__ == "Fp8QuantizedLayer"  # the engine took the fp8 backend
