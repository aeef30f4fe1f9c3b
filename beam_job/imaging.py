"""Image preparation for DELG: decode encoded bytes to RGB uint8 and apply the reference pre-resize rule.

Pure numpy/Pillow (no TensorFlow, no Beam). Two steps, as in the official extractor:

* `decode_image(bytes) -> (H, W, 3) uint8 RGB`. JPEG, PNG, WebP, BMP, TIFF, GIF (first frame) and a few
  siblings, in any Pillow mode. 8-bit modes convert exactly like the reference loader (PIL
  `convert('RGB')`); 16-bit, 32-bit integer and float images are scaled instead of clipped. EXIF
  orientation is applied by default (the reference does not). A decompression-bomb guard checks the
  header's width * height against a configurable limit before a single pixel is decoded.
* `resize_image` / `prepare_image`: the reference `ResizeImage` rule (max/min image size, square mode,
  resize factor, PIL bilinear, Python round half to even) with the scale factors that map resized pixels
  back to original ones.

Array conventions: images are (height, width, 3) uint8 arrays in RGB order, row 0 at the top.
Scale factors are (new_h / H, new_w / W). See docs/imaging.md for every rule and each departure from the
reference.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile

from beam_job.config import DEFAULT_MAX_IMAGE_PIXELS

if TYPE_CHECKING:  # pragma: no cover - typing only
    from beam_job.config import ExtractionConfig

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "SUPPORTED_FORMATS",
    "ImageDecodeError",
    "ImageError",
    "ImageTooLargeError",
    "PreparedImage",
    "decode_image",
    "prepare_image",
    "read_image_size",
    "resize_image",
]

logger = logging.getLogger(__name__)

# Pillow format ids we decode. Others Pillow knows (EPS runs Ghostscript, PSD, ICNS, ...) are refused on
# purpose: every extra parser is attack surface for a job that reads untrusted bytes. MPO is what Pillow
# calls multi-picture JPEGs written by many phones and cameras; PPM covers PBM/PGM/PPM.
SUPPORTED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "BMP", "DIB", "TIFF", "GIF", "PPM")

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

# EXIF Orientation tag (0x0112) values -> numpy view that displays the image upright. Same mapping as
# PIL.ImageOps.exif_transpose: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise,
# 7 transverse, 8 rotate 90 counter-clockwise. Arrays are (row, column, channel).
_ORIENTATION_TAG = 0x0112
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, k=-1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, k=1),
}

_LIMIT_HINT = "raise it with the config field max_image_pixels or the flag --max_image_pixels"


class ImageError(ValueError):
    """An image could not be turned into pixels. `stage` names the pipeline stage for failure records."""

    stage = "decode"


class ImageDecodeError(ImageError):
    """Corrupt, truncated, empty, unsupported or not an image at all."""


class ImageTooLargeError(ImageError):
    """The image declares more pixels than the configured limit (decompression-bomb guard)."""


# --------------------------------------------------------------------------------------------------
# Decoding


def _check_limit_argument(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {max_pixels!r}")


def _as_bytes(data) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data) if not isinstance(data, bytes) else data
    raise ImageDecodeError(f"image data must be bytes, got {type(data).__name__}")


def _identify_format(prefix: bytes) -> str | None:
    """Name of any Pillow format whose signature check accepts `prefix` (no parsing beyond that)."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        try:
            if accept is not None and accept(prefix) is True:
                return name
        except Exception:
            continue
    return None


def _open_lazy(data: bytes) -> ImageFile.ImageFile:
    """Parse the header of `data` with Pillow's plugin for its format; no pixel data is decoded.

    The plugin factories are called directly rather than through `Image.open` so that Pillow's
    process-wide `Image.MAX_IMAGE_PIXELS` check (a warning above ~89 MP, an error above ~179 MP) does not
    pre-empt our own configurable limit, and without changing any global state.
    """
    prefix = data[:16]
    Image.preinit()
    if any(name not in Image.OPEN for name in SUPPORTED_FORMATS):
        Image.init()
    problems = []
    for name in SUPPORTED_FORMATS:
        if name not in Image.OPEN:  # plugin not built into this Pillow
            continue
        factory, accept = Image.OPEN[name]
        try:
            accepted = accept is None or accept(prefix)
            if isinstance(accepted, str) or not accepted:
                continue
            return factory(io.BytesIO(data), "")
        except Image.DecompressionBombError as exc:
            # Only plugins that grow the size while parsing (a GIF frame larger than its screen) get here.
            raise ImageTooLargeError(
                f"{name} image refused while parsing its header: {exc} (Pillow's process-wide "
                "PIL.Image.MAX_IMAGE_PIXELS applies here on top of max_image_pixels / --max_image_pixels)"
            ) from exc
        except Exception as exc:
            problems.append(f"{name}: {' '.join((str(exc) or type(exc).__name__).split())}")
    if problems:
        raise ImageDecodeError(f"corrupt image header ({'; '.join(problems)})")
    other = _identify_format(prefix)
    if other is not None:
        raise ImageDecodeError(
            f"unsupported image format {other}; supported formats: {', '.join(SUPPORTED_FORMATS)}"
        )
    raise ImageDecodeError(
        f"not a recognised image ({len(data)} bytes, starting {data[:8].hex()}); "
        f"supported formats: {', '.join(SUPPORTED_FORMATS)}"
    )


_warned_truncated = False


def _warn_if_truncated_images_allowed() -> None:
    """Truncated files are errors unless some other code set Pillow's global LOAD_TRUNCATED_IMAGES."""
    global _warned_truncated
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated:
        _warned_truncated = True
        logger.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process (set by other code): truncated "
            "images will decode with grey filler instead of failing"
        )


def _too_large(width: int, height: int, max_pixels: int) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} pixels "
        f"(decompression-bomb guard); if the image is genuine, {_LIMIT_HINT}"
    )


def _load(img: ImageFile.ImageFile, pixels: int) -> None:
    """Decode the pixel data. Pillow's own bomb check still runs inside some plugins (TIFF) at load time."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    try:
        if pillow_limit is not None and pixels > pillow_limit:
            # Our limit already allowed this size; Pillow's warning would only be noise.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                img.load()
        else:
            img.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"Pillow refused to decode this {img.format} image of {pixels:,} pixels: {exc} "
            "(its process-wide limit is 2 * PIL.Image.MAX_IMAGE_PIXELS; raise that in the worker as well "
            "as max_image_pixels to decode such images)"
        ) from exc


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Pixels of a loaded Pillow image as (H, W, 3) uint8 RGB. Rules per mode: see docs/imaging.md."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        # 16-bit grey: keep the high byte (0..65535 -> 0..255). Pillow's convert would clip at 255.
        values = np.asarray(img).astype(np.uint16, copy=False)
        return _gray_to_rgb((values >> 8).astype(np.uint8))
    if mode == "I":
        # 32-bit signed integer: read as 16-bit data (Pillow's historical mode for 16-bit files).
        values = np.clip(np.asarray(img), 0, 65535).astype(np.uint16)
        return _gray_to_rgb((values >> 8).astype(np.uint8))
    if mode == "F":
        values = np.asarray(img, dtype=np.float32)
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            # A float image in [0, 1] (the common convention for float files): scale to 0..255, round.
            scaled = np.nan_to_num(values, nan=0.0, posinf=1.0, neginf=0.0) * 255.0
            return _gray_to_rgb(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
        # Otherwise Pillow's (and the reference's) reading: values are already 0..255, truncated, clipped.
    rgb = img if mode == "RGB" else img.convert("RGB")
    return np.array(rgb)  # one copy, owned and writable (np.asarray would be a read-only view of bytes)


def _exif_orientation(img: Image.Image) -> int:
    """EXIF (or XMP) orientation 1..8 of `img`; 1 when absent or unreadable."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        value = int(value)
    except Exception as exc:
        logger.warning("ignoring unreadable EXIF metadata (orientation not applied): %s", exc)
        return 1
    return value if value in _ORIENT else 1


def decode_image(
    data: bytes,
    *,
    apply_exif_orientation: bool = True,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decode encoded image bytes into an RGB uint8 array.

    Args:
      data: the encoded file (JPEG, PNG, WebP, BMP, TIFF, GIF, PPM; MPO = multi-picture JPEG).
        Multi-frame files give their first frame.
      apply_exif_orientation: rotate/mirror by the EXIF Orientation tag so the image is upright, like
        `PIL.ImageOps.exif_transpose`. The reference extractor does not; pass False to match it.
      max_pixels: refuse images whose header declares more than this many pixels (width * height,
        before any EXIF rotation), before decoding any pixel data.

    Returns:
      (H, W, 3) uint8, C-contiguous, RGB, row 0 at the top (after EXIF orientation when applied).

    Raises:
      ImageDecodeError: empty, truncated, corrupt, unsupported or unrecognised data.
      ImageTooLargeError: width * height > max_pixels.
      ValueError: max_pixels is not a positive integer.
    """
    _check_limit_argument(max_pixels)
    _warn_if_truncated_images_allowed()
    img = _open_header(data)
    try:
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(f"image header declares an empty size {width}x{height}")
        if width * height > max_pixels:
            raise _too_large(width, height, max_pixels)
        fmt, mode = img.format, img.mode
        try:
            _load(img, width * height)
            if img.size != (width, height) and img.size[0] * img.size[1] > max_pixels:
                raise _too_large(img.size[0], img.size[1], max_pixels)
            pixels = _to_rgb_array(img)
            orientation = _exif_orientation(img) if apply_exif_orientation else 1
        except (ImageError, MemoryError):
            raise
        except Exception as exc:
            detail = " ".join((str(exc) or type(exc).__name__).split())  # one line
            raise ImageDecodeError(f"cannot decode {fmt} image ({width}x{height}, mode {mode}): {detail}") from exc
    finally:
        img.close()
    if orientation != 1:
        pixels = _ORIENT[orientation](pixels)  # a strided view
    if not (pixels.flags.c_contiguous and pixels.flags.writeable and pixels.flags.owndata):
        pixels = np.array(pixels, dtype=np.uint8, order="C")
    return pixels


def _open_header(data) -> ImageFile.ImageFile:
    """Bytes -> a lazily opened Pillow image (header parsed, no pixels decoded); ImageDecodeError if empty/unknown."""
    data = _as_bytes(data)
    if not data:
        raise ImageDecodeError("empty image data (0 bytes): the file is empty or was not read")
    return _open_lazy(data)


def read_image_size(data: bytes) -> tuple[int, int]:
    """(height, width) declared by the image header, without decoding pixels.

    This is the stored size: EXIF orientations 5..8 swap it in the decoded image. Raises ImageDecodeError
    for data that is not a supported image.
    """
    img = _open_header(data)
    try:
        width, height = img.size
    finally:
        img.close()
    return int(height), int(width)


# --------------------------------------------------------------------------------------------------
# Resizing (the reference ResizeImage rule)


def resize_image(
    image: np.ndarray,
    *,
    max_image_size: int = -1,
    min_image_size: int = -1,
    use_square_images: bool = False,
    resize_factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Resize an image the way the official DELG extractor does before its pyramid.

    Rule (reference `ResizeImage`): max_s = resize_factor * max_image_size and min_s = resize_factor *
    min_image_size, negative meaning off; largest = max(H, W). If max_s >= 0 and largest > max_s the factor
    is max_s / largest (shrink); else if min_s >= 0 and largest < min_s it is min_s / largest (grow); else
    if use_square_images and H != W it is 1.0; otherwise the image is returned as is (the same object)
    with scale factors [1, 1]. The new size is round(largest * f) on both sides in square mode, else
    (round(H * f), round(W * f)), Python's round (half to even); the image is resampled with PIL's
    BILINEAR filter on uint8 (antialiased when shrinking).

    Args:
      image: (H, W, 3) uint8 RGB.
      max_image_size, min_image_size: sizes in pixels of the longest side; -1 is off.
      use_square_images: make the output square (stretching the shorter side).
      resize_factor: >= 0; multiplies both max_image_size and min_image_size (the reference uses it for
        cropped queries). Note 0 * -1 = -0.0 counts as "on", exactly as in the reference, so a factor of
        0 always gives a 0x0 image.

    Returns:
      (resized, scale_factors): resized (new_h, new_w, 3) uint8; scale_factors float64 (2,) =
      (new_h / H, new_w / W), dividing resized (y, x) pixel coordinates by it gives original ones.
      When a rounded side is 0 (resize factor 0, or an extreme aspect ratio) the result is an empty
      (new_h, new_w, 3) array, where the reference would fail inside PIL.

    Raises:
      ValueError: resize_factor < 0, image not 3-D, not 3 channels, or not uint8.
    """
    if resize_factor < 0:
        raise ValueError(f"resize_factor must be >= 0, got {resize_factor}")
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.ndim} dimension(s) with shape {image.shape}")
    if image.shape[2] != 3:
        raise ValueError(f"image must have 3 (RGB) channels, got {image.shape[2]}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")

    height, width = int(image.shape[0]), int(image.shape[1])
    if height == 0 or width == 0:
        raise ValueError(f"image is empty: shape {image.shape}")
    max_size = resize_factor * max_image_size
    min_size = resize_factor * min_image_size
    largest = max(height, width)
    if max_size >= 0 and largest > max_size:
        factor = max_size / largest
    elif min_size >= 0 and largest < min_size:
        factor = min_size / largest
    elif use_square_images and height != width:
        factor = 1.0
    else:
        return image, np.array([1.0, 1.0])

    if use_square_images:
        new_w = new_h = int(round(largest * factor))
    else:
        new_w, new_h = int(round(width * factor)), int(round(height * factor))
    scale_factors = np.array([new_h / height, new_w / width])
    if new_w <= 0 or new_h <= 0:
        return np.zeros((max(new_h, 0), max(new_w, 0), 3), np.uint8), scale_factors
    resized = Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    return np.asarray(resized), scale_factors


@dataclass(frozen=True)
class PreparedImage:
    """An image ready for the model.

    image:         (new_h, new_w, 3) uint8 RGB after the reference resize rule.
    scale_factors: (2,) float64 = (new_h / H, new_w / W); divide resized (y, x) by it for original pixels.
    original_hw:   (H, W) of the decoded image (after EXIF orientation when that was applied).
    """

    image: np.ndarray
    scale_factors: np.ndarray
    original_hw: tuple[int, int]

    @property
    def processed_hw(self) -> tuple[int, int]:
        """(new_h, new_w) of the resized image."""
        return int(self.image.shape[0]), int(self.image.shape[1])


def prepare_image(image: np.ndarray, config: ExtractionConfig, resize_factor: float = 1.0) -> PreparedImage:
    """Apply `resize_image` with the config's max_image_size, min_image_size and use_square_images."""
    image = np.asarray(image)
    resized, scale_factors = resize_image(
        image,
        max_image_size=config.max_image_size,
        min_image_size=config.min_image_size,
        use_square_images=config.use_square_images,
        resize_factor=resize_factor,
    )
    return PreparedImage(
        image=resized,
        scale_factors=scale_factors,
        original_hw=(int(image.shape[0]), int(image.shape[1])),
    )
