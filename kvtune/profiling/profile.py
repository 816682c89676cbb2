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

from kvtune import inputs
from kvtune.data import DEFAULT_DATA, load_windows
from kvtune.arch import describe, input_device
from kvtune.distributed import Ranks, ranks
from kvtune.errors import ProfileError
from kvtune.formats import FORMAT_SETS
from kvtune.models import DEFAULT_MODEL, canonical_name, load_model, load_tokenizer
from kvtune.quant import MODES
from kvtune.plan import (
    Plan,
    DEFAULT_GROUP_SIZE,
    DEFAULT_KEY_MODE,
    DEFAULT_RESIDUAL,
    DEFAULT_VALUE_MODE,
    fit_group_size,
    candidate_name,
    fit_candidate,
    pair_name,
    parse_candidate,
    parse_pair,
)
from kvtune.profiling.artifact import HEATMAP_FILE, SCHEMA, Profile, save_heatmap, schema_version, spearman
from kvtune.profiling.measure import LayerReplay
from kvtune.formats import CALIBRATED
from kvtune.profiling.calibrate import amax_problem, calibrate_amax
from kvtune.profiling.probe import Candidates, Probe, probing

DEFAULT_FORMATS = "int+g"  # the --formats set profiled unless another is asked for (kvtune.formats.FORMAT_SETS)
DEFAULT_PAIRS = FORMAT_SETS[DEFAULT_FORMATS]
ESTIMATOR = "taylor_fisher"
STATE_DIR = "state"
VALIDATION_KEYS = ("validate_windows", "validate_pair", "validate_layers")


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
    validate_layers: list[int] | None = None  # None: the middle layer (every layer is measured at validate_pair)
    recompute_attention: bool = True  # the probe's (T, T) views: recomputed in the backward (memory of one layer) or kept

    def candidates(self) -> Candidates:
        """The candidates under study; ones that name the profile's own group or window stand for the
        plain pair, and :meth:`check` drops such repeats (a name given twice is refused)."""
        as_given = [candidate_name(*parse_candidate(p)) for p in self.pairs]
        if len(set(as_given)) != len(as_given):
            raise ProfileError(f"candidates listed twice in {self.pairs}")
        return Candidates(list(self.pairs), self.key_mode, self.value_mode, self.group_size, self.residual)

    def fingerprint(self) -> dict:
        """What the gradient stage depends on: not placement, not the measured validation (whose
        settings may change between runs without redoing the gradients)."""
        d = asdict(self)
        for key in ("device", "device_map", "max_memory", "recompute_attention") + VALIDATION_KEYS:
            d.pop(key)
        return d

    def check(self, out: str | Path, overwrite: bool = False):
        """Every input checked before the model loads (see :mod:`kvtune.inputs`); returns the
        settings with the group fitted to the model's head size, and the model's shape."""
        from kvtune.data import check_data

        inputs.check_out_dir(out, "profile", settings=None)
        self.candidates()  # names, widths and repeats as given
        inputs.check_counts((("--max-tokens", self.seq_len, 1), ("--windows", self.windows, 1),
                             ("--batch-size", self.batch_size, 1), ("--group-size", self.group_size, 1),
                             ("--residual", self.residual, 0), ("--validate-windows", self.validate_windows, 0)), ProfileError)
        if self.seq_len <= self.residual + self.group_size:
            raise ProfileError(
                f"windows of {self.seq_len} tokens leave nothing to quantize with residual {self.residual} and "
                f"group {self.group_size}; use a longer --max-tokens"
            )
        if self.validate_windows > self.windows:
            raise ProfileError(f"--validate-windows {self.validate_windows} is more than the {self.windows} calibration "
                               "windows it measures on; lower it or raise --windows")
        try:
            parse_pair(self.validate_pair)
        except ValueError as e:  # PlanError
            raise ProfileError(f"--validate-pair: {e}") from None
        for option, mode in (("--key-mode", self.key_mode), ("--value-mode", self.value_mode)):
            if mode not in MODES:
                raise ProfileError(f"{option} {mode!r}: expected one of {list(MODES)}")
        shape = inputs.model_shape(self.model, self.device, self.dtype, self.device_map, self.max_memory,
                                   tokens={"--max-tokens": self.seq_len})
        inputs.check_layers(self.validate_layers, shape)
        check_data(self.data)
        settings = self
        if shape is not None and shape.group_dim % self.group_size and self.group_size == DEFAULT_GROUP_SIZE:
            fitted = fit_group_size(shape.group_dim, self.group_size)
            sizes = f"head_dim {shape.head_dim}" if shape.is_uniform else f"the head sizes (largest common divisor {shape.group_dim})"
            print(f"kvtune: note: {sizes} is not a multiple of the default group {self.group_size}; "
                  f"per-token groups of {fitted} are used (--group-size overrides)")
            settings = replace(self, group_size=fitted)
        settings = _fit_candidate_groups(settings, None if shape is None else shape.group_dim)
        c = settings.candidates()
        for name, p in zip(c.names, c.pairs):
            plan = c.layer_plan(*p)
            group = max(spec.group_size if spec.mode == "per-channel" and not spec.is_engine else 0 for spec in (plan.key, plan.value))
            if self.seq_len <= plan.residual + group:
                raise ProfileError(f"candidate {name}: windows of {self.seq_len} tokens leave nothing to quantize with its "
                                   f"window {plan.residual} and group {group}; use a longer --max-tokens")
        if shape is not None:  # every candidate must fit every layer's head sizes (a per-token group divides them)
            for name, p in zip(c.names, c.pairs):
                try:
                    Plan((c.layer_plan(*p),) * shape.num_layers).check_model(shape)
                except ValueError as e:
                    option = f"--group-size {settings.group_size}" if p[2] is None else f"candidate {name}"
                    raise ProfileError(f"{option}: {str(e).split(': ', 1)[-1]}") from None
        _State(Path(out), settings, overwrite)  # an earlier profile of other settings is refused here
        return settings, shape


_pair_name = pair_name


def _fit_candidate_groups(settings: ProfileSettings, head_dim: int | None) -> ProfileSettings:
    """Candidates as the profile will name them (:func:`kvtune.plan.fit_candidate`): a group that
    does not divide the head size fitted, a group or window equal to the profile's own dropped, so
    a named set serves every head size and ``--group-size``; one that then equals another is dropped.
    Both are printed."""
    per_token = "per-token" in (settings.key_mode, settings.value_mode)
    names = []
    for text in settings.pairs:
        group = parse_candidate(text)[2]
        if group is not None and per_token and head_dim and head_dim % group:
            print(f"kvtune: note: candidate {candidate_name(*parse_candidate(text))}: head_dim {head_dim} is not a multiple "
                  f"of {group}; per-token groups of {fit_group_size(head_dim, group)} are used")
        names.append(fit_candidate(text, settings.group_size, settings.residual, head_dim, per_token))
    kept = list(dict.fromkeys(names))
    if len(kept) < len(names):
        first: dict[str, str] = {}
        dropped = []
        for text, name in zip(settings.pairs, names):
            given = candidate_name(*parse_candidate(text))
            if name in first:
                dropped.append(f"{given} = {first[name]}")
            else:
                first[name] = given
        print(f"kvtune: note: {len(dropped)} candidate(s) dropped, each the same as one kept with --group-size "
              f"{settings.group_size} and --residual {settings.residual} for this head size: {', '.join(dropped)}")
    return replace(settings, pairs=kept) if kept != list(settings.pairs) else settings


class _State:
    """Partial results in ``out/state/progress.json``, written atomically after every unit of work.

    The gradient stage is kept while its settings hold; measured validations are kept while the
    number of validation windows holds (another --validate-pair or --validate-layers only adds
    measurements)."""

    def __init__(self, folder: Path, settings: ProfileSettings, fresh: bool, group: Ranks = Ranks()):
        self.folder = folder / STATE_DIR
        self.path = self.folder / group.state_name("progress")  # under torchrun each rank resumes its own share
        self.batches = len(group.share(range(-(-settings.windows // settings.batch_size))))
        fingerprint = settings.fingerprint()
        new = {"settings": fingerprint, "validation_windows": settings.validate_windows, "batches_done": 0,
               "stage1": None, "measured": {}, "timings": {}}
        if fresh or not self.path.is_file():
            self.data = new
            self._check_finished(folder, settings, fresh)
            return
        self.data = _read_progress(self.path, settings, self.batches)
        earlier = {k: v for k, v in self.data["settings"].items() if k not in VALIDATION_KEYS}
        changed = inputs.changes(earlier, inputs.comparable(fingerprint))
        if changed:
            raise ProfileError(f"{folder} holds a profile made with other settings ({changed}); use --overwrite to "
                               "discard it, or another --out")
        windows = self.data.get("validation_windows", self.data["settings"].get("validate_windows"))
        if windows != settings.validate_windows:
            self.data["measured"] = {}  # measured on another number of windows
        self.data.update(settings=fingerprint, validation_windows=settings.validate_windows)

    @staticmethod
    def _check_finished(folder: Path, settings: ProfileSettings, fresh: bool) -> None:
        """A finished profile whose state was removed: refuse to replace it with other settings."""
        from kvtune.profiling.artifact import META_FILE, TABLE_FILE

        if not fresh:
            inputs.check_out_dir(folder, "profile", META_FILE, settings, overwrite=False,
                                 result_files=(TABLE_FILE, HEATMAP_FILE))

    def save(self) -> None:
        from kvtune import files

        files.write_text(self.path, json.dumps(self.data))


def _read_progress(path: Path, settings: ProfileSettings, batches: int) -> dict:
    """progress.json checked field by field: a corrupt file is named, never half-trusted.
    ``batches``: how many batches this process computes (all of them, or a rank's share)."""
    from kvtune.files import read_json

    data = read_json(path, ProfileError, "profile progress file")

    def bad(what: str):
        return ProfileError(f"{path}: {what}; rerun with --overwrite to start the profile over")

    if not isinstance(data, dict):
        raise bad(f"expected a JSON object, got {type(data).__name__}")
    for key, kind in (("settings", dict), ("batches_done", int), ("measured", dict), ("timings", dict)):
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            raise bad(f"'{key}' must be a JSON {'object' if kind is dict else 'integer'}")
    if not 0 <= data["batches_done"] <= batches:
        raise bad(f"'batches_done' is {data['batches_done']}, outside 0..{batches}")
    stage1 = data.get("stage1")
    if data["batches_done"] and not isinstance(stage1, dict):
        raise bad("'stage1' is missing although batches are done")
    if stage1 is not None:
        if not isinstance(stage1, dict) or set(stage1) != {"tokens", "reference", "key_only", "value_only", "joint", "first_order"}:
            raise bad("'stage1' does not hold the gradient stage's sums")
        lengths = {len(v) for k, v in stage1.items() if k != "tokens" and isinstance(v, list)}
        if len(lengths) != 1 or not isinstance(stage1["tokens"], int):
            raise bad("'stage1' lists differ in length")
    for key, value in data["measured"].items():
        if not (isinstance(value, list) and len(value) == 2 and all(isinstance(x, (int, float)) for x in value)):
            raise bad(f"measured entry {key!r} is not a pair of numbers")
    if not all(isinstance(v, (int, float)) for v in data["timings"].values()):
        raise bad("'timings' must map names to seconds")
    if data.get("amax") is not None and stage1 is not None and (problem := amax_problem(data["amax"], len(stage1["reference"]))):
        raise bad(problem)
    return data


def _warn_short_windows(shape, settings) -> None:
    """Sliding layers whose window ends inside the full-precision tail never read a quantized token."""
    short = [shape.model_layer(i) for i in range(shape.num_layers)
             if shape.window(i) and shape.window(i) - 1 < settings.residual + settings.group_size]
    if short:
        print(f"kvtune: note: layer(s) {short} attend to a sliding window of at most residual + group "
              f"({settings.residual} + {settings.group_size}) tokens: quantized tokens leave the window before or soon "
              "after they are rounded, so those layers show little or no sensitivity and save little memory")


def _new_stage1(num_layers: int, c: Candidates) -> dict:
    names = c.names
    return {
        "tokens": 0,
        "reference": [0.0] * num_layers,
        "key_only": [{s.name: 0.0 for s in c.key_sides} for _ in range(num_layers)],
        "value_only": [{s.name: 0.0 for s in c.value_sides} for _ in range(num_layers)],
        "joint": [{n: 0.0 for n in names} for _ in range(num_layers)],
        # per pair: [Σ_w s_w, Σ_w |s_w|, Σ |g⊙Δ|, Σ (g⊙Δ)²]
        "first_order": [{n: [0.0, 0.0, 0.0, 0.0] for n in names} for _ in range(num_layers)],
    }


def _profile_batch(model, ids: torch.Tensor, c: Candidates, acc: dict, recompute: bool = True) -> None:
    probe = Probe(c, len(acc["reference"]), describe(model).attending_index, recompute)
    with probing(model, probe):
        logits = model(input_ids=ids, use_cache=False).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    loss.backward()
    acc["tokens"] += ids[:, 1:].numel()
    for layer, sums in enumerate(probe.errors):
        acc["reference"][layer] += sums.reference
        for name, e in sums.key_only.items():
            acc["key_only"][layer][name] += e
        for name, e in sums.value_only.items():
            acc["value_only"][layer][name] += e
        terms = probe.first_order_terms(layer)
        for name, p in zip(c.names, c.pairs):
            if name in sums.joint:
                acc["joint"][layer][name] += sums.joint[name]
            key, value = c.sides(*p)
            if key.is_full and value.is_full:  # nothing is rounded
                continue
            per_window = sum(terms[which][side.name] for which, side in (("k", key), ("v", value)) if not side.is_full)
            signed, elem_abs, elem_sq = per_window.unbind(1)
            row = acc["first_order"][layer][name]
            row[0] += signed.sum().item()
            row[1] += signed.abs().sum().item()
            row[2] += elem_abs.sum().item()
            row[3] += elem_sq.sum().item()


def _validation_targets(settings: ProfileSettings, num_layers: int) -> list[tuple[int, str]]:
    # Every layer at the aggressive pair ranks layers; one layer at every candidate ranks candidates.
    # (22 candidates at three layers would double the validation's time.)
    layers = settings.validate_layers if settings.validate_layers is not None else [num_layers // 2]
    if any(not 0 <= layer < num_layers for layer in layers):
        raise ProfileError(f"validate layers {layers} outside 0..{num_layers - 1}")
    c = settings.candidates()
    aggressive = _pair_name(*parse_pair(settings.validate_pair))
    names = [n for n, p in zip(c.names, c.pairs) if p[:2] != (16, 16)]
    if aggressive not in names and names:  # e.g. an engine-format profile: its own narrowest pair
        plans = dict(zip(c.names, (c.layer_plan(*p) for p in c.pairs)))
        aggressive = min(names, key=lambda n: plans[n].key.bits + plans[n].value.bits)
    targets = [(layer, aggressive) for layer in range(num_layers)]
    targets += [(layer, name) for layer in layers for name in names if name != aggressive]
    return targets


def _table(acc: dict, measured: dict, c: Candidates) -> pd.DataFrame:
    rows, tokens = [], acc["tokens"]
    for layer in range(len(acc["reference"])):
        reference = acc["reference"][layer] or 1.0

        def rel(sq: float) -> float:
            return math.sqrt(sq / reference)

        for name, p in zip(c.names, c.pairs):
            key, value = c.sides(*p)
            k_err = rel(acc["key_only"][layer][key.name]) if not key.is_full else 0.0
            v_err = rel(acc["value_only"][layer][value.name]) if not value.is_full else 0.0
            if key.is_full or value.is_full:
                joint = max(k_err, v_err)  # only one side is rounded
            else:
                joint = rel(acc["joint"][layer][name])
            fo = acc["first_order"][layer][name]
            dnll, kl = measured.get(f"{layer}:{name}", (math.nan, math.nan))
            rows.append(
                {
                    "layer": layer,
                    "pair": name,
                    "k_bits": c.spec(key, "key").bits,  # nominal width; the pair name tells the format
                    "v_bits": c.spec(value, "value").bits,
                    "nominal_bits": (c.spec(key, "key").bits + c.spec(value, "value").bits) / 2,
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


def _summary(table: pd.DataFrame, c: Candidates, settings: ProfileSettings) -> dict:
    measured = table[table["measured_kl"].notna() & (table["pair"] != "K16V16")]
    correlations = {
        f"{est}_vs_{target}": spearman(measured[est].to_numpy(), measured[f"measured_{target}"].to_numpy())
        for est in ("taylor", "taylor_signed", "taylor_abs", "taylor_elem", "taylor_fisher", "attn_err")
        for target in ("dnll", "kl")
    }
    # A rank correlation needs three measured points; none is written rather than NaN.
    correlations = {name: rho for name, rho in correlations.items() if math.isfinite(rho)}
    note = {}
    if not correlations:
        note["spearman_note"] = ("no measured validation (--validate-windows 0)" if settings.validate_windows == 0
                                 else f"{len(measured)} measured point(s): a rank correlation needs at least 3")
    key_vs_value = {}
    sides = table["pair"].map(dict(zip(c.names, (c.sides(*p) for p in c.pairs))))
    for b in sorted({s.name for s in c.key_sides} & {s.name for s in c.value_sides}):
        k = table[sides.map(lambda kv: kv[0].name == b)].groupby("layer")["attn_err_k"].first()
        v = table[sides.map(lambda kv: kv[1].name == b)].groupby("layer")["attn_err_v"].first()
        key_vs_value[b] = {"mean_attn_err_key_only": float(k.mean()), "mean_attn_err_value_only": float(v.mean())}
    return {"estimator": ESTIMATOR, "spearman": correlations, **note, "measured_points": int(len(measured)),
            "key_vs_value": key_vs_value}


def run_profile(settings: ProfileSettings, out: str | Path, fresh: bool = False, progress: bool = True) -> Profile:
    """Profile ``settings.model`` and write the artifact to ``out``; resumes what ``out`` holds."""
    import transformers

    out = Path(out)
    group = ranks()  # under torchrun: each rank checks, takes every N-th batch, and rank 0 writes
    progress = progress and group.is_main
    settings, expected_shape = group.checked(settings.check, out, overwrite=fresh)
    c = settings.candidates()
    state = group.checked(_State, out, settings, fresh, group)  # refuses other settings' results before the model loads
    windows = load_windows(load_tokenizer(settings.model), "calibration", settings.seq_len, settings.windows, settings.seed,
                           settings.data, option="--windows")
    model, _ = load_model(settings.model, settings.device, settings.dtype, settings.device_map, settings.max_memory)
    arch = describe(model)
    shape, left_out = arch.shape, arch.left_out
    if expected_shape is not None and shape != expected_shape:  # the config-read shape fitted the group
        raise ProfileError(f"{settings.model}: the loaded model's shape {shape} differs from its config's {expected_shape}")
    if left_out:
        print(f"kvtune: note: {len(left_out)} layer(s) left outside the plan, they keep no growing K/V: "
              + "; ".join(f"layer {i}: {why}" for i, why in left_out))
    _warn_short_windows(shape, settings)
    model.requires_grad_(False)  # gradients are wanted for K/V only
    device = input_device(model)

    if any(label in CALIBRATED for p in c.pairs for label in p[:2]):
        # fp8 / nvfp4 scales: one constant per layer from the calibration text, before anything uses them.
        if state.data.get("amax") is None:  # each rank its batches, then the largest over ranks
            mine = [windows[b : b + settings.batch_size] for b in group.share(range(0, len(windows), settings.batch_size))]
            state.data["amax"] = group.max(calibrate_amax(model, torch.cat(mine) if mine else windows[:0], settings.batch_size))
            state.save()
        c.amax = state.data["amax"]
    acc = state.data["stage1"] or _new_stage1(shape.num_layers, c)
    batches = group.share(range(0, len(windows), settings.batch_size))
    start = time.perf_counter()
    for index in tqdm(range(state.data["batches_done"], len(batches)), desc="profile: gradients + attention errors",
                      disable=not progress, initial=state.data["batches_done"], total=len(batches)):
        _profile_batch(model, windows[batches[index] : batches[index] + settings.batch_size].to(device), c, acc,
                       settings.recompute_attention)
        state.data.update(stage1=acc, batches_done=index + 1)
        state.data["timings"]["stage1_s"] = state.data["timings"].get("stage1_s", 0.0) + time.perf_counter() - start
        start = time.perf_counter()
        state.save()

    acc = group.sum(acc)  # the one reduction: float64 sums and token counts of every rank
    wanted = [] if settings.validate_windows == 0 else _validation_targets(settings, shape.num_layers)
    targets = [t for t in group.share(wanted) if f"{t[0]}:{t[1]}" not in state.data["measured"]]
    if targets:
        start = time.perf_counter()
        replay = LayerReplay(model, windows[: settings.validate_windows].to(device))
        pairs = dict(zip(c.names, c.pairs))
        for layer, name in tqdm(targets, desc="profile: measured single-layer impact", disable=not progress):
            state.data["measured"][f"{layer}:{name}"] = replay.single_layer_impact(layer, c.layer_plan(*pairs[name], layer=layer))
            state.data["timings"]["stage2_s"] = state.data["timings"].get("stage2_s", 0.0) + time.perf_counter() - start
            start = time.perf_counter()
            state.save()

    state.data["measured"] = group.merge(state.data["measured"])
    measured = {f"{layer}:{name}": state.data["measured"][f"{layer}:{name}"] for layer, name in wanted}
    table = _table(acc, measured, c)
    meta = {
        "schema": SCHEMA,
        "schema_version": schema_version(shape),
        "model": canonical_name(settings.model),
        "shape": shape.to_dict(),
        "left_out": [{"layer": i, "reason": why} for i, why in left_out],
        "pairs": c.names,
        "settings": asdict(settings),
        "data": {"name": settings.data, "split": "calibration", "seq_len": settings.seq_len, "windows": settings.windows,
                 "validation_windows": settings.validate_windows},
        "tokens": acc["tokens"],
        **({"amax": c.amax} if c.amax is not None else {}),
        "timings": state.data["timings"],  # rank 0's
        "world_size": group.size,  # data-parallel processes (torchrun) that made it
        "summary": _summary(table, c, settings),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
    }
    profile = Profile(table, meta)
    if group.is_main:
        profile.save(out)
        save_heatmap(profile, out / HEATMAP_FILE)
    return profile
