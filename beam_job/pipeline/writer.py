"""Parquet shard writer: bounded-memory row groups, temp file + rename, content-derived shard names.

Each WriteShardsFn instance streams rows into a temp file under <output>/_tmp/<run_id>/ in row groups of
`row_group_size` rows, and at `rows_per_shard` rows (or at the end of the bundle) closes it and renames
it to <output>/<kind>/part-<run_id>-<h>.parquet, where <h> is 16 hex digits of SHA-1 over the shard's
sorted image_ids. A file under features/ or failures/ is therefore always complete, and a retried bundle
with the same rows overwrites its earlier file instead of duplicating it. The fn emits one ShardInfo dict
per finished shard (path, rows, per-stage timings, failure counts) for the run summary.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from typing import Any, Dict, List, Optional

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue

from beam_job.pipeline import progress
from beam_job.pipeline.gcs_auth import use_anonymous_credentials_if_emulated
from beam_job.pipeline.options import FAILURE_ROWS_PER_SHARD, JobConfig, join
from beam_job.pipeline.rows import table_for
from beam_job.pipeline.stats import StageStats
from schemas import delg_v1

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "delg"
FEATURES, FAILURES = "features", "failures"
# Columns worth min/max statistics; descriptor lists are not.
_STAT_COLUMNS = ["image_id", "path", "original_height", "original_width", "processed_height", "processed_width",
                 "num_features", "model", "preset", "stage", "error_type"]


def ensure_dir(path: str) -> None:
    """Create a local directory (no-op for object stores, which have no directories)."""
    if "://" not in path:
        os.makedirs(path, exist_ok=True)


def shard_name(run_id: str, image_ids: List[str]) -> str:
    digest = hashlib.sha1("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()[:16]
    return f"part-{run_id}-{digest}.parquet"


def shard_schema(kind: str, job: JobConfig, model: str) -> pa.Schema:
    """The delg_v1 schema of a shard, with the footer metadata (version, model, preset, config, ...)."""
    base = delg_v1.features_schema(job.descriptor_dtype) if kind == FEATURES else delg_v1.FAILURES_SCHEMA
    meta = delg_v1.file_metadata(
        model=model,
        preset=job.extraction.name,
        config_json=job.extraction.to_json(),
        descriptor_dtype=job.descriptor_dtype,
        untrained=bool(job.extraction.untrained or job.extraction.is_embedded_model),
        extra={"run_id": job.run_id, "kind": kind},
    )
    return delg_v1.with_metadata(base, meta)


class _OpenShard:
    """A shard being written: temp path, writer, ids, stats."""

    def __init__(self, kind: str, job: JobConfig, model: str):
        self.kind = kind
        self.tmp_path = join(job.tmp_dir, f"{kind}-{uuid.uuid4().hex}.parquet")
        self.schema = shard_schema(kind, job, model)
        self.stream = FileSystems.create(self.tmp_path, mime_type="application/x-parquet",
                                         compression_type=CompressionTypes.UNCOMPRESSED)
        self.writer = pq.ParquetWriter(
            self.stream, self.schema, compression="zstd", use_compliant_nested_type=False,
            write_statistics=[c for c in _STAT_COLUMNS if c in self.schema.names],
        )
        self.ids: List[str] = []
        self.stats = StageStats()
        self.write_ms = 0.0

    def write_group(self, records: List[Dict[str, Any]]) -> None:
        t0 = time.perf_counter()
        self.writer.write_table(table_for(self.kind, records, self.schema), row_group_size=len(records))
        self.write_ms += (time.perf_counter() - t0) * 1000.0
        self.ids.extend(r["image_id"] for r in records)

    def abandon(self) -> None:
        try:
            self.writer.close()
            self.stream.close()
            FileSystems.delete([self.tmp_path])
        except Exception:  # a leftover temp file is removed with the run's _tmp dir
            _LOGGER.debug("could not remove temp shard %s", self.tmp_path, exc_info=True)


class WriteShardsFn(beam.DoFn):
    """(record, timings) -> Parquet shards of `kind` ("features" or "failures"); emits ShardInfo dicts."""

    def __init__(self, kind: str, job: JobConfig):
        if kind not in (FEATURES, FAILURES):
            raise ValueError(f"kind must be {FEATURES} or {FAILURES}, got {kind!r}")
        self._kind = kind
        self._job = job
        self._rows_per_shard = job.rows_per_shard if kind == FEATURES else FAILURE_ROWS_PER_SHARD
        self._group_size = job.row_group_size if kind == FEATURES else min(FAILURE_ROWS_PER_SHARD, 10_000)

    def setup(self):
        use_anonymous_credentials_if_emulated()
        self._write_ms = Metrics.distribution(NAMESPACE, f"write_ms_per_{self._kind}_shard")
        self._rows = Metrics.counter(NAMESPACE, f"{self._kind}_rows_written")
        self._shards = Metrics.counter(NAMESPACE, f"{self._kind}_shards_written")
        self._progress = progress.ProgressReporter(self._job.progress_dir)
        ensure_dir(self._job.features_dir if self._kind == FEATURES else self._job.failures_dir)

    def start_bundle(self):
        stale = getattr(self, "_shard", None)
        if stale is not None:  # left open by a failed bundle on this instance
            stale.abandon()
        self._shard: Optional[_OpenShard] = None
        self._pending: List[Dict[str, Any]] = []
        self._pending_timings: List[Dict[str, float]] = []

    def process(self, element):
        record, timings = element
        if self._shard is None:
            self._shard = _OpenShard(self._kind, self._job, record.get("model", self._job.model_identity))
        self._pending.append(record)
        self._pending_timings.append(timings)
        if len(self._pending) >= self._group_size:
            self._flush_group()
        if len(self._shard.ids) + len(self._pending) >= self._rows_per_shard:
            yield self._close_shard()
        self._progress.add("done" if self._kind == FEATURES else "failed")

    def finish_bundle(self):
        if self._shard is not None:
            info = self._close_shard()
            yield WindowedValue(info, GlobalWindow().max_timestamp(), [GlobalWindow()])
        self._progress.flush()

    def teardown(self):
        shard = getattr(self, "_shard", None)
        if shard is not None:
            shard.abandon()

    def _flush_group(self) -> None:
        if not self._pending:
            return
        self._shard.write_group(self._pending)
        for record, timings in zip(self._pending, self._pending_timings):
            self._shard.stats.add(self._kind, record, timings)
        self._pending, self._pending_timings = [], []

    def _close_shard(self) -> Dict[str, Any]:
        self._flush_group()
        shard, self._shard = self._shard, None
        t0 = time.perf_counter()
        shard.writer.close()
        shard.stream.close()
        final_dir = self._job.features_dir if self._kind == FEATURES else self._job.failures_dir
        final_path = join(final_dir, shard_name(self._job.run_id, shard.ids))
        FileSystems.rename([shard.tmp_path], [final_path])
        write_ms = shard.write_ms + (time.perf_counter() - t0) * 1000.0
        self._write_ms.update(int(round(write_ms)))
        self._rows.inc(len(shard.ids))
        self._shards.inc()
        _LOGGER.info("wrote %s (%d rows)", final_path, len(shard.ids))
        shard.stats.add_time("write", write_ms)  # one sample per shard
        stats = shard.stats.to_dict()
        return {"kind": self._kind, "path": final_path, "rows": len(shard.ids), "stats": stats}
