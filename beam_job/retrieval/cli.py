"""`delg-retrieval` console command: build an index from feature shards, query it, evaluate, draw pictures.

  delg-retrieval build SHARDS INDEX_DIR [--kind auto|flat|ivfpq|hnsw ...]
  delg-retrieval query INDEX_DIR (--id ID ... | --image PATH ... | --queries FILE) [--k 100|all --rerank 100]
                       [--revisitop_gnd GND] --output R.parquet|R.csv
  delg-retrieval eval-revisitop RESULTS gnd_roxford5k.pkl
  delg-retrieval eval-gldv2 RESULTS_OR_SUBMISSION.csv solution.csv
  delg-retrieval revisitop-queries gnd_roxford5k.pkl IMAGES_DIR queries.csv   (cropped query list)
  delg-retrieval draw-matches INDEX_DIR QUERY TARGET_ID --out match.png
  delg-retrieval contact-sheet INDEX_DIR QUERY --out sheet.png [--k 8]
  delg-retrieval report RESULTS --index INDEX_DIR --out DIR [--gnd FILE] [--max_queries N]
  delg-retrieval --version
QUERY names an indexed image by its id or its path (stored features), or an image file (local or gs://)
extracted with the shards' model. Flags are spelled with underscores, as delg-extract's (--max_trials); the
hyphenated spelling (--max-trials) means the same.

`report` writes HTML pages, which is the report layer's job: beam_job.report.retrieval adds that command
(a `Command` handed to `main`) and its `main` is the `delg-retrieval` console script, so that this package
never imports the report package (the layers import one way: report -> retrieval).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NamedTuple

from beam_job import __version__

logger = logging.getLogger(__name__)


class Command(NamedTuple):
    """A subcommand a layer above adds to `delg-retrieval` (see the module docstring)."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose `--snake_case` flags also answer to `--snake-case` (same dest, same action), so a
    hyphen typed by habit is honoured rather than refused; subcommand parsers are of this class too."""

    def add_argument(self, *names, **kwargs):
        aliases = [n.replace("_", "-") for n in names if n.startswith("--") and "_" in n]
        return super().add_argument(*names, *[a for a in aliases if a not in names], **kwargs)


def add_rerank_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ransac", choices=["opencv", "reference"], default="opencv",
                   help="opencv: USAC_MAGSAC affine (fast, default); reference: DELG's skimage RANSAC (slow)")
    p.add_argument("--distance_threshold", type=float, default=1.0, help="L2 descriptor distance threshold (DELG: 1.0)")
    p.add_argument("--ratio", type=float, default=None, help="use Lowe's ratio test with this ratio (e.g. 0.8)")
    p.add_argument("--residual_threshold", type=float, default=20.0, help="RANSAC inlier threshold in pixels")
    p.add_argument("--max_trials", type=int, default=1000)
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed per query (ivfpq indexes)")
    p.add_argument("--ef_search", type=int, default=None, help="HNSW efSearch")


def build_parser(extra: Sequence[Command] = ()) -> argparse.ArgumentParser:
    """The `delg-retrieval` parser: this module's commands, then the `extra` ones of the layers above."""
    parser = _Parser(prog="delg-retrieval", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=__version__,
                        help="print the package version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="build a FAISS index from feature shards")
    b.add_argument("shards", help="job output dir, features/ dir, glob or .parquet (local or gs://)")
    b.add_argument("index_dir", help="where to write index.faiss, idmap.parquet, build_config.json")
    b.add_argument("--kind", choices=["auto", "flat", "ivfpq", "hnsw"], default="auto",
                   help="auto: flat below 200k vectors, else IVF-PQ fast-scan (+exact refinement below 2M)")
    b.add_argument("--nlist", type=int, default=None)
    b.add_argument("--pq_m", type=int, default=None, help="PQ sub-quantizers (4 bits each); default dim/8")
    b.add_argument("--refine", dest="refine", action="store_true", default=None, help="ivfpq: keep exact vectors")
    b.add_argument("--no_refine", dest="refine", action="store_false", help="ivfpq: codes only (m/2 bytes/vector)")
    b.add_argument("--hnsw_m", type=int, default=32)
    b.add_argument("--nprobe", type=int, default=None)
    b.add_argument("--train_size", type=int, default=None, help="IVF training sample size")
    b.add_argument("--allow_mixed_models", action="store_true")

    q = sub.add_parser("query", help="search the index, re-rank by local features, write results")
    q.add_argument("index_dir")
    q.add_argument("--id", nargs="*", default=[], help="images already in the index, by image id or by path")
    q.add_argument("--image", nargs="*", default=[],
                   help="query image paths: indexed images use their stored features, others are extracted on the fly")
    q.add_argument("--queries", help="CSV (image_id or path column, optional query_id, bbox) or one per line")
    q.add_argument("--k", type=_k_value, default=100, help="results per query, or `all` (the whole index: evaluation)")
    q.add_argument("--rerank", type=int, default=100, help="re-rank this many top results (0: global only)")
    q.add_argument("--revisitop_gnd", default=None,
                   help="gnd_roxford5k.pkl / gnd_rparis6k.pkl: re-rank the first --rerank non-junk results of every "
                        "protocol (query_id = qimlist names), as the reference; needed by eval-revisitop")
    q.add_argument("--keep_self", action="store_true", help="keep the query image itself when querying by id")
    q.add_argument("--output", help="results file (.parquet or .csv); a JSON summary is printed")
    add_rerank_args(q)

    e = sub.add_parser("eval-revisitop", help="Revisited Oxford/Paris mAP and mP@k from a results file")
    e.add_argument("results", help="results .parquet/.csv from `query` (query_id = qimlist names)")
    e.add_argument("gnd", help="gnd_roxford5k.pkl / gnd_rparis6k.pkl (or the .mat version)")
    e.add_argument("--order", choices=["final_rank", "rank"], default="final_rank",
                   help="final_rank: per protocol, junk skipped, the first --rerank re-sorted by (inliers, global "
                        "score) as the reference; rank: global only")
    e.add_argument("--rerank", type=int, default=100, help="non-junk results re-ranked per protocol (reference: 100)")
    e.add_argument("--kappas", type=int, nargs="*", default=[1, 5, 10])

    g = sub.add_parser("eval-gldv2", help="GLDv2 retrieval mAP@100")
    g.add_argument("predictions", help="results .parquet/.csv from `query`, or a Kaggle submission CSV (id,images)")
    g.add_argument("solution", help="Kaggle solution CSV (id,images,Usage)")
    g.add_argument("--order", choices=["final_rank", "rank"], default="final_rank")

    r = sub.add_parser("revisitop-queries", help="queries CSV (query_id,path,bbox) for Revisited Oxford/Paris")
    r.add_argument("gnd", help="gnd_roxford5k.pkl / gnd_rparis6k.pkl (or .mat)")
    r.add_argument("images", help="folder holding <name>.jpg (local or gs://)")
    r.add_argument("out", help="CSV to write; feed it to `query --queries`")

    d = sub.add_parser("draw-matches", help="PNG of the query and one image with keypoints and RANSAC inliers")
    d.add_argument("index_dir")
    d.add_argument("query", help="an image id in the index, or an image path")
    d.add_argument("target", help="an image in the index, by id or path")
    d.add_argument("--out", required=True)
    d.add_argument("--outliers", action="store_true", help="also draw rejected putative matches in red")
    add_rerank_args(d)

    c = sub.add_parser("contact-sheet", help="PNG of a query and its top results with scores")
    c.add_argument("index_dir")
    c.add_argument("query", help="an image id in the index, or an image path")
    c.add_argument("--out", required=True)
    c.add_argument("--k", type=int, default=8)
    c.add_argument("--rerank", type=int, default=8)
    c.add_argument("--min_inliers", type=int, default=15, help="green frame at or above this many inliers")
    add_rerank_args(c)

    for command in extra:
        command.add_arguments(sub.add_parser(command.name, help=command.help))
    return parser


def _k_value(text: str):
    from .query import ALL

    if text == ALL:
        return ALL
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer or {ALL!r}, got {text!r}")
    return value


def rerank_config(args):
    """The RerankConfig of the flags add_rerank_args adds."""
    from .rerank import RerankConfig

    return RerankConfig(distance_threshold=args.distance_threshold, ratio=args.ratio, method=args.ransac,
                        residual_threshold=args.residual_threshold, max_trials=args.max_trials)


def _engine(args):
    from .query import QueryEngine

    return QueryEngine(args.index_dir, rerank_config(args), nprobe=args.nprobe, ef_search=args.ef_search)


def _query_for(engine, value: str, exclude_self: bool = True):
    from .query import load_image

    q = engine.query_from_name(value, exclude_self=exclude_self)
    return q, load_image(q.source)


def _warn_untrained(engine) -> bool:
    from .index import UNTRAINED_WARNING

    if engine.index.untrained:
        logger.warning(UNTRAINED_WARNING)
    return bool(engine.index.untrained)


def _cmd_build(args) -> int:
    from .index import IndexConfig, build_index

    cfg = IndexConfig(kind=args.kind, nlist=args.nlist, pq_m=args.pq_m, refine=args.refine, hnsw_m=args.hnsw_m,
                      nprobe=args.nprobe, train_size=args.train_size, allow_mixed_models=args.allow_mixed_models)
    report = build_index(args.shards, args.index_dir, cfg)
    print(json.dumps({"index_dir": report.index_dir, "num_indexed": report.num_indexed,
                      "num_null_skipped": report.num_null_skipped,
                      "num_duplicate_ids": report.num_duplicate_ids, "num_shards": report.num_shards,
                      "untrained_model": report.untrained_model,
                      "params": report.params, "seconds": {k: round(v, 3) for k, v in report.seconds.items()}},
                     indent=1))
    return 0


def _cmd_query(args) -> int:
    from .query import build_queries, check_results_path, read_query_file, results_table, summary_json, write_results

    if args.output:
        check_results_path(args.output)  # before any work
    specs = [{"query_id": "", "image_id": i} for i in args.id] + [{"query_id": "", "path": p} for p in args.image]
    if args.queries:
        specs += read_query_file(args.queries)
    if not specs:
        raise ValueError("give queries with --id, --image or --queries")
    engine = _engine(args)
    untrained = _warn_untrained(engine)
    queries = build_queries(engine, specs, exclude_self=not args.keep_self)
    skip = _junk_per_protocol(args.revisitop_gnd, [q.query_id for q in queries]) if args.revisitop_gnd else None
    results = engine.search(queries, k=args.k, num_to_rerank=args.rerank, skip_for_rerank=skip)
    if args.output:
        write_results(results_table(results, k=args.k, untrained_model=untrained), args.output)
        logger.info("wrote %s", args.output)
    print(summary_json(results, untrained_model=untrained))
    return 0


def _junk_per_protocol(gnd_path: str, query_ids: Sequence[str]):
    """For each query id (a qimlist name): the junk image names of each protocol, to skip when re-ranking."""
    from .evaluate import PROTOCOLS, load_revisitop_gnd, protocol_ground_truth

    gnd = load_revisitop_gnd(gnd_path)
    where = {name: i for i, name in enumerate(gnd["qimlist"])}
    unknown = [q for q in query_ids if q not in where]
    if unknown:
        raise ValueError(f"{len(unknown)} query ids are not queries of {gnd_path}, e.g. {unknown[:3]}: "
                         "name queries by their qimlist names (`revisitop-queries` writes them)")
    per_protocol = [protocol_ground_truth(gnd["gnd"], p) for p in PROTOCOLS]
    imlist = gnd["imlist"]
    return [[{imlist[i] for i in gt[where[q]]["junk"]} for gt in per_protocol] for q in query_ids]


def _cmd_eval_revisitop(args) -> int:
    from .evaluate import (
        evaluate_revisitop,
        format_revisitop,
        load_revisitop_gnd,
        protocol_rankings,
        ranked_ids_from_table,
        rankings_from_results,
    )
    from .query import read_results

    gnd = load_revisitop_gnd(args.gnd)
    table = read_results(args.results)
    if args.order == "rank":  # one order for every protocol
        ranked = rankings_from_results(gnd["qimlist"], ranked_ids_from_table(table, "rank"), gnd["imlist"])
        metrics = evaluate_revisitop(ranked, gnd["gnd"], args.kappas)
    else:  # one order per protocol
        metrics = evaluate_revisitop(protocol_rankings(table, gnd, args.rerank), gnd["gnd"], args.kappas)
    print(format_revisitop(metrics))
    return 0


def _cmd_eval_gldv2(args) -> int:
    from .evaluate import evaluate_gldv2, ranked_ids_from_table, read_gldv2_predictions, read_gldv2_solution
    from .query import read_results
    from .shards import read_bytes

    head = read_bytes(args.predictions)[:200].decode("utf-8", "replace") if args.predictions.endswith(".csv") else ""
    if head.startswith("id,images"):
        predictions = read_gldv2_predictions(args.predictions)
    else:
        predictions = ranked_ids_from_table(read_results(args.predictions), args.order)
    metrics = evaluate_gldv2(predictions, read_gldv2_solution(args.solution))
    print(json.dumps({f"mAP@100 {k}": (None if v is None else round(v, 6)) for k, v in metrics.items()}, indent=1))
    return 0


def _cmd_revisitop_queries(args) -> int:
    from .evaluate import load_revisitop_gnd
    from .shards import write_bytes

    gnd = load_revisitop_gnd(args.gnd)
    lines = ["query_id,path,bbox"]
    for name, g in zip(gnd["qimlist"], gnd["gnd"], strict=True):
        bbox = " ".join(f"{v:g}" for v in g["bbx"]) if g["bbx"] is not None else ""
        lines.append(f"{name},{args.images.rstrip('/')}/{name}.jpg,{bbox}")
    write_bytes(args.out, ("\n".join(lines) + "\n").encode())
    print(json.dumps({"out": args.out, "queries": len(lines) - 1}))
    return 0


def _cmd_draw_matches(args) -> int:
    from .plots import draw_matches
    from .query import display_name, load_image
    from .rerank import verify_pair

    engine = _engine(args)
    _warn_untrained(engine)
    query, query_image = _query_for(engine, args.query, exclude_self=False)
    target = engine.query_from_id(engine.indexed_id(args.target) or args.target, exclude_self=False)
    if query.local is None or target.local is None:
        raise ValueError("both images need local features to draw matches")
    v = verify_pair(query.local, target.local, engine.rerank_config)
    draw_matches(query_image, load_image(target.source), query.local.locations, target.local.locations,
                 v.matches, v.inlier_mask, args.out, draw_outliers=args.outliers,
                 title=f"{display_name(query.source, query.query_id)} vs "
                       f"{display_name(target.source, args.target)}: {v.inliers} inliers / {v.num_putative} putative")
    print(json.dumps({"out": args.out, "putative": v.num_putative, "inliers": v.inliers}))
    return 0


def _cmd_contact_sheet(args) -> int:
    from .plots import contact_sheet
    from .query import display_name, load_image

    engine = _engine(args)
    _warn_untrained(engine)
    query, query_image = _query_for(engine, args.query)
    result = engine.search([query], k=args.k, num_to_rerank=args.rerank)[0]
    tiles, verified = [], []
    for rank, (pos, iid, score, inl) in enumerate(zip(result.positions, result.image_ids, result.global_scores,
                                                      result.inliers, strict=True), start=1):
        record = engine.reader.read([engine.index.ref(int(pos))])[0]
        caption = f"#{rank} {display_name(record.path, iid)}\ng={score:.3f} inl={int(inl)}"
        tiles.append((load_image(record.path), caption))
        verified.append(int(inl) >= args.min_inliers)
    contact_sheet(query_image, tiles, args.out, verified=verified,
                  query_caption=f"query {display_name(query.source, query.query_id)}")
    print(json.dumps({"out": args.out, "results": len(tiles)}))
    return 0


COMMANDS = {
    "build": _cmd_build,
    "query": _cmd_query,
    "eval-revisitop": _cmd_eval_revisitop,
    "eval-gldv2": _cmd_eval_gldv2,
    "revisitop-queries": _cmd_revisitop_queries,
    "draw-matches": _cmd_draw_matches,
    "contact-sheet": _cmd_contact_sheet,
}


def main(argv: Sequence[str] | None = None, extra: Sequence[Command] = ()) -> int:
    """Run `delg-retrieval` with this module's commands plus `extra` (the console script passes the report's)."""
    args = build_parser(extra).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = {**COMMANDS, **{c.name: c.run for c in extra}}[args.command]
    try:
        return run(args)
    except (ValueError, KeyError, FileNotFoundError) as err:
        if isinstance(err, FileNotFoundError) and err.filename:  # not Python's "[Errno 2] ..." wording
            err = ValueError(f"{err.filename!r} not found: check the path")
        print(f"delg-retrieval {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__: list[str] = ["Command", "add_rerank_args", "build_parser", "main", "rerank_config"]
