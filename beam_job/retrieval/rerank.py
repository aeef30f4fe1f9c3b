"""Re-ranking by local features: descriptor matching + affine RANSAC per (query, candidate) pair, then the
reference's final order (inliers, then global score, both descending).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .geometry import DEFAULT_MAX_TRIALS, DEFAULT_RESIDUAL_THRESHOLD, estimate_affine
from .matching import DELG_DISTANCE_THRESHOLD, match_descriptors
from .shards import LocalFeatures


@dataclass(frozen=True)
class RerankConfig:
    """Matching + RANSAC parameters (defaults: DELG's perform_retrieval.py with geometric verification)."""

    distance_threshold: float = DELG_DISTANCE_THRESHOLD
    ratio: float | None = None  # e.g. 0.8 for Lowe's ratio test instead of the plain threshold
    method: str = "opencv"  # or "reference" (skimage, DELG's exact procedure)
    residual_threshold: float = DEFAULT_RESIDUAL_THRESHOLD
    max_trials: int = DEFAULT_MAX_TRIALS
    confidence: float = 0.99
    seed: int = 0


@dataclass(frozen=True)
class PairVerification:
    """Result for one (query, candidate) pair.

    matches: (k, 2) int64 rows (query feature index, candidate feature index) of the putative matches.
    inlier_mask: (k,) bool. matrix: (2, 3) affine in (y, x) mapping candidate -> query locations, or None.
    """

    matches: np.ndarray
    inlier_mask: np.ndarray
    inliers: int
    matrix: np.ndarray | None

    @property
    def num_putative(self) -> int:
        return len(self.matches)


def verify_pair(
    query: LocalFeatures, candidate: LocalFeatures, config: RerankConfig = RerankConfig()
) -> PairVerification:
    """Match the query's descriptors to the candidate's, then fit candidate -> query affine with RANSAC."""
    qi, ci = match_descriptors(
        query.descriptors, candidate.descriptors, distance_threshold=config.distance_threshold, ratio=config.ratio
    )
    matches = np.stack([qi, ci], axis=1) if len(qi) else np.zeros((0, 2), np.int64)
    geo = estimate_affine(
        candidate.locations[ci],
        query.locations[qi],
        method=config.method,
        residual_threshold=config.residual_threshold,
        max_trials=config.max_trials,
        confidence=config.confidence,
        seed=config.seed,
    )
    return PairVerification(matches, geo.mask, geo.inliers, geo.matrix)


def final_order(inliers: np.ndarray, global_scores: np.ndarray) -> np.ndarray:
    """Indices sorting candidates by (inliers, global score) descending (stable for full ties)."""
    inliers = np.asarray(inliers)
    global_scores = np.asarray(global_scores, np.float64)
    return np.lexsort((-global_scores, -inliers)).astype(np.int64)


def rerank(
    query: LocalFeatures,
    candidates: Sequence[LocalFeatures | None],
    global_scores: np.ndarray,
    config: RerankConfig = RerankConfig(),
    num_to_rerank: int | None = None,
) -> tuple:
    """Verify the first `num_to_rerank` candidates (all when None; others get 0 inliers).

    candidates: local features per candidate in global-rank order (None: not available -> 0 inliers).
    Returns (inliers (c,) int64, order (c,) int64 indices into candidates by the final ranking).
    """
    c = len(candidates)
    limit = c if num_to_rerank is None else min(c, num_to_rerank)
    inliers = np.zeros(c, np.int64)
    for j in range(limit):
        candidate = candidates[j]
        if candidate is not None:
            inliers[j] = verify_pair(query, candidate, config).inliers
    return inliers, final_order(inliers, global_scores)


def to_local(locations: np.ndarray, descriptors: np.ndarray) -> LocalFeatures:
    """LocalFeatures from arrays: locations (N, 2) (y, x), descriptors (N, d); cast to float32."""
    return LocalFeatures(np.asarray(locations, np.float32).reshape(-1, 2), np.asarray(descriptors, np.float32))


__all__: list[str] = ["PairVerification", "RerankConfig", "final_order", "rerank", "to_local", "verify_pair"]
