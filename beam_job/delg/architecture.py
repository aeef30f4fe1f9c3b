"""Hyper-parameters of our Keras DELG: the ResNet stage layout, head widths and the fixed export geometry."""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Dict, Tuple, Union

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


@dataclass(frozen=True)
class DelgArchitecture:
    """One DELG backbone + heads configuration.

    units:            bottleneck units per stage (conv2_x, conv3_x, conv4_x, conv5_x), e.g. (3, 4, 6, 3).
    stem_filters:     channels of conv1 (7x7 / 2).
    stage_filters:    bottleneck width of each stage; the unit output has stage_filters * expansion channels.
    expansion:        bottleneck expansion (4 for ResNet).
    attention_width:  channels of attention.conv1 (512 officially).
    embedding_dim:    output of the global embedding Dense (2048, matches the output schema).
    local_dim:        autoencoder bottleneck = local descriptor size (128, matches the output schema).
    gem_power:        GeM exponent (3, fixed).
    block3_strides:   sub-sample block3 by a 1x1 / 2 max-pool so the local grid has stride 32 (True officially).
    """

    name: str
    units: Tuple[int, int, int, int]
    stem_filters: int = 64
    stage_filters: Tuple[int, int, int, int] = (64, 128, 256, 512)
    expansion: int = 4
    attention_width: int = 512
    embedding_dim: int = 2048
    local_dim: int = 128
    gem_power: float = 3.0
    block3_strides: bool = True

    def __post_init__(self) -> None:
        if len(self.units) != 4 or any(int(u) < 1 for u in self.units):
            raise ValueError(f"units must be 4 positive ints (one per stage), got {self.units}")
        if max(self.units) > len(string.ascii_lowercase):
            raise ValueError(f"at most 26 units per stage (unit names l<stage>a..z), got {self.units}")
        if len(self.stage_filters) != 4 or any(int(f) < 1 for f in self.stage_filters):
            raise ValueError(f"stage_filters must be 4 positive ints, got {self.stage_filters}")
        for name in ("stem_filters", "expansion", "attention_width", "embedding_dim", "local_dim"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)}")

    @property
    def block3_channels(self) -> int:
        """Channels of the local feature map (1024 for ResNet-50/101)."""
        return self.stage_filters[2] * self.expansion

    @property
    def block4_channels(self) -> int:
        """Channels of the global feature map (2048 for ResNet-50/101)."""
        return self.stage_filters[3] * self.expansion

    def unit_names(self, stage_index: int) -> Tuple[str, ...]:
        """Official unit names of a stage: stage_index 0..3 -> 'l2a', 'l2b', ... 'l5c' (R101: l4a..l4w)."""
        return tuple(f"l{stage_index + 2}{string.ascii_lowercase[k]}" for k in range(self.units[stage_index]))


ARCHITECTURES: Dict[str, DelgArchitecture] = {
    "r50": DelgArchitecture(name="r50", units=(3, 4, 6, 3)),
    "r101": DelgArchitecture(name="r101", units=(3, 4, 23, 3)),
    # Tests only: one unit per stage and very few channels, but the official output sizes (2048 / 128)
    # and the same strides, so the receptive boxes and the output schema are those of the real model.
    "tiny": DelgArchitecture(
        name="tiny", units=(1, 1, 1, 1), stem_filters=8, stage_filters=(8, 16, 32, 64), attention_width=16
    ),
}


def get_architecture(arch: Union[str, DelgArchitecture]) -> DelgArchitecture:
    """Resolve a name ('r50', 'r101', 'tiny') or pass a DelgArchitecture through."""
    if isinstance(arch, DelgArchitecture):
        return arch
    try:
        return ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unknown DELG architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}") from None
