"""Benchmark: local re-ranking cost per (query, candidate) pair at 1000 features each.

Times, per pair: descriptor matching (numpy matmul with DELG's threshold; faiss.knn ratio test), RANSAC
(OpenCV USAC_MAGSAC affine vs the DELG reference skimage affine RANSAC), the whole verify_pair, and fetching
a candidate's local features from delg_v1 shards (LocalFeatureReader, 100 candidates over 10 shards).
Synthetic pairs: a known affine warp with 50 %, 20 %, 5 % and 0 % true correspondences.

    python benchmarks/bench_rerank.py [--features 1000] [--repeats 20] [--reference_repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

# Per-pair cost on one core (re-ranking parallelises over pairs, not inside one): pin BLAS before numpy loads.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from beam_job.retrieval import geometry, matching, rerank, shards, synthetic  # noqa: E402
from beam_job.retrieval import index as ix  # noqa: E402


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * float(np.median(times))


def make_pair(rng, n: int, fraction: float):
    """Query and candidate with n features each; every descriptor has a match (so there are n putative
    matches), but only the first fraction * n sit at affine-warped locations: the rest are outliers."""
    p = synthetic.affine_pair(rng, n, 1.0)
    n_true = int(round(fraction * n))
    loc_b = p.loc_b.copy()
    loc_b[n_true:] = rng.random((n - n_true, 2)) * [768, 1024]
    return rerank.to_local(loc_b, p.desc_b), rerank.to_local(p.loc_a, p.desc_a), n_true


def bench_pairs(args) -> list:
    out = []
    for fraction in (0.5, 0.2, 0.05, 0.0):
        query, cand, n_true = make_pair(np.random.default_rng(1), args.features, fraction)
        qi, ci = matching.match_descriptors(query.descriptors, cand.descriptors)
        row = {"true_fraction": fraction, "putative": len(qi), "true_inliers": n_true}
        # Every lambda is timed at once, within its iteration: the defaults only bind the names (bugbear B023).
        q_desc, c_desc = query.descriptors, cand.descriptors
        row["match_numpy_ms"] = median_ms(lambda q=q_desc, c=c_desc: matching.match_descriptors(q, c), args.repeats)
        row["match_ratio_faiss_ms"] = median_ms(
            lambda q=q_desc, c=c_desc: matching.match_descriptors(q, c, ratio=0.8), args.repeats)
        src, dst = cand.locations[ci], query.locations[qi]
        for method, reps in (("opencv", args.repeats), ("reference", args.reference_repeats)):
            res = geometry.estimate_affine(src, dst, method=method)
            row[f"ransac_{method}_ms"] = median_ms(
                lambda s=src, d=dst, m=method: geometry.estimate_affine(s, d, method=m), reps)
            row[f"inliers_{method}"] = res.inliers
        for method in ("opencv", "reference"):
            reps = args.repeats if method == "opencv" else args.reference_repeats
            config = rerank.RerankConfig(method=method)
            row[f"verify_pair_{method}_ms"] = median_ms(
                lambda q=query, c=cand, cfg=config: rerank.verify_pair(q, c, cfg), reps)
        out.append(row)
    return out


def bench_fetch(args) -> dict:
    """Local-feature fetch from Parquet: 100 random candidates spread over 10 shards of 100 images."""
    rng = np.random.default_rng(3)
    tmp = tempfile.mkdtemp(prefix="bench-rerank-")
    try:
        vecs = synthetic.unit_rows(rng, 1000, 2048)
        synthetic.write_global_shards(tmp, vecs, 10, rng=rng, local_features=args.features, row_group_size=16)
        ix.build_index(tmp, os.path.join(tmp, "index"))
        index = ix.RetrievalIndex.load(os.path.join(tmp, "index"))
        picks = rng.choice(len(index), 100, replace=False)
        refs = [index.ref(int(p)) for p in picks]
        t = time.perf_counter()
        records = shards.LocalFeatureReader().read(refs)
        cold = time.perf_counter() - t
        assert all(r.local.num_features == args.features for r in records)
        reader = shards.LocalFeatureReader()
        reader.read(refs[:1])
        t = time.perf_counter()
        reader.read(refs)
        warm = time.perf_counter() - t
        size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp) if f.endswith(".parquet"))
        return {"candidates": 100, "shards": 10, "rows_per_row_group": 16, "shard_mb_total": size / 2**20,
                "fetch_100_cold_ms": 1000 * cold, "fetch_100_open_files_ms": 1000 * warm,
                "fetch_per_candidate_ms": 1000 * warm / 100}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--features", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--reference_repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="OpenCV / faiss / BLAS threads")
    p.add_argument("--out", help="append the JSON result to this file")
    args = p.parse_args(argv)
    import cv2
    import faiss

    cv2.setNumThreads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    result = {"features": args.features, "threads": args.threads, "pairs": bench_pairs(args),
              "fetch": bench_fetch(args)}
    text = json.dumps(result, indent=1, default=lambda v: round(v, 3))
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
