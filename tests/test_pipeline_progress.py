"""Progress of local runs: per-worker count files summed into 'done of total, img/s, ETA' lines, or a bar on a
terminal; the run's one rate; what a clean run prints."""

import datetime
import json
import logging
import os
import subprocess
import sys
import threading

from beam_job.pipeline.progress import (
    ProgressMonitor,
    ProgressReporter,
    format_progress,
    images_per_s,
    read_progress,
    seconds_since,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reporters_are_summed_across_workers(tmp_path):
    a, b = ProgressReporter(str(tmp_path)), ProgressReporter(str(tmp_path))
    for _ in range(3):
        a.add("done")
    b.add("failed")
    b.add("skipped", 5)
    a.flush()
    b.flush()
    assert read_progress(str(tmp_path)) == {"done": 3, "failed": 1, "skipped": 5}
    ProgressReporter(None).add("done")  # Dataflow: no side channel, no error


def test_progress_line_has_total_rate_and_eta():
    line = format_progress({"done": 30, "failed": 10, "skipped": 10}, 100, 20.0)
    assert line == "progress: 50 of 100 images; 30 ok, 10 failed, 10 skipped (existing); 2.00 images/s; ETA 25 s"
    assert "ETA" not in format_progress({"done": 4}, 4, 2.0)
    assert "of ? images" in format_progress({}, None, 1.0)


def _progress_lines(caplog, tmp_path, total, steps):
    """The progress lines a monitor logs (interval far longer than the test: only explicit polls and the end)
    while `steps` run: "add N" (a worker reports N more done) or "poll"."""
    caplog.set_level(logging.INFO, logger="beam_job.pipeline.progress")
    reporter = ProgressReporter(str(tmp_path))
    with ProgressMonitor(str(tmp_path), total=total, interval_s=3600) as monitor:
        for step in steps:
            if step == "poll":
                monitor.poll()
            else:
                reporter.add("done", int(step.split()[1]))
                reporter.flush()
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]


def test_monitor_logs_on_change_and_at_the_end(tmp_path, caplog):
    """Deterministic: the interval is far longer than the test, so only the explicit polls log."""
    lines = _progress_lines(caplog, tmp_path, 4, ["add 2", "poll", "poll", "add 2"])  # 2nd poll: no change
    assert len(lines) == 2, lines
    assert lines[0].startswith("progress: 2 of 4 images; 2 ok, 0 failed")
    assert lines[1].startswith("progress: 4 of 4 images; 4 ok, 0 failed")


def test_the_last_line_is_not_repeated_at_the_end(tmp_path, caplog):
    """The thread already logged the final counts: leaving the monitor adds no second copy of that line."""
    lines = _progress_lines(caplog, tmp_path, 2, ["add 2", "poll"])
    assert len(lines) == 1 and lines[0].startswith("progress: 2 of 2 images"), lines


def test_one_rate_processed_images_per_second_since_the_run_started():
    assert images_per_s(10, 4.0) == 2.5
    assert images_per_s(10, 0.0) is None and images_per_s(3, None) is None
    start = "2026-12-03T10:00:00+00:00"
    assert seconds_since(start, datetime.datetime(2026, 12, 3, 10, 0, 8, tzinfo=datetime.timezone.utc)) == 8.0
    assert seconds_since("") is None and seconds_since("yesterday") is None
    # The launcher's started_at has whole seconds, as the summary's finished_at: so is the time measured now.
    assert float(seconds_since(datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))).is_integer()
    # Skipped (existing) images are finished but not processed: they count toward the total, not the rate.
    line = format_progress({"done": 6, "failed": 2, "skipped": 40}, 60, 4.0)
    assert line == "progress: 48 of 60 images; 6 ok, 2 failed, 40 skipped (existing); 2.00 images/s; ETA 6 s"


BAR_SCRIPT = r"""
import logging, sys, tempfile
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from beam_job.pipeline.progress import ProgressMonitor, ProgressReporter
folder = tempfile.mkdtemp()
reporter = ProgressReporter(folder)
with ProgressMonitor(folder, 4, 3600) as monitor:
    for _ in range(3):
        reporter.add("done")
        reporter.flush()
        monitor.poll()
        logging.getLogger("beam_job.x").info("a job line")
    reporter.add("failed")
    reporter.flush()
"""


def _stderr_on_a_terminal(code, columns=100):
    """Run `code` in a Python process whose stderr is a real terminal (a pty); what it wrote there."""
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, columns, 0, 0))
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the process closed its end
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    return b"".join(chunks).decode("utf-8", "replace")


def test_a_terminal_gets_a_bar_with_the_log_lines_above_it():
    text = _stderr_on_a_terminal(BAR_SCRIPT)
    assert "extracting  75%|" in text and "| 3/4 images, 3 ok, 0 failed;" in text, text
    assert "extracting 100%|" in text and "| 4/4 images, 3 ok, 1 failed;" in text, text  # read as the monitor ends
    assert "images/s" in text and "progress:" not in text, text  # the bar replaces the log lines
    lines = [ln.strip("\r") for ln in text.split("\n")]
    assert sum(ln.endswith("INFO beam_job.x: a job line") for ln in lines) == 3, lines  # each on a line of its own


def test_a_clean_run_prints_no_warning_and_no_line_twice(tmp_path):
    """A tiny run without failures (and a hyphenated flag): no Beam warnings, one final progress line, Beam's
    metrics only with --verbose, and the job's first line before TensorFlow's start-up lines."""
    from PIL import Image

    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (48 + i, 40), (10 * i, 200, 30)).save(images / f"{i}.jpg")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0")
    runs = {}
    for verbose in (False, True):
        out = tmp_path / f"out{verbose}"
        argv = [sys.executable, "-m", "beam_job", "--input", str(images), "--output", str(out), "--preset", "tiny",
                "--max-feature-num", "5", "--progress-interval", "3600"] + (["--verbose"] if verbose else [])
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr
        runs[verbose] = proc.stderr.splitlines()
        summary_path = next((out / "runs").glob("*/summary.json"))
        assert json.loads(summary_path.read_text())["config"]["max_feature_num"] == 5  # the hyphenated flag
    lines = runs[False]
    assert not [ln for ln in lines if " WARNING " in ln and "UNTRAINED" not in ln], lines
    assert not [ln for ln in lines if "Resource module" in ln or "No shards found" in ln], lines
    progress = [ln for ln in lines if "progress: " in ln]
    assert len(progress) == 1 and "progress: 3 of 3 images; 3 ok, 0 failed" in progress[0], progress
    assert not [ln for ln in lines if " metric: " in ln], lines
    assert "checking the inputs, the model" in lines[0], lines[:3]
    assert len([ln for ln in runs[True] if " metric: " in ln]) >= 10, runs[True]


def test_monitor_thread_polls_by_itself(tmp_path):
    """The background thread logs new counts without being asked: wait for the line (no fixed sleep)."""
    seen = threading.Event()

    class Catch(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("progress: 3 of 3"):
                seen.set()

    logger = logging.getLogger("beam_job.pipeline.progress")
    handler, level = Catch(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        reporter = ProgressReporter(str(tmp_path))
        with ProgressMonitor(str(tmp_path), total=3, interval_s=0.01):
            reporter.add("done", 3)
            reporter.flush()
            assert seen.wait(timeout=30), "the monitor thread never logged the new counts"
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
