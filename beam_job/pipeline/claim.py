"""The output claim: one run owns an output at a time (`<output>/_claim.json`, local disk or gs://).

A run creates the claim file *only if it does not exist*, atomically: a hard link (or `O_CREAT | O_EXCL`
where links are not supported) on local disk,
and on GCS an upload with the precondition `ifGenerationMatch=0` (the object must not exist), which GCS
enforces server-side, so two launchers racing for one output cannot both win. The loser fails before any
work with a one-line error naming the holder. The claim is released (deleted, only if it is still ours)
at the end of every run, failed or not. A claim left by a crashed run stays until a user takes it over
explicitly with `--take_over_claim <run_id>` (the run id is in the error message), which replaces it
only if it still names that run (on GCS: a generation-matched rewrite), and never while that run's process is
alive on this machine. While a run runs, `ClaimKeeper` puts back a claim file deleted under it and stops the
run when another run's claim replaced its own.

A claim file is never seen half-written: locally it is written to a temporary file first and linked into
place (`os.link` fails when the name exists), on GCS an upload is atomic. A claim file that still cannot be
read (empty, not JSON, or JSON that is not a claim: left by an older version, a full disk or a hand edit)
names no run to take over: every run then stops with one line naming the file and the way out, deleting it
once no run is writing to the output.

Beam's FileSystems has no conditional create, so this module talks to GCS with google-cloud-storage
directly; it is the one place in the job that does.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from typing import Any

from beam_job import layout
from beam_job.processes import process_alive

_LOGGER = logging.getLogger(__name__)


class ClaimError(RuntimeError):
    """The output cannot be claimed; the message is one line saying who holds it and what to do."""


@dataclass(frozen=True)
class Claim:
    """A held claim: where it is, which run holds it, and the GCS generation written (None locally)."""

    path: str
    run_id: str
    generation: int | None = None
    body: bytes = b""  # the claim file's content as written (its token tells this claim from any other)


def _claim_body(run_id: str) -> bytes:
    body = {
        "run_id": run_id,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "claimed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "token": uuid.uuid4().hex,
    }
    return json.dumps(body, sort_keys=True).encode("utf-8")


def _describe(holder: dict[str, Any]) -> str:
    where = f"on {holder.get('host', '?')}, pid {holder.get('pid', '?')}"
    since = holder.get("claimed_at", "?")
    text = f"run {holder.get('run_id', '?')} ({where}, since {since})"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not process_alive(holder["pid"]):
            text += " whose process is gone"
    return text


def _live_here(holder: dict[str, Any]) -> bool:
    """Whether the claim's run is a process still alive on this machine."""
    return (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
            and process_alive(holder["pid"]))


def _check_take_over(output: str, holder: dict[str, Any], take_over: str | None) -> None:
    """Refuse (ClaimError) unless --take_over_claim names the holder and the holder is not alive on this host.

    A run on another machine cannot be seen from here: taking it over is the user's call, and the run taken
    over notices (ClaimKeeper) and stops.
    """
    if take_over is None or holder.get("run_id") != take_over:
        raise _held_error(output, holder)
    if _live_here(holder):
        raise ClaimError(
            f"--take_over_claim {take_over}: run {take_over} is still running on this machine (pid {holder['pid']}); "
            "taking over is for a run that crashed: wait for it to end, or stop it first "
            f"(kill {holder['pid']}) and run again"
        )


def _held_error(output: str, holder: dict[str, Any]) -> ClaimError:
    return ClaimError(
        f"{output} is claimed by {_describe(holder)}: wait for that run to end, or, if it crashed, "
        f"pass --take_over_claim {holder.get('run_id', '?')}"
    )


def _parse(data: bytes) -> dict[str, Any] | None:
    """The claim in `data`, or None when it is not one: a JSON object with a non-empty text run_id."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("run_id"), str) or not value["run_id"]:
        return None
    return value


def _why_unreadable(data: bytes) -> str:
    if not data.strip():
        return "it is empty" if not data else "it holds only white space"
    try:
        json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return f"it is not JSON ({len(data)} bytes)"
    return "it is JSON but not a claim (an object with a run_id)"


def _unreadable_error(output: str, path: str, data: bytes) -> ClaimError:
    return ClaimError(
        f"{output} cannot be claimed: its claim file {path} cannot be read ({_why_unreadable(data)}), so it names "
        f"no run to wait for or take over: once no run is writing to {output}, delete {path} and run again"
    )


def _holder(output: str, path: str, data: bytes) -> dict[str, Any]:
    """The claim in `data`; ClaimError (one line, naming the file and the way out) when it cannot be read."""
    holder = _parse(data)
    if holder is None:
        raise _unreadable_error(output, path, data)
    return holder


# ----------------------------------------------------------------------------- local disk

def _local_create(path: str, body: bytes) -> bool:
    """Create the claim file with `body` only if it does not exist, atomically and whole; False if it exists.

    The body goes to a temporary file first and is linked into place: a reader never sees an empty or half
    claim, and a write that fails (a full disk) leaves no claim behind. Where hard links are not supported,
    an `O_EXCL` create and a write instead.
    """
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as fh:
            fh.write(body)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError:  # no hard links here (some FUSE and network filesystems)
            pass
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(body)
    except BaseException:
        os.unlink(path)  # never leave an empty or partial claim
        raise
    return True


def _local_acquire(path: str, output: str, run_id: str, take_over: str | None) -> Claim:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    body = _claim_body(run_id)
    for _ in range(3):  # a claim that vanishes between the create and the read was just released: try again
        if _local_create(path, body):
            break
        data = _local_read_bytes(path)
        if data is None:
            continue
        holder = _holder(output, path, data)
        _check_take_over(output, holder, take_over)
        tmp = f"{path}.{uuid.uuid4().hex}"
        with open(tmp, "wb") as fh:
            fh.write(body)
        os.replace(tmp, path)  # atomic: readers see the old or the new claim, never half of one
        _LOGGER.warning("took over the claim of run %s on %s", take_over, output)
        break
    data = _local_read_bytes(path)
    if data is None:
        raise ClaimError(f"{output} cannot be claimed: its claim file {path} keeps appearing and disappearing "
                         "(other runs starting and ending): run again")
    mine = _holder(output, path, data)
    if mine.get("token") != json.loads(body)["token"]:  # another launcher or take-over won the race
        raise _held_error(output, mine)
    return Claim(path=path, run_id=run_id, body=body)


def _local_read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _local_read(path: str) -> dict[str, Any] | None:
    """The claim's content; None when there is none; {} when the file cannot be read as a claim."""
    data = _local_read_bytes(path)
    return None if data is None else (_parse(data) or {})


def _local_release(claim: Claim) -> bool:
    holder = _local_read(claim.path)
    if holder is None or holder.get("run_id") != claim.run_id:
        return False
    os.unlink(claim.path)
    return True


# ----------------------------------------------------------------------------- gs://

def _split_gs(path: str) -> tuple[str, str]:
    bucket, _, name = path[len("gs://"):].partition("/")
    return bucket, name


def _blob(path: str):
    # The submodule by its full name: `from google.cloud import storage` makes mypy look `storage` up as an
    # attribute of the google.cloud namespace package, where it does not find it.
    from google.cloud.storage import Client

    from beam_job import storage

    storage.prepare_remote_access()
    bucket, name = _split_gs(path)
    return Client().bucket(bucket).blob(name)


def _gcs_read_bytes(path: str) -> tuple[bytes | None, int | None]:
    from google.api_core import exceptions as gexc

    blob = _blob(path)
    try:
        data = blob.download_as_bytes()
    except gexc.NotFound:
        return None, None
    return data, blob.generation


def _gcs_read(path: str) -> tuple[dict[str, Any] | None, int | None]:
    """(the claim's content, its generation); (None, None) when there is none; {} when it is not a claim."""
    data, generation = _gcs_read_bytes(path)
    return (None if data is None else (_parse(data) or {})), generation


def _gcs_acquire(path: str, output: str, run_id: str, take_over: str | None) -> Claim:
    from google.api_core import exceptions as gexc

    body = _claim_body(run_id)
    blob = _blob(path)
    data, generation = _gcs_read_bytes(path)
    holder = None if data is None else _holder(output, path, data)
    if holder is not None:
        _check_take_over(output, holder, take_over)
        precondition = generation  # replace exactly the claim we read, nothing newer
    else:
        precondition = 0  # create only if absent
    try:
        blob.upload_from_string(body, content_type="application/json", if_generation_match=precondition)
    except gexc.PreconditionFailed:
        now, _ = _gcs_read_bytes(path)
        raise _held_error(output, {} if now is None else _holder(output, path, now)) from None
    if holder is not None:
        _LOGGER.warning("took over the claim of run %s on %s", take_over, output)
    now, generation = _gcs_read_bytes(path)
    mine = {} if now is None else _holder(output, path, now)
    if mine.get("token") != json.loads(body)["token"]:
        raise _held_error(output, mine)
    return Claim(path=path, run_id=run_id, generation=generation, body=body)


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

def acquire(output: str, run_id: str, *, take_over: str | None = None) -> Claim:
    """Claim `output` for `run_id`; ClaimError (one line) when another run holds it.

    take_over: the run id of a stale claim to replace (it must still name that run).
    """
    path = layout.claim_path(output)
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


def _restore(claim: Claim) -> bool:
    """Put a deleted claim file back, only if the name is still free; True when it was put back."""
    if claim.path.startswith("gs://"):
        from google.api_core import exceptions as gexc

        try:
            _blob(claim.path).upload_from_string(claim.body, content_type="application/json", if_generation_match=0)
        except gexc.PreconditionFailed:
            return False
        return True
    return _local_create(claim.path, claim.body)


class ClaimKeeper:
    """Watches a held claim while its run runs (a daemon thread, one read every `interval_s`).

    A claim file deleted under the run (by hand, or a cleanup) is put back at once, so no second run can
    claim the output meanwhile; the launcher logs a warning. A claim that names another run (taken over
    from another machine, or claimed in the moment it was missing) means the output is no longer this run's:
    `on_lost(description)` is called once and the keeper stops.
    """

    def __init__(self, claim: Claim, on_lost, interval_s: float = 1.0):
        self._claim = claim
        self._on_lost = on_lost
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="delg-claim-keeper", daemon=True)
        self._token = (_parse(claim.body) or {}).get("token")
        self.restored = 0

    def __enter__(self) -> ClaimKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> bool:
        """One look at the claim; False once it is lost (on_lost called)."""
        try:
            data = (_gcs_read_bytes(self._claim.path)[0] if self._claim.path.startswith("gs://")
                    else _local_read_bytes(self._claim.path))
        except Exception:  # storage unreachable for a moment: look again next time
            _LOGGER.debug("could not read the claim %s", self._claim.path, exc_info=True)
            return True
        if data is None:
            if _restore(self._claim):
                self.restored += 1
                _LOGGER.warning("the claim file %s was deleted while run %s holds the output: put it back",
                                self._claim.path, self._claim.run_id)
                return True
            return True  # someone else created it meanwhile: the next look says whose it is
        holder = _parse(data) or {}
        if holder.get("token") == self._token:
            return True
        self._on_lost(_describe(holder) if holder else f"an unreadable claim file {self._claim.path}")
        return False

    def _watch(self) -> None:
        while not self._stop.wait(self._interval_s):
            if not self.check():
                return


def read(output: str) -> dict[str, Any] | None:
    """The current claim's content, or None when the output is not claimed."""
    path = layout.claim_path(output)
    if path.startswith("gs://"):
        return _gcs_read(path)[0]
    return _local_read(path)
