"""Resume: a run killed mid-way and resumed with --skip_existing ends with every image exactly once, and a
failures table re-run as a manifest retries exactly the failed images."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from beam_job import cli
from beam_job.pipeline.inputs import derive_image_id
from test_pipeline import make_good_images, read_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_images(directory, n, size):
    rng = np.random.default_rng(7)
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"im{i:03d}.jpg")
        Image.fromarray(rng.integers(0, 256, (size, size - 8, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def test_killed_run_resumed_with_skip_existing_has_every_image_once(tmp_path):
    paths = _write_images(str(tmp_path / "img"), 48, 192)
    out = tmp_path / "out"
    features_dir = out / "features"
    args = ["--input", str(tmp_path / "img" / "*.jpg"), "--output", str(out), "--preset", "tiny",
            "--max_image_size", "192", "--rows_per_shard", "1", "--no_progress"]
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-m", "beam_job", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if len(glob.glob(str(features_dir / "*.parquet"))) >= 3:
                proc.send_signal(signal.SIGKILL)  # the harshest interruption: no cleanup at all
                killed_at = True
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None and not killed_at:
            proc.kill()
        _, err = proc.communicate(timeout=30)
    assert killed_at, f"the run ended before it could be interrupted: {err.decode()[-2000:]}"
    before = read_rows(str(features_dir))
    assert 3 <= before.num_rows < len(paths)
    assert not (out / "_SUCCESS").exists()

    outcome = cli.run([*args[:-1], "--skip_existing", "--no_progress"])
    table = read_rows(str(features_dir))
    ids = table.column("image_id").to_pylist()
    assert sorted(ids) == sorted(derive_image_id(p) for p in paths)  # every image exactly once
    assert len(set(ids)) == len(ids)
    counts = outcome.summary["counts"]
    assert counts["skipped_existing"] == before.num_rows
    assert counts["features"] == len(paths) - before.num_rows and counts["failures"] == 0
    assert outcome.summary["cleanup"]["settle"]["duplicate_feature_ids"] == 0
    assert json.load(open(out / "_SUCCESS"))["run_id"] == outcome.job.run_id


def test_failures_table_rerun_as_manifest_retries_exactly_the_failed_images(tmp_path):
    good = make_good_images(str(tmp_path / "img"), n_rgb=4)
    late = [str(tmp_path / "img" / "late0.jpg"), str(tmp_path / "img" / "late1.jpg")]
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join([*good, *late]) + "\n")
    out = tmp_path / "out"
    first = cli.run(["--manifest", str(manifest), "--output", str(out), "--preset", "tiny", "--no_progress"])
    assert (first.summary["counts"]["features"], first.summary["counts"]["failures"]) == (len(good), 2)
    failed = read_rows(str(out / "failures"))
    assert sorted(failed.column("path").to_pylist()) == sorted(late)

    # Without --skip_existing or --overwrite a second run into the same output is refused before launch.
    with pytest.raises(cli.JobConfigError, match="--skip_existing"):
        cli.run(["--manifest", str(manifest), "--output", str(out), "--preset", "tiny"])

    make_good_images(str(tmp_path / "late"), n_rgb=2, seed=3)
    for src, dst in zip(sorted(glob.glob(str(tmp_path / "late" / "*"))), late):
        os.replace(src, dst)  # the missing files appear
    retry = cli.run(["--manifest", str(out / "failures" / "*.parquet"), "--output", str(out), "--preset", "tiny",
                     "--skip_existing", "--no_progress"])
    counts = retry.summary["counts"]
    assert counts["listed"] == 2 and counts["processed"] == 2 and counts["features"] == 2
    features = read_rows(str(out / "features"))
    assert sorted(features.column("path").to_pylist()) == sorted([*good, *late])
    # The settled failures table no longer lists the images that now have features.
    assert read_rows(str(out / "failures")) is None
    assert retry.summary["cleanup"]["settle"]["removed_rows"] == 2

    # --overwrite starts over: only the new run's shards remain.
    again = cli.run(["--manifest", str(manifest), "--output", str(out), "--preset", "tiny", "--overwrite",
                     "--no_progress"])
    shards = glob.glob(str(out / "features" / "*.parquet"))
    assert shards and all(again.job.run_id in s for s in shards)
    assert read_rows(str(out / "features")).num_rows == len(good) + 2
