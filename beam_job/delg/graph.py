"""In-graph multi-scale DELG extraction: a tf.Module whose `ExtractFeatures` has the official signature.

Algorithm (the official export's `ExtractLocalAndGlobalFeatures`, re-implemented):
  1. image uint8 [H,W,3] -> float32 (x - 128) / 128 BEFORE any resize, batch of 1.
  2. For each scale s = input_scales[k], in the given order: size = int32(round([H,W] * s)) (half to even),
     tf.image.resize bilinear (no antialias), even at s = 1.0; trunk to block3. A level of 1-4 px on a side
     has an empty grid after the trunk's valid 3x3 max-pool: no cells (as the official graph); a 0-px level
     fails (as the official graph).
  3. Local: attention prob (softplus) and 128-d autoencoder descriptors on the block3 grid [h,w].
     Cell (i, j) (row-major, i outer) has the receptive box
     [32i - 145, 32j - 145, 32i + 145, 32j + 145] / s   (ymin, xmin, ymax, xmax; model-input pixels),
     i.e. centre (32i / s, 32j / s), with scale 1 / s. Cells of all scales are concatenated in scale order,
     those with prob >= input_abs_thres are kept (the official graph thresholds per scale before
     concatenating: same rows, same order), then `tf.image.non_max_suppression(iou=1.0)` keeps the top
     min(max_feature_num, N) by score, highest first (nothing is actually suppressed at IoU 1).
  4. Global: block4 -> GeM(p=3) -> Dense 2048 (raw), one row per scale index listed in
     input_global_scales_ind, in increasing scale-index order, duplicates once, out-of-range ignored.

Our departures (outputs as the official graph's):
  * block4 + GeM + embedding run ONLY at the requested global scales (a tf.cond per scale) on the block3 maps
    of the local loop, and a global-only module runs the trunk only at those scales.
    `global_at_all_scales=True` runs the global head at every scale and discards rows, as the official graph
    does.
  * Local and global heads run in two separate loops, and the threshold is applied after the local loop.
    So the local outputs do not depend on input_global_scales_ind and global_descriptors does not depend on
    input_abs_thres / input_max_feature_num: `.prune` can fetch either alone (the Kaggle notebook fetches
    global_descriptors from input_image + input_scales only).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import tensorflow as tf

from beam_job.config import MIN_LEVEL_SIZE  # smallest level (px a side) with a grid cell: conv1 /2, valid 3x3 pool
from beam_job.delg.architecture import FEATURE_STRIDE, RECEPTIVE_BOX_OFFSETS
from beam_job.delg.folded import FoldedWeights

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_image", "input_scales", "input_max_feature_num", "input_abs_thres", "input_global_scales_ind")
LOCAL_OUTPUTS = ("boxes", "features", "scales", "scores")
GLOBAL_OUTPUT = "global_descriptors"

_SPECS = {
    "input_image": tf.TensorSpec([None, None, 3], tf.uint8, name="input_image"),
    "input_scales": tf.TensorSpec([None], tf.float32, name="input_scales"),
    "input_max_feature_num": tf.TensorSpec([], tf.int32, name="input_max_feature_num"),
    "input_abs_thres": tf.TensorSpec([], tf.float32, name="input_abs_thres"),
    "input_global_scales_ind": tf.TensorSpec([None], tf.int32, name="input_global_scales_ind"),
}


def receptive_boxes(height, width, scale=None):
    """Receptive boxes of a [height, width] stride-32 grid: float32 [height*width, 4] (ymin, xmin, ymax, xmax).

    Row-major (i outer). Computed as stride * [i, j, i, j] + [-145, -145, 145, 145] in float32, then divided
    by `scale` when given (back to the coordinates of the image fed to the model).
    """
    cols, rows = tf.meshgrid(tf.range(width), tf.range(height))  # both [height, width]
    coords = tf.reshape(tf.stack([rows, cols], axis=2), [-1, 2])
    points = tf.cast(tf.concat([coords, coords], axis=1), tf.float32)
    bias = tf.constant(RECEPTIVE_BOX_OFFSETS, tf.float32)
    boxes = FEATURE_STRIDE * points + bias
    if scale is not None:
        boxes = tf.divide(boxes, scale)
    return boxes


# One factory per variant: each returns a function named ExtractFeatures whose argument names are the variant's
# official input names (tf.function takes the signature's input names from them).
_SignatureFunction = Callable[..., dict[str, tf.Tensor]]


def _local_and_global_scales_signature(extract: _SignatureFunction) -> _SignatureFunction:
    def ExtractFeatures(input_image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind):
        return extract(input_image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind)

    return ExtractFeatures


def _local_signature(extract: _SignatureFunction) -> _SignatureFunction:
    def ExtractFeatures(input_image, input_scales, input_max_feature_num, input_abs_thres):
        return extract(input_image, input_scales, input_max_feature_num, input_abs_thres, None)

    return ExtractFeatures


def _global_scales_signature(extract: _SignatureFunction) -> _SignatureFunction:
    def ExtractFeatures(input_image, input_scales, input_global_scales_ind):
        return extract(input_image, input_scales, None, None, input_global_scales_ind)

    return ExtractFeatures


def _image_and_scales_signature(extract: _SignatureFunction) -> _SignatureFunction:
    def ExtractFeatures(input_image, input_scales):
        return extract(input_image, input_scales, None, None, None)

    return ExtractFeatures


class DelgExtractionModule(tf.Module):
    """Wraps a DelgKerasModel into one `ExtractFeatures` tf.function with the official input signature.

    local / global_:       build a local-only or global-only module (the official DELF-local and
                           global-only exports); at least one must be on.
    global_scales_input:   False gives the Kaggle-2020-style model: no input_global_scales_ind and one global
                           row per input scale.
    global_at_all_scales:  run block4 + GeM + embedding at every scale and keep the requested rows (the
                           official computation); default False computes them only where requested.
    iou_threshold:         NMS IoU (1.0, the official export default, suppresses nothing).
    fold_batchnorm:        run a copy of the weights with every BatchNorm folded into its convolution (default;
                           beam_job/delg/folded.py: faster, within float32 rounding of the layer-by-layer graph;
                           a snapshot of the weights at construction). False runs the model layer by layer.
    The official computation is global_at_all_scales=True, fold_batchnorm=False.

    Inputs (in this positional order, only those that apply): input_image uint8 [H,W,3], input_scales
    float32 [S], input_max_feature_num int32 [], input_abs_thres float32 [], input_global_scales_ind int32 [G].
    Outputs (float32): boxes [N,4], features [N,128], scales [N], scores [N,1], global_descriptors [G',2048].
    """

    def __init__(
        self,
        model,
        *,
        local: bool = True,
        global_: bool = True,
        global_scales_input: bool = True,
        global_at_all_scales: bool = False,
        iou_threshold: float = 1.0,
        fold_batchnorm: bool = True,
        name: str | None = None,
    ):
        super().__init__(name=name)
        if not (local or global_):
            raise ValueError("DelgExtractionModule needs local=True or global_=True (both off extracts nothing)")
        self.fold_batchnorm = bool(fold_batchnorm)
        if self.fold_batchnorm:
            # The folded weights replace the model's in this module (and in its exports); the model itself is
            # not tracked, so a SavedModel holds one copy of the weights.
            self.arch = model.arch
            self.net = FoldedWeights(model)
        else:
            self.arch = model.arch
            self.net = model
        self.local = bool(local)
        self.global_ = bool(global_)
        self.global_scales_input = bool(global_scales_input) and self.global_
        self.global_at_all_scales = bool(global_at_all_scales)
        self.iou_threshold = float(iou_threshold)
        names = ["input_image", "input_scales"]
        if self.local:
            names += ["input_max_feature_num", "input_abs_thres"]
        if self.global_scales_input:
            names.append("input_global_scales_ind")
        # Tuples: tf.Module would wrap lists into tracked ListWrappers.
        self.input_names: tuple[str, ...] = tuple(names)
        self.output_names: tuple[str, ...] = (LOCAL_OUTPUTS if self.local else ()) + (
            (GLOBAL_OUTPUT,) if self.global_ else ()
        )
        # autograph=False: the graph uses explicit tf.while_loop / tf.cond; converting Keras' Python code with
        # autograph would only slow tracing (and export) down several-fold.
        self.ExtractFeatures = tf.function(
            self._signature_function(), input_signature=[_SPECS[n] for n in self.input_names], autograph=False
        )

    @staticmethod
    def input_spec(name: str) -> tf.TensorSpec:
        """The official TensorSpec of an input name (dtype and shape)."""
        return _SPECS[name]

    def _signature_function(self) -> _SignatureFunction:
        """A Python function whose argument names are exactly the official input names of this variant."""
        if self.local and self.global_scales_input:
            return _local_and_global_scales_signature(self._extract)
        if self.local:
            return _local_signature(self._extract)
        if self.global_scales_input:
            return _global_scales_signature(self._extract)
        return _image_and_scales_signature(self._extract)

    # ------------------------------------------------------------------------------------------------------
    def _extract(self, image, scales, max_feature_num, abs_thres, global_ind) -> dict[str, tf.Tensor]:
        net = self.net
        local_dim = int(self.arch.local_dim)
        embedding_dim = int(self.arch.embedding_dim)
        normalized = (tf.cast(image, tf.float32) - 128.0) / 128.0
        normalized = tf.expand_dims(normalized, 0)
        hw = tf.cast(tf.shape(image)[0:2], tf.float32)
        num_scales = tf.shape(scales)[0]
        wanted = self._wanted_scales(num_scales, global_ind)

        def level_size(k):
            return tf.cast(tf.round(hw * scales[k]), tf.int32)

        def has_cells(k):
            return tf.reduce_min(level_size(k)) >= MIN_LEVEL_SIZE

        def resize(k):
            # A level of 1-4 px has an empty grid: the official graph gives no cells there (oneDNN's max-pool
            # kernel refuses an empty output, so the trunk runs at MIN_LEVEL_SIZE and its grid is cut to 0 x 0
            # below, in local_grid). A 0-px level fails in tf.image.resize, as in the official graph.
            size = level_size(k)
            safe = tf.where(tf.reduce_min(size) > 0, tf.maximum(size, MIN_LEVEL_SIZE), size)
            return tf.image.resize(normalized, safe)

        def local_grid(k, tensor):
            """The grid of level k, or none of its rows when the level is under MIN_LEVEL_SIZE."""
            return tensor[:, : tf.where(has_cells(k), tf.shape(tensor)[1], 0)]

        def array(shape):
            return tf.TensorArray(tf.float32, size=num_scales, element_shape=tf.TensorShape(shape),
                                  infer_shape=False)

        def loop(body, arrays):
            return tf.while_loop(lambda k, *_: k < num_scales, body, (tf.constant(0), *tuple(arrays)),
                                 parallel_iterations=1)[1:]

        # Loop 1, local: trunk + attention + descriptors at every scale. Every cell is collected and thresholded
        # after the loop (same rows, same order as the official per-scale threshold), so this loop depends on
        # input_image and input_scales only. The block3 maps are kept for the global head (about 25 MB for R50
        # at 768x1024 over the 7 official scales).
        def local_body(k, boxes_ta, feats_ta, scales_ta, scores_ta, block3_ta):
            scale = scales[k]
            block3 = net.block3(resize(k))
            prob, desc = net.local_heads(block3)
            prob, desc = local_grid(k, prob), local_grid(k, desc)
            scores = tf.reshape(prob, [-1])
            boxes_ta = boxes_ta.write(k, receptive_boxes(tf.shape(prob)[1], tf.shape(prob)[2], scale))
            feats_ta = feats_ta.write(k, tf.reshape(desc, [-1, local_dim]))
            scores_ta = scores_ta.write(k, scores)
            scales_ta = scales_ta.write(k, tf.ones_like(scores) / scale)
            if self.global_:
                block3_ta = block3_ta.write(k, block3)
            return k + 1, boxes_ta, feats_ta, scales_ta, scores_ta, block3_ta

        if self.local:
            boxes_ta, feats_ta, scales_ta, scores_ta, block3_ta = loop(
                local_body,
                (array([None, 4]), array([None, local_dim]), array([None]), array([None]),
                 array([1, None, None, int(self.arch.block3_channels)])),
            )

        # Loop 2, global: block4 + GeM + embedding at the wanted scales only (all scales with
        # global_at_all_scales), from loop 1's block3 maps, or from the image when there is no local head.
        # Being a separate loop, the local outputs do not depend on input_global_scales_ind and the global
        # output does not depend on the local inputs: `.prune` works for either output alone.
        def global_body(k, global_ta):
            def row():
                block3 = block3_ta.read(k) if self.local else net.block3(resize(k))
                value = tf.reshape(net.forward_global(block3), [-1, embedding_dim])
                # GeM over the empty grid of a level under MIN_LEVEL_SIZE is a mean of nothing: NaN, as the
                # official graph gives (only reachable with a global scale index on such a level).
                return tf.where(has_cells(k), value, tf.fill(tf.shape(value), float("nan")))

            if self.global_at_all_scales:
                value = row()
            else:
                value = tf.cond(wanted[k], row, lambda: tf.zeros([0, embedding_dim], tf.float32))
            return k + 1, global_ta.write(k, value)

        if self.global_:
            (global_ta,) = loop(global_body, (array([None, embedding_dim]),))

        outputs: dict[str, tf.Tensor] = (
            self._local_outputs(boxes_ta, feats_ta, scales_ta, scores_ta, max_feature_num, abs_thres)
            if self.local else {})
        if self.global_:
            outputs[GLOBAL_OUTPUT] = self._global_output(global_ta, wanted)
        return outputs

    def _wanted_scales(self, num_scales, global_ind) -> tf.Tensor:
        """Which pyramid levels feed the global descriptor (a bool per level)."""
        if not self.global_:
            return tf.zeros([num_scales], tf.bool)
        if global_ind is None:
            return tf.ones([num_scales], tf.bool)
        return tf.reduce_any(tf.equal(tf.range(num_scales)[:, None], tf.reshape(global_ind, [1, -1])), axis=1)

    def _local_outputs(self, boxes_ta, feats_ta, scales_ta, scores_ta, max_feature_num, abs_thres
                       ) -> dict[str, tf.Tensor]:
        """Threshold every cell of every level, then non-maximum suppression: the local outputs, named."""
        local_dim = int(self.arch.local_dim)
        outputs: dict[str, tf.Tensor] = {}
        scores = scores_ta.concat()
        keep = tf.reshape(tf.where(scores >= abs_thres), [-1])
        boxes = tf.gather(boxes_ta.concat(), keep)
        feats = tf.gather(feats_ta.concat(), keep)
        cell_scales = tf.gather(scales_ta.concat(), keep)
        scores = tf.gather(scores, keep)
        max_out = tf.minimum(max_feature_num, tf.shape(scores)[0])
        selected = tf.image.non_max_suppression(boxes, scores, max_out, iou_threshold=self.iou_threshold)
        outputs["boxes"] = tf.identity(tf.reshape(tf.gather(boxes, selected), [-1, 4]), name="boxes")
        outputs["features"] = tf.identity(
            tf.reshape(tf.gather(feats, selected), [-1, local_dim]), name="features"
        )
        outputs["scales"] = tf.identity(tf.reshape(tf.gather(cell_scales, selected), [-1]), name="scales")
        outputs["scores"] = tf.identity(tf.reshape(tf.gather(scores, selected), [-1, 1]), name="scores")
        return outputs

    def _global_output(self, global_ta, wanted) -> tf.Tensor:
        """The rows of the wanted levels' global descriptors, named as the official output."""
        rows = global_ta.concat()
        if self.global_at_all_scales:
            rows = tf.gather(rows, tf.reshape(tf.where(wanted), [-1]))
        # The official export's static shape is [None, None]; relax ours to match.
        rows = tf.compat.v1.placeholder_with_default(rows, shape=[None, None])
        return tf.identity(rows, name=GLOBAL_OUTPUT)

    def __call__(self, image, scales, max_feature_num=1000, abs_thres=0.0, global_scales_ind=None):
        """Eager convenience: numpy/tensor inputs -> dict of numpy arrays (only the inputs this variant takes)."""
        values = {
            "input_image": tf.convert_to_tensor(image, tf.uint8),
            "input_scales": tf.convert_to_tensor(scales, tf.float32),
            "input_max_feature_num": tf.convert_to_tensor(max_feature_num, tf.int32),
            "input_abs_thres": tf.convert_to_tensor(abs_thres, tf.float32),
            "input_global_scales_ind": tf.convert_to_tensor(
                list(range(len(scales))) if global_scales_ind is None else global_scales_ind, tf.int32
            ),
        }
        result = self.ExtractFeatures(*[values[n] for n in self.input_names])
        return {k: v.numpy() for k, v in result.items()}
