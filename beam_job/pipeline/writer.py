"""Parquet output through Beam's file-sink protocol: row groups as Arrow tables, committed only at finalize.

`WriteShards(kind, job)` = `ToTables` (records -> Arrow tables of at most `row_group_size` rows, plus one
stats dict per table) -> `beam.io.Write(DelgParquetSink)`. The sink is Beam's `FileBasedSink`, so Beam's
own protocol does the committing (see docs/pipeline.md, "How a run commits"):

* each bundle attempt writes its files under a temp directory
  (`<output>/<kind>/beam-temp-part-<run_id>-<uuid>/`); nothing is written under the final names;
* only bundle results that the runner committed reach the finalize step (they arrive as side inputs
  after a GroupByKey), which renames them to `<output>/<kind>/part-<run_id>-SSSSS-of-NNNNN.parquet` in a
  deterministic order, skipping files already renamed by an earlier attempt of the same step, and then
  deletes the temp directory: files of failed or retried bundle attempts never become visible (the test-only
  failpoint `committed_<kind>` fires once a kind's commit is done, before the other kind's may be);
* a shard is closed after `rows_per_shard` rows (Beam's `max_records_per_shard`, counted in row groups),
  and a kind with no rows writes no file (`skip_if_empty`).

The stats dicts ride the same committed-bundle guarantee, so the summary counts every row once.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filebasedsink import FileBasedSink
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from beam_job import layout, storage
from beam_job.layout import FAILURES, FEATURES, SHARD_SUFFIX
from beam_job.pipeline import METRICS_NAMESPACE, progress
from beam_job.pipeline.failpoints import failpoint
from beam_job.pipeline.options import FAILURE_ROWS_PER_SHARD, JobConfig, RunContext
from beam_job.pipeline.rows import table_for
from beam_job.pipeline.stats import StageStats
from beam_job.schemas import delg_v1

_LOGGER = logging.getLogger(__name__)
STATS = "stats"
# Columns worth min/max statistics; descriptor lists are not.
_STAT_COLUMNS = ["image_id", "path", "original_height", "original_width", "processed_height", "processed_width",
                 "num_features", "model", "preset", "stage", "error_type"]


def shard_prefix(job: JobConfig, kind: str) -> str:
    """Final shards of this run are `<prefix>-SSSSS-of-NNNNN.parquet` (beam_job/layout.py)."""
    return layout.shard_prefix(job.output, kind, job.run_id)


def shard_schema(kind: str, job: JobConfig, run: RunContext) -> pa.Schema:
    """The delg_v1 schema of a shard, with the footer metadata (version, model, preset, config, run)."""
    base = delg_v1.features_schema(job.descriptor_dtype) if kind == FEATURES else delg_v1.FAILURES_SCHEMA
    meta = delg_v1.file_metadata(
        model=run.model_identity,
        preset=job.extraction.name,
        config_json=job.extraction.to_json(),
        descriptor_dtype=job.descriptor_dtype,
        untrained=bool(job.extraction.untrained or job.extraction.is_embedded_model),
        extra={"run_id": job.run_id, "run_started_at": run.started_at, "kind": kind},
    )
    return delg_v1.with_metadata(base, meta)


def _group_sizes(job: JobConfig, kind: str):
    """(rows per row group, row groups per shard) for a kind."""
    rows_per_shard = job.rows_per_shard if kind == FEATURES else FAILURE_ROWS_PER_SHARD
    group = min(job.row_group_size if kind == FEATURES else 10_000, rows_per_shard)
    return group, max(1, rows_per_shard // group)


def use_system_memory_pool() -> None:
    """Make Arrow allocate with malloc in this worker process, instead of its own mimalloc/jemalloc pool.

    After each image, a worker's malloc heap holds the hundreds of MB that TensorFlow freed; Arrow's default
    pool ignores them and maps fresh memory for the tables and the Parquet writer, which raised the job's
    peak RSS after the last image. Measured on 3 R50 photos (the in-memory runner, one process): +41 MB of
    peak with the default pool, none with malloc's. Process-wide: called from ToTablesFn.setup, the step that
    builds the tables, which Beam fuses with the sink's writes in the same worker.
    """
    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def parquet_writer(where, schema: pa.Schema) -> pq.ParquetWriter:
    """The job's Parquet writer settings for a shard (a path or a writable stream).

    zstd pages, each with a CRC-32 checksum (Parquet's page checksum: a reader that verifies them, as the
    resume does for the id and path columns, finds a damaged page instead of reading wrong values; it changes
    no value); min/max statistics on the id and metadata columns only; dictionary encoding on the string
    columns only. Descriptor, location and attention values almost never repeat, so pyarrow's default
    (try a dictionary for every column, fall back when it overflows) only costs time and memory there:
    measured on 12 R50 rows in one row group, 252 ms and +50 MB RSS with it against 34 ms and +28 MB
    without, and files 15% smaller (benchmarks/bench_extract.py measures the write stage).
    """
    strings = [f.name for f in schema if pa.types.is_string(f.type) or pa.types.is_large_string(f.type)]
    return pq.ParquetWriter(
        where, schema, compression="zstd", use_compliant_nested_type=False, use_dictionary=strings,
        write_statistics=[c for c in _STAT_COLUMNS if c in schema.names], write_page_checksum=True,
    )


class _OpenParquet:
    """What DelgParquetSink.open returns: the temp file's stream and the Parquet writer on it."""

    __slots__ = ("stream", "writer")

    def __init__(self, stream, writer):
        self.stream = stream
        self.writer = writer


class DelgParquetSink(FileBasedSink):
    """Beam FileBasedSink writing delg_v1 Parquet shards; each record is an Arrow table (one row group)."""

    def __init__(self, kind: str, job: JobConfig, run: RunContext):
        _, groups_per_shard = _group_sizes(job, kind)
        super().__init__(
            shard_prefix(job, kind),
            coder=None,
            file_name_suffix=SHARD_SUFFIX,
            mime_type="application/x-parquet",
            compression_type=CompressionTypes.UNCOMPRESSED,  # Parquet compresses its pages itself (zstd)
            max_records_per_shard=groups_per_shard,
            skip_if_empty=True,
        )
        self._schema = shard_schema(kind, job, run)
        self._kind = kind

    def initialize_write(self):
        storage.prepare_remote_access()  # Beam's GCS client, in whichever worker runs this step first
        return super().initialize_write()

    def finalize_write(self, init_result, writer_results, pre_finalize_results):
        storage.prepare_remote_access()
        writer_results = list(writer_results)
        if not writer_results:  # no row of this kind (skip_if_empty): Beam would warn "No shards found to finalize"
            try:
                storage.delete([init_result])  # its empty temp folder, as Beam's finalize removes it
            except OSError:  # gone already (gs:// has no empty folders): nothing to remove, as in Beam
                pass
        else:  # Beam's renames run as its generator is iterated
            yield from super().finalize_write(init_result, writer_results, pre_finalize_results)
        failpoint(f"committed_{self._kind}")  # this kind is committed; the other kind may not be yet

    def open(self, temp_path):
        storage.prepare_remote_access()
        stream = super().open(temp_path)
        return _OpenParquet(stream, parquet_writer(stream, self._schema))

    def write_record(self, file_handle, value):
        file_handle.writer.write_table(value, row_group_size=max(1, value.num_rows))

    def close(self, file_handle):
        file_handle.writer.close()
        super().close(file_handle.stream)


def _in_global_window(value):
    return WindowedValue(value, GlobalWindow().max_timestamp(), (GlobalWindow(),))


class ToTablesFn(beam.DoFn):
    """(record, timings) -> Arrow tables of at most `row_group_size` rows, and per table (tag "stats") a
    dict {"kind", "rows", "stats"} with the rows' per-stage timings, failure counts and keypoints."""

    def __init__(self, kind: str, job: JobConfig, run: RunContext):
        if kind not in (FEATURES, FAILURES):
            raise ValueError(f"kind must be {FEATURES} or {FAILURES}, got {kind!r}")
        self._kind = kind
        self._job = job
        self._run = run
        self._group, _ = _group_sizes(job, kind)

    def setup(self):
        use_system_memory_pool()
        self._schema = shard_schema(self._kind, self._job, self._run)
        self._build_ms = Metrics.distribution(METRICS_NAMESPACE, f"table_ms_per_{self._kind}_group")
        self._rows = Metrics.counter(METRICS_NAMESPACE, f"{self._kind}_rows_written")
        self._progress = progress.ProgressReporter(self._run.progress_dir)

    def start_bundle(self):
        self._flushes = getattr(self, "_flushes", 0)
        self._records: list[dict[str, Any]] = []
        self._timings: list[dict[str, float]] = []

    def process(self, element):
        record, timings = element
        self._records.append(record)
        self._timings.append(timings)
        self._progress.add("done" if self._kind == FEATURES else "failed")
        if len(self._records) >= self._group:
            yield from self._flush()

    def finish_bundle(self):
        for value in self._flush():
            if isinstance(value, beam.pvalue.TaggedOutput):
                yield beam.pvalue.TaggedOutput(value.tag, _in_global_window(value.value))
            else:
                yield _in_global_window(value)
        self._progress.flush()

    def _flush(self):
        if not self._records:
            return
        self._flushes += 1
        if self._flushes == 2:
            failpoint("write")  # the first row group is in a temp file; nothing is committed yet
        records, timings = self._records, self._timings
        self._records, self._timings = [], []
        t0 = time.perf_counter()
        table = table_for(self._kind, records, self._schema)
        ms = (time.perf_counter() - t0) * 1000.0
        stats = StageStats()
        for record, times in zip(records, timings, strict=True):
            stats.add(self._kind, record, times)
        stats.add_time("write", ms)  # one sample per row group: building its Arrow table
        self._build_ms.update(int(round(ms)))
        self._rows.inc(len(records))
        yield table
        yield beam.pvalue.TaggedOutput(STATS, {"kind": self._kind, "rows": len(records), "stats": stats.to_dict()})


class WriteShards(beam.PTransform):
    """(record, timings) -> committed Parquet shards of `kind`; returns {"files": final paths, "stats": dicts}."""

    def __init__(self, kind: str, job: JobConfig, run: RunContext):
        super().__init__()
        self._kind = kind
        self._job = job
        self._run = run

    def expand(self, pcoll):
        to_tables = ToTablesFn(self._kind, self._job, self._run)
        tables = pcoll | "ToTables" >> beam.ParDo(to_tables).with_outputs(STATS, main="tables")
        files = tables.tables | "Commit" >> beam.io.Write(DelgParquetSink(self._kind, self._job, self._run))
        return {"files": files, "stats": tables[STATS]}
