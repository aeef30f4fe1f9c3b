"""TF2 and TF1-style exports of our DELG: official signature, `.prune` paths, outputs equal the in-memory module."""

import numpy as np
import pytest
import tensorflow as tf

from beam_job.delg.export import export_tf2
from beam_job.delg.graph import DelgExtractionModule
from beam_job.delg.keras_model import build_delg

from helpers import tiny_tf1, tiny_tf2  # exports built once per session, shared with the loader tests

SCALES = np.array([0.70710677, 1.0], np.float32)
IND = np.array([1], np.int32)
LOCAL_FETCHES = ["boxes:0", "features:0", "scales:0", "scores:0"]
LOCAL_FETCHES_KEYS = ["boxes", "features", "scales", "scores"]


@pytest.fixture(scope="module")
def tiny():
    return build_delg("tiny", seed=0)  # the weights of the shared exports


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(1).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def expected(tiny, image):
    """In-memory module outputs (max 7 features, threshold 0, global at scale index 1)."""
    return DelgExtractionModule(tiny)(image, SCALES, 7, 0.0, IND)


@pytest.fixture(scope="module")
def tf2_path(tmp_path_factory):
    return tiny_tf2(tmp_path_factory)


def _assert_equal(outputs, expected, keys):
    for key in keys:
        got = outputs[key].numpy() if hasattr(outputs[key], "numpy") else outputs[key]
        np.testing.assert_array_equal(got, expected[key], err_msg=key)


def test_tf2_export_has_exactly_the_official_signature(tf2_path):
    loaded = tf.saved_model.load(tf2_path)
    assert list(loaded.signatures) == ["serving_default"]
    sig = loaded.signatures["serving_default"]
    args, kwargs = sig.structured_input_signature
    assert args == ()
    assert {k: (v.dtype, v.shape.as_list()) for k, v in kwargs.items()} == {
        "input_image": (tf.uint8, [None, None, 3]),
        "input_scales": (tf.float32, [None]),
        "input_max_feature_num": (tf.int32, []),
        "input_abs_thres": (tf.float32, []),
        "input_global_scales_ind": (tf.int32, [None]),
    }
    assert {k: (v.dtype, v.shape.as_list()) for k, v in sig.structured_outputs.items()} == {
        "boxes": (tf.float32, [None, 4]),
        "features": (tf.float32, [None, 128]),
        "global_descriptors": (tf.float32, [None, None]),
        "scales": (tf.float32, [None]),
        "scores": (tf.float32, [None, 1]),
    }
    assert not hasattr(loaded, "prune")  # a TF2 export is driven through its signature, like the official one


def test_tf2_export_outputs_equal_the_module(tf2_path, image, expected):
    loaded = tf.saved_model.load(tf2_path)
    out = loaded.signatures["serving_default"](
        input_image=tf.constant(image), input_scales=tf.constant(SCALES), input_max_feature_num=tf.constant(7),
        input_abs_thres=tf.constant(0.0), input_global_scales_ind=tf.constant(IND),
    )
    _assert_equal(out, expected, expected.keys())
    assert out["boxes"].shape == (7, 4) and out["global_descriptors"].shape == (1, 2048)
    # The restored tf.function takes the official positional order too.
    positional = loaded.ExtractFeatures(image, SCALES, 7, 0.0, IND)
    _assert_equal(positional, expected, expected.keys())


def test_tf1_export_full_model_through_prune(image, expected, tmp_path_factory):
    path = tiny_tf1(tmp_path_factory, "full")
    loaded = tf.saved_model.load(path)
    # Exactly as the official extractor drives a TF1 model (feeds and fetch order of MakeExtractor).
    fn = loaded.prune(
        ["input_image:0", "input_scales:0", "input_abs_thres:0", "input_max_feature_num:0",
         "input_global_scales_ind:0"],
        [*LOCAL_FETCHES, "global_descriptors:0"],
    )
    out = fn(tf.constant(image), tf.constant(SCALES), tf.constant(0.0), tf.constant(7), tf.constant(IND))
    names = ["boxes", "features", "scales", "scores", "global_descriptors"]
    _assert_equal(dict(zip(names, out, strict=True)), expected,
                  expected.keys())
    # The global row alone only needs the image, scales and global indices.
    glob = loaded.prune(["input_image:0", "input_scales:0", "input_global_scales_ind:0"], ["global_descriptors:0"])
    rows = glob(tf.constant(image), tf.constant(SCALES), tf.constant(IND))[0].numpy()
    np.testing.assert_array_equal(rows, expected["global_descriptors"])
    # And the local outputs alone do not need input_global_scales_ind (official extractor, global features off).
    local = loaded.prune(["input_image:0", "input_scales:0", "input_abs_thres:0", "input_max_feature_num:0"],
                         LOCAL_FETCHES)
    out = local(tf.constant(image), tf.constant(SCALES), tf.constant(0.0), tf.constant(7))
    _assert_equal(dict(zip(["boxes", "features", "scales", "scores"], out, strict=True)), expected, LOCAL_FETCHES_KEYS)
    assert "serving_default" in loaded.signatures


def test_tf1_local_only_and_global_only_variants(image, expected, tmp_path_factory):
    local = tf.saved_model.load(tiny_tf1(tmp_path_factory, "local"))
    fn = local.prune(["input_image:0", "input_scales:0", "input_abs_thres:0", "input_max_feature_num:0"],
                     LOCAL_FETCHES)
    out = fn(tf.constant(image), tf.constant(SCALES), tf.constant(0.0), tf.constant(7))
    _assert_equal(dict(zip(["boxes", "features", "scales", "scores"], out, strict=True)), expected,
                  ["boxes", "features", "scales", "scores"])
    with pytest.raises((KeyError, ValueError)):
        local.prune(["input_image:0", "input_scales:0"], ["global_descriptors:0"])

    glob = tf.saved_model.load(tiny_tf1(tmp_path_factory, "global"))
    fn = glob.prune(["input_image:0", "input_scales:0", "input_global_scales_ind:0"], ["global_descriptors:0"])
    rows = fn(tf.constant(image), tf.constant(SCALES), tf.constant(IND))[0].numpy()
    np.testing.assert_array_equal(rows, expected["global_descriptors"])
    with pytest.raises((KeyError, ValueError)):
        glob.prune(["input_image:0", "input_scales:0"], ["boxes:0"])


def test_tf1_kaggle_variant_global_depends_only_on_image_and_scales(image, expected, tmp_path_factory):
    loaded = tf.saved_model.load(tiny_tf1(tmp_path_factory, "kaggle"))
    # The Kaggle 2020 baseline notebook's two calls.
    glob = loaded.prune(["input_image:0", "input_scales:0"], ["global_descriptors:0"])
    rows = glob(tf.constant(image), tf.constant(SCALES))[0].numpy()
    assert rows.shape == (2, 2048)  # one row per input scale
    np.testing.assert_array_equal(rows[1:2], expected["global_descriptors"])
    local = loaded.prune(["input_image:0", "input_scales:0", "input_max_feature_num:0", "input_abs_thres:0"],
                         ["boxes:0", "features:0"])
    boxes, feats = local(tf.constant(image), tf.constant(SCALES), tf.constant(7), tf.constant(0.0))
    np.testing.assert_array_equal(boxes.numpy(), expected["boxes"])
    np.testing.assert_array_equal(feats.numpy(), expected["features"])


def test_export_refuses_a_non_empty_directory(tiny, tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty"):
        export_tf2(tiny, tmp_path)
    assert (tmp_path / "keep.txt").exists()
