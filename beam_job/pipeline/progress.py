"""Progress of local runs: workers write small count files to a side directory, the launcher sums them.

Beam's metrics of a local (FnApiRunner) run are only readable after it finishes, so each writer DoFn
instance keeps its own counts ("done", "failed", "skipped") and rewrites <progress_dir>/<pid>-<uuid>.json
at most once a second (atomic replace); `ProgressMonitor`, a thread on the launcher, adds the files up
and logs "done of total, failures, images/s, ETA". On Dataflow progress_dir is None and nothing is written:
the Dataflow UI shows the same counts as Beam counters.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections import Counter
from typing import Dict, Optional

_LOGGER = logging.getLogger(__name__)
_MIN_WRITE_INTERVAL_S = 1.0
_HEARTBEAT_S = 60.0


class ProgressReporter:
    """Per-DoFn-instance counts written to `progress_dir` (no-op when it is None)."""

    def __init__(self, progress_dir: Optional[str]):
        self._dir = progress_dir
        self._counts: Counter = Counter()
        self._path = os.path.join(progress_dir, f"{os.getpid()}-{uuid.uuid4().hex}.json") if progress_dir else None
        self._last_write = 0.0

    def add(self, key: str, n: int = 1) -> None:
        if self._path is None:
            return
        self._counts[key] += n
        now = time.monotonic()
        if now - self._last_write >= _MIN_WRITE_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        if self._path is None or not self._counts:
            return
        self._last_write = time.monotonic()
        tmp = self._path + ".tmp"
        try:
            with open(tmp, "w") as fh:
                json.dump(dict(self._counts), fh)
            os.replace(tmp, self._path)
        except OSError:  # progress is best effort; never fail the job for it
            _LOGGER.debug("progress write failed", exc_info=True)


def read_progress(progress_dir: str) -> Dict[str, int]:
    """Sum of all workers' counts."""
    total: Counter = Counter()
    try:
        names = os.listdir(progress_dir)
    except OSError:
        return {}
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(progress_dir, name)) as fh:
                total.update(json.load(fh))
        except (OSError, ValueError):
            continue  # being replaced right now; the next poll sees it
    return dict(total)


def format_progress(counts: Dict[str, int], total: Optional[int], elapsed_s: float) -> str:
    done, failed, skipped = counts.get("done", 0), counts.get("failed", 0), counts.get("skipped", 0)
    processed = done + failed
    finished = processed + skipped
    rate = processed / elapsed_s if elapsed_s > 0 else 0.0
    parts = [f"{finished} of {total if total is not None else '?'} images"]
    parts.append(f"{done} ok, {failed} failed" + (f", {skipped} skipped (existing)" if skipped else ""))
    parts.append(f"{rate:.2f} images/s")
    if total is not None and rate > 0 and finished < total:
        eta = (total - finished) / rate
        parts.append(f"ETA {eta:.0f} s")
    return "progress: " + "; ".join(parts)


class ProgressMonitor:
    """Launcher thread logging progress every `interval_s` seconds while a local run is going."""

    def __init__(self, progress_dir: str, total: Optional[int], interval_s: float = 10.0):
        self._dir = progress_dir
        self._total = total
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="delg-progress", daemon=True)
        self._start = time.monotonic()
        self._last_counts: Optional[Dict[str, int]] = None
        self._last_time = 0.0

    def __enter__(self) -> "ProgressMonitor":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll(final=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.poll()

    def poll(self, final: bool = False) -> None:
        """Read the counts now; log when they changed, at the end, and at least once a minute as a heartbeat.

        The thread calls this every `interval_s`; callers (tests) may call it directly at a known moment."""
        counts = read_progress(self._dir)
        now = time.monotonic()
        if final or counts != self._last_counts or now - self._last_time >= _HEARTBEAT_S:
            _LOGGER.info(format_progress(counts, self._total, now - self._start))
            self._last_counts, self._last_time = counts, now
