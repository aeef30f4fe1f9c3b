"""Extraction settings: one frozen, validated ExtractionConfig, the named presets and our model's backbones.

Pure Python: no TensorFlow, no Beam. Every value of the official DELG presets comes from the official
configs (`r50delg_gldv2clean_config.pbtxt` and siblings in tensorflow/models research/delf).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import string
from dataclasses import dataclass
from typing import Any

# The seven pyramid scales of every official DELG config (0.25 ... 2.0, powers of sqrt(2)).
OFFICIAL_SCALES: tuple[float, ...] = (0.25, 0.35355338, 0.5, 0.70710677, 1.0, 1.4142135, 2.0)
KAGGLE_SCALES: tuple[float, ...] = (0.70710677, 1.0, 1.4142135)

# Largest decoded image accepted before any pixel is decoded (width * height). 100 MP covers every
# camera photo; a decompression bomb (e.g. a 50000x50000 PNG header) is refused from its header.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000

EMBEDDED_MODEL_PREFIX = "embedded:"

# The model takes input_max_feature_num as a TensorFlow int32 scalar, and level sizes are int32 too.
INT32_MAX = 2**31 - 1

# The smallest pyramid level, in pixels a side, with a feature grid: the trunk's valid 3x3 max-pool leaves
# no cell on a level of 1-4 px (no local feature, a NaN global row) and a level of 0 px fails the image
# (beam_job/delg/graph.py uses this constant). A scale must bring the largest image the settings allow to
# at least this size, or it can never give anything (ExtractionConfig.smallest_scale).
MIN_LEVEL_SIZE = 5

# Compute precisions of the model (beam_job.delg.precision): fp32 is the model as exported, bf16 opt-in.
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")


# The backbones our own Keras DELG is built with (beam_job.delg.keras_model; the export's fixed geometry is in
# beam_job.delg.architecture). Pure settings, kept here so that the config names them without importing the model.
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
    units: tuple[int, int, int, int]
    stem_filters: int = 64
    stage_filters: tuple[int, int, int, int] = (64, 128, 256, 512)
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

    def unit_names(self, stage_index: int) -> tuple[str, ...]:
        """Official unit names of a stage: stage_index 0..3 -> 'l2a', 'l2b', ... 'l5c' (R101: l4a..l4w)."""
        return tuple(f"l{stage_index + 2}{string.ascii_lowercase[k]}" for k in range(self.units[stage_index]))


ARCHITECTURES: dict[str, DelgArchitecture] = {
    "r50": DelgArchitecture(name="r50", units=(3, 4, 6, 3)),
    "r101": DelgArchitecture(name="r101", units=(3, 4, 23, 3)),
    # Tests only: one unit per stage and very few channels, but the official output sizes (2048 / 128)
    # and the same strides, so the receptive boxes and the output schema are those of the real model.
    "tiny": DelgArchitecture(
        name="tiny", units=(1, 1, 1, 1), stem_filters=8, stage_filters=(8, 16, 32, 64), attention_width=16
    ),
}


def get_architecture(arch: str | DelgArchitecture) -> DelgArchitecture:
    """Resolve a name ('r50', 'r101', 'tiny') or pass a DelgArchitecture through."""
    if isinstance(arch, DelgArchitecture):
        return arch
    try:
        return ARCHITECTURES[arch]
    except (KeyError, TypeError):
        raise ValueError(f"unknown DELG architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}") from None


@dataclass(frozen=True)
class PcaConfig:
    """PCA / whitening applied after per-row L2 normalisation, as the official extractor does.

    Files are DatumProto files as written by the official code (`*.datum`) or `.npy` arrays.
    """

    mean_path: str
    projection_matrix_path: str
    pca_dim: int
    use_whitening: bool = False
    variances_path: str | None = None

    def __post_init__(self) -> None:
        if self.pca_dim <= 0:
            raise ValueError(f"pca_dim must be positive, got {self.pca_dim}")
        if self.use_whitening and not self.variances_path:
            raise ValueError("use_whitening=True needs variances_path (the PCA variances file)")


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that decides which features come out of an image.

    Attributes mirror the official `DelfConfig` fields where one exists:
      image_scales        pyramid scales fed as `input_scales`.
      global_scales_ind   indices into image_scales whose global rows are pooled (`input_global_scales_ind`).
      max_feature_num     at most this many local features (`input_max_feature_num`).
      score_threshold     attention threshold (`input_abs_thres`); model specific.
      max_image_size      the longest side is shrunk to this before the pyramid (-1: off).
      min_image_size      the longest side is grown to this (-1: off).
      use_square_images   resize to a square (reference `use_square_images`).
      use_resized_coordinates  keep locations in resized-image pixels instead of original pixels.
    Our additions (not in the official config):
      model               model URI: local dir, gs:// dir, .tar.gz (local/gs:///http(s)://), or
                          "embedded:<arch>" for our built-in untrained model. None: must be given at run time.
      architecture        backbone of our own Keras DELG ("r50", "r101", "tiny"); used by exporter/embedded.
      apply_exif_orientation  rotate by the EXIF orientation tag (the reference does not).
      max_image_pixels    decompression-bomb guard, checked on the header before decoding.
      untrained           the model has random weights: features are meaningless for retrieval.
      precision           "fp32" (default: the model as exported, bit-identical to the official extractor)
                          or "bf16" (bfloat16 compute on CPUs with native bf16, float32 outputs; an
                          approximation, see docs/delg-core.md).
    """

    name: str
    description: str = ""
    model: str | None = None
    official_model_url: str | None = None
    architecture: str = "r50"
    image_scales: tuple[float, ...] = OFFICIAL_SCALES
    global_scales_ind: tuple[int, ...] = (3, 4, 5)
    max_feature_num: int = 1000
    score_threshold: float = 100.0
    max_image_size: int = 1024
    min_image_size: int = -1
    use_square_images: bool = False
    use_local_features: bool = True
    use_global_features: bool = True
    use_resized_coordinates: bool = False
    apply_exif_orientation: bool = True
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    global_pca: PcaConfig | None = None
    local_pca: PcaConfig | None = None
    untrained: bool = False
    precision: str = "fp32"

    def __post_init__(self) -> None:
        # Normalise sequences so configs built from lists compare and hash like preset ones.
        object.__setattr__(self, "image_scales", tuple(float(s) for s in self.image_scales))
        object.__setattr__(self, "global_scales_ind", tuple(int(i) for i in self.global_scales_ind))
        self._check_pyramid()
        self._check_sizes()
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")

    def _check_pyramid(self) -> None:
        """The scales, the attention threshold and which outputs are on (ValueError, one line)."""
        if not self.image_scales:
            raise ValueError("image_scales is empty: give at least one pyramid scale, e.g. 1.0")
        if not all(math.isfinite(s) and s > 0 for s in self.image_scales):
            raise ValueError(f"image_scales must all be > 0 and finite, got {list(self.image_scales)}")
        object.__setattr__(self, "score_threshold", float(self.score_threshold))
        if not math.isfinite(self.score_threshold):
            raise ValueError(f"score_threshold must be a finite number, got {self.score_threshold}")
        if not (self.use_local_features or self.use_global_features):
            raise ValueError("use_local_features and use_global_features are both off: nothing to extract")
        if self.use_global_features:
            if not self.global_scales_ind:
                raise ValueError("global_scales_ind is empty while global features are on")
            bad = [i for i in self.global_scales_ind if not 0 <= i < len(self.image_scales)]
            if bad:
                raise ValueError(
                    f"global_scales_ind {list(bad)} out of range for {len(self.image_scales)} image_scales"
                )

    def _check_sizes(self) -> None:
        """Whole numbers in range for the sizes and the feature count, and no scale below a usable level."""
        for name in ("max_feature_num", "max_image_size", "min_image_size", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not 0 < self.max_feature_num <= INT32_MAX:
            raise ValueError(f"max_feature_num must be between 1 and {INT32_MAX} (the model takes it as an int32), "
                             f"got {self.max_feature_num}")
        for name in ("max_image_size", "min_image_size"):
            value = getattr(self, name)
            if value == 0 or value < -1 or value > INT32_MAX:
                raise ValueError(f"{name} must be -1 (off) or a positive size up to {INT32_MAX}, got {value}")
        if self.max_image_pixels <= 0:
            raise ValueError(f"max_image_pixels must be > 0, got {self.max_image_pixels}")
        smallest, side, why = self.smallest_scale
        small = [s for s in self.image_scales if s < smallest]
        if small:
            shown = next(f"{v:.{d}g}" for d in range(3, 18) for v in (smallest,) if float(f"{v:.{d}g}") >= v)
            raise ValueError(
                f"image_scales {', '.join(f'{s:g}' for s in small)} too small: at most {side} px a side ({why}), an "
                f"image would be under {MIN_LEVEL_SIZE} px there, where no feature can come out (a 0-px level "
                f"fails the image); the smallest usable scale here is {shown}")

    @property
    def smallest_scale(self) -> tuple[float, int, str]:
        """(the smallest usable pyramid scale, the largest side both of an image's sides can have here, why).

        Before the pyramid the longest side is shrunk to max_image_size or grown to min_image_size; without a
        max_image_size, an image of at most max_image_pixels has both sides at most its square root (or its
        longest side, squared up by use_square_images). A scale under MIN_LEVEL_SIZE / that side gives every
        image a level without a feature grid.
        """
        if self.max_image_size > 0:
            side, why = self.max_image_size, f"max_image_size {self.max_image_size}"
        elif self.use_square_images:
            side, why = self.max_image_pixels, f"max_image_pixels {self.max_image_pixels}, squared up"
        else:
            side, why = math.isqrt(self.max_image_pixels), f"max_image_pixels {self.max_image_pixels}"
        if self.min_image_size > side:
            side, why = self.min_image_size, f"min_image_size {self.min_image_size}"
        return MIN_LEVEL_SIZE / side, side, why

    @property
    def is_embedded_model(self) -> bool:
        return bool(self.model and self.model.startswith(EMBEDDED_MODEL_PREFIX))

    def replace(self, **overrides: Any) -> ExtractionConfig:
        """A copy with some fields changed (validated again). Unknown names raise ValueError."""
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExtractionConfig:
        data = dict(data)
        for key in ("global_pca", "local_pca"):
            if data.get(key) is not None:
                data[key] = PcaConfig(**data[key])
        return cls(**data)


_OFFICIAL_URL = "https://storage.googleapis.com/delf/{}.tar.gz"


def _official(name: str, tarball: str, architecture: str, threshold: float, training: str) -> ExtractionConfig:
    return ExtractionConfig(
        name=name,
        description=f"Official DELG {architecture.upper()} trained on {training} ({tarball}); "
        f"7 scales, global at 0.707/1/1.414, threshold {threshold}.",
        model=None,
        official_model_url=_OFFICIAL_URL.format(tarball),
        architecture=architecture,
        image_scales=OFFICIAL_SCALES,
        global_scales_ind=(3, 4, 5),
        max_feature_num=1000,
        score_threshold=threshold,
        max_image_size=1024,
    )


PRESETS: dict[str, ExtractionConfig] = {
    "r50_gldv2clean": _official("r50_gldv2clean", "r50delg_gldv2clean_20200914", "r50", 454.6, "GLDv2-clean"),
    "r101_gldv2clean": _official("r101_gldv2clean", "r101delg_gldv2clean_20200914", "r101", 357.48, "GLDv2-clean"),
    "r50_gld": _official("r50_gld", "r50delg_gld_20200814", "r50", 175.0, "GLDv1"),
    "r101_gld": _official("r101_gld", "r101delg_gld_20200814", "r101", 166.1, "GLDv1"),
    "kaggle2020": ExtractionConfig(
        name="kaggle2020",
        description="Kaggle Landmark Recognition 2020 baseline setting: 3 scales (0.707/1/1.414), all global, "
        "threshold 175, 1000 features, no pre-resize. Use with the Kaggle-hosted DELG SavedModel.",
        model=None,
        architecture="r50",
        image_scales=KAGGLE_SCALES,
        global_scales_ind=(0, 1, 2),
        max_feature_num=1000,
        score_threshold=175.0,
        max_image_size=-1,
    ),
    "embedded": ExtractionConfig(
        name="embedded",
        description="Our Keras DELG R50 with FIXED-SEED RANDOM weights, exported on first use. Runs with nothing "
        "downloaded; its features are UNTRAINED and MEANINGLESS for retrieval. Official schedule of scales; "
        "threshold 0 so local features are produced.",
        model=EMBEDDED_MODEL_PREFIX + "r50",
        architecture="r50",
        image_scales=OFFICIAL_SCALES,
        global_scales_ind=(3, 4, 5),
        max_feature_num=1000,
        score_threshold=0.0,
        max_image_size=1024,
        untrained=True,
    ),
    "tiny": ExtractionConfig(
        name="tiny",
        description="Test configuration: a tiny untrained DELG (few channels, one unit per stage), images "
        "capped at 96 px, 2 scales. For tests and smoke runs only.",
        model=EMBEDDED_MODEL_PREFIX + "tiny",
        architecture="tiny",
        image_scales=(0.70710677, 1.0),
        global_scales_ind=(0, 1),
        max_feature_num=64,
        score_threshold=0.0,
        max_image_size=96,
        untrained=True,
    ),
}


def get_preset(name: str, **overrides: Any) -> ExtractionConfig:
    """The named preset, with optional field overrides (validated)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base
