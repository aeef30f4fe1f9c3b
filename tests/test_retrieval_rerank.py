"""Local-feature re-ranking: descriptor matching, affine RANSAC (OpenCV and the skimage reference), final order."""

import numpy as np
import pytest

from beam_job.retrieval import geometry, matching, rerank, synthetic


def _pair(seed=0, n=1000, inlier_fraction=0.5, **kw):
    p = synthetic.affine_pair(np.random.default_rng(seed), n, inlier_fraction, **kw)
    candidate = rerank.to_local(p.loc_a, p.desc_a)  # image A in the index
    query = rerank.to_local(p.loc_b, p.desc_b)  # its warped copy B is the query
    return p, query, candidate


def test_threshold_matching_equals_the_reference_kdtree():
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    index = synthetic.unit_rows(rng, 400, 128)
    noise = rng.standard_normal((300, 128), dtype=np.float32) * rng.uniform(0.02, 0.3, (300, 1)).astype(np.float32)
    query = index[:300] + noise
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    qi, ii = matching.match_descriptors(query, index, distance_threshold=1.0)
    _dist, nn = cKDTree(index).query(query, distance_upper_bound=1.0, workers=1)
    ref_q = np.flatnonzero(nn < len(index))
    assert 50 < len(ref_q) < 300  # the threshold really cuts
    np.testing.assert_array_equal(qi, ref_q)
    np.testing.assert_array_equal(ii, nn[ref_q])


def test_ratio_test_keeps_only_distinctive_matches():
    rng = np.random.default_rng(1)
    index = synthetic.unit_rows(rng, 50, 128)
    index[1] = index[0] + 0.01 * rng.standard_normal(128).astype(np.float32)  # near-duplicate of row 0
    index[1] /= np.linalg.norm(index[1])
    between = index[0] + index[1]
    query = np.stack([between / np.linalg.norm(between), index[7]])
    qi, ii = matching.match_descriptors(query, index, ratio=0.8, distance_threshold=np.inf)
    assert qi.tolist() == [1] and ii.tolist() == [7]  # row 0 is ambiguous (two almost equal neighbours)
    qi, ii = matching.match_descriptors(query, index)  # plain threshold keeps both
    assert qi.tolist() == [0, 1] and ii.tolist() == [0, 7]
    empty = matching.match_descriptors(np.zeros((0, 128)), index)
    assert empty[0].shape == (0,)
    with pytest.raises(ValueError, match="same d"):
        matching.match_descriptors(np.zeros((2, 64)), index)


@pytest.mark.parametrize("method,n", [("opencv", 1000), ("reference", 300)])
def test_known_affine_warp_is_recovered_with_most_inliers(method, n):
    p, query, candidate = _pair(seed=2, n=n, inlier_fraction=0.5)
    v = rerank.verify_pair(query, candidate, rerank.RerankConfig(method=method))
    true = (v.matches[:, 0] == v.matches[:, 1]) & (v.matches[:, 0] < p.num_true)
    assert true.sum() >= 0.95 * p.num_true  # descriptor matching found the true correspondences
    assert v.inliers >= 0.95 * p.num_true and v.inlier_mask[true].mean() >= 0.98
    assert v.inliers <= p.num_true + 3  # outliers are not accepted
    np.testing.assert_allclose(v.matrix[:, :2], p.matrix[:, :2], atol=0.01)
    np.testing.assert_allclose(v.matrix[:, 2], p.matrix[:, 2], atol=1.5)


@pytest.mark.parametrize("method", ["opencv", "reference"])
def test_unrelated_pair_gets_few_inliers(method):
    rng = np.random.default_rng(3)
    n = 300
    desc = synthetic.unit_rows(rng, n, 128)
    # descriptors match one to one, but the locations are unrelated: geometry must reject them
    query = rerank.to_local(rng.random((n, 2)) * [768, 1024], desc)
    candidate = rerank.to_local(rng.random((n, 2)) * [768, 1024], desc)
    v = rerank.verify_pair(query, candidate, rerank.RerankConfig(method=method))
    assert v.num_putative == n
    assert v.inliers < 15
    # and random descriptors give no putative matches at all with DELG's threshold
    other = rerank.to_local(rng.random((n, 2)) * [768, 1024], synthetic.unit_rows(rng, n, 128))
    assert rerank.verify_pair(query, other).inliers == 0


def test_three_or_fewer_putative_matches_score_zero():
    src = np.array([[0, 0], [10, 0], [0, 10]], np.float64)
    for method in geometry.METHODS:
        r = geometry.estimate_affine(src, src + 5, method=method)
        assert r.inliers == 0 and r.matrix is None and r.mask.shape == (3,)
    r = geometry.estimate_affine(np.vstack([src, [[10, 10]]]), np.vstack([src, [[10, 10]]]) + 5)
    assert r.inliers == 4
    np.testing.assert_allclose(r.matrix, [[1, 0, 5], [0, 1, 5]], atol=1e-6)
    with pytest.raises(ValueError, match="RANSAC method"):
        geometry.estimate_affine(src, src, method="lmeds")


def test_matrix_is_in_yx_convention():
    """A pure shift of +7 rows (y) and -3 columns (x) must come back as t = (7, -3) in (y, x) order."""
    rng = np.random.default_rng(4)
    src = rng.random((50, 2)) * 500
    dst = src * [1.0, 0.5] + [7.0, -3.0]  # y' = y + 7, x' = 0.5 x - 3
    for method in geometry.METHODS:
        r = geometry.estimate_affine(src, dst, method=method)
        np.testing.assert_allclose(r.matrix, [[1, 0, 7], [0, 0.5, -3]], atol=2e-3)
    np.testing.assert_allclose(geometry.swap_matrix_xy_yx([[1, 2, 3], [4, 5, 6]]), [[5, 4, 6], [2, 1, 3]])


def test_final_order_is_inliers_then_global_score():
    inliers = np.array([0, 40, 0, 40, 7])
    scores = np.array([0.9, 0.5, 0.8, 0.6, 0.1])
    assert rerank.final_order(inliers, scores).tolist() == [3, 1, 4, 0, 2]
    # rerank(): only the first num_to_rerank candidates are verified
    _p, query, candidate = _pair(seed=5, n=200)
    cands = [None, candidate, candidate]
    inl, order = rerank.rerank(query, cands, np.array([0.9, 0.8, 0.7]), num_to_rerank=2)
    assert inl[0] == 0 and inl[1] > 80 and inl[2] == 0
    assert order.tolist() == [1, 0, 2]


def test_opencv_and_reference_agree_on_inlier_counts():
    p, query, candidate = _pair(seed=6, n=300, inlier_fraction=0.3)
    a = rerank.verify_pair(query, candidate, rerank.RerankConfig(method="opencv")).inliers
    b = rerank.verify_pair(query, candidate, rerank.RerankConfig(method="reference")).inliers
    assert abs(a - b) <= 3 and a >= 0.95 * p.num_true


def _sift(gray):
    import cv2

    sift = cv2.SIFT_create(nfeatures=1000)
    kps, desc = sift.detectAndCompute(gray, None)
    desc = desc / np.linalg.norm(desc, axis=1, keepdims=True)
    return rerank.to_local(np.array([[k.pt[1], k.pt[0]] for k in kps]), desc)  # (x, y) -> (y, x)


def test_sift_features_on_a_real_photo_recover_a_known_warp():
    """OpenCV SIFT on scikit-image's astronaut and an affine-warped copy, as a realistic stand-in for DELG."""
    import cv2
    from skimage import color, data

    gray = (color.rgb2gray(data.astronaut()) * 255).astype(np.uint8)
    matrix_yx = synthetic.affine_yx(angle_deg=10, scale=0.9, shear=0.0, ty=20, tx=40)
    matrix_xy = geometry.swap_matrix_xy_yx(matrix_yx)
    warped = cv2.warpAffine(gray, matrix_xy, (gray.shape[1], gray.shape[0]))
    a, b = _sift(gray), _sift(warped)
    config = rerank.RerankConfig(ratio=0.8, distance_threshold=np.inf)
    v = rerank.verify_pair(b, a, config)  # candidate a -> query b
    assert v.inliers >= 100
    np.testing.assert_allclose(v.matrix[:, :2], matrix_yx[:, :2], atol=0.01)
    np.testing.assert_allclose(v.matrix[:, 2], matrix_yx[:, 2], atol=2.0)
    unrelated = _sift((color.rgb2gray(data.coffee()) * 255).astype(np.uint8))
    u = rerank.verify_pair(b, unrelated, config)
    assert u.inliers < 0.1 * v.inliers


def _degenerate_pair(seed=61):
    """Putative matches whose index-side points sit on two spots only (many query features matched to the
    same two candidate keypoints). skimage 0.26 finds inliers from 3-point samples, but its final refit on all
    inliers fails and comes back as a (falsy) FailedEstimation next to the inlier mask."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(4, 30))
    nd = int(rng.integers(1, 4))
    base = rng.random((nd, 2)) * 200
    src = base[rng.integers(0, nd, k)] + rng.normal(0, 1e-6, (k, 2))
    dst = rng.random((1, 2)) * 200 + rng.normal(0, 5, (k, 2))
    return src, dst


def test_reference_ransac_scores_the_inlier_mask_when_the_final_refit_fails():
    from skimage.measure import ransac
    from skimage.transform import AffineTransform

    src, dst = _degenerate_pair()
    model, mask = ransac((src, dst), AffineTransform, min_samples=3, residual_threshold=20.0, max_trials=1000, rng=0)
    assert mask is not None and mask.sum() == len(src) and not model  # the failure mode is really hit
    r = geometry.estimate_affine(src, dst, method="reference")
    assert r.inliers == int(mask.sum()) and r.matrix is None  # scored like the reference, no crash
    np.testing.assert_array_equal(r.mask, mask)


def test_ratio_mode_applies_no_distance_threshold_like_the_reference():
    """The reference's ratio test keeps d1 < ratio * d2 from a 2-NN KD-tree query and nothing else."""
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(5)
    index = synthetic.unit_rows(rng, 200, 128)
    query = synthetic.unit_rows(rng, 150, 128)
    query[:50] = index[:50] + 0.05 * rng.standard_normal((50, 128)).astype(np.float32)  # close: d1 ~ 0.6
    query[50:100] = 0.45 * index[50:100] + 0.9 * query[50:100]  # distinctive but far: d1 ~ 1.1, d2 ~ 1.4
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    dist, nn = cKDTree(index).query(query, k=2, workers=1)
    ref = np.flatnonzero(dist[:, 0] < 0.9 * dist[:, 1])
    assert (dist[ref, 0] >= 1.0).sum() >= 10  # matches beyond the 1.0 threshold are part of the reference's set
    qi, ii = matching.match_descriptors(query, index, ratio=0.9)
    np.testing.assert_array_equal(qi, ref)
    np.testing.assert_array_equal(ii, nn[ref, 0])
    qi, ii = matching.match_descriptors(query[:3], index[:1], ratio=0.9)  # one index row: d2 = inf
    assert qi.tolist() == [0, 1, 2] and ii.tolist() == [0, 0, 0]
