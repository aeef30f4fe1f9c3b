"""Geometric verification of putative matches with an affine RANSAC (OpenCV USAC, or DELG's skimage reference).

Coordinates are (y, x) = (row, column) pixels, as stored in the shards. The fitted model maps the
*index* image's locations to the *query* image's (the reference's direction): q = A @ i + t, returned as
a (2, 3) matrix [A | t] acting on (y, x) column vectors. OpenCV works in (x, y), so points are swapped on
the way in and the matrix is converted back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("opencv", "reference")
MIN_PUTATIVE = 4  # the reference scores 0 when there are <= 3 putative matches
DEFAULT_RESIDUAL_THRESHOLD = 20.0
DEFAULT_MAX_TRIALS = 1000


@dataclass(frozen=True)
class GeometryResult:
    """inliers: count. mask: (k,) bool over the putative matches. matrix: (2, 3) float64 in (y, x), or None."""

    inliers: int
    mask: np.ndarray
    matrix: np.ndarray | None


def _no_model(k: int) -> GeometryResult:
    return GeometryResult(0, np.zeros(k, bool), None)


def swap_matrix_xy_yx(matrix: np.ndarray) -> np.ndarray:
    """Convert a (2, 3) affine matrix between (x, y) and (y, x) conventions (its own inverse)."""
    m = np.asarray(matrix, np.float64)
    perm = [1, 0]
    out = np.empty((2, 3))
    out[:, :2] = m[np.ix_(perm, perm)]
    out[:, 2] = m[perm, 2]
    return out


def estimate_affine(
    src_yx: np.ndarray,
    dst_yx: np.ndarray,
    *,
    method: str = "opencv",
    residual_threshold: float = DEFAULT_RESIDUAL_THRESHOLD,
    max_trials: int = DEFAULT_MAX_TRIALS,
    confidence: float = 0.99,
    seed: int = 0,
) -> GeometryResult:
    """Robustly fit dst = A @ src + t to k putative correspondences src_yx, dst_yx (k, 2) in (y, x).

    method "opencv": cv2.estimateAffine2D with USAC_MAGSAC, ransacReprojThreshold=residual_threshold,
      maxIters=max_trials, confidence (deterministic; ~1 ms for 1000 matches).
    method "reference": skimage.measure.ransac with AffineTransform, min_samples=3, the same threshold,
      max_trials, rng=seed, as DELG's image_reranking.py (~100x-1000x slower).
    Fewer than 4 putative matches give 0 inliers, as in the reference.
    """
    if method not in METHODS:
        raise ValueError(f"RANSAC method must be one of {METHODS}, got {method!r}")
    src = np.asarray(src_yx, np.float64).reshape(-1, 2)
    dst = np.asarray(dst_yx, np.float64).reshape(-1, 2)
    if len(src) != len(dst):
        raise ValueError(f"src and dst must have the same number of points, got {len(src)} and {len(dst)}")
    k = len(src)
    if k < MIN_PUTATIVE:
        return _no_model(k)
    if method == "opencv":
        import cv2

        matrix_xy, mask = cv2.estimateAffine2D(
            np.ascontiguousarray(src[:, ::-1], np.float32).reshape(-1, 1, 2),
            np.ascontiguousarray(dst[:, ::-1], np.float32).reshape(-1, 1, 2),
            method=cv2.USAC_MAGSAC,
            ransacReprojThreshold=float(residual_threshold),
            maxIters=int(max_trials),
            confidence=float(confidence),
        )
        if matrix_xy is None or mask is None:
            return _no_model(k)
        inlier_mask = mask.reshape(-1).astype(bool)
        return GeometryResult(int(inlier_mask.sum()), inlier_mask, swap_matrix_xy_yx(matrix_xy))

    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    try:
        model, inlier_mask = ransac(
            (src, dst),
            AffineTransform,
            min_samples=3,
            residual_threshold=float(residual_threshold),
            max_trials=int(max_trials),
            rng=seed,
        )
    except (ValueError, np.linalg.LinAlgError):
        return _no_model(k)
    if inlier_mask is None:
        return _no_model(k)
    inlier_mask = np.asarray(inlier_mask, bool)
    # scikit-image >= 0.26 returns a FailedEstimation (falsy) when the final refit on all inliers fails,
    # together with the inlier mask of the best sample; the reference scores the mask, so do we.
    matrix = np.asarray(model.params[:2], np.float64) if model else None
    return GeometryResult(int(inlier_mask.sum()), inlier_mask, matrix)
