"""Progress side channel of local runs: per-worker count files summed into 'done of total, img/s, ETA' lines."""

import logging
import threading

from beam_job.pipeline.progress import ProgressMonitor, ProgressReporter, format_progress, read_progress


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


def test_monitor_logs_on_change_and_at_the_end(tmp_path, caplog):
    """Deterministic: the interval is far longer than the test, so only the explicit polls log."""
    caplog.set_level(logging.INFO, logger="beam_job.pipeline.progress")
    reporter = ProgressReporter(str(tmp_path))
    with ProgressMonitor(str(tmp_path), total=4, interval_s=3600) as monitor:
        reporter.add("done", 2)
        reporter.flush()
        monitor.poll()
        monitor.poll()  # unchanged counts: no second line
        reporter.add("done", 2)
        reporter.flush()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 2, lines
    assert lines[0].startswith("progress: 2 of 4 images; 2 ok, 0 failed")
    assert lines[1].startswith("progress: 4 of 4 images; 4 ok, 0 failed")


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
