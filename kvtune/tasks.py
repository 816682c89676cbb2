"""Accuracy tasks built offline from real text, answered by generation through the quantized cache.

- ``analogy``: the published word-analogy benchmark (Mikolov et al., ``questions-words.txt``, as
  shipped in gensim's test data), asked few-shot: "Athens is to Greece as Baghdad is to" → Iraq.
- ``needle``: a sentence from one held-out Wikipedia article planted in a long haystack of other
  held-out articles; the prompt ends with the needle's first words and the model must continue
  with its next words, which only the planted copy provides.
- ``agreement``: greedy continuations of held-out text under the plan, compared token by token
  with FP16's: the share of the first ``new_tokens`` generated before the first divergence.

Items are drawn with a seed; the prompts and answers come from the files, never from this repo.
"""

from __future__ import annotations

import importlib.util
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from kvtune.errors import DataError

TASKS = ("analogy", "needle", "agreement")


@dataclass(frozen=True)
class Item:
    prompt: str
    answer: str


def _analogy_file() -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the analogy task needs the package 'gensim' (its test data holds questions-words.txt)")
    return Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / "questions-words.txt"


def analogy_items(n: int, seed: int = 0, shots: int = 4) -> list[Item]:
    """Few-shot analogy questions from one section each, loaded through ``datasets``."""
    import datasets

    lines = datasets.load_dataset("text", data_files=str(_analogy_file()), split="train")["text"]
    sections: dict[str, list[list[str]]] = {}
    current = None
    for line in lines:
        if line.startswith(":"):
            current = line[1:].strip()
            sections[current] = []
        elif current and len(line.split()) == 4:
            sections[current].append(line.split())
    rng = random.Random(seed)
    names = sorted(sections)
    items = []
    for i in range(n):
        questions = sections[names[i % len(names)]]
        picked = rng.sample(questions, shots + 1)
        lines_ = [f"{a} is to {b} as {c} is to {d}." for a, b, c, d in picked[:shots]]
        a, b, c, d = picked[-1]
        items.append(Item("\n".join(lines_ + [f"{a} is to {b} as {c} is to"]), d))
    return items


def _sentences(text: str) -> list[str]:
    # Lines are paragraphs (or headings): a sentence never spans two.
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [" ".join(s.split()) for s in parts if 12 <= len(s.split()) <= 40]


def needle_items(tokenizer, documents: list[str], n: int, context_tokens: int, seed: int = 0,
                 prefix_words: int = 6, answer_words: int = 4) -> list[Item]:
    """Haystacks of ``context_tokens`` tokens of held-out text with one held-out sentence planted
    at a random depth; the answer is the words after the prompt's prefix of that sentence."""
    if len(documents) < 2:
        raise DataError("the needle task needs at least two held-out documents")
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        needle_doc = rng.randrange(len(documents))
        candidates = _sentences(documents[needle_doc])
        if not candidates:
            continue
        needle = rng.choice(candidates)
        words = needle.split()
        hay_docs = [d for i, d in enumerate(documents) if i != needle_doc]
        rng.shuffle(hay_docs)
        hay_ids = tokenizer("\n\n".join(hay_docs)[: context_tokens * 8], add_special_tokens=False)["input_ids"]
        hay_ids = hay_ids[: context_tokens]
        if len(hay_ids) < context_tokens:
            raise DataError(f"held-out text is shorter than the {context_tokens}-token haystack asked for")
        depth = rng.randint(len(hay_ids) // 10, len(hay_ids) * 9 // 10)
        before, after = tokenizer.decode(hay_ids[:depth]), tokenizer.decode(hay_ids[depth:])
        # Sentence boundaries keep the needle readable where it lands.
        cut = before.rfind(". ") + 1 or len(before)
        haystack = before[:cut] + " " + needle + " " + before[cut:] + after
        prompt = haystack + "\n\nEarlier in this text: " + " ".join(words[:prefix_words])
        items.append(Item(prompt, " ".join(words[prefix_words : prefix_words + answer_words])))
    if not items:
        raise DataError("no sentence of held-out text fits the needle task")
    return items


def _normalise(text: str) -> list[str]:
    return re.findall(r"[\w']+", text.lower())


def is_correct(generated: str, answer: str) -> bool:
    """The generated words start with the answer's words (case and punctuation ignored)."""
    want, got = _normalise(answer), _normalise(generated)
    return bool(want) and got[: len(want)] == want


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], cache_factory, max_new_tokens: int, batch_size: int = 4) -> list[list[int]]:
    """Greedy continuations (token ids), each batch with a fresh cache from ``cache_factory(attention_mask)``
    (the mask tells the cache which rows are left-padded, so padding enters no quantization group).
    Under torchrun each rank generates its share of the batches and every rank returns them all."""
    from kvtune.arch import input_device
    from kvtune.distributed import ranks

    device, group = input_device(model), ranks()
    outputs = {}
    for start in group.share(range(0, len(prompts), batch_size)):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left").to(device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                             cache=cache_factory(batch["attention_mask"]), pad_token_id=tokenizer.pad_token_id)
        outputs[start] = [row[batch["input_ids"].shape[1] :].tolist() for row in out]
    outputs = group.merge(outputs)
    return [row for start in sorted(outputs) for row in outputs[start]]


def accuracy(model, tokenizer, items: list[Item], cache_factory, max_new_tokens: int, batch_size: int = 4) -> float:
    generated = generate(model, tokenizer, [it.prompt for it in items], cache_factory, max_new_tokens, batch_size)
    return sum(is_correct(tokenizer.decode(g, skip_special_tokens=True), it.answer) for g, it in zip(generated, items)) / len(items)


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> float:
    """Mean share of generated tokens before the first divergence from the reference."""
    shares = []
    for ref, cand in zip(reference, candidate):
        same = 0
        for a, b in zip(ref, cand):
            if a != b:
                break
            same += 1
        shares.append(same / max(len(ref), 1))
    return sum(shares) / len(shares)
