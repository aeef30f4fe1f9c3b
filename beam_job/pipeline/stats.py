"""Mergeable per-stage statistics for the run summary: timing counts, sums, maxima and percentiles (p50/p95).

A timing entry is a dict {"count", "total", "max", "quantiles"}. "quantiles" is an accumulator of Beam's
ApproximateQuantilesCombineFn (apache_beam.transforms.stats: Manku, Rajagopalan and Lindsay's one-pass
algorithm) with QUANTILES = 101 points (0%, 1%, ..., 100%), so entries of row groups, shards and workers
merge through Beam's own merge_accumulators, in any order. A percentile is a sample, the nearest-rank one
(numpy's method="inverted_cdf"): exact while an entry holds at most 1908 samples (Beam's buffer size for
these settings), beyond that within 1% of the samples in rank (Beam's bound, 1 / QUANTILES). Until Beam's
combiner took over, a hand-written DDSketch gave numpy's linearly interpolated percentiles (within 0.5% in
value): p50/p95 of a run can differ from those by the gap between neighbouring samples.
Entries are picklable (Beam carries them between steps), not JSON: the summary stores describe()'s numbers.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from apache_beam.transforms.stats import ApproximateQuantilesCombineFn

from beam_job.layout import FEATURES

QUANTILES = 101  # 0%, 1%, ..., 100%: percentile q is point round(100 * q)
_QUANTILES_FN = ApproximateQuantilesCombineFn.create(num_quantiles=QUANTILES)


def new_timing() -> dict[str, Any]:
    return {"count": 0, "total": 0.0, "max": 0.0, "quantiles": _QUANTILES_FN.create_accumulator()}


def add_sample(entry: dict[str, Any], ms: float) -> None:
    ms = float(ms)
    entry["count"] += 1
    entry["total"] += ms
    entry["max"] = max(entry["max"], ms)
    entry["quantiles"] = _QUANTILES_FN.add_input(entry["quantiles"], ms)


def merge_into(entry: dict[str, Any], other: dict[str, Any]) -> None:
    entry["count"] += other["count"]
    entry["total"] += other["total"]
    entry["max"] = max(entry["max"], other["max"])
    entry["quantiles"] = _QUANTILES_FN.merge_accumulators([entry["quantiles"], other["quantiles"]])


def percentile(entry: dict[str, Any], q: float) -> float:
    """The q-quantile (0 <= q <= 1, in steps of 1%) of an entry's samples: the nearest-rank sample, exact up
    to 1908 samples, else within 1% in rank; 0.0 for an entry without samples."""
    points = _QUANTILES_FN.extract_output(entry["quantiles"])
    return float(points[round(q * (QUANTILES - 1))]) if points else 0.0


def describe(entry: dict[str, Any]) -> dict[str, float]:
    """{count, total_ms, mean_ms, p50_ms, p95_ms, max_ms} of a timing entry (rounded for the summary)."""
    count = entry["count"]
    return {
        "count": int(count),
        "total_ms": round(entry["total"], 3),
        "mean_ms": round(entry["total"] / count, 3) if count else 0.0,
        "p50_ms": round(percentile(entry, 0.5), 3),
        "p95_ms": round(percentile(entry, 0.95), 3),
        "max_ms": round(entry["max"], 3),
    }


class StageStats:
    """Per-stage timings and failure counts of a set of rows (one row group), as a dict via to_dict()."""

    def __init__(self) -> None:
        self.timings: dict[str, dict[str, Any]] = {}
        self.failures: Counter = Counter()  # "stage/error_type" -> count
        self.examples: dict[str, str] = {}  # "stage/error_type" -> first "path: message" seen
        self.keypoints = 0
        self.models: Counter = Counter()

    def add_time(self, stage: str, ms: float) -> None:
        add_sample(self.timings.setdefault(stage, new_timing()), ms)

    def add(self, kind: str, record: dict[str, Any], timings: dict[str, float]) -> None:
        for stage, ms in timings.items():
            self.add_time(stage, ms)
        if kind == FEATURES:
            self.keypoints += int(record["num_features"])
            self.models[record["model"]] += 1
        else:
            key = f"{record['stage']}/{record['error_type']}"
            self.failures[key] += 1
            self.examples.setdefault(key, f"{record['path']}: {record['message']}"[:300])

    def to_dict(self) -> dict[str, Any]:
        return {
            "timings": self.timings,
            "failures": dict(self.failures),
            "examples": self.examples,
            "keypoints": self.keypoints,
            "models": dict(self.models),
        }
