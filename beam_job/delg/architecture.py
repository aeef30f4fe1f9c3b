"""The fixed geometry of our Keras DELG export: receptive boxes of the feature grid, and the layers' epsilons.

The backbones' stage layouts and head widths (`DelgArchitecture`, `ARCHITECTURES`, `get_architecture`) are
pure settings and live with the settings, in beam_job.config (the layer below the model).
"""

from __future__ import annotations

# Receptive field of one block3 cell (stride 32 with block3 sub-sampling), hard-coded in the official export:
# the box of cell (i, j) is [32i - 145, 32j - 145, 32i - 145 + 290, 32j - 145 + 290] (ymin, xmin, ymax, xmax).
RECEPTIVE_FIELD = 291.0
FEATURE_STRIDE = 32.0
RECEPTIVE_PADDING = 145.0
# Receptive box of cell (i, j) at the fed image's pixels: FEATURE_STRIDE * (i, j, i, j) + RECEPTIVE_BOX_OFFSETS.
RECEPTIVE_BOX_OFFSETS = (-RECEPTIVE_PADDING, -RECEPTIVE_PADDING, -RECEPTIVE_PADDING + RECEPTIVE_FIELD - 1.0,
                         -RECEPTIVE_PADDING + RECEPTIVE_FIELD - 1.0)

GEM_EPS = 1e-6
BN_EPSILON = 1e-3
