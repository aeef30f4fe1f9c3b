"""Querying: global top-k + local re-ranking from synthetic delg_v1 shards, result files, the CLI, and the real
Beam job (tiny preset) feeding an index that answers image queries extracted on the fly."""

import ast
import csv
import json
import logging
import os
import pickle
import re
import shutil

import numpy as np
import pytest

import beam_job.retrieval
from beam_job.report.retrieval import REPORT_COMMAND
from beam_job.report.retrieval import main as retrieval_main
from beam_job.retrieval import cli, rerank, synthetic
from beam_job.retrieval import index as ix
from beam_job.retrieval import query as qm
from beam_job.schemas import delg_v1

DIM = 2048


def _with_similarity(rng, base, sim):
    """A unit vector whose dot product with the unit vector `base` is exactly `sim`."""
    other = rng.standard_normal(DIM).astype(np.float64)
    other -= other.dot(base) * base
    other /= np.linalg.norm(other)
    return (sim * base + np.sqrt(1 - sim**2) * other).astype(np.float32)


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Query "q"; "match_a" / "match_b" are affine views of it with low global similarity, "decoy_*" have high
    global similarity but unrelated local features, the rest is filler. Two shards, float16 descriptors in one."""
    root = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(0)
    g = synthetic.unit_rows(rng, 1, DIM)[0].astype(np.float64)
    g /= np.linalg.norm(g)
    rows = []
    pa_ = synthetic.affine_pair(rng, 300, 0.6)
    pb = synthetic.affine_pair(rng, 300, 0.3, matrix=synthetic.affine_yx(angle_deg=-8, scale=1.1, tx=-20))
    q_desc = pa_.desc_a.copy()
    q_desc[: pb.num_true] = pa_.desc_a[: pb.num_true]
    # match_b's correspondences must point at the query's own features: rebuild them from the query
    pb_loc = pb.loc_b.copy()
    warped = pa_.loc_a[: pb.num_true].astype(np.float64) @ pb.matrix[:, :2].T + pb.matrix[:, 2]
    pb_loc[: pb.num_true] = warped.astype(np.float32)
    pb_desc = pb.desc_b.copy()
    pb_desc[: pb.num_true] = pa_.desc_b[: pb.num_true]
    rows.append({"image_id": "q", "global_descriptor": g, "locations": pa_.loc_a, "descriptors": q_desc})
    rows.append({"image_id": "match_a", "global_descriptor": _with_similarity(rng, g, 0.55),
                 "locations": pa_.loc_b, "descriptors": pa_.desc_b})
    rows.append({"image_id": "match_b", "global_descriptor": _with_similarity(rng, g, 0.50),
                 "locations": pb_loc, "descriptors": pb_desc})
    for i, sim in enumerate([0.9, 0.8, 0.7]):
        rows.append({"image_id": f"decoy_{i}", "global_descriptor": _with_similarity(rng, g, sim),
                     "locations": rng.random((300, 2)) * [768, 1024],
                     "descriptors": synthetic.unit_rows(rng, 300, 128)})
    for i in range(40):
        rows.append({"image_id": f"filler_{i:02d}", "global_descriptor": _with_similarity(rng, g, 0.1 + 0.005 * i),
                     "locations": rng.random((50, 2)) * [768, 1024], "descriptors": synthetic.unit_rows(rng, 50, 128)})
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    meta = synthetic.default_metadata()
    half = len(rows) // 2
    synthetic.write_shard(str(root / "out" / "features" / "part-0.parquet"),
                          synthetic.rows_to_table(rows[:half], metadata=meta), row_group_size=8)
    meta16 = synthetic.default_metadata(descriptor_dtype="float16")
    synthetic.write_shard(str(root / "out" / "features" / "part-1.parquet"),
                          synthetic.rows_to_table(rows[half:], descriptor_dtype="float16", metadata=meta16),
                          row_group_size=8)
    ix.build_index(str(root / "out"), str(root / "index"), ix.IndexConfig(allow_mixed_models=True))
    return {"root": root, "index": str(root / "index"), "rows": {r["image_id"]: r for r in rows}}


def test_query_by_id_reranks_geometric_matches_to_the_top(collection):
    engine = qm.QueryEngine(collection["index"])
    query = engine.query_from_id("q")
    np.testing.assert_allclose(query.local.locations, collection["rows"]["q"]["locations"], atol=1e-4)
    result = engine.search([query], k=10, num_to_rerank=10)[0]
    assert "q" not in result.image_ids  # the query itself is excluded
    # global order alone: decoys first
    by_global = [result.image_ids[i] for i in np.argsort(result.global_ranks)]
    assert by_global[:5] == ["decoy_0", "decoy_1", "decoy_2", "match_a", "match_b"]
    np.testing.assert_allclose(sorted(result.global_scores, reverse=True)[:5], [0.9, 0.8, 0.7, 0.55, 0.5], atol=1e-5)
    # after re-ranking: the two geometric matches lead, ordered by inliers
    assert result.image_ids[:2] == ["match_a", "match_b"]
    assert result.inliers[0] >= 0.95 * 180 and 0.9 * 90 <= result.inliers[1] < result.inliers[0]
    assert (result.inliers[2:] < 10).all()
    assert result.image_ids[2:5] == ["decoy_0", "decoy_1", "decoy_2"]  # ties broken by global score
    # num_to_rerank=3 verifies only the global top 3 (the decoys): the matches stay where the global score puts them
    shallow = engine.search([query], k=10, num_to_rerank=3)[0]
    assert shallow.image_ids[:5] == by_global[:5]
    # global only
    flat = engine.search([query], k=10, num_to_rerank=0)[0]
    assert flat.image_ids == by_global and (flat.inliers == 0).all()


def test_reference_ransac_mode_gives_the_same_order(collection):
    engine = qm.QueryEngine(collection["index"], rerank.RerankConfig(method="reference"))
    result = engine.search([engine.query_from_id("q")], k=6, num_to_rerank=6)[0]
    assert result.image_ids[:2] == ["match_a", "match_b"]


def test_results_files_parquet_and_csv_round_trip(collection, tmp_path):
    engine = qm.QueryEngine(collection["index"])
    results = engine.search([engine.query_from_id("q"), engine.query_from_id("match_a", "qa")], k=5, num_to_rerank=5)
    table = qm.results_table(results)
    assert table.schema.names == ["query_id", "query_path", "query_bbox", "rank", "image_id", "path", "global_score",
                                  "inliers", "final_rank", "verified"]
    assert table.num_rows == 10 and table.column("final_rank").to_pylist() == [1, 2, 3, 4, 5] * 2
    assert all(table.column("verified").to_pylist())
    # every result carries its image's path (the shards' path column) and the query's, next to the ids
    assert table.column("path").to_pylist() == [f"/images/{i}.jpg" for i in table.column("image_id").to_pylist()]
    assert set(zip(table.column("query_id").to_pylist(), table.column("query_path").to_pylist(), strict=True)) == {
        ("q", "/images/q.jpg"), ("qa", "/images/match_a.jpg")}
    for name in ("r.parquet", "r.csv"):
        path = str(tmp_path / name)
        qm.write_results(table, path)
        back = qm.read_results(path)
        for column in ("image_id", "verified", "path", "query_path", "query_bbox"):
            assert back.column(column).to_pylist() == table.column(column).to_pylist(), column
        np.testing.assert_allclose(back.column("global_score").to_numpy(), table.column("global_score").to_numpy(),
                                   rtol=1e-6)
    with pytest.raises(ValueError, match=r"\.parquet or \.csv"):
        qm.write_results(table, str(tmp_path / "r.json"))


def test_cli_build_query_file_and_evaluate(collection, tmp_path, capsys):
    index_dir = str(tmp_path / "idx")
    assert cli.main(["build", str(collection["root"] / "out"), index_dir, "--kind", "flat",
                     "--allow_mixed_models"]) == 0
    assert json.loads(capsys.readouterr().out)["num_indexed"] == 46
    queries = tmp_path / "queries.csv"
    queries.write_text("query_id,image_id\nfirst,q\nsecond,match_b\n")
    out = str(tmp_path / "results.csv")
    assert cli.main(["query", index_dir, "--queries", str(queries), "--k", "8", "--rerank", "8", "--output", out]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [s["query_id"] for s in summary] == ["first", "second"]
    assert summary[0]["results"][0]["image_id"] == "match_a"
    table = qm.read_results(out)
    assert set(table.column("query_id").to_pylist()) == {"first", "second"}
    # GLDv2 evaluation of the same results: for "first" the relevant images are the two matches
    solution = tmp_path / "solution.csv"
    solution.write_text("id,images,Usage\nfirst,match_a match_b,Public\nsecond,q,Private\n")
    assert cli.main(["eval-gldv2", out, str(solution)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["mAP@100 Public"] == pytest.approx(1.0)
    # bad input: one line on stderr, exit status 2
    assert cli.main(["query", index_dir, "--id", "no-such-image"]) == 2
    assert "not in the index" in capsys.readouterr().err


def test_plain_query_list_mixes_ids_and_paths(collection, tmp_path):
    engine = qm.QueryEngine(collection["index"])
    listing = tmp_path / "q.txt"
    listing.write_text("q\nmatch_a\n")
    specs = qm.read_query_file(str(listing))
    queries = qm.build_queries(engine, specs)
    assert [q.query_id for q in queries] == ["q", "match_a"] and queries[0].exclude_id == "q"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        qm.read_query_file(str(empty))


# --------------------------------------------------------------------------------------------- the real job


def _job_images(directory):
    """Four small photos: two crops of the astronaut, the coffee cup and the camera man (scikit-image data)."""
    from PIL import Image
    from skimage import data

    os.makedirs(directory, exist_ok=True)
    astro = data.astronaut()
    images = {
        "astro_a": astro[:300, :300],
        "astro_b": astro[40:340, 30:330],
        "coffee": data.coffee()[:300, :300],
        "camera": np.stack([data.camera()[:300, :300]] * 3, axis=-1),
    }
    paths = {}
    for name, arr in images.items():
        path = os.path.join(directory, f"{name}.png")
        Image.fromarray(arr).resize((96, 96)).save(path)
        paths[name] = path
    return paths


@pytest.fixture(scope="module")
def job_index(tmp_path_factory):
    from beam_job import cli as job_cli

    root = tmp_path_factory.mktemp("job")
    paths = _job_images(str(root / "img"))
    job_cli.run(["--input", str(root / "img" / "*.png"), "--output", str(root / "out"), "--preset", "tiny",
                 "--no_progress"])
    report = ix.build_index(str(root / "out"), str(root / "index"))
    return {"root": root, "paths": paths, "report": report}


def test_real_job_shards_feed_an_index_that_answers_queries(job_index):
    report = job_index["report"]
    assert report.num_indexed == 4 and report.params["kind"] == "flat"
    cfg = json.load(open(os.path.join(report.index_dir, "build_config.json")))
    assert cfg["preset"] == "tiny" and cfg["extraction_config"]["name"] == "tiny"
    engine = qm.QueryEngine(report.index_dir)
    ids = list(engine.index.image_ids)
    assert len(ids) == 4
    # by id, keeping the query itself: it comes first with cosine 1
    res = engine.search([engine.query_from_id(ids[0], exclude_self=False)], k=4, num_to_rerank=4)[0]
    assert res.image_ids[0] == ids[0] and res.global_scores[0] == pytest.approx(1.0, abs=1e-5)
    assert len(res.image_ids) == 4
    keys = list(zip(res.inliers.tolist(), res.global_scores.tolist(), strict=True))
    assert keys == sorted(keys, reverse=True)  # final order: inliers, then global score
    # the exact index gives the brute-force NumPy ranking of the vectors read straight from the job's shards
    import glob

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.concat_tables([pq.read_table(f, columns=["image_id", "global_descriptor"])
                              for f in sorted(glob.glob(str(job_index["root"] / "out" / "features" / "*.parquet")))])
    vecs = np.stack(table.column("global_descriptor").to_pylist()).astype(np.float32)
    shard_ids = table.column("image_id").to_pylist()
    sims = vecs @ vecs[shard_ids.index(ids[0])]
    expected = [shard_ids[i] for i in np.argsort(-sims, kind="stable")]
    by_global = [res.image_ids[i] for i in np.argsort(res.global_ranks)]
    assert by_global == expected
    np.testing.assert_allclose(np.sort(res.global_scores)[::-1], np.sort(sims)[::-1], atol=1e-5)


def test_query_image_extracted_on_the_fly_matches_the_job_features(job_index):
    engine = qm.QueryEngine(job_index["report"].index_dir)
    path = job_index["paths"]["coffee"]
    query = engine.query_from_image(path)
    assert query.query_id == "coffee" and query.global_descriptor.shape == (DIM,)
    res = engine.search([query], k=4, num_to_rerank=4)[0]
    top = res.image_ids[int(np.argmin(res.global_ranks))]
    record = engine.reader.read([engine.index.ref(engine.index.position_of(top))])[0]
    assert record.path.endswith("coffee.png")
    assert res.global_scores.max() == pytest.approx(1.0, abs=1e-4)  # same model and preset as the job
    np.testing.assert_allclose(query.local.locations, record.local.locations, atol=1e-3)


def test_cropped_query_follows_the_reference_resize_factor(job_index, tmp_path):
    """A query box (Revisited Oxford/Paris style) shrinks the max_image_size cap by crop side / image side."""
    from PIL import Image
    from skimage import data

    engine = qm.QueryEngine(job_index["report"].index_dir)
    full = data.chelsea()[:160, :240]  # 160x240, larger than the tiny preset's 96 px cap
    path = str(tmp_path / "q.png")
    Image.fromarray(full).save(path)
    query = engine.query_from_image(path, "q", bbox_xyxy=[0, 0, 120, 80])  # x1 y1 x2 y2: an 80x120 crop
    extractor = engine.extractor()
    crop = full[0:80, 0:120]
    expected = extractor.extract(crop, resize_factor=120 / 240)  # cap 96 * 0.5 = 48 px
    assert expected.processed_hw == (32, 48)
    np.testing.assert_allclose(query.global_descriptor, expected.global_descriptor, atol=1e-5)
    uncapped = extractor.extract(crop)  # without the factor the crop would be fed at 64x96
    assert uncapped.processed_hw == (64, 96)
    assert not np.allclose(query.global_descriptor, uncapped.global_descriptor, atol=1e-3)


def test_whole_database_ranking_and_reranking_that_skips_each_protocols_junk(collection, tmp_path, capsys):
    """`--k all` ranks every indexed image; with the ground truth, re-ranking verifies the first N non-junk
    results of each protocol, and eval-revisitop re-sorts exactly those per protocol, as the reference.

    Global order: decoy_0 .9, decoy_1 .8, decoy_2 .7, match_a .55, match_b .5, fillers. Ground truth of q:
    easy match_a, hard match_b, junk decoy_0. With N = 3 (per protocol, junk removed first):
      easy   (junk decoy_0 + match_b): decoy_1, decoy_2, match_a verified -> match_a first: AP 1
      medium (junk decoy_0): decoy_1, decoy_2, match_a -> match_a, decoys, then match_b at rank 4:
             AP = 1/2 * [1 + (1/3 + 2/4) / 2] = 17/24
      hard   (junk decoy_0 + match_a): decoy_1, decoy_2, match_b -> match_b first: AP 1
    """
    names = sorted(n for n in collection["rows"] if n != "q")
    pos = {n: i for i, n in enumerate(names)}
    gnd = {"imlist": names, "qimlist": ["q"],
           "gnd": [{"easy": [pos["match_a"]], "hard": [pos["match_b"]], "junk": [pos["decoy_0"]], "bbx": None}]}
    import pickle

    gnd_path = str(tmp_path / "gnd_toy.pkl")
    with open(gnd_path, "wb") as fh:
        pickle.dump(gnd, fh)
    out = str(tmp_path / "results.parquet")
    assert cli.main(["query", collection["index"], "--id", "q", "--k", "all", "--rerank", "3",
                     "--revisitop_gnd", gnd_path, "--output", out]) == 0
    capsys.readouterr()
    table = qm.read_results(out)
    assert table.num_rows == len(names)  # the whole database but the query itself
    flags = zip(table.column("image_id").to_pylist(), table.column("verified").to_pylist(), strict=True)
    verified = sorted(i for i, v in flags if v)
    assert verified == ["decoy_1", "decoy_2", "match_a", "match_b"]  # union over protocols; decoy_0 (junk) skipped
    assert cli.main(["eval-revisitop", out, gnd_path, "--rerank", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("easy: mAP=100.00") and lines[2].startswith("hard: mAP=100.00")
    assert lines[1].startswith(f"medium: mAP={100 * 17 / 24:.2f}")
    # results re-ranked without the ground truth verified the junk: evaluation refuses them in one line
    plain = str(tmp_path / "plain.parquet")
    assert cli.main(["query", collection["index"], "--id", "q", "--k", "all", "--rerank", "3", "--output", plain]) == 0
    capsys.readouterr()
    assert cli.main(["eval-revisitop", plain, gnd_path, "--rerank", "3"]) == 2
    assert "not verified" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["query", collection["index"], "--k", "some"])


def test_an_indexed_image_can_be_named_by_its_path(job_index, capsys):
    """Ids the job derives from --input globs are hashes; the path the job read is enough to query."""
    engine = qm.QueryEngine(job_index["report"].index_dir)
    path = job_index["paths"]["coffee"]
    image_id = engine.indexed_id(path)
    assert image_id is not None and image_id != path and len(image_id) == 16
    assert engine.indexed_id(os.path.relpath(path)) == image_id
    [by_path] = qm.build_queries(engine, [{"path": path}])
    assert by_path.exclude_id == image_id and by_path.query_id == "coffee" and by_path.source == path
    np.testing.assert_array_equal(by_path.global_descriptor, engine.query_from_id(image_id).global_descriptor)
    assert engine._extractor is None  # stored features: no model was loaded
    assert cli.main(["query", job_index["report"].index_dir, "--id", path, "--k", "2", "--rerank", "0"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary[0]["query_id"] == path and image_id not in [r["image_id"] for r in summary[0]["results"]]
    assert cli.main(["query", job_index["report"].index_dir, "--id", "/no/such.png"]) == 2
    assert "not in the index" in capsys.readouterr().err


def test_documented_reader_and_duckdb_recipe_on_real_job_shards(job_index):
    """The numpy reader gives per-image arrays equal to the shard columns; DuckDB's cosine works after the
    documented cast of global_descriptor to FLOAT[2048] (it reads fixed-size lists as FLOAT[])."""
    import duckdb
    import pyarrow.dataset as pads

    from beam_job.retrieval.reader import read_images

    out = str(job_index["root"] / "out")
    images = list(read_images(out))
    table = pads.dataset(os.path.join(out, "features"), format="parquet").to_table()
    assert sorted(i.image_id for i in images) == sorted(table.column("image_id").to_pylist())
    rows = {r["image_id"]: r for r in table.to_pylist()}
    for image in images:
        f, row = image.features, rows[image.image_id]
        assert f.global_descriptor.dtype == np.float32 and f.global_descriptor.shape == (DIM,)
        assert f.locations.dtype == np.float32 and f.locations.shape == (row["num_features"], 2)
        assert f.descriptors.shape == (row["num_features"], 128) and f.scales.shape == (row["num_features"],)
        np.testing.assert_array_equal(f.global_descriptor, np.asarray(row["global_descriptor"], np.float32))
        np.testing.assert_array_equal(f.locations, np.asarray(row["locations"], np.float32).reshape(-1, 2))
        np.testing.assert_array_equal(f.descriptors, np.asarray(row["descriptors"], np.float32).reshape(-1, 128))
        assert image.path == row["path"] and f.original_hw == (row["original_height"], row["original_width"])
    [one] = list(read_images(out, image_ids=[images[1].image_id]))
    assert one.image_id == images[1].image_id
    pattern = os.path.join(out, "features", "*.parquet")
    kind = duckdb.sql(f"SELECT typeof(global_descriptor) FROM read_parquet('{pattern}') LIMIT 1").fetchall()[0][0]
    assert kind == "FLOAT[]"
    query = images[0].features.global_descriptor.tolist()
    best = duckdb.sql(
        f"SELECT image_id, array_cosine_similarity(global_descriptor::FLOAT[{DIM}], ?::FLOAT[{DIM}]) AS sim "
        f"FROM read_parquet('{pattern}') ORDER BY sim DESC", params=[query]).fetchall()
    assert best[0][0] == images[0].image_id and best[0][1] == pytest.approx(1.0, abs=1e-5)
    expected = {i.image_id: float(i.features.global_descriptor @ images[0].features.global_descriptor) for i in images}
    for image_id, sim in best:
        assert sim == pytest.approx(expected[image_id], abs=1e-5)


# --------------------------------------------------------------------------------------------- the command line


def _run(argv, capsys):
    """`delg-retrieval` as the console script runs it (report included): (exit status, stdout, stderr)."""
    status = retrieval_main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_build_and_query_say_the_features_come_from_an_untrained_model(job_index, tmp_path, capsys, caplog):
    """The tiny preset's model has random weights (shards: delg.untrained_model = true): build logs it and
    records it in the index, query warns and says so in its JSON."""
    index_dir = str(tmp_path / "idx")
    status, out, _ = _run(["build", str(job_index["root"] / "out"), index_dir], capsys)
    assert status == 0 and json.loads(out)["untrained_model"] is True
    assert json.load(open(os.path.join(index_dir, "build_config.json")))["untrained_model"] is True
    assert any(r.levelname == "WARNING" and "UNTRAINED MODEL" in r.getMessage() for r in caplog.records)
    caplog.clear()
    status, out, _ = _run(["query", index_dir, "--id", job_index["paths"]["coffee"], "--k", "2", "--rerank", "0"],
                          capsys)
    assert status == 0 and json.loads(out)[0]["untrained_model"] is True
    assert any(r.levelname == "WARNING" and "UNTRAINED MODEL" in r.getMessage() for r in caplog.records)


def test_an_index_of_trained_features_says_nothing(tmp_path, capsys, caplog):
    rng = np.random.default_rng(1)
    rows = [{"image_id": f"i{n}", "global_descriptor": synthetic.unit_rows(rng, 1, DIM)[0],
             "locations": rng.random((5, 2)) * 50, "descriptors": synthetic.unit_rows(rng, 5, 128)} for n in range(3)]
    meta = delg_v1.file_metadata(model="m", preset="p", config_json="{}", untrained=False)
    synthetic.write_shard(str(tmp_path / "out" / "features" / "part-0.parquet"),
                          synthetic.rows_to_table(rows, metadata=meta))
    status, out, _ = _run(["build", str(tmp_path / "out"), str(tmp_path / "idx")], capsys)
    assert status == 0 and json.loads(out)["untrained_model"] is False
    status, out, _ = _run(["query", str(tmp_path / "idx"), "--id", "i0", "--k", "1", "--rerank", "0"], capsys)
    assert status == 0 and json.loads(out)[0]["untrained_model"] is False
    assert not [r for r in caplog.records if "UNTRAINED" in r.getMessage()]


def test_query_results_carry_the_paths_of_the_query_and_of_every_result(job_index, tmp_path, capsys):
    index_dir = job_index["report"].index_dir
    paths = job_index["paths"]
    out = str(tmp_path / "results.csv")
    status, stdout, _ = _run(["query", index_dir, "--id", paths["coffee"], "--k", "3", "--rerank", "3", "--output",
                              out], capsys)
    assert status == 0
    [summary] = json.loads(stdout)
    assert summary["query_path"] == paths["coffee"]
    engine = qm.QueryEngine(index_dir)
    by_id = {str(i): str(p) for i, p in zip(engine.index.image_ids, engine.index.paths, strict=True)}
    assert [r["path"] for r in summary["results"]] == [by_id[r["image_id"]] for r in summary["results"]]
    assert {os.path.basename(r["path"]) for r in summary["results"]} <= {"astro_a.png", "astro_b.png", "camera.png"}
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 3 and all(r["query_path"] == paths["coffee"] and r["query_bbox"] == "" for r in rows)
    assert [r["path"] for r in rows] == [by_id[r["image_id"]] for r in rows]


def test_query_image_then_report_shows_the_query_its_match_pictures_and_names(job_index, tmp_path, capsys,
                                                                               monkeypatch):
    """`query --image` of a file outside the index (relative path), then `report` from another folder without
    --queries: the pages show the query image, a match picture per result, file names, the untrained banner."""
    index_dir = job_index["report"].index_dir
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(job_index["paths"]["coffee"], work / "my_query.png")
    monkeypatch.chdir(work)
    status, stdout, _ = _run(["query", index_dir, "--image", "my_query.png", "--k", "3", "--rerank", "3",
                              "--output", "results.parquet"], capsys)
    assert status == 0 and json.loads(stdout)[0]["query_path"] == str(work / "my_query.png")
    monkeypatch.chdir(tmp_path)
    status, stdout, _ = _run(["report", str(work / "results.parquet"), "--index", index_dir, "--out", "pages"],
                             capsys)
    assert status == 0 and json.loads(stdout)["index"] == "pages/index.html"
    index_html = open(tmp_path / "pages" / "index.html").read()
    [page_name] = os.listdir(tmp_path / "pages" / "queries")
    text = open(tmp_path / "pages" / "queries" / page_name).read()
    assert "not available" not in text
    assert 'alt="query my_query"' in text and str(work / "my_query.png") in text
    links = re.findall(r'<a href="\.\./(matches/[^"]+)" data-match="1">', text)
    assert len(links) == 3 and all((tmp_path / "pages" / link).stat().st_size > 0 for link in links)
    names = re.findall(r'<span class="name" title="([^"]*)">([^<]*)</span>', text)
    assert len(names) == 3 and all(os.path.basename(path) == name and name.endswith(".png") for path, name in names)
    assert "coffee.png" in [n for _, n in names]  # the same photo, indexed
    for html in (index_html, text):
        assert 'id="untrained-warning"' in html


def test_hyphenated_flags_mean_the_same_as_underscored_ones(job_index, capsys):
    index_dir = job_index["report"].index_dir
    coffee = job_index["paths"]["coffee"]
    base = ["query", index_dir, "--id", coffee, "--k", "1", "--rerank", "0"]
    _, plain, _ = _run(base, capsys)
    _, hyphen, _ = _run([*base, "--keep-self"], capsys)
    _, underscore, _ = _run([*base, "--keep_self"], capsys)
    coffee_id = qm.QueryEngine(index_dir).indexed_id(coffee)
    assert json.loads(plain)[0]["results"][0]["image_id"] != coffee_id  # the query itself left out...
    assert json.loads(hyphen) == json.loads(underscore)  # ...and kept with either spelling
    assert json.loads(hyphen)[0]["results"][0]["image_id"] == coffee_id
    # every underscored flag of every command has its hyphenated twin
    checked = 0
    for name in [*cli.COMMANDS, REPORT_COMMAND.name]:
        with pytest.raises(SystemExit):
            _run([name, "--help"], capsys)
        text = capsys.readouterr().out
        flags = {f for f in re.findall(r"--\w+", text) if "_" in f}
        assert all(f.replace("_", "-") in text for f in flags), name
        checked += len(flags)
    assert checked > 20


def test_bad_output_format_and_missing_query_image_are_refused_before_any_work(job_index, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    index_dir = job_index["report"].index_dir
    # the format first: even the index is not opened
    status, _, err = _run(["query", str(tmp_path / "no-index"), "--id", "x", "--output", "res.xlsx"], capsys)
    assert status == 2 and err.count("\n") == 1
    assert "res.xlsx" in err and ".parquet or .csv" in err
    # a missing image: one line, no raw errno, and no model loaded
    for argv in (["query", index_dir, "--image", "missing.jpg"],
                 ["contact-sheet", index_dir, "missing.jpg", "--out", str(tmp_path / "s.png")]):
        status, _, err = _run(["-v", *argv], capsys)
        assert status == 2 and "query image 'missing.jpg' not found" in err and "Errno" not in err
        assert err.strip().splitlines()[-1].startswith("delg-retrieval")
    assert not [r for r in caplog.records if "loading DELG model" in r.getMessage()]
    assert not (tmp_path / "s.png").exists()
    # other missing files: named in one line, without Python's errno wording
    for argv in (["query", index_dir, "--queries", "nope.csv"], ["report", "nope.parquet", "--index", index_dir,
                                                                 "--out", str(tmp_path / "pages")]):
        status, _, err = _run(argv, capsys)
        assert status == 2 and "'nope." in err and "not found" in err and "Errno" not in err


def test_eval_revisitop_asks_for_k_all_only_when_rankings_were_cut(collection, tmp_path, capsys, caplog):
    """The queries are database images too, queried by id (so each leaves itself out): `--k all` ranks every
    other image, which is complete, and draws no warning; `--k 5` cuts the rankings and is told to use --k all."""
    names = sorted(collection["rows"])
    gnd = {"imlist": names, "qimlist": ["q", "match_a"],
           "gnd": [{"easy": [names.index(n)], "hard": [], "junk": [], "bbx": None} for n in ("match_a", "q")]}
    gnd_path = str(tmp_path / "gnd.pkl")
    pickle.dump(gnd, open(gnd_path, "wb"))
    for k in ("all", "5"):
        out = str(tmp_path / f"r{k}.parquet")
        assert cli.main(["query", collection["index"], "--id", "q", "match_a", "--k", k, "--rerank", "0",
                         "--output", out]) == 0
        caplog.clear()
        assert cli.main(["eval-revisitop", out, gnd_path, "--rerank", "0"]) == 0
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.endswith("evaluate")]
        if k == "all":
            assert warnings == []
        else:
            assert any("use `query --k all`" in w for w in warnings)
    capsys.readouterr()


def test_the_retrieval_package_never_imports_the_report_package():
    """Layers import one way: beam_job.report uses beam_job.retrieval, never the reverse (not even lazily)."""
    folder = os.path.dirname(beam_job.retrieval.__file__)
    for name in os.listdir(folder):
        if name.endswith(".py"):
            tree = ast.parse(open(os.path.join(folder, name)).read())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""]
                elif isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                else:
                    continue
                assert not any(m.startswith("beam_job.report") for m in modules), (name, modules)
