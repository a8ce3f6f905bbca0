"""Fetch dataset files over HTTP(S): resumable, retried, checksum-verified, renamed into place atomically.

Only the standard library talks to the network, so this runs wherever the package imports. A file that
is already present and verifies is never fetched again, and a failed fetch says where to put a copy made
on another machine: cluster compute nodes often have no internet access.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

_CHUNK_BYTES = 1 << 20
_HEX_LENGTHS = {"sha256": 64, "md5": 32}
_USER_AGENT = "pipeline_pkg-download/1.0"
# Client errors that retrying cannot fix; 408 (timeout) and 429 (rate limit) are worth another try.
_PERMANENT_HTTP_STATUSES = frozenset(range(400, 500)) - {408, 429}


class DownloadError(RuntimeError):
    """A file could not be fetched; the message says where to put a copy made elsewhere."""


class ChecksumError(DownloadError):
    """A fetched or supplied file does not match its published checksum."""


@dataclass(frozen=True)
class RemoteFile:
    """A file to fetch from `url` into a dataset's raw directory under `name`, with its checksum."""

    name: str
    url: str
    sha256: str | None = None
    md5: str | None = None

    def __post_init__(self) -> None:
        if not self.name or Path(self.name).name != self.name or self.name in (".", ".."):
            raise ValueError(f"RemoteFile name must be a plain file name, got {self.name!r}")
        if self.sha256 is None and self.md5 is None:
            raise ValueError(f"RemoteFile {self.name!r} ({self.url}) needs a sha256 or md5 checksum")
        for algo, length in _HEX_LENGTHS.items():
            digest = getattr(self, algo)
            if digest is None:
                continue
            if not re.fullmatch(rf"[0-9a-fA-F]{{{length}}}", digest):
                raise ValueError(
                    f"RemoteFile {self.name!r}: {algo} must be {length} hex digits, got {digest!r}")
            # Digests are compared as lowercase hex; frozen dataclasses need object.__setattr__.
            object.__setattr__(self, algo, digest.lower())

    @property
    def checksum(self) -> tuple[str, str]:
        """(algorithm, expected hex digest), preferring sha256 over md5."""
        if self.sha256 is not None:
            return "sha256", self.sha256
        return "md5", self.md5  # type: ignore[return-value]  # __post_init__ guarantees one is set


def file_digest(path: str | os.PathLike, algo: str) -> str:
    """Hex digest of a file, read in chunks so multi-gigabyte archives need little memory."""
    hasher = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify(path: str | os.PathLike, remote: RemoteFile) -> bool:
    """True if `path` is a file whose checksum matches `remote`'s."""
    path = Path(path)
    if not path.is_file():
        return False
    algo, expected = remote.checksum
    return file_digest(path, algo) == expected


def require_verified(path: str | os.PathLike, remote: RemoteFile) -> Path:
    """Return `path` if it matches `remote`'s checksum, else raise ChecksumError (the file is kept)."""
    path = Path(path)
    algo, expected = remote.checksum
    actual = file_digest(path, algo)
    if actual != expected:
        raise ChecksumError(_checksum_message(remote, path, algo, expected, actual))
    return path


def _checksum_message(remote: RemoteFile, path: Path, algo: str, expected: str, actual: str) -> str:
    return (f"checksum mismatch for {remote.name} (from {remote.url}) at {path}: "
            f"expected {algo} {expected}, got {actual}")


class _RetryableError(Exception):
    """An attempt failed in a way another attempt may fix (the partial file is kept for resuming)."""


class _PermanentError(Exception):
    """An attempt failed in a way no retry can fix, e.g. HTTP 404."""


def download(remote: RemoteFile, dest_dir: str | os.PathLike, *, retries: int = 5, backoff: float = 1.0,
             timeout: float = 60.0, progress: bool = True) -> Path:
    """Fetch `remote` into `dest_dir/remote.name` and return that path.

    A verified copy already there is returned without touching the network. Otherwise the file is
    streamed to `<name>.part`, resumed with an HTTP Range request after each failure, retried up to
    `retries` more times with exponential backoff, checked against its checksum and only then renamed
    into place. Raises ChecksumError if the content is wrong, DownloadError if it cannot be fetched.
    """
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    dest_dir = Path(dest_dir)
    final = dest_dir / remote.name
    part = dest_dir / (remote.name + ".part")
    stale_copy = final.exists()
    if stale_copy and verify(final, remote):
        return final
    dest_dir.mkdir(parents=True, exist_ok=True)

    attempts = retries + 1
    last_error: BaseException | None = None
    for attempt in range(attempts):
        try:
            _fetch_to_part(remote, part, timeout=timeout, progress=progress)
        except _PermanentError as exc:
            raise DownloadError(_failure_message(remote, final, part, attempt + 1, exc, stale_copy)) \
                from exc.__cause__
        except _RetryableError as exc:
            last_error = exc
            if attempt + 1 < attempts:
                time.sleep(backoff * 2 ** attempt)
            continue
        algo, expected = remote.checksum
        actual = file_digest(part, algo)
        if actual != expected:
            # A wrong but complete file would only be resumed into another wrong file: start clean.
            part.unlink(missing_ok=True)
            raise ChecksumError(_checksum_message(remote, final, algo, expected, actual))
        os.replace(part, final)
        return final

    raise DownloadError(_failure_message(remote, final, part, attempts, last_error, stale_copy)) \
        from (last_error.__cause__ if last_error else None)


def _failure_message(remote: RemoteFile, final: Path, part: Path, attempts: int,
                     error: BaseException | None, stale_copy: bool) -> str:
    algo, expected = remote.checksum
    lines = [
        f"could not download {remote.name} from {remote.url} "
        f"({attempts} attempt{'s' if attempts != 1 else ''}; last error: {error}).",
        f"If this machine has no internet access (cluster compute nodes often have none), fetch "
        f"{remote.url} on a machine that has, and copy it to {final} "
        f"(it is checked against {algo} {expected} before use), or point the `data_root` config key "
        f"at a directory that already holds it in the same layout.",
    ]
    if stale_copy:
        lines.append(f"The file already at {final} does not match that checksum.")
    if part.exists():
        lines.append(f"The partial download {part} is kept and will be resumed on the next run.")
    return "\n".join(lines)


def _fetch_to_part(remote: RemoteFile, part: Path, *, timeout: float, progress: bool) -> None:
    """One attempt: extend (or restart) `part` until it holds the whole body; _RetryableError if not."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(remote.url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = getattr(response, "status", None) or 200  # file:// answers carry no status
            if offset and (status != 206 or not _range_starts_at(response, offset)):
                # The server sent the whole file (or an unexpected range): discard the partial copy.
                offset = 0
            content_length = _int_header(response, "Content-Length")
            total = None if content_length is None else offset + content_length
            _stream_body(response, part, offset, total, remote.name, progress)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            # Nothing left after `offset`: the partial file is complete (the checksum decides) or
            # longer than the remote one, in which case it is garbage and the next attempt restarts.
            if _size_from_content_range(exc.headers.get("Content-Range")) not in (None, offset):
                part.unlink(missing_ok=True)
                raise _RetryableError("partial file is longer than the remote file") from exc
            return
        if exc.code in _PERMANENT_HTTP_STATUSES:
            raise _PermanentError(f"HTTP {exc.code} {exc.reason}") from exc
        raise _RetryableError(f"HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        # OSError covers refused connections, resets, timeouts and TLS failures alike.
        raise _RetryableError(f"{type(exc).__name__}: {exc}") from exc


def _stream_body(response, part: Path, offset: int, total: int | None, label: str,
                 progress: bool) -> None:
    written = offset
    with open(part, "ab" if offset else "wb") as out, \
            tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=label, disable=not progress, leave=False) as bar:
        while chunk := response.read(_CHUNK_BYTES):
            out.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
    # urllib returns a short body without complaint when the server closes early.
    if total is not None and written < total:
        raise http.client.IncompleteRead(b"", total - written)


def _int_header(response, name: str) -> int | None:
    value = response.headers.get(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _range_starts_at(response, offset: int) -> bool:
    # "Content-Range: bytes START-END/SIZE"; a 206 without it is taken at its word.
    content_range = response.headers.get("Content-Range")
    if content_range is None:
        return True
    match = re.match(r"bytes\s+(\d+)-", content_range)
    return bool(match) and int(match.group(1)) == offset


def _size_from_content_range(content_range: str | None) -> int | None:
    # A 416 answer carries "Content-Range: bytes */SIZE".
    match = re.match(r"bytes\s+\*/(\d+)", content_range or "")
    return int(match.group(1)) if match else None
