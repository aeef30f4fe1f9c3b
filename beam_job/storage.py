"""The project's one storage layer: local paths and gs:// (any scheme Beam supports) through Beam's FileSystems.

Why Beam's FileSystems: the job's Parquet sink commits through it in any case (Beam's file-sink protocol),
so the job, the model loader and the retrieval side reading through the same layer means one client, one
set of credentials and retries, and every scheme Beam supports (gs://, s3://, azfs://, hdfs://) for every
URI a user gives. The one exception is the output claim (beam_job/pipeline/claim.py): a create-if-absent
needs a GCS generation precondition, which FileSystems does not offer.

Layering: this module imports Beam only inside its functions. The model layer (beam_job/delg) calls it
for remote URIs only, so loading a local model never imports Beam.

The GCS-emulator credential workaround lives here too (`_use_anonymous_credentials_if_emulated`), run once
per process before the first remote access, in every process (launcher and workers) alike.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Iterable, Sequence
from typing import IO, Any

_LOGGER = logging.getLogger(__name__)
_LOCK = threading.Lock()
_EMULATOR_READY = False

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
_GLOB_CHARS = "*?["


def is_remote(path: str) -> bool:
    return "://" in path


def has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in _GLOB_CHARS)


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for both local paths and URIs."""
    out = base.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def _use_anonymous_credentials_if_emulated() -> None:
    """With STORAGE_EMULATOR_HOST set (a GCS-protocol server on loopback: tests, offline runs), make
    google.auth.default() return anonymous credentials. Beam's GCS client otherwise asks for application
    default credentials with 4 retries and back-off: ~21 s per process before it falls back to anonymous
    access. Never does anything on real GCS (the variable is unset there)."""
    global _EMULATOR_READY
    if _EMULATOR_READY or not os.environ.get(EMULATOR_ENV):
        return
    with _LOCK:
        if _EMULATOR_READY:
            return
        import google.auth
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator-project")
        google.auth.default = lambda *_args, **_kwargs: (AnonymousCredentials(), project)
        _EMULATOR_READY = True
        _LOGGER.debug("GCS emulator at %s: using anonymous credentials", os.environ[EMULATOR_ENV])


def _filesystems(path: str = ""):
    if is_remote(path) or not path:
        _use_anonymous_credentials_if_emulated()
    from apache_beam.io.filesystems import FileSystems

    return FileSystems


def _uncompressed():
    from apache_beam.io.filesystem import CompressionTypes

    return CompressionTypes.UNCOMPRESSED


def prepare_remote_access() -> None:
    """Call before handing gs:// work to a library that reaches GCS itself (google-cloud-storage)."""
    _use_anonymous_credentials_if_emulated()


# ----------------------------------------------------------------------------- reading and writing

def open_read(path: str) -> IO[bytes]:
    """A binary, seekable reader (pyarrow can read Parquet from it)."""
    return _filesystems(path).open(path, compression_type=_uncompressed())


def read_bytes(path: str, limit: int | None = None) -> bytes:
    """The file's bytes; with `limit`, at most limit bytes."""
    with open_read(path) as fh:
        return fh.read() if limit is None else fh.read(limit)


def create(path: str, mime_type: str = "application/octet-stream") -> IO[bytes]:
    """A binary writer; the file appears when it is closed. Local parent directories are created."""
    if not is_remote(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return _filesystems(path).create(path, mime_type=mime_type, compression_type=_uncompressed())


def write_bytes(path: str, data: bytes, mime_type: str = "application/octet-stream") -> None:
    """Write a whole file under a temp name, then rename it, so readers never see half of it."""
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with create(tmp, mime_type) as fh:
        fh.write(data)
    rename([tmp], [path])


def write_json(path: str, data: Any) -> None:
    """Write a JSON document whole (`write_bytes`: readers never see half of it)."""
    write_bytes(path, json.dumps(data, indent=2, sort_keys=True).encode("utf-8"), "application/json")


def read_json(path: str) -> Any | None:
    """The JSON document at `path`, or None when it is absent or unreadable (the caller reports that)."""
    try:
        return json.loads(read_bytes(path).decode("utf-8"))
    except Exception:  # absent, unreadable or not JSON
        return None


def exists(path: str) -> bool:
    return _filesystems(path).exists(path)


def delete(paths: Sequence[str]) -> None:
    """Delete files (a local directory with its contents; a gs:// path ending in '/' with everything below)."""
    paths = list(paths)
    if paths:
        _filesystems(paths[0]).delete(paths)


def rename(sources: Sequence[str], destinations: Sequence[str]) -> None:
    """Move files; local destination folders are created."""
    sources, destinations = list(sources), list(destinations)
    for dest in destinations:
        if not is_remote(dest):
            os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    if sources:
        _filesystems(sources[0]).rename(sources, destinations)


def size(path: str) -> int:
    fs = _filesystems(path)
    return fs.match([path])[0].metadata_list[0].size_in_bytes


def download(path: str, local_path: str, chunk_bytes: int = 8 << 20) -> int:
    """Copy a (remote) file to a local path; returns the bytes copied."""
    copied = 0
    with open_read(path) as src, open(local_path, "wb") as dst:
        while True:
            chunk = src.read(chunk_bytes)
            if not chunk:
                return copied
            dst.write(chunk)
            copied += len(chunk)


# ----------------------------------------------------------------------------- listing

def _match_local(pattern: str) -> list[str]:
    """Local entries matching a Beam glob, as Beam matches them, but keeping entries that cannot be stat'ed.

    Beam's local listing drops a file whose size it cannot read (a broken symlink) without a word; here
    such an entry is listed (the job turns it into a failure row). Directories (and links to them) are not
    listed. A directory that does not exist matches nothing.
    """
    from apache_beam.io.filesystem import FileSystem

    if not has_glob(pattern):
        return [pattern] if os.path.lexists(pattern) and not os.path.isdir(pattern) else []
    if pattern.endswith("/"):
        pattern += "*"
    root = os.path.dirname(re.findall(r"^[^[*?]*", pattern)[0])  # the part before the first wildcard
    matches = re.compile(FileSystem.translate_pattern(pattern)).match
    out = []
    for dirpath, _dirs, files in os.walk(root or os.curdir):
        for name in files:
            path = os.path.join(dirpath, name)
            if not root:
                path = os.path.relpath(path)
            if matches(path):
                out.append(path)
    return out


def match(pattern: str, limit: int | None = None) -> list[str]:
    """Files matching a glob (local or remote), sorted, as the file system names them; directories are left
    out. Beam's glob rules: `*` stays within one folder, `**` crosses folders. A listing that fails
    (permission denied, no such bucket) raises; only a pattern that matches nothing gives [].
    `limit`: stop a remote listing after that many objects (e.g. 1 to ask "is there any?")."""
    if not is_remote(pattern):
        return sorted(_match_local(pattern))[:limit]
    result = _filesystems(pattern).match([pattern], limits=[limit] if limit else None)[0]
    return sorted(meta.path for meta in result.metadata_list if not meta.path.endswith("/"))


def listing(pattern: str) -> list[tuple[str, int, float]]:
    """(path, size in bytes, last modified as Unix seconds) of every file matching a glob, sorted by path."""
    if not is_remote(pattern):
        out = []
        for path in match(pattern):
            try:
                st = os.stat(path)
            except OSError:
                continue
            out.append((path, st.st_size, st.st_mtime))
        return out
    result = _filesystems(pattern).match([pattern])[0]
    return sorted((m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in result.metadata_list
                  if not m.path.endswith("/"))


def match_any(patterns: Iterable[str]) -> list[str]:
    out: list[str] = []
    for pattern in patterns:
        out.extend(match(pattern))
    return sorted(set(out))
