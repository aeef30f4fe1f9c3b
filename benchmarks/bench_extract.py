"""Per-stage throughput and memory benchmark of the DELG job's extraction path, one or more worker processes.

Runs exactly the code the Beam job runs for each image, stage by stage, without Beam's scheduling:

  read      bytes of the file through the project's storage layer (local paths or gs://)
  decode    beam_job.imaging.decode_image + prepare_image (EXIF, resize rule of the preset)
  infer     DelgExtractor.extract_prepared (the TensorFlow model: pyramid, attention, descriptors)
  rows      beam_job.pipeline.rows.feature_record + features_table (numpy -> Arrow, delg_v1 schema)
  write     pyarrow ParquetWriter row groups into one local shard, zstd, as the job's shard writer

Each of --workers processes loads its own model (as the job does by default: one per SDK process) and
takes every N-th image; all workers start their timed loops together (after every model load and warmup),
so the aggregate images/s is that of N processes running side by side. A sampler thread records the resident
set size (RSS) every few milliseconds and
attributes the peak to the stage running at that moment. The first --warmup image of each worker is run
once untimed (TensorFlow traces its graph on the first call) and reported separately.

Prints, per worker and overall: ms/image per stage (mean, p50, max), the stage's share of the time,
the images/s the stage alone would sustain, peak RSS per stage, model load time, and end-to-end
images/s. `--json PATH` also writes the numbers.

Example:
  TF_NUM_INTRAOP_THREADS=1 python benchmarks/bench_extract.py /path/to/images --preset tiny --limit 16
  python benchmarks/bench_extract.py 'gs://bucket/images/*.jpg' --preset embedded --limit 3 --workers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

# Run from a checkout without installing: the repository root holds beam_job/ and schemas/.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

STAGES = ("read", "decode", "infer", "rows", "write")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm")


class RssSampler:
    """Background thread sampling this process's RSS; keeps the peak per current stage label."""

    def __init__(self, interval_s: float = 0.005):
        import psutil

        self._proc = psutil.Process()
        self._interval = interval_s
        self.stage = "startup"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        rss = self._proc.memory_info().rss
        if rss > self.peaks.get(self.stage, 0):
            self.peaks[self.stage] = rss

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self._interval)

    def set_stage(self, stage: str) -> None:
        self.sample()  # close the previous stage with a sample
        self.stage = stage
        self.sample()

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def list_images(source: str, limit: int | None) -> list[str]:
    """Image paths from a folder (its image files, sorted) or a glob pattern (local or gs://)."""
    from beam_job import storage

    if "://" not in source and os.path.isdir(source):
        paths = sorted(
            os.path.join(source, name)
            for name in os.listdir(source)
            if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(source, name))
        )
    else:
        paths = storage.match(source)
    if not paths:
        raise SystemExit(f"no images found in {source!r}: give a folder of images or a glob such as 'dir/*.jpg'")
    return paths[:limit] if limit else paths


def _worker(index: int, paths: list[str], opts: dict[str, Any], out_q, barrier) -> None:
    """One worker process: load the model, run every image stage by stage, report timings and RSS."""
    if opts["tf_threads"] is not None:
        os.environ["TF_NUM_INTRAOP_THREADS"] = str(opts["tf_threads"])
        os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import resource

    with RssSampler() as rss:
        from beam_job import storage
        from beam_job.config import get_preset
        from beam_job.delg.extractor import DelgExtractor
        from beam_job.imaging import decode_image, prepare_image
        from beam_job.pipeline.options import JobConfig, RunContext
        from beam_job.pipeline.rows import feature_record, features_table
        from beam_job.pipeline.writer import FEATURES, parquet_writer, shard_schema

        overrides = {"model": opts["model"]} if opts["model"] else {}
        config = get_preset(opts["preset"], **overrides)
        rss.set_stage("model_load")
        t0 = time.perf_counter()
        extractor = DelgExtractor(config)
        load_s = time.perf_counter() - t0
        identity = extractor.identity
        job = JobConfig(inputs=("bench",), manifests=(), output=opts["out_dir"], extraction=config,
                        descriptor_dtype=opts["descriptor_dtype"])
        schema = shard_schema(FEATURES, job, RunContext(model_identity=identity, started_at=""))
        shard_path = os.path.join(opts["out_dir"], f"bench-worker{index}.parquet")
        writer = parquet_writer(shard_path, schema)

        def run_one(path: str, times: dict[str, list[float]] | None, pending: list[dict[str, Any]]) -> int:
            marks = [time.perf_counter()]
            rss.set_stage("read")
            data = storage.read_bytes(path)
            marks.append(time.perf_counter())
            rss.set_stage("decode")
            image = decode_image(data, apply_exif_orientation=config.apply_exif_orientation,
                                 max_pixels=config.max_image_pixels)
            prepared = prepare_image(image, config)
            marks.append(time.perf_counter())
            rss.set_stage("infer")
            features = extractor.extract_prepared(prepared)
            marks.append(time.perf_counter())
            rss.set_stage("rows")
            record = feature_record(os.path.basename(path), path, features, model=identity, preset=config.name,
                                    descriptor_dtype=opts["descriptor_dtype"])
            pending.append(record)
            table = features_table(pending, schema) if len(pending) >= opts["row_group_size"] else None
            marks.append(time.perf_counter())
            rss.set_stage("write")
            if table is not None:
                writer.write_table(table, row_group_size=len(pending))
                pending.clear()
            marks.append(time.perf_counter())
            rss.set_stage("idle")
            if times is not None:
                for stage, start, end in zip(STAGES, marks, marks[1:], strict=True):
                    times[stage].append((end - start) * 1000.0)
            return features.num_features

        warmup_s = 0.0
        if opts["warmup"] and paths:
            t0 = time.perf_counter()
            for path in paths[: opts["warmup"]]:
                run_one(path, None, [])
            warmup_s = time.perf_counter() - t0
        times: dict[str, list[float]] = {stage: [] for stage in STAGES}
        pending: list[dict[str, Any]] = []
        keypoints = []
        barrier.wait()  # all workers start their timed loops together, after every model load and warmup
        t_start = time.perf_counter()
        loop_start_epoch = time.time()
        for path in paths:
            keypoints.append(run_one(path, times, pending))
        if pending:  # the last, partial row group
            t0 = time.perf_counter()
            rss.set_stage("rows")
            table = features_table(pending, schema)
            t1 = time.perf_counter()
            rss.set_stage("write")
            writer.write_table(table, row_group_size=len(pending))
            t2 = time.perf_counter()
            times["rows"][-1] += (t1 - t0) * 1000.0
            times["write"][-1] += (t2 - t1) * 1000.0
        rss.set_stage("write")
        t0 = time.perf_counter()
        writer.close()
        if times["write"]:
            times["write"][-1] += (time.perf_counter() - t0) * 1000.0
        wall_s = time.perf_counter() - t_start
        loop_end_epoch = time.time()
        rss.set_stage("idle")
    out_q.put({
        "worker": index,
        "pid": os.getpid(),
        "images": len(paths),
        "model": identity,
        "model_load_s": load_s,
        "warmup_s": warmup_s,
        "wall_s": wall_s,
        "loop_start_epoch": loop_start_epoch,
        "loop_end_epoch": loop_end_epoch,
        "times_ms": times,
        "peak_rss_mb": {stage: peak / 2**20 for stage, peak in rss.peaks.items()},
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "keypoints_mean": statistics.fmean(keypoints) if keypoints else 0.0,
        "shard_bytes": os.path.getsize(shard_path),
    })


def summarize(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    total = sum(sum(v) for v in times.values()) or 1.0
    out = {}
    for stage in STAGES:
        values = times.get(stage) or [0.0]
        mean = statistics.fmean(values)
        out[stage] = {
            "mean_ms": mean,
            "p50_ms": statistics.median(values),
            "max_ms": max(values),
            "share": sum(values) / total,
            "stage_images_per_s": 1000.0 / mean if mean > 0 else float("inf"),
        }
    return out


def print_report(results: list[dict[str, Any]], wall_s: float, args: argparse.Namespace) -> dict[str, Any]:
    merged: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for res in results:
        for stage in STAGES:
            merged[stage].extend(res["times_ms"][stage])
    n = sum(r["images"] for r in results)
    overall = summarize(merged)
    per_image_ms = sum(s["mean_ms"] for s in overall.values())
    print(f"\npreset {args.preset}  model {results[0]['model']}")
    print(f"{n} images, {len(results)} worker process(es), TF intra-op threads "
          f"{args.tf_threads if args.tf_threads is not None else os.environ.get('TF_NUM_INTRAOP_THREADS', 'default')}")
    header = (f"{'stage':<8}{'mean ms':>10}{'p50 ms':>10}{'max ms':>10}{'share':>8}"
              f"{'img/s alone':>13}{'peak RSS MB':>13}")
    print(header)
    print("-" * len(header))
    for stage in STAGES:
        s = overall[stage]
        peak = max(r["peak_rss_mb"].get(stage, 0.0) for r in results)
        print(f"{stage:<8}{s['mean_ms']:>10.1f}{s['p50_ms']:>10.1f}{s['max_ms']:>10.1f}{s['share']:>8.1%}"
              f"{s['stage_images_per_s']:>13.2f}{peak:>13.0f}")
    print("-" * len(header))
    print(f"{'total':<8}{per_image_ms:>10.1f}{'':>10}{'':>10}{1:>8.0%}{1000.0 / per_image_ms:>13.2f}")
    for r in results:
        rate = r["images"] / r["wall_s"] if r["wall_s"] > 0 else 0.0
        print(f"worker {r['worker']} (pid {r['pid']}): {r['images']} images in {r['wall_s']:.2f} s = {rate:.2f} img/s; "
              f"model load {r['model_load_s']:.2f} s, warmup {r['warmup_s']:.2f} s; "
              f"RSS after load {r['peak_rss_mb'].get('model_load', 0):.0f} MB, peak {r['max_rss_mb']:.0f} MB; "
              f"{r['keypoints_mean']:.0f} keypoints/image; shard {r['shard_bytes'] / 2**10:.0f} KiB "
              f"({r['shard_bytes'] / max(r['images'], 1) / 2**10:.1f} KiB/image)")
    # Aggregate over the span from the first worker's timed loop start to the last one's end (the loops of
    # different workers need not overlap fully: model loads finish at different times).
    span = max(r["loop_end_epoch"] for r in results) - min(r["loop_start_epoch"] for r in results)
    steady = n / max(span, 1e-9)
    print(f"all workers: {steady:.2f} img/s over the timed loops ({span:.2f} s span), {n / wall_s:.2f} img/s "
          f"including start-up, model load and warmup ({wall_s:.1f} s wall)")
    infer = overall["infer"]["mean_ms"]
    if infer > 0:
        print(f"ratios: inference is {overall['infer']['share']:.1%} of per-image time; decode/infer "
              f"{overall['decode']['mean_ms'] / infer:.3f}, read/infer {overall['read']['mean_ms'] / infer:.3f}, "
              f"(rows+write)/infer {(overall['rows']['mean_ms'] + overall['write']['mean_ms']) / infer:.3f}")
    return {"preset": args.preset, "images": n, "workers": len(results), "wall_s": wall_s,
            "steady_images_per_s": steady, "stages": overall, "per_worker": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", help="folder of images, or a glob (local or gs://)")
    parser.add_argument("--preset", default="tiny", help="extraction preset (default tiny)")
    parser.add_argument("--model", help="model URI overriding the preset's")
    parser.add_argument("--limit", type=int, help="use at most this many images")
    parser.add_argument("--repeat", type=int, default=1,
                        help="process the image list this many times (longer timed loops for small sets)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes, each with its own model")
    parser.add_argument("--tf_threads", type=int, help="TF_NUM_INTRAOP_THREADS in each worker")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images per worker before timing (default 1)")
    parser.add_argument("--row_group_size", type=int, default=16, help="rows per Parquet row group (job default 16)")
    parser.add_argument("--descriptor_dtype", choices=("float32", "float16"), default="float32")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be >= 1")

    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    paths = list_images(args.images, args.limit) * args.repeat
    workers = min(args.workers, len(paths))
    with tempfile.TemporaryDirectory(prefix="delg-bench-") as out_dir:
        opts = {"preset": args.preset, "model": args.model, "tf_threads": args.tf_threads, "warmup": args.warmup,
                "row_group_size": args.row_group_size, "descriptor_dtype": args.descriptor_dtype,
                "out_dir": out_dir}
        ctx = mp.get_context("spawn")  # fresh interpreters: no TensorFlow state shared with the parent
        queue = ctx.Queue()
        barrier = ctx.Barrier(workers)
        t0 = time.perf_counter()
        procs = [ctx.Process(target=_worker, args=(i, paths[i::workers], opts, queue, barrier)) for i in range(workers)]
        for proc in procs:
            proc.start()
        results = []
        for _ in procs:
            while True:
                try:
                    results.append(queue.get(timeout=5))
                    break
                except Exception as exc:  # queue.Empty: check that no worker died
                    dead = [p for p in procs if p.exitcode not in (None, 0)]
                    if dead:
                        barrier.abort()
                        raise SystemExit(f"worker process {dead[0].pid} failed with exit code "
                                         f"{dead[0].exitcode}") from exc
        for proc in procs:
            proc.join()
        wall_s = time.perf_counter() - t0
    results.sort(key=lambda r: r["worker"])
    report = print_report(results, wall_s, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
