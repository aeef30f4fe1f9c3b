"""Browsable pages of retrieval results: an index of queries (sortable by AP) and one page per query.

`write_retrieval_report(results, index_dir, out_dir, ...)` reads a results file of `delg-retrieval query`
(its query_path / query_bbox columns say which image each query was), the index it came from (id map ->
shard rows, for image paths and local features) and, optionally, a queries file (only needed for results
files written before those columns) and a ground-truth file (revisitop .pkl/.mat or a GLDv2 solution .csv).
Images are named by file name (full path on hover and below), the id beside. It writes, locally or to gs://:

  out_dir/index.html               queries with thumbnails, top result, verified count and AP; the mAP table
  out_dir/queries/<q>.html         the query image and its top-k results: global score, inliers,
                                   verified/unverified, positive/junk/negative; each links to its match picture
  out_dir/img/<h>.jpg              thumbnails (one per image file, or per query crop)
  out_dir/matches/<q>-<rank>.jpg   keypoints + inlier lines, drawn by plots.draw_matches as `draw-matches` does

AP and mAP come from beam_job.retrieval.evaluate (the functions `eval-revisitop` / `eval-gldv2` use), so
the numbers on the page are theirs. All files are static; the only script is a few lines sorting a table.
Every page carries a red banner when the index says its features come from an untrained model.

This module also owns the `delg-retrieval report` command (REPORT_COMMAND) and `main`, the console script:
beam_job.retrieval.cli's commands plus this one, so that imports run one way (report -> retrieval).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from beam_job import storage
from beam_job.report.html import esc, jpeg_bytes, page, table, thumbnail
from beam_job.retrieval import cli as retrieval_cli
from beam_job.retrieval import evaluate as ev
from beam_job.retrieval.index import UNTRAINED_WARNING
from beam_job.retrieval.query import display_name, load_image, read_query_file, read_results
from beam_job.retrieval.rerank import RerankConfig, verify_pair

logger = logging.getLogger(__name__)

THUMB_SIDE = 240
MATCH_HEIGHT = 480
MATCH_QUALITY = 72  # JPEG: the pictures are mostly thin lines and rings on photos
DEFAULT_MIN_INLIERS = 15  # as `contact-sheet`: a result with at least this many inliers is "verified"

SORT_SCRIPT = """
document.querySelectorAll('table.sortable th[data-sort]').forEach(function(th){
  th.style.cursor='pointer';
  th.addEventListener('click',function(){
    var table=th.closest('table'),body=table.tBodies[0],col=th.cellIndex;
    var asc=th.getAttribute('data-dir')!=='asc';th.setAttribute('data-dir',asc?'asc':'desc');
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=parseFloat(a.cells[col].getAttribute('data-value')),y=parseFloat(b.cells[col].getAttribute('data-value'));
      if(isNaN(x)&&isNaN(y))return 0;if(isNaN(x))return 1;if(isNaN(y))return -1;return asc?x-y:y-x;});
    rows.forEach(function(r){body.appendChild(r);});
  });
});
"""


@dataclass
class ResultItem:
    rank: int  # position on the page (final order of the results file)
    image_id: str
    global_score: float
    inliers: int
    global_rank: int
    path: str = ""  # the image's path as the shards record it ("" when unknown)
    label: str = ""  # positive / junk / negative / ignored (with ground truth)
    detail: str = ""  # easy / hard for revisitop positives
    thumb: str = ""  # relative path under out_dir
    match: str = ""
    match_inliers: int | None = None
    problem: str = ""

    @property
    def name(self) -> str:
        return display_name(self.path, self.image_id)


@dataclass
class QueryPage:
    query_id: str
    slug: str
    items: list[ResultItem]
    thumb: str = ""
    source: str = ""
    ap: dict[str, float] = field(default_factory=dict)
    problem: str = ""


# --------------------------------------------------------------------------------------------- output files


class _Out:
    """Writes files under out_dir (local or gs://)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir.rstrip("/")

    def put(self, rel: str, data: bytes) -> str:
        storage.write_bytes(self.uri(rel), data)
        return rel

    def uri(self, rel: str) -> str:
        return f"{self.out_dir}/{rel}"


def _slug(text: str) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:48].strip("._") or "q"
    return f"{base}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:8]}"


# --------------------------------------------------------------------------------------------- ground truth


@dataclass
class GroundTruth:
    """Labels per (query, image), per-query AP per protocol, and the mAP table text of the evaluate module."""

    kind: str  # "revisitop" or "gldv2"
    protocols: tuple[str, ...]
    metrics_text: str
    metrics_rows: list[tuple[str, ...]]
    metrics_headers: tuple[str, ...]
    ap: dict[str, dict[str, float]]  # query_id -> protocol -> AP (NaN: not scored)
    labeller: object

    def label(self, query_id: str, image_id: str) -> tuple[str, str]:
        return self.labeller(query_id, image_id)  # type: ignore[operator]


def load_ground_truth(path: str, results_table, order: str, kappas: Sequence[int] = ev.DEFAULT_KAPPAS) -> GroundTruth:
    """Revisited Oxford/Paris (.pkl/.mat) or GLDv2 solution (.csv), scored with beam_job.retrieval.evaluate."""
    ranked = ev.ranked_ids_from_table(results_table, order)
    if path.endswith((".pkl", ".mat")):
        gnd = ev.load_revisitop_gnd(path)
        rankings = ev.rankings_from_results(gnd["qimlist"], ranked, gnd["imlist"])
        metrics = ev.evaluate_revisitop(rankings, gnd["gnd"], kappas)
        ap: dict[str, dict[str, float]] = {q: {} for q in gnd["qimlist"]}
        for protocol in ev.PROTOCOLS:
            _, aps, _, _ = ev.compute_map(rankings, ev.protocol_ground_truth(gnd["gnd"], protocol), kappas)
            for q, value in zip(gnd["qimlist"], aps, strict=True):
                ap[q][protocol] = float(value)
        lookup = {name: i for i, name in enumerate(gnd["imlist"])}
        sets = {q: {k: set(np.asarray(g[k]).tolist()) for k in ("easy", "hard", "junk")}
                for q, g in zip(gnd["qimlist"], gnd["gnd"], strict=True)}

        def label(query_id: str, image_id: str) -> tuple[str, str]:
            s = sets.get(query_id)
            if s is None:
                return "", ""
            i = lookup.get(image_id, -1)
            if i in s["easy"] or i in s["hard"]:
                return "positive", "easy" if i in s["easy"] else "hard"
            if i in s["junk"]:
                return "junk", ""
            return "negative", "" if i >= 0 else "distractor"

        ks = list(kappas)
        rows = [(p, f"{100 * m['mAP']:.2f}", *tuple(f"{100 * m['mP@k'][k]:.2f}" for k in ks), str(m["num_queries"]))
                for p, m in metrics.items()]
        headers = ("protocol", "mAP", *tuple(f"mP@{k}" for k in ks), "queries")
        return GroundTruth("revisitop", ev.PROTOCOLS, ev.format_revisitop(metrics), rows, headers, ap, label)
    if path.endswith(".csv"):
        solution = ev.read_gldv2_solution(path)
        maps = ev.evaluate_gldv2(ranked, solution)
        relevant = {**solution["Public"], **solution["Private"]}
        usage = {q: u for u in ("Public", "Private", "Ignored") for q in solution[u]}
        ap_at_100 = {q: {"AP@100": ev.gldv2_map_at_k({q: ranked.get(q, [])}, {q: rel})} for q, rel in relevant.items()}

        def label(query_id: str, image_id: str) -> tuple[str, str]:
            if usage.get(query_id) == "Ignored":
                return "ignored", ""
            if query_id not in relevant:
                return "", ""
            return ("positive", "") if image_id in relevant[query_id] else ("negative", "")

        rows = [(u, f"{100 * v:.2f}" if v is not None else "\u2014") for u, v in maps.items()]
        text = "\n".join(f"mAP@100 {u}: {'n/a' if v is None else f'{100 * v:.2f}'}" for u, v in maps.items())
        return GroundTruth("gldv2", ("AP@100",), text, rows, ("queries", "mAP@100"), ap_at_100, label)
    raise ValueError(f"ground truth must be a revisitop .pkl/.mat or a GLDv2 solution .csv, got {path!r}")


# --------------------------------------------------------------------------------------------- images


def _query_images(engine, specs: dict[str, dict[str, str]], query_id: str):
    """(Query, image as the query's locations see it, thumbnail key) for a query id; ValueError when unknown."""
    from beam_job.imaging import decode_image
    from beam_job.retrieval.query import read_query_image

    spec = specs.get(query_id) or {}
    bbox = [float(v) for v in spec["bbox"].split()] if spec.get("bbox") else None
    name = spec.get("image_id") or spec.get("path") or spec.get("value") or query_id
    image_id = engine.indexed_id(name) if bbox is None else None  # as query.build_queries decides
    if image_id is not None:
        q = engine.query_from_id(image_id, query_id, exclude_self=False)
        return q, load_image(q.source), f"src:{q.source}"
    path = spec.get("path") or spec.get("value")
    if not path:
        raise ValueError(f"query {query_id!r} is not an indexed image and the results name no query image "
                         "(results written before the query_path column: give --queries)")
    q = engine.query_from_image(path, query_id, bbox_xyxy=bbox)
    if bbox is None:
        return q, load_image(path), f"src:{path}"
    image = decode_image(read_query_image(path), apply_exif_orientation=False)  # boxes refer to the stored pixels
    x1, y1, x2, y2 = (int(round(v)) for v in bbox)
    return q, image[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)], f"crop:{path}:{bbox}"


def _thumb_file(out: _Out, cache: dict[str, str], key: str, image: np.ndarray) -> str:
    if key not in cache:
        name = hashlib.sha1(key.encode("utf-8")).hexdigest()[:16]
        cache[key] = out.put(f"img/{name}.jpg", jpeg_bytes(thumbnail(image, THUMB_SIDE)))
    return cache[key]


# --------------------------------------------------------------------------------------------- pages


def _badge(cls: str, text: str) -> str:
    return f"<span class=\"badge {cls}\">{esc(text)}</span>"


def _ap_name(protocol: str) -> str:
    return protocol if protocol.startswith("AP") else f"AP {protocol}"


def _ap_text(value: float) -> str:
    return "\u2014" if value != value else f"{100 * value:.2f}"


def _ap_cells(gt: GroundTruth | None, q: QueryPage) -> list[str]:
    """Sortable AP cells (percent shown, the fraction in data-value; NaN: query not scored)."""
    if gt is None:
        return []
    cells = []
    for p in gt.protocols:
        v = q.ap.get(p, float("nan"))
        cells.append(f"<td class=\"num\" data-value=\"{'' if v != v else f'{v:.6f}'}\" data-ap=\"{esc(p)}\">"
                     f"{_ap_text(v)}</td>")
    return cells


def _metrics_html(gt: GroundTruth | None) -> str:
    if gt is None:
        return ""
    return ("<h2>Evaluation</h2>"
            + table([esc(h) for h in gt.metrics_headers], [[esc(c) for c in r] for r in gt.metrics_rows],
                    numeric=range(1, len(gt.metrics_headers)), attrs="id=\"map-table\"")
            + f"<pre id=\"map-text\">{esc(gt.metrics_text)}</pre>")


def _untrained_banner(untrained: bool) -> str:
    if not untrained:
        return ""
    return (f"<div class=\"warning\" id=\"untrained-warning\">{esc(UNTRAINED_WARNING)}. These pages show the "
            "pipeline at work, not what a trained model would find.</div>")


def _named(path: str, image_id: str) -> str:
    """An image's file name (its full path on hover), or its id when no path is known."""
    return f"<span class=\"name\" title=\"{esc(path)}\">{esc(display_name(path, image_id))}</span>"


def _index_page(pages: list[QueryPage], gt: GroundTruth | None, info: dict[str, str], k: int,
                min_inliers: int, untrained: bool = False) -> str:
    head = ["", "query", "top result", "verified in top k"] + ([_ap_name(p) for p in gt.protocols] if gt else [])
    ths = "".join(f"<th data-sort=\"1\">{esc(h)} \u21c5</th>" if h.startswith(("AP", "verified"))
                  else f"<th>{esc(h)}</th>" for h in head)
    rows = []
    for q in pages:
        img = f"<img src=\"{esc(q.thumb)}\" alt=\"{esc(q.query_id)}\" width=\"80\">" if q.thumb else ""
        top = q.items[0] if q.items else None
        top_html = (f"{_named(top.path, top.image_id)} <span class=\"muted\">g={top.global_score:.3f} "
                    f"inl={top.inliers}</span>" if top else "")
        qname = display_name(q.source, q.query_id)
        also = f" <span class=\"muted\" title=\"{esc(q.source)}\">{esc(qname)}</span>" if qname != q.query_id else ""
        nver = sum(1 for it in q.items if it.inliers >= min_inliers)
        rows.append(f"<tr data-query=\"{esc(q.query_id)}\"><td>{img}</td><td><a href=\"queries/{esc(q.slug)}.html\">"
                    f"{esc(q.query_id)}</a>{also}</td><td>{top_html}</td>"
                    f"<td class=\"num\" data-value=\"{nver}\">{nver}</td>" + "".join(_ap_cells(gt, q)) + "</tr>")
    facts = table(["", ""], [(esc(k_), f"<code>{esc(v)}</code>") for k_, v in info.items()])
    body = (f"<h1>Retrieval results</h1>{_untrained_banner(untrained)}{facts}{_metrics_html(gt)}"
            f"<h2>Queries ({len(pages)})</h2>"
            f"<p class=\"muted\">Click a \u21c5 column to sort. Top {k} results per query; verified = at least "
            f"{min_inliers} RANSAC inliers.</p>"
            f"<div class=\"scroll\"><table class=\"sortable\" id=\"queries\"><thead><tr>{ths}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>")
    return page("Retrieval results", body, SORT_SCRIPT)


def _query_page(q: QueryPage, gt: GroundTruth | None, min_inliers: int, untrained: bool = False) -> str:
    tiles = []
    for it in q.items:
        verified = it.inliers >= min_inliers
        badges = _badge("verified" if verified else "unverified", "verified" if verified else "unverified")
        if it.label:
            badges += " " + _badge(it.label, it.label + (f" ({it.detail})" if it.detail else ""))
        img = f"<img src=\"../{esc(it.thumb)}\" alt=\"{esc(it.name)}\" title=\"{esc(it.path)}\">" if it.thumb else ""
        if it.match:
            img = f"<a href=\"../{esc(it.match)}\" data-match=\"1\">{img}</a>"
            link = f"<a href=\"../{esc(it.match)}\">match picture</a>"
            if it.match_inliers is not None and it.match_inliers != it.inliers:
                link += f" <span class=\"muted\">(recomputed: {it.match_inliers} inliers)</span>"
        else:
            link = ""
        problem = f"<div class=\"note\">{esc(it.problem)}</div>" if it.problem else ""
        where = f"<div class=\"mono muted\" data-field=\"path\">{esc(it.path)}</div>" if it.path else ""
        tiles.append(
            f"<div class=\"tile{' is-verified' if verified else ''}\" data-image-id=\"{esc(it.image_id)}\" "
            f"data-path=\"{esc(it.path)}\" data-rank=\"{it.rank}\" data-global-score=\"{it.global_score:.6f}\" "
            f"data-inliers=\"{it.inliers}\" data-label=\"{esc(it.label)}\">{img}"
            f"<div><b>#{it.rank}</b> {_named(it.path, it.image_id)}</div>{where}"
            f"<div class=\"muted\">id <span class=\"mono\">{esc(it.image_id)}</span></div>"
            f"<div>global <span data-field=\"global_score\">{it.global_score:.4f}</span> \u00b7 inliers "
            f"<span data-field=\"inliers\">{it.inliers}</span> \u00b7 global rank {it.global_rank}</div>"
            f"<div>{badges}</div><div>{link}</div>{problem}</div>")
    ap = ""
    if gt is not None:
        values = [_ap_text(q.ap.get(p, float("nan"))) for p in gt.protocols]
        ap = table([esc(_ap_name(p)) for p in gt.protocols], [values],
                   numeric=range(len(gt.protocols)), attrs="id=\"query-ap\"")
    query_img = (f"<img src=\"../{esc(q.thumb)}\" alt=\"query {esc(q.query_id)}\" title=\"{esc(q.source)}\">"
                 if q.thumb else "")
    problem = f"<p class=\"note\">{esc(q.problem)}</p>" if q.problem else ""
    body = (f"<p><a href=\"../index.html\">\u2190 all queries</a></p><h1>Query {esc(q.query_id)}</h1>"
            f"{_untrained_banner(untrained)}{problem}"
            f"<div class=\"qhead\"><div class=\"tile query\">{query_img}"
            f"<div><b>{esc(display_name(q.source, q.query_id))}</b></div>"
            f"<div class=\"mono muted\" data-field=\"query-path\">{esc(q.source)}</div></div><div>{ap}</div></div>"
            f"<h2>Top {len(q.items)} results</h2><div class=\"tiles\">{''.join(tiles)}</div>")
    return page(f"Query {q.query_id}", body)


# --------------------------------------------------------------------------------------------- driver


def _specs_from_results(table_) -> dict[str, dict[str, str]]:
    """Each query's image as the results record it (query_path, query_bbox): {query_id: queries-file-like spec}."""
    if "query_path" not in table_.column_names:
        return {}
    bboxes = (table_.column("query_bbox").to_pylist() if "query_bbox" in table_.column_names
              else [""] * table_.num_rows)
    specs: dict[str, dict[str, str]] = {}
    ids, paths = table_.column("query_id").to_pylist(), table_.column("query_path").to_pylist()
    for qid, path, bbox in zip(ids, paths, bboxes, strict=True):
        if path and qid not in specs:
            specs[qid] = {"query_id": qid, "path": path, "bbox": bbox or ""}
    return specs


def write_retrieval_report(
    results: str,
    index_dir: str,
    out_dir: str,
    *,
    queries_file: str | None = None,
    ground_truth: str | None = None,
    max_queries: int | None = None,
    k: int = 10,
    order: str = "final_rank",
    min_inliers: int = DEFAULT_MIN_INLIERS,
    rerank_config: RerankConfig = RerankConfig(),
    matches: bool = True,
) -> str:
    """Write the pages (see the module docstring); returns the URI of index.html."""
    from beam_job.retrieval.plots import draw_matches
    from beam_job.retrieval.query import QueryEngine

    if k <= 0:
        raise ValueError(f"--k must be positive, got {k}")
    table_ = read_results(results)
    gt = load_ground_truth(ground_truth, table_, order) if ground_truth else None
    ranked: dict[str, list[tuple[int, int, str, float, int, str]]] = {}
    names = ("query_id", order, "rank", "image_id", "global_score", "inliers")
    cols = [table_.column(c).to_pylist() for c in names]
    cols.append(table_.column("path").to_pylist() if "path" in table_.column_names else [""] * table_.num_rows)
    for qid, o, r, iid, score, inl, path in zip(*cols, strict=True):
        ranked.setdefault(qid, []).append((int(o), int(r), iid, float(score), int(inl), path or ""))
    query_ids = list(ranked)[: max_queries or None]
    specs = _specs_from_results(table_)
    if queries_file:  # given: it says best what each query was (results written before query_path need it)
        specs.update({s["query_id"]: s for s in read_query_file(queries_file)})
    engine = QueryEngine(index_dir, rerank_config)
    untrained = engine.index.untrained
    out = _Out(out_dir)
    thumbs: dict[str, str] = {}
    pages: list[QueryPage] = []
    for qi, qid in enumerate(query_ids):
        rows = sorted(ranked[qid])[:k]
        qp = QueryPage(qid, _slug(qid), [ResultItem(i + 1, iid, score, inl, r, path=path)
                                         for i, (_, r, iid, score, inl, path) in enumerate(rows)])
        if gt is not None:
            qp.ap = gt.ap.get(qid, {})
            for it in qp.items:
                it.label, it.detail = gt.label(qid, it.image_id)
        query, query_image = None, None
        try:
            query, query_image, thumb_key = _query_images(engine, specs, qid)
            qp.source = query.source
            qp.thumb = _thumb_file(out, thumbs, thumb_key, query_image)
        except Exception as exc:  # unknown or unreadable query image: the results are still shown
            qp.problem = f"query image not available: {exc}"[:300]
        positions: list[int | None] = []
        for it in qp.items:
            try:
                positions.append(engine.index.position_of(it.image_id))
            except KeyError:
                positions.append(None)
                it.problem = "not in the index"
        refs = [engine.index.ref(p) for p in positions if p is not None]
        records = iter(engine.reader.read(refs)) if refs else iter(())
        for it, pos in zip(qp.items, positions, strict=True):
            if pos is None:
                continue
            rec = next(records)
            it.path = it.path or rec.path
            draw = matches and query is not None and query.local is not None and rec.local.num_features > 0
            key = f"src:{rec.path}"
            if key in thumbs and not draw:  # thumbnail already written, no picture to draw: no decode
                it.thumb = thumbs[key]
                continue
            try:
                image = load_image(rec.path)
            except Exception as exc:
                it.problem = f"image not readable from {rec.path}: {exc}"[:300]
                continue
            it.thumb = _thumb_file(out, thumbs, key, image)
            if draw and query is not None and query_image is not None:
                v = verify_pair(query.local, rec.local, rerank_config)
                picture, _ = draw_matches(query_image, image, query.local.locations, rec.local.locations, v.matches,
                                          v.inlier_mask, max_height=MATCH_HEIGHT,
                                          title=f"{display_name(query.source, qid)} vs {it.name}: {v.inliers} "
                                                f"inliers / {v.num_putative} putative")
                it.match = out.put(f"matches/{qp.slug}-{it.rank:03d}.jpg", jpeg_bytes(picture, quality=MATCH_QUALITY))
                it.match_inliers = int(v.inliers)
        out.put(f"queries/{qp.slug}.html", _query_page(qp, gt, min_inliers, untrained).encode("utf-8"))
        pages.append(qp)
        logger.info("report: query %d/%d %s", qi + 1, len(query_ids), qid)
    info = {"results": results, "index": index_dir, "model": str(engine.index.config.get("model") or ""),
            "queries file": queries_file or "", "ground truth": ground_truth or "", "order": order}
    out.put("index.html", _index_page(pages, gt, info, k, min_inliers, untrained).encode("utf-8"))
    return out.uri("index.html")


# --------------------------------------------------------------------------------------------- command


def _report_arguments(rp: argparse.ArgumentParser) -> None:
    rp.add_argument("results", help="results .parquet/.csv from `query`")
    rp.add_argument("--index", required=True, help="the index directory the results came from")
    rp.add_argument("--out", required=True, help="output folder (local or gs://); open <out>/index.html")
    rp.add_argument("--queries", help="the queries file given to `query` (only for results files written before "
                                      "the query_path column)")
    rp.add_argument("--gnd", help="ground truth: gnd_<dataset>.pkl/.mat (revisitop) or a GLDv2 solution .csv")
    rp.add_argument("--max_queries", type=int, default=None, help="only the first N queries of the results")
    rp.add_argument("--k", type=int, default=10, help="results shown per query")
    rp.add_argument("--order", choices=["final_rank", "rank"], default="final_rank")
    rp.add_argument("--min_inliers", type=int, default=DEFAULT_MIN_INLIERS,
                    help="verified at or above this many inliers")
    rp.add_argument("--no_matches", action="store_true", help="skip the match pictures")
    retrieval_cli.add_rerank_args(rp)


def _run_report(args: argparse.Namespace) -> int:
    index_html = write_retrieval_report(
        args.results, args.index, args.out, queries_file=args.queries, ground_truth=args.gnd,
        max_queries=args.max_queries, k=args.k, order=args.order, min_inliers=args.min_inliers,
        rerank_config=retrieval_cli.rerank_config(args), matches=not args.no_matches)
    print(json.dumps({"index": index_html}))
    return 0


REPORT_COMMAND = retrieval_cli.Command(
    "report", "HTML pages of a results file: queries, top-k thumbnails, match pictures, AP",
    _report_arguments, _run_report)


def main(argv: Sequence[str] | None = None) -> int:
    """`delg-retrieval` (the console script): beam_job.retrieval.cli's commands plus `report`."""
    return retrieval_cli.main(argv, extra=(REPORT_COMMAND,))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["DEFAULT_MIN_INLIERS", "REPORT_COMMAND", "load_ground_truth", "main", "write_retrieval_report"]
