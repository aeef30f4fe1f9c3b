"""Shared test fixtures: offline-safe environment, a real GCS-protocol server on loopback, tiny images."""

import os

# Must be set before google-auth / Beam / TensorFlow are imported anywhere in the test process.
os.environ.setdefault("NO_GCE_CHECK", "true")  # never ping the GCE metadata server (off-loopback traffic)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")

import socket

import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def gcs_server():
    """A real GCS JSON-API server (gcp-storage-emulator) on 127.0.0.1, in memory, for the whole session.

    Yields the endpoint URL. Clients reach it through STORAGE_EMULATOR_HOST, which the `gcs` fixture sets.
    """
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=None)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def gcs(gcs_server, monkeypatch):
    """Point google-cloud-storage and Beam's gs:// filesystem at the loopback server; yield a storage.Client.

    Beam looks up application-default credentials first (4 retries with back-off, ~21 s offline); return
    anonymous credentials instead so that the lookup is instant. Worker subprocesses get the same through
    the environment variables set here (see beam_job/pipeline for how the job honours them).
    """
    import google.auth
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    monkeypatch.setattr(google.auth, "default", lambda *a, **k: (AnonymousCredentials(), "test-project"))
    client = storage.Client(project="test-project", credentials=AnonymousCredentials())
    yield client


@pytest.fixture
def gcs_bucket(gcs, request):
    """A fresh, empty bucket named after the test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:6]
    bucket = gcs.create_bucket(name)
    yield bucket


# The slow tier (marker `slow`): modules whose tests run whole jobs (in process or as subprocesses), a browser,
# pip installs, Dataflow dry runs or the Dockerfile replays. Everything else, minus the flink tests, is the fast
# tier for the edit-test loop: `bash scripts/test.sh -m "not slow and not flink"` (README, "Run the tests").
SLOW_MODULES = frozenset({
    "test_cli.py",
    "test_dataflow_dry_run.py",
    "test_delg_checkpoint.py",
    "test_delg_export.py",
    "test_docker_images.py",
    "test_examples.py",
    "test_exactly_once.py",
    "test_gcs_job.py",
    "test_launch.py",
    "test_odd_inputs.py",
    "test_packaging.py",
    "test_pipeline.py",
    "test_pipeline_progress.py",
    "test_pipeline_stats.py",
    "test_report.py",
    "test_retrieval_query.py",
    "test_runners.py",
})


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "flink: runs the job on a real local Flink cluster (needs Java and Maven; tests/test_flink.py)")
    config.addinivalue_line("markers", "slow: the slow tier (whole jobs, browser, installs; tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
