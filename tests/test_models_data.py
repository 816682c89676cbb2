import json

import pytest
import torch

from kvtune.data import SPLITS, load_corpus, load_windows, split_documents, token_windows
from kvtune.errors import DataError, ModelError
from kvtune.models import load_model, resolve_model_path


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="model directory not found"):
        resolve_model_path("./no/such/model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path / "empty"))


def test_architecture_without_kv_cache_interface_is_refused_at_load(tmp_path):
    from tests.families import save_tiny

    save_tiny("falcon", tmp_path / "falcon")
    with pytest.raises(ModelError, match="does not go through transformers' attention interface"):
        load_model(str(tmp_path / "falcon"))


def test_latent_attention_is_refused_from_its_config():
    from tests.families import config_for

    from kvtune.arch import check_config

    with pytest.raises(ModelError, match="compressed latent"):
        check_config(config_for("deepseek_v3"))


def test_local_model_directory_loads(tmp_path, tiny_model):
    from tests.families import byte_tokenizer

    tiny_model.save_pretrained(tmp_path / "tiny")
    byte_tokenizer().save_pretrained(tmp_path / "tiny")
    from kvtune.models import resolve_model_path

    assert resolve_model_path(str(tmp_path / "tiny")) == str(tmp_path / "tiny")


def test_documents_split_whole_and_deterministically():
    docs = [{"title": f"t{i}", "text": "x" * (100 + 37 * i)} for i in range(40)]
    a, b = split_documents(docs), split_documents(docs)
    assert a == b
    titles = [{d["title"] for d in a[s]} for s in SPLITS]
    assert sum(len(t) for t in titles) == 40
    assert not (titles[0] & titles[1]) and not (titles[0] & titles[2]) and not (titles[1] & titles[2])


def test_windows_are_seeded_disjoint_and_checked():
    tokens = torch.arange(1000)
    w1, w2 = token_windows(tokens, 64, 5, seed=7), token_windows(tokens, 64, 5, seed=7)
    assert torch.equal(w1, w2)
    assert not torch.equal(w1, token_windows(tokens, 64, 5, seed=8))
    starts = w1[:, 0].tolist()
    assert all(s % 64 == 0 for s in starts) and len(set(starts)) == 5  # aligned, hence non-overlapping
    with pytest.raises(DataError, match="15 windows of 64, but 20 were asked for"):
        token_windows(tokens, 64, 20)


def test_unknown_data_is_a_clear_error():
    with pytest.raises(DataError, match="unknown data 'nonsense'"):
        load_corpus("nonsense")


def test_local_jsonl_data(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 50}) + "\n" for i in range(12)))
    corpus = load_corpus(str(path))
    assert set(corpus) == set(SPLITS)
    assert sum(len(corpus[s]) for s in SPLITS) == 12
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no text"}\n' * 5)
    with pytest.raises(DataError, match="'text' string"):
        load_corpus(str(bad))


@pytest.mark.slow
def test_default_data_is_real_wikipedia_split_by_article(default_model):
    _, tokenizer = default_model
    corpus = load_corpus()
    titles = {s: set(corpus[s]["title"]) for s in SPLITS}
    assert not (titles["calibration"] & titles["heldout"]) and not (titles["verification"] & titles["heldout"])
    assert not (titles["calibration"] & titles["verification"])
    assert sum(len(t) for t in titles.values()) > 100
    words = sum(len(t.split()) for s in SPLITS for t in corpus[s]["text"])
    assert words > 400_000
    assert "Anarchism" in titles["calibration"] | titles["verification"] | titles["heldout"]
    heldout = load_windows(tokenizer, "heldout", 512, 8, seed=0)
    assert heldout.shape == (8, 512) and torch.equal(heldout, load_windows(tokenizer, "heldout", 512, 8, seed=0))
