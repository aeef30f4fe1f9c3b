"""Rows and Arrow tables: DelgFeatures -> records -> tables with exactly the delg_v1 schema, read back intact."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_job import schemas
from beam_job.config import get_preset
from beam_job.features import DelgFeatures
from beam_job.pipeline.options import JobConfig, RunContext
from beam_job.pipeline.rows import (
    MissingGlobalDescriptorError,
    failure_record,
    failures_table,
    feature_record,
    features_table,
)
from beam_job.pipeline.writer import shard_schema


def _features(n, seed=0, with_global=True):
    rng = np.random.default_rng(seed)
    return DelgFeatures(
        global_descriptor=rng.standard_normal(2048).astype(np.float32) if with_global else np.zeros((0,), np.float32),
        locations=rng.uniform(0, 50, (n, 2)).astype(np.float32),
        descriptors=rng.standard_normal((n, 128)).astype(np.float32),
        scales=rng.uniform(0.5, 2, n).astype(np.float32),
        attention=np.sort(rng.uniform(0, 5, n)).astype(np.float32)[::-1].copy(),
        original_hw=(60, 80),
        processed_hw=(48, 64),
        scale_factors=(0.8, 0.8),
    )


def _roundtrip(table):
    buf = io.BytesIO()
    pq.write_table(table, buf)
    buf.seek(0)
    return pq.read_table(buf)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_features_table_matches_schema_and_round_trips(dtype):
    feats = [_features(5, 1), _features(0, 2), _features(3, 3)]
    records = [feature_record(f"id{i}", f"/p/{i}.jpg", f, model="m@sha256:x", preset="tiny", descriptor_dtype=dtype)
               for i, f in enumerate(feats)]
    schema = schemas.features_schema(dtype)
    table = _roundtrip(features_table(records, schema))
    assert [(f.name, f.type, f.nullable) for f in table.schema] == [(f.name, f.type, f.nullable) for f in schema]
    assert table.column("num_features").to_pylist() == [5, 0, 3]
    assert table.column("global_descriptor").null_count == 0
    g = table.column("global_descriptor").to_pylist()
    np.testing.assert_array_equal(np.asarray(g[0], np.float32), feats[0].global_descriptor)
    np.testing.assert_array_equal(np.asarray(g[2], np.float32), feats[2].global_descriptor)
    for i, f in enumerate(feats):
        row = table.slice(i, 1)
        locs = np.asarray(row.column("locations").to_pylist()[0], np.float32).reshape(-1, 2)
        np.testing.assert_array_equal(locs, f.locations)
        desc = np.asarray(row.column("descriptors").to_pylist()[0]).reshape(-1, 128)
        np.testing.assert_array_equal(desc, f.descriptors.astype(dtype))
        np.testing.assert_array_equal(np.asarray(row.column("attention").to_pylist()[0], np.float32), f.attention)
        np.testing.assert_array_equal(np.asarray(row.column("scales").to_pylist()[0], np.float32), f.scales)
    assert table.column("original_height").to_pylist() == [60, 60, 60]
    assert table.column("processed_width").to_pylist() == [64, 64, 64]


def test_global_descriptors_load_as_matrix_from_one_column():
    records = [feature_record(f"id{i}", "p", _features(4, i), model="m", preset="p") for i in range(3)]
    buf = io.BytesIO()
    pq.write_table(features_table(records, schemas.features_schema()), buf)
    buf.seek(0)
    col = pq.read_table(buf, columns=["global_descriptor"]).column(0).combine_chunks()
    matrix = col.values.to_numpy().reshape(-1, 2048)
    assert matrix.shape == (3, 2048) and matrix.dtype == np.float32
    np.testing.assert_array_equal(matrix[1], records[1]["global_descriptor"])


def test_feature_record_refuses_dims_outside_the_schema():
    f = _features(2)
    pca = DelgFeatures(f.global_descriptor[:256].copy(), f.locations, f.descriptors, f.scales, f.attention,
                       f.original_hw, f.processed_hw, f.scale_factors)
    with pytest.raises(ValueError, match="2048"):
        feature_record("a", "p", pca, model="m", preset="p")


def test_missing_global_descriptor_is_refused_not_written_as_null():
    # A null fixed-size list makes the whole shard unreadable in pyarrow 25 (apache/arrow#35692).
    buf = io.BytesIO()
    pq.write_table(pa.table({"g": pa.array([[1.0, 2.0], None], type=pa.list_(pa.float32(), 2))}), buf)
    buf.seek(0)
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(buf)
    with pytest.raises(MissingGlobalDescriptorError, match="10 px"):
        feature_record("a", "p", _features(3, with_global=False), model="m", preset="p")


def test_failure_record_is_one_line_and_checks_stage():
    rec = failure_record("a", "/x.jpg", "read", "FileNotFoundError", "no such\nfile   here", model="m", preset="p")
    assert rec["message"] == "no such file here"
    table = failures_table([rec])
    assert table.schema.equals(schemas.FAILURES_SCHEMA, check_metadata=True)
    with pytest.raises(ValueError, match="stage"):
        failure_record("a", "/x.jpg", "bogus", "E", "m", model="m", preset="p")


def test_shard_schema_footer_names_version_model_preset():
    job = JobConfig(inputs=("x/*.jpg",), manifests=(), output="/tmp/o", extraction=get_preset("tiny"),
                    descriptor_dtype="float16", run_id="r1")
    run = RunContext(model_identity="embedded:tiny@sha256:abc", started_at="2026-12-02T00:00:00+00:00")
    schema = shard_schema("features", job, run)
    meta = schema.metadata
    assert meta[b"delg.schema_version"] == b"delg_v1"
    assert meta[b"delg.model"] == b"embedded:tiny@sha256:abc"
    assert meta[b"delg.preset"] == b"tiny"
    assert meta[b"delg.descriptor_dtype"] == b"float16"
    assert meta[b"delg.untrained_model"] == b"true"
    assert (meta[b"delg.run_id"], meta[b"delg.run_started_at"]) == (b"r1", b"2026-12-02T00:00:00+00:00")
    assert schema.field("descriptors").type.value_type.value_type == pa.float16()


def test_writer_steps_allocate_arrow_buffers_with_malloc():
    """The job's table and shard writers switch Arrow to the system pool, so tables reuse the heap that
    TensorFlow freed instead of raising peak RSS (writer.use_system_memory_pool). Run in a fresh process:
    the switch is process-wide."""
    import subprocess
    import sys

    code = (
        "import pyarrow as pa\n"
        "from beam_job.config import get_preset\n"
        "from beam_job.pipeline.options import JobConfig, RunContext\n"
        "from beam_job.pipeline.writer import ToTablesFn\n"
        "before = pa.default_memory_pool().backend_name\n"
        "job = JobConfig(inputs=('x/*.jpg',), manifests=(), output='/tmp/o', extraction=get_preset('tiny'),\n"
        "                run_id='r1')\n"
        "run = RunContext(model_identity='embedded:tiny@sha256:abc', started_at='')\n"
        "ToTablesFn('features', job, run).setup()\n"
        "print(before, pa.default_memory_pool().backend_name)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = proc.stdout.split()
    assert before != "system" and after == "system"
