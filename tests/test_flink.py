"""The job on a real Apache Flink cluster (marker `flink`): exact output under real retries and lost workers.

One cluster for the module, started by scripts/flink_cluster.py as a user would start it: a JobManager and two
TaskManagers (two slots each, each starting its own SDK workers), all on 127.0.0.1, with Flink's fixed-delay restart
strategy. Each job runs as `python -m beam_job ... --runner=FlinkRunner`, in its own process, like a user's.
Faults are real: a TaskManager SIGKILLed with its SDK workers (a lost host), an SDK worker process that
SIGKILLs itself, and a bundle that raises on its first attempt only. The worker-side points are armed with
files (beam_job/pipeline/failpoints.py): the workers' environment is fixed when the cluster starts.
Every run must end as the uninterrupted local run does: every input once, the same feature bits, `_SUCCESS`,
no temp files; and Flink's exception history must show that the fault really happened and was recovered.

Needs Java and Maven (the job server is built once, then cached; docs/flink.md). No skipping: the CI machine
has both.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import psutil
import pytest
from PIL import Image

from helpers import assert_every_entry_once, read_rows, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import flink_cluster  # noqa: E402

pytestmark = pytest.mark.flink

TINY = ["--preset", "tiny", "--no_progress"]
JOB_TIMEOUT = 420


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("flink")
    points = workdir / "failpoints"
    points.mkdir()
    state = flink_cluster.start(str(workdir / "cluster"), taskmanagers=2, slots=2, restart_attempts=4,
                                env={"DELG_FAILPOINT_DIR": str(points), "TF_NUM_INTRAOP_THREADS": "1"})
    state["points"] = str(points)
    try:
        yield state
    finally:
        flink_cluster.stop(state["workdir"], quiet=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The broken/odd corpus, and the feature bits of an uninterrupted local run over it."""
    root = tmp_path_factory.mktemp("flink-corpus")
    _, _, expect = write_corpus(root)
    local = str(root / "out-local")
    proc = _job(["--input", str(root / "img" / "*"), "--output", local, *TINY], root / "local.log",
                {"TF_NUM_INTRAOP_THREADS": "1"})  # as on the cluster's workers: the same kernels, the same bits
    assert proc.wait(JOB_TIMEOUT) == 0, (root / "local.log").read_text()[-3000:]
    return {"root": root, "expect": expect, "bits": _feature_bits(assert_every_entry_once(local, expect))}


def _job(args, log, env=None):
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "beam_job", *args], stdout=fh, stderr=subprocess.STDOUT,
                                cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, **(env or {})))


def _feature_bits(rows):
    return {r["image_id"]: (np.asarray(r["global_descriptor"], np.float32).tobytes(),
                            np.asarray(r["locations"], np.float32).tobytes() if r.get("locations") else b"")
            for r in rows}


def _run_on_flink(cluster, corpus, name, fault=None):
    """Run the corpus on the cluster; `fault(job_process)` runs while the job does. Returns the output."""
    out = str(corpus["root"] / f"out-{name}")
    log = corpus["root"] / f"{name}.log"
    before = {j["jid"] for j in _jobs(cluster)}
    proc = _job(["--input", str(corpus["root"] / "img" / "*"), "--output", out, *TINY,
                 *flink_cluster.job_flags(cluster)], log)
    try:
        if fault:
            fault(proc)
        code = proc.wait(JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    features = assert_every_entry_once(out, corpus["expect"])
    assert _feature_bits(features) == corpus["bits"]  # the same bits as the uninterrupted local run
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    leftovers = [p for p in glob.glob(os.path.join(out, "**"), recursive=True)
                 if "beam-temp" in p or p.endswith((".tmp", ".partial")) or os.path.basename(p) == "_claim.json"]
    assert not leftovers, leftovers
    (summary_path,) = glob.glob(os.path.join(out, "runs", "*", "summary.json"))
    with open(summary_path) as fh:
        summary = json.load(fh)
    assert summary["status"] == "succeeded"
    assert summary["counts"]["listed"] == len(corpus["expect"])
    (jid,) = {j["jid"] for j in _jobs(cluster)} - before
    return {"out": out, "log": text, "jid": jid, "summary": summary}


def _jobs(cluster):
    return _rest(cluster, "/jobs/overview")["jobs"]


def _rest(cluster, path):
    with urllib.request.urlopen(f"http://{cluster['host']}:{cluster['rest_port']}{path}", timeout=10) as resp:
        return json.load(resp)


def _exception_history(cluster, jid):
    """The failures Flink recorded (and recovered from, since the job succeeded) for a job, as text."""
    history = _rest(cluster, f"/jobs/{jid}/exceptions")
    entries = history.get("exceptionHistory", {}).get("entries", [])
    return [(e.get("exceptionName", ""), e.get("stacktrace", ""), e.get("taskManagerId")) for e in entries]


def _arm(cluster, point, action):
    for leftover in glob.glob(os.path.join(cluster["points"], point + "*")):
        os.remove(leftover)
    with open(os.path.join(cluster["points"], point), "w") as fh:
        fh.write(action)


def _wait_for(path, proc, timeout=240):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, f"the job ended before {os.path.basename(path)} appeared"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)
    with open(path) as fh:
        return int(fh.read())


def test_odd_corpus_on_flink_every_entry_once(cluster, corpus):
    run = _run_on_flink(cluster, corpus, "plain")
    assert _exception_history(cluster, run["jid"]) == []  # nothing failed: the baseline of the fault tests
    assert "done:" in run["log"]


def test_taskmanager_killed_mid_run_flink_restarts_and_the_output_is_exact(cluster, corpus):
    """A lost host: the TaskManager running a bundle that has written temp files, and its SDK workers."""
    _arm(cluster, "write", "wait 300")
    victim = {}

    def kill_host(proc):
        worker = psutil.Process(_wait_for(os.path.join(cluster["points"], "write.reached"), proc))
        owners = {pid: name for name, pid in cluster["taskmanagers"].items()}
        tm = next((p for p in worker.parents() if p.pid in owners), None)
        assert tm, "the SDK worker is no TaskManager's child"
        victim.update(name=owners[tm.pid], pid=tm.pid, workers=[c.pid for c in tm.children(recursive=True)])
        os.killpg(tm.pid, signal.SIGKILL)  # the TaskManager and its SDK workers (its process group)

    try:
        run = _run_on_flink(cluster, corpus, "tm-killed", kill_host)
    finally:
        if victim:  # give the cluster its second TaskManager back for the next tests
            flink_cluster.start_taskmanager(cluster, victim["name"])
            flink_cluster.wait_ready(cluster, 2, 120)
    failures = _exception_history(cluster, run["jid"])
    assert failures, "Flink recorded no failure: the TaskManager was not running the job's work"
    assert worker_gone(victim["pid"]) and all(worker_gone(pid) for pid in victim["workers"])


def worker_gone(pid):
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_sdk_worker_killed_mid_run_flink_restarts_and_the_output_is_exact(cluster, corpus):
    _arm(cluster, "write", "kill")
    run = _run_on_flink(cluster, corpus, "worker-killed")
    assert glob.glob(os.path.join(cluster["points"], "write.fired-*")), "the worker never reached the point"
    assert _exception_history(cluster, run["jid"]), "Flink recorded no failure of the killed worker's task"


def test_bundle_failing_once_is_retried_and_the_output_is_exact(cluster, corpus):
    _arm(cluster, "write", "raise")
    run = _run_on_flink(cluster, corpus, "fail-once")
    assert glob.glob(os.path.join(cluster["points"], "write.fired-*")), "the bundle never reached the point"
    failures = _exception_history(cluster, run["jid"])
    assert any("FailpointError" in trace for _, trace, _ in failures), failures


def test_taskmanagers_on_hosts_of_their_own_with_the_output_on_gcs(tmp_path):
    """Each TaskManager (and so its SDK workers) in a network namespace of its own, reaching the JobManager and
    a GCS-protocol server only through a bridge: inputs and output on gs://, which every host reaches. What a
    host serves on its own loopback no other host sees, so nothing can work by sharing 127.0.0.1."""
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    network = flink_cluster.make_hosts(2)
    gateway = network["gateway"]
    port = flink_cluster.free_port()
    server = create_server(gateway, port, in_memory=True, default_bucket=None)
    server.start()
    emulator = {"STORAGE_EMULATOR_HOST": f"http://{gateway}:{port}", "TF_NUM_INTRAOP_THREADS": "1"}
    try:
        state = flink_cluster.start(str(tmp_path / "cluster"), taskmanagers=2, slots=2, hosts=network, env=emulator)
        try:
            for tm in _rest(state, "/taskmanagers")["taskmanagers"]:  # registered from their own addresses
                assert any(f"@{network['hosts'][name][1]}:" in tm["path"] for name in state["taskmanagers"]), tm
            pids = [state["jobmanager"], *state["taskmanagers"].values()]
            spaces = {os.readlink(f"/proc/{pid}/ns/net") for pid in pids}
            assert len(spaces | {os.readlink("/proc/self/ns/net")}) == 4  # three hosts and this machine

            client = storage.Client(project="test", credentials=AnonymousCredentials(),
                                    client_options={"api_endpoint": emulator["STORAGE_EMULATOR_HOST"]})
            bucket = client.create_bucket("flink-hosts")
            images = tmp_path / "img"
            images.mkdir()
            for i in range(10):
                pixels = np.random.default_rng(i).integers(0, 256, (40 + 4 * i, 64, 3), dtype=np.uint8)
                path = images / f"photo {i}.png"
                Image.fromarray(pixels).save(path)
                bucket.blob(f"img/{path.name}").upload_from_filename(str(path))
            (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
            bucket.blob("img/broken.jpg").upload_from_filename(str(images / "broken.jpg"))

            local = _job(["--input", str(images / "*"), "--output", str(tmp_path / "local"), *TINY],
                         tmp_path / "local.log", {"TF_NUM_INTRAOP_THREADS": "1"})
            remote = _job(["--input", "gs://flink-hosts/img/*", "--output", "gs://flink-hosts/out", *TINY,
                           *flink_cluster.job_flags(state)], tmp_path / "remote.log", emulator)
            assert local.wait(JOB_TIMEOUT) == 0, (tmp_path / "local.log").read_text()[-3000:]
            assert remote.wait(JOB_TIMEOUT) == 0, (tmp_path / "remote.log").read_text()[-4000:]
        finally:
            flink_cluster.stop(state["workdir"], quiet=True)

        names = [blob.name for blob in bucket.list_blobs(prefix="out/")]
        assert "out/_SUCCESS" in names and "out/_claim.json" not in names
        assert not [n for n in names if "beam-temp" in n], names
        fetched = tmp_path / "fetched"
        for name in names:
            if name.endswith(".parquet"):
                target = fetched / name
                target.parent.mkdir(parents=True, exist_ok=True)
                bucket.blob(name).download_to_filename(str(target))
        by_name = {}
        for kind in ("features", "failures"):
            for out, rows in (("remote", read_rows(str(fetched / "out" / kind))),
                              ("local", read_rows(str(tmp_path / "local" / kind)))):
                for row in rows.to_pylist():
                    key = (out, row["path"].rsplit("/", 1)[-1])
                    assert key not in by_name, f"{key} twice"
                    by_name[key] = row
        assert {n for o, n in by_name if o == "remote"} == {n for o, n in by_name if o == "local"} == {
            *(f"photo {i}.png" for i in range(10)), "broken.jpg"}
        for _out, name in by_name:
            remote_row, local_row = by_name["remote", name], by_name["local", name]
            if "global_descriptor" in local_row:  # a feature row: the same bits as the local run's
                assert _feature_bits([remote_row]).popitem()[1] == _feature_bits([local_row]).popitem()[1], name
            else:
                assert remote_row["stage"] == local_row["stage"] == "decode", name
    finally:
        server.stop()
        flink_cluster.remove_hosts(network)
        assert f"{network['bridge']}:" not in subprocess.run(["ip", "-o", "link"], capture_output=True,
                                                            text=True).stdout
