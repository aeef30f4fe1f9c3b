"""Querying an index: global top-k, then local-feature re-ranking of the top N, for image ids already in the
shards or for new images extracted on the fly with the model and preset recorded in the shards.

Result rows (one per (query, result)): query_id, query_path (the query image: the indexed image's path, or
the file extracted, made absolute when local), query_bbox ("x1 y1 x2 y2" of a cropped query, else ""),
rank (1-based global rank), image_id, path (the result image, from the index's id map), global_score
(inner product = cosine), inliers (RANSAC inliers, 0 when not re-ranked), final_rank (1-based, by
(inliers, global_score) descending, as DELG's reference orders them), verified (whether the pair went
through local matching + RANSAC; `inliers` is meaningful only then). The query columns are what
`delg-retrieval report` needs to draw the query and its match pictures without the queries file.

Re-ranking verifies the global top N, or, when the caller names images to skip per query (the junk
images of each Revisited Oxford/Paris protocol), the first N results that are not skipped, for each set.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from beam_job import storage

from .index import RetrievalIndex
from .rerank import RerankConfig, final_order, verify_pair
from .shards import LocalFeatureReader, LocalFeatures, read_bytes

if TYPE_CHECKING:
    from beam_job.delg.extractor import DelgExtractor

logger = logging.getLogger(__name__)

RESULTS_SCHEMA = pa.schema(
    [
        pa.field("query_id", pa.string(), nullable=False),
        pa.field("query_path", pa.string(), nullable=False),
        pa.field("query_bbox", pa.string(), nullable=False),
        pa.field("rank", pa.int32(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("global_score", pa.float32(), nullable=False),
        pa.field("inliers", pa.int32(), nullable=False),
        pa.field("final_rank", pa.int32(), nullable=False),
        pa.field("verified", pa.bool_(), nullable=False),
    ]
)
ALL = "all"  # k = ALL: rank the whole index (what evaluation protocols need)
RESULT_FORMATS = (".parquet", ".csv")
# Footer metadata of Parquet results (CSV has none): the --k of the query (evaluation knows then whether a
# ranking was cut) and whether the features come from an untrained model.
RESULTS_K_KEY = b"delg.k"
RESULTS_UNTRAINED_KEY = b"delg.untrained_model"


@dataclass(frozen=True)
class Query:
    """One query: global descriptor (D,) float32 unit vector; local features (may be None: no re-ranking).

    exclude_id: an image id to drop from the results (the query itself when it comes from the index).
    source: the image URI (shard `path` column for indexed images; an extracted local file's absolute path).
    bbox: the crop [x1, y1, x2, y2] of an extracted query, in stored pixels (None: the whole image).
    """

    query_id: str
    global_descriptor: np.ndarray
    local: LocalFeatures | None
    exclude_id: str | None = None
    source: str = ""
    bbox: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ResultList:
    """Results of one query in final order. Arrays are aligned: positions (r,), image_ids, scores, inliers, ranks."""

    query_id: str
    positions: np.ndarray
    image_ids: list[str]
    global_scores: np.ndarray
    inliers: np.ndarray
    global_ranks: np.ndarray  # 1-based global rank of each entry
    verified: np.ndarray | None = None  # (r,) bool: went through geometric verification
    paths: list[str] | None = None  # the result images' paths (index id map; "" where unknown)
    query_path: str = ""  # Query.source
    query_bbox: tuple[float, ...] | None = None  # Query.bbox


class QueryEngine:
    """Index + shard reader + (lazy) DELG extractor. Not thread-safe."""

    def __init__(self, index_dir: str, rerank_config: RerankConfig = RerankConfig(), nprobe: int | None = None,
                 ef_search: int | None = None):
        self.index = RetrievalIndex.load(index_dir, nprobe=nprobe, ef_search=ef_search)
        self.reader = LocalFeatureReader()
        self.rerank_config = rerank_config
        self._extractor: DelgExtractor | None = None  # loaded by extractor() on first use

    # ------------------------------------------------------------------ building queries

    def query_from_id(self, image_id: str, query_id: str | None = None, exclude_self: bool = True) -> Query:
        """A query from an indexed image: its stored global descriptor and local features."""
        try:
            position = self.index.position_of(image_id)
        except KeyError:
            raise ValueError(
                f"image id {image_id!r} is not in the index: check the id or query by image path") from None
        record = self.reader.read([self.index.ref(position)])[0]
        return Query(query_id or image_id, record.global_descriptor, record.local,
                     exclude_id=image_id if exclude_self else None, source=record.path)

    def indexed_id(self, name: str) -> str | None:
        """The image id an indexed image goes by, named by its id or by its path as the shards record it
        (ids the job derives from --input globs are hashes: the path is what users know). None if not indexed."""
        try:
            self.index.position_of(name)
            return name
        except KeyError:
            pass
        try:
            return str(self.index.image_ids[self.index.position_of_path(name)])
        except KeyError:
            return None

    def query_from_name(self, name: str, query_id: str | None = None, exclude_self: bool = True) -> Query:
        """A query from an indexed image (by id or path: stored features, no model needed), else from the image
        file at `name`, extracted with the shards' model."""
        image_id = self.indexed_id(name)
        if image_id is not None:
            return self.query_from_id(image_id, query_id or (image_id if image_id == name else _stem(name)),
                                      exclude_self=exclude_self)
        return self.query_from_image(name, query_id)

    def extraction_config(self):
        """The ExtractionConfig recorded in the shards (no TensorFlow, no model loaded)."""
        from beam_job.config import ExtractionConfig

        raw = self.index.config.get("extraction_config")
        if not raw:
            raise ValueError("the shards record no delg.config: query by image id, or rebuild from job output")
        return ExtractionConfig.from_dict(raw)

    def extractor(self):
        """The DELG extractor for the model + preset the shards were made with (TensorFlow imported here)."""
        if self._extractor is None:
            from beam_job.delg.extractor import DelgExtractor

            config = self.extraction_config()
            logger.info("loading DELG model %s (preset %s) for query extraction", config.model, config.name)
            self._extractor = DelgExtractor(config)
            recorded = self.index.config.get("model", "")
            if recorded and self._extractor.identity != recorded:
                logger.warning("query model %s differs from the shards' model %s: scores are not comparable",
                               self._extractor.identity, recorded)
        return self._extractor

    def query_from_image(self, uri: str, query_id: str | None = None,
                         bbox_xyxy: Sequence[float] | None = None) -> Query:
        """Extract a query image (local path or gs://); locations stay in the (cropped) image's pixel frame.

        bbox_xyxy: optional crop [x1, y1, x2, y2] in stored pixels (the Revisited Oxford/Paris query boxes).
        With a box we follow the reference query extraction: no EXIF rotation (the boxes refer to the
        stored pixels), crop at the rounded box, and resize_factor = max(crop side) / max(original side), so
        the max_image_size cap shrinks in proportion to the crop.
        """
        from beam_job.imaging import decode_image

        config = self.extraction_config()
        exif = config.apply_exif_orientation and bbox_xyxy is None
        # The file is read and decoded before the model loads: a wrong path fails in a moment, in one line.
        image = decode_image(read_query_image(uri), apply_exif_orientation=exif, max_pixels=config.max_image_pixels)
        extractor = self.extractor()
        resize_factor = 1.0
        if bbox_xyxy is not None:
            x1, y1, x2, y2 = (int(round(v)) for v in bbox_xyxy)
            original_side = max(image.shape[:2])
            image = image[max(y1, 0) : max(y2, 0), max(x1, 0) : max(x2, 0)]
            if image.size == 0:
                raise ValueError(f"bounding box {list(bbox_xyxy)} is empty for {uri}")
            resize_factor = max(image.shape[:2]) / original_side
        feats = extractor.extract(image, resize_factor=resize_factor)
        if not feats.has_global:
            raise ValueError(f"{uri}: the model gave no global descriptor (image too small?)")
        local = LocalFeatures(feats.locations, feats.descriptors) if feats.num_features else None
        bbox = tuple(float(v) for v in bbox_xyxy) if bbox_xyxy is not None else None
        return Query(query_id or _stem(uri), feats.global_descriptor, local, source=_absolute(uri), bbox=bbox)

    # ------------------------------------------------------------------ searching

    def search(self, queries: Sequence[Query], k=100, num_to_rerank: int = 100,
               skip_for_rerank: Sequence[Sequence[set[str]]] | None = None) -> list[ResultList]:
        """Global top-k for every query (k = ALL: the whole index), then local-feature re-ranking.

        Without skip_for_rerank the first num_to_rerank results are verified. skip_for_rerank[i] is a list of
        id sets for query i (e.g. the junk of each evaluation protocol): for each set, the first
        num_to_rerank results outside it are verified (each pair once), as the reference re-ranks the top
        N non-junk images per protocol.
        """
        if not queries:
            return []
        k = len(self.index) if k == ALL else k
        if not isinstance(k, (int, np.integer)) or k <= 0:
            raise ValueError(f"k must be a positive integer or {ALL!r}, got {k!r}")
        if skip_for_rerank is not None and len(skip_for_rerank) != len(queries):
            raise ValueError(f"skip_for_rerank has {len(skip_for_rerank)} entries for {len(queries)} queries")
        globals_ = np.stack([np.asarray(q.global_descriptor, np.float32) for q in queries])
        # The excluded id may sit at several positions (ids repeated across shards): fetch that many more.
        extra = max((self.index.count_of(q.exclude_id) for q in queries if q.exclude_id), default=0)
        scores, positions = self.index.search(globals_, k + extra)
        out = []
        for qi, query in enumerate(queries):
            keep = positions[qi] >= 0
            pos, sc = positions[qi][keep], scores[qi][keep]
            ids = [str(x) for x in self.index.image_ids[pos]]
            if query.exclude_id is not None:
                sel = [j for j, iid in enumerate(ids) if iid != query.exclude_id]
                pos, sc, ids = pos[sel], sc[sel], [ids[j] for j in sel]
            pos, sc, ids = pos[:k], sc[:k], ids[:k]
            inliers = np.zeros(len(pos), np.int64)
            verified = np.zeros(len(pos), bool)
            if query.local is not None and query.local.num_features and num_to_rerank > 0:
                skips = skip_for_rerank[qi] if skip_for_rerank is not None else [set()]
                for skip in skips:
                    verified[[j for j, iid in enumerate(ids) if iid not in skip][:num_to_rerank]] = True
                chosen = np.flatnonzero(verified)
                records = self.reader.read([self.index.ref(p) for p in pos[chosen]])
                for j, rec in zip(chosen, records, strict=True):
                    inliers[j] = verify_pair(query.local, rec.local, self.rerank_config).inliers
            order = final_order(inliers, sc)
            out.append(ResultList(query.query_id, pos[order], [ids[j] for j in order], sc[order], inliers[order],
                                  (order + 1).astype(np.int64), verified[order],
                                  paths=[str(self.index.paths[p] or "") for p in pos[order]],
                                  query_path=query.source, query_bbox=query.bbox))
        return out


def _stem(uri: str) -> str:
    return os.path.splitext(os.path.basename(uri))[0]


def display_name(path: str, fallback: str) -> str:
    """What pictures and pages call an image: the last part of its path, else (no path known) its id."""
    return path.rstrip("/").rsplit("/", 1)[-1] or fallback


def _absolute(uri: str) -> str:
    """A local path made absolute (results name files that `report` may open from another folder); URIs as given."""
    return uri if storage.is_remote(uri) else os.path.abspath(uri)


def bbox_text(bbox: Sequence[float] | None) -> str:
    """A query box as the queries file and the results spell it: "x1 y1 x2 y2" ("" for none)."""
    return "" if bbox is None else " ".join(f"{float(v):g}" for v in bbox)


def read_query_image(uri: str) -> bytes:
    """The bytes of a query image file; a missing file is a one-line ValueError naming it."""
    try:
        return read_bytes(uri)
    except FileNotFoundError:
        raise ValueError(f"query image {uri!r} not found: check the path") from None


def load_image(uri: str) -> np.ndarray:
    """HxWx3 uint8 RGB of an image file (local or gs://), EXIF-oriented like the job's default (for pictures)."""
    from beam_job.imaging import decode_image

    return decode_image(read_bytes(uri))


def results_table(results: Iterable[ResultList], k=None, untrained_model: bool | None = None) -> pa.Table:
    """All result lists as one table with RESULTS_SCHEMA, in (query, final_rank) order; the --k they were
    searched with and the untrained flag, when given, go into the schema metadata (Parquet keeps it)."""
    cols: dict[str, list] = {name: [] for name in RESULTS_SCHEMA.names}
    for r in results:
        n = len(r.image_ids)
        cols["query_id"].extend([r.query_id] * n)
        cols["query_path"].extend([r.query_path] * n)
        cols["query_bbox"].extend([bbox_text(r.query_bbox)] * n)
        cols["rank"].extend(r.global_ranks.tolist())
        cols["image_id"].extend(r.image_ids)
        cols["path"].extend(r.paths if r.paths is not None else [""] * n)
        cols["global_score"].extend(r.global_scores.tolist())
        cols["inliers"].extend(r.inliers.tolist())
        cols["final_rank"].extend(range(1, n + 1))
        cols["verified"].extend((r.verified if r.verified is not None else np.zeros(n, bool)).tolist())
    meta = {}
    if k is not None:
        meta[RESULTS_K_KEY] = str(k).encode()
    if untrained_model is not None:
        meta[RESULTS_UNTRAINED_KEY] = json.dumps(bool(untrained_model)).encode()
    return pa.Table.from_pydict(cols, schema=RESULTS_SCHEMA.with_metadata(meta) if meta else RESULTS_SCHEMA)


def check_results_path(path: str) -> str:
    """Refuse (ValueError, one line) a results path of a format write_results cannot write."""
    if not path.endswith(RESULT_FORMATS):
        raise ValueError(f"results path must end in {' or '.join(RESULT_FORMATS)}, got {path!r}")
    return path


def write_results(table: pa.Table, path: str) -> str:
    """Write results as Parquet (.parquet) or CSV (.csv), local or gs://."""
    check_results_path(path)
    buf = io.BytesIO()
    if path.endswith(".parquet"):
        pq.write_table(table, buf)
    else:
        pacsv.write_csv(table, buf)
    storage.write_bytes(path, buf.getvalue())
    return path


def read_results(path: str) -> pa.Table:
    """Read a results file written by write_results."""
    data = read_bytes(path)
    if path.endswith(".csv"):
        return pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(column_types=RESULTS_SCHEMA))
    return pq.read_table(io.BytesIO(data))


def read_query_file(path: str) -> list[dict[str, str]]:
    """Queries from a file: a CSV with a header naming `image_id` (ids in the shards) or `path` (images to
    extract), optional `query_id` and `bbox` ("x1 y1 x2 y2"); or plain text, one id or image path per line.

    Returns dicts with keys query_id, image_id or path, optional bbox.
    """
    text = read_bytes(path).decode("utf-8")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"query file {path!r} is empty")
    header = [h.strip() for h in next(csv.reader([lines[0]]))]
    if "image_id" in header or "path" in header:
        rows = list(csv.DictReader(lines))
        out = []
        for i, row in enumerate(rows):
            q = {k: (v or "").strip() for k, v in row.items() if k}
            if not q.get("image_id") and not q.get("path"):
                raise ValueError(f"{path}: row {i + 2} has neither image_id nor path")
            q.setdefault("query_id", "")
            if not q["query_id"]:
                q["query_id"] = q.get("image_id") or os.path.splitext(os.path.basename(q["path"]))[0]
            out.append(q)
        return out
    return [{"query_id": ln.strip(), "value": ln.strip()} for ln in lines]


def build_queries(engine: QueryEngine, specs: Sequence[dict[str, str]], exclude_self: bool = True) -> list[Query]:
    """Turn read_query_file() dicts into Query objects.

    `image_id`: an indexed image, named by its id or its path. `path` (and plain lines): an indexed image when
    its id or path is in the index and no bbox is given (stored features), else an image file to extract.
    """
    _check_query_files(engine, specs)
    queries = []
    for spec in specs:
        query_id = spec.get("query_id") or None
        bbox = [float(v) for v in spec["bbox"].split()] if spec.get("bbox") else None
        if spec.get("image_id"):
            image_id = engine.indexed_id(spec["image_id"])
            if image_id is None:
                raise ValueError(f"image {spec['image_id']!r} is not in the index (neither an id nor an indexed path): "
                                 "check it, or give it as a path to extract")
            queries.append(engine.query_from_id(image_id, query_id or spec["image_id"], exclude_self=exclude_self))
        elif bbox is not None:
            queries.append(engine.query_from_image(spec["path"], query_id, bbox_xyxy=bbox))
        else:
            name = spec.get("path") or spec["value"]
            queries.append(engine.query_from_name(name, query_id, exclude_self=exclude_self))
    return queries


def _check_query_files(engine: QueryEngine, specs: Sequence[dict[str, str]]) -> None:
    """Refuse, before any extraction (and so before the model loads), query images to extract that do not exist."""
    for spec in specs:
        if spec.get("image_id"):
            continue
        name = spec.get("path") or spec.get("value") or ""
        if (spec.get("bbox") or engine.indexed_id(name) is None) and not storage.exists(name):
            raise ValueError(f"query image {name!r} not found: it is no file, and no indexed image has that id or "
                             "path; check the path")


def summary_json(results: Sequence[ResultList], top: int = 5, untrained_model: bool = False) -> str:
    """A short JSON summary of the first results of each query (CLI output): ids with their paths, and whether
    the features come from an untrained model (then the scores and inliers mean nothing)."""
    return json.dumps(
        [
            {
                "query_id": r.query_id,
                "query_path": r.query_path,
                "untrained_model": bool(untrained_model),
                "results": [
                    {"image_id": i, "path": p, "global_score": round(float(s), 4), "inliers": int(n)}
                    for i, p, s, n in list(zip(r.image_ids, r.paths or [""] * len(r.image_ids), r.global_scores,
                                               r.inliers, strict=True))[:top]
                ],
            }
            for r in results
        ],
        indent=1,
    )


__all__: tuple[str, ...] = (
    "ALL",
    "RESULTS_SCHEMA",
    "RESULT_FORMATS",
    "Query",
    "QueryEngine",
    "ResultList",
    "bbox_text",
    "build_queries",
    "check_results_path",
    "display_name",
    "load_image",
    "read_query_file",
    "read_query_image",
    "read_results",
    "results_table",
    "write_results",
)
