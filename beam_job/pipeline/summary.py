"""The run's last step: drop orphan shards, settle failures, write runs/<run_id>/summary.json and _SUCCESS.

FinalizeRunFn receives the list of ShardInfo dicts of every committed shard (so it runs only after all
shards are final), plus the listing counts as side inputs. It enforces --max_failure_ratio: above it the
summary says status "failed" with a one-line reason, _SUCCESS is not written, and the step raises
FailureRatioExceeded so the job fails (on Dataflow too) instead of "succeeding" with only failures.
"""

from __future__ import annotations

import datetime
import json
import logging
import time
import uuid
from collections import Counter
from typing import Any, Dict, List, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_job import __version__
from beam_job.pipeline.gcs_auth import use_anonymous_credentials_if_emulated
from beam_job.pipeline.inputs import match_paths
from beam_job.pipeline.options import JobConfig, join
from beam_job.pipeline.resume import settle_failures
from beam_job.pipeline.stats import describe, merge_into, new_timing
from beam_job.pipeline.writer import FAILURES, FEATURES
from schemas import delg_v1

_LOGGER = logging.getLogger(__name__)

DUCKDB_FLOAT16_NOTE = (
    "descriptors are stored as Parquet FLOAT16; pyarrow and pandas read them as float16, DuckDB reads them "
    "as FLOAT (float32)"
)


class FailureRatioExceeded(RuntimeError):
    """Too many images failed; the message is the one-line reason also stored in the summary."""


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str, data: Dict[str, Any]) -> None:
    """Write JSON to a local path or gs:// URI (temp name then rename, so readers never see half a file)."""
    tmp = path + f".tmp-{uuid.uuid4().hex[:8]}"
    with FileSystems.create(tmp, mime_type="application/json", compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        fh.write(json.dumps(data, indent=2, sort_keys=True).encode("utf-8"))
    FileSystems.rename([tmp], [path])


def read_json(path: str) -> Optional[Dict[str, Any]]:
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            return json.loads(fh.read().decode("utf-8"))
    except Exception:  # absent or unreadable: the caller reports that
        return None


def _merge_stats(infos: List[Dict[str, Any]]) -> Dict[str, Any]:
    timings: Dict[str, Dict[str, Any]] = {}
    failures: Counter = Counter()
    examples: Dict[str, str] = {}
    models: Counter = Counter()
    keypoints = 0
    for info in infos:
        stats = info["stats"]
        for stage, entry in stats["timings"].items():
            merge_into(timings.setdefault(stage, new_timing()), entry)
        failures.update(stats["failures"])
        for key, example in stats["examples"].items():
            examples.setdefault(key, example)
        models.update(stats["models"])
        keypoints += stats["keypoints"]
    return {"timings": timings, "failures": failures, "examples": examples, "models": models, "keypoints": keypoints}


def build_summary(job: JobConfig, infos: List[Dict[str, Any]], listed: int, skipped: int, duplicates: int,
                  cleanup: Dict[str, Any], finished_at: Optional[str] = None) -> Dict[str, Any]:
    """The summary dict (JSON-serialisable) of a finished run; status "succeeded" or "failed"."""
    merged = _merge_stats(infos)
    n_features = sum(i["rows"] for i in infos if i["kind"] == FEATURES)
    n_failures = sum(i["rows"] for i in infos if i["kind"] == FAILURES)
    processed = n_features + n_failures
    ratio = n_failures / processed if processed else 0.0
    by_stage: Counter = Counter()
    by_type: Counter = Counter()
    for key, count in merged["failures"].items():
        stage, error_type = key.split("/", 1)
        by_stage[stage] += count
        by_type[error_type] += count
    status, reason = "succeeded", ""
    if processed and ratio > job.max_failure_ratio:
        status = "failed"
        top_key, _ = merged["failures"].most_common(1)[0]
        reason = (f"{n_failures} of {processed} images failed ({ratio:.0%} > --max_failure_ratio "
                  f"{job.max_failure_ratio:.0%}); most common: {top_key} ({merged['failures'][top_key]}x), e.g. "
                  f"{merged['examples'].get(top_key, '')}")
    started = job.started_at or None
    elapsed = None
    if started:
        try:
            t0 = datetime.datetime.fromisoformat(started)
            t1 = datetime.datetime.fromisoformat(finished_at or _now_iso())
            elapsed = max((t1 - t0).total_seconds(), 1e-3)
        except ValueError:
            elapsed = None
    timings = {stage: describe(entry) for stage, entry in sorted(merged["timings"].items())}
    summary: Dict[str, Any] = {
        "schema_version": delg_v1.SCHEMA_VERSION,
        "job_version": __version__,
        "run_id": job.run_id,
        "status": status,
        "reason": reason,
        "started_at": started,
        "finished_at": finished_at or _now_iso(),
        "elapsed_s": round(elapsed, 3) if elapsed else None,
        "images_per_s": round(processed / elapsed, 3) if elapsed else None,
        "counts": {
            "listed": listed,
            "duplicate_inputs": duplicates,
            "skipped_existing": skipped,
            "processed": processed,
            "features": n_features,
            "failures": n_failures,
            "failure_ratio": round(ratio, 6),
        },
        "failures_by_stage": dict(sorted(by_stage.items())),
        "failures_by_error_type": dict(sorted(by_type.items())),
        "failures_by_stage_and_type": dict(sorted(merged["failures"].items())),
        "failure_examples": dict(sorted(merged["examples"].items())),
        "keypoints": {"total": merged["keypoints"],
                      "mean_per_image": round(merged["keypoints"] / n_features, 3) if n_features else 0.0},
        "timings_ms": timings,
        "model": {"identity": (merged["models"].most_common(1)[0][0] if merged["models"] else job.model_identity),
                  "identities_seen": dict(merged["models"]), "uri": job.extraction.model},
        "config": job.extraction.to_dict(),
        "job": job.to_summary_dict(),
        "shards": {
            FEATURES: sorted(i["path"] for i in infos if i["kind"] == FEATURES),
            FAILURES: sorted(i["path"] for i in infos if i["kind"] == FAILURES),
        },
        "cleanup": cleanup,
        "notes": [DUCKDB_FLOAT16_NOTE] if job.descriptor_dtype == "float16" else [],
    }
    if job.extraction.untrained or job.extraction.is_embedded_model:
        summary["notes"].append("UNTRAINED model: features are meaningless for retrieval (smoke tests only)")
    return summary


def _remove_tmp_dir(tmp_dir: str) -> None:
    """Delete this run's temp files (left by failed bundle attempts) and, locally, the directory itself."""
    try:
        leftovers = match_paths(join(tmp_dir, "*"))
        if leftovers:
            FileSystems.delete(leftovers)
        if "://" not in tmp_dir:
            import os

            if os.path.isdir(tmp_dir):
                os.rmdir(tmp_dir)
                parent = os.path.dirname(tmp_dir)
                if not os.listdir(parent):
                    os.rmdir(parent)
    except Exception:  # temp files are harmless: they are outside features/ and failures/
        _LOGGER.debug("could not remove %s", tmp_dir, exc_info=True)


class FinalizeRunFn(beam.DoFn):
    """[ShardInfo, ...] -> the run summary dict; writes summary.json and _SUCCESS (see module docstring)."""

    def __init__(self, job: JobConfig):
        self._job = job

    def setup(self):
        use_anonymous_credentials_if_emulated()

    def process(self, infos, listed, skipped, duplicates):
        job = self._job
        t0 = time.perf_counter()
        committed = {i["path"] for i in infos}
        orphans = []
        for kind_dir in (job.features_dir, job.failures_dir):
            try:
                paths = match_paths(join(kind_dir, f"part-{job.run_id}-*.parquet"))
            except Exception:
                paths = []
            orphans.extend(p for p in paths if p not in committed)
        if orphans:
            _LOGGER.warning("deleting %d shard(s) of failed bundle attempts: %s", len(orphans), orphans[:5])
            FileSystems.delete(orphans)
        settled = settle_failures(
            job,
            [i["path"] for i in infos if i["kind"] == FEATURES],
            [i["path"] for i in infos if i["kind"] == FAILURES],
        )
        _remove_tmp_dir(job.tmp_dir)
        cleanup = {"orphan_shards_deleted": len(orphans), "settle": settled,
                   "finalize_ms": round((time.perf_counter() - t0) * 1000.0, 3)}
        summary = build_summary(job, infos, int(listed), int(skipped), int(duplicates), cleanup)
        write_json(job.summary_path, summary)
        if summary["status"] != "succeeded":
            raise FailureRatioExceeded(summary["reason"])
        write_json(job.success_path, {"run_id": job.run_id, "summary": job.summary_path,
                                      "finished_at": summary["finished_at"],
                                      "schema_version": delg_v1.SCHEMA_VERSION})
        _LOGGER.info("run %s: %d features, %d failures; summary %s", job.run_id, summary["counts"]["features"],
                     summary["counts"]["failures"], job.summary_path)
        yield summary
