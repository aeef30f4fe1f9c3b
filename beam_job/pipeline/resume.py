"""Resume support: find earlier outputs, clear them for --overwrite, and settle the failures table.

Model: <output>/features holds each image at most once across runs (--skip_existing anti-joins new inputs
with the image_id column of existing feature shards, inside the pipeline). <output>/failures holds the
*current* failures: when a run ends, failure rows of earlier runs whose image_id now has a feature row, or
failed again in this run, are removed (`settle_failures`), so features + failures list every image once
and re-running failures/*.parquet as a manifest retries exactly the images that still fail.
"""

from __future__ import annotations

import logging
import uuid
from typing import Dict, Iterable, List, Set

import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from beam_job.pipeline.inputs import match_paths
from beam_job.pipeline.options import JobConfig, join

_LOGGER = logging.getLogger(__name__)


def shard_glob(directory: str) -> str:
    return join(directory, "*.parquet")


def has_shards(directory: str) -> bool:
    """True when the directory (local or gs://) holds at least one .parquet file."""
    try:
        return bool(FileSystems.match([shard_glob(directory)], limits=[1])[0].metadata_list)
    except Exception:  # a missing local directory raises on some filesystems
        return False


def list_shards(directory: str) -> List[str]:
    try:
        return match_paths(shard_glob(directory))
    except Exception:
        return []


def delete_paths(paths: Iterable[str]) -> int:
    paths = list(paths)
    if paths:
        FileSystems.delete(paths)
    return len(paths)


def clear_outputs(job: JobConfig) -> int:
    """--overwrite: delete earlier feature and failure shards and the success marker (runs/ is kept)."""
    n = delete_paths(list_shards(job.features_dir) + list_shards(job.failures_dir))
    if FileSystems.exists(job.success_path):
        FileSystems.delete([job.success_path])
    return n


def read_ids(path: str) -> List[str]:
    """image_id column of one shard (reads only that column)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        return pq.read_table(fh, columns=["image_id"]).column(0).to_pylist()


def _write_table(table, path: str) -> None:
    with FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
        pq.write_table(table, fh, compression="zstd", use_compliant_nested_type=False)


def settle_failures(job: JobConfig, run_feature_shards: List[str], run_failure_shards: List[str]) -> Dict[str, int]:
    """Drop failure rows of earlier runs that are resolved (now in features) or superseded (failed again now).

    Returns counts: {"removed_rows", "rewritten_shards", "deleted_shards", "feature_ids", "duplicate_feature_ids"}.
    Only earlier shards that change are rewritten (temp file + rename, then the old file is deleted).
    """
    from beam_job.pipeline.writer import shard_name

    stats = {"removed_rows": 0, "rewritten_shards": 0, "deleted_shards": 0, "feature_ids": 0, "duplicate_feature_ids": 0}
    this_run = set(run_failure_shards)
    earlier = [p for p in list_shards(job.failures_dir) if p not in this_run]
    all_features = list_shards(job.features_dir)
    feature_ids: Set[str] = set()
    total = 0
    if earlier or job.existing_features:
        for path in all_features:
            ids = read_ids(path)
            total += len(ids)
            feature_ids.update(ids)
        stats["feature_ids"] = len(feature_ids)
        stats["duplicate_feature_ids"] = total - len(feature_ids)
    if not earlier:
        return stats
    resolved = set(feature_ids)
    for path in run_failure_shards:
        resolved.update(read_ids(path))
    import pyarrow.compute as pc

    for path in earlier:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            table = pq.read_table(fh)
        keep = pc.invert(pc.is_in(table.column("image_id"), value_set=_string_array(resolved)))
        kept = table.filter(keep)
        removed = table.num_rows - kept.num_rows
        if removed == 0:
            continue
        stats["removed_rows"] += removed
        if kept.num_rows == 0:
            FileSystems.delete([path])
            stats["deleted_shards"] += 1
            continue
        tmp = join(job.tmp_dir, f"settle-{uuid.uuid4().hex}.parquet")
        _write_table(kept, tmp)
        final = join(job.failures_dir, shard_name(job.run_id, kept.column("image_id").to_pylist()))
        FileSystems.rename([tmp], [final])
        if final != path:
            FileSystems.delete([path])
        stats["rewritten_shards"] += 1
    _LOGGER.info("settled failures of earlier runs: %s", stats)
    return stats


def _string_array(values: Set[str]):
    import pyarrow as pa

    return pa.array(sorted(values), type=pa.string())
