"""The typed per-image DELG result (global descriptor + local features) shared by every layer.

Pure numpy. Local features are not batched: N varies per image and N == 0 is a valid result.

Conventions (the same as the official DELG extractor):
  * locations are (y, x) = (row, column), the centre of each keypoint's receptive box, in pixels of
    the ORIGINAL decoded image (after EXIF rotation when that is on), unless the config asked for
    resized coordinates. (0, 0) is the top-left corner of the first pixel; the reference does not
    add a half-pixel offset and neither do we.
  * scales are 1 / pyramid_scale, NOT corrected for the pre-resize to max_image_size (as in the reference).
  * attention is the softplus attention score the keypoint was selected with; features are sorted by
    attention, highest first.
  * descriptors and the global descriptor are L2-normalised float32 (after optional PCA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GLOBAL_DIM = 2048
LOCAL_DIM = 128


@dataclass(frozen=True)
class DelgFeatures:
    """Features of one image.

    global_descriptor: (D,) float32, unit norm; shape (0,) when the model has no global head or the
                       image was too small (< 10 px after resize).
    locations:         (N, 2) float32, (y, x) in original-image pixels.
    descriptors:       (N, d) float32, unit-norm rows (d = 128 for DELG, or the PCA dim).
    scales:            (N,) float32, 1 / pyramid scale of the level each feature came from.
    attention:         (N,) float32, descending.
    original_hw:       (height, width) of the decoded image.
    processed_hw:      (height, width) fed to the model after the max/min-size resize.
    scale_factors:     (processed_h / original_h, processed_w / original_w).
    """

    global_descriptor: np.ndarray
    locations: np.ndarray
    descriptors: np.ndarray
    scales: np.ndarray
    attention: np.ndarray
    original_hw: tuple[int, int]
    processed_hw: tuple[int, int]
    scale_factors: tuple[float, float]

    @property
    def num_features(self) -> int:
        return int(self.locations.shape[0])

    @property
    def has_global(self) -> bool:
        return self.global_descriptor.size > 0

    @classmethod
    def empty(
        cls,
        original_hw: tuple[int, int],
        processed_hw: tuple[int, int],
        scale_factors: tuple[float, float],
        local_dim: int = LOCAL_DIM,
    ) -> DelgFeatures:
        """No features at all (the reference's answer for images under 10 px after resize)."""
        return cls(
            global_descriptor=np.zeros((0,), np.float32),
            locations=np.zeros((0, 2), np.float32),
            descriptors=np.zeros((0, local_dim), np.float32),
            scales=np.zeros((0,), np.float32),
            attention=np.zeros((0,), np.float32),
            original_hw=(int(original_hw[0]), int(original_hw[1])),
            processed_hw=(int(processed_hw[0]), int(processed_hw[1])),
            scale_factors=(float(scale_factors[0]), float(scale_factors[1])),
        )

    def validate(self) -> DelgFeatures:
        """Check shapes and dtypes; returns self so it can be chained. Raises ValueError."""
        n = self.num_features
        checks = [
            (self.global_descriptor.ndim == 1, "global_descriptor must be 1-D"),
            (self.locations.shape == (n, 2), f"locations must be (N, 2), got {self.locations.shape}"),
            (self.descriptors.ndim == 2 and self.descriptors.shape[0] == n, "descriptors must be (N, d)"),
            (self.scales.shape == (n,), f"scales must be (N,), got {self.scales.shape}"),
            (self.attention.shape == (n,), f"attention must be (N,), got {self.attention.shape}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("global_descriptor", "locations", "descriptors", "scales", "attention"):
            if getattr(self, name).dtype != np.float32:
                raise ValueError(f"{name} must be float32, got {getattr(self, name).dtype}")
        return self
