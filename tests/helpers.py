"""Helpers shared by several test modules (plain functions; fixtures live in conftest.py): images, rows, exports.

No test module imports another test module (tests/test_suite_layout.py checks it); what two of them share is here.
Heavy imports (Beam, TensorFlow, pyarrow, the job) stay inside the functions, so importing this module is cheap.
"""

import functools
import glob
import io
import json
import os
import struct
import zlib

import numpy as np
from PIL import Image

# ----------------------------------------------------------------------------------------------------- images


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes = b"") -> bytes:
    """A PNG written by hand: IHDR as given, IDAT = zlib(rows) (each row already prefixed by filter 0)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def huge_header_png(width: int = 50000, height: int = 50000) -> bytes:
    """A valid-looking PNG whose IHDR declares width x height (a decompression-bomb header)."""
    return raw_png(width, height, 8, 2, b"\x00" * 16)


def rgb_pattern(height: int = 24, width: int = 36) -> np.ndarray:
    """An asymmetric, smooth-ish RGB test image (every row, column and channel differs)."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 7) % 256, (y * 11) % 256, (x * 3 + y * 5) % 256], axis=-1).astype(np.uint8)


def pattern_image(h=24, w=36, mode="RGB"):
    """rgb_pattern as a PIL image of the given mode."""
    return Image.fromarray(rgb_pattern(h, w)).convert(mode)


def with_orientation(img: Image.Image, fmt: str, orientation: int, **kwargs) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, fmt, exif=exif, **kwargs)


def make_good_images(directory, n_rgb=3, seed=0):
    """Write small decodable images of several modes; returns {path: bytes}."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    files = {}
    for i in range(n_rgb):
        h, w = 40 + 8 * (i % 5), 56 + 8 * (i % 4)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        fmt, ext = ("JPEG", "jpg") if i % 2 == 0 else ("PNG", "png")
        files[os.path.join(directory, f"rgb{i}.{ext}")] = encode(Image.fromarray(arr), fmt)
    if n_rgb >= 3:
        sixteen = Image.fromarray(rng.integers(0, 65535, (44, 60), dtype=np.uint16))
        files[os.path.join(directory, "gray16.png")] = encode(sixteen, "PNG")
        cmyk = Image.fromarray(rng.integers(0, 256, (48, 52, 3), dtype=np.uint8)).convert("CMYK")
        files[os.path.join(directory, "cmyk.jpg")] = encode(cmyk, "JPEG")
        pal = Image.fromarray(rng.integers(0, 256, (50, 64, 3), dtype=np.uint8)).convert("P")
        files[os.path.join(directory, "palette.png")] = encode(pal, "PNG")
        gray = Image.fromarray(rng.integers(0, 256, (96, 90), dtype=np.uint8))
        files[os.path.join(directory, "gray.jpg")] = encode(gray, "JPEG")
    for path, data in files.items():
        with open(path, "wb") as fh:
            fh.write(data)
    return files


# ------------------------------------------------------------------------------------------- the odd corpus

OK = "features"


def _gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 255 // w, y * 255 // h, (x + y) % 256], -1).astype(np.uint8))


def _good_corpus():
    """{raw file name (bytes): (file bytes, expected (original_height, original_width))}."""
    rgb = pattern_image()
    values16 = (np.arange(24 * 36, dtype=np.uint32).reshape(24, 36) * 77 % 65536).astype(np.uint16)
    rows16 = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in np.repeat(values16[..., None], 3, -1))
    hw = (24, 36)
    files = {
        # every format
        b"fmt.jpg": encode(rgb, "JPEG"),
        b"fmt.mpo": encode(rgb, "MPO", save_all=True, append_images=[pattern_image(mode="RGB")]),
        b"fmt.png": encode(rgb, "PNG"),
        b"fmt.webp": encode(rgb, "WEBP", lossless=True),
        b"fmt.bmp": encode(rgb, "BMP"),
        b"fmt.dib": encode(rgb, "DIB"),
        b"fmt.tif": encode(rgb, "TIFF", compression="tiff_lzw"),
        b"fmt.gif": encode(rgb, "GIF", save_all=True, append_images=[pattern_image()]),
        b"fmt.ppm": encode(rgb, "PPM"),
        # every mode
        b"mode_1.png": encode(pattern_image(mode="1"), "PNG"),
        b"mode_L.jpg": encode(pattern_image(mode="L"), "JPEG"),
        b"mode_LA.png": encode(pattern_image(mode="LA"), "PNG"),
        b"mode_P.png": encode(pattern_image(mode="P"), "PNG"),
        b"mode_PA.tif": encode(pattern_image(mode="PA"), "TIFF"),
        b"mode_RGBA.png": encode(pattern_image(mode="RGBA"), "PNG"),
        b"mode_CMYK.jpg": encode(pattern_image(mode="CMYK"), "JPEG"),
        b"mode_CMYK.tif": encode(pattern_image(mode="CMYK"), "TIFF"),
        b"mode_YCbCr.jpg": encode(pattern_image(mode="YCbCr"), "JPEG"),
        b"mode_LAB.tif": encode(pattern_image(mode="LAB"), "TIFF"),
        b"mode_I16.png": encode(Image.fromarray(values16), "PNG"),
        b"mode_I16B.tif": encode(Image.frombytes("I;16B", (36, 24), values16.astype(">u2").tobytes()), "TIFF"),
        b"mode_I.tif": encode(Image.fromarray(values16.astype(np.int32), "I"), "TIFF"),
        b"mode_F.tif": encode(Image.fromarray(values16.astype(np.float32) / 65535, "F"), "TIFF"),
        b"rgb16.png": raw_png(36, 24, 16, 2, rows16),
        # names: unicode, spaces, not UTF-8, a trailing / leading space
        "фото 東京 é.png".encode(): encode(rgb, "PNG"),
        b"my holiday photo.jpg": encode(rgb, "JPEG"),
        b"trailing.jpg ": encode(rgb, "JPEG"),
        b" leading.jpg": encode(rgb, "JPEG"),
        b"caf\xe9 \xff.jpg": encode(rgb, "JPEG"),
    }
    out = {name: (data, hw) for name, data in files.items()}
    out[b"exif_rotated.jpg"] = (with_orientation(pattern_image(40, 64), "JPEG", 6), (64, 40))  # 90 degrees clockwise
    out[b"panorama.jpg"] = (encode(_gradient(400, 3000), "JPEG"), (400, 3000))  # 13x96 px after the tiny resize
    out[b"big photo.jpg"] = (encode(_gradient(2000, 3000), "JPEG", quality=80), (2000, 3000))
    return out


def _bad_corpus(good_jpeg: bytes):
    """{raw name: (bytes or None for a special entry, expected failure stage)}."""
    rng = np.random.default_rng(7)
    return {
        b"empty.jpg": (b"", "decode"),
        b"truncated.jpg": (good_jpeg[: len(good_jpeg) // 2], "decode"),
        b"random.jpg": (rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(), "decode"),
        b"notes.txt": (b"this is a text file, not an image\n", "decode"),
        b"bomb 50000x50000.png": (huge_header_png(), "decode"),
        b"bad \xff\xfe.jpg": (good_jpeg[:40], "decode"),
        b"broken link.jpg": (None, "read"),
        b"pipe.jpg": (None, "read"),
    }


def write_corpus(root):
    """Write the good and bad corpus into <root>/img; returns (good, {raw name: path}, {path: expected outcome}),
    the outcome being "features" or the failure stage, for the entries a glob of <root>/img/* lists."""
    rootb = os.fsencode(str(root / "img"))
    os.makedirs(rootb)
    good = _good_corpus()
    bad = _bad_corpus(good[b"fmt.jpg"][0])
    for name, (data, _) in {**good, **bad}.items():
        if data is not None:
            with open(rootb + b"/" + name, "wb") as fh:
                fh.write(data)
    os.symlink(rootb + b"/gone.jpg", rootb + b"/broken link.jpg")
    os.mkdir(rootb + b"/folder.jpg")  # a directory: a failure row from a manifest, never listed by a glob
    os.mkfifo(rootb + b"/pipe.jpg")  # opening it for reading would block forever
    path = {name: os.fsdecode(rootb + b"/" + name) for name in [*good, *bad, b"folder.jpg", b"missing.jpg"]}
    expect = {path[n]: OK for n in good}
    expect.update({path[n]: stage for n, (_, stage) in bad.items()})
    return good, path, expect


# ------------------------------------------------------------------------------------------ the job's output


def read_rows(directory):
    """All rows of all shards in a directory as a pyarrow Table (None when empty)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(glob.glob(os.path.join(directory, "*.parquet")))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f) for f in files])


def assert_every_entry_once(out, expect):
    """Every entry of `expect` ({path: "features" or failure stage}) is exactly one row of the output, as
    expected, and nothing else is; failure rows say what failed; paths and ids are in their stored form.
    Returns the feature rows."""
    from beam_job.pipeline.inputs import derive_image_id, path_to_text, text_to_path

    features = read_rows(os.path.join(out, "features")).to_pylist()
    failures = read_rows(os.path.join(out, "failures")).to_pylist()
    ids = sorted(r["image_id"] for r in features + failures)
    assert ids == sorted(derive_image_id(p) for p in expect)  # every entry once, nothing else
    outcome = {text_to_path(r["path"]): OK for r in features}
    outcome.update({text_to_path(r["path"]): r["stage"] for r in failures})
    assert outcome == expect
    for row in failures:
        assert row["error_type"] and row["message"] and row["message"] != row["error_type"], row
    for row in features + failures:
        assert row["path"] == path_to_text(text_to_path(row["path"]))  # stored form, valid UTF-8
        assert row["image_id"] == derive_image_id(text_to_path(row["path"]))
    return features


def synthetic_output(root, n_rows=60, per_shard=20, group=4, run_id="20260101T000000Z-abc123"):
    """An output written with the job's own row code: n_rows feature rows (up to 40 keypoints each) and a summary."""
    import pyarrow.parquet as pq

    from beam_job.features import DelgFeatures
    from beam_job.pipeline.rows import feature_record, features_table
    from beam_job.schemas import delg_v1

    rng = np.random.default_rng(0)
    schema = delg_v1.with_metadata(delg_v1.features_schema(), delg_v1.file_metadata(
        model="m", preset="tiny", config_json="{}", descriptor_dtype="float32", untrained=True))
    os.makedirs(os.path.join(root, "features"))
    os.makedirs(os.path.join(root, "runs", run_id))
    records = []
    for i in range(n_rows):
        n = int(rng.integers(0, 40))
        g = rng.standard_normal(2048).astype(np.float32)
        feats = DelgFeatures(global_descriptor=g / np.linalg.norm(g),
                             locations=(rng.random((n, 2)) * [300, 400]).astype(np.float32),
                             descriptors=rng.standard_normal((n, 128)).astype(np.float32),
                             scales=np.ones(n, np.float32),
                             attention=np.sort(rng.random(n).astype(np.float32))[::-1].copy(),
                             original_hw=(300, 400), processed_hw=(300, 400), scale_factors=(1.0, 1.0))
        records.append(feature_record(f"img-{i:04d}", f"/nonexistent/img-{i:04d}.jpg", feats, model="m", preset="tiny"))
    for s in range(0, n_rows, per_shard):
        pq.write_table(features_table(records[s:s + per_shard], schema),
                       os.path.join(root, "features", f"part-{run_id}-{s:016x}.parquet"), row_group_size=group)
    summary = {"run_id": run_id, "status": "succeeded", "counts": {"listed": n_rows, "processed": n_rows,
               "features": n_rows, "failures": 0, "skipped_existing": 0, "duplicate_inputs": 0},
               "config": {"name": "tiny", "untrained": True}, "timings_ms": {}}
    with open(os.path.join(root, "runs", run_id, "summary.json"), "w") as fh:
        json.dump(summary, fh)
    return run_id


# ------------------------------------------------------------------------------------ the command line


def fails_with(capsys, argv, *needles):
    """`delg-extract argv` exits 2 with one stderr line that holds every needle; returns that line."""
    from beam_job import cli

    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("delg-extract: error: "), err
    for needle in needles:
        assert needle in err[0], err
    return err[0]


# ------------------------------------------------------------------------------ the model and its handler


def shared_export(tmp_path_factory, name: str, build) -> str:
    """A SavedModel built once per test session (shared by the DELG test files through the session temp dir)."""
    from beam_job.delg.cache import build_once

    target = str(tmp_path_factory.getbasetemp() / "delg-shared" / name)
    return build_once(target, build, is_complete=lambda p: os.path.isfile(os.path.join(p, "saved_model.pb")))


def tiny_tf2(tmp_path_factory) -> str:
    from beam_job.delg.embedded import embedded_model_path

    return embedded_model_path("tiny", cache_dir=str(tmp_path_factory.getbasetemp() / "delg-cache"))


def tiny_tf1(tmp_path_factory, variant: str = "full") -> str:
    options = {
        "full": {},
        "local": {"global_": False},
        "global": {"local": False},
        "kaggle": {"global_scales_input": False},
    }[variant]

    def build(tmp):
        from beam_job.delg.export import export_tf1
        from beam_job.delg.keras_model import build_delg

        export_tf1(build_delg("tiny", seed=0), tmp, overwrite=True, **options)

    return shared_export(tmp_path_factory, f"tiny-tf1-{variant}", build)


@functools.cache
def cached_model(path: str):
    """A loaded model shared by tests that only need to run it (loading is tested separately)."""
    from beam_job.delg.loader import load_delg_model

    return load_delg_model(path)


class FailingModel:
    """The loaded DELG model, except that its call runs `fail(prepared)` (which raises) for images whose original
    (height, width) is `boom_hw`: the real model runs for every other image."""

    def __init__(self, model, boom_hw, fail):
        self._model, self._boom_hw, self._fail = model, tuple(boom_hw), fail

    def extract(self, prepared):
        if tuple(prepared.original_hw) == self._boom_hw:
            self._fail(prepared)
        return self._model.extract(prepared)

    def identity(self):
        return self._model.identity()


def failing_handler(config, boom_hw, fail):
    """A DelgModelHandler whose model call raises for the image of size boom_hw (see FailingModel)."""
    from beam_job.pipeline.handler import DelgModelHandler

    class FailingHandler(DelgModelHandler):
        def load_model(self):
            return FailingModel(super().load_model(), boom_hw, fail)

    return FailingHandler(config)
