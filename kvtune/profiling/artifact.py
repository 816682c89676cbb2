"""The profile artifact: ``profile.csv`` (one row per layer × pair) and ``profile.json`` (metadata).

Documented in ``docs/profile-format.md``. :meth:`Profile.load` validates both files and their
agreement; everything downstream (search, plots) reads a profile only through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kvtune.errors import ProfileError
from kvtune.profiling.calibrate import amax_problem
from kvtune.plan import ModelShape, candidate_name, parse_candidate

SCHEMA = "kvtune.profile"
# 2: the shape may list K/V heads and head sizes per layer; written only by profiles that do, so a
# profile of a model whose layers are alike stays version 1.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)


def schema_version(shape: ModelShape) -> int:
    """The version a profile of ``shape`` is written with: the lowest that can state it."""
    return 1 if shape.is_uniform else SCHEMA_VERSION
TABLE_FILE, META_FILE, HEATMAP_FILE = "profile.csv", "profile.json", "heatmap.png"
MAX_VALUE = 1e6  # no per-token loss estimate or relative error comes near it; larger is corruption

# name -> (dtype kind, must be finite, must be >= 0)
COLUMNS = {
    "layer": ("i", True, True),
    "pair": ("O", True, False),
    "k_bits": ("i", True, True),
    "v_bits": ("i", True, True),
    "nominal_bits": ("f", True, True),
    "attn_err": ("f", True, True),
    "attn_err_k": ("f", True, True),
    "attn_err_v": ("f", True, True),
    "taylor": ("f", True, True),
    "taylor_signed": ("f", True, False),
    "taylor_abs": ("f", True, True),
    "taylor_elem": ("f", True, True),
    "taylor_fisher": ("f", True, True),
    "measured_dnll": ("f", False, False),  # NaN where not measured
    "measured_kl": ("f", False, True),
}


@dataclass
class Profile:
    table: pd.DataFrame
    meta: dict

    @property
    def pairs(self) -> list[str]:
        return list(self.meta["pairs"])

    @property
    def shape(self) -> ModelShape:
        return ModelShape.from_dict(self.meta["shape"], "profile shape")

    @property
    def num_layers(self) -> int:
        return self.shape.num_layers

    def matrix(self, column: str) -> np.ndarray:
        """(layers, pairs) array of one column, pairs in the profile's order."""
        wide = self.table.pivot(index="layer", columns="pair", values=column)
        return wide[self.pairs].to_numpy(dtype=float)

    def check_model(self, shape: ModelShape, name: str = "the model") -> None:
        if shape != self.shape:
            raise ProfileError(f"the profile was made for a model of {self.shape.describe()}, but {name} has "
                               f"{shape.describe()}; profile this model (kvtune profile --model ...) and search that profile")

    # ---- files ---------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        from kvtune import files

        folder = Path(folder)
        _validate(self.table, self.meta, folder)
        meta_text, table_text = files.dumps(self.meta), self.table.to_csv(index=False)
        if all((folder / name).is_file() and (folder / name).read_text(encoding="utf-8") == text
               for name, text in ((META_FILE, meta_text), (TABLE_FILE, table_text))):
            return folder  # a resumed, finished profile: left untouched, so later steps see by its time that they are current
        files.write_all(folder, {TABLE_FILE: lambda p: p.write_text(table_text, encoding="utf-8"),
                                 META_FILE: lambda p: p.write_text(meta_text)})  # last: marks a finished profile
        return folder

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        folder = Path(path)
        if folder.is_file():
            folder = folder.parent
        table_path, meta_path = folder / TABLE_FILE, folder / META_FILE
        if not table_path.is_file() or not meta_path.is_file():
            raise ProfileError(f"no profile at {folder}: expected {TABLE_FILE} and {META_FILE} (run `kvtune profile`)")
        from kvtune.files import read_json

        meta = read_json(meta_path, ProfileError, "profile metadata")
        try:
            table = pd.read_csv(table_path)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise ProfileError(f"{table_path} is not a readable CSV table: {e}") from None
        _validate(table, meta, folder)
        return cls(table, meta)


def _validate(table: pd.DataFrame, meta, where: Path) -> None:
    if not isinstance(meta, dict):
        raise ProfileError(f"{where}/{META_FILE} must hold a JSON object")
    if meta.get("schema") != SCHEMA:
        raise ProfileError(f"{where} is not a kvtune profile: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    if meta.get("schema_version") not in READABLE_VERSIONS:
        raise ProfileError(
            f"{where}: profile schema_version {meta.get('schema_version')!r} is not supported (this kvtune reads {list(READABLE_VERSIONS)})"
        )
    try:
        shape = ModelShape.from_dict(meta.get("shape"), "'shape'")
    except (TypeError, ValueError) as e:  # PlanError is a ValueError
        raise ProfileError(f"{where}/{META_FILE}: {e}") from None
    pairs = meta.get("pairs")
    if not isinstance(pairs, list) or not pairs or not all(isinstance(p, str) for p in pairs):
        raise ProfileError(f"{where}/{META_FILE}: 'pairs' must be a non-empty list of pair names like \"K4V2\"")
    for p in pairs:
        try:
            canonical = candidate_name(*parse_candidate(p))
        except ValueError as e:
            raise ProfileError(f"{where}/{META_FILE}: 'pairs': {e}") from None
        if p != canonical:
            raise ProfileError(f"{where}/{META_FILE}: 'pairs' lists {p!r}; pairs are written {canonical!r}")
    if len(set(pairs)) != len(pairs):
        raise ProfileError(f"{where}/{META_FILE}: 'pairs' lists a pair twice")
    _validate_settings(meta.get("settings"), f"{where}/{META_FILE}")
    if "amax" in meta and (problem := amax_problem(meta["amax"], shape.num_layers)):
        raise ProfileError(f"{where}/{META_FILE}: {problem}")
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ProfileError(f"{where}/{TABLE_FILE}: missing columns {missing}")
    expected = shape.num_layers * len(pairs)
    if len(table) != expected:
        raise ProfileError(
            f"{where}/{TABLE_FILE} is truncated or padded: {len(table)} rows, expected {shape.num_layers} layers × "
            f"{len(pairs)} pairs = {expected}"
        )
    for column, (kind, finite, nonneg) in COLUMNS.items():
        values = table[column]
        if kind in "if" and not pd.api.types.is_numeric_dtype(values):
            raise ProfileError(f"{where}/{TABLE_FILE}: column {column!r} is not numeric")
        if finite and kind in "if" and not np.isfinite(values.to_numpy(dtype=float)).all():
            raise ProfileError(f"{where}/{TABLE_FILE}: column {column!r} has missing or non-finite values")
        if nonneg and kind in "if" and (values.dropna() < 0).any():
            raise ProfileError(f"{where}/{TABLE_FILE}: column {column!r} has negative values")
        if kind == "f" and (values.dropna().abs() > MAX_VALUE).any():
            raise ProfileError(f"{where}/{TABLE_FILE}: column {column!r} has values above {MAX_VALUE:g}, which no "
                               "per-token loss or relative error reaches; the file is corrupt")
    seen = set(zip(table["layer"].tolist(), table["pair"].tolist()))
    want = {(layer, pair) for layer in range(shape.num_layers) for pair in pairs}
    if seen != want:
        wrong = sorted(want ^ seen, key=str)[:3]
        raise ProfileError(f"{where}/{TABLE_FILE}: rows do not cover every layer × pair once (e.g. {wrong})")


def _validate_settings(settings, where: str) -> None:
    """The profile's settings, field by field: search builds every plan from them."""
    from kvtune.quant import MODES

    if not isinstance(settings, dict):
        raise ProfileError(f"{where}: 'settings' must be the object of settings the profile was made with")
    for key, low in (("group_size", 1), ("residual", 0)):
        value = settings.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ProfileError(f"{where}: settings.{key} must be an integer of at least {low}, got {value!r}")
    for key in ("key_mode", "value_mode"):
        if settings.get(key) not in MODES:
            raise ProfileError(f"{where}: settings.{key} must be one of {list(MODES)}, got {settings.get(key)!r}")
    for key in ("model", "data"):
        if not isinstance(settings.get(key), str) or not settings[key]:
            raise ProfileError(f"{where}: settings.{key} must name the {key} the profile was made from")


def save_heatmap(profile: Profile, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("taylor", "Taylor estimate of Δloss per token (log10)"), ("attn_err", "attention-output rel. error (log10)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 + 1.1 * len(profile.pairs) * len(panels), 0.22 * profile.num_layers + 2))
    for ax, (column, title) in zip(axes, panels):
        values = profile.matrix(column)
        floor = values[values > 0].min() if (values > 0).any() else 1e-12
        image = ax.imshow(np.log10(np.maximum(values, floor)), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(profile.pairs)), profile.pairs, rotation=45)
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"{profile.meta.get('model')} sensitivity ({profile.meta.get('tokens')} calibration tokens)", fontsize=10)
    fig.tight_layout()
    from kvtune import files

    files.write_with(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return Path(path)


def spearman(a, b) -> float:
    from scipy.stats import spearmanr

    mask = np.isfinite(a) & np.isfinite(b)
    if mask.sum() < 3:
        return math.nan
    return float(spearmanr(np.asarray(a)[mask], np.asarray(b)[mask]).statistic)
