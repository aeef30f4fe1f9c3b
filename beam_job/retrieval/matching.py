"""Nearest-neighbour matching of local descriptors (DELG's distance threshold, or Lowe's ratio test).

Both descriptor sets are L2-normalised rows, so squared L2 distance = 2 - 2 * dot. DELG's reference
matches every query descriptor to its nearest index descriptor and keeps it when the L2 distance is
below 1.0 (i.e. dot > 0.5); its ratio mode (`use_ratio_test`) keeps a match when d1 < ratio * d2 (L2
distances) and applies no distance threshold.
"""

from __future__ import annotations

import numpy as np

DELG_DISTANCE_THRESHOLD = 1.0


def _as_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32)


def match_descriptors(
    query: np.ndarray,
    index: np.ndarray,
    *,
    distance_threshold: float = DELG_DISTANCE_THRESHOLD,
    ratio: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Putative matches from query descriptors (n, d) to index descriptors (m, d).

    Threshold mode (ratio=None): each query row's nearest index row (one matrix product), kept when the
    L2 distance is strictly below `distance_threshold`. Ratio mode: 2 nearest neighbours with faiss.knn,
    kept when d1 < ratio * d2, with no distance threshold (as the reference's ratio test); with a single
    index row the second distance is infinite, so every nearest neighbour is kept.
    Returns (query_idx (k,) int64, index_idx (k,) int64), ordered by query row.
    """
    query, index = _as_f32(query), _as_f32(index)
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if query.ndim != 2 or index.ndim != 2 or (query.size and index.size and query.shape[1] != index.shape[1]):
        raise ValueError(f"descriptor arrays must be (n, d) with the same d, got {query.shape} and {index.shape}")
    if len(query) == 0 or len(index) == 0:
        return empty
    if ratio is None:
        sims = query @ index.T  # (n, m)
        best = np.argmax(sims, axis=1)
        best_sim = sims[np.arange(len(query)), best]
        dist = np.sqrt(np.maximum(2.0 - 2.0 * best_sim, 0.0))
        keep = dist < distance_threshold
        return np.flatnonzero(keep).astype(np.int64), best[keep].astype(np.int64)
    if len(index) < 2:  # no second neighbour: d2 = inf, every match passes the ratio test
        best = np.argmax(query @ index.T, axis=1)
        return np.arange(len(query), dtype=np.int64), best.astype(np.int64)
    import faiss

    d2, nn = faiss.knn(query, index, 2)  # squared L2, ascending
    d = np.sqrt(np.maximum(d2, 0.0))
    keep = d[:, 0] < ratio * d[:, 1]
    return np.flatnonzero(keep).astype(np.int64), nn[keep, 0].astype(np.int64)
