"""Mergeable per-stage statistics for the run summary: timing sums, maxima and quantile sketches (p50/p95).

A timing entry is a JSON-friendly dict {"count", "total", "max", "values", "sketch"}. Up to EXACT_SAMPLES
samples are kept as they are ("values"), so small runs report exact percentiles (numpy's default linear
interpolation between order statistics). Beyond that the samples move into "sketch": a DDSketch-style
histogram (Masson et al., VLDB 2019) whose bucket i holds the samples in (GAMMA**(i-1), GAMMA**i] ms with
GAMMA = (1 + ALPHA) / (1 - ALPHA), so every bucket is represented by a value within ALPHA = 0.5% of each of
its samples. Entries merge by adding counts per bucket, in any order (shards, workers), with the same result.
Hand-written (about 60 lines) rather than the `ddsketch` package, which is not installed, and whose protobuf
form is not JSON; the definition is the same.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any, Dict, List, Tuple

from beam_job.layout import FEATURES

ALPHA = 0.005  # relative accuracy of a bucket's representative value
GAMMA = (1.0 + ALPHA) / (1.0 - ALPHA)
_LOG_GAMMA = math.log(GAMMA)
EXACT_SAMPLES = 64  # samples kept exactly before an entry switches to the sketch
_MIN_MS = 1e-6  # samples at or below this (e.g. 0.0) count in bucket "z", represented by 0.0


def new_timing() -> Dict[str, Any]:
    return {"count": 0, "total": 0.0, "max": 0.0, "values": [], "sketch": {}}


def _key(ms: float) -> str:
    return "z" if ms <= _MIN_MS else str(int(math.ceil(math.log(ms) / _LOG_GAMMA)))


def _value(key: str) -> float:
    """The representative of a bucket: within ALPHA of every sample in it."""
    if key == "z":
        return 0.0
    return 2.0 * GAMMA ** int(key) / (GAMMA + 1.0)


def _to_sketch(entry: Dict[str, Any], values: List[float]) -> None:
    sketch = entry.setdefault("sketch", {})
    for ms in values:
        key = _key(ms)
        sketch[key] = sketch.get(key, 0) + 1


def _settle(entry: Dict[str, Any]) -> None:
    """Move the exact samples into the sketch once there are too many (or once the entry has a sketch)."""
    if entry["values"] and (entry.get("sketch") or len(entry["values"]) > EXACT_SAMPLES):
        _to_sketch(entry, entry["values"])
        entry["values"] = []


def add_sample(entry: Dict[str, Any], ms: float) -> None:
    ms = float(ms)
    entry["count"] += 1
    entry["total"] += ms
    entry["max"] = max(entry["max"], ms)
    entry.setdefault("values", []).append(ms)
    _settle(entry)


def merge_into(entry: Dict[str, Any], other: Dict[str, Any]) -> None:
    entry["count"] += other["count"]
    entry["total"] += other["total"]
    entry["max"] = max(entry["max"], other["max"])
    entry.setdefault("values", []).extend(other.get("values", []))
    for key, n in other.get("sketch", {}).items():
        entry.setdefault("sketch", {})[key] = entry["sketch"].get(key, 0) + n
    # Entries written before the sketch (quarter-octave "hist" buckets, upper edge 0.1 ms * 2**(b/4)).
    for bucket, n in other.get("hist", {}).items():
        _to_sketch(entry, [0.1 * 2.0 ** (int(bucket) / 4.0)] * int(n))
    _settle(entry)


def _runs(entry: Dict[str, Any]) -> List[Tuple[float, int]]:
    """(value, count) runs of every sample (exact, or its bucket's representative), ascending."""
    runs = [(ms, 1) for ms in entry.get("values", [])]
    runs += [(_value(key), int(n)) for key, n in entry.get("sketch", {}).items()]
    return sorted(runs)


def _order_statistic(runs: List[Tuple[float, int]], index: int) -> float:
    seen = 0
    for value, n in runs:
        seen += n
        if seen > index:
            return value
    return runs[-1][0]


def percentile(entry: Dict[str, Any], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with numpy's default (linear) interpolation; exact up to EXACT_SAMPLES
    samples, else within ALPHA (relative) of it. Capped at the observed maximum."""
    runs = _runs(entry)
    total = sum(n for _, n in runs)
    if not total:
        return 0.0
    rank = q * (total - 1)
    low = int(math.floor(rank))
    low_value = _order_statistic(runs, low)
    high_value = _order_statistic(runs, min(low + 1, total - 1))
    return min(low_value + (high_value - low_value) * (rank - low), entry["max"])


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
        if kind == FEATURES:
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
