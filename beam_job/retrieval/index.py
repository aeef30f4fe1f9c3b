"""FAISS index over the global descriptors of feature shards: build (bounded memory), save, load, search.

Layout of an index directory:
  index.faiss         the FAISS index (inner product; global descriptors are unit vectors, so cosine)
  idmap.parquet       position (int64) -> image_id, shard (URI), row (row number inside the shard), path
                      (the image's URI from the shards, so that a query may name an indexed image by path)
  build_config.json   how it was built: index kind + factory string, search parameters, counts,
                      the shards, and the model / preset / extraction config recorded in their footers,
                      untrained_model (true: random weights, results mean nothing; build, query and the
                      pages say so)

Index kinds (`kind`):
  flat   IndexFlatIP: exact. 8 KiB per 2048-d vector.
  ivfpq  "IVF{nlist},PQ{m}x4fs,RFlat": 4-bit fast-scan PQ, candidates refined with the exact vectors
         (8 KiB + m/2 B per vector). With refine=False: "IVF{nlist},PQ{m}x4fs" only (m/2 B per vector,
         lower recall).
  hnsw   "HNSW{M},Flat": graph index; best recall per query time, slow to build in 2048-d, > flat memory.
  auto   flat below AUTO_FLAT_MAX rows, else ivfpq (with refinement below AUTO_REFINE_MAX rows).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from beam_job import storage

from . import shards as shards_mod
from .shards import ShardInfo

logger = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDMAP_FILE = "idmap.parquet"
CONFIG_FILE = "build_config.json"

AUTO_FLAT_MAX = 200_000  # exact search up to 200k vectors (1.6 GB of float32 at 2048-d)
AUTO_REFINE_MAX = 2_000_000  # keep exact vectors for refinement up to 2M vectors (16 GB)
KINDS = ("auto", "flat", "ivfpq", "hnsw")
UNTRAINED_WARNING = ("UNTRAINED MODEL: these features come from random weights (shard metadata "
                     "delg.untrained_model): scores, inliers and 'verified' mean nothing for retrieval")

IDMAP_SCHEMA = pa.schema(
    [
        pa.field("position", pa.int64(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("row", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
    ]
)


@dataclass
class IndexConfig:
    """Index choice and parameters. None fields are derived from the collection size at build time."""

    kind: str = "auto"
    nlist: int | None = None  # IVF lists; default 2**round(log2(sqrt(n))), at least 16
    pq_m: int | None = None  # PQ sub-quantizers (4-bit each); default dim // 8
    refine: bool | None = None  # ivfpq: keep exact vectors (RFlat); default n < AUTO_REFINE_MAX
    hnsw_m: int = 32
    ef_construction: int = 40
    ef_search: int = 128
    nprobe: int | None = None  # default min(nlist, max(16, nlist // 16))
    k_factor_rf: int = 10  # refinement: exact re-scoring of k * k_factor_rf PQ candidates
    train_size: int | None = None  # IVF training sample; default min(n, max(64 * nlist, 20000), train_max)
    train_max: int = 100_000
    seed: int = 0
    allow_mixed_models: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, got {self.kind!r}")


def choose_kind(num_vectors: int, kind: str = "auto") -> str:
    """The concrete index kind for a collection size (see the module docstring for the thresholds)."""
    if kind != "auto":
        return kind
    return "flat" if num_vectors < AUTO_FLAT_MAX else "ivfpq"


def default_nlist(num_vectors: int) -> int:
    """2**round(log2(sqrt(n))), clipped to [16, n // 39] (faiss wants >= 39 training points per list)."""
    nlist = 2 ** int(round(math.log2(max(math.sqrt(max(num_vectors, 1)), 1))))
    return int(max(1, min(max(nlist, 16), num_vectors // 39)))


def resolve_config(cfg: IndexConfig, num_vectors: int, dim: int) -> dict:
    """Concrete parameters: kind, factory string, nlist, pq_m, refine, nprobe, train_size."""
    kind = choose_kind(num_vectors, cfg.kind)
    out: dict = {"kind": kind, "dim": dim}
    if kind == "flat":
        out["factory"] = "Flat"
    elif kind == "hnsw":
        out["factory"] = f"HNSW{cfg.hnsw_m},Flat"
    else:
        nlist = cfg.nlist or default_nlist(num_vectors)
        pq_m = cfg.pq_m or max(2, dim // 8)
        if dim % pq_m or pq_m % 2:
            raise ValueError(f"pq_m must be even and divide the dimension {dim}, got {pq_m}")
        refine = cfg.refine if cfg.refine is not None else num_vectors < AUTO_REFINE_MAX
        factory = f"IVF{nlist},PQ{pq_m}x4fs" + (",RFlat" if refine else "")
        train = cfg.train_size or min(num_vectors, max(64 * nlist, 20_000), cfg.train_max)
        if train < nlist:
            raise ValueError(
                f"IVF with nlist={nlist} needs at least {nlist} training vectors, have {train}: lower --nlist")
        nprobe = cfg.nprobe or min(nlist, max(16, nlist // 16))
        out.update(factory=factory, nlist=nlist, pq_m=pq_m, refine=refine, train_size=int(train), nprobe=int(nprobe))
    return out


def apply_search_params(index, params: dict, k_factor_rf: int, ef_search: int) -> None:
    """Set nprobe / efSearch / k_factor_rf on a freshly built or loaded index."""
    import faiss

    kind = params["kind"]
    if kind == "ivfpq":
        ivf = faiss.extract_index_ivf(index)
        ivf.nprobe = int(params["nprobe"])
        if params.get("refine"):
            refine = faiss.downcast_index(index)
            assert isinstance(refine, faiss.IndexRefine), type(refine)  # the factory's ",RFlat"
            refine.k_factor = float(k_factor_rf)
    elif kind == "hnsw":
        hnsw = faiss.downcast_index(index)
        assert isinstance(hnsw, faiss.IndexHNSW), type(hnsw)
        hnsw.hnsw.efSearch = int(ef_search)


# --------------------------------------------------------------------------------------------- sampling


def sample_vectors(
    shard_uris: Sequence[str], infos: Sequence[ShardInfo], count: int, seed: int = 0
) -> np.ndarray:
    """(<= count, D) float32 training sample drawn uniformly over all rows, read row group by row group.

    Memory: the sample plus one row group. Rows with a null descriptor that get drawn are dropped.
    """
    total = sum(i.num_rows for i in infos)
    count = min(count, total)
    dim = infos[0].global_dim
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=count, replace=False)) if count else np.zeros(0, np.int64)
    sample = np.empty((count, dim), np.float32)
    filled = 0
    shard_offsets = np.concatenate([[0], np.cumsum([i.num_rows for i in infos])])
    for batch in shards_mod.iter_global_batches(shard_uris, infos):
        global_rows = shard_offsets[batch.shard_index] + batch.rows  # collection-wide row numbers
        take = np.isin(global_rows, chosen, assume_unique=True)
        n = int(take.sum())
        if n:
            sample[filled : filled + n] = batch.matrix[take]
            filled += n
    return sample[:filled]


# --------------------------------------------------------------------------------------------- build


@dataclass
class BuildReport:
    """What build_index did: counts, timings (s), and the resolved parameters."""

    index_dir: str
    num_indexed: int
    num_null_skipped: int
    num_shards: int
    params: dict
    seconds: dict[str, float] = field(default_factory=dict)
    num_duplicate_ids: int = 0  # indexed rows whose image_id was already indexed (another shard or row)
    untrained_model: bool = False  # the shards say their model has random weights


def _check_consistent(infos: Sequence[ShardInfo], allow_mixed: bool) -> None:
    dims = {i.global_dim for i in infos}
    if len(dims) > 1:
        raise ValueError(f"shards disagree on the global descriptor size {sorted(dims)}: index them separately")
    pairs = {(i.model, i.preset, i.metadata.get("delg.config", "")) for i in infos}
    if len(pairs) > 1 and not allow_mixed:
        raise ValueError(
            f"shards come from {len(pairs)} different model/preset/config combinations "
            f"({sorted({(m, p) for m, p, _ in pairs})}): their descriptors are not comparable; "
            "index them separately or pass allow_mixed_models"
        )


def build_index(shards_uri: str, index_dir: str, config: IndexConfig | None = None) -> BuildReport:
    """Build a FAISS index from the shards under `shards_uri` (local or gs://) into `index_dir` (local or gs://).

    Reads only image_id + global_descriptor, one row group at a time, adding each zero-copy (n, D) view
    straight into the index; the id map is streamed to Parquet one row group per batch. Memory beyond
    the index itself is bounded by one row group (plus the IVF training sample, bounded by train_max).
    """
    import faiss

    cfg = config or IndexConfig()
    t0 = time.perf_counter()
    uris = shards_mod.list_shards(shards_uri)
    infos = [shards_mod.shard_info(u) for u in uris]
    _check_consistent(infos, cfg.allow_mixed_models)
    total = sum(i.num_rows for i in infos)
    if total == 0:
        raise ValueError(f"the shards under {shards_uri!r} hold no rows: nothing to index")
    dim = infos[0].global_dim
    params = resolve_config(cfg, total, dim)
    untrained = any(i.untrained for i in infos)
    if untrained:
        logger.warning(UNTRAINED_WARNING)
    logger.info("building %s index (%s) over %d rows in %d shards", params["kind"], params["factory"], total, len(uris))
    seconds: dict[str, float] = {"list": time.perf_counter() - t0}

    faiss.omp_set_num_threads(max(1, os.cpu_count() or 1))
    if params["kind"] == "hnsw":
        hnsw_index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw_index.hnsw.efConstruction = cfg.ef_construction
        index: faiss.Index = hnsw_index
    else:
        index = faiss.index_factory(dim, params["factory"], faiss.METRIC_INNER_PRODUCT)

    if not index.is_trained:
        t = time.perf_counter()
        sample = sample_vectors(uris, infos, params["train_size"], seed=cfg.seed)
        if len(sample) < params["nlist"]:
            raise ValueError(f"only {len(sample)} non-null vectors to train nlist={params['nlist']}: lower --nlist")
        seconds["sample"] = time.perf_counter() - t
        t = time.perf_counter()
        ivf = faiss.extract_index_ivf(index)
        ivf.cp.seed = cfg.seed
        index.train(sample)
        seconds["train"] = time.perf_counter() - t
        params["train_size"] = len(sample)
        del sample

    tmp_dir, out_dir = _local_output_dir(index_dir)
    idmap_path = os.path.join(out_dir, IDMAP_FILE)
    num_null = 0
    position = 0
    id_hashes: list[np.ndarray] = []  # 8 bytes per row: duplicate ids are looked for after the loop
    t = time.perf_counter()
    with pq.ParquetWriter(idmap_path, IDMAP_SCHEMA) as writer:
        for batch in shards_mod.iter_global_batches(uris, infos):
            num_null += batch.num_null
            n = len(batch.image_ids)
            if n:
                id_hashes.append(np.fromiter((hash(i) for i in batch.image_ids), np.int64, count=n))
                index.add(batch.matrix)
                writer.write_table(
                    pa.table(
                        {
                            "position": pa.array(np.arange(position, position + n, dtype=np.int64)),
                            "image_id": pa.array(batch.image_ids, pa.string()),
                            "shard": pa.array([uris[batch.shard_index]] * n, pa.string()),
                            "row": pa.array(batch.rows),
                            "path": pa.array(batch.paths, pa.string()),
                        },
                        schema=IDMAP_SCHEMA,
                    )
                )
                position += n
    seconds["add"] = time.perf_counter() - t
    if position == 0:
        raise ValueError(f"every row under {shards_uri!r} has a null global descriptor: nothing to index")
    if num_null:
        logger.warning("skipped %d rows with a null global descriptor", num_null)
    num_duplicates = _warn_duplicate_ids(idmap_path, np.concatenate(id_hashes))
    del id_hashes

    apply_search_params(index, params, cfg.k_factor_rf, cfg.ef_search)
    t = time.perf_counter()
    faiss.write_index(index, os.path.join(out_dir, INDEX_FILE))
    seconds["write"] = time.perf_counter() - t
    first = infos[0]
    build_config = {
        "format": "delg-retrieval-index/1",
        "metric": "inner_product",
        "num_indexed": position,
        "num_rows": total,
        "num_null_skipped": num_null,
        "num_duplicate_ids": num_duplicates,
        "params": params,
        "search": {"k_factor_rf": cfg.k_factor_rf, "ef_search": cfg.ef_search},
        "index_config": asdict(cfg),
        "shards_uri": shards_uri,
        "shards": uris,
        "model": first.model,
        "preset": first.preset,
        "extraction_config": first.config,
        "shard_metadata": dict(first.metadata),
        "untrained_model": untrained,
        "seconds": seconds,
        "faiss_version": faiss.__version__,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as fh:
        json.dump(build_config, fh, indent=2, sort_keys=True)
    if tmp_dir is not None:
        _upload_dir(out_dir, index_dir)
        shutil.rmtree(tmp_dir, ignore_errors=True)
    seconds["total"] = time.perf_counter() - t0
    logger.info("indexed %d vectors (%d null skipped) in %.2f s", position, num_null, seconds["total"])
    return BuildReport(index_dir, position, num_null, len(uris), params, seconds, num_duplicates, untrained)


def _warn_duplicate_ids(idmap_path: str, hashes: np.ndarray) -> int:
    """Count indexed rows repeating an earlier image_id and log a warning naming a few (0 when all unique).

    Only when the per-row hashes collide are the ids themselves read back from the id map to confirm."""
    if len(np.unique(hashes)) == len(hashes):
        return 0
    import pyarrow.compute as pc

    counts = pc.value_counts(pq.read_table(idmap_path, columns=["image_id"]).column("image_id"))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return 0
    extra = int(pc.sum(repeated.field("counts")).as_py()) - len(repeated)
    examples = repeated.field("values").to_pylist()[:3]
    logger.warning("%d indexed rows repeat an image_id already indexed (%d ids, e.g. %s): results may list an id "
                   "twice; give every image a unique id (e.g. a manifest image_id column)",
                   extra, len(repeated), examples)
    return extra


def _local_output_dir(index_dir: str) -> tuple[str | None, str]:
    if index_dir.startswith("gs://"):
        tmp = tempfile.mkdtemp(prefix="delg-index-")
        return tmp, tmp
    os.makedirs(index_dir, exist_ok=True)
    return None, index_dir


def _upload_dir(local_dir: str, uri: str) -> None:
    for name in (INDEX_FILE, IDMAP_FILE, CONFIG_FILE):
        with open(os.path.join(local_dir, name), "rb") as src, storage.create(f"{uri.rstrip('/')}/{name}") as out:
            shutil.copyfileobj(src, out, length=8 * 1024 * 1024)


# --------------------------------------------------------------------------------------------- load + search


class RetrievalIndex:
    """A loaded index directory: `search` by global descriptor, and the id map to go back to the shards.

    image_ids: (n,) object array, position -> image_id. shard_uris: list; shard_of: (n,) int32 index into
    it; rows: (n,) int64 row inside that shard.
    """

    def __init__(self, index, image_ids: np.ndarray, shard_uris: list[str], shard_of: np.ndarray, rows: np.ndarray,
                 config: dict, paths: np.ndarray | None = None):
        self.index = index
        self.paths = paths if paths is not None else np.full(len(image_ids), "", dtype=object)
        self._by_path: dict[str, int] | None = None
        self.image_ids = image_ids
        self.shard_uris = shard_uris
        self.shard_of = shard_of
        self.rows = rows
        self.config = config
        self._positions: dict[str, int] | None = None
        self._counts: dict[str, int] | None = None

    @classmethod
    def load(cls, index_dir: str, nprobe: int | None = None, ef_search: int | None = None) -> RetrievalIndex:
        """Load index_dir (local or gs://); nprobe / ef_search override the saved search parameters."""
        import faiss

        tmp = None
        if index_dir.startswith("gs://"):
            tmp = tempfile.mkdtemp(prefix="delg-index-")
            for name in (INDEX_FILE, IDMAP_FILE, CONFIG_FILE):
                try:
                    data = shards_mod.read_bytes(f"{index_dir.rstrip('/')}/{name}")
                except Exception as err:  # google.api_core NotFound and friends
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise ValueError(f"{index_dir!r} is not an index directory (cannot read {name}: {err})") from None
                with open(os.path.join(tmp, name), "wb") as fh:
                    fh.write(data)
            local = tmp
        else:
            local = index_dir
        for name in (INDEX_FILE, IDMAP_FILE, CONFIG_FILE):
            if not os.path.exists(os.path.join(local, name)):
                raise ValueError(
                    f"{index_dir!r} is not an index directory (no {name}): run `delg-retrieval build` first")
        with open(os.path.join(local, CONFIG_FILE)) as fh:
            config = json.load(fh)
        index = faiss.read_index(os.path.join(local, INDEX_FILE))
        table = pq.read_table(os.path.join(local, IDMAP_FILE))
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        order = np.argsort(table.column("position").to_numpy())
        shard_col = table.column("shard").combine_chunks().dictionary_encode()
        params = dict(config["params"])
        if nprobe:
            params["nprobe"] = nprobe
        apply_search_params(index, params, config["search"]["k_factor_rf"], ef_search or config["search"]["ef_search"])
        config["params"] = params
        return cls(
            index=index,
            image_ids=np.asarray(table.column("image_id").to_pylist(), dtype=object)[order],
            shard_uris=shard_col.dictionary.to_pylist(),
            shard_of=shard_col.indices.to_numpy(zero_copy_only=False).astype(np.int32)[order],
            rows=table.column("row").to_numpy()[order],
            config=config,
            paths=(np.asarray(table.column("path").to_pylist(), dtype=object)[order]
                   if "path" in table.column_names else None),  # indexes built before the path column: none
        )

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def untrained(self) -> bool:
        """Whether the indexed features come from a model with random weights (build_config.json's
        `untrained_model`; indexes built before it: the shard metadata recorded at build time)."""
        if "untrained_model" in self.config:
            return bool(self.config["untrained_model"])
        return shards_mod.untrained_model(self.config.get("shard_metadata") or {})

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def position_of(self, image_id: str) -> int:
        """Position of an image id in the index. Raises KeyError when it is not indexed."""
        if self._positions is None:
            self._positions = {iid: i for i, iid in enumerate(self.image_ids)}
        if image_id not in self._positions:
            raise KeyError(f"image id {image_id!r} is not in the index")
        return self._positions[image_id]

    def position_of_path(self, path: str) -> int:
        """Position of the image stored under this path (as the job recorded it; a local path may also be
        given relative to the working directory). Raises KeyError when no indexed image has that path."""
        if self._by_path is None:
            self._by_path = {p: i for i, p in enumerate(self.paths) if p}
        candidates = [path] if "://" in path else [path, os.path.abspath(path)]
        for candidate in candidates:
            if candidate in self._by_path:
                return self._by_path[candidate]
        raise KeyError(f"no indexed image has the path {path!r}")

    def count_of(self, image_id: str) -> int:
        """How many index positions hold this image id (more than 1 when ids repeat across shards)."""
        if self._counts is None:
            self._counts = {}
            for iid in self.image_ids:
                self._counts[iid] = self._counts.get(iid, 0) + 1
        return self._counts.get(image_id, 0)

    def ref(self, position: int) -> tuple[str, int]:
        """(shard URI, row) of an index position."""
        return self.shard_uris[int(self.shard_of[position])], int(self.rows[position])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by inner product. queries (q, D) float32 -> (scores (q, k) float32, positions (q, k) int64).

        Missing results (k > n, or IVF lists too sparse) have position -1 and score -inf.
        """
        q = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ValueError(f"query descriptors have dimension {q.shape[1]}, the index has {self.dim}")
        k = int(min(k, len(self))) if k > 0 else 0
        if k == 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        scores, positions = self.index.search(q, k)
        scores = np.where(positions < 0, -np.inf, scores).astype(np.float32)
        return scores, positions.astype(np.int64)

    def reconstruct(self, position: int) -> np.ndarray | None:
        """The stored vector at a position when the index keeps exact vectors (flat, hnsw, refined ivfpq)."""
        try:
            return self.index.reconstruct(int(position))
        except RuntimeError:
            return None
