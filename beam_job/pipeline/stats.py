"""Mergeable per-stage statistics for the run summary: timing sums, maxima and log-scale histograms (p50/p95).

A timing entry is a JSON-friendly dict {"count", "total", "max", "hist"}; "hist" counts samples in
quarter-octave buckets (bucket b covers up to 0.1 ms * 2**(b/4), about 19% wide), so percentiles from merged
entries are exact to within one bucket.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict

_BASE_MS = 0.1
_PER_OCTAVE = 4
_MAX_BUCKET = 4 * 40  # 0.1 ms * 2**40: far beyond any stage time


def new_timing() -> Dict[str, Any]:
    return {"count": 0, "total": 0.0, "max": 0.0, "hist": {}}


def _bucket(ms: float) -> int:
    if ms <= _BASE_MS:
        return 0
    return min(_MAX_BUCKET, int(math.ceil(_PER_OCTAVE * math.log2(ms / _BASE_MS))))


def _upper_edge(bucket: int) -> float:
    return _BASE_MS * 2.0 ** (bucket / _PER_OCTAVE)


def add_sample(entry: Dict[str, Any], ms: float) -> None:
    entry["count"] += 1
    entry["total"] += ms
    entry["max"] = max(entry["max"], ms)
    key = str(_bucket(ms))
    entry["hist"][key] = entry["hist"].get(key, 0) + 1


def merge_into(entry: Dict[str, Any], other: Dict[str, Any]) -> None:
    entry["count"] += other["count"]
    entry["total"] += other["total"]
    entry["max"] = max(entry["max"], other["max"])
    for key, n in other["hist"].items():
        entry["hist"][key] = entry["hist"].get(key, 0) + n


def percentile(entry: Dict[str, Any], q: float) -> float:
    """Upper edge of the bucket holding the q-quantile (0 < q <= 1), capped at the observed maximum."""
    if not entry["count"]:
        return 0.0
    target = q * entry["count"]
    seen = 0
    for bucket in sorted(int(k) for k in entry["hist"]):
        seen += entry["hist"][str(bucket)]
        if seen >= target:
            return min(_upper_edge(bucket), entry["max"])
    return entry["max"]


def describe(entry: Dict[str, Any]) -> Dict[str, float]:
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
    """Per-stage timings and failure counts of a set of rows (one shard), JSON-friendly via to_dict()."""

    def __init__(self) -> None:
        self.timings: Dict[str, Dict[str, Any]] = {}
        self.failures: Counter = Counter()  # "stage/error_type" -> count
        self.examples: Dict[str, str] = {}  # "stage/error_type" -> first "path: message" seen
        self.keypoints = 0
        self.models: Counter = Counter()

    def add_time(self, stage: str, ms: float) -> None:
        add_sample(self.timings.setdefault(stage, new_timing()), ms)

    def add(self, kind: str, record: Dict[str, Any], timings: Dict[str, float]) -> None:
        for stage, ms in timings.items():
            self.add_time(stage, ms)
        if kind == "features":
            self.keypoints += int(record["num_features"])
            self.models[record["model"]] += 1
        else:
            key = f"{record['stage']}/{record['error_type']}"
            self.failures[key] += 1
            self.examples.setdefault(key, f"{record['path']}: {record['message']}"[:300])

    def to_dict(self) -> Dict[str, Any]:
        return {
            "timings": self.timings,
            "failures": dict(self.failures),
            "examples": self.examples,
            "keypoints": self.keypoints,
            "models": dict(self.models),
        }
