"""Run-summary statistics: mergeable timing entries give count/mean/max exactly and p50/p95 within 0.5%."""

import json

import numpy as np

from beam_job.pipeline.stats import ALPHA, EXACT_SAMPLES, StageStats, add_sample, describe, merge_into, new_timing


def _merged(samples, parts):
    entries = [new_timing() for _ in range(parts)]
    for i, ms in enumerate(samples):
        add_sample(entries[i % parts], float(ms))
    merged = new_timing()
    for entry in entries:  # through JSON, as shard metadata carries them
        merge_into(merged, json.loads(json.dumps(entry)))
    return merged


def test_percentiles_of_merged_entries_are_within_half_a_percent_of_the_exact_ones():
    rng = np.random.default_rng(0)
    for samples in (
        rng.lognormal(mean=3.0, sigma=1.0, size=2000),  # ms, spread over decades
        rng.normal(5700.0, 150.0, size=500),  # inference of a 7-scale R50: about 5.7 s each, 2.6% spread
        np.concatenate([np.zeros(30), rng.uniform(0.01, 0.5, 300)]),  # sub-millisecond stages, zeros included
    ):
        d = describe(_merged(samples, parts=3))
        assert d["count"] == len(samples)
        assert abs(d["mean_ms"] - samples.mean()) < 1e-3 and abs(d["max_ms"] - samples.max()) < 1e-3
        for q, key in ((0.5, "p50_ms"), (0.95, "p95_ms")):
            exact = float(np.quantile(samples, q))
            assert abs(d[key] - exact) <= ALPHA * exact + 1e-3, (key, d[key], exact)


def test_small_runs_report_exact_percentiles():
    samples = [5712.0, 5650.5, 5801.25, 5590.0, 6020.0, 5700.0, 5688.0, 5740.0, 5655.0, 5910.0, 5600.0, 5777.0]
    d = describe(_merged(samples, parts=2))
    assert d["p50_ms"] == round(float(np.quantile(samples, 0.5)), 3)
    assert d["p95_ms"] == round(float(np.quantile(samples, 0.95)), 3)
    assert len(samples) <= EXACT_SAMPLES


def test_merge_is_order_independent():
    rng = np.random.default_rng(1)
    samples = rng.lognormal(mean=2.0, sigma=0.5, size=300)
    one, two = _merged(samples, parts=4), _merged(samples[::-1], parts=7)
    assert describe(one)["p50_ms"] == describe(two)["p50_ms"] and describe(one)["p95_ms"] == describe(two)["p95_ms"]


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
