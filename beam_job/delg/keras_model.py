"""Our DELG in Keras 3: Caffe-style ResNet backbone, attention and autoencoder heads, GeM + embedding.

Attribute names follow the official training code (tensorflow/models research/delf), so an official
object-based checkpoint maps onto this model by name (see `checkpoint.py`):

    backbone.{conv1, bn_conv1, l2a..l5c.{conv2a, bn2a, conv2b, bn2b, conv2c, bn2c, conv_shortcut,
              bn_shortcut}, embedding_layer}
    attention.{conv1, bn_conv1, conv2}
    autoencoder.{conv1, conv2}

Tensors are NHWC float32. Input images are already normalised to (x - 128) / 128.
Spatial sizes for an H x W input: conv1 (7x7/2, same) -> ceil(H/2); max-pool 3x3/2 valid -> floor((h-3)/2)+1;
stages 3 and 4 halve (ceil); block3 sub-sampling halves again, so block3 and block4 are at stride 32
(a 256x320 input gives an 8x10 grid).
"""

from __future__ import annotations

import logging
import zlib

import keras
import numpy as np
import tensorflow as tf

from beam_job.config import DelgArchitecture, get_architecture
from beam_job.delg.architecture import BN_EPSILON, GEM_EPS

logger = logging.getLogger(__name__)

ATTENTION_INPUTS = ("block3", "autoencoder")

# Official variable names of each layer kind, in the order Keras 3 stores them.
_CONV_VARS: tuple[str, ...] = ("kernel", "bias")
_BN_VARS: tuple[str, ...] = ("gamma", "beta", "moving_mean", "moving_variance")


def layer_variables(layer: keras.layers.Layer) -> dict[str, keras.Variable]:
    """The variables of a Conv2D / Dense / BatchNormalization layer keyed by their official names."""
    if isinstance(layer, keras.layers.BatchNormalization):
        names = _BN_VARS
    elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
        names = _CONV_VARS
    else:
        raise TypeError(f"no official variable names for layer type {type(layer).__name__}")
    return {name: getattr(layer, name) for name in names}


def _conv(filters: int, kernel: int, name: str, strides: int = 1, padding: str = "valid", activation=None):
    return keras.layers.Conv2D(
        int(filters), int(kernel), strides=int(strides), padding=padding, use_bias=True, activation=activation,
        name=name,
    )


def _bn(name: str) -> keras.layers.BatchNormalization:
    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=name)


class Bottleneck(keras.layers.Layer):
    """Caffe-style bottleneck unit: the stride sits on the 1x1 conv2a and on the 1x1 shortcut.

    conv2a 1x1/stride -> bn2a -> ReLU -> conv2b 3x3 same -> bn2b -> ReLU -> conv2c 1x1 -> bn2c,
    plus identity or (conv_shortcut 1x1/stride -> bn_shortcut), then ReLU.
    """

    def __init__(self, filters: tuple[int, int, int], strides: int, use_shortcut: bool, name: str):
        super().__init__(name=name)
        f1, f2, f3 = (int(f) for f in filters)
        self.conv2a = _conv(f1, 1, "conv2a", strides=strides)
        self.bn2a = _bn("bn2a")
        self.conv2b = _conv(f2, 3, "conv2b", padding="same")
        self.bn2b = _bn("bn2b")
        self.conv2c = _conv(f3, 1, "conv2c")
        self.bn2c = _bn("bn2c")
        self.use_shortcut = bool(use_shortcut)
        if self.use_shortcut:
            self.conv_shortcut = _conv(f3, 1, "conv_shortcut", strides=strides)
            self.bn_shortcut = _bn("bn_shortcut")

    def leaf_names(self) -> tuple[str, ...]:
        names = ("conv2a", "bn2a", "conv2b", "bn2b", "conv2c", "bn2c")
        return names + (("conv_shortcut", "bn_shortcut") if self.use_shortcut else ())

    def call(self, x, training=False):
        y = tf.nn.relu(self.bn2a(self.conv2a(x), training=training))
        y = tf.nn.relu(self.bn2b(self.conv2b(y), training=training))
        y = self.bn2c(self.conv2c(y), training=training)
        shortcut = self.bn_shortcut(self.conv_shortcut(x), training=training) if self.use_shortcut else x
        return tf.nn.relu(y + shortcut)


class Backbone(keras.layers.Layer):
    """ResNet trunk (conv1 .. block3), block4, GeM pooling and the 2048-d embedding layer."""

    def __init__(self, arch: DelgArchitecture, name: str = "backbone"):
        super().__init__(name=name)
        self.arch = arch
        self.conv1 = _conv(arch.stem_filters, 7, "conv1", strides=2, padding="same")
        self.bn_conv1 = _bn("bn_conv1")
        self.max_pool = keras.layers.MaxPooling2D(pool_size=3, strides=2, padding="valid", name="max_pool")
        self.stage_units: list[tuple[str, ...]] = []
        for stage in range(4):
            width = int(arch.stage_filters[stage])
            filters = (width, width, width * int(arch.expansion))
            # conv2_x keeps the resolution (the max-pool already halved it); conv5_x keeps it when block3 is
            # sub-sampled instead.
            first_stride = 1 if stage == 0 or (stage == 3 and arch.block3_strides) else 2
            names = arch.unit_names(stage)
            for k, unit_name in enumerate(names):
                unit = Bottleneck(filters, first_stride if k == 0 else 1, use_shortcut=(k == 0), name=unit_name)
                setattr(self, unit_name, unit)
            self.stage_units.append(names)
        if arch.block3_strides:
            self.subsampling_layer = keras.layers.MaxPooling2D(
                pool_size=1, strides=2, padding="valid", name="subsampling_layer"
            )
        self.embedding_layer = keras.layers.Dense(int(arch.embedding_dim), use_bias=True, name="embedding_layer")

    def _stage(self, stage: int, x, training=False):
        for unit_name in self.stage_units[stage]:
            x = getattr(self, unit_name)(x, training=training)
        return x

    def block3(self, images, training=False):
        """images [B,H,W,3] normalised -> block3 [B,h,w,C3] at stride 32 (sub-sampled when block3_strides)."""
        x = tf.nn.relu(self.bn_conv1(self.conv1(images), training=training))
        x = self.max_pool(x)
        for stage in range(3):
            x = self._stage(stage, x, training=training)
        if self.arch.block3_strides:
            x = self.subsampling_layer(x)
        return x

    def block4(self, block3, training=False):
        """block3 [B,h,w,C3] -> block4 [B,h',w',C4] (same grid when block3_strides)."""
        return self._stage(3, block3, training=training)

    def global_descriptor(self, block3, training=False):
        """block3 [B,h,w,C3] -> raw (not normalised) embedding [B,embedding_dim] = Dense(GeM_p(block4))."""
        return self.embedding_layer(gem(self.block4(block3, training=training), self.arch.gem_power))


def gem(x, power: float = 3.0, eps: float = GEM_EPS):
    """Generalised-mean pooling over H, W: (mean(max(x, eps)^p))^(1/p). [B,h,w,C] -> [B,C]."""
    power = float(power)
    pooled = tf.reduce_mean(tf.pow(tf.maximum(x, eps), power), axis=[1, 2])
    return tf.pow(pooled, 1.0 / power)


class AttentionHead(keras.layers.Layer):
    """conv1 1x1 (width, same) -> bn_conv1 -> ReLU -> conv2 1x1 (1) -> softplus: prob [B,h,w,1]."""

    def __init__(self, width: int, name: str = "attention"):
        super().__init__(name=name)
        self.conv1 = _conv(width, 1, "conv1", padding="same")
        self.bn_conv1 = _bn("bn_conv1")
        self.conv2 = _conv(1, 1, "conv2", padding="same")

    def call(self, x, training=False):
        y = tf.nn.relu(self.bn_conv1(self.conv1(x), training=training))
        return tf.nn.softplus(self.conv2(y))


class Autoencoder(keras.layers.Layer):
    """conv1 1x1 -> local_dim, linear (the local descriptor); conv2 1x1 -> expand_channels + ReLU (training)."""

    def __init__(self, local_dim: int, expand_channels: int, name: str = "autoencoder"):
        super().__init__(name=name)
        self.conv1 = _conv(local_dim, 1, "conv1", padding="same")
        self.conv2 = _conv(expand_channels, 1, "conv2", padding="same", activation="relu")

    def call(self, x):
        reduced = self.conv1(x)
        return reduced, self.conv2(reduced)


class DelgKerasModel(keras.Model):
    """DELG: backbone + attention + autoencoder. Inference only (BatchNorm uses its moving statistics).

    attention_input: "block3" (version A, default, as the paper and the newest official code) or
    "autoencoder" (version B: attention reads the autoencoder's expanded 1024-d map).
    """

    def __init__(self, arch: DelgArchitecture, attention_input: str = "block3", name: str = "DELG"):
        super().__init__(name=name)
        if attention_input not in ATTENTION_INPUTS:
            raise ValueError(f"attention_input must be one of {ATTENTION_INPUTS}, got {attention_input!r}")
        self.arch = arch
        self.attention_input = attention_input
        self.backbone = Backbone(arch)
        self.attention = AttentionHead(arch.attention_width)
        self.autoencoder = Autoencoder(arch.local_dim, arch.block3_channels)

    # -- forward passes ------------------------------------------------------------------------------------
    def block3(self, images):
        """images [B,H,W,3] normalised -> block3 [B,h,w,C3]."""
        return self.backbone.block3(images, training=False)

    def local_heads(self, block3):
        """block3 [B,h,w,C3] -> (attention_prob [B,h,w,1], local_desc [B,h,w,local_dim]) (not normalised)."""
        reduced, expanded = self.autoencoder(block3)
        attention_in = block3 if self.attention_input == "block3" else expanded
        return self.attention(attention_in, training=False), reduced

    def forward_local(self, images):
        """images [B,H,W,3] -> (attention_prob [B,h,w,1], local_desc [B,h,w,128], block3 [B,h,w,C3])."""
        block3 = self.block3(images)
        prob, desc = self.local_heads(block3)
        return prob, desc, block3

    def forward_global(self, block3):
        """block3 [B,h,w,C3] (from forward_local) -> raw global embedding [B,embedding_dim]."""
        return self.backbone.global_descriptor(block3, training=False)

    def call(self, images, training=False):
        """Full model, like the official build_call: (global [B,D], attention_prob [B,h,w,1], local [B,h,w,128])."""
        prob, desc, block3 = self.forward_local(images)
        return self.forward_global(block3), prob, desc

    # -- introspection -------------------------------------------------------------------------------------
    def named_layers(self) -> list[tuple[str, keras.layers.Layer]]:
        """Every weighted leaf layer with its official path, e.g. ('backbone/l2a/conv2a', Conv2D)."""
        out: list[tuple[str, keras.layers.Layer]] = [
            ("backbone/conv1", self.backbone.conv1),
            ("backbone/bn_conv1", self.backbone.bn_conv1),
        ]
        for names in self.backbone.stage_units:
            for unit_name in names:
                unit = getattr(self.backbone, unit_name)
                out += [(f"backbone/{unit_name}/{leaf}", getattr(unit, leaf)) for leaf in unit.leaf_names()]
        out.append(("backbone/embedding_layer", self.backbone.embedding_layer))
        out += [(f"attention/{leaf}", getattr(self.attention, leaf)) for leaf in ("conv1", "bn_conv1", "conv2")]
        out += [(f"autoencoder/{leaf}", getattr(self.autoencoder, leaf)) for leaf in ("conv1", "conv2")]
        return out

    def named_variables(self) -> dict[str, keras.Variable]:
        """Official variable paths -> variables, e.g. 'backbone/l2a/bn2a/moving_mean'."""
        return {
            f"{path}/{var_name}": var
            for path, layer in self.named_layers()
            for var_name, var in layer_variables(layer).items()
        }

    def parameter_count(self) -> int:
        """Number of scalars in every variable (including BatchNorm moving statistics)."""
        return int(sum(int(np.prod(v.shape)) for v in self.named_variables().values()))


def _random_value(seed: int, path: str, shape: tuple[int, ...], var_name: str, layer_path: str) -> np.ndarray:
    """Deterministic weights for one variable from numpy's PCG64, keyed by (seed, variable path)."""
    rng = np.random.default_rng([int(seed), zlib.crc32(path.encode("utf-8"))])
    if var_name == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        # He-normal for ReLU-fed convolutions; variance-preserving for the linear heads.
        linear = layer_path.endswith(("embedding_layer", "autoencoder/conv1", "attention/conv2"))
        std = np.sqrt((1.0 if linear else 2.0) / fan_in)
        value = rng.normal(0.0, std, size=shape)
    elif var_name == "bias":
        value = rng.normal(0.0, 0.01, size=shape)
    elif var_name == "gamma":
        # The last BN of each residual branch is damped so the residual stream grows slowly (R101 has 33 units).
        low, high = (0.15, 0.35) if layer_path.endswith("bn2c") else (0.8, 1.2)
        value = rng.uniform(low, high, size=shape)
    elif var_name == "beta":
        value = rng.normal(0.0, 0.05, size=shape)
    elif var_name == "moving_mean":
        value = rng.normal(0.0, 0.1, size=shape)
    elif var_name == "moving_variance":
        value = rng.uniform(0.7, 1.5, size=shape)
    else:  # pragma: no cover - layer_variables only yields the names above
        raise ValueError(f"unexpected variable {path}")
    return value.astype(np.float32)


def initialize_weights(model: DelgKerasModel, seed: int) -> None:
    """Set every variable from numpy's default_rng, bit-identical across processes and machines."""
    for path, layer in model.named_layers():
        for var_name, var in layer_variables(layer).items():
            full = f"{path}/{var_name}"
            var.assign(_random_value(seed, full, tuple(int(d) for d in var.shape), var_name, path))


def build_delg(
    arch: str | DelgArchitecture = "r50",
    seed: int | None = 0,
    attention_input: str = "block3",
) -> DelgKerasModel:
    """Build our DELG with all variables created.

    seed: an int gives deterministic numpy-generated weights (untrained, for tests and the embedded model);
    None keeps Keras' default initialisation (use it before loading an official checkpoint).
    """
    architecture = get_architecture(arch)
    model = DelgKerasModel(architecture, attention_input=attention_input)
    # Create every variable: trunk, local heads (incl. autoencoder.conv2) and the global head.
    dummy = tf.zeros([1, 64, 64, 3], tf.float32)
    _prob, _, block3 = model.forward_local(dummy)
    model.forward_global(block3)
    model.built = True  # every sub-layer is built; keeps Keras from warning when the model is __call__ed
    if seed is not None:
        initialize_weights(model, seed)
    logger.debug("built DELG %s (%d parameters, seed=%s)", architecture.name, model.parameter_count(), seed)
    return model
