"""Checks every command makes before it loads a model or starts work.

The Python API calls them first thing (``run_profile``, ``run_search``, ``evaluate_plans``,
``export_plan``), and the CLI calls nothing else, so a bad option, an unusable output folder or
inputs that do not fit each other fail in seconds, with a :class:`~kvtune.errors.KvtuneError`
that names the option or file, instead of after minutes of work.

Results are never replaced silently. One rule for every command: an ``--out`` that already holds
a result of the same command made with *other* settings is refused unless ``overwrite`` is given;
the same settings may be rerun into it (the result is the same computation again; ``profile``
resumes from it).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from kvtune.errors import KvtuneError, PlanError
from kvtune.plan import ModelShape, Plan, resolve_plan

# Settings that decide where a command runs, not what it computes.
PLACEMENT = ("device", "device_map", "max_memory")


def check_counts(counts, error: type[KvtuneError] = KvtuneError) -> None:
    """Each (option, value, lowest) an integer (not a bool) of at least ``lowest``: the Python API
    receives what typer would have checked."""
    for option, value, low in counts:
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise error(f"{option} must be an integer of at least {low}, got {value!r}")


def parse_layers(text: str | None, option: str = "--validate-layers") -> list[int] | None:
    """``"0,15,29"`` → [0, 15, 29]; empty → None. Range checks need the model (:func:`check_layers`)."""
    if text is None or not str(text).strip():
        return None
    layers = []
    for part in str(text).split(","):
        part = part.strip()
        if not part.isdigit():
            raise KvtuneError(f"{option} {text!r}: {part!r} is not a layer number (expected e.g. 0,15,29)")
        layers.append(int(part))
    return layers


def check_layers(layers: list[int] | None, shape: ModelShape | None, option: str = "--validate-layers") -> None:
    if layers is None or shape is None:
        return
    bad = [layer for layer in layers if not 0 <= layer < shape.num_layers]
    if bad:
        raise KvtuneError(f"{option}: layer(s) {bad} outside 0..{shape.num_layers - 1} (the model's {shape.num_layers} "
                          "attention layers, counted in plan order)")


def model_shape(model: str | None, device=None, dtype=None, device_map=None, max_memory=None,
                tokens: dict[str, int] | None = None) -> ModelShape | None:
    """Placement options checked, the model's files checked, ``tokens`` (option → length) within
    the model's positions, and its plan shape read from the config alone; None where the config
    does not tell (the loaded model is then checked instead)."""
    from kvtune import arch
    from kvtune.models import check_placement, load_config

    if model is not None and not str(model).strip():
        raise KvtuneError("--model is empty: give 'default', a local model folder or a hub id")
    if device is not None:
        check_placement(device, dtype, device_map, max_memory)
    config = load_config(model)
    limit = getattr(config.get_text_config(decoder=True), "max_position_embeddings", None)
    for option, length in (tokens or {}).items():
        if isinstance(limit, int) and length > limit:
            raise KvtuneError(f"{option} {length} is longer than the {limit} positions {model or 'the default model'} "
                              "was built for; use at most that")
    return arch.config_shape(config, model or "default")


def check_plans(specs: list[str], shape: ModelShape | None, model_name: str = "the model") -> list[Plan]:
    """Every ``--plan`` resolved (files read and validated) and, where the shape is known, fitted."""
    plans = []
    for spec in specs:
        try:
            plan = resolve_plan(spec, shape.num_layers if shape else 1, shape.group_dim if shape else None)
            if shape is not None:
                plan.check_model(shape, model_name)
        except PlanError as e:
            raise PlanError(f"--plan {e}" if str(e).startswith(str(spec)) else f"--plan {spec}: {e}") from None
        plans.append(plan)
    return plans


def comparable(settings: Any) -> dict:
    """Settings as they are recorded beside a result, without the placement options."""
    data = asdict(settings) if is_dataclass(settings) else dict(settings)
    data = json.loads(json.dumps(data, default=str))  # tuples → lists, as read back from a file
    return {k: v for k, v in data.items() if k not in PLACEMENT}


def check_out_dir(out: str | Path, command: str, result_file: str | None = None, settings: Any = None,
                  overwrite: bool = False, option: str = "--out", result_files: tuple[str, ...] = ()) -> Path:
    """A folder ``command`` can write its result into: not a file, writable, and not holding a
    result of other settings (``result_file`` records them under 'settings') unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise KvtuneError(f"{option} {out} is a file; {command} writes a folder of results there: give a folder path")
    _check_writable(out, option)
    if result_file and not overwrite and not (out / result_file).exists():
        strays = [name for name in result_files if (out / name).exists()]
        if strays:
            raise KvtuneError(f"{option} {out} holds {', '.join(strays)} but no {result_file} saying how they were made; "
                              f"give another {option}, or --overwrite to replace them")
    if result_file and settings is not None and not overwrite and (out / result_file).exists():
        differences = _differences(out / result_file, comparable(settings))
        if differences:
            raise KvtuneError(
                f"{option} {out} already holds a `kvtune {command}` result made with other settings ({differences}); "
                f"give another {option}, or --overwrite to replace it"
            )
    return out


def check_out_file(out: str | Path, command: str, option: str = "--out") -> Path:
    """A file path ``command`` can write: not a folder, in a writable folder."""
    out = Path(out)
    if out.is_dir():
        raise KvtuneError(f"{option} {out} is a folder; {command} writes one file: give a file path like {out / 'plan.json'}")
    _check_writable(out.parent, option)
    return out


def refuse_replacing(path: Path, content: str, overwrite: bool, option: str = "--out") -> None:
    """Refuse to write ``content`` over a file that holds something else, unless ``overwrite``."""
    if overwrite or not path.is_file():
        return
    try:
        same = path.read_text(encoding="utf-8") == content
    except (OSError, UnicodeDecodeError):
        same = False
    if not same:
        raise KvtuneError(f"{option} {path} already holds a different file; give another {option}, or --overwrite to replace it")


def _differences(path: Path, settings: dict) -> str:
    try:
        earlier = json.loads(path.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError, RecursionError):
        return f"{path.name} cannot be read"
    if not isinstance(earlier, dict):
        return f"{path.name} records no settings"
    return changes({k: v for k, v in earlier.items() if k not in PLACEMENT}, settings)


def changes(earlier: dict, now: dict) -> str:
    """``budget: '3.25bits' → '6bits', …``: the settings that differ (empty when none do)."""
    changed = [k for k in sorted(set(earlier) | set(now)) if earlier.get(k) != now.get(k)]
    return ", ".join(f"{k}: {earlier.get(k)!r} → {now.get(k)!r}" for k in changed[:4]) + (" …" if len(changed) > 4 else "")


def _check_writable(folder: Path, option: str) -> None:
    """Create and delete a probe file in ``folder`` or, if it does not exist yet, in the nearest
    existing folder above it: the only test that also holds for root and read-only mounts."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise KvtuneError(f"{option} {folder}: {existing} is a file, so no folder can be made there")
    try:
        fd, probe = tempfile.mkstemp(prefix=".kvtune-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise KvtuneError(f"{option} {folder}: cannot write in {existing} ({e.strerror or e})") from None
