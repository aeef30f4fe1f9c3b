"""DelgExtractor: reference post-processing (checked against an independent numpy version), invariants, PCA, errors."""

import logging

import numpy as np
import pytest

from beam_job import imaging
from beam_job.config import PcaConfig, get_preset
from beam_job.delg import datum
from beam_job.delg.extractor import DelgExtractor

from helpers import cached_model, tiny_tf1, tiny_tf2

TINY = get_preset("tiny")  # 2 scales (0.707, 1.0), both global, max 64 features, threshold 0, max side 96


@pytest.fixture(scope="module")
def tf2_model(tmp_path_factory):
    return cached_model(tiny_tf2(tmp_path_factory))


@pytest.fixture(scope="module")
def tf1_model(tmp_path_factory):
    return cached_model(tiny_tf1(tmp_path_factory))


def _photo(h, w, seed=0):
    """A smooth-ish synthetic picture (gradients + blobs + noise), uint8 RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xx / max(w - 1, 1) * 255, yy / max(h - 1, 1) * 255, (xx + yy) % 64 * 4], axis=-1)
    img += rng.normal(0, 20, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _l2_rows(x):
    x = x.astype(np.float64)
    return x / np.sqrt(np.maximum((x * x).sum(axis=-1, keepdims=True), 1e-12))


def _pca(x, params):
    out = (x - params.mean.astype(np.float64)) @ params.matrix[: params.dim].astype(np.float64).T
    if params.use_whitening:
        out = out / np.sqrt(params.variances[: params.dim].astype(np.float64))
    return _l2_rows(out)


def numpy_reference(raw, scale_factors, config, global_pca=None, local_pca=None):
    """Independent re-implementation of the official extractor's post-processing (delg.md 3.1) in numpy."""
    rows = _l2_rows(raw["global_descriptors"])
    if global_pca is not None:
        rows = _pca(rows, global_pca)
    pooled = rows.sum(axis=0)
    global_descriptor = pooled / np.sqrt(max((pooled * pooled).sum(), 1e-12))
    boxes = raw["boxes"]
    centres = (boxes[:, 0:2] + boxes[:, 2:4]) / np.float32(2.0)  # float32, (y, x)
    if not config.use_resized_coordinates:
        # The reference divides a float32 tensor by the float64 numpy factors; TensorFlow casts them to float32.
        centres = centres / np.asarray(scale_factors, np.float64).astype(np.float32)
    descriptors = _l2_rows(raw["features"])
    if local_pca is not None:
        descriptors = _pca(descriptors, local_pca)
    return {
        "global": global_descriptor.astype(np.float32),
        "locations": centres.astype(np.float32),
        "descriptors": descriptors.astype(np.float32),
        "scales": raw["scales"],
        "attention": raw["scores"].reshape(-1),
    }


def _extract_with_raw(extractor, image):
    """extractor.extract(image) plus the raw outputs of the model call it made (TF CPU kernels with several
    threads are not bit-reproducible from call to call, so the reference must see the very same outputs)."""
    seen = []
    model = extractor.model
    real = model._call

    def spy(*args):
        out = real(*args)
        seen.append((args, {k: v.copy() for k, v in out.items()}))
        return out

    model._call = spy
    try:
        features = extractor.extract(image)
    finally:
        model._call = real
    assert len(seen) == 1  # one model call per image
    return features, seen[0][0], seen[0][1]


def _check_against_reference(features, raw, prepared, config, gpca=None, lpca=None):
    ref = numpy_reference(raw, prepared.scale_factors, config, gpca, lpca)
    assert features.global_descriptor.shape == ref["global"].shape
    np.testing.assert_allclose(features.global_descriptor, ref["global"], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(features.locations, ref["locations"])
    np.testing.assert_array_equal(features.scales, ref["scales"])
    np.testing.assert_array_equal(features.attention, ref["attention"])
    np.testing.assert_allclose(features.descriptors, ref["descriptors"], rtol=0, atol=1e-6)


def test_matches_numpy_reference_on_raw_outputs(tf2_model):
    extractor = DelgExtractor(TINY, tf2_model)
    image = _photo(150, 113, seed=1)  # longest side 150 > 96: resized to 96x72, factors (0.64, 0.637...)
    features, args, raw = _extract_with_raw(extractor, image)
    prepared = imaging.prepare_image(image, TINY)
    assert features.processed_hw == (96, 72) and features.original_hw == (150, 113)
    assert features.scale_factors == tuple(prepared.scale_factors)
    # The model got the resized image and the config's values, with the official dtypes.
    np.testing.assert_array_equal(args[0], prepared.image)
    np.testing.assert_array_equal(args[1], np.float32([0.70710677, 1.0]))
    assert args[2:4] == (TINY.max_feature_num, TINY.score_threshold) and list(args[4]) == [0, 1]
    assert features.num_features == raw["boxes"].shape[0] > 0
    _check_against_reference(features, raw, prepared, TINY)


def test_tf1_and_tf2_exports_give_the_same_features(tf2_model, tf1_model):
    image = _photo(90, 64, seed=2)
    a = DelgExtractor(TINY, tf2_model).extract(image)
    b = DelgExtractor(TINY, tf1_model).extract(image)
    np.testing.assert_allclose(a.global_descriptor, b.global_descriptor, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(a.locations, b.locations)
    np.testing.assert_array_equal(a.scales, b.scales)
    np.testing.assert_allclose(a.attention, b.attention, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.descriptors, b.descriptors, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw", [(10, 10), (33, 65), (96, 96), (97, 41), (200, 131), (47, 300)])
def test_invariants(tf2_model, hw):
    config = TINY.replace(max_feature_num=7)
    features = DelgExtractor(config, tf2_model).extract(_photo(*hw, seed=hw[0]))
    features.validate()
    h, w = hw
    assert features.original_hw == hw
    assert abs(np.linalg.norm(features.global_descriptor) - 1.0) < 1e-5 and features.global_descriptor.shape == (2048,)
    assert 0 < features.num_features <= 7
    assert np.all(np.diff(features.attention) <= 0)
    np.testing.assert_allclose(np.linalg.norm(features.descriptors, axis=1), 1.0, atol=1e-5)
    y, x = features.locations[:, 0], features.locations[:, 1]
    assert np.all((y >= 0) & (y < h)), (features.locations, hw)
    assert np.all((x >= 0) & (x < w)), (features.locations, hw)


def test_all_cells_inside_image_with_threshold_off(tf2_model):
    """Every receptive-box centre (not only the top ones) lands inside the original image."""
    config = TINY.replace(max_feature_num=1000, image_scales=(0.25, 0.5, 0.70710677, 1.0, 1.4142135, 2.0),
                          global_scales_ind=(3,))
    for hw in [(95, 95), (63, 96), (96, 31), (180, 250)]:
        features = DelgExtractor(config, tf2_model).extract(_photo(*hw))
        assert features.num_features > 0
        assert np.all(features.locations >= 0)
        assert np.all(features.locations < np.asarray(hw, np.float32)), (hw, features.locations.max(axis=0))


def test_small_images_give_empty_features_without_calling_the_model(tf2_model):
    extractor = DelgExtractor(TINY, tf2_model)
    calls = []
    real = tf2_model._call
    tf2_model._call = lambda *a: calls.append(1) or real(*a)
    try:
        for hw in [(5, 5), (9, 40), (40, 9)]:
            features = extractor.extract(_photo(*hw))
            assert features.num_features == 0 and not features.has_global
            assert features.descriptors.shape == (0, 128) and features.locations.shape == (0, 2)
            assert features.original_hw == hw and features.processed_hw == hw
            features.validate()
        # 1000x5 is shrunk to 96x0... -> under 10 px after resize: empty too.
        assert extractor.extract(_photo(400, 30)).processed_hw == (96, 7)
        assert calls == []
        assert extractor.extract(_photo(10, 10)).has_global
        assert calls == [1]  # exactly one model call per image, computing local and global together
    finally:
        tf2_model._call = real


def test_resized_coordinates(tf2_model):
    image = _photo(150, 120, seed=4)
    a = DelgExtractor(TINY, tf2_model).extract(image)
    b = DelgExtractor(TINY.replace(use_resized_coordinates=True), tf2_model).extract(image)
    assert a.scale_factors == (96 / 150, 77 / 120) and b.processed_hw == (96, 77)
    np.testing.assert_array_equal(b.descriptors, a.descriptors)
    np.testing.assert_allclose(a.locations * np.float32([96 / 150, 77 / 120]), b.locations, rtol=1e-6, atol=1e-4)
    assert np.all(b.locations < np.float32([96, 77]))


def test_pca_and_whitening_match_numpy(tf2_model, tmp_path):
    rng = np.random.default_rng(7)
    gmean = rng.normal(0, 0.01, 2048).astype(np.float32)
    gmatrix = rng.normal(0, 1, (64, 2048)).astype(np.float32)
    datum.write_datum(gmean, str(tmp_path / "gmean.datum"))
    datum.write_datum(gmatrix, str(tmp_path / "gmatrix.datum"))
    lmean = rng.normal(0, 0.05, 128).astype(np.float32)
    lmatrix = np.linalg.qr(rng.normal(0, 1, (128, 128)))[0].astype(np.float32)
    lvar = rng.uniform(0.1, 3, (128, 1)).astype(np.float32)
    np.save(tmp_path / "lmean.npy", lmean)
    np.save(tmp_path / "lmatrix.npy", lmatrix)
    np.save(tmp_path / "lvar.npy", lvar)
    config = TINY.replace(
        global_pca=PcaConfig(str(tmp_path / "gmean.datum"), str(tmp_path / "gmatrix.datum"), 48),
        local_pca=PcaConfig(str(tmp_path / "lmean.npy"), str(tmp_path / "lmatrix.npy"), 40, True,
                            str(tmp_path / "lvar.npy")),
    )
    extractor = DelgExtractor(config, tf2_model)
    image = _photo(80, 96, seed=5)
    features, _, raw = _extract_with_raw(extractor, image)
    assert features.global_descriptor.shape == (48,) and features.descriptors.shape[1] == 40
    prepared = imaging.prepare_image(image, config)
    _check_against_reference(features, raw, prepared, config, datum.load_pca(config.global_pca),
                             datum.load_pca(config.local_pca))
    assert extractor.extract(_photo(6, 6)).descriptors.shape == (0, 40)
    # PCA files for another descriptor size are refused with a clear message.
    bad = TINY.replace(local_pca=PcaConfig(str(tmp_path / "gmean.datum"), str(tmp_path / "gmatrix.datum"), 8))
    with pytest.raises(ValueError, match="PCA mean has 2048 dims but the model gives 128-d"):
        DelgExtractor(bad, tf2_model).extract(image)


def test_kaggle_model_through_the_extractor(tf1_model, tmp_path_factory):
    kaggle = cached_model(tiny_tf1(tmp_path_factory, "kaggle"))
    config = TINY.replace(image_scales=(0.5, 0.70710677, 1.0), global_scales_ind=(1, 2))
    image = _photo(70, 90, seed=6)
    a = DelgExtractor(config, kaggle).extract(image)
    b = DelgExtractor(config, tf1_model).extract(image)
    np.testing.assert_allclose(a.global_descriptor, b.global_descriptor, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(a.locations, b.locations)


def test_capability_and_config_errors(tmp_path_factory, tf2_model):
    local_only = cached_model(tiny_tf1(tmp_path_factory, "local"))
    with pytest.raises(ValueError, match=r"no global_descriptors output.*use_global_features=False"):
        DelgExtractor(TINY, local_only)
    features = DelgExtractor(TINY.replace(use_global_features=False), local_only).extract(_photo(40, 40))
    assert not features.has_global and features.num_features > 0

    global_only = cached_model(tiny_tf1(tmp_path_factory, "global"))
    with pytest.raises(ValueError, match=r"no local outputs \(boxes, features, scales, scores\)"):
        DelgExtractor(TINY, global_only)
    features = DelgExtractor(TINY.replace(use_local_features=False), global_only).extract(_photo(40, 40))
    assert features.has_global and features.num_features == 0

    with pytest.raises(ValueError) as excinfo:
        DelgExtractor(get_preset("r50_gldv2clean"))
    message = str(excinfo.value)
    assert "https://storage.googleapis.com/delf/r50delg_gldv2clean_20200914.tar.gz" in message and "--model" in message


def test_loads_config_model_and_warns_untrained_once(tmp_path_factory, monkeypatch, caplog):
    from beam_job.delg import embedded

    monkeypatch.setenv("DELG_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "delg-cache"))
    monkeypatch.setattr(embedded, "_warned", set())
    with caplog.at_level(logging.WARNING):
        first = DelgExtractor(TINY)
        second = DelgExtractor(TINY)
    assert first.model.local_path == tiny_tf2(tmp_path_factory)  # the cached export, not a new one
    assert first.untrained and second.identity.startswith("embedded:tiny@sha256:")
    warnings = [r for r in caplog.records if "UNTRAINED" in r.getMessage()]
    assert len(warnings) == 1 and "r50delg_gldv2clean_20200914.tar.gz" in warnings[0].getMessage()
