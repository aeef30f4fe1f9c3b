"""Progress of local runs (workers write count files, the launcher sums them), and the run's one rate.

Beam's metrics of a local (FnApiRunner) run are only readable after it finishes, so each writer DoFn
instance keeps its own counts ("done", "failed", "skipped") and rewrites <progress_dir>/<pid>-<uuid>.json
at most once a second (atomic replace); `ProgressMonitor`, a thread on the launcher, adds the files up
and shows "done of total, failures, images/s, ETA": a tqdm bar when stderr is a terminal, else a log line
every --progress_interval seconds. On Dataflow progress_dir is None and nothing is written: the Dataflow UI
shows the same counts as Beam counters.

`images_per_s` is the job's one definition of its rate, used by the progress line and bar, the summary's
`images_per_s` (hence the done line and the run report): images this run processed (feature rows plus
failure rows; images skipped as already extracted are not counted) per second since the run started
(`RunContext.started_at`, the launcher's clock when it began checking the inputs and the model).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from typing import IO

_LOGGER = logging.getLogger(__name__)
_MIN_WRITE_INTERVAL_S = 1.0
_HEARTBEAT_S = 60.0
_BAR_REFRESH_S = 0.5  # the bar's poll interval (workers rewrite their counts at most once a second)


class ProgressReporter:
    """Per-DoFn-instance counts written to `progress_dir` (no-op when it is None)."""

    def __init__(self, progress_dir: str | None):
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


def read_progress(progress_dir: str) -> dict[str, int]:
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


def images_per_s(processed: int, elapsed_s: float | None) -> float | None:
    """The run's rate, defined once (see the module docstring): `processed` images (features + failures, not
    the skipped ones) over `elapsed_s` seconds since the run started; None before any time has passed."""
    if elapsed_s is None or elapsed_s <= 0:
        return None
    return processed / elapsed_s


def seconds_since(started_at: str, now: datetime.datetime | None = None) -> float | None:
    """Seconds from an ISO time with a zone (RunContext.started_at) to `now`; None when `started_at` is empty or
    not an ISO time. `now` defaults to the current UTC time in the precision of `started_at` (whole seconds
    for the launcher's), as summary.json records `finished_at`: a run's last progress line then shows the
    rate its summary shows."""
    try:
        start = datetime.datetime.fromisoformat(started_at)
    except (TypeError, ValueError):
        return None
    if now is None:
        now = datetime.datetime.now(datetime.timezone.utc)
        if not start.microsecond:
            now = now.replace(microsecond=0)
    return (now - start).total_seconds()


def _progress_parts(counts: dict[str, int], total: int | None, elapsed_s: float | None) -> list[str]:
    """["N of T images", "a ok, b failed[, c skipped (existing)]", "R images/s"[, "ETA E s"]]."""
    done, failed, skipped = counts.get("done", 0), counts.get("failed", 0), counts.get("skipped", 0)
    processed = done + failed
    finished = processed + skipped
    rate = images_per_s(processed, elapsed_s) or 0.0
    parts = [f"{finished} of {total if total is not None else '?'} images"]
    parts.append(f"{done} ok, {failed} failed" + (f", {skipped} skipped (existing)" if skipped else ""))
    parts.append(f"{rate:.2f} images/s")
    if total is not None and rate > 0 and finished < total:
        eta = (total - finished) / rate
        parts.append(f"ETA {eta:.0f} s")
    return parts


def format_progress(counts: dict[str, int], total: int | None, elapsed_s: float | None) -> str:
    """The progress log line: "progress: N of T images; a ok, b failed; R images/s; ETA E s"."""
    return "progress: " + "; ".join(_progress_parts(counts, total, elapsed_s))


def wants_bar(stream: IO) -> bool:
    """A progress bar only on a terminal (never in a log file, a pipe or a CI log)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressMonitor:
    """Launcher thread showing a local run's progress: a tqdm bar on `stream` when it is a terminal (log lines
    are written above it), else a log line every `interval_s` seconds when the counts changed (and at least
    once a minute), and the last counts once at the end unless that line was just logged.

    started_at: the run's RunContext.started_at, from which the rate is measured (see `images_per_s`); without
    it, the time the monitor started. stream: where the bar goes (default sys.stderr).
    """

    def __init__(self, progress_dir: str, total: int | None, interval_s: float = 10.0,
                 started_at: str = "", stream: IO | None = None):
        self._dir = progress_dir
        self._total = total
        self._interval = interval_s
        self._started_at = started_at
        self._stream = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="delg-progress", daemon=True)
        self._start = time.monotonic()
        self._last_counts: dict[str, int] | None = None
        self._last_time = 0.0
        self._bar = None
        self._context = contextlib.ExitStack()

    def __enter__(self) -> ProgressMonitor:
        self._start = time.monotonic()
        stream = self._stream if self._stream is not None else sys.stderr
        if wants_bar(stream):
            self._open_bar(stream)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.poll(final=True)
        finally:
            self._context.close()

    def _open_bar(self, stream: IO) -> None:
        """The tqdm bar, with the root logger's console lines written above it while it is shown (both undone,
        the bar left on screen, when the monitor exits)."""
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._context.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            columns = 0
        # "extracting  40%|████      | 2/5 images, 2 ok, 0 failed; 1.91 images/s; ETA 2 s" (tqdm's postfix
        # begins with ", "); the counts, the rate and the ETA are ours (`_progress_parts`), not tqdm's.
        bar_format = ("{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images{postfix}" if self._total
                      else "{desc} {n_fmt} images{postfix}")
        self._bar = self._context.enter_context(tqdm(
            total=self._total, desc="extracting", file=stream, bar_format=bar_format, mininterval=0, leave=True,
            dynamic_ncols=columns > 0, ncols=None if columns > 0 else 100))  # a terminal of unknown width: 100

    def _elapsed(self) -> float | None:
        since_start = seconds_since(self._started_at) if self._started_at else None
        return since_start if since_start is not None else time.monotonic() - self._start

    def _loop(self) -> None:
        interval = min(self._interval, _BAR_REFRESH_S) if self._bar is not None else self._interval
        while not self._stop.wait(interval):
            self.poll()

    def poll(self, final: bool = False) -> None:
        """Read the counts now and show them: on the bar every time; as a log line when they changed, at
        least once a minute as a heartbeat, and at the end when the last line logged showed other counts.

        The thread calls this every `interval_s` (the bar: every 0.5 s); tests may call it at a known moment."""
        counts = read_progress(self._dir)
        now = time.monotonic()
        if self._bar is not None:
            parts = _progress_parts(counts, self._total, self._elapsed())
            finished = counts.get("done", 0) + counts.get("failed", 0) + counts.get("skipped", 0)
            self._bar.n = min(finished, self._total) if self._total else finished  # a retried bundle counts twice
            self._bar.set_postfix_str("; ".join(parts[1:]), refresh=True)  # parts[0] is the bar's n/total
            return
        if counts != self._last_counts or (not final and now - self._last_time >= _HEARTBEAT_S):
            _LOGGER.info(format_progress(counts, self._total, self._elapsed()))
            self._last_counts, self._last_time = counts, now
