"""HDF5 files between stages, checkpoints, and JSON results: written atomically, read with clear errors.

Every file is written to a temporary name beside its destination and renamed into place only when
complete, so a crash or a full disk never leaves a half-written file that a downstream job would accept.
A full disk raises OutputWriteError naming the file; an unreadable input raises CorruptFileError naming
the file and the Snakemake rule that rebuilds it.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import tempfile
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from . import __version__


class CorruptFileError(RuntimeError):
    """An input file exists but cannot be read; the message names it and how to rebuild it."""


class OutputWriteError(OSError):
    """An output could not be written for lack of room (disk full, quota, file size limit); nothing
    of it was left behind."""


# errnos of a write that ran out of room
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def producing_rule(path: str | os.PathLike) -> str | None:
    """The Snakemake rule that makes `path`, read from the output layout of pipeline_pkg.paths."""
    path = Path(path)
    name, parent = path.name, path.parent.name
    if name == "manifest.json":
        return "download"
    if parent == "data" and name.endswith(".h5"):
        return "generate_rf1024" if name == "rf1024.h5" else "prepare_dataset"
    if name.startswith("poison-seed") and name.endswith(".h5"):
        return "poison"
    if name in ("model.pt", "checkpoint.pt", "train.json", "snapshots.pt") and parent.startswith("seed"):
        return "train"
    if name in ("detection.json", "flagged.h5"):
        return "detect"
    if name in ("model.pt", "purify.json"):
        return "retrain" if parent.startswith("detect-") else "purify"
    if name == "metrics.json":
        return "evaluate"
    return None


def _rebuild_hint(path: Path) -> str:
    rule = producing_rule(path)
    maker = f"Snakemake rule '{rule}' makes it" if rule else "an earlier job makes it"
    return (f"{maker}: delete it and rerun snakemake, or rerun that job in place with "
            f"`snakemake --cores 1 --forcerun {path}`")


def _room_errno(exc: BaseException) -> int | None:
    """The no-room errno behind `exc`, if any: h5py, for one, raises a RuntimeError when it closes a
    file whose write failed, with the OSError as its context."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _NO_ROOM:
            return current.errno
        current = current.__cause__ or current.__context__
    return None


def _no_room(path: Path, code: int) -> OutputWriteError:
    return OutputWriteError(code, f"could not write {path}: {os.strerror(code)} (disk or quota full, "
                                  "or the file size limit reached); nothing of it was left behind: "
                                  "free space and rerun the job")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A temporary file of `path` that a killed writer left (SIGKILL skips the cleanup) is removed first;
    every output has a single writer, so it cannot be another job's file in progress."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # mkstemp's names: the prefix, 8 random characters, the suffix
        for stale in path.parent.glob(f".{glob_escape(path.name)}.{'?' * 8}.part"):
            stale.unlink(missing_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        if exc.errno in _NO_ROOM:
            raise _no_room(path, exc.errno) from exc
        raise
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except Exception as exc:
        code = _room_errno(exc)
        if code is not None:
            raise _no_room(path, code) from exc
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def _json_default(value: Any) -> Any:
    # numpy scalars and arrays inside config dicts stay numbers, not strings
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _encode_attr(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)) or value is None:
        return json.dumps(value, sort_keys=True, default=_json_default)
    return value


def write_h5(path: str | os.PathLike, arrays: Mapping[str, np.ndarray],
             attrs: Mapping[str, Any] | None = None) -> Path:
    """Write named arrays plus provenance attributes (package version always included)."""
    path = Path(path)
    all_attrs = {"package_version": __version__, **(attrs or {})}
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            for key, value in arrays.items():
                f.create_dataset(key, data=np.asarray(value))
            for key, value in all_attrs.items():
                f.attrs[key] = _encode_attr(value)
    return path


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str) and (value[:1] in "[{\"" or value == "null"):
        try:
            return json.loads(value)
        except (json.JSONDecodeError, TypeError):
            return value
    if isinstance(value, np.generic):
        return value.item()
    return value


def read_h5(path: str | os.PathLike, keys: list[str] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Read arrays (all, or `keys`) and decoded attributes; a corrupt or incomplete file raises
    CorruptFileError naming the file and the fix."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing input file {path}; run the job that makes it first")
    try:
        with h5py.File(path, "r") as f:
            wanted = list(f.keys()) if keys is None else keys
            missing = [k for k in wanted if k not in f]
            if missing:
                raise CorruptFileError(
                    f"{path} lacks dataset(s) {missing} (has {sorted(f.keys())}); " + _rebuild_hint(path))
            arrays = {k: f[k][()] for k in wanted}
            attrs = {k: _decode_attr(v) for k, v in f.attrs.items()}
    except CorruptFileError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise CorruptFileError(f"cannot read HDF5 file {path} ({exc}); " + _rebuild_hint(path)) from exc
    return arrays, attrs


def save_checkpoint(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    import torch

    path = Path(path)
    # Serialised in memory, then written as plain bytes: torch's own file writer reports a full disk
    # as an opaque "unexpected pos" error instead of ENOSPC.
    buffer = io.BytesIO()
    torch.save(dict(obj), buffer)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint with weights_only=True: tensors and plain containers only, never code."""
    import torch

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing checkpoint {path}; run the job that makes it first")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CorruptFileError(f"cannot read checkpoint {path} ({exc}); " + _rebuild_hint(path)) from exc


def write_json(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    return path


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"missing input file {path}; run the job that makes it first") from None
    except json.JSONDecodeError as exc:
        raise CorruptFileError(f"cannot parse JSON {path} ({exc}); " + _rebuild_hint(path)) from exc
