"""Progress side channel of local runs: per-worker count files summed into 'done of total, img/s, ETA' lines."""

import logging
import time

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


def test_monitor_logs_while_running_and_at_the_end(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="beam_job.pipeline.progress")
    reporter = ProgressReporter(str(tmp_path))
    with ProgressMonitor(str(tmp_path), total=4, interval_s=0.05):
        reporter.add("done", 2)
        reporter.flush()
        time.sleep(0.3)
        reporter.add("done", 2)
        reporter.flush()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert any(line.startswith("progress: 2 of 4 images") for line in lines)
    assert lines[-1].startswith("progress: 4 of 4 images; 4 ok, 0 failed")
