"""Runners beyond the in-process one: Beam's portable path (a job service and an SDK worker pool, no Java), runner
options the unknown-flag check must know, and metrics from runners that report attempted values only.

The portable run is the fast smoke test of the path Flink and Spark take (tests/test_flink.py runs a real Flink
cluster): the launcher submits the job to `local_job_service_main` over gRPC, and the SDK work runs in worker
processes that `worker_pool_main` starts, as it would on a cluster's hosts.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from apache_beam.metrics.execution import MetricKey, MetricResult
from apache_beam.metrics.metric import MetricResults
from apache_beam.metrics.metricbase import MetricName
from PIL import Image

from beam_job.pipeline.options import JobConfigError, parse_job_args
from beam_job.pipeline.pipeline import counter_value, metrics_report

from helpers import assert_every_entry_once, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve(args, log, port, **extra_env):
    env = dict(os.environ, PYTHONPATH=ROOT, **extra_env)
    # The worker pool starts each SDK worker as `python ...` from PATH: this interpreter's folder goes first,
    # or the workers start without the job's packages.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, "-m", *args], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, open(log).read()[-2000:]
            time.sleep(0.2)


def test_portable_runner_with_a_worker_pool_runs_the_odd_corpus_exactly_once(tmp_path):
    _, _, expect = write_corpus(tmp_path)
    job_port, pool_port = _free_port(), _free_port()
    services = [
        _serve(["apache_beam.runners.portability.local_job_service_main", f"--port={job_port}"],
               tmp_path / "job-service.log", job_port),
        _serve(["apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"],
               tmp_path / "worker-pool.log", pool_port),
    ]
    out = tmp_path / "out"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "beam_job", "--input", str(tmp_path / "img" / "*"), "--output", str(out),
             "--preset", "tiny", "--runner=PortableRunner", f"--job_endpoint=127.0.0.1:{job_port}",
             "--environment_type=EXTERNAL", f"--environment_config=127.0.0.1:{pool_port}", "--verbose"],
            capture_output=True, text=True, timeout=400, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    finally:
        for service in services:
            os.killpg(service.pid, 9)
            service.wait()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_every_entry_once(str(out), expect)
    assert (out / "_SUCCESS").exists()
    assert not [p for p in out.rglob("*") if "beam-temp" in str(p)]
    assert "metric: counter delg/images_extracted = " in proc.stderr  # the portable runner's metrics reach us


def test_a_stopped_launcher_cancels_its_job_on_a_remote_runner(tmp_path):
    """SIGTERM to the launcher of a portable-runner job (the job service and the SDK workers are other
    processes, as on Dataflow or Flink): the launcher cancels the job before it releases the claim, so nothing
    keeps writing to an output that another run may then claim. The worker waits at its first write
    (failpoint), so the job is surely running when the signal comes."""
    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (48 + i, 40), (10 * i, 200, 30)).save(images / f"{i}.jpg")
    points = tmp_path / "points"
    points.mkdir()
    (points / "write").write_text("wait 300")
    job_port, pool_port = _free_port(), _free_port()
    services = [
        _serve(["apache_beam.runners.portability.local_job_service_main", f"--port={job_port}"],
               tmp_path / "job-service.log", job_port),
        _serve(["apache_beam.runners.worker.worker_pool_main", f"--service_port={pool_port}"],
               tmp_path / "worker-pool.log", pool_port, DELG_FAILPOINT_DIR=str(points)),
    ]
    out = tmp_path / "out"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "beam_job", "--input", str(images / "*.jpg"), "--output", str(out),
             "--preset", "tiny", "--rows_per_shard", "1", "--runner=PortableRunner",  # 1 row a group: 2 flushes
             f"--job_endpoint=127.0.0.1:{job_port}", "--environment_type=EXTERNAL",
             f"--environment_config=127.0.0.1:{pool_port}"],
            stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
        deadline = time.monotonic() + 300
        while not (points / "write.reached").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=180)
    finally:
        for service in services:
            os.killpg(service.pid, 9)
            service.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("delg-extract: stopped by SIGTERM: the job on the runner was cancelled (CANCELLED)"), last
    assert "the output's claim is released" in last
    assert not (out / "_claim.json").exists() and not (out / "_SUCCESS").exists()


def test_runner_options_beam_knows_pass_the_unknown_flag_check():
    base = ["--input", "x", "--output", "o"]
    for extra in (
        ["--runner=FlinkRunner", "--flink_master=127.0.0.1:8081", "--flink_version=1.19", "--parallelism=2",
         "--environment_type=PROCESS", '--environment_config={"command":"/x"}', "--environment_cache_millis=1"],
        ["--runner", "SparkRunner", "--spark_master_url=spark://127.0.0.1:7077"],
        ["--runner=PortableRunner", "--job_endpoint=127.0.0.1:1", "--environment_type=EXTERNAL"],
        ["--runner=DataflowRunner", "--project=p", "--region=r", "--sdk_container_image=i",
         "--dataflow_service_options=x"],
    ):
        parse_job_args(base + extra)
    with pytest.raises(JobConfigError, match="unknown flag '--flink_mastr"):
        parse_job_args([*base, "--runner=FlinkRunner", "--flink_mastr=x"])


def test_options_of_a_runner_module_not_imported_yet_are_known(tmp_path, monkeypatch):
    """Beam registers a runner's own options class only when the runner's module is imported (DaskRunner's
    --dask_client_address, for one; dask is not installed here, so a runner module written by the test plays
    its part). The check loads the module that --runner names, as Beam does when it builds the pipeline."""
    (tmp_path / "lazy_runner_mod.py").write_text(
        "from apache_beam.options.pipeline_options import PipelineOptions\n"
        "from apache_beam.runners.runner import PipelineRunner\n"
        "class LazyOptions(PipelineOptions):\n"
        "    @classmethod\n"
        "    def _add_argparse_args(cls, parser):\n"
        "        parser.add_argument('--lazy_endpoint')\n"
        "class LazyRunner(PipelineRunner):\n"
        "    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "lazy_runner_mod" not in sys.modules
    parse_job_args(["--input", "x", "--output", "o", "--runner=lazy_runner_mod.LazyRunner", "--lazy_endpoint=h:1"])
    with pytest.raises(JobConfigError, match=r"--runner no_such_mod\.Runner: cannot load this Beam runner"):
        parse_job_args(["--input", "x", "--output", "o", "--runner=no_such_mod.Runner"])


class _AttemptedOnly(MetricResults):
    """Metric results as a runner that reports no committed values gives them (a simulation: no runner here does)."""

    def __init__(self, results):
        self._results = results

    def query(self, filter=None):
        counters = [r for r in self._results if isinstance(r.attempted, int)
                    and (filter is None or not filter.names or r.key.metric.name in filter.names)]
        return {"counters": counters, "distributions": [], "gauges": []}


class _Result:
    def __init__(self, results):
        self._metrics = _AttemptedOnly(results)

    def metrics(self):
        return self._metrics


def test_metrics_fall_back_to_attempted_values_and_say_so():
    name = MetricName("delg", "images_read")
    result = _Result([MetricResult(MetricKey("read", name), None, 7),
                      MetricResult(MetricKey("read2", name), None, 3)])
    assert counter_value(result, "images_read") == 10
    assert metrics_report(result) == ["counter delg/images_read = 10 (attempted)"]
    committed = _Result([MetricResult(MetricKey("read", name), 4, 9)])
    assert metrics_report(committed) == ["counter delg/images_read = 4"]  # committed wins where it exists
