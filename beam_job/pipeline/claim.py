"""The output claim: one run owns an output at a time (`<output>/_claim.json`, local disk or gs://).

A run creates the claim file *only if it does not exist*, atomically: `O_CREAT | O_EXCL` on local disk,
and on GCS an upload with the precondition `ifGenerationMatch=0` (the object must not exist), which GCS
enforces server-side, so two launchers racing for one output cannot both win. The loser fails before any
work with a one-line error naming the holder. The claim is released (deleted, only if it is still ours)
at the end of every run, failed or not. A claim left by a crashed run stays until a user takes it over
explicitly with `--take_over_claim <run_id>` (the run id is in the error message), which replaces it
only if it still names that run (on GCS: a generation-matched rewrite).

Beam's FileSystems has no conditional create, so this module talks to GCS with google-cloud-storage
directly; it is the one place in the job that does.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

_LOGGER = logging.getLogger(__name__)

CLAIM_FILE = "_claim.json"


class ClaimError(RuntimeError):
    """The output cannot be claimed; the message is one line saying who holds it and what to do."""


@dataclass(frozen=True)
class Claim:
    """A held claim: where it is, which run holds it, and the GCS generation written (None locally)."""

    path: str
    run_id: str
    generation: Optional[int] = None


def claim_path(output: str) -> str:
    return output.rstrip("/") + "/" + CLAIM_FILE


def _claim_body(run_id: str) -> bytes:
    body = {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "claimed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }
    return json.dumps(body, sort_keys=True).encode("utf-8")


def _describe(holder: Dict[str, Any]) -> str:
    where = f"on {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    since = holder.get("claimed_at", "?")
    text = f"run {holder.get('run_id', '?')} ({where}, since {since})"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _pid_alive(holder["pid"]):
            text += " whose process is gone"
    return text


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _held_error(output: str, holder: Dict[str, Any]) -> ClaimError:
    return ClaimError(
        f"{output} is claimed by {_describe(holder)}: wait for that run to end, or, if it crashed, "
        f"pass --take_over_claim {holder.get('run_id', '?')}"
    )


def _parse(data: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
        return value if isinstance(value, dict) else {}
    except (ValueError, UnicodeDecodeError):
        return {}


# ----------------------------------------------------------------------------- local disk

def _local_acquire(path: str, output: str, run_id: str, take_over: Optional[str]) -> Claim:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = _claim_body(run_id)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        holder = _local_read(path) or {}
        if take_over is None or holder.get("run_id") != take_over:
            raise _held_error(output, holder) from None
        tmp = f"{path}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(body)
        os.replace(tmp, path)  # atomic: readers see the old or the new claim, never half of one
        _LOGGER.warning("took over the claim of run %s on %s", take_over, output)
    else:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
    mine = _local_read(path) or {}
    if mine.get("token") != _parse(body)["token"]:  # another take-over won the race
        raise _held_error(output, mine)
    return Claim(path=path, run_id=run_id)


def _local_read(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(path, "rb") as fh:
            return _parse(fh.read())
    except FileNotFoundError:
        return None


def _local_release(claim: Claim) -> bool:
    holder = _local_read(claim.path)
    if holder is None or holder.get("run_id") != claim.run_id:
        return False
    os.unlink(claim.path)
    return True


# ----------------------------------------------------------------------------- gs://

def _split_gs(path: str) -> Tuple[str, str]:
    bucket, _, name = path[len("gs://"):].partition("/")
    return bucket, name


def _blob(path: str):
    from google.cloud import storage as gcs

    from beam_job import storage

    storage.prepare_remote_access()
    bucket, name = _split_gs(path)
    return gcs.Client().bucket(bucket).blob(name)


def _gcs_read(path: str) -> Tuple[Optional[Dict[str, Any]], Optional[int]]:
    from google.api_core import exceptions as gexc

    blob = _blob(path)
    try:
        data = blob.download_as_bytes()
    except gexc.NotFound:
        return None, None
    return _parse(data), blob.generation


def _gcs_acquire(path: str, output: str, run_id: str, take_over: Optional[str]) -> Claim:
    from google.api_core import exceptions as gexc

    body = _claim_body(run_id)
    blob = _blob(path)
    holder, generation = _gcs_read(path)
    if holder is not None:
        if take_over is None or holder.get("run_id") != take_over:
            raise _held_error(output, holder)
        precondition = generation  # replace exactly the claim we read, nothing newer
    else:
        precondition = 0  # create only if absent
    try:
        blob.upload_from_string(body, content_type="application/json", if_generation_match=precondition)
    except gexc.PreconditionFailed:
        now, _ = _gcs_read(path)
        raise _held_error(output, now or {}) from None
    if holder is not None:
        _LOGGER.warning("took over the claim of run %s on %s", take_over, output)
    mine, generation = _gcs_read(path)
    if (mine or {}).get("token") != _parse(body)["token"]:
        raise _held_error(output, mine or {})
    return Claim(path=path, run_id=run_id, generation=generation)


def _gcs_release(claim: Claim) -> bool:
    from google.api_core import exceptions as gexc

    holder, generation = _gcs_read(claim.path)
    if holder is None or holder.get("run_id") != claim.run_id:
        return False  # taken over meanwhile: not ours to delete
    try:
        _blob(claim.path).delete(if_generation_match=generation)
    except (gexc.NotFound, gexc.PreconditionFailed):
        return False
    return True


# ----------------------------------------------------------------------------- API

def acquire(output: str, run_id: str, *, take_over: Optional[str] = None) -> Claim:
    """Claim `output` for `run_id`; ClaimError (one line) when another run holds it.

    take_over: the run id of a stale claim to replace (it must still name that run).
    """
    path = claim_path(output)
    if path.startswith("gs://"):
        return _gcs_acquire(path, output, run_id, take_over)
    if "://" in path:
        raise ClaimError(f"--output {output}: only local paths and gs:// outputs can be claimed")
    return _local_acquire(path, output, run_id, take_over)


def release(claim: Claim) -> bool:
    """Delete the claim if it is still ours; True when it was deleted."""
    try:
        if claim.path.startswith("gs://"):
            return _gcs_release(claim)
        return _local_release(claim)
    except Exception:  # never mask the run's own outcome; a left claim is reported by the next run
        _LOGGER.warning("could not release the claim %s", claim.path, exc_info=True)
        return False


def read(output: str) -> Optional[Dict[str, Any]]:
    """The current claim's content, or None when the output is not claimed."""
    path = claim_path(output)
    if path.startswith("gs://"):
        return _gcs_read(path)[0]
    return _local_read(path)
