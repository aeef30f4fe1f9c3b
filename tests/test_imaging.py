"""Tests of beam_job.imaging: decoding every format and mode, EXIF orientation, bomb guard, the resize rule."""

import contextlib
import io
import json
import resource
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from beam_job.config import DEFAULT_MAX_IMAGE_PIXELS, get_preset
from beam_job.imaging import (
    ImageDecodeError,
    ImageError,
    ImageTooLargeError,
    PreparedImage,
    decode_image,
    prepare_image,
    read_image_size,
    resize_image,
)

from helpers import encode, raw_png, rgb_pattern, with_orientation

# --------------------------------------------------------------------------------------------------
# helpers


def reference_decode(data: bytes) -> np.ndarray:
    """What the reference loader gives: PIL open + convert('RGB'), no EXIF orientation."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def assert_rgb_output(array: np.ndarray, hw) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (hw[0], hw[1], 3)
    assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata


# --------------------------------------------------------------------------------------------------
# formats


@pytest.mark.parametrize(
    "fmt,kwargs",
    [("PNG", {}), ("BMP", {}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"}), ("WEBP", {"lossless": True})],
)
def test_lossless_formats_round_trip_exactly(fmt, kwargs):
    pixels = rgb_pattern()
    decoded = decode_image(encode(Image.fromarray(pixels), fmt, **kwargs))
    assert_rgb_output(decoded, pixels.shape[:2])
    np.testing.assert_array_equal(decoded, pixels)


@pytest.mark.parametrize("fmt,kwargs", [("JPEG", {"quality": 95}), ("WEBP", {"quality": 90})])
def test_lossy_formats_match_reference_and_are_close(fmt, kwargs):
    pixels = np.full((32, 48, 3), (200, 60, 30), np.uint8)
    pixels[8:24, 12:36] = (20, 120, 220)
    data = encode(Image.fromarray(pixels), fmt, **kwargs)
    decoded = decode_image(data)
    assert_rgb_output(decoded, (32, 48))
    np.testing.assert_array_equal(decoded, reference_decode(data))
    assert np.abs(decoded.astype(int) - pixels).mean() < 6


def test_gif_gives_first_frame_with_palette_colours():
    colours = [(255, 0, 0), (0, 200, 0), (10, 20, 250)]
    frames = [Image.new("RGB", (20, 10), c) for c in colours]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    decoded = decode_image(data)
    assert_rgb_output(decoded, (10, 20))
    assert (decoded == np.array(colours[0], np.uint8)).all()


def test_multi_page_tiff_gives_first_page():
    pages = [Image.new("RGB", (8, 6), (1, 2, 3)), Image.new("RGB", (8, 6), (250, 251, 252))]
    data = encode(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    assert (decode_image(data) == np.array([1, 2, 3], np.uint8)).all()


def test_ppm_is_supported():
    pixels = rgb_pattern(5, 9)
    np.testing.assert_array_equal(decode_image(encode(Image.fromarray(pixels), "PPM")), pixels)


def test_mpo_multi_picture_jpeg_gives_first_picture():
    first, second = Image.new("RGB", (16, 8), (250, 10, 10)), Image.new("RGB", (16, 8), (10, 10, 250))
    data = encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded, reference_decode(data))
    assert np.abs(decoded.astype(int) - [250, 10, 10]).max() <= 4


# --------------------------------------------------------------------------------------------------
# modes


def test_grayscale_gives_equal_channels():
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    for fmt in ("PNG", "BMP", "TIFF"):
        decoded = decode_image(encode(Image.fromarray(gray, "L"), fmt))
        for c in range(3):
            np.testing.assert_array_equal(decoded[:, :, c], gray)


def test_gray_alpha_drops_alpha():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    alpha = np.zeros_like(gray)  # fully transparent: reference convert('RGB') still keeps the grey values
    img = Image.merge("LA", [Image.fromarray(gray), Image.fromarray(alpha)])
    data = encode(img, "PNG")
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded, np.repeat(gray[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(decoded, reference_decode(data))


def test_bilevel_mode_1_maps_to_0_and_255():
    bits = (np.indices((8, 10)).sum(axis=0) % 2).astype(bool)
    for fmt in ("PNG", "BMP", "TIFF"):
        decoded = decode_image(encode(Image.fromarray(bits), fmt))
        np.testing.assert_array_equal(decoded[:, :, 0], np.where(bits, 255, 0))
        assert set(np.unique(decoded)) == {0, 255}


def _palette_image(transparent_index=None):
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (17, 34, 51)]
    indices = np.array([[0, 1, 2, 3], [3, 2, 1, 0]], np.uint8)
    img = Image.fromarray(indices, "P")
    img.putpalette([v for colour in palette for v in colour])
    if transparent_index is not None:
        img.info["transparency"] = transparent_index
    return img, palette, indices


@pytest.mark.parametrize(
    "fmt,transparent_index", [("PNG", None), ("PNG", 3), ("GIF", None), ("GIF", 3), ("BMP", None), ("TIFF", None)]
)
def test_palette_colours_come_out_right(fmt, transparent_index):
    img, palette, indices = _palette_image(transparent_index)
    kwargs = {"transparency": transparent_index} if transparent_index is not None else {}
    data = encode(img, fmt, **kwargs)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P"
    if transparent_index is not None:
        assert opened.info.get("transparency") is not None
    decoded = decode_image(data)
    expected = np.array(palette, np.uint8)[indices]
    # The transparent index keeps its palette colour, as the reference's convert('RGB') does.
    np.testing.assert_array_equal(decoded, expected)


def test_rgba_drops_alpha_without_compositing():
    pixels = rgb_pattern(6, 7)
    alpha = np.zeros((6, 7), np.uint8)
    alpha[:, :3] = 255
    for fmt, kwargs in (("PNG", {}), ("WEBP", {"lossless": True, "exact": True}), ("TIFF", {})):
        data = encode(Image.fromarray(np.dstack([pixels, alpha]), "RGBA"), fmt, **kwargs)
        decoded = decode_image(data)
        np.testing.assert_array_equal(decoded, pixels)
        np.testing.assert_array_equal(decoded, reference_decode(data))


def test_cmyk_tiff_and_jpeg():
    cmyk = Image.new("CMYK", (3, 1))
    for x, value in enumerate([(255, 0, 0, 0), (0, 0, 0, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), value)
    decoded = decode_image(encode(cmyk, "TIFF"))
    np.testing.assert_array_equal(decoded[0], [[0, 255, 255], [255, 255, 255], [0, 0, 0]])

    jpeg = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(jpeg)).mode == "CMYK"
    decoded = decode_image(jpeg)
    np.testing.assert_array_equal(decoded, reference_decode(jpeg))
    assert np.abs(decoded.astype(int) - [255, 0, 0]).max() <= 3  # no cyan, magenta+yellow = red


def test_ycbcr_source_decodes_to_rgb():
    pixels = np.full((16, 16, 3), (30, 140, 220), np.uint8)
    ycbcr = Image.fromarray(pixels).convert("YCbCr")
    # (An uncompressed YCbCr TIFF is not readable by Pillow at all, so the reference cannot read it either.)
    for fmt, kwargs in (("JPEG", {}), ("TIFF", {"compression": "jpeg"})):
        decoded = decode_image(encode(ycbcr, fmt, **kwargs))
        assert np.abs(decoded.astype(int) - pixels).max() <= 3


@pytest.mark.parametrize(
    "mode,fmt",
    [("LAB", "TIFF"), ("PA", "TIFF"), ("CMYK", "TIFF"), ("LA", "TIFF"), ("P", "PNG")],
)
def test_eight_bit_modes_match_reference_convert(mode, fmt):
    img = Image.fromarray(rgb_pattern(8, 8)).convert(mode)
    data = encode(img, fmt)
    assert Image.open(io.BytesIO(data)).mode == mode
    np.testing.assert_array_equal(decode_image(data), reference_decode(data))


def _gradient16(height=4, width=64):
    return (np.arange(height * width, dtype=np.uint32).reshape(height, width) * 257 % 65536).astype(np.uint16)


def test_16bit_grayscale_png_scaled_by_high_byte_not_clipped():
    values = _gradient16()
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode_image(data)
    expected = (values >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(decoded[:, :, c], expected)
    # The reference's convert('RGB') clips instead: everything above 255 becomes white.
    assert (reference_decode(data)[:, :, 0] == 255).mean() > 0.9


def test_16bit_grayscale_png_written_by_hand():
    values = np.array([[0, 255, 256, 4095], [32768, 40000, 65280, 65535]], np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    decoded = decode_image(raw_png(4, 2, 16, 0, rows))
    np.testing.assert_array_equal(decoded[:, :, 1], [[0, 0, 1, 15], [128, 156, 255, 255]])


def test_16bit_rgb_png_keeps_high_byte():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 65536, size=(3, 5, 3), dtype=np.uint16)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    decoded = decode_image(raw_png(5, 3, 16, 2, rows))
    np.testing.assert_array_equal(decoded, (values >> 8).astype(np.uint8))


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2")])
def test_16bit_tiff_both_byte_orders(mode, dtype):
    values = _gradient16()
    img = Image.frombytes(mode, (values.shape[1], values.shape[0]), values.astype(dtype).tobytes())
    data = encode(img, "TIFF")
    assert Image.open(io.BytesIO(data)).mode == mode
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded[:, :, 2], (values >> 8).astype(np.uint8))


def test_32bit_integer_tiff_read_as_16bit_and_clipped():
    values = np.array([[-5, 0, 255, 256, 65535, 70000, 1 << 30, 32768]], np.int32)
    data = encode(Image.fromarray(values, "I"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 0, 0, 1, 255, 255, 255, 128])


def test_float_tiff_in_unit_range_is_scaled_to_255():
    values = np.array([[0.0, 0.5, 1.0, 0.25, np.nan]], np.float32)
    data = encode(Image.fromarray(values, "F"), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 128, 255, 64, 0])


def test_float_tiff_beyond_unit_range_follows_reference():
    values = np.array([[0.0, 1.5, 127.7, 255.0, 300.0, -4.0]], np.float32)
    data = encode(Image.fromarray(values, "F"), "TIFF")
    decoded = decode_image(data)
    np.testing.assert_array_equal(decoded, reference_decode(data))
    np.testing.assert_array_equal(decoded[0, :, 0], [0, 1, 127, 255, 255, 0])


# --------------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow_exif_transpose(orientation):
    pixels = rgb_pattern(5, 8)
    data = with_orientation(Image.fromarray(pixels), "PNG", orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    decoded = decode_image(data)
    assert_rgb_output(decoded, expected.shape[:2])
    np.testing.assert_array_equal(decoded, expected)
    assert decoded.shape[:2] == ((8, 5) if orientation >= 5 else (5, 8))
    # Off: the stored pixels, as the reference sees them.
    np.testing.assert_array_equal(decode_image(data, apply_exif_orientation=False), pixels)


def test_exif_orientation_on_jpeg():
    pixels = np.zeros((40, 64, 3), np.uint8)
    pixels[:8, :16] = 255  # a white block in the top-left corner
    data = with_orientation(Image.fromarray(pixels), "JPEG", 6, quality=95)
    upright = decode_image(data)
    stored = decode_image(data, apply_exif_orientation=False)
    assert stored.shape == (40, 64, 3) and upright.shape == (64, 40, 3)
    np.testing.assert_array_equal(stored, reference_decode(data))
    np.testing.assert_array_equal(upright, np.rot90(stored, k=-1))  # 6 = rotate 90 degrees clockwise
    assert upright[:16, -8:].mean() > 200 and upright[-16:, :8].mean() < 50  # block now top-right


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_invalid_orientation_values_are_ignored(orientation):
    pixels = rgb_pattern(3, 4)
    np.testing.assert_array_equal(decode_image(with_orientation(Image.fromarray(pixels), "PNG", orientation)), pixels)


# --------------------------------------------------------------------------------------------------
# errors


def _jpeg_bytes(height=64, width=96) -> bytes:
    rng = np.random.default_rng(1)
    return encode(Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty image data"),
        (np.random.default_rng(7).bytes(4096), "not a recognised image"),
        (b"just some text, not an image at all", "not a recognised image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
    ],
    ids=["empty", "random", "text", "png-signature-then-garbage"],
)
def test_not_an_image(data, message):
    with pytest.raises(ImageDecodeError, match=message) as info:
        decode_image(data)
    err = info.value
    assert isinstance(err, ImageError) and isinstance(err, ValueError)
    assert err.stage == "decode"
    assert "\n" not in str(err)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_jpeg(keep):
    data = _jpeg_bytes()
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        decode_image(data[: int(len(data) * keep)])
    assert "JPEG" in str(info.value)


def test_truncated_png():
    data = encode(Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)), "PNG")
    with pytest.raises(ImageDecodeError):
        decode_image(data[: len(data) // 2])


def test_unsupported_format_is_named():
    with pytest.raises(ImageDecodeError, match="unsupported image format ICO"):
        decode_image(encode(Image.new("RGB", (16, 16)), "ICO"))


def test_non_bytes_input():
    with pytest.raises(ImageDecodeError, match="must be bytes"):
        decode_image("not bytes")  # type: ignore[arg-type]


def test_bytearray_and_memoryview_inputs():
    data = encode(Image.fromarray(rgb_pattern(4, 5)), "PNG")
    np.testing.assert_array_equal(decode_image(bytearray(data)), rgb_pattern(4, 5))
    np.testing.assert_array_equal(decode_image(memoryview(data)), rgb_pattern(4, 5))


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_pixel_limit_argument(bad):
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(encode(Image.new("RGB", (2, 2)), "PNG"), max_pixels=bad)


# --------------------------------------------------------------------------------------------------
# decompression bombs

@contextlib.contextmanager
def _address_space_headroom(extra_bytes: int):
    """Temporarily cap this process's address space at its current size + extra_bytes (Linux)."""
    with open("/proc/self/status") as status:
        vm_size = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm_size + extra_bytes
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


BOMB_PNG = raw_png(50000, 50000, 8, 2, b"\x00" * 64)


def _jpeg_with_declared_size(height: int, width: int) -> bytes:
    """A small valid JPEG whose SOF0 header is patched to declare height x width."""
    data = bytearray(_jpeg_bytes(16, 16))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


@pytest.mark.parametrize(
    "data,size", [(BOMB_PNG, "50000x50000"), (_jpeg_with_declared_size(60000, 60000), "60000x60000")],
    ids=["png", "jpeg"]
)
def test_bomb_header_refused_fast_and_small(data, size):
    assert len(data) < 1000
    # Under an address-space cap: a regression gives MemoryError here, never an OOM-killed test run.
    with _address_space_headroom(1 << 30):
        with pytest.raises(ImageTooLargeError):  # warm-up: plugin imports are not what we measure
            decode_image(data)
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(ImageTooLargeError) as info:
            decode_image(data)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < 0.1
    assert peak < 1_000_000
    message = str(info.value)
    assert size in message and f"{DEFAULT_MAX_IMAGE_PIXELS:,}" in message
    assert "max_image_pixels" in message and "--max_image_pixels" in message
    assert info.value.stage == "decode" and isinstance(info.value, ImageError)


def test_bomb_refused_under_an_address_space_limit():
    """In a child process limited to 1.5 GB of address space (a 50000x50000 RGB image needs 7.5 GB)."""
    script = textwrap.dedent(
        f"""
        import json, resource, time
        from beam_job.imaging import decode_image, ImageTooLargeError
        resource.setrlimit(resource.RLIMIT_AS, (1_500_000_000, 1_500_000_000))
        start = time.perf_counter()
        try:
            decode_image({BOMB_PNG!r})
            outcome = "decoded"
        except ImageTooLargeError:
            outcome = "refused"
        except MemoryError:
            outcome = "memory"
        print(json.dumps({{"outcome": outcome, "seconds": time.perf_counter() - start}}))
        """
    )
    env = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env, cwd=_repo_root()
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outcome"] == "refused"
    assert result["seconds"] < 1.0


def _repo_root() -> str:
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pixel_limit_is_configurable():
    data = encode(Image.fromarray(rgb_pattern(100, 100)), "PNG")
    with pytest.raises(ImageTooLargeError, match=r"100x100 = 10,000 pixels, over the limit of 5,000"):
        decode_image(data, max_pixels=5000)
    assert decode_image(data, max_pixels=20000).shape == (100, 100, 3)
    assert decode_image(data, max_pixels=10000).shape == (100, 100, 3)  # the limit itself is allowed
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=9999)


def test_our_limit_not_pre_empted_by_pillow_global_limit():
    """15000x15000 = 225 MP is above 2 * PIL.Image.MAX_IMAGE_PIXELS: Image.open refuses it, we decide."""
    data = raw_png(15000, 15000, 8, 2, b"\x00" * 16)
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(io.BytesIO(data))
    with warnings.catch_warnings(), _address_space_headroom(1 << 30):
        warnings.simplefilter("error")  # no DecompressionBombWarning or anything else may escape
        assert read_image_size(data) == (15000, 15000)
        with pytest.raises(ImageTooLargeError, match="over the limit of 100,000,000"):
            decode_image(data)
        with pytest.raises(ImageTooLargeError, match="over the limit of 200,000,000"):
            decode_image(data, max_pixels=200_000_000)
    assert Image.MAX_IMAGE_PIXELS == before  # no global state changed


def test_read_image_size_from_header_only():
    assert read_image_size(BOMB_PNG) == (50000, 50000)
    assert read_image_size(_jpeg_with_declared_size(300, 700)) == (300, 700)
    assert read_image_size(encode(Image.new("RGB", (9, 4)), "WEBP")) == (4, 9)
    with pytest.raises(ImageDecodeError):
        read_image_size(b"")
    with pytest.raises(ImageDecodeError):
        read_image_size(b"nope")


# --------------------------------------------------------------------------------------------------
# resize rule (reference ResizeImage). Expected sizes are worked out by hand from the rule.

RESIZE_CASES = [
    # id, (H, W), kwargs, expected (new_h, new_w) or None for "unchanged", expected scale factors
    ("downscale-by-max", (1536, 2048), dict(max_image_size=1024), (768, 1024), (0.5, 0.5)),
    ("downscale-portrait", (1000, 500), dict(max_image_size=100), (100, 50), (0.1, 0.1)),
    ("noop-largest-equals-max", (768, 1024), dict(max_image_size=1024), None, (1.0, 1.0)),
    ("noop-smaller-than-max", (100, 50), dict(max_image_size=1024), None, (1.0, 1.0)),
    ("noop-all-off", (30, 40), dict(), None, (1.0, 1.0)),
    ("upscale-by-min", (50, 100), dict(min_image_size=200), (100, 200), (2.0, 2.0)),
    ("noop-largest-equals-min", (100, 50), dict(min_image_size=100), None, (1.0, 1.0)),
    ("noop-larger-than-min", (100, 50), dict(min_image_size=60), None, (1.0, 1.0)),
    ("max-wins-over-min", (100, 80), dict(max_image_size=50, min_image_size=200), (50, 40), (0.5, 0.5)),
    ("min-when-under-max", (50, 40), dict(max_image_size=500, min_image_size=100), (100, 80), (2.0, 2.0)),
    ("square-only", (30, 40), dict(use_square_images=True), (40, 40), (40 / 30, 1.0)),
    ("square-already-square", (40, 40), dict(use_square_images=True), None, (1.0, 1.0)),
    ("square-with-max", (300, 400), dict(use_square_images=True, max_image_size=200), (200, 200), (2 / 3, 0.5)),
    ("square-square-over-max", (400, 400), dict(use_square_images=True, max_image_size=200), (200, 200), (0.5, 0.5)),
    ("square-with-min", (30, 40), dict(use_square_images=True, min_image_size=80), (80, 80), (80 / 30, 2.0)),
    ("square-under-max-stretches", (30, 40), dict(use_square_images=True, max_image_size=100), (40, 40),
     (40 / 30, 1.0)),
    ("factor-scales-max", (768, 1024), dict(max_image_size=1024, resize_factor=0.5), (384, 512), (0.5, 0.5)),
    ("factor-activates-max", (400, 300), dict(max_image_size=1000, resize_factor=0.25), (250, 188), (0.625, 188 / 300)),
    ("factor-scales-min", (50, 100), dict(min_image_size=100, resize_factor=2.0), (100, 200), (2.0, 2.0)),
    ("factor-deactivates-max", (300, 400), dict(max_image_size=200, resize_factor=2.0), None, (1.0, 1.0)),
    ("factor-zero", (30, 40), dict(max_image_size=1024, resize_factor=0.0), (0, 0), (0.0, 0.0)),
    # 0 * -1 = -0.0 and -0.0 >= 0 is True: even with max off, the reference shrinks to 0x0.
    ("factor-zero-max-off", (30, 40), dict(resize_factor=0.0), (0, 0), (0.0, 0.0)),
    # Half-to-even: 2.5 -> 2 and 12.5 -> 12 (round-half-up would give 3 and 13); 3.5 -> 4 and 13.5 -> 14.
    ("half-even-down", (10, 5), dict(max_image_size=5), (5, 2), (0.5, 0.4)),
    ("half-even-up", (10, 7), dict(max_image_size=5), (5, 4), (0.5, 4 / 7)),
    ("half-even-12.5", (100, 25), dict(max_image_size=50), (50, 12), (0.5, 0.48)),
    ("half-even-13.5", (100, 27), dict(max_image_size=50), (50, 14), (0.5, 14 / 27)),
    ("half-even-fractional-max", (40, 30), dict(max_image_size=25, resize_factor=0.5), (12, 9), (0.3, 0.3)),
    ("half-even-square", (40, 30), dict(max_image_size=25, resize_factor=0.5, use_square_images=True), (12, 12),
     (0.3, 0.4)),
    ("half-even-min-upscale", (4, 2), dict(min_image_size=5), (5, 2), (1.25, 1.0)),  # 2 * 1.25 = 2.5 -> 2
    ("rounds-to-zero-side", (1000, 1), dict(max_image_size=100), (100, 0), (0.1, 0.0)),
]


@pytest.mark.parametrize("case", RESIZE_CASES, ids=[c[0] for c in RESIZE_CASES])
def test_resize_rule(case):
    _, (height, width), kwargs, expected_hw, expected_factors = case
    rng = np.random.default_rng(height * 10007 + width)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    resized, factors = resize_image(image, **kwargs)
    assert factors.dtype == np.float64 and factors.shape == (2,)
    np.testing.assert_allclose(factors, expected_factors, rtol=0, atol=1e-12)
    if expected_hw is None:
        assert resized is image
        return
    assert resized.shape == (*expected_hw, 3) and resized.dtype == np.uint8
    if 0 in expected_hw:
        return
    # Resampling: PIL bilinear on uint8, exactly.
    expected = np.asarray(Image.fromarray(image).resize((expected_hw[1], expected_hw[0]), Image.BILINEAR))
    np.testing.assert_array_equal(resized, expected)
    # Scale factors are exactly new / old.
    assert factors[0] == expected_hw[0] / height and factors[1] == expected_hw[1] / width


def test_resize_bilinear_is_antialiased_when_shrinking():
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes average to grey under an antialiased filter
    resized, _ = resize_image(stripes, max_image_size=16)
    assert resized.shape == (16, 16, 3)
    interior = resized[:, 1:-1].astype(int)  # the outermost columns see the image border
    assert np.abs(interior - 127).max() <= 2


@pytest.mark.parametrize(
    "image,kwargs,message",
    [
        (np.zeros((4, 4, 3), np.uint8), dict(resize_factor=-0.5), "resize_factor"),
        (np.zeros((4, 4), np.uint8), dict(), "dimension"),
        (np.zeros((1, 4, 4, 3), np.uint8), dict(), "dimension"),
        (np.zeros((4, 4, 4), np.uint8), dict(), "channels"),
        (np.zeros((4, 4, 1), np.uint8), dict(), "channels"),
        (np.zeros((4, 4, 3), np.float32), dict(), "uint8"),
        (np.zeros((0, 4, 3), np.uint8), dict(min_image_size=10), "empty"),
    ],
    ids=["negative-factor", "2d", "4d", "4-channels", "1-channel", "float", "empty"],
)
def test_resize_errors(image, kwargs, message):
    with pytest.raises(ValueError, match=message):
        resize_image(image, **kwargs)


def test_prepare_image_uses_config():
    image = np.zeros((1536, 2048, 3), np.uint8)
    prepared = prepare_image(image, get_preset("r50_gldv2clean"))
    assert isinstance(prepared, PreparedImage)
    assert prepared.image.shape == (768, 1024, 3) and prepared.processed_hw == (768, 1024)
    assert prepared.original_hw == (1536, 2048)
    np.testing.assert_array_equal(prepared.scale_factors, [0.5, 0.5])

    same = prepare_image(image, get_preset("kaggle2020"))  # no pre-resize
    assert same.image is image and same.original_hw == (1536, 2048)

    # Query crops: the resize factor shrinks the 1024 cap in proportion.
    cropped = prepare_image(image[:768, :1024], get_preset("r50_gldv2clean"), resize_factor=0.5)
    assert cropped.image.shape == (384, 512, 3)

    square = prepare_image(
        np.zeros((30, 40, 3), np.uint8),
        get_preset("r50_gldv2clean").replace(max_image_size=-1, min_image_size=80, use_square_images=True),
    )
    assert square.image.shape == (80, 80, 3) and square.original_hw == (30, 40)
    np.testing.assert_allclose(square.scale_factors, [80 / 30, 2.0])


def test_decode_then_prepare_end_to_end():
    data = with_orientation(Image.fromarray(rgb_pattern(120, 200)), "JPEG", 8, quality=90)
    decoded = decode_image(data, max_pixels=get_preset("tiny").max_image_pixels)
    prepared = prepare_image(decoded, get_preset("tiny"))  # max 96
    assert decoded.shape == (200, 120, 3)  # orientation 8 swaps the sides
    assert prepared.image.shape == (96, round(120 * 96 / 200), 3)
    assert prepared.original_hw == (200, 120)


def _gif_with_frame(screen: int, frame: int) -> bytes:
    """A GIF whose logical screen is screen x screen but whose first frame declares frame x frame."""
    header = b"GIF89a" + struct.pack("<HHBBB", screen, screen, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    descriptor = b"," + struct.pack("<HHHHB", 0, 0, frame, frame, 0)
    return header + descriptor + b"\x02\x02\x4c\x01\x00" + b";"


def test_gif_frame_larger_than_its_screen_counts():
    """Pillow grows a GIF to its first frame's extent while parsing; the limit applies to the grown size."""
    with _address_space_headroom(1 << 30):
        assert read_image_size(_gif_with_frame(10, 3000)) == (3000, 3000)
        with pytest.raises(ImageTooLargeError, match="3000x3000"):
            decode_image(_gif_with_frame(10, 3000), max_pixels=1_000_000)
        # 20000 x 20000 trips Pillow's own hard limit inside the GIF parser: still our error type.
        with pytest.raises(ImageTooLargeError, match="max_image_pixels"):
            decode_image(_gif_with_frame(10, 20000))
    # Within the limit it gets as far as the (deliberately bogus) pixel data.
    with pytest.raises(ImageDecodeError, match="GIF image"):
        decode_image(_gif_with_frame(10, 30), max_pixels=1_000_000)
