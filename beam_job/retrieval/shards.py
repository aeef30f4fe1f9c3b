"""Reading DELG feature shards (local or gs://): shard listing, global-descriptor batches, local features by row.

Everything here reads Parquet through pyarrow, one row group at a time, so memory is bounded by a row
group, never by the collection. Local paths and `gs://` go through the project's storage layer
(`beam_job.storage`, Beam's FileSystems).

Conventions (schemas/delg_v1.py): locations are (y, x) in original-image pixels; descriptors and the
global descriptor are L2-normalised; local descriptors may be stored as float16 and are returned as float32.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from beam_job import layout, storage
from beam_job.config import EMBEDDED_MODEL_PREFIX
from beam_job.schemas import delg_v1

logger = logging.getLogger(__name__)

GLOBAL_COLUMN = "global_descriptor"


# --------------------------------------------------------------------------------------------- files


def open_input_file(uri: str) -> pa.NativeFile:
    """A random-access file for pyarrow, local or gs://, through the project's storage layer."""
    return pa.PythonFile(storage.open_read(uri), mode="r")


def read_bytes(uri: str) -> bytes:
    """Whole file contents, local or gs://."""
    return storage.read_bytes(uri)


def write_bytes(uri: str, data: bytes) -> str:
    """Write a whole file, local (parent folders created) or gs://; returns the URI."""
    storage.write_bytes(uri, data)
    return uri


def list_shards(uri: str) -> list[str]:
    """Sorted feature-shard URIs under `uri`.

    `uri` may be a job output directory (its `features/` subfolder is used), a folder of `*.parquet`
    files, a glob such as `gs://b/out/features/*.parquet` or `out/run-*/features/*.parquet` (wildcards in
    folder names too; `*` never crosses a `/`), or one `.parquet` file.
    Raises ValueError when nothing matches; a listing error (permission denied) raises as it is.
    """
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    if storage.has_glob(uri):
        files = storage.match(uri)
    elif uri.endswith(".parquet") and storage.match(uri):
        files = [uri]
    else:
        files = (storage.match(layout.shard_glob(layout.features_dir(uri)))
                 or storage.match(layout.shard_glob(uri)))
    if not files:
        raise ValueError(f"no feature shards (*.parquet) found at {uri!r}: give the job output or its features/ folder")
    return sorted(files)


# --------------------------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class ShardInfo:
    """Footer facts of one shard: row count, row-group sizes and the delg.* metadata."""

    uri: str
    num_rows: int
    row_group_rows: tuple[int, ...]
    metadata: Mapping[str, str]
    global_dim: int

    @property
    def model(self) -> str:
        return self.metadata.get("delg.model", "")

    @property
    def preset(self) -> str:
        return self.metadata.get("delg.preset", "")

    @property
    def config(self) -> dict | None:
        raw = self.metadata.get("delg.config")
        return json.loads(raw) if raw else None

    @property
    def untrained(self) -> bool:
        return untrained_model(self.metadata)


def untrained_model(metadata: Mapping[str, str]) -> bool:
    """Whether shard footer metadata (str keys) say the features come from a model with random weights: the
    job's `delg.untrained_model` key, else (older shards) the recorded config's `untrained` or an embedded model."""
    flag = metadata.get(delg_v1.META_UNTRAINED.decode())
    if flag is not None:
        return flag.strip().lower() == "true"
    try:
        config = json.loads(metadata.get("delg.config") or "{}")
    except ValueError:
        config = {}
    models = (str(config.get("model") or ""), metadata.get("delg.model", ""))
    return bool(config.get("untrained")) or any(m.startswith(EMBEDDED_MODEL_PREFIX) for m in models)


def open_parquet(uri: str, ignore_arrow_schema: bool = False) -> pq.ParquetFile:
    """Open a shard. ignore_arrow_schema: read the Parquet types only (fixed_size_list comes back as list),
    the workaround for pyarrow < 26 failing on null fixed_size_list entries (apache/arrow#35692)."""
    source = open_input_file(uri)
    if not ignore_arrow_schema:
        return pq.ParquetFile(source)
    size = source.size()
    source.seek(size - 8)
    tail = source.read(8)
    footer_len = struct.unpack("<i", tail[:4])[0]
    source.seek(size - 8 - footer_len)
    footer = source.read(footer_len)
    # Same-length rename of the key keeps the Thrift footer valid; the reader then infers types from Parquet.
    patched = footer.replace(b"ARROW:schema", b"ARROW:schemX")
    metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + patched + tail))
    source.seek(0)
    return pq.ParquetFile(source, metadata=metadata)


def _is_null_fixed_list_error(err: Exception) -> bool:
    return "Expected all lists to be of size" in str(err)


def read_row_group(uri: str, pf: pq.ParquetFile, rg: int, columns: Sequence[str]) -> tuple[pa.Table, pq.ParquetFile]:
    """Read one row group; on pyarrow's null-fixed_size_list bug, reopen without the Arrow schema and retry.

    Returns (table, the ParquetFile to keep using)."""
    try:
        return pf.read_row_group(rg, columns=list(columns), use_threads=False), pf
    except pa.ArrowInvalid as err:
        if not _is_null_fixed_list_error(err):
            raise
        logger.debug("%s: null fixed_size_list entries; reading with Parquet types (apache/arrow#35692)", uri)
        pf = open_parquet(uri, ignore_arrow_schema=True)
        return pf.read_row_group(rg, columns=list(columns), use_threads=False), pf


def shard_info(uri: str, parquet_file: pq.ParquetFile | None = None) -> ShardInfo:
    """Read only the footer of a shard. Raises ValueError when it lacks the delg_v1 columns."""
    pf = parquet_file or open_parquet(uri)
    schema = pf.schema_arrow
    missing = {"image_id", GLOBAL_COLUMN, "locations", "descriptors"} - set(schema.names)
    if missing:
        raise ValueError(f"{uri} is not a delg_v1 feature shard: missing columns {sorted(missing)}")
    gtype = schema.field(GLOBAL_COLUMN).type
    if pa.types.is_fixed_size_list(gtype):
        dim = gtype.list_size
    else:
        dim = delg_v1.GLOBAL_DIM
    meta = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k.startswith(b"delg.")}
    md = pf.metadata
    rg_rows = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
    return ShardInfo(uri=uri, num_rows=md.num_rows, row_group_rows=rg_rows, metadata=meta, global_dim=dim)


# --------------------------------------------------------------------------------------------- global batches


@dataclass
class GlobalBatch:
    """Global descriptors of one row group of one shard.

    matrix:   (n, D) float32, unit rows; a READ-ONLY view on Arrow memory when the row group had no nulls.
    image_ids: n ids.  rows: (n,) int64 row numbers inside the shard.  num_null: rows skipped (null vector).
    """

    shard_index: int
    row_group: int
    image_ids: list[str]
    rows: np.ndarray
    matrix: np.ndarray
    num_null: int
    paths: list[str]  # the shards' `path` column (the image URI), "" where the shard has none


def fixed_list_to_numpy(array: pa.Array, dim: int) -> np.ndarray:
    """(n, dim) float32 view of a null-free (fixed_size_)list<float32> array, without copying when possible."""
    flat = array.flatten()
    if flat.type != pa.float32():
        flat = flat.cast(pa.float32())
    if len(flat) != len(array) * dim:
        raise ValueError(f"expected {dim} values per row, got {len(flat)} for {len(array)} rows")
    return flat.to_numpy(zero_copy_only=True).reshape(len(array), dim)


def valid_vector_mask(col: pa.Array, dim: int) -> np.ndarray:
    """(n,) bool: rows holding a complete vector of `dim` non-null values.

    A null row can come back two ways: as a null list, or (when read with Parquet types, see open_parquet)
    as a list of `dim` null values; both count as null here.
    """
    n = len(col)
    valid = np.ones(n, bool) if col.null_count == 0 else np.asarray(pc.is_valid(col).to_numpy(zero_copy_only=False))
    if pa.types.is_fixed_size_list(col.type) and col.values.null_count == 0:
        return valid
    lengths = pc.list_value_length(col).fill_null(0).to_numpy(zero_copy_only=False)
    valid &= lengths == dim
    values = col.flatten()
    if values.null_count:
        parents = pc.list_parent_indices(col).to_numpy(zero_copy_only=False)
        null_values = pc.is_null(values).to_numpy(zero_copy_only=False)
        valid[np.unique(parents[null_values])] = False
    return valid


def iter_global_batches(shards: Sequence[str], infos: Sequence[ShardInfo] | None = None) -> Iterator[GlobalBatch]:
    """Yield the global descriptors shard by shard, row group by row group (only two columns are read)."""
    for si, uri in enumerate(shards):
        pf = open_parquet(uri)
        info = infos[si] if infos is not None else shard_info(uri, pf)
        start = 0
        for rg in range(pf.metadata.num_row_groups):
            has_path = "path" in pf.schema_arrow.names
            table, pf = read_row_group(uri, pf, rg, ["image_id", "path", GLOBAL_COLUMN] if has_path
                                       else ["image_id", GLOBAL_COLUMN])
            n = table.num_rows
            col = table.column(GLOBAL_COLUMN).combine_chunks()
            ids = table.column("image_id").combine_chunks()
            paths = table.column("path").combine_chunks() if has_path else pa.array([""] * n, pa.string())
            rows = np.arange(start, start + n, dtype=np.int64)
            valid = valid_vector_mask(col, info.global_dim)
            num_null = int(n - valid.sum())
            if num_null:
                mask = pa.array(valid)
                col, ids, paths, rows = col.filter(mask), ids.filter(mask), paths.filter(mask), rows[valid]
            matrix = (fixed_list_to_numpy(col, info.global_dim) if len(col)
                      else np.zeros((0, info.global_dim), np.float32))
            nonzero = np.any(matrix != 0, axis=1)  # a zero vector is how pyarrow <= 25 may return a written null
            if not nonzero.all():
                num_null += int((~nonzero).sum())
                keep = pa.array(nonzero)
                ids, paths, rows, matrix = ids.filter(keep), paths.filter(keep), rows[nonzero], matrix[nonzero]
            yield GlobalBatch(si, rg, ids.to_pylist(), rows, matrix, num_null,
                              [p or "" for p in paths.to_pylist()])
            start += n
            del table, col


# --------------------------------------------------------------------------------------------- local features


@dataclass(frozen=True)
class LocalFeatures:
    """Local features of one image: locations (N, 2) float32 (y, x) original pixels; descriptors (N, d) float32."""

    locations: np.ndarray
    descriptors: np.ndarray

    @property
    def num_features(self) -> int:
        return int(self.locations.shape[0])


@dataclass(frozen=True)
class ImageRecord:
    """One shard row as the retrieval side needs it (global may be shape (0,) when null)."""

    image_id: str
    path: str
    original_hw: tuple[int, int]
    global_descriptor: np.ndarray
    local: LocalFeatures


def _nested_to_numpy(array: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray]:
    """list<fixed_size_list<T, width>> -> (offsets (n+1,), values (total, width) float32)."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    offsets = array.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = offsets - offsets[0]
    inner = array.flatten()  # honours the slice offset
    values = inner.flatten()
    np_values = values.to_numpy(zero_copy_only=False)
    return offsets, np.asarray(np_values, dtype=np.float32).reshape(-1, width)


class LocalFeatureReader:
    """Fetch rows (global + local features) by (shard uri, row) from the shards.

    Rows are grouped by shard and row group, and only the row groups that hold a requested row are read
    (columns image_id, path, sizes, global_descriptor, locations, descriptors).
    """

    COLUMNS = ("image_id", "path", "original_height", "original_width", GLOBAL_COLUMN, "locations", "descriptors")

    def __init__(self, max_workers: int = 4) -> None:
        self.max_workers = max_workers
        self._files: dict[str, pq.ParquetFile] = {}
        self._rg_starts: dict[str, np.ndarray] = {}
        self._local_dims: dict[str, int] = {}

    def _open(self, uri: str) -> tuple[pq.ParquetFile, np.ndarray]:
        if uri not in self._files:
            pf = open_parquet(uri)
            md = pf.metadata
            sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            self._files[uri] = pf
            self._rg_starts[uri] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
            self._local_dims[uri] = self.local_dim_of(pf)
        return self._files[uri], self._rg_starts[uri]

    @staticmethod
    def local_dim_of(pf: pq.ParquetFile) -> int:
        """Width of the local descriptors of a shard (from its schema; LOCAL_DIM when not fixed-size)."""
        inner = pf.schema_arrow.field("descriptors").type.value_type
        return inner.list_size if pa.types.is_fixed_size_list(inner) else delg_v1.LOCAL_DIM

    def read(self, refs: Sequence[tuple[str, int]]) -> list[ImageRecord]:
        """Records for (shard_uri, row) pairs, in the order given. Shards are read in parallel threads
        (pyarrow decodes without the GIL); row groups of one shard are read one after the other."""
        out: list[ImageRecord | None] = [None] * len(refs)
        per_shard: dict[str, dict[int, list[tuple[int, int]]]] = {}
        for pos, (uri, row) in enumerate(refs):
            _, starts = self._open(uri)
            if not 0 <= row < starts[-1]:
                raise ValueError(f"row {row} out of range for {uri} ({starts[-1]} rows): rebuild the index")
            rg = int(np.searchsorted(starts, row, side="right") - 1)
            per_shard.setdefault(uri, {}).setdefault(rg, []).append((pos, int(row - starts[rg])))

        def shard_task(uri: str) -> list[tuple[int, ImageRecord]]:
            return [rec for rg, items in per_shard[uri].items() for rec in self._read_group(uri, rg, items)]

        if len(per_shard) > 1 and self.max_workers > 1:
            with ThreadPoolExecutor(max_workers=min(self.max_workers, len(per_shard))) as pool:
                results = list(pool.map(shard_task, per_shard))
        else:
            results = [shard_task(uri) for uri in per_shard]
        for chunk in results:
            for pos, record in chunk:
                out[pos] = record
        return out  # type: ignore[return-value]

    def _read_group(self, uri: str, rg: int, items: list[tuple[int, int]]) -> list[tuple[int, ImageRecord]]:
        pf = self._files[uri]
        names = [c for c in self.COLUMNS if c in pf.schema_arrow.names]
        table, self._files[uri] = read_row_group(uri, pf, rg, names)
        table = table.take(pa.array([r for _, r in items], pa.int64()))
        loc_off, locs = _nested_to_numpy(table.column("locations"), 2)
        desc_off, descs = _nested_to_numpy(table.column("descriptors"), self._local_dims[uri])
        gcol = table.column(GLOBAL_COLUMN).combine_chunks()
        n = len(items)
        ids = table.column("image_id").to_pylist()
        paths = table.column("path").to_pylist() if "path" in names else [""] * n
        heights = table.column("original_height").to_pylist() if "original_height" in names else [0] * n
        widths = table.column("original_width").to_pylist() if "original_width" in names else [0] * n
        records = []
        for j, (pos, _) in enumerate(items):
            g = gcol[j]
            gvec = np.asarray(g.values.to_numpy(zero_copy_only=False), np.float32) if g.is_valid else None
            if gvec is None or gvec.size == 0 or np.isnan(gvec).any() or not gvec.any():
                gvec = np.zeros((0,), np.float32)
            local = LocalFeatures(locs[loc_off[j] : loc_off[j + 1]], descs[desc_off[j] : desc_off[j + 1]])
            records.append((pos, ImageRecord(ids[j], paths[j], (int(heights[j]), int(widths[j])), gvec, local)))
        return records
