"""Text for calibration, verification and held-out evaluation, loaded offline through ``datasets``.

The embedded default is real English Wikipedia: the 107 articles that gensim ships in its test
data (``enwiki-latest-pages-articles1.xml-...-shortened.bz2``), markup stripped with
mwparserfromhell. Articles, not windows, are split three ways, so no calibration window can
overlap a verification or held-out one. The split is fixed (it does not follow ``--seed``), so
calibration of one run never leaks into the evaluation of another; the seed picks windows.

``pystdlib`` is real code the same way: the Python source files of the running interpreter's
standard library (tests and codec tables excluded), one document per file, split by file like the articles. It is
what the interpreter ships, so it differs between Python versions; the cached split is keyed by
the version and the metadata of a run says which data it read.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from kvtune.errors import DataError

SPLITS = ("calibration", "verification", "heldout")
DEFAULT_DATA = "enwiki"
CODE_DATA = "pystdlib"
_SPLIT_SHARES = {"calibration": 0.5, "verification": 0.15, "heldout": 0.35}  # of characters
_SPLIT_SEED = 20240501  # fixed on purpose, see module docstring
_DUMP = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_CORPUS_VERSION = "v2"  # bump when the cleaning changes, so cached splits are rebuilt
_HUB_SPLITS = {"wikitext": ("wikitext-2-raw-v1", {"calibration": "train", "verification": "validation", "heldout": "test"})}


def _gensim_dump() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default data needs the package 'gensim' (pip install gensim)")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / _DUMP
    if not path.is_file():
        raise DataError(f"gensim is installed but its Wikipedia test dump is missing: {path}")
    return path


def _clean(wikitext: str) -> str:
    import mwparserfromhell

    # Citations are bibliography, not prose: drop them before the markup is stripped.
    wikitext = re.sub(r"<ref[^>]*/>", "", wikitext)
    wikitext = re.sub(r"<ref[^>]*>.*?</ref>", "", wikitext, flags=re.S | re.I)
    text = mwparserfromhell.parse(wikitext).strip_code(normalize=True, collapse=True)
    lines = []
    for line in text.splitlines():
        line = line.strip()
        # Leftovers of tables, galleries and image captions are not prose.
        if not line or line.startswith(("|", "!", "{", "}", "Category:", "thumb|", "File:", "Image:")):
            continue
        lines.append(re.sub(r"\s+", " ", line))
    return "\n".join(lines)


def _wiki_articles(dump: Path) -> list[dict[str, str]]:
    articles = []
    with bz2.open(dump, "rb") as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = {"m": elem.tag[: elem.tag.index("}") + 1].strip("{}")}
            title = elem.findtext("m:title", namespaces=ns) or ""
            raw = elem.findtext("m:revision/m:text", namespaces=ns) or ""
            if elem.findtext("m:ns", namespaces=ns) == "0" and not raw.lstrip().lower().startswith("#redirect"):
                text = _clean(raw)
                if len(text) > 200:
                    articles.append({"title": title, "text": text})
            elem.clear()
    return articles


def split_documents(docs: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    """Assign whole documents to splits by a fixed shuffle, by share of characters."""
    order = list(range(len(docs)))
    random.Random(_SPLIT_SEED).shuffle(order)
    total = sum(len(d["text"]) for d in docs)
    bounds, acc = [], 0.0
    for name in SPLITS:
        acc += _SPLIT_SHARES[name]
        bounds.append((name, acc * total))
    out: dict[str, list] = {name: [] for name in SPLITS}
    seen = 0
    for idx in order:
        name = next((n for n, b in bounds if seen < b), SPLITS[-1])
        out[name].append(docs[idx])
        seen += len(docs[idx]["text"])
    return out


def _cached_split(folder_name: str, documents) -> dict[str, str]:
    """The split files under $KVTUNE_HOME/data/<folder_name>, written once from ``documents()``
    (each file under a temporary name first, so a reader never sees a partial split)."""
    from kvtune.models import kvtune_home

    folder = kvtune_home() / "data" / folder_name
    files = {name: folder / f"{name}.jsonl" for name in SPLITS}
    if not all(p.is_file() for p in files.values()):
        folder.mkdir(parents=True, exist_ok=True)
        for name, docs in split_documents(documents()).items():
            tmp = files[name].with_suffix(f".tmp{os.getpid()}")
            tmp.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
            tmp.replace(files[name])
    return {name: str(p) for name, p in files.items()}


def _default_split_files() -> dict[str, str]:
    return _cached_split(f"enwiki-gensim-{_CORPUS_VERSION}", lambda: _wiki_articles(_gensim_dump()))


def _stdlib_sources() -> list[dict[str, str]]:
    """Every .py file of the standard library outside test folders and site-packages, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}  # codec tables are data
    docs = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if skipped & set(relative.parts[:-1]):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):  # a few files are deliberately not UTF-8
            continue
        if len(text) > 200:
            docs.append({"title": relative.as_posix(), "text": text})
    if len(docs) < len(SPLITS):
        raise DataError(f"--data {CODE_DATA}: found {len(docs)} source files under {root}; the interpreter's standard "
                        "library is not readable here")
    return docs


def _code_split_files() -> dict[str, str]:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return _cached_split(f"{CODE_DATA}-{version}-{_CORPUS_VERSION}", _stdlib_sources)


def read_documents(path: Path) -> list[dict[str, str]]:
    """A local file of documents: JSON lines with a 'text' field, or plain text with blank-line
    separated documents. Problems name the file and line."""
    from kvtune.files import parse_json

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    if path.suffix == ".jsonl":
        docs = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            doc = parse_json(line, DataError, f"{path} line {number}")
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise DataError(f"{path} line {number}: expected a JSON object with a 'text' string")
            docs.append(doc)
    else:
        docs = [{"title": "", "text": t.strip()} for t in re.split(r"\n\s*\n", text) if t.strip()]
    if len(docs) < len(SPLITS):
        raise DataError(f"{path}: needs at least {len(SPLITS)} documents to split, found {len(docs)}")
    return docs


def _local_split_files(path: Path) -> dict[str, str]:
    """A local file of documents (:func:`read_documents`) split like the default data."""
    from kvtune.models import kvtune_home

    docs = read_documents(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    folder = kvtune_home() / "data" / f"local-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, part in split_documents(docs).items():
        files[name] = str(folder / f"{name}.jsonl")
        Path(files[name]).write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in part))
    return files


def check_data(name: str | None) -> None:
    """Refuse data that cannot be read, before any model is loaded: the embedded default needs
    gensim's dump (or its cached split), a local file must parse, a hub name must be known."""
    if name is not None and not str(name).strip():
        raise DataError("--data is empty: give 'enwiki', 'pystdlib', a local .jsonl/.txt file or a hub dataset name")
    name = (name or DEFAULT_DATA).strip()
    if name in ("default", DEFAULT_DATA):
        from kvtune.models import kvtune_home

        if not (kvtune_home() / "data" / f"enwiki-gensim-{_CORPUS_VERSION}" / "heldout.jsonl").is_file():
            _gensim_dump()
        return
    if name == CODE_DATA:
        return  # the standard library of the interpreter running kvtune is always there
    path = Path(name).expanduser()
    if path.is_file():
        read_documents(path)
        return
    if path.exists():
        raise DataError(f"--data {name}: is a directory; give a .jsonl or .txt file")
    if name not in _HUB_SPLITS:
        load_corpus(name)  # raises the one message for unknown data


def load_corpus(name: str | None = None):
    """A ``datasets.DatasetDict`` with splits calibration / verification / heldout and a 'text' column.

    ``name``: ``enwiki`` (the embedded default), ``pystdlib`` (the interpreter's own Python source),
    a local .jsonl/.txt file, or ``wikitext`` (Hugging Face hub; needs the network).
    """
    import datasets

    name = (name or DEFAULT_DATA).strip()
    if name in ("default", DEFAULT_DATA):
        return datasets.load_dataset("json", data_files=_default_split_files())
    if name == CODE_DATA:
        return datasets.load_dataset("json", data_files=_code_split_files())
    path = Path(name).expanduser()
    if path.is_file():
        return datasets.load_dataset("json", data_files=_local_split_files(path))
    if name in _HUB_SPLITS:
        config, mapping = _HUB_SPLITS[name]
        try:
            hub = datasets.load_dataset(name, config)
        except Exception as e:  # datasets raises many types for "offline" / "not found"
            raise DataError(f"could not load hub dataset {name!r} (is the network reachable?): {e}") from None
        return datasets.DatasetDict({ours: hub[theirs] for ours, theirs in mapping.items()})
    raise DataError(
        f"unknown data {name!r}: use '{DEFAULT_DATA}' (embedded Wikipedia), '{CODE_DATA}' (the interpreter's Python "
        "source), a local .jsonl/.txt file, "
        f"or one of the hub datasets {sorted(_HUB_SPLITS)}"
    )


def token_stream(tokenizer, split) -> torch.Tensor:
    """All documents of a split, tokenized and joined by EOS into one 1-D LongTensor."""
    texts = [t for t in split["text"] if t and t.strip()]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    flat = [tok for doc in ids for tok in doc + sep]
    return torch.tensor(flat, dtype=torch.long)


def token_windows(tokens: torch.Tensor, seq_len: int, num_windows: int, seed: int = 0) -> torch.Tensor:
    """(num_windows, seq_len) non-overlapping windows chosen with ``seed``, in stream order."""
    available = len(tokens) // seq_len
    if available < num_windows:
        raise DataError(
            f"holds {len(tokens)} tokens: room for {available} windows of {seq_len}, but {num_windows} were asked for"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=gen)[:num_windows].sort().values * seq_len
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


def load_windows(tokenizer, split: str, seq_len: int, num_windows: int, seed: int = 0, data: str | None = None,
                 option: str | None = None):
    """``num_windows`` windows of the split; ``option`` names the option that asked for them in a refusal."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    corpus = load_corpus(data)
    try:
        return token_windows(token_stream(tokenizer, corpus[split]), seq_len, num_windows, seed)
    except DataError as e:
        if option is None:
            raise
        raise DataError(f"{option} {num_windows}: the {split} text of {data or DEFAULT_DATA} {e}; lower {option} or the "
                        "window length") from None
