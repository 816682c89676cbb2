"""lm-evaluation-harness through the quantized cache (kvtune.lmeval). lm-eval is an optional extra:
the tests that run it are deselected where it is missing and run in .venvs/lmeval (scripts/test_engines.sh)."""

import importlib.util
import json

import pytest

from kvtune import lmeval
from kvtune.errors import KvtuneError

needs_lm_eval = pytest.mark.needs_lm_eval  # deselected where lm-eval is missing; scripts/test_engines.sh runs them


def _heldout():
    from kvtune.data import load_corpus

    return [t for t in load_corpus(None)["heldout"]["text"] if t and t.strip()]


def test_next_sentence_items_come_from_held_out_text():
    documents = _heldout()
    items = lmeval.next_sentence_items(documents, 30, seed=3)
    assert items == lmeval.next_sentence_items(documents, 30, seed=3)  # a seed gives the same task
    assert items != lmeval.next_sentence_items(documents, 30, seed=4)
    text = "\n".join(documents)
    for item in items:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        truth = item["choices"][item["label"]]
        # The context and its true continuation stand together in one held-out article.
        assert any(item["context"] + " " + truth in " ".join(p.split()) for p in text.split("\n"))
    with pytest.raises(KvtuneError, match="were asked for"):
        lmeval.next_sentence_items(documents[:1], 10_000)


@pytest.mark.without_lm_eval
def test_missing_lm_eval_is_a_clear_message():
    from kvtune.eval import EvalSettings, check_settings

    with pytest.raises(KvtuneError, match=r"pip install 'kvtune\[lm-eval\]'"):
        check_settings(EvalSettings(plans=["fp16"], lm_eval=["kvtune_wiki"]))


@pytest.mark.slow
def test_offline_task_folder_is_lm_eval_yaml_over_held_out_items(tmp_path, default_model):
    _, tokenizer = default_model
    settings = lmeval.LmEvalSettings(tasks=["kvtune_wiki"], next_items=12, needle_items=3, needle_context=256)
    folder = lmeval.offline_task_dir(tokenizer, settings, home=tmp_path)
    assert lmeval.offline_task_dir(tokenizer, settings, home=tmp_path) == folder  # built once
    rows = [json.loads(line) for line in (folder / "kvtune_wiki_needle.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["answer"].split()) == 4 for r in rows)
    yaml = (folder / "kvtune_wiki_next.yaml").read_text()
    assert "output_type: multiple_choice" in yaml and str(folder / "kvtune_wiki_next.jsonl") in yaml


@needs_lm_eval
@pytest.mark.slow
def test_quantization_reaches_both_request_kinds(monkeypatch, default_model):
    """Both request kinds read K/V through the plan: the 16-bit plan gives FP16's log-likelihoods and
    generations exactly, K2V2 changes both; every needle request decodes through its own cache (a
    prefill, then one-token steps on every layer), and the task score is the mean of its items."""
    from kvtune import cache as cache_module
    from kvtune.plan import Plan

    model, tokenizer = default_model
    settings = lmeval.LmEvalSettings(tasks=["kvtune_wiki_next", "kvtune_wiki_needle"], limit=3)
    manager = lmeval.task_manager(tokenizer, settings)
    caches = []  # per cache generation used: layer -> tokens of each update() call
    real_load = cache_module.load_cache

    def counted_load(*args, **kwargs):
        cache = real_load(*args, **kwargs)
        real_update, calls = cache.update, {}
        caches.append(calls)

        def update(key_states, value_states, layer_idx, *a, **k):
            calls.setdefault(layer_idx, []).append(key_states.shape[-2])
            return real_update(key_states, value_states, layer_idx, *a, **k)

        cache.update = update
        return cache

    monkeypatch.setattr(cache_module, "load_cache", counted_load)
    runs = {}
    for name, plan in (("fp", None), ("k16v16", Plan.uniform("k16v16", 30)), ("k2v2", Plan.uniform("k2v2", 30))):
        lm = lmeval.plan_lm(model, tokenizer, plan)
        result = lmeval.run_tasks(lm, manager, settings, log_samples=True)
        runs[name] = (result, type(lm).generate_calls)

    def logliks(name):
        return [r[0][0] for s in runs[name][0]["samples"]["kvtune_wiki_next"] for r in s["resps"]]

    def samples(name):
        return runs[name][0]["samples"]["kvtune_wiki_needle"]

    def generations(name):
        return [s["resps"] for s in samples(name)]

    # One cache per needle request and plan; each layer took the prompt, then single decoded tokens.
    assert runs["k16v16"][1] == runs["k2v2"][1] == 3 and runs["fp"][1] == 0 and len(caches) == 6
    for calls in caches:
        assert sorted(calls) == list(range(30)) and len({len(steps) for steps in calls.values()}) == 1
        assert all(steps[0] > 1 and len(steps) > 1 and set(steps[1:]) == {1} for steps in calls.values())
    assert logliks("k16v16") == logliks("fp")  # the 16-bit plan reproduces FP16 exactly
    assert logliks("k2v2") != logliks("fp")  # 2-bit K/V reach the log-likelihood requests
    assert generations("k16v16") == generations("fp")  # and the generation requests
    assert generations("k2v2") != generations("fp")
    for name in runs:
        items = [float(s["exact_match"]) for s in samples(name)]
        assert lmeval.scores(runs[name][0])["lm-eval:kvtune_wiki_needle:exact_match"] == pytest.approx(sum(items) / 3)


@needs_lm_eval
@pytest.mark.slow
def test_a_task_score_decides_the_race(tiny_model_dir, tmp_path):
    from kvtune.profiling import run_profile
    from kvtune.search import SearchSettings, run_search
    from tests.test_profile import _settings

    run_profile(_settings(tiny_model_dir), tmp_path / "p", progress=False)
    settings = SearchSettings(profile=str(tmp_path / "p"), budget="5bits", groups=2, verify=2, verify_windows=8,
                              verify_metric="lm-eval:kvtune_wiki_next")
    result = run_search(settings, tmp_path / "s", progress=False)
    verified = result.front.dropna(subset=["verified_nll"])
    assert len(verified) >= 2 and (verified["verified_windows"] == 8).all()
    # Errors of 8 items of 0/1 scores: multiples of 1/8 between 0 and 1.
    errors = verified["verified_nll"].to_numpy() * 8
    assert ((errors >= 0) & (errors <= 8) & (abs(errors - errors.round()) < 1e-9)).all()
    assert result.meta["settings"]["verify_metric"] == "lm-eval:kvtune_wiki_next"
