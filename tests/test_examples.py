"""The README's demo manifest stays valid: its photos give feature rows and its truncated file a failure row."""

import glob
import os

import pyarrow.parquet as pq

from beam_job import cli, schemas

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_manifest_gives_four_feature_rows_and_one_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the manifest lists paths relative to the repository root, as the README runs it
    out = str(tmp_path / "demo")
    cli.run(["--manifest", "examples/manifest.csv", "--output", out, "--preset", "tiny", "--no_progress"])

    features = pq.read_table(glob.glob(os.path.join(out, "features", "*.parquet")))
    failures = pq.read_table(glob.glob(os.path.join(out, "failures", "*.parquet")))
    assert sorted(features.column("image_id").to_pylist()) == ["astronaut", "chelsea", "coffee", "rocket"]
    assert features.schema.remove_metadata().equals(schemas.features_schema().remove_metadata())
    assert failures.to_pylist()[0]["image_id"] == "truncated_download"
    assert (failures.to_pylist()[0]["stage"], failures.to_pylist()[0]["error_type"]) == ("decode", "ImageDecodeError")
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    assert len(glob.glob(os.path.join(out, "runs", "*", "summary.json"))) == 1
