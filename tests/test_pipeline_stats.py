"""Run-summary statistics: mergeable timing entries (Beam's ApproximateQuantilesCombineFn for p50/p95) give
count/mean/max exactly, nearest-rank percentiles exactly for small runs and within 1% in rank beyond."""

import pickle

import numpy as np

from beam_job.pipeline.stats import StageStats, add_sample, describe, merge_into, new_timing


def _merged(samples, parts):
    entries = [new_timing() for _ in range(parts)]
    for i, ms in enumerate(samples):
        add_sample(entries[i % parts], float(ms))
    merged = new_timing()
    for entry in entries:  # pickled, as Beam carries them from the writers to the summary
        merge_into(merged, pickle.loads(pickle.dumps(entry)))
    return merged


def _rank_error(samples, value, q):
    """How far `value`'s rank among the samples is from q's, as a fraction of the samples (0 when it is q's)."""
    ordered = np.sort(samples)
    low, high = np.searchsorted(ordered, value, side="left"), np.searchsorted(ordered, value, side="right")
    return max(low - q * len(ordered), q * len(ordered) - high, 0) / len(ordered)


def test_small_runs_report_the_exact_nearest_rank_percentiles():
    rng = np.random.default_rng(0)
    for samples in (
        [5712.0, 5650.5, 5801.25, 5590.0, 6020.0, 5700.0, 5688.0, 5740.0, 5655.0, 5910.0, 5600.0, 5777.0],
        rng.normal(5700.0, 150.0, size=500),  # inference of a 7-scale R50: about 5.7 s each, 2.6% spread
        np.concatenate([np.zeros(30), rng.uniform(0.01, 0.5, 300)]),  # sub-millisecond stages, zeros included
    ):
        samples = np.asarray(samples)
        d = describe(_merged(samples, parts=3))
        assert d["count"] == len(samples)
        assert abs(d["mean_ms"] - samples.mean()) < 1e-3 and d["max_ms"] == round(float(samples.max()), 3)
        for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms")):
            assert d[key] == round(float(np.quantile(samples, q, method="inverted_cdf")), 3), (key, d[key])


def test_large_runs_are_within_one_percent_in_rank():
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=3.0, sigma=1.0, size=20000)  # ms, spread over decades; beyond Beam's buffers
    for parts in (3, 7):
        d = describe(_merged(samples, parts=parts))
        assert d["count"] == len(samples) and abs(d["total_ms"] - samples.sum()) < 1e-2
        for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms")):
            assert _rank_error(samples, d[key], q) <= 0.01, (key, d[key])


def test_merge_order_does_not_change_small_runs():
    rng = np.random.default_rng(2)
    samples = rng.lognormal(mean=2.0, sigma=0.5, size=300)
    one, two = describe(_merged(samples, parts=4)), describe(_merged(samples[::-1], parts=7))
    assert one == two


def test_stage_stats_count_failures_keypoints_and_models():
    s = StageStats()
    s.add("features", {"num_features": 5, "model": "m1"}, {"read": 1.0, "inference": 10.0})
    s.add("features", {"num_features": 3, "model": "m1"}, {"read": 2.0, "inference": 30.0})
    s.add("failures", {"stage": "decode", "error_type": "ImageDecodeError", "path": "/a", "message": "bad"},
          {"read": 1.0})
    d = s.to_dict()
    assert d["keypoints"] == 8 and d["models"] == {"m1": 2}
    assert d["failures"] == {"decode/ImageDecodeError": 1} and d["examples"]["decode/ImageDecodeError"] == "/a: bad"
    assert describe(d["timings"]["inference"])["mean_ms"] == 20.0 and d["timings"]["read"]["count"] == 3
    assert describe(d["timings"]["inference"])["p50_ms"] == 10.0  # nearest rank of two samples: the first
    assert describe(new_timing()) == {"count": 0, "total_ms": 0.0, "mean_ms": 0.0, "p50_ms": 0.0, "p95_ms": 0.0,
                                      "max_ms": 0.0}
