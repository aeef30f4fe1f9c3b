"""Loading an official-layout DELG training checkpoint (object-based, by attribute names) into our Keras DELG."""

import numpy as np
import pytest
import tensorflow as tf

from beam_job.config import DelgArchitecture
from beam_job.delg.checkpoint import load_official_checkpoint
from beam_job.delg.export import export_tf2
from beam_job.delg.graph import DelgExtractionModule
from beam_job.delg.keras_model import build_delg


def _official_tree(values):
    """Plain tf.Module / tf.Variable objects laid out under the official attribute names, as the official
    training code's Keras model tracks them: root.backbone.l2a.conv2a.kernel, root.attention.conv1.bias, ..."""
    root = tf.Module()
    for path, value in values.items():
        node = root
        *parents, leaf = path.split("/")
        for part in parents:
            if not hasattr(node, part):
                setattr(node, part, tf.Module())
            node = getattr(node, part)
        setattr(node, leaf, tf.Variable(value))
    return root


def _training_values(seed=11):
    """Weights different from our seeded ones, with the tiny architecture's shapes."""
    donor = build_delg("tiny", seed=seed)
    return {name: var.numpy() for name, var in donor.named_variables().items()}


def _write(tmp_path, values, with_training_objects=True, under_model=True):
    model = _official_tree(values)
    extra = {}
    if with_training_objects:
        # Training-only objects the official checkpoint also holds: classifiers, an optimizer with slots.
        model.desc_classification = tf.Module()
        model.desc_classification.kernel = tf.Variable(np.ones((2048, 10), np.float32))
        model.attn_classification = tf.Module()
        model.attn_classification.kernel = tf.Variable(np.ones((128, 10), np.float32))
        optimizer = tf.Module()
        optimizer.iterations = tf.Variable(123, dtype=tf.int64)
        extra["optimizer"] = optimizer
    ckpt = tf.train.Checkpoint(model=model, **extra) if under_model else tf.train.Checkpoint(**vars_of(model))
    return ckpt.write(str(tmp_path / "delf_weights"))


def vars_of(module):
    return {k: v for k, v in vars(module).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def values():
    return _training_values()


def test_load_checkpoint_under_model_prefix_then_export(values, tmp_path):
    path = _write(tmp_path, values)
    keys = [k for k, _ in tf.train.list_variables(path)]
    assert "model/backbone/l2a/conv2a/kernel/.ATTRIBUTES/VARIABLE_VALUE" in keys  # the official key layout

    model = build_delg("tiny", seed=0)
    report = load_official_checkpoint(model, path)
    assert report["prefix"] == "model/"
    assert report["loaded"] == len(values) and report["parameters"] == model.parameter_count()
    assert report["ignored"] == ["attn_classification/kernel", "desc_classification/kernel"]
    for name, var in model.named_variables().items():
        np.testing.assert_array_equal(var.numpy(), values[name], err_msg=name)

    # The loaded model, exported, reproduces the in-memory module for those weights.
    image = np.random.default_rng(2).integers(0, 256, size=(64, 80, 3), dtype=np.uint8)
    scales, ind = np.array([0.70710677, 1.0], np.float32), np.array([0, 1], np.int32)
    expected = DelgExtractionModule(model)(image, scales, 20, 0.0, ind)
    reference = DelgExtractionModule(build_delg("tiny", seed=11))(image, scales, 20, 0.0, ind)
    loaded = tf.saved_model.load(export_tf2(model, tmp_path / "export"))
    out = loaded.signatures["serving_default"](
        input_image=tf.constant(image), input_scales=tf.constant(scales), input_max_feature_num=tf.constant(20),
        input_abs_thres=tf.constant(0.0), input_global_scales_ind=tf.constant(ind),
    )
    for key in expected:
        np.testing.assert_allclose(out[key].numpy(), expected[key], atol=1e-4, err_msg=key)
        np.testing.assert_allclose(out[key].numpy(), reference[key], atol=1e-4, err_msg=key)


def test_load_checkpoint_without_prefix(values, tmp_path):
    # model.save_weights-style checkpoints put the model's children at the root.
    path = _write(tmp_path, values, with_training_objects=False, under_model=False)
    model = build_delg("tiny", seed=None)
    report = load_official_checkpoint(model, path)
    assert report["prefix"] == "" and report["ignored"] == []
    np.testing.assert_array_equal(model.backbone.embedding_layer.bias.numpy(), values["backbone/embedding_layer/bias"])


def test_missing_variable_fails_with_one_line_naming_it(values, tmp_path):
    partial = {k: v for k, v in values.items() if k != "backbone/l4a/bn2b/moving_mean"}
    path = _write(tmp_path, partial)
    model = build_delg("tiny", seed=0)
    before = model.backbone.conv1.kernel.numpy().copy()
    with pytest.raises(ValueError, match="lacks variable 'model/backbone/l4a/bn2b/moving_mean'") as info:
        load_official_checkpoint(model, path)
    assert "\n" not in str(info.value)
    np.testing.assert_array_equal(model.backbone.conv1.kernel.numpy(), before)  # nothing half-loaded


def test_shape_mismatch_and_wrong_files(values, tmp_path):
    path = _write(tmp_path, values)
    narrower_stem = DelgArchitecture(name="other", units=(1, 1, 1, 1), stem_filters=4,
                                     stage_filters=(8, 16, 32, 64), attention_width=16)
    message = r"shape mismatch for 'model/backbone/conv1/kernel': checkpoint \(7, 7, 3, 8\), our model \(7, 7, 3, 4\)"
    with pytest.raises(ValueError, match=message):
        load_official_checkpoint(build_delg(narrower_stem, seed=None), path)
    with pytest.raises(ValueError, match="cannot read a TensorFlow checkpoint"):
        load_official_checkpoint(build_delg("tiny", seed=None), str(tmp_path / "nothing-here"))
    other = tf.train.Checkpoint(foo=tf.Variable(1.0)).write(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="not a DELG training checkpoint"):
        load_official_checkpoint(build_delg("tiny", seed=None), other)
