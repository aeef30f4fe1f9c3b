"""gs:// end to end: input images, output shards and the model on a real GCS-protocol server (loopback) give
the same rows as the same job on local paths."""

import io
import ipaddress
import json
import logging
import os
import socket

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

# (name, height, width): small photos-like images of different sizes and formats; the tiny preset caps at 96 px.
IMAGES = [("a.jpg", 72, 96), ("b.png", 120, 80), ("c.jpg", 50, 64), ("sub dir é.jpg", 96, 96)]
BROKEN = "broken.jpg"  # a truncated JPEG: one failure row (stage decode) in both runs
RUNNER_ARGS = ["--direct_num_workers=2", "--direct_running_mode=multi_threading"]
FEATURE_ARRAYS = ("global_descriptor", "locations", "scales", "attention", "descriptors")
FEATURE_SCALARS = ("original_height", "original_width", "processed_height", "processed_width", "num_features", "preset")


@pytest.fixture(autouse=True)
def _quiet_emulator():
    """The emulator logs a WARNING for every streamed response; keep failure reports readable."""
    logger = logging.getLogger("gcp_storage_emulator")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _is_loopback(host) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture
def loopback_only(monkeypatch):
    """Fail the test if anything in this process connects to, or resolves, a non-loopback address."""
    attempts = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def check(address):
        if isinstance(address, tuple) and not _is_loopback(address[0]):
            attempts.append(address)
            raise OSError(f"test guard: connection to non-loopback address {address} refused")

    def connect(self, address):
        check(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        check(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not _is_loopback(host if isinstance(host, str) else host.decode()):
            attempts.append(host)
            raise socket.gaierror(f"test guard: lookup of non-loopback host {host!r} refused")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield attempts
    assert not attempts, f"the job tried to leave loopback: {attempts}"


def _photo(h, w, seed):
    """A smooth, photo-like RGB image (gradients + blobs) so the model sees structure, not noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        img[..., c] = 128 + 100 * np.sin(xx / rng.uniform(4, 12) + c) * np.cos(yy / rng.uniform(4, 12))
        img[..., c] += 60 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (min(h, w) / 4) ** 2))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory):
    """Local image folder and the tiny DELG model exported to a SavedModel folder."""
    from beam_job.delg.embedded import embedded_model_path

    root = tmp_path_factory.mktemp("gcsjob")
    images = root / "images"
    images.mkdir()
    for seed, (name, h, w) in enumerate(IMAGES):
        Image.fromarray(_photo(h, w, seed)).save(images / name)
    good = (images / IMAGES[0][0]).read_bytes()
    (images / BROKEN).write_bytes(good[: len(good) // 3])
    model_dir = embedded_model_path("tiny", cache_dir=str(root / "cache"))
    return images, model_dir


def _upload_tree(bucket, local_dir, prefix):
    count = 0
    for dirpath, _, files in os.walk(local_dir):
        for name in files:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, local_dir).replace(os.sep, "/")
            bucket.blob(f"{prefix}/{rel}").upload_from_filename(path)
            count += 1
    return count


def _run_job(argv):
    from beam_job.cli import run

    outcome = run([*argv, "--preset", "tiny", "--no_progress"])
    assert outcome is not None and outcome.summary, "the job wrote no run summary"
    return outcome


def _read_table(pattern):
    """All shards matching a local or gs:// pattern, through Beam's FileSystems (the job's own I/O layer)."""
    import pyarrow as pa
    from apache_beam.io.filesystems import FileSystems

    (match,) = FileSystems.match([pattern])
    tables = []
    for meta in sorted(match.metadata_list, key=lambda m: m.path):
        with FileSystems.open(meta.path) as fh:
            tables.append(pq.read_table(io.BytesIO(fh.read())))
    assert tables, f"no shards match {pattern}"
    return pa.concat_tables(tables).to_pylist()


def _feature_order(row):
    locations = np.asarray(row["locations"], np.float32).reshape(-1, 2)
    return np.lexsort((np.asarray(row["scales"], np.float32), locations[:, 1], locations[:, 0]))


def _by_name(rows):
    out = {}
    for row in rows:
        name = row["path"].rsplit("/", 1)[-1]
        assert name not in out, f"{name} appears twice"
        out[name] = row
    return out


def test_gs_input_output_and_model_give_the_same_rows_as_local(local_inputs, gcs_bucket, loopback_only, tmp_path):
    images, model_dir = local_inputs
    bucket = gcs_bucket.name
    assert _upload_tree(gcs_bucket, str(images), "images") == len(IMAGES) + 1
    assert _upload_tree(gcs_bucket, model_dir, "models/tiny") >= 3  # saved_model.pb + variables

    # Inputs: a glob for the JPEGs plus a plain-text manifest for the PNG, both on gs:// (resp. local).
    png = next(name for name, _, _ in IMAGES if name.endswith(".png"))
    (tmp_path / "list.txt").write_text(f"{images / png}\n")
    gcs_bucket.blob("lists/list.txt").upload_from_string(f"gs://{bucket}/images/{png}\n")
    local = _run_job(["--input", str(images / "*.jpg"), "--manifest", str(tmp_path / "list.txt"),
                      "--output", str(tmp_path / "out"), "--model", model_dir, *RUNNER_ARGS])
    remote = _run_job(["--input", f"gs://{bucket}/images/*.jpg", "--manifest", f"gs://{bucket}/lists/list.txt",
                       "--output", f"gs://{bucket}/delg/run1", "--model", f"gs://{bucket}/models/tiny", *RUNNER_ARGS])

    for outcome in (local, remote):
        counts = outcome.summary["counts"]
        assert counts["features"] == len(IMAGES) and counts["failures"] == 1, counts

    local_rows = _by_name(_read_table(str(tmp_path / "out" / "features" / "*.parquet")))
    remote_rows = _by_name(_read_table(f"gs://{bucket}/delg/run1/features/*.parquet"))
    assert sorted(remote_rows) == sorted(local_rows) == sorted(name for name, _, _ in IMAGES)
    for name, lrow in local_rows.items():
        rrow = remote_rows[name]
        assert rrow["path"] == f"gs://{bucket}/images/{name}"
        for key in FEATURE_SCALARS:
            assert rrow[key] == lrow[key], (name, key)
        assert lrow["num_features"] > 0 and len(lrow["global_descriptor"]) == 2048
        # TensorFlow's oneDNN kernels differ run to run by ~1e-6 (docs/delg-core.md), which may swap two
        # features of near-equal attention: compare local features in (y, x, scale) order.
        lorder, rorder = _feature_order(lrow), _feature_order(rrow)
        for key in FEATURE_ARRAYS:
            lval, rval = np.asarray(lrow[key], np.float32), np.asarray(rrow[key], np.float32)
            if key != "global_descriptor":
                lval, rval = lval[lorder], rval[rorder]
            np.testing.assert_allclose(rval, lval, rtol=1e-4, atol=1e-5, err_msg=f"{name} {key}")
        # Same weights, different location: the identity keeps the URI and the same content hash.
        assert rrow["model"].startswith(f"gs://{bucket}/models/tiny@sha256:")
        assert rrow["model"].split("@")[1] == lrow["model"].split("@")[1]

    local_fail = _by_name(_read_table(str(tmp_path / "out" / "failures" / "*.parquet")))
    remote_fail = _by_name(_read_table(f"gs://{bucket}/delg/run1/failures/*.parquet"))
    assert sorted(local_fail) == sorted(remote_fail) == [BROKEN]
    for key in ("stage", "error_type"):
        assert remote_fail[BROKEN][key] == local_fail[BROKEN][key]
    assert remote_fail[BROKEN]["message"]

    # The run is complete on gs://: success marker and summary naming exactly the shards that exist.
    names = {blob.name for blob in gcs_bucket.list_blobs(prefix="delg/run1/")}
    assert "delg/run1/_SUCCESS" in names
    summary_blobs = [n for n in names if n.endswith("summary.json")]
    assert len(summary_blobs) == 1
    summary = json.loads(gcs_bucket.blob(summary_blobs[0]).download_as_bytes())
    for kind in ("features", "failures"):
        on_gcs = {f"gs://{bucket}/{n}" for n in names if n.startswith(f"delg/run1/{kind}/") and n.endswith(".parquet")}
        assert on_gcs and set(summary["shards"][kind]) == on_gcs, kind
    assert not [n for n in names if "beam-temp-" in n or "/_tmp/" in n], "temporary files left on gs://"
    assert "delg/run1/_claim.json" not in names and "delg/run1/_output.json" in names
    # The run report went to gs:// too, with thumbnails of the images read back from gs://.
    report = [n for n in names if n.endswith("/report.html")]
    assert report == [summary_blobs[0].replace("summary.json", "report.html")]
    page = gcs_bucket.blob(report[0]).download_as_bytes().decode("utf-8")
    assert page.count("data:image/jpeg;base64,") == len(IMAGES) and "image not readable" not in page
