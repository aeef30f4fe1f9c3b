"""The Beam job end to end on the FnApiRunner with the tiny preset: outcomes, exact features, shards, summary.

One module-scoped run processes a manifest of good images (RGB, 16-bit, CMYK, palette, grayscale) mixed
with missing, truncated, empty, non-image and huge-header files; the tests below inspect its outputs.
"""

import glob
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from beam_job import cli, schemas
from beam_job.config import get_preset
from beam_job.pipeline.inputs import derive_image_id
from beam_job.pipeline.pipeline import counter_value

from helpers import encode, failing_handler, huge_header_png, make_good_images, read_rows

TINY = ["--preset", "tiny"]


# ----------------------------------------------------------------------------- image helpers

def make_bad_files(directory, good_jpeg: bytes):
    """Write broken inputs; returns {path: expected (stage, error_type or None)}."""
    bad = {
        os.path.join(directory, "missing.jpg"): ("read", "FileNotFoundError"),
        os.path.join(directory, "truncated.jpg"): ("decode", None),
        os.path.join(directory, "empty.jpg"): ("decode", None),
        os.path.join(directory, "notes.txt"): ("decode", None),
        os.path.join(directory, "bomb.png"): ("decode", "ImageTooLargeError"),
        # 3x300 px -> 1x96 after the tiny preset's resize: under DELG's 10 px minimum, no global descriptor.
        os.path.join(directory, "sliver.png"): ("postprocess", "MissingGlobalDescriptorError"),
    }
    contents = {
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "empty.jpg": b"",
        "notes.txt": b"this is not an image\n",
        "bomb.png": huge_header_png(),
        "sliver.png": encode(Image.new("RGB", (300, 3), (200, 10, 10)), "PNG"),
    }
    for name, data in contents.items():
        with open(os.path.join(directory, name), "wb") as fh:
            fh.write(data)
    return bad


def model_loads(result) -> int:
    """Model loads as RunInference counts them: updates of its load-latency distribution (one per load)."""
    from apache_beam.metrics.metric import MetricsFilter

    query = MetricsFilter().with_namespace("RunInference").with_name("load_model_latency_milli_secs")
    return int(sum(d.committed.count for d in result.metrics().query(query)["distributions"] if d.committed))


# ----------------------------------------------------------------------------- the shared mixed run

@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    good = make_good_images(str(root / "img"))
    first_jpeg = next(data for path, data in good.items() if path.endswith("rgb0.jpg"))
    bad = make_bad_files(str(root / "img"), first_jpeg)
    manifest = root / "manifest.csv"
    rows = ["path,image_id"]
    paths = sorted(good) + sorted(bad)
    explicit = {}
    for i, path in enumerate(paths):
        if i % 2 == 0:
            explicit[path] = f"img-{i:03d}"
        rows.append(f"{path},{explicit.get(path, '')}")
    manifest.write_text("\n".join(rows) + "\n")
    out = root / "out"
    outcome = cli.run(["--manifest", str(manifest), "--output", str(out), *TINY, "--rows_per_shard", "4",
                       "--row_group_size", "2"])
    ids = {p: explicit.get(p, derive_image_id(p)) for p in paths}
    return {"outcome": outcome, "out": str(out), "good": good, "bad": bad, "ids": ids, "manifest": str(manifest)}


def test_every_listed_path_has_exactly_one_outcome_row(mixed_run):
    features = read_rows(os.path.join(mixed_run["out"], "features"))
    failures = read_rows(os.path.join(mixed_run["out"], "failures"))
    assert features.num_rows + failures.num_rows == len(mixed_run["ids"])
    assert sorted(features.column("image_id").to_pylist() + failures.column("image_id").to_pylist()) == sorted(
        mixed_run["ids"].values())
    assert set(features.column("path").to_pylist()) == set(mixed_run["good"])
    assert set(failures.column("path").to_pylist()) == set(mixed_run["bad"])
    for row in failures.to_pylist():
        stage, error_type = mixed_run["bad"][row["path"]]
        assert row["stage"] == stage, row
        assert row["error_type"] and row["message"], row
        if error_type:
            assert row["error_type"] == error_type, row
        assert row["image_id"] == mixed_run["ids"][row["path"]]
        assert row["preset"] == "tiny" and row["model"].startswith("embedded:tiny")


def test_features_equal_the_extractor_on_each_image_alone(mixed_run):
    from beam_job.delg.extractor import DelgExtractor
    from beam_job.imaging import decode_image

    config = get_preset("tiny")
    extractor = DelgExtractor(config)
    table = read_rows(os.path.join(mixed_run["out"], "features"))
    rows = {r["path"]: r for r in table.to_pylist()}
    for path, data in mixed_run["good"].items():
        expected = extractor.extract(
            decode_image(data, apply_exif_orientation=True, max_pixels=config.max_image_pixels))
        row = rows[path]
        assert row["image_id"] == mixed_run["ids"][path]
        np.testing.assert_array_equal(np.asarray(row["global_descriptor"], np.float32), expected.global_descriptor)
        n = expected.num_features
        assert row["num_features"] == n
        np.testing.assert_array_equal(np.asarray(row["locations"], np.float32).reshape(n, 2), expected.locations)
        np.testing.assert_array_equal(np.asarray(row["descriptors"], np.float32).reshape(n, 128), expected.descriptors)
        np.testing.assert_array_equal(np.asarray(row["scales"], np.float32), expected.scales)
        np.testing.assert_array_equal(np.asarray(row["attention"], np.float32), expected.attention)
        assert (row["original_height"], row["original_width"]) == expected.original_hw
        assert (row["processed_height"], row["processed_width"]) == expected.processed_hw
        assert row["model"] == extractor.identity


def test_shards_match_the_schema_exactly_and_are_small(mixed_run):
    feature_files = sorted(glob.glob(os.path.join(mixed_run["out"], "features", "*.parquet")))
    failure_files = sorted(glob.glob(os.path.join(mixed_run["out"], "failures", "*.parquet")))
    assert len(feature_files) >= 2  # 7 rows, --rows_per_shard 4
    expected = schemas.features_schema()
    for f in feature_files:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
        assert [(a.name, a.type, a.nullable) for a in schema] == [(b.name, b.type, b.nullable) for b in expected]
        assert all(a.equals(b) for a, b in zip(schema, expected, strict=True))
        assert pf.metadata.num_rows <= 4
        assert all(pf.metadata.row_group(i).num_rows <= 2 for i in range(pf.metadata.num_row_groups))
        meta = schema.metadata
        assert meta[b"delg.schema_version"] == b"delg_v1" and meta[b"delg.preset"] == b"tiny"
        assert meta[b"delg.model"].startswith(b"embedded:tiny@sha256:")
        assert b"(y, x)" in meta[b"delg.coordinate_convention"]
        assert json.loads(meta[b"delg.config"])["name"] == "tiny"
    for f in failure_files:
        assert pq.read_schema(f).remove_metadata().equals(schemas.FAILURES_SCHEMA.remove_metadata())


def test_shards_dictionary_encode_strings_only(mixed_run):
    """Float lists (descriptors, locations, attention, global) are written plain: their values do not repeat,
    and trying a dictionary for them cost 7x the write time and ~20 MB more RSS (writer.parquet_writer)."""
    files = sorted(glob.glob(os.path.join(mixed_run["out"], "*", "*.parquet")))
    assert files
    for f in files:
        meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            for c in range(meta.num_columns):
                column = meta.row_group(g).column(c)
                dictionary = any("DICTIONARY" in e for e in column.encodings)
                is_string = column.physical_type == "BYTE_ARRAY"
                assert dictionary == is_string, (f, column.path_in_schema, column.encodings)

def test_shards_open_in_pyarrow_pandas_and_duckdb(mixed_run):
    import duckdb
    import pandas as pd

    pattern = os.path.join(mixed_run["out"], "features", "*.parquet")
    col = pq.ParquetDataset(sorted(glob.glob(pattern))).read(columns=["global_descriptor"]).column(0).combine_chunks()
    matrix = col.values.to_numpy().reshape(-1, 2048)
    assert matrix.shape == (len(mixed_run["good"]), 2048) and matrix.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(matrix, axis=1), 1.0, rtol=1e-5)
    frame = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(pattern))])
    assert len(frame) == len(mixed_run["good"]) and frame["descriptors"].iloc[0][0].shape == (128,)
    n, dims = duckdb.sql(
        f"SELECT count(*), min(len(global_descriptor)) FROM read_parquet('{pattern}')").fetchall()[0]
    assert (n, dims) == (len(mixed_run["good"]), 2048)
    total = duckdb.sql(f"SELECT sum(len(descriptors)) FROM read_parquet('{pattern}')").fetchall()[0][0]
    assert total == frame["num_features"].sum()
    fails = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{os.path.join(mixed_run['out'], 'failures', '*.parquet')}')"
    ).fetchall()[0][0]
    assert fails == len(mixed_run["bad"])


def test_summary_and_success_marker(mixed_run):
    out = mixed_run["out"]
    summary = mixed_run["outcome"].summary
    run_id = mixed_run["outcome"].job.run_id
    assert summary == json.load(open(os.path.join(out, "runs", run_id, "summary.json")))
    assert json.load(open(os.path.join(out, "_SUCCESS")))["run_id"] == run_id
    counts = summary["counts"]
    assert counts["listed"] == counts["processed"] == len(mixed_run["ids"])
    assert (counts["features"], counts["failures"]) == (len(mixed_run["good"]), len(mixed_run["bad"]))
    assert summary["status"] == "succeeded"
    assert summary["failures_by_stage"] == {"decode": 4, "postprocess": 1, "read": 1}
    assert summary["failures_by_error_type"]["ImageTooLargeError"] == 1
    on_disk = sorted(glob.glob(os.path.join(out, "features", "*.parquet")))
    assert sorted(summary["shards"]["features"]) == on_disk
    assert set(summary["timings_ms"]) >= {"read", "decode", "inference", "postprocess", "write"}
    inference = summary["timings_ms"]["inference"]
    assert 0 < inference["p50_ms"] <= inference["p95_ms"] <= inference["max_ms"]
    assert summary["timings_ms"]["inference"]["count"] == len(mixed_run["good"]) + 1  # + the sliver
    assert summary["model"]["identity"].startswith("embedded:tiny@sha256:")
    assert summary["config"]["name"] == "tiny" and summary["schema_version"] == "delg_v1"
    # Nothing of the commit protocol is left behind: no Beam temp directory, no claim.
    assert not glob.glob(os.path.join(out, "*", "beam-temp-*")) and not os.path.exists(os.path.join(out, "_claim.json"))
    assert summary["output"] == {"images": len(mixed_run["ids"]), "features": len(mixed_run["good"]),
                                 "failures": len(mixed_run["bad"]), "failure_ratio": summary["output"]["failure_ratio"],
                                 "duplicate_feature_rows": 0, "superseded_failure_rows": 0}


def test_beam_metrics_cover_stages_keypoints_and_failures(mixed_run):
    result = mixed_run["outcome"].result
    assert counter_value(result, "images_read") == len(mixed_run["ids"]) - 1  # the missing file is not read
    assert counter_value(result, "failures_decode") == 4
    assert counter_value(result, "failures_postprocess") == 1
    assert counter_value(result, "failures_read") == 1
    assert model_loads(result) == 1
    text = "\n".join(mixed_run["outcome"].metrics)
    for name in ("delg/read_ms", "delg/decode_ms", "delg/inference_ms", "delg/keypoints_per_image",
                 "delg/table_ms_per_features_group", "RunInference/num_inferences"):
        assert name in text


def test_failure_ratio_threshold_fails_the_job_with_one_line(tmp_path, capsys):
    good = make_good_images(str(tmp_path / "img"), n_rgb=1)
    manifest = tmp_path / "m.txt"
    manifest.write_text("\n".join([*good, *(str(tmp_path / f"gone{i}.jpg") for i in range(3))]) + "\n")
    out = tmp_path / "out"
    code = cli.main(["--manifest", str(manifest), "--output", str(out), *TINY, "--no_progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and "3 of 4 images failed" in err[0] and "--max_failure_ratio" in err[0], err
    assert not os.path.exists(out / "_SUCCESS")
    summary = json.load(open(glob.glob(str(out / "runs" / "*" / "summary.json"))[0]))
    assert summary["status"] == "failed" and summary["counts"]["failures"] == 3
    # The shards are still complete and readable: features of the good image, failures of the rest.
    assert read_rows(str(out / "features")).num_rows == 1


@pytest.mark.parametrize("mode,workers,loads,share", [
    ("multi_processing", 2, 2, False),
    ("multi_threading", 2, 1, False),
    ("multi_threading", 2, 1, True),  # one copy per machine behind Beam's cross-process proxy
])
def test_model_loaded_once_per_worker_process(tmp_path, mode, workers, loads, share):
    good = make_good_images(str(tmp_path / "img"), n_rgb=6)
    out = tmp_path / "out"
    outcome = cli.run(["--input", str(tmp_path / "img" / "*"), "--output", str(out), *TINY, "--no_progress",
                       f"--direct_num_workers={workers}", f"--direct_running_mode={mode}",
                       "--descriptor_dtype", "float16", *(["--share_model_across_processes"] if share else [])])
    assert model_loads(outcome.result) == loads
    table = read_rows(str(out / "features"))
    assert table.num_rows == len(good)
    assert table.schema.field("descriptors").type == schemas.features_schema("float16").field("descriptors").type
    if mode == "multi_threading" and not share:
        # DuckDB reads Parquet FLOAT16 as FLOAT (float32): values survive, the dtype widens (documented).
        import duckdb

        pattern = str(out / "features" / "*.parquet")
        kind = duckdb.sql(f"SELECT typeof(descriptors) FROM read_parquet('{pattern}') LIMIT 1").fetchall()[0][0]
        assert kind == "FLOAT[][]"
        first = duckdb.sql(f"SELECT descriptors[1] FROM read_parquet('{pattern}') WHERE num_features > 0 "
                           "ORDER BY image_id LIMIT 1").fetchall()[0][0]
        ordered = table.sort_by("image_id").filter(table.sort_by("image_id").column("num_features").to_numpy() > 0)
        np.testing.assert_array_equal(np.asarray(first, np.float32),
                                      np.asarray(ordered.column("descriptors")[0].as_py()[0], np.float16)
                                      .astype(np.float32))


def test_inference_failures_become_failure_rows(tmp_path):
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.testing.util import assert_that, equal_to

    from beam_job.imaging import decode_image
    from beam_job.pipeline.options import JobConfig, RunContext
    from beam_job.pipeline.transforms import ExtractFeatures

    def fail(prepared):
        raise RuntimeError("model call failed on boom")

    good = sorted(make_good_images(str(tmp_path / "img"), n_rgb=2))
    with open(good[0], "rb") as fh:
        boom_hw = decode_image(fh.read()).shape[:2]
    job = JobConfig(inputs=(), manifests=(str(tmp_path / "unused.txt"),), output=str(tmp_path / "out"),
                    extraction=get_preset("tiny"))
    run = RunContext(model_identity="embedded:tiny", started_at="2026-12-03T00:00:00+00:00")
    with beam.Pipeline(options=PipelineOptions(["--runner=FnApiRunner"])) as p:
        pairs = p | beam.Create([("boom", good[0]), ("fine", good[1])])
        out = pairs | ExtractFeatures(job, run, failing_handler(job.extraction, boom_hw, fail))
        failures = out["failures"] | "FailureFields" >> beam.Map(
            lambda e: (e[0]["image_id"], e[0]["path"], e[0]["stage"], e[0]["error_type"], e[0]["message"],
                       sorted(e[1])))
        assert_that(failures, equal_to([("boom", good[0], "inference", "RuntimeError", "model call failed on boom",
                                         ["decode", "read"])]), label="CheckFailures")
        ids = out["features"] | "FeatureIds" >> beam.Map(lambda e: (e[0]["image_id"], e[0]["path"]))
        assert_that(ids, equal_to([("fine", good[1])]), label="CheckFeatures")


def test_steps_emit_new_values_and_never_change_what_they_received(tmp_path):
    """A runner may hold an element it handed to a step (to retry a bundle, or fused into another step):
    DecodeAndResize and ToRows build new values instead of changing their input."""
    from beam_job.pipeline.options import JobConfig, RunContext
    from beam_job.pipeline.transforms import DecodeAndResizeFn, ImageTask

    good = make_good_images(str(tmp_path / "img"), n_rgb=1)
    path, data = next(iter(good.items()))
    job = JobConfig(inputs=("x",), manifests=(), output=str(tmp_path / "o"), extraction=get_preset("tiny"))
    task = ImageTask("id0", path, data=data, timings={"read": 1.5})
    fn = DecodeAndResizeFn(job, RunContext(model_identity="embedded:tiny", started_at=""))
    fn.setup()
    (out_id, out_task), = list(fn.process(("id0", task)))
    assert out_id == "id0" and out_task is not task
    assert task.data == data and task.prepared is None and task.timings == {"read": 1.5}  # untouched
    assert out_task.data is None and out_task.prepared is not None and set(out_task.timings) == {"read", "decode"}
