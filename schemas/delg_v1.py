"""Version 1 of the on-disk Parquet schema for DELG features and failures (the one definition of it).

Every writer and reader in the project takes its columns from here; `schemas/README.md` documents each
column for index builders, and tests/test_schema.py guards the exact field list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pyarrow as pa

from beam_job.features import GLOBAL_DIM, LOCAL_DIM

SCHEMA_VERSION = "delg_v1"

COORDINATE_CONVENTION = (
    "locations are (y, x) = (row, col) keypoint centres in pixels of the original decoded image "
    "(after EXIF orientation when enabled), origin at the top-left corner, no half-pixel offset; "
    "scales are 1/pyramid_scale; features sorted by attention, descending"
)

# Schema-level metadata keys (bytes in the Parquet footer).
META_SCHEMA_VERSION = b"delg.schema_version"
META_MODEL = b"delg.model"
META_PRESET = b"delg.preset"
META_CONFIG = b"delg.config"
META_COORDINATES = b"delg.coordinate_convention"
META_DESCRIPTOR_DTYPE = b"delg.descriptor_dtype"
META_UNTRAINED = b"delg.untrained_model"


def _field(name: str, type_: pa.DataType, doc: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={b"doc": doc.encode()})


def features_schema(descriptor_dtype: str = "float32") -> pa.Schema:
    """Schema of a features shard: one row per successfully processed image.

    descriptor_dtype: "float32" (default) or "float16" for the local descriptors only; the global
    descriptor, locations, scales and attention always stay float32.
    """
    if descriptor_dtype not in ("float32", "float16"):
        raise ValueError(f"descriptor_dtype must be float32 or float16, got {descriptor_dtype!r}")
    desc_type = pa.float32() if descriptor_dtype == "float32" else pa.float16()
    return pa.schema(
        [
            _field("image_id", pa.string(), "stable id: manifest image_id, else derived from the path", False),
            _field("path", pa.string(), "source URI of the image as listed in the input", False),
            _field("original_height", pa.int32(), "height of the decoded image in pixels", False),
            _field("original_width", pa.int32(), "width of the decoded image in pixels", False),
            _field("processed_height", pa.int32(), "height fed to the model after the max/min-size resize", False),
            _field("processed_width", pa.int32(), "width fed to the model after the max/min-size resize", False),
            _field(
                "global_descriptor",
                pa.list_(pa.float32(), GLOBAL_DIM),
                "L2-normalised global descriptor (never null: an image without one, i.e. under 10 px after "
                "resize, is a failure row, because pyarrow cannot read back null fixed-size lists, "
                "apache/arrow#35692)",
                False,
            ),
            _field("num_features", pa.int32(), "number of local features N (0 is valid)", False),
            _field(
                "locations",
                pa.list_(pa.list_(pa.float32(), 2)),
                "N x (y, x) keypoint centres in original-image pixels",
                False,
            ),
            _field("scales", pa.list_(pa.float32()), "N scales, 1/pyramid_scale", False),
            _field("attention", pa.list_(pa.float32()), "N attention scores, descending", False),
            _field(
                "descriptors",
                pa.list_(pa.list_(desc_type, LOCAL_DIM)),
                f"N x {LOCAL_DIM} L2-normalised local descriptors ({descriptor_dtype})",
                False,
            ),
            _field("model", pa.string(), "model identity (URI or embedded name, plus content hash)", False),
            _field("preset", pa.string(), "extraction preset name", False),
        ]
    )


FAILURE_STAGES = ("read", "decode", "preprocess", "inference", "postprocess", "write")

FAILURES_SCHEMA = pa.schema(
    [
        _field("image_id", pa.string(), "id of the failed input", False),
        _field("path", pa.string(), "source URI as listed in the input (re-run this table as a manifest)", False),
        _field("stage", pa.string(), "where it failed: " + ", ".join(FAILURE_STAGES), False),
        _field("error_type", pa.string(), "exception class name, e.g. FileNotFoundError, ImageTooLargeError", False),
        _field("message", pa.string(), "human-readable reason", False),
        _field("model", pa.string(), "model identity", False),
        _field("preset", pa.string(), "extraction preset name", False),
    ]
)


def file_metadata(
    *,
    model: str,
    preset: str,
    config_json: str,
    descriptor_dtype: str = "float32",
    untrained: bool = False,
    extra: Mapping[str, str] | None = None,
) -> dict[bytes, bytes]:
    """Key/value metadata stored in every shard's footer."""
    meta = {
        META_SCHEMA_VERSION: SCHEMA_VERSION.encode(),
        META_MODEL: model.encode(),
        META_PRESET: preset.encode(),
        META_CONFIG: config_json.encode(),
        META_COORDINATES: COORDINATE_CONVENTION.encode(),
        META_DESCRIPTOR_DTYPE: descriptor_dtype.encode(),
        META_UNTRAINED: json.dumps(bool(untrained)).encode(),
    }
    for key, value in (extra or {}).items():
        meta[f"delg.{key}".encode()] = str(value).encode()
    return meta


def with_metadata(schema: pa.Schema, metadata: Mapping[bytes, bytes]) -> pa.Schema:
    merged = dict(schema.metadata or {})
    merged.update(metadata)
    return schema.with_metadata(merged)
