"""Benchmark of `delg-extract report`: build time and bytes read on a synthetic output of N images.

    python benchmarks/bench_report.py [--images 3000] [--features 1000] [--out /tmp/bench-report]

The output is written with the job's own code (beam_job.pipeline.rows.feature_record / features_table,
writer.shard_schema, summary.finalize_run): N feature rows with `--features` local features each
(float32 descriptors: about 0.5 MB a row), 256 rows per shard in row groups of 16, as the job writes
them, plus one failures shard. The rows point at a few generated 1024x768 JPEGs so the sample pictures
are decoded for real. Prints the report build time next to a plain read of every column, and the
compressed bytes of the column chunks the report asked for next to the output's size.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from beam_job.config import get_preset
from beam_job.features import DelgFeatures
from beam_job.pipeline.options import JobConfig, RunContext
from beam_job.pipeline.rows import failure_record, failures_table, feature_record, features_table
from beam_job.pipeline.stats import StageStats
from beam_job.pipeline.summary import finalize_run
from beam_job.pipeline.writer import FAILURES, FEATURES, shard_prefix, shard_schema
from beam_job.report import run as run_report

ROWS_PER_SHARD, ROW_GROUP = 256, 16


def make_images(folder: str, count: int = 8):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for i in range(count):
        small = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        path = os.path.join(folder, f"photo-{i}.jpg")
        Image.fromarray(small).resize((1024, 768), Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def make_output(out: str, images: int, features: int) -> JobConfig:
    shutil.rmtree(out, ignore_errors=True)
    photos = make_images(os.path.join(out, "_photos"))
    job = JobConfig(inputs=(os.path.join(out, "_photos", "*.jpg"),), manifests=(), output=out,
                    extraction=get_preset("tiny"))
    run = RunContext(model_identity="bench", started_at="2026-01-01T00:00:00+00:00")
    os.makedirs(job.features_dir)
    os.makedirs(job.failures_dir)
    rng = np.random.default_rng(0)
    infos = []
    n_shards = -(-images // ROWS_PER_SHARD)
    for start in range(0, images, ROWS_PER_SHARD):
        records, stats = [], StageStats()
        for i in range(start, min(start + ROWS_PER_SHARD, images)):
            n = int(rng.integers(features // 2, features + 1))
            g = rng.standard_normal(2048).astype(np.float32)
            desc = rng.standard_normal((n, 128)).astype(np.float32)
            feats = DelgFeatures(
                global_descriptor=g / np.linalg.norm(g),
                locations=(rng.random((n, 2)) * [768, 1024]).astype(np.float32),
                descriptors=desc / np.linalg.norm(desc, axis=1, keepdims=True),
                scales=(2.0 ** rng.integers(-2, 3, n)).astype(np.float32),
                attention=np.sort(rng.random(n).astype(np.float32))[::-1].copy(),
                original_hw=(768, 1024), processed_hw=(768, 1024), scale_factors=(1.0, 1.0))
            record = feature_record(f"img-{i:06d}", photos[i % len(photos)], feats, model="bench", preset="tiny")
            records.append(record)
            stats.add(FEATURES, record, {"read": 1.0, "decode": 10.0, "inference": 500.0})
        schema = shard_schema(FEATURES, job, run)
        path = f"{shard_prefix(job, FEATURES)}-{start // ROWS_PER_SHARD:05d}-of-{n_shards:05d}.parquet"
        pq.write_table(features_table(records, schema), path, row_group_size=ROW_GROUP, compression="zstd",
                       use_compliant_nested_type=False)
        infos.append({"kind": FEATURES, "rows": len(records), "stats": stats.to_dict()})
    failures = [failure_record(f"bad-{i}", f"/missing/bad-{i}.jpg", "read", "FileNotFoundError", "no such file",
                               model="bench", preset="tiny") for i in range(images // 100)]
    if failures:
        stats = StageStats()
        for r in failures:
            stats.add(FAILURES, r, {"read": 0.1})
        path = f"{shard_prefix(job, FAILURES)}-00000-of-00001.parquet"
        pq.write_table(failures_table(failures, shard_schema(FAILURES, job, run)), path)
        infos.append({"kind": FAILURES, "rows": len(failures), "stats": stats.to_dict()})
    finalize_run(job, run, infos, images + len(failures), 0, 0)  # finds the shards by name; writes summary.json
    return job


def requested_bytes(requests) -> int:
    """Compressed bytes of the column chunks the report asked for (footer sizes of those chunks)."""
    total = 0
    for path, columns, groups in requests:
        md = pq.ParquetFile(path).metadata
        names = [md.schema.column(i).path.split(".")[0] for i in range(md.num_columns)]
        for g in (groups if groups is not None else range(md.num_row_groups)):
            rg = md.row_group(g)
            total += sum(rg.column(i).total_compressed_size for i, n in enumerate(names) if n in columns)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--features", type=int, default=1000, help="local features per image (max)")
    parser.add_argument("--out", default="/tmp/bench-report")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    t0 = time.perf_counter()
    job = make_output(args.out, args.images, args.features)
    size = sum(os.path.getsize(os.path.join(d, f)) for d in (job.features_dir, job.failures_dir) for f in os.listdir(d))
    print(f"output: {args.images} images, up to {args.features} local features each, {size / 2**20:.0f} MiB of "
          f"shards, written in {time.perf_counter() - t0:.1f} s")

    times, reader = [], None
    for _ in range(args.repeat):
        reader = run_report.ColumnReader()
        t0 = time.perf_counter()
        path = run_report.write_run_report(args.out, reader=reader)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for name in sorted(os.listdir(job.features_dir)):
        pq.read_table(os.path.join(job.features_dir, name))
    full = time.perf_counter() - t0

    state_reads = [(os.path.join(d, f), ("image_id", "path"), None)  # resume.output_state, outside the reader
                   for d in (job.features_dir, job.failures_dir) for f in sorted(os.listdir(d))]
    asked = requested_bytes(reader.requests) + requested_bytes(state_reads)
    columns = sorted({c for _, cols, _ in reader.requests for c in cols})
    keypoint_rows = sum(ROW_GROUP * len(g) for _, cols, g in reader.requests if "locations" in cols and g)
    print(f"report: {path} ({os.path.getsize(path) / 1024:.0f} KiB)")
    print(f"{'':34s}{'seconds':>10s}{'MiB':>10s}")
    print(f"{f'report build (median of {args.repeat})':34s}{statistics.median(times):10.2f}{asked / 2**20:10.1f}")
    print(f"{'read every column once (pyarrow)':34s}{full:10.2f}{size / 2**20:10.1f}")
    print(f"ratio (full read / report): time {full / statistics.median(times):.1f}x, bytes {size / max(asked, 1):.0f}x")
    print(f"columns the report asked for: {', '.join(columns)} (MiB above include image_id + path of every shard, "
          "read by resume.output_state)")
    print(f"descriptor columns asked for: {reader.descriptor_requests() or 'none'}; rows whose locations were read: "
          f"{keypoint_rows} (row groups of the {run_report.SAMPLE_IMAGES} sampled images)")


if __name__ == "__main__":
    main()
