"""Inference forward pass of our DELG with each BatchNorm folded into the convolution before it.

BatchNorm in inference is an affine map per channel, y = x * g / sqrt(v + eps) + (beta - m * g / sqrt(v + eps)),
so conv -> bias -> BN equals ONE convolution with the kernel scaled per output channel and a new bias. The
folded graph is Conv2D + BiasAdd (+ Add) (+ Relu) chains, which TensorFlow's Grappler remapper fuses into
single oneDNN `_FusedConv2D` kernels; the layer-by-layer graph pays two extra full passes (Mul, Add) over every
activation map. Same function, float32 rounding differs in the last bits (measured in docs/delg-model.md).

`FoldedWeights(model)` computes the folded weights ONCE, into variables of its own (a tf.Module, so an export
of a module holding it saves the folded weights only: no per-call folding, no second copy of the weights in
memory), and has `block3`, `local_heads` and `forward_global` mirroring DelgKerasModel's. It is a snapshot:
change the model's weights afterwards and build a new one. No Beam.
"""

from __future__ import annotations

import tensorflow as tf

from beam_job.delg.architecture import BN_EPSILON
from beam_job.delg.keras_model import gem


def _fold(conv, bn) -> tuple[tf.Tensor, tf.Tensor]:
    """(kernel, bias) of conv followed by inference-mode BN, as one convolution."""
    inv = tf.math.rsqrt(tf.convert_to_tensor(bn.moving_variance) + BN_EPSILON) * tf.convert_to_tensor(bn.gamma)
    kernel = tf.convert_to_tensor(conv.kernel) * inv
    mean, beta = tf.convert_to_tensor(bn.moving_mean), tf.convert_to_tensor(bn.beta)
    bias = (tf.convert_to_tensor(conv.bias) - mean) * inv + beta
    return kernel, bias


def _plain(layer) -> tuple[tf.Tensor, tf.Tensor]:
    return tf.convert_to_tensor(layer.kernel), tf.convert_to_tensor(layer.bias)


def _conv(x, weights, strides: int = 1, padding: str = "VALID"):
    kernel, bias = weights
    return tf.nn.bias_add(tf.nn.conv2d(x, kernel, strides=strides, padding=padding), bias)


def _variables(pair: tuple[tf.Tensor, tf.Tensor]) -> tuple[tf.Variable, tf.Variable]:
    return tuple(tf.Variable(t, trainable=False) for t in pair)


class FoldedWeights(tf.Module):
    """Folded (kernel, bias) variables of one DelgKerasModel and the forward passes that use them."""

    def __init__(self, model, name: str = "folded"):
        super().__init__(name=name)
        backbone = model.backbone
        self.arch = model.arch
        self.attention_input = str(model.attention_input)
        w: dict[str, tuple[tf.Variable, tf.Variable]] = {"conv1": _variables(_fold(backbone.conv1, backbone.bn_conv1))}
        self.units = []
        for names in backbone.stage_units:
            stage = []
            for unit_name in names:
                unit = getattr(backbone, unit_name)
                entry = {
                    "strides": int(unit.conv2a.strides[0]),
                    "a": _variables(_fold(unit.conv2a, unit.bn2a)),
                    "b": _variables(_fold(unit.conv2b, unit.bn2b)),
                    "c": _variables(_fold(unit.conv2c, unit.bn2c)),
                }
                if unit.use_shortcut:
                    entry["shortcut"] = _variables(_fold(unit.conv_shortcut, unit.bn_shortcut))
                stage.append(entry)
            self.units.append(stage)
        w["attention1"] = _variables(_fold(model.attention.conv1, model.attention.bn_conv1))
        w["attention2"] = _variables(_plain(model.attention.conv2))
        w["reduce"] = _variables(_plain(model.autoencoder.conv1))
        if self.attention_input != "block3":
            w["expand"] = _variables(_plain(model.autoencoder.conv2))
        w["embedding"] = _variables(_plain(backbone.embedding_layer))
        self.w = w

    @staticmethod
    def _unit(x, unit):
        s = unit["strides"]
        y = tf.nn.relu(_conv(x, unit["a"], strides=s))
        y = tf.nn.relu(_conv(y, unit["b"], padding="SAME"))
        y = _conv(y, unit["c"])
        shortcut = _conv(x, unit["shortcut"], strides=s) if "shortcut" in unit else x
        return tf.nn.relu(y + shortcut)

    def _stage(self, stage: int, x):
        for unit in self.units[stage]:
            x = self._unit(x, unit)
        return x

    def block3(self, images):
        x = tf.nn.relu(_conv(images, self.w["conv1"], strides=2, padding="SAME"))
        x = tf.nn.max_pool2d(x, 3, 2, "VALID")
        for stage in range(3):
            x = self._stage(stage, x)
        if self.arch.block3_strides:
            x = tf.nn.max_pool2d(x, 1, 2, "VALID")
        return x

    def local_heads(self, block3):
        reduced = _conv(block3, self.w["reduce"])
        if self.attention_input == "block3":
            attention_in = block3
        else:
            attention_in = tf.nn.relu(_conv(reduced, self.w["expand"]))
        hidden = tf.nn.relu(_conv(attention_in, self.w["attention1"]))
        return tf.nn.softplus(_conv(hidden, self.w["attention2"])), reduced

    def forward_global(self, block3):
        pooled = gem(self._stage(3, block3), self.arch.gem_power)
        kernel, bias = self.w["embedding"]
        return tf.nn.bias_add(tf.matmul(pooled, kernel), bias)
