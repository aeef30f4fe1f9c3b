"""Synthetic DELG data for tests and benchmarks: unit vectors, affine-related local features, delg_v1 shards.

Nothing here is a model: the vectors are random, but the shards use the real schema and footer metadata
(schemas/delg_v1.py), so every reader in the retrieval package sees exactly what the job writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from beam_job import storage
from beam_job.schemas import delg_v1


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """(n, dim) float32 rows with unit L2 norm."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clustered_unit_rows(rng: np.random.Generator, n: int, dim: int, num_clusters: int = 64, spread: float = 0.6):
    """(n, dim) float32 unit rows drawn around `num_clusters` random centres (more realistic than iid noise)."""
    centres = unit_rows(rng, num_clusters, dim)
    labels = rng.integers(0, num_clusters, n)
    x = centres[labels] + spread * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


@dataclass
class SyntheticPair:
    """Two images' local features related by a known affine map (y, x convention).

    matrix (2, 3) maps `a` locations to `b` locations: b = matrix[:, :2] @ a + matrix[:, 2]. The first
    `num_true` features of each side correspond (a[i] <-> b[i]); the rest are unrelated outliers.
    """

    loc_a: np.ndarray
    desc_a: np.ndarray
    loc_b: np.ndarray
    desc_b: np.ndarray
    matrix: np.ndarray
    num_true: int


def affine_yx(angle_deg: float = 12.0, scale: float = 0.8, shear: float = 0.05, ty: float = 30.0, tx: float = 60.0):
    """(2, 3) affine matrix acting on (y, x) column vectors."""
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]) * scale
    rot = rot @ np.array([[1.0, shear], [0.0, 1.0]])
    return np.hstack([rot, [[ty], [tx]]]).astype(np.float64)


def affine_pair(
    rng: np.random.Generator,
    num_features: int = 1000,
    inlier_fraction: float = 0.5,
    matrix: np.ndarray | None = None,
    size_hw=(768, 1024),
    loc_noise: float = 1.0,
    desc_noise: float = 0.15,
    dim: int = delg_v1.LOCAL_DIM,
) -> SyntheticPair:
    """Features of image A and of a warped copy B: inliers are noisy warped copies, the rest random."""
    matrix = affine_yx() if matrix is None else np.asarray(matrix, np.float64)
    h, w = size_hw
    num_true = int(round(num_features * inlier_fraction))
    loc_a = (rng.random((num_features, 2)) * [h, w]).astype(np.float32)
    desc_a = unit_rows(rng, num_features, dim)
    loc_b = (rng.random((num_features, 2)) * [h, w]).astype(np.float32)
    desc_b = unit_rows(rng, num_features, dim)
    warped = loc_a[:num_true].astype(np.float64) @ matrix[:, :2].T + matrix[:, 2]
    loc_b[:num_true] = (warped + rng.normal(0, loc_noise, warped.shape)).astype(np.float32)
    noisy = desc_a[:num_true] + desc_noise * rng.standard_normal((num_true, dim), dtype=np.float32) / np.sqrt(dim)
    desc_b[:num_true] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return SyntheticPair(loc_a, desc_a, loc_b, desc_b, matrix, num_true)


def _nested(arrays: Sequence[np.ndarray], width: int, value_type: pa.DataType) -> pa.Array:
    """list<fixed_size_list<value_type, width>> from per-row (N_i, width) arrays, without Python lists."""
    lengths = np.array([len(a) for a in arrays], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate([a.reshape(-1) for a in arrays]) if len(arrays) else np.zeros(0)
    values = pa.array(flat.astype(value_type.to_pandas_dtype()), type=value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.FixedSizeListArray.from_arrays(values, width))


def _flat_lists(arrays: Sequence[np.ndarray]) -> pa.Array:
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in arrays])]).astype(np.int32)
    flat = np.concatenate(arrays).astype(np.float32) if len(arrays) else np.zeros(0, np.float32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float32()))


def rows_to_table(rows: Sequence[dict], descriptor_dtype: str = "float32", metadata: dict | None = None) -> pa.Table:
    """A delg_v1 table from dicts with keys image_id, global_descriptor ((D,) or None), locations (N,2),
    descriptors (N,128); optional path, original_height/width, model, preset."""
    schema = delg_v1.features_schema(descriptor_dtype)
    if metadata is not None:
        schema = delg_v1.with_metadata(schema, metadata)
    desc_type = pa.float32() if descriptor_dtype == "float32" else pa.float16()
    n = len(rows)
    locs = [np.asarray(r.get("locations", np.zeros((0, 2))), np.float32).reshape(-1, 2) for r in rows]
    descs = [np.asarray(r.get("descriptors", np.zeros((0, 128))), np.float32).reshape(-1, delg_v1.LOCAL_DIM)
             for r in rows]
    counts = [len(a) for a in locs]
    dim = delg_v1.GLOBAL_DIM
    glob = np.zeros((n, dim), np.float32)
    null = np.zeros(n, bool)
    for i, r in enumerate(rows):
        g = r.get("global_descriptor")
        if g is None:
            null[i] = True
        else:
            glob[i] = g
    heights = [r.get("original_height", 768) for r in rows]
    widths = [r.get("original_width", 1024) for r in rows]
    columns = {
        "image_id": pa.array([r["image_id"] for r in rows], pa.string()),
        "path": pa.array([r.get("path", f"/images/{r['image_id']}.jpg") for r in rows], pa.string()),
        "original_height": pa.array(heights, pa.int32()),
        "original_width": pa.array(widths, pa.int32()),
        "processed_height": pa.array(heights, pa.int32()),
        "processed_width": pa.array(widths, pa.int32()),
        "global_descriptor": pa.FixedSizeListArray.from_arrays(
            pa.array(glob.reshape(-1)), dim, mask=pa.array(null) if null.any() else None
        ),
        "num_features": pa.array(counts, pa.int32()),
        "locations": _nested(locs, 2, pa.float32()),
        "scales": _flat_lists([np.ones(c, np.float32) for c in counts]),
        "attention": _flat_lists([np.linspace(1.0, 0.5, c, dtype=np.float32) for c in counts]),
        "descriptors": _nested(descs, delg_v1.LOCAL_DIM, desc_type),
        "model": pa.array([r.get("model", "synthetic") for r in rows], pa.string()),
        "preset": pa.array([r.get("preset", "synthetic") for r in rows], pa.string()),
    }
    return pa.Table.from_arrays([columns[f.name].cast(f.type) for f in schema], schema=schema)


def default_metadata(model: str = "synthetic", preset: str = "tiny", config: dict | None = None, **kw) -> dict:
    return delg_v1.file_metadata(
        model=model, preset=preset, config_json=json.dumps(config or {"name": preset}), untrained=True, **kw
    )


def write_shard(uri: str, table: pa.Table, row_group_size: int | None = None) -> str:
    """Write one Parquet shard to a local path or gs:// URI."""
    with storage.create(uri) as out:
        # the job's writer options (beam_job/pipeline/writer.py)
        pq.write_table(table, out, row_group_size=row_group_size, compression="zstd", use_compliant_nested_type=False)
    return uri


def write_global_shards(
    folder: str,
    vectors: np.ndarray,
    num_shards: int,
    rng: np.random.Generator | None = None,
    local_features: int = 0,
    row_group_size: int | None = None,
    metadata: dict | None = None,
    id_prefix: str = "img",
) -> list[str]:
    """Split (n, D) vectors into `num_shards` shards `part-XXXXX.parquet` under folder; ids `{prefix}{i:07d}`.

    Each row gets `local_features` random local features (0: none). Returns the shard URIs.
    """
    rng = rng or np.random.default_rng(0)
    metadata = metadata or default_metadata()
    uris = []
    bounds = np.linspace(0, len(vectors), num_shards + 1).astype(int)
    for s in range(num_shards):
        rows = []
        for i in range(bounds[s], bounds[s + 1]):
            row = {"image_id": f"{id_prefix}{i:07d}", "global_descriptor": vectors[i]}
            if local_features:
                row["locations"] = rng.random((local_features, 2)) * [768, 1024]
                row["descriptors"] = unit_rows(rng, local_features, delg_v1.LOCAL_DIM)
            rows.append(row)
        uri = f"{folder.rstrip('/')}/part-{s:05d}.parquet"
        write_shard(uri, rows_to_table(rows, metadata=metadata), row_group_size=row_group_size)
        uris.append(uri)
    return uris
