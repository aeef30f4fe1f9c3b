"""Output rows: DelgFeatures and failures -> records -> Arrow tables with exactly the schemas/delg_v1 schema.

A feature record is a dict of numpy arrays (no per-element Python lists); `features_table(records, schema)`
concatenates them into flat buffers and builds FixedSizeList/List arrays directly, so a row group of
hundreds of images costs a few memcpy's. Failure records are dicts of strings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from beam_job.features import DelgFeatures
from beam_job.layout import FEATURES
from beam_job.schemas import delg_v1

FeatureRecord = dict[str, Any]
FailureRecord = dict[str, str]

MAX_MESSAGE_CHARS = 2000


class MissingGlobalDescriptorError(ValueError):
    """The image has no global descriptor (under 10 px after resize, or a model without a global head).

    delg_v1 declares global_descriptor non-nullable: pyarrow <= 25 cannot read back a Parquet file with a
    null fixed-size list (apache/arrow#35692), so such images become failure rows instead.
    """


def feature_record(
    image_id: str,
    path: str,
    features: DelgFeatures,
    *,
    model: str,
    preset: str,
    descriptor_dtype: str = "float32",
) -> FeatureRecord:
    """One features row (numpy arrays, shapes checked against the schema).

    global_descriptor: (2048,) float32; a missing one raises MissingGlobalDescriptorError (see there).
    locations (N, 2) float32 (y, x); scales, attention (N,) float32; descriptors (N, 128) in
    descriptor_dtype. Raises ValueError when the features do not fit delg_v1 (e.g. PCA-reduced dims).
    """
    features.validate()
    n = features.num_features
    gd = features.global_descriptor
    if gd.size == 0:
        raise MissingGlobalDescriptorError(
            f"no global descriptor: the image is {features.processed_hw[0]}x{features.processed_hw[1]} px after resize "
            "(under the 10 px minimum) or the model has no global head; a null global descriptor would make the "
            "shard unreadable in pyarrow (apache/arrow#35692)"
        )
    if gd.shape != (delg_v1.GLOBAL_DIM,):
        raise ValueError(
            f"global descriptor has shape {gd.shape}, schema {delg_v1.SCHEMA_VERSION} stores ({delg_v1.GLOBAL_DIM},): "
            "PCA-reduced descriptors do not fit this schema"
        )
    else:
        global_descriptor = np.ascontiguousarray(gd, dtype=np.float32)
    descriptors = features.descriptors
    if n and descriptors.shape[1] != delg_v1.LOCAL_DIM:
        raise ValueError(
            f"local descriptors are {descriptors.shape[1]}-d, "
            f"schema {delg_v1.SCHEMA_VERSION} stores {delg_v1.LOCAL_DIM}-d"
        )
    if n == 0:
        descriptors = np.zeros((0, delg_v1.LOCAL_DIM), np.float32)
    return {
        "image_id": image_id,
        "path": path,
        "original_height": int(features.original_hw[0]),
        "original_width": int(features.original_hw[1]),
        "processed_height": int(features.processed_hw[0]),
        "processed_width": int(features.processed_hw[1]),
        "global_descriptor": global_descriptor,
        "num_features": n,
        "locations": np.ascontiguousarray(features.locations, dtype=np.float32),
        "scales": np.ascontiguousarray(features.scales, dtype=np.float32),
        "attention": np.ascontiguousarray(features.attention, dtype=np.float32),
        "descriptors": np.ascontiguousarray(descriptors, dtype=np.dtype(descriptor_dtype)),
        "model": model,
        "preset": preset,
    }


def failure_record(
    image_id: str, path: str, stage: str, error_type: str, message: str, *, model: str, preset: str
) -> FailureRecord:
    """One failures row; message is cut to MAX_MESSAGE_CHARS and made one line."""
    if stage not in delg_v1.FAILURE_STAGES:
        raise ValueError(f"unknown failure stage {stage!r}; one of {delg_v1.FAILURE_STAGES}")
    message = " ".join(str(message).split()) or error_type
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[: MAX_MESSAGE_CHARS - 3] + "..."
    return {
        "image_id": image_id,
        "path": path,
        "stage": stage,
        "error_type": error_type,
        "message": message,
        "model": model,
        "preset": preset,
    }


def _offsets(counts: Sequence[int]) -> pa.Array:
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(np.asarray(counts, dtype=np.int64), out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("row group too large for 32-bit list offsets: lower --row_group_size")
    return pa.array(offsets.astype(np.int32), type=pa.int32())


def _nested(
    records: Sequence[FeatureRecord], key: str, width: int | None, field_type: pa.DataType, np_dtype
) -> pa.Array:
    """list<fixed_size_list<T, width>> (width given) or list<T> from per-row numpy arrays."""
    counts = [int(r["num_features"]) for r in records]
    parts = [np.asarray(r[key], dtype=np_dtype).reshape(-1) for r in records]
    flat = np.concatenate(parts) if parts else np.zeros((0,), np_dtype)
    value_type = field_type.value_type
    if width is None:
        values = pa.array(flat, type=value_type)
    else:
        values = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type.value_type), type=value_type)
    return pa.ListArray.from_arrays(_offsets(counts), values, type=field_type)


def features_table(records: Sequence[FeatureRecord], schema: pa.Schema) -> pa.Table:
    """Arrow table of feature records with exactly `schema` (a delg_v1 features schema, with metadata)."""
    n = len(records)
    gfield = schema.field("global_descriptor").type
    gflat = np.zeros((n, delg_v1.GLOBAL_DIM), np.float32)
    for i, r in enumerate(records):
        gflat[i] = r["global_descriptor"]  # never null, see MissingGlobalDescriptorError
    global_arr = pa.FixedSizeListArray.from_arrays(pa.array(gflat.reshape(-1), type=pa.float32()), type=gfield)
    desc_type = schema.field("descriptors").type
    desc_np = np.float16 if desc_type.value_type.value_type == pa.float16() else np.float32
    columns = {
        "image_id": pa.array([r["image_id"] for r in records], type=pa.string()),
        "path": pa.array([r["path"] for r in records], type=pa.string()),
        "original_height": pa.array([r["original_height"] for r in records], type=pa.int32()),
        "original_width": pa.array([r["original_width"] for r in records], type=pa.int32()),
        "processed_height": pa.array([r["processed_height"] for r in records], type=pa.int32()),
        "processed_width": pa.array([r["processed_width"] for r in records], type=pa.int32()),
        "global_descriptor": global_arr,
        "num_features": pa.array([r["num_features"] for r in records], type=pa.int32()),
        "locations": _nested(records, "locations", 2, schema.field("locations").type, np.float32),
        "scales": _nested(records, "scales", None, schema.field("scales").type, np.float32),
        "attention": _nested(records, "attention", None, schema.field("attention").type, np.float32),
        "descriptors": _nested(records, "descriptors", delg_v1.LOCAL_DIM, desc_type, desc_np),
        "model": pa.array([r["model"] for r in records], type=pa.string()),
        "preset": pa.array([r["preset"] for r in records], type=pa.string()),
    }
    return pa.Table.from_arrays([columns[name] for name in schema.names], schema=schema)


def failures_table(records: Sequence[FailureRecord], schema: pa.Schema = delg_v1.FAILURES_SCHEMA) -> pa.Table:
    """Arrow table of failure records with exactly `schema`."""
    return pa.Table.from_arrays(
        [pa.array([r[name] for r in records], type=pa.string()) for name in schema.names], schema=schema
    )


def table_for(kind: str, records: Sequence[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return features_table(records, schema) if kind == FEATURES else failures_table(records, schema)


def records_ids(records: Sequence[dict[str, Any]]) -> list[str]:
    return [r["image_id"] for r in records]
