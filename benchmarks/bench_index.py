"""Benchmark: FAISS index build and query throughput on synthetic 2048-d unit vectors (flat, IVF-PQ, HNSW).

Vectors are generated in chunks from per-chunk seeds (clustered around fixed centres), so the 1M case never
holds more than one chunk besides the index, and the exact ground truth for recall is computed by
regenerating the chunks. `--via_shards` instead writes delg_v1 shards first and times
beam_job.retrieval.index.build_index on them (the real Parquet -> FAISS path).

    python benchmarks/bench_index.py --n 100000 --kind flat
    python benchmarks/bench_index.py --n 1000000 --kind ivfpq --no_refine
    python benchmarks/bench_index.py --n 100000 --kind flat --via_shards --shards 10

Prints one JSON object per run (and appends it to --out when given).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from beam_job.retrieval import index as ix
from beam_job.retrieval import synthetic

DIM = 2048


def chunk(i: int, size: int, centres: np.ndarray) -> np.ndarray:
    """Deterministic chunk i of the collection: (size, DIM) float32 unit rows."""
    rng = np.random.default_rng(1000 + i)
    labels = rng.integers(0, len(centres), size)
    x = centres[labels] + 0.8 * rng.standard_normal((size, DIM), dtype=np.float32) / np.sqrt(DIM)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def chunks(n: int, size: int, centres: np.ndarray):
    for i, start in enumerate(range(0, n, size)):
        yield start, chunk(i, min(size, n - start), centres)


def make_queries(n: int, size: int, centres: np.ndarray, count: int) -> np.ndarray:
    """Noisy copies of `count` database vectors."""
    rng = np.random.default_rng(7)
    picks = np.sort(rng.choice(n, count, replace=False))
    out = np.empty((count, DIM), np.float32)
    for start, x in chunks(n, size, centres):
        sel = picks[(picks >= start) & (picks < start + len(x))]
        out[np.searchsorted(picks, sel)] = x[sel - start]
    out += 0.02 * rng.standard_normal(out.shape, dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def exact_topk(n: int, size: int, centres: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for start, x in chunks(n, size, centres):
        s = queries @ x.T
        cat_s = np.concatenate([best_s, s], axis=1)
        cat_i = np.concatenate([best_i, np.arange(start, start + len(x))[None].repeat(len(queries), 0)], axis=1)
        top = np.argpartition(-cat_s, k, axis=1)[:, :k]
        best_s = np.take_along_axis(cat_s, top, 1)
        best_i = np.take_along_axis(cat_i, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)  # (q, k), best first


def rss() -> int:
    return psutil.Process().memory_info().rss


def run(args) -> dict:
    import faiss

    faiss.omp_set_num_threads(args.threads)
    centres = synthetic.unit_rows(np.random.default_rng(0), args.clusters, DIM)
    cfg = ix.IndexConfig(kind=args.kind, nlist=args.nlist, refine=args.refine, nprobe=args.nprobe,
                         train_size=args.train_size, hnsw_m=args.hnsw_m, ef_search=args.ef_search)
    result = {"n": args.n, "kind": args.kind, "threads": args.threads, "cpus": os.cpu_count()}
    rss0 = rss()
    if args.via_shards:
        tmp = tempfile.mkdtemp(prefix="bench-index-")
        try:
            t = time.perf_counter()
            per = -(-args.n // args.shards)
            for s in range(args.shards):
                start = s * per
                x = chunk(10_000 + s, min(per, args.n - start), centres)
                synthetic.write_global_shards(os.path.join(tmp, "f"), x, 1, row_group_size=4096,
                                              id_prefix=f"s{s:03d}_")
                os.replace(os.path.join(tmp, "f", "part-00000.parquet"), os.path.join(tmp, f"part-{s:05d}.parquet"))
            result["write_shards_s"] = time.perf_counter() - t
            result["shard_bytes"] = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp)
                                        if f.endswith(".parquet"))
            rss0 = rss()
            t = time.perf_counter()
            report = ix.build_index(tmp, os.path.join(tmp, "index"), cfg)
            result["build_s"] = time.perf_counter() - t
            result["build_breakdown_s"] = {k: round(v, 3) for k, v in report.seconds.items()}
            result["params"] = report.params
            result["vectors_per_s"] = args.n / result["build_s"]
            result["rss_growth_mb"] = (rss() - rss0) / 2**20
            result["index_bytes"] = os.path.getsize(os.path.join(tmp, "index", ix.INDEX_FILE))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return result

    params = ix.resolve_config(cfg, args.n, DIM)
    result["params"] = params
    if params["kind"] == "hnsw":
        index = faiss.IndexHNSWFlat(DIM, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.index_factory(DIM, params["factory"], faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        t = time.perf_counter()
        sample = np.concatenate([c for _, c in chunks(params["train_size"], args.chunk, centres)])
        index.train(sample)
        del sample
        result["train_s"] = time.perf_counter() - t
    add_s = 0.0
    for _, x in chunks(args.n, args.chunk, centres):  # generation is not timed
        t = time.perf_counter()
        index.add(x)
        add_s += time.perf_counter() - t
    result["add_s"] = add_s
    result["build_s"] = result["add_s"] + result.get("train_s", 0.0)
    result["vectors_per_s_add"] = args.n / result["add_s"]
    result["rss_growth_mb"] = (rss() - rss0) / 2**20
    ix.apply_search_params(index, params, cfg.k_factor_rf, cfg.ef_search)

    queries = make_queries(args.n, args.chunk, centres, args.queries)
    index.search(queries[:10], args.k)  # warm-up
    t = time.perf_counter()
    _, found = index.search(queries, args.k)
    batch_s = time.perf_counter() - t
    result["batch_qps"] = args.queries / batch_s
    lat = []
    for q in queries[: args.single]:
        t = time.perf_counter()
        index.search(q[None], args.k)
        lat.append(time.perf_counter() - t)
    result["single_query_ms_median"] = 1000 * float(np.median(lat))
    if args.recall_queries:
        t = time.perf_counter()
        truth = exact_topk(args.n, args.chunk, centres, queries[: args.recall_queries], args.k)
        result["ground_truth_s"] = time.perf_counter() - t
        found_r = found[: args.recall_queries]
        overlaps = [len(set(a) & set(b)) / args.k for a, b in zip(found_r, truth, strict=True)]
        result[f"recall@{args.k}"] = float(np.mean(overlaps))
        # 1-recall@k: the exact nearest neighbour is somewhere in the returned top k
        result[f"1-recall@{args.k}"] = float(np.mean([t[0] in set(f) for t, f in zip(truth, found_r, strict=True)]))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--kind", choices=["flat", "ivfpq", "hnsw", "auto"], default="flat")
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--nprobe", type=int, default=None)
    p.add_argument("--refine", dest="refine", action="store_true", default=None)
    p.add_argument("--no_refine", dest="refine", action="store_false")
    p.add_argument("--train_size", type=int, default=None)
    p.add_argument("--hnsw_m", type=int, default=32)
    p.add_argument("--ef_search", type=int, default=128)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--chunk", type=int, default=50_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--single", type=int, default=100, help="queries timed one by one")
    p.add_argument("--recall_queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--via_shards", action="store_true", help="write delg_v1 shards and time build_index on them")
    p.add_argument("--shards", type=int, default=10)
    p.add_argument("--out", help="append the JSON result to this file")
    args = p.parse_args(argv)
    result = run(args)
    line = json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()})
    print(line)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
