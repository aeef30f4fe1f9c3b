"""Run-summary statistics: mergeable timing entries give count/mean/max exactly and p50/p95 within a bucket."""

import numpy as np

from beam_job.pipeline.stats import StageStats, add_sample, describe, merge_into, new_timing


def test_percentiles_of_merged_entries_are_within_one_bucket():
    rng = np.random.default_rng(0)
    samples = rng.lognormal(mean=3.0, sigma=1.0, size=2000)  # ms, spread over decades
    a, b = new_timing(), new_timing()
    for i, ms in enumerate(samples):
        add_sample(a if i % 3 else b, float(ms))
    merged = new_timing()
    merge_into(merged, a)
    merge_into(merged, b)
    d = describe(merged)
    assert d["count"] == 2000
    assert abs(d["mean_ms"] - samples.mean()) < 1e-3 and abs(d["max_ms"] - samples.max()) < 1e-3
    for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms")):
        exact = float(np.quantile(samples, q))
        assert exact <= d[key] * 1.001 and d[key] <= exact * 2 ** 0.25 * 1.01  # one quarter-octave bucket


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
    assert describe(new_timing())["p95_ms"] == 0.0
