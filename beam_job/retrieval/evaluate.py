"""Retrieval metrics: the Revisited Oxford/Paris protocol (revisitop's mAP and mP@k) and GLDv2 mAP@100.

Revisited Oxford/Paris (Radenovic et al. 2018; definitions as in filipradenovic/revisitop `compute_map`):
  * settings: easy (ok = easy; junk = junk + hard), medium (ok = easy + hard; junk = junk),
    hard (ok = hard; junk = junk + easy);
  * junk images are deleted from the ranking before scoring;
  * AP is the trapezoid under the precision/recall curve, divided by the number of ground-truth
    positives (so positives missing from a truncated ranking simply add nothing; the DELF variant that
    divides by positives *found* is NOT used);
  * mP@k divides by min(k, rank of the last positive found) (revisitop's quirk, kept);
  * queries with no positives are excluded from the means.
Rankings are 0-based indices into the ground truth's imlist, best first; may be truncated; -1 stands for
an image outside imlist (a distractor: a negative that still takes a rank). Later duplicates are dropped.

GLDv2 retrieval (Weyand et al. 2020; Kaggle Landmark Retrieval):
  mAP@100 = 1/Q sum_q 1/min(m_q, 100) sum_{k <= min(n_q, 100)} P_q(k) rel_q(k), over the Q solution queries;
  a query without predictions scores 0; a repeated prediction is not relevant again but keeps its rank.
"""

from __future__ import annotations

import csv
import io
import logging
import pickle
from collections.abc import Mapping, Sequence

import numpy as np

from .query import ALL, RESULTS_K_KEY
from .shards import read_bytes

logger = logging.getLogger(__name__)

PROTOCOLS = ("easy", "medium", "hard")
DEFAULT_KAPPAS = (1, 5, 10)


# --------------------------------------------------------------------------------------------- revisitop


def load_revisitop_gnd(path: str) -> dict:
    """Ground truth from gnd_<dataset>.pkl (0-based indices) or the older .mat (1-based, converted).

    Returns {"imlist": [str], "qimlist": [str], "gnd": [{"easy", "hard", "junk": int64 arrays (0-based),
    "bbx": float array [x1, y1, x2, y2] or None}]}.
    """
    if not path.endswith((".pkl", ".mat")):
        raise ValueError(f"ground truth must be a .pkl or .mat file, got {path!r}")
    data = read_bytes(path)
    if path.endswith(".pkl"):
        raw = pickle.loads(data)
        gnd = [_gnd_entry(g, offset=0) for g in raw["gnd"]]
        return {"imlist": list(raw["imlist"]), "qimlist": list(raw["qimlist"]), "gnd": gnd}
    from scipy.io import loadmat

    cfg = loadmat(io.BytesIO(data))
    gnd = [_gnd_entry({k: e[k] for k in e.dtype.names}, offset=1) for e in np.ravel(cfg["gnd"])]
    return {"imlist": _mat_names(cfg["imlist"]), "qimlist": _mat_names(cfg["qimlist"]), "gnd": gnd}


def _gnd_entry(g: Mapping, offset: int) -> dict:
    out: dict[str, np.ndarray | None] = {}
    for key in ("easy", "hard", "junk"):
        arr = np.ravel(np.asarray(g[key] if key in g else [], dtype=np.float64))
        out[key] = arr.astype(np.int64) - offset
    bbx = g["bbx"] if "bbx" in g else None
    out["bbx"] = None if bbx is None or np.size(bbx) == 0 else np.ravel(np.asarray(bbx, np.float64))
    return out


def _mat_names(cell: np.ndarray) -> list[str]:
    return [str(np.asarray(x).ravel()[0]) for x in np.ravel(cell)]


def protocol_ground_truth(gnd: Sequence[Mapping], protocol: str) -> list[dict[str, np.ndarray]]:
    """Per-query {"ok", "junk"} index arrays for one setting (easy / medium / hard)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    out = []
    for g in gnd:
        easy, hard, junk = (np.asarray(g.get(k, []), np.int64) for k in ("easy", "hard", "junk"))
        if protocol == "easy":
            out.append({"ok": easy, "junk": np.concatenate([junk, hard])})
        elif protocol == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        else:
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def average_precision(positive_ranks: np.ndarray, num_positives: int) -> float:
    """revisitop AP: trapezoid rule over the sorted 0-based ranks of the retrieved positives (junk removed),
    divided by the number of ground-truth positives."""
    ap = 0.0
    step = 1.0 / num_positives
    for j, r in enumerate(np.sort(np.asarray(positive_ranks))):
        precision_before = 1.0 if r == 0 else j / r
        precision_after = (j + 1) / (r + 1)
        ap += (precision_before + precision_after) * step / 2.0
    return ap


def _dedupe(ranking: np.ndarray) -> np.ndarray:
    ranking = np.asarray(ranking, np.int64).ravel()
    keep = np.ones(len(ranking), bool)
    seen: set[int] = set()
    for i, v in enumerate(ranking.tolist()):
        if v >= 0 and v in seen:
            keep[i] = False
        seen.add(v)
    return ranking[keep]


def compute_map(
    rankings: Sequence[np.ndarray], gt: Sequence[Mapping[str, np.ndarray]], kappas: Sequence[int] = DEFAULT_KAPPAS
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop compute_map on per-query rankings.

    rankings[i]: 0-based imlist indices for query i, best first (any length; -1 = outside imlist).
    gt[i]: {"ok": array, "junk": array}. Returns (mAP, aps (nq,), mP@k (len(kappas),), P@k (nq, len(kappas)));
    queries without positives have NaN AP / P@k and are left out of the means.
    """
    if len(rankings) != len(gt):
        raise ValueError(f"{len(rankings)} rankings for {len(gt)} ground-truth queries: give one ranking per query")
    nq = len(gt)
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i, (ranking, g) in enumerate(zip(rankings, gt, strict=True)):
        ok = np.asarray(g["ok"], np.int64)
        junk = np.asarray(g.get("junk", []), np.int64)
        if len(ok) == 0:
            continue
        ranking = _dedupe(ranking)
        ranking = ranking[~np.isin(ranking, junk)]  # junk removed before scoring
        pos = np.flatnonzero(np.isin(ranking, ok))  # 0-based ranks after junk removal
        aps[i] = average_precision(pos, len(ok))
        if len(pos) == 0:
            prs[i] = 0.0
            continue
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()), int(k))
            prs[i, j] = np.count_nonzero(pos1 <= kq) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("no query has any positive image: check the ground truth")
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def evaluate_revisitop(
    rankings, gnd: Sequence[Mapping], kappas: Sequence[int] = DEFAULT_KAPPAS
) -> dict[str, dict]:
    """mAP and mP@k for easy / medium / hard. Returns {protocol: {"mAP", "mP@k": {k: v}, "num_queries"}}.

    rankings: one ranking per query (the same for every protocol), or {protocol: rankings} when the order
    depends on the protocol (re-ranking that skips each protocol's junk, see protocol_rankings).

    A setting in which no query has a positive (e.g. a ground truth without hard images) gets mAP None,
    empty mP@k and num_queries 0; the other settings are still scored."""
    out: dict[str, dict] = {}
    for protocol in PROTOCOLS:
        gt = protocol_ground_truth(gnd, protocol)
        ranks = rankings[protocol] if isinstance(rankings, Mapping) else rankings
        if not any(len(g["ok"]) for g in gt):
            if len(ranks) != len(gt):
                raise ValueError(
                    f"{len(ranks)} rankings for {len(gt)} ground-truth queries: give one ranking per query")
            out[protocol] = {"mAP": None, "mP@k": {}, "num_queries": 0}
            continue
        mean_ap, aps, mpr, _ = compute_map(ranks, gt, kappas)
        out[protocol] = {
            "mAP": mean_ap,
            "mP@k": {int(k): float(v) for k, v in zip(kappas, mpr, strict=True)},
            "num_queries": int(np.count_nonzero(~np.isnan(aps))),
        }
    return out


def rankings_from_results(
    query_ids: Sequence[str], result_ids: Mapping[str, Sequence[str]], imlist: Sequence[str]
) -> list[np.ndarray]:
    """Per-query index rankings from image-id rankings. Ids outside imlist become -1; missing queries empty."""
    lookup = {name: i for i, name in enumerate(imlist)}
    missing = [q for q in query_ids if q not in result_ids]
    if missing:
        logger.warning("%d of %d queries have no results (scored as empty rankings), e.g. %s",
                       len(missing), len(query_ids), missing[:3])
    return [np.asarray([lookup.get(i, -1) for i in result_ids.get(q, [])], np.int64) for q in query_ids]


def _warn_incomplete_rankings(per_query: dict[str, list[tuple]], imlist: Sequence[str], k: str = "") -> None:
    """Warn when rankings miss database images; `k`: the results' recorded --k ("" when unknown: CSV, old files).

    A query need not rank itself (`query` leaves an indexed query out). After `--k all` every ranking holds
    the whole index, so a missing image is one the index lacks, and `--k all` is not the advice. Unknown k:
    images that no query ranks are taken as not indexed; images some queries rank and others do not mean
    that --k cut the rankings short."""
    names = set(imlist)
    absent = {q: names - {e[1] for e in v} - {q} for q, v in per_query.items()}
    if not absent:
        return
    nowhere = set.intersection(*absent.values()) if k in ("", ALL) else set()
    if nowhere:
        logger.warning("%d of the %d database images are in no query's results (not in the index%s), e.g. %s: "
                       "they count as not retrieved", len(nowhere), len(imlist), "" if k else ", or beyond --k",
                       sorted(nowhere)[:3])
    short = [q for q, missing in absent.items() if missing - nowhere]
    if short:
        logger.warning("%d queries rank fewer images than the %d of the database, e.g. %s: positives beyond are "
                       "lost; use `query --k all`", len(short), len(imlist), short[:3])


def protocol_rankings(table, revisitop: Mapping, num_to_rerank: int = 100) -> dict[str, list[np.ndarray]]:
    """Per-protocol rankings from a results table, re-ranked as the reference does for each protocol.

    For each query and protocol: the results in global order (`rank`) without the protocol's junk; the
    first num_to_rerank of them re-sorted by (inliers, global score) descending; the rest in global order.
    Those first num_to_rerank must have been verified (`verified` column: run `query` with the ground
    truth, which verifies the first N non-junk results of every protocol); num_to_rerank=0 gives the
    global order. revisitop: load_revisitop_gnd() output. Returns {protocol: rankings for rankings_from_results order}.
    """
    from .rerank import final_order

    imlist, qimlist = revisitop["imlist"], revisitop["qimlist"]
    lookup = {name: i for i, name in enumerate(imlist)}
    names = table.column_names
    if num_to_rerank > 0 and "verified" not in names:
        raise ValueError("the results have no `verified` column: re-run `query` with --revisitop_gnd, or evaluate "
                         "with --rerank 0 (global order)")
    columns = ["query_id", "rank", "image_id", "global_score", "inliers"]
    columns += ["verified"] if "verified" in names else []
    rows = table.select(columns).to_pydict()
    per_query: dict[str, list[tuple]] = {}
    for values in zip(*(rows[c] for c in columns), strict=True):
        per_query.setdefault(values[0], []).append(values[1:])
    missing = [q for q in qimlist if q not in per_query]
    if missing:
        logger.warning("%d of %d queries have no results (scored as empty rankings), e.g. %s",
                       len(missing), len(qimlist), missing[:3])
    recorded = (table.schema.metadata or {}).get(RESULTS_K_KEY, b"").decode()
    _warn_incomplete_rankings(per_query, imlist, recorded)
    out: dict[str, list[np.ndarray]] = {}
    for protocol in PROTOCOLS:
        gt = protocol_ground_truth(revisitop["gnd"], protocol)
        rankings = []
        for qname, g in zip(qimlist, gt, strict=True):
            entries = sorted(per_query.get(qname, []))  # by global rank
            junk = set(g["junk"].tolist())
            kept = [e for e in entries if lookup.get(e[1], -1) not in junk]
            head, tail = kept[:num_to_rerank], kept[num_to_rerank:]
            unverified = [e[1] for e in head if len(e) < 5 or not e[4]]
            if unverified:
                raise ValueError(
                    f"query {qname}: {len(unverified)} of the first {len(head)} non-junk results ({protocol}) were not "
                    f"verified, e.g. {unverified[0]}: run `query` with --revisitop_gnd and "
                    f"--rerank >= {num_to_rerank}, "
                    "or evaluate with --rerank 0 (global order)")
            order = final_order(np.asarray([e[3] for e in head], np.int64), np.asarray([e[2] for e in head]))
            ranked = [head[j][1] for j in order] + [e[1] for e in tail]
            rankings.append(np.asarray([lookup.get(i, -1) for i in ranked], np.int64))
        out[protocol] = rankings
    return out


def ranked_ids_from_table(table, order_column: str = "final_rank") -> dict[str, list[str]]:
    """{query_id: [image_id, ...]} ordered by `order_column` ("final_rank" or the global "rank")."""
    qids = table.column("query_id").to_pylist()
    iids = table.column("image_id").to_pylist()
    ranks = table.column(order_column).to_pylist()
    grouped: dict[str, list[tuple[int, str]]] = {}
    for q, i, r in zip(qids, iids, ranks, strict=True):
        grouped.setdefault(q, []).append((r, i))
    return {q: [i for _, i in sorted(v)] for q, v in grouped.items()}


def format_revisitop(metrics: Mapping[str, Mapping]) -> str:
    """One line per protocol, DELF-style: `medium: mAP=64.67 mP@k[1 5 10] 95.71 92.00 86.86`."""
    lines = []
    for protocol, m in metrics.items():
        if m["mAP"] is None:
            lines.append(f"{protocol}: no query has a positive image in this setting (queries=0)")
            continue
        ks = list(m["mP@k"])
        lines.append(
            f"{protocol}: mAP={100 * m['mAP']:.2f} mP@k{ks} "
            + " ".join(f"{100 * m['mP@k'][k]:.2f}" for k in ks)
            + f" (queries={m['num_queries']})"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- GLDv2


def _split_ids(text: str) -> list[str]:
    return [t for t in (text or "").split() if t]


def read_gldv2_solution(path: str) -> dict[str, dict[str, set[str]]]:
    """Kaggle retrieval solution CSV (`id,images[,Usage]`, images space-separated).

    Returns {"Public": {...}, "Private": {...}, "Ignored": {...}} of query id -> set of relevant index ids.
    Without a Usage column every query with relevant images is "Public". Rows whose images are empty or
    "None", or whose Usage is "Ignored", go to "Ignored".
    """
    rows = list(csv.DictReader(io.StringIO(read_bytes(path).decode("utf-8"))))
    if not rows or "id" not in rows[0] or "images" not in rows[0]:
        raise ValueError(f"{path}: a GLDv2 solution needs the columns id,images[,Usage]")
    out: dict[str, dict[str, set[str]]] = {"Public": {}, "Private": {}, "Ignored": {}}
    for row in rows:
        ids = set(_split_ids(row["images"])) - {"None"}
        usage = (row.get("Usage") or "Public").strip() or "Public"
        if usage not in out:
            raise ValueError(f"{path}: unknown Usage {usage!r} for {row['id']} (expected Public, Private or Ignored)")
        out["Ignored" if not ids else usage][row["id"].strip()] = ids
    return out


def read_gldv2_predictions(path: str) -> dict[str, list[str]]:
    """Submission CSV `id,images` (images space-separated, best first) -> {query id: [index ids]}.

    A query id given on two rows is an error (the reference refuses it too), never silently overwritten."""
    rows = list(csv.DictReader(io.StringIO(read_bytes(path).decode("utf-8"))))
    if rows and ("id" not in rows[0] or "images" not in rows[0]):
        raise ValueError(f"{path}: a GLDv2 submission needs the columns id,images")
    out: dict[str, list[str]] = {}
    for line, row in enumerate(rows, start=2):
        qid = row["id"].strip()
        if qid in out:
            raise ValueError(f"{path}: line {line} repeats query id {qid!r}: give each query one row")
        out[qid] = _split_ids(row["images"])
    return out


def gldv2_map_at_k(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, set[str]], max_predictions: int = 100
) -> float:
    """mAP@max_predictions over the queries of `solution` (each with >= 1 relevant image)."""
    if not solution:
        raise ValueError("the solution has no query with relevant images")
    total = 0.0
    for qid, relevant in solution.items():
        if not relevant:
            raise ValueError(f"solution query {qid!r} has no relevant image; it belongs to the Ignored set")
        hits, ap, seen = 0, 0.0, set()
        for i, pred in enumerate(list(predictions.get(qid, []))[:max_predictions]):
            if pred in relevant and pred not in seen:
                hits += 1
                ap += hits / (i + 1)
            seen.add(pred)
        total += ap / min(len(relevant), max_predictions)
    return total / len(solution)


def evaluate_gldv2(
    predictions: Mapping[str, Sequence[str]], solution: Mapping[str, Mapping[str, set[str]]],
    max_predictions: int = 100,
) -> dict[str, float | None]:
    """mAP@100 for the Public, Private and combined query sets. Predictions for Ignored queries are dropped;
    predictions for ids absent from the solution raise ValueError (as the reference does)."""
    known = set().union(*(set(v) for v in solution.values()))
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise ValueError(f"{len(unknown)} predicted query ids are not in the solution, e.g. {unknown[:3]}")
    out: dict[str, float | None] = {}
    for usage in ("Public", "Private"):
        out[usage] = gldv2_map_at_k(predictions, solution[usage], max_predictions) if solution[usage] else None
    combined = {**solution["Public"], **solution["Private"]}
    out["All"] = gldv2_map_at_k(predictions, combined, max_predictions) if combined else None
    return out
