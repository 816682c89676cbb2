"""Reading and writing kvtune's files: JSON read with errors that name the file, results written
atomically (a temporary file beside the target, renamed over it, removed on any failure), so a
crash or a refusal never leaves a half-written result or a stray temporary file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from kvtune.errors import KvtuneError

# Temporary files are created private (0600); a result gets the mode a plain write would give it.
_UMASK = os.umask(0)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def read_json(path: str | Path, error: type[KvtuneError] = KvtuneError, what: str = "file") -> Any:
    """The parsed JSON of ``path``; every failure is ``error`` naming the file (and line where known)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a directory, not a JSON file") from None
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    return parse_json(text, error, f"{what} {path}")


def parse_json(text: str, error: type[KvtuneError] = KvtuneError, where: str = "JSON") -> Any:
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except json.JSONDecodeError as e:
        raise error(f"{where} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply to be a kvtune file") from None
    except ValueError as e:  # NaN / Infinity, which strict JSON does not have
        raise error(f"{where}: {e}") from None


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number; kvtune files hold finite numbers only")


def dumps(data: Any) -> str:
    """JSON as kvtune writes it: indented, and never NaN/Infinity (a missing value is left out or null)."""
    return json.dumps(_finite(data), indent=2, allow_nan=False) + "\n"


def _finite(data: Any) -> Any:
    if isinstance(data, float) and not math.isfinite(data):
        raise ValueError(f"refusing to write a non-finite number ({data}) into a JSON file")
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    if hasattr(data, "item") and not isinstance(data, (str, bytes)):  # numpy / torch scalars
        return _finite(data.item())
    return data


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends
    without an error, deleted otherwise."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise KvtuneError(f"cannot write {path}: {e.strerror or e}") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except OSError as e:
        raise KvtuneError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_all(folder: str | Path, writers: dict[str, Callable[[Path], Any]]) -> Path:
    """Several files of one result: all are written to temporary files first and only then renamed
    into place, in order (put the file that marks a finished result last), so an interruption while
    writing leaves the earlier result or nothing, not half of each."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KvtuneError(f"cannot write {folder}: {e.strerror or e}") from None
    done: list[tuple[Path, Path]] = []
    try:
        for name, writer in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
            os.close(fd)
            done.append((Path(tmp), folder / name))
            writer(Path(tmp))
        for tmp, target in done:
            os.chmod(tmp, _FILE_MODE)
            os.replace(tmp, target)
    except OSError as e:
        raise KvtuneError(f"cannot write into {folder}: {e.strerror or e}") from None
    finally:
        for tmp, _ in done:
            tmp.unlink(missing_ok=True)
    return folder


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_with(path: str | Path, writer: Callable[[Path], Any]) -> Path:
    """Atomic write through a function that writes a file at the path it is given (to_csv, savefig)."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)
