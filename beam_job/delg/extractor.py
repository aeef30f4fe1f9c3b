"""DelgExtractor: one model call per image, then post-processing exactly as the official DELG extractor.

Per image (official `extractor.MakeExtractor` / `ExtractorFn`, TF2 version):
  1. reference resize (imaging.prepare_image); if the resized image is under 10 px high or wide, return
     empty features without running the model;
  2. ONE model call computing local and global outputs together;
  3. global: tf.nn.l2_normalize of each scale row (axis 1), optional PCA (+whitening) and L2 again,
     tf.reduce_sum over rows, tf.nn.l2_normalize (axis 0) -> (D,) unit vector;
  4. local: attention = scores reshaped to [N]; locations = receptive-box centres
     ((ymin+ymax)/2, (xmin+xmax)/2) in (y, x); unless use_resized_coordinates, `locations / scale_factors`
     as the reference computes it (a float32 tensor divided by the float64 factors, which TensorFlow casts
     to float32); descriptors L2-normalised per row (optional PCA + L2); scales passed through.
The same TensorFlow ops as the reference are used so results agree to the last bit on the same machine.
"""

from __future__ import annotations

import logging

import numpy as np

from beam_job.config import ExtractionConfig
from beam_job.features import LOCAL_DIM, DelgFeatures

logger = logging.getLogger(__name__)

# The reference returns empty features for images under this size after the resize (_MIN_HEIGHT/_MIN_WIDTH).
MIN_SIDE = 10


def _pca_tensors(params):
    import tensorflow as tf

    return {
        "mean": tf.constant(params.mean, dtype=tf.float32),
        "matrix": tf.constant(params.matrix, dtype=tf.float32),
        "dim": params.dim,
        "use_whitening": params.use_whitening,
        "variances": None if params.variances is None else tf.constant(params.variances, dtype=tf.float32),
    }


def _post_process_descriptors(descriptors, pca):
    """Row-wise L2, then optional PCA/whitening and L2 again (reference `PostProcessDescriptors`)."""
    import tensorflow as tf

    out = tf.nn.l2_normalize(descriptors, axis=1)
    if pca is not None:
        if int(descriptors.shape[1]) != int(pca["mean"].shape[0]):
            raise ValueError(
                f"PCA mean has {int(pca['mean'].shape[0])} dims but the model gives {int(descriptors.shape[1])}-d "
                "descriptors: use PCA files computed for this model"
            )
        matrix = tf.slice(pca["matrix"], [0, 0], [pca["dim"], -1])
        out = tf.matmul(tf.subtract(out, pca["mean"]), matrix, transpose_b=True)
        if pca["use_whitening"]:
            out = tf.divide(out, tf.sqrt(tf.slice(pca["variances"], [0], [pca["dim"]])))
        out = tf.nn.l2_normalize(out, axis=1)
    return out


def _model_uri(config: ExtractionConfig) -> str:
    """config.model, or a ValueError naming the official tarball to download when the preset has none."""
    if not config.model:
        url = config.official_model_url
        where = f"download {url} and pass it" if url else "pass a DELG SavedModel"
        raise ValueError(
            f"preset {config.name!r} has no model: {where} with --model <.tar.gz, unpacked directory or gs:// URI>"
        )
    return config.model


def _check_fits(config: ExtractionConfig, uri: str, has_local: bool, has_global: bool) -> None:
    """ValueError (one line) when the model lacks the outputs the config asks for."""
    if config.use_local_features and not has_local:
        raise ValueError(
            f"model {uri} has no local outputs (boxes, features, scales, scores) but the config asks for "
            "local features: set use_local_features=False or use a local+global DELG model"
        )
    if config.use_global_features and not has_global:
        raise ValueError(
            f"model {uri} has no global_descriptors output but the config asks for global features: "
            "set use_global_features=False or use a local+global DELG model"
        )


def check_extraction(config: ExtractionConfig, *, here: bool = True) -> str:
    """Check that `config` can run, WITHOUT restoring the model's weights; returns the model identity.

    Runs the checks DelgExtractor runs at construction: the model's inputs and outputs (read from its
    saved_model.pb, beam_job.delg.loader.inspect_delg_model), the outputs the config needs, the precision on
    this machine (here=False: its name only, for a launcher whose workers run elsewhere and check their own CPUs
    at model load) and the PCA files. Raises ValueError (ModelLoadError for model problems), one line.
    """
    from beam_job.delg.loader import inspect_delg_model
    from beam_job.delg.precision import check_precision, with_precision

    uri = _model_uri(config)
    problem = check_precision(config.precision, here=here)
    if problem:
        raise ValueError(problem)
    _, info = inspect_delg_model(uri)
    _check_fits(config, uri, info.has_local, info.has_global)
    for pca, wanted in ((config.global_pca, config.use_global_features), (config.local_pca, config.use_local_features)):
        if pca is not None and wanted:
            from beam_job.delg.datum import load_pca

            load_pca(pca)
    return with_precision(info.identity, config.precision)


class DelgExtractor:
    """Extract DELG features from images with a loaded model and an ExtractionConfig.

    config: what to extract (scales, global_scales_ind, max_feature_num, score_threshold, resize rule,
            PCA, use_local_features / use_global_features).
    model:  a LoadedDelgModel; when None, `config.model` is loaded (local dir, gs://, .tar.gz, embedded:).
    Raises ValueError (ModelLoadError for model problems) at construction when the model cannot provide
    what the config asks for.
    """

    def __init__(self, config: ExtractionConfig, model=None):
        from beam_job.delg.loader import load_delg_model

        self.config = config
        if model is None:
            model = load_delg_model(_model_uri(config), precision=config.precision)
        elif model.precision != config.precision:
            raise ValueError(
                f"model {model.uri} was loaded in {model.precision} but the config asks for {config.precision}: "
                f"load it with load_delg_model(..., precision={config.precision!r})"
            )
        self.model = model
        _check_fits(config, model.uri, model.has_local, model.has_global)
        self._global_pca = self._local_pca = None
        if config.global_pca is not None and config.use_global_features:
            from beam_job.delg.datum import load_pca

            self._global_pca = _pca_tensors(load_pca(config.global_pca))
        if config.local_pca is not None and config.use_local_features:
            from beam_job.delg.datum import load_pca

            self._local_pca = _pca_tensors(load_pca(config.local_pca))
        self.local_dim = config.local_pca.pca_dim if config.local_pca and self._local_pca is not None else LOCAL_DIM
        if self.untrained:
            from beam_job.delg.embedded import warn_untrained

            warn_untrained(model.uri if model.is_embedded else f"{model.uri} (config {config.name!r}: untrained=True)")

    @property
    def untrained(self) -> bool:
        """True when features come from random weights (embedded model or a config marked untrained)."""
        return bool(self.config.untrained or self.model.is_embedded)

    @property
    def identity(self) -> str:
        """Model identity string ("<uri>@sha256:<12 hex>") for output metadata."""
        return self.model.identity

    def extract(self, image: np.ndarray, resize_factor: float = 1.0) -> DelgFeatures:
        """Features of one decoded image: (H, W, 3) uint8 RGB. resize_factor scales max/min_image_size."""
        from beam_job.imaging import prepare_image

        return self.extract_prepared(prepare_image(image, self.config, resize_factor=resize_factor))

    def extract_prepared(self, prepared) -> DelgFeatures:
        """Features of an image already resized by imaging.prepare_image (a PreparedImage)."""
        import tensorflow as tf

        config = self.config
        image = prepared.image
        processed_hw = (int(image.shape[0]), int(image.shape[1]))
        scale_factors = np.asarray(prepared.scale_factors, dtype=np.float64)
        factors_tuple = (float(scale_factors[0]), float(scale_factors[1]))
        if processed_hw[0] < MIN_SIDE or processed_hw[1] < MIN_SIDE:
            return DelgFeatures.empty(prepared.original_hw, processed_hw, factors_tuple, local_dim=self.local_dim)

        out = self.model.run(
            image,
            config.image_scales,
            config.max_feature_num,
            config.score_threshold,
            config.global_scales_ind,
        )

        global_descriptor = np.zeros((0,), np.float32)
        if config.use_global_features:
            per_scale = _post_process_descriptors(tf.constant(out["global_descriptors"]), self._global_pca)
            pooled = tf.reduce_sum(per_scale, axis=0)
            global_descriptor = tf.nn.l2_normalize(pooled, axis=0).numpy()

        if config.use_local_features:
            boxes = tf.constant(out["boxes"])
            scores = tf.constant(out["scores"])
            attention = tf.reshape(scores, [tf.shape(scores)[0]])
            locations = tf.divide(tf.add(tf.gather(boxes, [0, 1], axis=1), tf.gather(boxes, [2, 3], axis=1)), 2.0)
            descriptors = _post_process_descriptors(tf.constant(out["features"]), self._local_pca)
            if not config.use_resized_coordinates:
                # Exactly the reference's `locations /= scale_factors` (float32 tensor / float64 numpy array).
                locations = locations / scale_factors
            locations = locations.numpy().astype(np.float32, copy=False)
            descriptors = descriptors.numpy()
            scales = np.asarray(out["scales"], dtype=np.float32)
            attention = attention.numpy()
        else:
            locations = np.zeros((0, 2), np.float32)
            descriptors = np.zeros((0, self.local_dim), np.float32)
            scales = np.zeros((0,), np.float32)
            attention = np.zeros((0,), np.float32)

        return DelgFeatures(
            global_descriptor=np.asarray(global_descriptor, dtype=np.float32),
            locations=locations,
            descriptors=np.asarray(descriptors, dtype=np.float32),
            scales=scales,
            attention=np.asarray(attention, dtype=np.float32),
            original_hw=(int(prepared.original_hw[0]), int(prepared.original_hw[1])),
            processed_hw=processed_hw,
            scale_factors=factors_tuple,
        ).validate()
