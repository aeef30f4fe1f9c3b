"""Our Keras DELG and the in-graph extraction module, checked against hand formulas and a numpy reference."""

import hashlib

import numpy as np
import pytest
import tensorflow as tf

from beam_job.config import ARCHITECTURES, DelgArchitecture, get_architecture
from beam_job.delg.graph import DelgExtractionModule, receptive_boxes
from beam_job.delg.keras_model import build_delg, gem

SCALES = [0.70710677, 1.0, 0.5390625]  # 64 * 0.5390625 = 34.5: exercises round-half-to-even (34, not 35)


@pytest.fixture(scope="module")
def tiny():
    return build_delg("tiny", seed=0)


@pytest.fixture(scope="module")
def module(tiny):
    return DelgExtractionModule(tiny)


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, size=(8, 10, 3)).astype(np.float32)
    smooth = tf.image.resize(base[None], [64, 80]).numpy()[0]  # some structure, so attention varies
    noise = rng.normal(0, 12, size=smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def reference_extract(model, image, scales, max_feature_num, abs_thres, global_ind):
    """Straightforward eager/numpy version of the official algorithm (delg.md 2.1-2.7)."""
    normalized = (image.astype(np.float32) - 128.0) / 128.0
    h, w = image.shape[:2]
    boxes, feats, out_scales, scores, rows = [], [], [], [], []
    for k, s in enumerate(np.asarray(scales, np.float32)):
        size = [int(np.round(np.float32(h) * s)), int(np.round(np.float32(w) * s))]  # np.round: half to even
        resized = tf.image.resize(normalized[None], size)
        prob, desc, block3 = model.forward_local(resized)
        prob, desc = prob.numpy()[0, ..., 0], desc.numpy()[0]
        gh, gw = prob.shape
        for i in range(gh):  # row-major, i outer
            for j in range(gw):
                if prob[i, j] >= abs_thres:
                    box = np.array([32 * i - 145, 32 * j - 145, 32 * i + 145, 32 * j + 145], np.float32)
                    boxes.append(box / s)
                    feats.append(desc[i, j])
                    out_scales.append(np.float32(1.0) / s)
                    scores.append(prob[i, j])
        if k in set(int(g) for g in global_ind):
            rows.append(model.forward_global(block3).numpy()[0])
    scores = np.asarray(scores, np.float32)
    order = np.argsort(-scores, kind="stable")[: min(max_feature_num, len(scores))]
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4)[order],
        "features": np.asarray(feats, np.float32).reshape(-1, 128)[order],
        "scales": np.asarray(out_scales, np.float32)[order],
        "scores": scores[order].reshape(-1, 1),
        "global_descriptors": np.asarray(rows, np.float32).reshape(-1, 2048),
    }


# -- architecture ------------------------------------------------------------------------------------------
def test_architectures_layout_and_names():
    assert ARCHITECTURES["r50"].units == (3, 4, 6, 3)
    assert ARCHITECTURES["r101"].units == (3, 4, 23, 3)
    assert ARCHITECTURES["r101"].unit_names(2)[-1] == "l4w"
    assert ARCHITECTURES["r50"].unit_names(3) == ("l5a", "l5b", "l5c")
    tiny = ARCHITECTURES["tiny"]
    assert tiny.units == (1, 1, 1, 1) and tiny.embedding_dim == 2048 and tiny.local_dim == 128
    assert get_architecture(tiny) is tiny
    with pytest.raises(ValueError, match="unknown DELG architecture"):
        get_architecture("r152")
    with pytest.raises(ValueError, match="units"):
        DelgArchitecture(name="bad", units=(1, 0, 1, 1))


def test_r50_parameter_count_matches_official_export_and_activations_stay_finite():
    model = build_delg("r50", seed=0)
    # The official R50 DELG export holds 28,574,721 parameters (incl. autoencoder.conv2 and BN statistics).
    assert model.parameter_count() == 28_574_721
    x = tf.random.stateless_uniform([1, 128, 160, 3], seed=[1, 2], minval=-1.0, maxval=1.0)
    global_desc, prob, local = model(x)
    assert global_desc.shape == (1, 2048) and prob.shape == (1, 4, 5, 1) and local.shape == (1, 4, 5, 128)
    for t in (global_desc, prob, local):
        assert np.all(np.isfinite(t.numpy()))
    assert 1e-2 < float(tf.math.reduce_std(global_desc)) < 1e3
    assert np.all(prob.numpy() > 0)  # softplus


def test_official_attribute_names(tiny):
    names = tiny.named_variables()
    for key in (
        "backbone/conv1/kernel", "backbone/bn_conv1/moving_variance", "backbone/l2a/conv2a/kernel",
        "backbone/l2a/conv_shortcut/bias", "backbone/l3a/bn_shortcut/gamma", "backbone/l4a/bn2b/beta",
        "backbone/l5a/conv2c/kernel", "backbone/embedding_layer/kernel", "backbone/embedding_layer/bias",
        "attention/conv1/kernel", "attention/bn_conv1/moving_mean", "attention/conv2/bias",
        "autoencoder/conv1/kernel", "autoencoder/conv2/kernel",
    ):
        assert key in names, key
    assert tiny.backbone.l2a.conv2a is dict(tiny.named_layers())["backbone/l2a/conv2a"]
    assert names["autoencoder/conv1/kernel"].shape == (1, 1, 128, 128)
    assert names["backbone/embedding_layer/kernel"].shape == (256, 2048)
    assert names["backbone/l3a/conv2a/kernel"].shape == (1, 1, 32, 16)
    assert len(names) == len(tiny.weights)  # nothing outside the official names


def test_seeded_weights_are_bit_identical_and_seed_dependent(tiny):
    def digest(model):
        h = hashlib.sha256()
        for name, v in sorted(model.named_variables().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(v.numpy()).tobytes())
        return h.hexdigest()

    # Hard-coded: the same bytes in every process and on every machine (numpy PCG64 per variable path).
    assert digest(tiny) == "1f6b7e270c35dd27e212425dcf58b654aeda3fece5a6216e4a08cb1d9a62a021"
    other = build_delg("tiny", seed=1)
    assert digest(other) != digest(tiny)
    bn = tiny.named_variables()["backbone/l3a/bn2a/moving_variance"].numpy()
    assert np.ptp(bn) > 0.1 and bn.min() > 0  # non-trivial BN statistics


def test_grid_sizes_follow_the_caffe_resnet_geometry(tiny):
    for (h, w), grid in {(256, 320): (8, 10), (321, 321): (10, 10), (64, 80): (2, 3)}.items():
        prob, desc, block3 = tiny.forward_local(tf.zeros([1, h, w, 3]))
        assert prob.shape[1:3] == grid and desc.shape[1:3] == grid and block3.shape[1:3] == grid
        assert block3.shape[3] == 128


def test_gem_matches_numpy():
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 5)).astype(np.float32)
    expected = np.mean(np.maximum(x, 1e-6) ** 3, axis=(1, 2)) ** (1 / 3)
    np.testing.assert_allclose(gem(tf.constant(x)).numpy(), expected, rtol=1e-5)


def test_attention_version_b_reads_the_autoencoder():
    a = build_delg("tiny", seed=0)
    b = build_delg("tiny", seed=0, attention_input="autoencoder")
    x = tf.random.stateless_uniform([1, 64, 64, 3], seed=[0, 1], minval=-1.0, maxval=1.0)
    pa, da, _ = a.forward_local(x)
    # B has the same weights but its attention reads autoencoder.conv2's ReLU output (128 channels here).
    pb, db, _ = b.forward_local(x)
    np.testing.assert_array_equal(da.numpy(), db.numpy())
    assert not np.allclose(pa.numpy(), pb.numpy())
    expanded = b.autoencoder.conv2(b.autoencoder.conv1(b.block3(x)))
    np.testing.assert_allclose(pb.numpy(), b.attention(expanded).numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="attention_input"):
        build_delg("tiny", attention_input="block4")


# -- extraction module -------------------------------------------------------------------------------------
def test_receptive_boxes_hand_formula():
    boxes = receptive_boxes(3, 4, tf.constant(0.5)).numpy()
    assert boxes.shape == (12, 4)
    for n, (i, j) in enumerate((i, j) for i in range(3) for j in range(4)):
        np.testing.assert_array_equal(boxes[n], np.array([32 * i - 145, 32 * j - 145, 32 * i + 145,
                                                          32 * j + 145], np.float32) / np.float32(0.5))
        centre = (boxes[n, :2] + boxes[n, 2:]) / 2
        np.testing.assert_allclose(centre, [32 * i / 0.5, 32 * j / 0.5])


def test_module_matches_reference_algorithm(tiny, module, image):
    out = module(image, SCALES, 1000, 0.0, [2, 0])
    ref = reference_extract(tiny, image, SCALES, 1000, 0.0, [2, 0])
    for key in ("boxes", "scales"):
        np.testing.assert_array_equal(out[key], ref[key], err_msg=key)
    # The module folds each BatchNorm into its convolution: same function, last-bit rounding differs.
    np.testing.assert_allclose(out["scores"], ref["scores"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out["features"], ref["features"], atol=1e-5)
    np.testing.assert_allclose(out["global_descriptors"], ref["global_descriptors"], rtol=1e-5, atol=1e-5)
    # grid: 45x57 -> 2x2, 64x80 -> 2x3, 34x43 -> 1x2 cells
    assert out["boxes"].shape == (4 + 6 + 2, 4)
    assert sorted(set(np.round(out["scales"], 5))) == sorted(set(np.round(1 / np.float32(SCALES), 5)))
    assert all(v.dtype == np.float32 for v in out.values())


def test_threshold_and_top_k(module, image):
    everything = module(image, SCALES, 1000, 0.0, [0])
    scores = everything["scores"][:, 0]
    assert np.all(np.diff(scores) <= 0)  # descending
    thres = float(np.median(scores))
    kept = module(image, SCALES, 1000, thres, [0])
    assert np.all(kept["scores"] >= thres) and len(kept["scores"]) == int(np.sum(scores >= thres))
    top = module(image, SCALES, 3, 0.0, [0])
    assert top["boxes"].shape == (3, 4) and top["features"].shape == (3, 128)
    np.testing.assert_array_equal(top["scores"], everything["scores"][:3])
    np.testing.assert_array_equal(top["boxes"], everything["boxes"][:3])
    none = module(image, SCALES, 1000, 1e9, [0])
    assert none["boxes"].shape == (0, 4) and none["features"].shape == (0, 128)
    assert none["scales"].shape == (0,) and none["scores"].shape == (0, 1)
    assert none["global_descriptors"].shape == (1, 2048)


def test_global_rows_order_duplicates_and_out_of_range(tiny, module, image):
    rows = module(image, SCALES, 10, 0.0, [2, 0, 2, 7, -1])["global_descriptors"]
    assert rows.shape == (2, 2048)  # scales 0 and 2, in increasing index order, duplicates once
    ref = reference_extract(tiny, image, SCALES, 10, 0.0, [0, 2])["global_descriptors"]
    np.testing.assert_allclose(rows, ref, rtol=1e-5, atol=1e-5)
    assert module(image, SCALES, 10, 0.0, [])["global_descriptors"].shape == (0, 2048)


def test_global_only_at_requested_scales_equals_official_all_scales(tiny, image):
    # Layer by layer (no BatchNorm folding), computing the global head only where requested is bit-identical to
    # the official computation (global head at every scale, rows discarded).
    official = DelgExtractionModule(tiny, global_at_all_scales=True, fold_batchnorm=False)
    exact = DelgExtractionModule(tiny, fold_batchnorm=False)
    for ind in ([1], [0, 2], [0, 1, 2], []):
        ours = exact(image, SCALES, 1000, 0.0, ind)
        theirs = official(image, SCALES, 1000, 0.0, ind)
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{key} {ind}")


def test_folded_batchnorm_graph_gives_the_official_outputs_within_1e5(tiny, module, image):
    official = DelgExtractionModule(tiny, global_at_all_scales=True, fold_batchnorm=False)
    assert module.fold_batchnorm and not official.fold_batchnorm
    ours = module(image, SCALES, 1000, 0.0, [0, 2])
    theirs = official(image, SCALES, 1000, 0.0, [0, 2])
    for key in ("boxes", "scales"):  # the same keypoints, in the same order
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    for key in ("features", "scores", "global_descriptors"):
        np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert not np.array_equal(ours["features"], theirs["features"])  # it is a different computation


def test_variants_local_only_global_only_and_kaggle(tiny, module, image):
    full = module(image, SCALES, 5, 0.0, [0, 1, 2])
    local = DelgExtractionModule(tiny, global_=False)
    assert local.input_names == ("input_image", "input_scales", "input_max_feature_num", "input_abs_thres")
    out = local(image, SCALES, 5, 0.0)
    assert sorted(out) == ["boxes", "features", "scales", "scores"]
    for key in out:
        np.testing.assert_array_equal(out[key], full[key])

    glob = DelgExtractionModule(tiny, local=False)
    assert glob.input_names == ("input_image", "input_scales", "input_global_scales_ind")
    out = glob(image, SCALES, global_scales_ind=[1])
    assert sorted(out) == ["global_descriptors"]
    np.testing.assert_array_equal(out["global_descriptors"], full["global_descriptors"][1:2])

    kaggle = DelgExtractionModule(tiny, global_scales_input=False)
    assert "input_global_scales_ind" not in kaggle.input_names
    out = kaggle(image, SCALES, 5, 0.0)
    for key in out:
        np.testing.assert_array_equal(out[key], full[key])  # one global row per input scale

    with pytest.raises(ValueError, match="local=True or global_=True"):
        DelgExtractionModule(tiny, local=False, global_=False)


def test_levels_under_5_px_give_no_cells_as_the_official_graph(tiny, module, image):
    # 12 * 0.25 = 3 px: the trunk's valid 3x3 max-pool leaves an empty grid, so that level has no cells
    # (what the official graph gives); the 1.0 level is untouched. A 0-px level fails, as officially.
    small = image[20:32, 30:42]
    official = DelgExtractionModule(tiny, global_at_all_scales=True, fold_batchnorm=False)
    for mod in (module, official):
        out = mod(small, [0.25, 1.0], 100, 0.0, [1])
        alone = mod(small, [1.0], 100, 0.0, [0])  # the same image without the 3-px level
        assert out["boxes"].shape == (1, 4) and np.all(out["scales"] == 1.0)
        for key in out:
            np.testing.assert_array_equal(out[key], alone[key], err_msg=key)
        only_tiny = mod(small, [0.25], 100, 0.0, [])
        assert only_tiny["boxes"].shape == (0, 4) and only_tiny["features"].shape == (0, 128)
        with pytest.raises(tf.errors.InvalidArgumentError):
            mod(small, [0.01, 1.0], 100, 0.0, [1])
