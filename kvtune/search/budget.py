"""Memory budgets: KVTuner's nominal bits, or real bytes at a context length and batch.

``3.25bits``   the mean nominal width of the cached K and V elements over all layers (K8V4 = 6,
               K16V16 = 16), each layer weighted by its share of the KV elements — the unit of the
               KVTuner paper, so figures compare with published ones.
``2GiB@32k``   the real bytes of the whole cache at 32k tokens (× ``--batch``): packed codes,
               fp16 scales and zero points, and the full-precision residual window.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kvtune.errors import KvtuneError

ACCEPTED = "'<x>bits' (e.g. 3.25bits) or '<size><unit>@<context>' (e.g. 2GiB@32k, 512MB@8192; units B, KB, MB, GB, KiB, MiB, GiB; k = 1024 tokens)"
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_BITS_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*bits?\s*$", re.IGNORECASE)
_BYTES_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmg]i?b|b)\s*@\s*([0-9]+)\s*(k?)\s*$", re.IGNORECASE)


class BudgetError(KvtuneError, ValueError):
    """A budget string cannot be read, or no plan can meet it."""


@dataclass(frozen=True)
class Budget:
    kind: str  # "bits" | "bytes"
    value: float  # mean nominal bits, or bytes
    context: int | None = None
    batch: int = 1
    text: str = ""

    def describe(self) -> str:
        if self.kind == "bits":
            return f"{self.value:g} nominal bits"
        return f"{self.value / 2**20:.1f} MiB at {self.context} tokens, batch {self.batch}"


def parse_budget(text: str, batch: int = 1) -> Budget:
    if batch < 1:
        raise BudgetError(f"batch must be at least 1, got {batch}")
    match = _BITS_RE.match(text or "")
    if match:
        bits = float(match.group(1))
        if bits <= 0:
            raise BudgetError(f"budget {text!r} must be positive; accepted forms: {ACCEPTED}")
        return Budget("bits", bits, text=text)
    match = _BYTES_RE.match(text or "")
    if match:
        size = float(match.group(1)) * _UNITS[match.group(2).lower()]
        context = int(match.group(3)) * (1024 if match.group(4) else 1)
        if size <= 0 or context <= 0:
            raise BudgetError(f"budget {text!r} needs a positive size and context; accepted forms: {ACCEPTED}")
        return Budget("bytes", size, context=context, batch=batch, text=text)
    raise BudgetError(f"cannot read budget {text!r}; accepted forms: {ACCEPTED}")
