"""Evaluation against hand-computed values: Revisited Oxford/Paris (revisitop) and GLDv2 mAP@100."""

import pickle

import numpy as np
import pyarrow as pa
import pytest

from beam_job.retrieval import evaluate as ev

# Two queries over a 10-image database.
# q0: easy [0, 3], hard [5], junk [7]; q1: easy [2], no hard, no junk.
GND = [
    {"easy": [0, 3], "hard": [5], "junk": [7], "bbx": [1.0, 2.0, 30.0, 40.0]},
    {"easy": [2], "hard": [], "junk": []},
]
RANKINGS = [np.array([0, 7, 3, 1, 5, 2, 4, 6, 8, 9]), np.array([9, 8, 2, 0, 1, 3, 4, 5, 6, 7])]


def test_revisitop_protocols_by_hand():
    m = ev.evaluate_revisitop(RANKINGS, GND)
    # q0 medium: ok {0,3,5}; junk 7 removed -> positives at 0-based ranks 0, 1, 3
    #   AP = 1/3 * [(1+1)/2 + (1+1)/2 + (2/3+3/4)/2] = 65/72
    # q1 medium/easy: single positive at rank 2 -> AP = (0 + 1/3)/2 = 1/6
    assert m["medium"]["mAP"] == pytest.approx((65 / 72 + 1 / 6) / 2)  # 77/144
    # q0 easy: ok {0,3}, junk {7,5} -> ranks 0, 1 -> AP 1
    assert m["easy"]["mAP"] == pytest.approx((1 + 1 / 6) / 2)
    # q0 hard: ok {5}, junk {7,0,3} -> ranking [1,5,...] -> rank 1 -> AP (0 + 1/2)/2 = 1/4; q1 has no hard: excluded
    assert m["hard"]["mAP"] == pytest.approx(0.25)
    assert m["hard"]["num_queries"] == 1 and m["medium"]["num_queries"] == 2
    # mP@k with revisitop's min(k, last positive rank): q0 medium 1-based ranks 1,2,4 -> P@5 = 3/4 (not 3/5);
    # q1: rank 3 -> P@1 = 0, P@5 = 1/3
    assert m["medium"]["mP@k"][1] == pytest.approx(0.5)
    assert m["medium"]["mP@k"][5] == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert m["medium"]["mP@k"][10] == pytest.approx((3 / 4 + 1 / 3) / 2)
    assert m["hard"]["mP@k"][1] == 0.0 and m["hard"]["mP@k"][5] == pytest.approx(0.5)
    assert "medium: mAP=53.47" in ev.format_revisitop(m)


def test_truncated_ranking_divides_by_all_positives_not_those_found():
    gt = [{"ok": np.array([0, 1, 2, 3]), "junk": np.array([], np.int64)}]
    mean_ap, _aps, _, prs = ev.compute_map([np.array([0, 5, 1])], gt)
    # positives found at ranks 0 and 2: 1/4 * [1 + (1/2 + 2/3)/2] = 19/48; DELF's variant would give 19/24
    assert mean_ap == pytest.approx(19 / 48)
    assert prs[0].tolist() == pytest.approx([1.0, 2 / 3, 2 / 3])
    # nothing found at all: AP 0 and P@k 0 (the reference would crash on max() of an empty list)
    assert ev.compute_map([np.array([7, 8])], gt)[0] == 0.0


def test_junk_is_removed_before_scoring_and_duplicates_and_distractors():
    gt = [{"ok": np.array([4]), "junk": np.array([1, 2])}]
    assert ev.compute_map([np.array([1, 2, 4])], gt)[0] == pytest.approx(1.0)  # junk ahead does not cost
    assert ev.compute_map([np.array([3, 1, 4])], gt)[0] == pytest.approx(0.25)  # one negative ahead
    gt2 = [{"ok": np.array([0, 1]), "junk": np.array([], np.int64)}]
    assert ev.compute_map([np.array([0, 0, 1])], gt2)[0] == pytest.approx(1.0)  # repeated id dropped
    assert ev.compute_map([np.array([-1, 0, 1])], gt2)[0] == pytest.approx(((0 + 0.5) / 2 + (0.5 + 2 / 3) / 2) / 2)
    with pytest.raises(ValueError, match="no query has any positive"):
        ev.compute_map([np.array([0])], [{"ok": np.array([], np.int64), "junk": np.array([], np.int64)}])
    with pytest.raises(ValueError, match="one ranking per query"):
        ev.compute_map([], gt)


def test_ground_truth_files_pkl_and_mat(tmp_path):
    from scipy.io import savemat

    imlist = [f"im{i}" for i in range(10)]
    qimlist = ["qa", "qb"]
    with open(tmp_path / "gnd_test.pkl", "wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": GND}, fh)
    gnd_struct = np.zeros((1, 2), dtype=[("easy", "O"), ("hard", "O"), ("junk", "O"), ("bbx", "O")])
    for i, g in enumerate(GND):  # MATLAB file: 1-based indices
        for key in ("easy", "hard", "junk"):
            gnd_struct[0, i][key] = np.array([[v + 1 for v in g[key]]], dtype=np.float64).reshape(1, -1)
        gnd_struct[0, i]["bbx"] = np.array(g.get("bbx", []), dtype=np.float64).reshape(1, -1)
    savemat(tmp_path / "gnd_test.mat", {
        "imlist": np.array(imlist, dtype=object).reshape(-1, 1),
        "qimlist": np.array(qimlist, dtype=object).reshape(-1, 1),
        "gnd": gnd_struct,
    })
    for name in ("gnd_test.pkl", "gnd_test.mat"):
        loaded = ev.load_revisitop_gnd(str(tmp_path / name))
        assert loaded["imlist"] == imlist and loaded["qimlist"] == qimlist
        assert loaded["gnd"][0]["easy"].tolist() == [0, 3] and loaded["gnd"][0]["junk"].tolist() == [7]
        assert loaded["gnd"][1]["hard"].tolist() == []
        np.testing.assert_allclose(loaded["gnd"][0]["bbx"], [1, 2, 30, 40])
        m = ev.evaluate_revisitop(RANKINGS, loaded["gnd"])
        assert m["medium"]["mAP"] == pytest.approx(77 / 144)
    with pytest.raises(ValueError, match=r"\.pkl or \.mat"):
        ev.load_revisitop_gnd(str(tmp_path / "gnd.json"))


def test_rankings_from_a_results_table():
    table = pa.table({
        "query_id": ["qa", "qa", "qa", "qb"],
        "image_id": ["im3", "im0", "distractor", "im2"],
        "rank": [2, 1, 3, 1],
        "final_rank": [1, 2, 3, 1],
    })
    ranked = ev.ranked_ids_from_table(table)
    assert ranked == {"qa": ["im3", "im0", "distractor"], "qb": ["im2"]}
    assert ev.ranked_ids_from_table(table, "rank")["qa"] == ["im0", "im3", "distractor"]
    rankings = ev.rankings_from_results(["qa", "qb", "qc"], ranked, [f"im{i}" for i in range(10)])
    assert [r.tolist() for r in rankings] == [[3, 0, -1], [2], []]


def _write(path, text):
    path.write_text(text)
    return str(path)


def test_gldv2_map_at_100_by_hand(tmp_path):
    solution = ev.read_gldv2_solution(_write(tmp_path / "solution.csv", (
        "id,images,Usage\n"
        "q1,a b c,Public\n"
        "q2,d,Private\n"
        "q3,None,Ignored\n"
        "q4,e f,Public\n"
    )))
    assert solution["Public"] == {"q1": {"a", "b", "c"}, "q4": {"e", "f"}} and "q3" in solution["Ignored"]
    predictions = ev.read_gldv2_predictions(_write(tmp_path / "submission.csv", (
        "id,images\n"
        "q1,a x b a c\n"  # hits at 1, 3, 5; the repeated 'a' at 4 is not a hit but uses up a rank
        "q2,y d\n"
        "q3,a\n"  # an Ignored query: dropped
    )))  # q4 has no prediction: AP 0
    m = ev.evaluate_gldv2(predictions, solution)
    q1 = (1 / 1 + 2 / 3 + 3 / 5) / 3  # 34/45
    assert m["Public"] == pytest.approx((q1 + 0.0) / 2)
    assert m["Private"] == pytest.approx(0.5)
    assert m["All"] == pytest.approx((q1 + 0.5 + 0.0) / 3)  # 113/270
    with pytest.raises(ValueError, match="not in the solution"):
        ev.evaluate_gldv2({"zz": ["a"]}, solution)


def test_gldv2_only_the_first_100_predictions_count():
    relevant = {f"r{i}" for i in range(150)}
    assert ev.gldv2_map_at_k({"q": sorted(relevant)}, {"q": relevant}) == pytest.approx(1.0)  # divided by min(150, 100)
    late = [f"n{i}" for i in range(100)] + ["r0"]
    assert ev.gldv2_map_at_k({"q": late}, {"q": {"r0"}}) == 0.0
    assert ev.gldv2_map_at_k({"q": ["n", "r0"]}, {"q": {"r0"}}, max_predictions=1) == 0.0


def _results_table(rows):
    """A results table of these columns; the query and image paths (not used by evaluation) left empty."""
    from beam_job.retrieval import query

    n = len(rows["query_id"])
    return pa.Table.from_pydict({"query_path": [""] * n, "query_bbox": [""] * n, "path": [""] * n, **rows},
                                schema=query.RESULTS_SCHEMA)


def test_cli_revisitop_queries_and_evaluation(tmp_path, capsys):
    from beam_job.retrieval import cli, query

    imlist = [f"im{i}" for i in range(10)]
    with open(tmp_path / "gnd_t.pkl", "wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": ["qa", "qb"], "gnd": GND}, fh)
    out = tmp_path / "queries.csv"
    assert cli.main(["revisitop-queries", str(tmp_path / "gnd_t.pkl"), "/data/jpg/", str(out)]) == 0
    expected = ["query_id,path,bbox", "qa,/data/jpg/qa.jpg,1 2 30 40", "qb,/data/jpg/qb.jpg,"]
    assert out.read_text().splitlines() == expected
    capsys.readouterr()
    # a results file holding RANKINGS under the query names evaluates to the hand-computed values
    rows = {"query_id": [], "rank": [], "image_id": [], "global_score": [], "inliers": [], "final_rank": [],
            "verified": []}
    for qname, ranking in zip(["qa", "qb"], RANKINGS, strict=True):
        for r, idx in enumerate(ranking):
            for key, val in zip(rows, [qname, r + 1, imlist[idx], 1.0 - r / 10, 0, r + 1, True], strict=True):
                rows[key].append(val)
    results = str(tmp_path / "results.parquet")
    query.write_results(_results_table(rows), results)
    assert cli.main(["eval-revisitop", results, str(tmp_path / "gnd_t.pkl")]) == 0
    text = capsys.readouterr().out
    assert "medium: mAP=53.47" in text and "hard: mAP=25.00" in text and "easy: mAP=58.33" in text


def test_gldv2_submission_with_a_repeated_query_is_refused(tmp_path):
    path = _write(tmp_path / "submission.csv", "id,images\nq1,a b\nq2,c\nq1,d\n")
    with pytest.raises(ValueError, match="line 4 repeats query id 'q1'"):
        ev.read_gldv2_predictions(path)


def test_ground_truth_without_hard_positives_still_scores_easy_and_medium(tmp_path, capsys):
    from beam_job.retrieval import cli, query

    gnd = [{"easy": [0], "hard": [], "junk": [3]}, {"easy": [2, 1], "hard": [], "junk": []}]
    m = ev.evaluate_revisitop([np.array([0, 1, 2]), np.array([2, 0, 1])], gnd)
    # q0: positive at rank 0 -> AP 1; q1: positives at ranks 0 and 2 -> 1/2 * [1 + (1/2 + 2/3)/2] = 19/24
    assert m["easy"]["mAP"] == pytest.approx((1 + 19 / 24) / 2) and m["medium"]["mAP"] == m["easy"]["mAP"]
    assert m["hard"] == {"mAP": None, "mP@k": {}, "num_queries": 0}
    imlist = ["im0", "im1", "im2", "im3"]
    with open(tmp_path / "gnd.pkl", "wb") as fh:
        pickle.dump({"imlist": imlist, "qimlist": ["qa", "qb"], "gnd": gnd}, fh)
    rows = {"query_id": ["qa"] * 3 + ["qb"] * 3, "rank": [1, 2, 3] * 2,
            "image_id": ["im0", "im1", "im2", "im2", "im0", "im1"],
            "global_score": [0.9, 0.8, 0.7] * 2, "inliers": [0] * 6, "final_rank": [1, 2, 3] * 2,
            "verified": [True] * 6}
    results = str(tmp_path / "results.parquet")
    query.write_results(_results_table(rows), results)
    assert cli.main(["eval-revisitop", results, str(tmp_path / "gnd.pkl")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("easy: mAP=89.58") and lines[1].startswith("medium: mAP=89.58")
    assert lines[2] == "hard: no query has a positive image in this setting (queries=0)"
