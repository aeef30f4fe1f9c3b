"""The launch seen from outside: signals, a claim deleted or taken under a live run, a dead worker, leftovers.

Real `python -m beam_job` processes, real signals (SIGTERM, SIGINT) and real files; the test-only failpoint
hook (beam_job/pipeline/failpoints.py, `wait`) holds the run at a known moment (a bundle has written temp
files, nothing is committed) so the signal lands mid-run every time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_job import launch
from beam_job.pipeline import claim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES = 6


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("launch-images")
    rng = np.random.default_rng(7)
    for i in range(N_IMAGES):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"im{i}.jpg")
    return str(folder / "*.jpg")


def _start(images, output, tmp_path, *extra, pause="wait 120"):
    """A job held at its first write (failpoint "write"), and the file that appears when it gets there."""
    points = tmp_path / "points"
    points.mkdir(exist_ok=True)
    (points / "write").write_text(pause)
    progress_parent = tmp_path / "tmp"
    progress_parent.mkdir(exist_ok=True)
    env = dict(os.environ, DELG_FAILPOINT_DIR=str(points), TF_NUM_INTRAOP_THREADS="1", TMPDIR=str(progress_parent))
    proc = subprocess.Popen([sys.executable, "-m", "beam_job", "--input", images, "--output", output, "--preset",
                             "tiny", "--rows_per_shard", "2", *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    reached = points / "write.reached"
    deadline = time.monotonic() + 180
    while not reached.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the job never reached its first write"
        time.sleep(0.2)
    return proc, progress_parent


def _leftovers(output):
    """Files under the output that a finished (or cleanly stopped) run must not leave: claim and temp files."""
    found = []
    for dirpath, dirnames, files in os.walk(output):
        found += [os.path.relpath(os.path.join(dirpath, d), output) for d in dirnames if d.startswith("beam-temp-")]
        found += [f for f in files if f == "_claim.json"]
    return found


def _rows(output, kind):
    pattern = os.path.join(output, kind)
    if not os.path.isdir(pattern):
        return []
    rows = []
    for name in sorted(os.listdir(pattern)):
        if name.endswith(".parquet"):
            rows += pq.read_table(os.path.join(pattern, name), columns=["image_id", "path"]).to_pylist()
    return rows


@pytest.mark.parametrize("signum, mode", [(signal.SIGTERM, []), (signal.SIGINT, [
    "--direct_num_workers=2", "--direct_running_mode=multi_processing"])], ids=["sigterm", "sigint-2-workers"])
def test_a_signal_stops_the_run_in_one_line_and_the_resume_finishes_it(images, tmp_path, signum, mode):
    """SIGTERM (timeout, docker stop, Kubernetes) ends a run as Ctrl-C does: exit 128+signal, one line, the
    claim released, this run's temp folders and progress folder removed; the resume then finishes the job."""
    output = str(tmp_path / "out")
    proc, progress_parent = _start(images, output, tmp_path, *mode)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"delg-extract: stopped by {signal.Signals(signum).name}: ")
    assert "--skip_existing" in last
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert _leftovers(output) == []
    assert not [n for n in os.listdir(progress_parent) if n.startswith(launch.PROGRESS_DIR_PREFIX)]
    assert not os.path.exists(os.path.join(output, "_SUCCESS"))

    resumed = subprocess.run([sys.executable, "-m", "beam_job", "--input", images, "--output", output, "--preset",
                              "tiny", "--no_progress", "--skip_existing"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ids = [r["image_id"] for r in _rows(output, "features")]
    assert len(ids) == len(set(ids)) == N_IMAGES
    assert _leftovers(output) == [] and os.path.exists(os.path.join(output, "_SUCCESS"))


def test_a_claim_deleted_under_a_live_run_is_put_back_and_a_claim_taken_from_it_stops_it(images, tmp_path):
    output = str(tmp_path / "out")
    proc, _ = _start(images, output, tmp_path, "--run_id", "first", "--no_progress", pause="wait 20")
    claim_file = os.path.join(output, "_claim.json")
    # --take_over_claim of a run alive on this machine: refused, naming its pid.
    taken = subprocess.run([sys.executable, "-m", "beam_job", "--input", images, "--output", output, "--preset",
                            "tiny", "--skip_existing", "--take_over_claim", "first"], cwd=REPO, capture_output=True,
                           text=True, timeout=120)
    assert taken.returncode == 2
    assert f"run first is still running on this machine (pid {proc.pid})" in taken.stderr
    # The claim file deleted by hand: the run puts it back (so a second run is refused), same token.
    before = open(claim_file).read()
    os.unlink(claim_file)
    deadline = time.monotonic() + 30
    while not os.path.exists(claim_file) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open(claim_file).read() == before
    # Another run's claim in its place (taken over from another machine): this run stops, touching nothing.
    other = dict(json.loads(before), run_id="intruder", token="other", host="elsewhere", pid=1)
    with open(claim_file + ".tmp", "w") as fh:
        json.dump(other, fh)
    os.replace(claim_file + ".tmp", claim_file)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 1, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(
        "delg-extract: job failed: the output's claim was taken by run intruder (on elsewhere, pid 1")
    assert json.load(open(claim_file))["run_id"] == "intruder"  # the other run's claim is left alone
    assert not [d for d in _leftovers(output) if d != "_claim.json"]  # this run's temp folders are gone


def test_a_dead_worker_is_named_as_such(images, tmp_path):
    """A worker process SIGKILLed mid-bundle (failpoint "kill", the first worker to write): the run fails in
    one line that says a worker died and how to finish, not with the transport's words or a traceback."""
    output = str(tmp_path / "out")
    points = tmp_path / "points"
    points.mkdir()
    (points / "write").write_text("kill")
    env = dict(os.environ, DELG_FAILPOINT_DIR=str(points), TF_NUM_INTRAOP_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "beam_job", "--input", images, "--output", output, "--preset",
                           "tiny", "--no_progress", "--rows_per_shard", "2", "--direct_num_workers=2",
                           "--direct_running_mode=multi_processing"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert [n for n in os.listdir(points) if n.startswith("write.fired-")]  # a worker did die
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("delg-extract: job failed: the job failed: a worker process died during the run")
    assert "--skip_existing" in last
    assert "Traceback" not in proc.stderr


def test_take_over_refuses_a_live_holder_on_this_machine_and_accepts_a_dead_one(tmp_path):
    output = str(tmp_path / "out")
    os.makedirs(output)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        body = {"run_id": "old", "host": socket.gethostname(), "pid": sleeper.pid, "claimed_at": "x", "token": "t"}
        with open(os.path.join(output, "_claim.json"), "w") as fh:
            json.dump(body, fh)
        with pytest.raises(claim.ClaimError, match=f"still running on this machine \\(pid {sleeper.pid}\\)"):
            claim.acquire(output, "new", take_over="old")
    finally:
        sleeper.kill()
        sleeper.wait()
    held = claim.acquire(output, "new", take_over="old")  # its process is gone now: a crashed run
    assert claim.read(output)["run_id"] == "new" and claim.release(held)


def test_claim_keeper_puts_a_deleted_claim_back_and_reports_a_foreign_one(tmp_path):
    output = str(tmp_path / "out")
    held = claim.acquire(output, "mine")
    lost = []
    keeper = claim.ClaimKeeper(held, lost.append)
    os.unlink(held.path)
    assert keeper.check() and keeper.restored == 1
    assert open(held.path, "rb").read() == held.body
    with open(held.path, "w") as fh:
        json.dump({"run_id": "theirs", "host": "h", "pid": 5, "claimed_at": "t", "token": "x"}, fh)
    assert keeper.check() is False and lost == ["run theirs (on h, pid 5, since t)"]
    assert claim.release(held) is False  # not ours any more: left alone


def test_progress_folders_of_dead_launchers_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    names = [f"{launch.PROGRESS_DIR_PREFIX}{dead.pid}-abc", f"{launch.PROGRESS_DIR_PREFIX}{os.getpid()}-def",
             f"{launch.PROGRESS_DIR_PREFIX}oldstyle", "unrelated"]
    for name in names:
        os.makedirs(tmp_path / name / "sub")
    assert launch.remove_stale_progress_dirs(str(tmp_path)) == 1
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])
    assert tempfile.gettempdir()  # the default parent is the temp directory


def test_job_error_line_names_a_dead_worker_and_keeps_other_errors():
    dead = RuntimeError("Pipeline failed\n...\ngrpc: Channel closed prematurely.\n")
    assert launch.job_error_line(dead).startswith("a worker process died during the run")
    other = RuntimeError("Traceback ...\n  File x\nValueError: bad thing happened\n")
    assert launch.job_error_line(other) == "ValueError: bad thing happened"


@pytest.mark.parametrize("delay_s", [0.2, 0.8, 2.5])
def test_ctrl_c_at_any_moment_of_start_up_prints_one_line(images, tmp_path, delay_s):
    """Ctrl-C while Python imports Beam (the first second), while TensorFlow starts and the model is checked, or
    while the pipeline is built: exit 130, one line, no traceback, no claim left."""
    output = str(tmp_path / "out")
    (tmp_path / "write").write_text("wait 120")  # the run cannot end before the signal: it waits at its first write
    env = dict(os.environ, DELG_FAILPOINT_DIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "beam_job", "--input", images, "--output", output, "--preset",
                             "tiny"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    own = [line for line in stderr.splitlines() if line.startswith("delg-extract: ")]
    assert own == [stderr.strip().splitlines()[-1]] and own[0].startswith("delg-extract: stopped by SIGINT: ")
    assert not os.path.exists(os.path.join(output, "_claim.json"))


def test_a_clean_run_with_worker_processes_prints_no_warning(images, tmp_path):
    """Beam's SDK workers (--direct_running_mode=multi_processing) each warned "No semi_persistent_directory
    found"; a clean run prints no warning but the untrained model's."""
    proc = subprocess.run([sys.executable, "-m", "beam_job", "--input", images, "--output", str(tmp_path / "out"),
                           "--preset", "tiny", "--no_progress", "--direct_num_workers=2",
                           "--direct_running_mode=multi_processing"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [ln for ln in proc.stderr.splitlines() if " WARNING " in ln and "UNTRAINED" not in ln]
    assert warnings == [], warnings


class _UnstoppableJob:
    """SIMULATED remote PipelineResult (no engine here refuses a cancel): running, and cancel() fails as a
    runner's API does when the job service cannot be reached."""

    state = "RUNNING"

    def cancel(self):
        raise ConnectionError("failed to connect to all addresses\ndetails...")


def test_a_remote_job_that_cannot_be_cancelled_keeps_the_claim_and_names_the_way_out(images, tmp_path):
    from beam_job.pipeline.options import job_config_from_args, parse_job_args

    output = str(tmp_path / "out")
    args, beam_args = parse_job_args(["--input", images, "--output", output, "--preset", "tiny", "--run_id", "r1",
                                      "--runner=PortableRunner", "--job_endpoint=127.0.0.1:1"])
    with pytest.raises(launch.Interrupted) as stopped:
        with launch.Launch(job_config_from_args(args), beam_args) as running:
            running._submitted(_UnstoppableJob())  # what run_pipeline hands over once the runner took the job
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                detail = running._stop_remote_job(wait_s=0)
                raise launch.Interrupted(signal.SIGTERM, detail.lstrip("; ")) from None
    assert "could not be cancelled (failed to connect to all addresses)" in stopped.value.detail
    assert "--take_over_claim r1" in stopped.value.detail
    assert json.load(open(os.path.join(output, "_claim.json")))["run_id"] == "r1"  # kept: the job may still write
