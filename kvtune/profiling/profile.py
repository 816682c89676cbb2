"""``kvtune profile``: per-layer sensitivity to every candidate (K bits, V bits) pair.

Stage 1 — one forward + backward per batch of calibration windows through the probe
(:mod:`kvtune.profiling.probe`): attention-output errors and first-order Taylor terms for every
layer and pair. Checkpointed after every batch.

Stage 2 — measured single-layer impact (:mod:`kvtune.profiling.measure`) for every layer at one
aggressive pair and for a few layers at every pair, to check the estimate. Checkpointed after
every measurement, so a resumed run never measures a finished layer again.

The estimate the search uses (column ``taylor``) is ``taylor_fisher``, built from the first-order
Taylor term of every rounded element:

    taylor(l, p) = 1/(2N) · Σ_w Σ_i ( g_{w,i} · (Q_p(x)_{w,i} − x_{w,i}) )²

over the layer's keys and values, where ``g`` is the gradient of window ``w``'s summed NLL with
respect to the K/V as read from the quantized store, ``Q_p`` the pair's fake-quantizer and ``N``
the number of predicted tokens. It is the diagonal empirical-Fisher form of the expected loss
increase: always positive and additive over layers, which is what a search needs (the signed
first-order sum cancels between windows and elements). The other variants are kept as columns
and the rank correlation of each with the measured impact is in the summary
(see ``docs/profile-format.md``).
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from kvtune.data import DEFAULT_DATA, load_windows
from kvtune.arch import describe
from kvtune.errors import ProfileError
from kvtune.models import DEFAULT_MODEL, canonical_name, input_device, load_model
from kvtune.plan import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_KEY_MODE,
    DEFAULT_RESIDUAL,
    DEFAULT_VALUE_MODE,
    fit_group_size,
    pair_name,
    parse_pair,
)
from kvtune.profiling.artifact import HEATMAP_FILE, SCHEMA, SCHEMA_VERSION, Profile, save_heatmap, spearman
from kvtune.profiling.measure import LayerReplay
from kvtune.profiling.probe import Candidates, Probe, probing

DEFAULT_PAIRS = ("k16v16", "k8v8", "k8v4", "k4v8", "k4v4", "k4v2", "k2v4", "k2v2")
ESTIMATOR = "taylor_fisher"
STATE_DIR = "state"


@dataclass
class ProfileSettings:
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    seq_len: int = 512
    windows: int = 8
    batch_size: int = 2
    seed: int = 0
    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's own (bf16/fp16) on GPUs
    device_map: str | None = None  # accelerate: auto, balanced, or a JSON map; spreads the model over devices
    max_memory: str | None = None  # accelerate: e.g. "0=70GiB,1=70GiB,cpu=200GiB"
    pairs: list[str] = field(default_factory=lambda: list(DEFAULT_PAIRS))
    key_mode: str = DEFAULT_KEY_MODE
    value_mode: str = DEFAULT_VALUE_MODE
    group_size: int = DEFAULT_GROUP_SIZE
    residual: int = DEFAULT_RESIDUAL
    validate_windows: int = 2  # 0 skips the measured validation (no Spearman in the summary)
    validate_pair: str = "k2v2"
    validate_layers: list[int] | None = None  # None: first, middle and last layer

    def candidates(self) -> Candidates:
        pairs = [parse_pair(p) for p in self.pairs]
        if len(set(pairs)) != len(pairs):
            raise ProfileError(f"pairs listed twice in {self.pairs}")
        return Candidates(pairs, self.key_mode, self.value_mode, self.group_size, self.residual)

    def fingerprint(self) -> dict:
        """What the partial results depend on; device and progress do not count."""
        d = asdict(self)
        for placement in ("device", "device_map", "max_memory"):
            d.pop(placement)
        return d


_pair_name = pair_name


class _State:
    """Partial results in ``out/state/``, written atomically after every unit of work."""

    def __init__(self, folder: Path, settings: ProfileSettings, fresh: bool):
        self.folder = folder / STATE_DIR
        self.path = self.folder / "progress.json"
        fingerprint = settings.fingerprint()
        if self.path.is_file() and not fresh:
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as e:
                raise ProfileError(f"{self.path} is corrupt ({e}); rerun with --fresh to start over") from None
            if self.data.get("settings") != fingerprint:
                raise ProfileError(
                    f"{folder} holds a partial profile made with other settings; use --fresh to discard it or another --out"
                )
        else:
            self.data = {"settings": fingerprint, "batches_done": 0, "stage1": None, "measured": {}, "timings": {}}

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data))
        tmp.replace(self.path)


def _warn_short_windows(shape, settings) -> None:
    """Sliding layers whose window ends inside the full-precision tail never read a quantized token."""
    short = [shape.model_layer(i) for i in range(shape.num_layers)
             if shape.window(i) and shape.window(i) - 1 < settings.residual + settings.group_size]
    if short:
        print(f"kvtune: note: layer(s) {short} attend to a sliding window of at most residual + group "
              f"({settings.residual} + {settings.group_size}) tokens: quantized tokens leave the window before or soon "
              "after they are rounded, so those layers show little or no sensitivity and save little memory")


def _new_stage1(num_layers: int, c: Candidates) -> dict:
    names = [_pair_name(k, v) for k, v in c.pairs]
    return {
        "tokens": 0,
        "reference": [0.0] * num_layers,
        "key_only": [{str(b): 0.0 for b in c.key_bits} for _ in range(num_layers)],
        "value_only": [{str(b): 0.0 for b in c.value_bits} for _ in range(num_layers)],
        "joint": [{n: 0.0 for n in names} for _ in range(num_layers)],
        # per pair: [Σ_w s_w, Σ_w |s_w|, Σ |g⊙Δ|, Σ (g⊙Δ)²]
        "first_order": [{n: [0.0, 0.0, 0.0, 0.0] for n in names} for _ in range(num_layers)],
    }


def _profile_batch(model, ids: torch.Tensor, c: Candidates, acc: dict) -> None:
    probe = Probe(c, len(acc["reference"]), describe(model).plan_index)
    with probing(model, probe):
        logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    loss.backward()
    acc["tokens"] += ids[:, 1:].numel()
    for layer, sums in enumerate(probe.errors):
        acc["reference"][layer] += sums.reference
        for b, e in sums.key_only.items():
            acc["key_only"][layer][str(b)] += e
        for b, e in sums.value_only.items():
            acc["value_only"][layer][str(b)] += e
        terms = probe.first_order_terms(layer)
        for k, v in c.pairs:
            name = _pair_name(k, v)
            if (k, v) in sums.joint:
                acc["joint"][layer][name] += sums.joint[(k, v)]
            if (k, v) == (16, 16):  # nothing is rounded
                continue
            per_window = sum(terms[side][bits] for side, bits in (("k", k), ("v", v)) if bits != 16)
            signed, elem_abs, elem_sq = per_window.unbind(1)
            row = acc["first_order"][layer][name]
            row[0] += signed.sum().item()
            row[1] += signed.abs().sum().item()
            row[2] += elem_abs.sum().item()
            row[3] += elem_sq.sum().item()


def _validation_targets(settings: ProfileSettings, num_layers: int) -> list[tuple[int, str]]:
    layers = settings.validate_layers if settings.validate_layers is not None else sorted({0, num_layers // 2, num_layers - 1})
    if any(not 0 <= layer < num_layers for layer in layers):
        raise ProfileError(f"validate layers {layers} outside 0..{num_layers - 1}")
    aggressive = _pair_name(*parse_pair(settings.validate_pair))
    names = [_pair_name(*parse_pair(p)) for p in settings.pairs if parse_pair(p) != (16, 16)]
    if aggressive not in names and names:  # e.g. an engine-format profile: its own narrowest pair
        c = settings.candidates()
        aggressive = min(names, key=lambda n: sum(spec.bits for spec in (c.key_spec(parse_pair(n)[0]), c.value_spec(parse_pair(n)[1]))))
    targets = [(layer, aggressive) for layer in range(num_layers)]
    targets += [(layer, name) for layer in layers for name in names if name != aggressive]
    return targets


def _table(acc: dict, measured: dict, c: Candidates) -> pd.DataFrame:
    rows, tokens = [], acc["tokens"]
    for layer in range(len(acc["reference"])):
        reference = acc["reference"][layer] or 1.0

        def rel(sq: float) -> float:
            return math.sqrt(sq / reference)

        for k, v in c.pairs:
            name = _pair_name(k, v)
            k_err = rel(acc["key_only"][layer][str(k)]) if k != 16 else 0.0
            v_err = rel(acc["value_only"][layer][str(v)]) if v != 16 else 0.0
            if k == 16 or v == 16:
                joint = max(k_err, v_err)  # only one side is rounded
            else:
                joint = rel(acc["joint"][layer][name])
            fo = acc["first_order"][layer][name]
            dnll, kl = measured.get(f"{layer}:{name}", (math.nan, math.nan))
            rows.append(
                {
                    "layer": layer,
                    "pair": name,
                    "k_bits": c.key_spec(k).bits,  # nominal width; the pair name tells the format
                    "v_bits": c.value_spec(v).bits,
                    "nominal_bits": (c.key_spec(k).bits + c.value_spec(v).bits) / 2,
                    "attn_err": joint,
                    "attn_err_k": k_err,
                    "attn_err_v": v_err,
                    "taylor_signed": fo[0] / tokens,
                    "taylor_abs": fo[1] / tokens,
                    "taylor_elem": fo[2] / tokens,
                    "taylor_fisher": 0.5 * fo[3] / tokens,
                    "measured_dnll": dnll,
                    "measured_kl": kl,
                }
            )
    table = pd.DataFrame(rows)
    table.insert(table.columns.get_loc("taylor_signed"), "taylor", table[ESTIMATOR])
    return table


def _summary(table: pd.DataFrame, c: Candidates) -> dict:
    measured = table[table["measured_kl"].notna() & (table["pair"] != "K16V16")]
    correlations = {
        f"{est}_vs_{target}": spearman(measured[est].to_numpy(), measured[f"measured_{target}"].to_numpy())
        for est in ("taylor", "taylor_signed", "taylor_abs", "taylor_elem", "taylor_fisher", "attn_err")
        for target in ("dnll", "kl")
    }
    key_vs_value = {}
    labels = table["pair"].map(parse_pair)
    for b in sorted(set(c.key_bits) & set(c.value_bits), key=lambda x: (isinstance(x, str), str(x))):
        k = table[labels.map(lambda kv: kv[0] == b)].groupby("layer")["attn_err_k"].first()
        v = table[labels.map(lambda kv: kv[1] == b)].groupby("layer")["attn_err_v"].first()
        key_vs_value[str(b)] = {"mean_attn_err_key_only": float(k.mean()), "mean_attn_err_value_only": float(v.mean())}
    return {"estimator": ESTIMATOR, "spearman": correlations, "measured_points": int(len(measured)), "key_vs_value": key_vs_value}


def run_profile(settings: ProfileSettings, out: str | Path, fresh: bool = False, progress: bool = True) -> Profile:
    """Profile ``settings.model`` and write the artifact to ``out``; resumes what ``out`` holds."""
    import transformers

    out = Path(out)
    c = settings.candidates()  # bad pairs fail before the model loads
    if settings.seq_len <= settings.residual + settings.group_size:
        raise ProfileError(
            f"windows of {settings.seq_len} tokens leave nothing to quantize with residual {settings.residual} and "
            f"group {settings.group_size}; use a longer --max-tokens"
        )
    model, tokenizer = load_model(settings.model, settings.device, settings.dtype, settings.device_map, settings.max_memory)
    arch = describe(model)
    shape, left_out = arch.shape, arch.left_out
    if left_out:
        print(f"kvtune: note: {len(left_out)} layer(s) left outside the plan, they keep no growing K/V: "
              + "; ".join(f"layer {i}: {why}" for i, why in left_out))
    if shape.head_dim % settings.group_size and settings.group_size == DEFAULT_GROUP_SIZE:
        fitted = fit_group_size(shape.head_dim, settings.group_size)
        print(f"kvtune: note: head_dim {shape.head_dim} is not a multiple of the default group {settings.group_size}; "
              f"per-token groups of {fitted} are used (--group-size overrides)")
        settings = replace(settings, group_size=fitted)
        c = settings.candidates()
    state = _State(out, settings, fresh)
    _warn_short_windows(shape, settings)
    model.requires_grad_(False)  # gradients are wanted for K/V only
    windows = load_windows(tokenizer, "calibration", settings.seq_len, settings.windows, settings.seed, settings.data)
    device = input_device(model)

    acc = state.data["stage1"] or _new_stage1(shape.num_layers, c)
    batches = list(range(0, len(windows), settings.batch_size))
    start = time.perf_counter()
    for index in tqdm(range(len(batches)), desc="profile: gradients + attention errors", disable=not progress,
                      initial=state.data["batches_done"], total=len(batches)):
        if index < state.data["batches_done"]:
            continue
        _profile_batch(model, windows[batches[index] : batches[index] + settings.batch_size].to(device), c, acc)
        state.data.update(stage1=acc, batches_done=index + 1)
        state.data["timings"]["stage1_s"] = state.data["timings"].get("stage1_s", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        state.save()

    targets = [] if settings.validate_windows == 0 else _validation_targets(settings, shape.num_layers)
    targets = [t for t in targets if f"{t[0]}:{t[1]}" not in state.data["measured"]]
    if targets:
        start = time.perf_counter()
        replay = LayerReplay(model, windows[: settings.validate_windows].to(device))
        for layer, name in tqdm(targets, desc="profile: measured single-layer impact", disable=not progress):
            k, v = parse_pair(name)
            state.data["measured"][f"{layer}:{name}"] = replay.single_layer_impact(layer, c.layer_plan(k, v))
            state.data["timings"]["stage2_s"] = state.data["timings"].get("stage2_s", 0.0) + time.perf_counter() - start
            start = time.perf_counter()
            state.save()

    table = _table(acc, state.data["measured"], c)
    meta = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "model": canonical_name(settings.model),
        "shape": shape.to_dict(),
        "left_out": [{"layer": i, "reason": why} for i, why in left_out],
        "pairs": [_pair_name(k, v) for k, v in c.pairs],
        "settings": asdict(settings),
        "data": {"name": settings.data, "split": "calibration", "seq_len": settings.seq_len, "windows": settings.windows,
                 "validation_windows": settings.validate_windows},
        "tokens": acc["tokens"],
        "timings": state.data["timings"],
        "summary": _summary(table, c),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
    }
    profile = Profile(table, meta)
    profile.save(out)
    save_heatmap(profile, out / HEATMAP_FILE)
    return profile
