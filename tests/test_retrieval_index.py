"""Index build from delg_v1 shards (local and gs://): exactness, null handling, approximate kinds, memory bound."""

import json
import os
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_job.retrieval import index as ix
from beam_job.retrieval import shards, synthetic

DIM = 2048


def _vectors(n, seed=0):
    return synthetic.clustered_unit_rows(np.random.default_rng(seed), n, DIM, num_clusters=32)


def _bruteforce(db, queries, k):
    sims = queries @ db.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, order, axis=1), order


def test_row_group_to_numpy_is_zero_copy(tmp_path):
    vecs = _vectors(50)
    uri = synthetic.write_global_shards(str(tmp_path), vecs, 1)[0]
    batch = next(shards.iter_global_batches([uri]))
    m = batch.matrix
    assert m.shape == (50, DIM) and m.dtype == np.float32
    np.testing.assert_array_equal(m, vecs)
    # A view on Arrow memory: read-only, not owning its data, at the address of the Arrow values buffer.
    assert not m.flags.writeable and not m.flags.owndata
    table = pq.read_table(uri, columns=["global_descriptor"])
    assert isinstance(m.base, object) and m.__array_interface__["data"][0] != 0
    values = table.column("global_descriptor").combine_chunks().flatten()
    assert len(values) == 50 * DIM


def test_flat_index_equals_bruteforce_and_idmap_points_at_rows(tmp_path):
    rng = np.random.default_rng(1)
    vecs = _vectors(600, seed=1)
    uris = synthetic.write_global_shards(str(tmp_path / "out" / "features"), vecs, 3, row_group_size=64)
    report = ix.build_index(str(tmp_path / "out"), str(tmp_path / "idx"))
    assert report.params["kind"] == "flat" and report.num_indexed == 600 and report.num_shards == 3
    index = ix.RetrievalIndex.load(str(tmp_path / "idx"))
    queries = vecs[rng.choice(600, 25, replace=False)] + 0.02 * rng.standard_normal((25, DIM), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    scores, positions = index.search(queries, 10)
    bf_scores, bf_order = _bruteforce(vecs, queries, 10)
    expected_ids = np.array([f"img{i:07d}" for i in range(600)], dtype=object)[bf_order]
    np.testing.assert_array_equal(index.image_ids[positions], expected_ids)
    np.testing.assert_allclose(scores, bf_scores, rtol=0, atol=1e-5)
    # id map: (shard, row) leads back to the same image id in the shard file
    for pos in positions[:, 0]:
        shard_uri, row = index.ref(pos)
        assert shard_uri in uris
        assert pq.read_table(shard_uri, columns=["image_id"]).column(0)[row].as_py() == index.image_ids[pos]
    with open(tmp_path / "idx" / "build_config.json") as fh:
        cfg = json.load(fh)
    assert cfg["params"]["factory"] == "Flat" and cfg["num_indexed"] == 600 and cfg["preset"] == "tiny"
    assert cfg["shards"] == uris and cfg["extraction_config"] == {"name": "tiny"}
    idmap = pq.read_table(tmp_path / "idx" / "idmap.parquet")
    assert idmap.schema.names == ["position", "image_id", "shard", "row", "path"]
    assert idmap.column("path").to_pylist() == [f"/images/{i}.jpg" for i in idmap.column("image_id").to_pylist()]
    assert idmap.column("position").to_pylist() == list(range(600))


@pytest.mark.parametrize("null_style", ["python_none", "masked"])
def test_null_global_descriptors_are_skipped_and_counted(tmp_path, null_style):
    """Both ways pyarrow 25 can write a null fixed_size_list (an unreadable file, or zeros on read-back)."""
    vecs = _vectors(40, seed=2)
    rows = [{"image_id": f"a{i}", "global_descriptor": None if i % 7 == 3 else vecs[i]} for i in range(40)]
    table = synthetic.rows_to_table(rows, metadata=synthetic.default_metadata())
    if null_style == "python_none":  # pa.array with None entries: pyarrow 25 cannot read this file back
        gd = pa.array([r["global_descriptor"] for r in rows], table.schema.field("global_descriptor").type)
        table = table.set_column(table.schema.get_field_index("global_descriptor"), "global_descriptor", gd)
    assert table.column("global_descriptor").null_count == 6
    synthetic.write_shard(str(tmp_path / "s" / "part-0.parquet"), table, row_group_size=16)
    report = ix.build_index(str(tmp_path / "s"), str(tmp_path / "idx"))
    nulls = [i for i in range(40) if i % 7 == 3]
    assert report.num_null_skipped == len(nulls) and report.num_indexed == 40 - len(nulls)
    index = ix.RetrievalIndex.load(str(tmp_path / "idx"))
    kept = [i for i in range(40) if i % 7 != 3]
    assert list(index.image_ids) == [f"a{i}" for i in kept]
    assert [index.ref(p)[1] for p in range(len(kept))] == kept  # rows inside the shard skip the null ones
    _, pos = index.search(vecs[kept[5]], 1)
    assert index.image_ids[pos[0, 0]] == f"a{kept[5]}"
    assert json.load(open(tmp_path / "idx" / "build_config.json"))["num_null_skipped"] == len(nulls)


def test_approximate_indexes_have_high_recall(tmp_path):
    rng = np.random.default_rng(3)
    vecs = _vectors(2000, seed=3)
    synthetic.write_global_shards(str(tmp_path / "f"), vecs, 2, row_group_size=500)
    queries = vecs[rng.choice(2000, 30, replace=False)]
    _, bf = _bruteforce(vecs, queries, 10)
    cfgs = {
        "ivfpq": ix.IndexConfig(kind="ivfpq", nlist=16, pq_m=64, train_size=1000, nprobe=8),
        "hnsw": ix.IndexConfig(kind="hnsw", hnsw_m=16, ef_search=64),
    }
    for kind, cfg in cfgs.items():
        report = ix.build_index(str(tmp_path / "f"), str(tmp_path / kind), cfg)
        index = ix.RetrievalIndex.load(str(tmp_path / kind))
        _, pos = index.search(queries, 10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(pos, bf, strict=True)])
        assert recall >= 0.9, (kind, recall)
        if kind == "ivfpq":
            assert report.params["factory"] == "IVF16,PQ64x4fs,RFlat" and report.params["train_size"] == 1000
            assert index.config["params"]["nprobe"] == 8


def test_auto_kind_thresholds():
    assert ix.choose_kind(ix.AUTO_FLAT_MAX - 1) == "flat"
    assert ix.choose_kind(ix.AUTO_FLAT_MAX) == "ivfpq"
    assert ix.choose_kind(10, "hnsw") == "hnsw"
    p = ix.resolve_config(ix.IndexConfig(), 1_000_000, DIM)
    assert p["factory"] == "IVF1024,PQ256x4fs,RFlat" and p["train_size"] == 65536 and p["nprobe"] == 64
    p = ix.resolve_config(ix.IndexConfig(), 5_000_000, DIM)
    assert p["factory"] == "IVF2048,PQ256x4fs" and p["train_size"] == 100_000
    assert ix.default_nlist(1000) == 25  # 2**5 = 32 clipped to 1000 // 39
    with pytest.raises(ValueError, match="index kind"):
        ix.IndexConfig(kind="lsh")
    with pytest.raises(ValueError, match="pq_m"):
        ix.resolve_config(ix.IndexConfig(kind="ivfpq", pq_m=100), 10_000, DIM)


def test_errors_are_one_line_and_actionable(tmp_path):
    with pytest.raises(ValueError, match="no feature shards"):
        ix.build_index(str(tmp_path), str(tmp_path / "idx"))
    vecs = _vectors(20, seed=4)
    synthetic.write_global_shards(str(tmp_path / "m"), vecs[:10], 1, metadata=synthetic.default_metadata(model="A"))
    synthetic.write_global_shards(str(tmp_path / "m2"), vecs[10:], 1, metadata=synthetic.default_metadata(model="B"))
    os.replace(tmp_path / "m2" / "part-00000.parquet", tmp_path / "m" / "part-00001.parquet")
    with pytest.raises(ValueError, match="not comparable"):
        ix.build_index(str(tmp_path / "m"), str(tmp_path / "idx"))
    report = ix.build_index(str(tmp_path / "m"), str(tmp_path / "idx"), ix.IndexConfig(allow_mixed_models=True))
    assert report.num_indexed == 20
    with pytest.raises(ValueError, match="not an index directory"):
        ix.RetrievalIndex.load(str(tmp_path / "m"))
    with pytest.raises(ValueError, match="dimension"):
        ix.RetrievalIndex.load(str(tmp_path / "idx")).search(np.zeros((1, 5), np.float32), 3)


def test_build_from_gcs_shards_and_index_on_gcs(gcs_bucket, tmp_path):
    vecs = _vectors(120, seed=5)
    base = f"gs://{gcs_bucket.name}/run1"
    uris = synthetic.write_global_shards(f"{base}/features", vecs, 3, row_group_size=32)
    assert shards.list_shards(base) == uris and all(u.startswith("gs://") for u in uris)
    assert shards.list_shards(f"{base}/features/*.parquet") == uris
    assert shards.list_shards(f"gs://{gcs_bucket.name}/run?/*/part-*.parquet") == uris  # wildcard folders
    report = ix.build_index(base, f"gs://{gcs_bucket.name}/index")
    assert report.num_indexed == 120
    names = sorted(b.name for b in gcs_bucket.list_blobs(prefix="index/"))
    assert names == ["index/build_config.json", "index/idmap.parquet", "index/index.faiss"]
    index = ix.RetrievalIndex.load(f"gs://{gcs_bucket.name}/index")
    scores, pos = index.search(vecs[:5], 3)
    assert list(index.image_ids[pos[:, 0]]) == [f"img{i:07d}" for i in range(5)]
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert index.ref(pos[0, 0]) == (uris[0], 0)
    # local features come back from gs:// shards too
    rec = shards.LocalFeatureReader().read([index.ref(pos[3, 0])])[0]
    assert rec.image_id == "img0000003" and rec.global_descriptor.shape == (DIM,)


def test_glob_with_wildcard_folders_and_duplicate_ids_across_runs(tmp_path, caplog):
    """Two runs over the same images: `run-*/features/*.parquet` finds both, the build warns that ids repeat,
    and a query by one of them still gets k results (every copy of the query itself is left out)."""
    from beam_job.retrieval import query as qm

    vecs = _vectors(12, seed=7)
    first = synthetic.write_global_shards(str(tmp_path / "run-a" / "features"), vecs[:10], 2)
    second = synthetic.write_global_shards(str(tmp_path / "run-b" / "features"), vecs[:10], 1)
    synthetic.write_global_shards(str(tmp_path / "other" / "features"), vecs[10:], 1)
    assert shards.list_shards(str(tmp_path / "run-*" / "features" / "*.parquet")) == first + second
    assert shards.list_shards(str(tmp_path / "*" / "features" / "part-00001.parquet")) == [first[1]]
    with pytest.raises(ValueError, match="no feature shards"):
        shards.list_shards(str(tmp_path / "run-*" / "*.parquet"))  # `*` does not cross a folder
    caplog.set_level("WARNING", logger="beam_job.retrieval.index")
    report = ix.build_index(str(tmp_path / "run-*" / "features" / "*.parquet"), str(tmp_path / "idx"))
    assert report.num_indexed == 20 and report.num_duplicate_ids == 10
    assert any("10 indexed rows repeat an image_id" in r.getMessage() for r in caplog.records)
    clean = ix.build_index(str(tmp_path / "run-a"), str(tmp_path / "idx_a"))
    assert clean.num_duplicate_ids == 0
    engine = qm.QueryEngine(str(tmp_path / "idx"))
    assert engine.index.count_of("img0000000") == 2
    result = engine.search([engine.query_from_id("img0000000")], k=3, num_to_rerank=0)[0]
    assert len(result.image_ids) == 3 and "img0000000" not in result.image_ids


_POOLS = []  # proxy pools must outlive every buffer they allocated: keep them for the whole session


def _peak_build_memory(tmp_path, name, num_shards, rows_per_shard, cfg):
    vecs = _vectors(num_shards * rows_per_shard, seed=6)
    folder = str(tmp_path / name)
    synthetic.write_global_shards(folder, vecs, num_shards, row_group_size=64)
    del vecs
    pool = pa.proxy_memory_pool(pa.default_memory_pool())
    _POOLS.append(pool)
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        ix.build_index(folder, str(tmp_path / (name + "_idx")), cfg)
        _, py_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    return pool.max_memory(), py_peak


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_build_memory_is_bounded_by_a_shard_not_the_collection(tmp_path, kind):
    cfg = ix.IndexConfig(kind=kind, nlist=4, pq_m=16, train_size=640)
    rows = 320  # 5 row groups of 64 x 8 KiB per shard; the small case holds exactly one training sample
    _peak_build_memory(tmp_path, "warm_up", 1, 64, ix.IndexConfig(kind="flat"))  # first-use imports and caches
    few_arrow, few_py = _peak_build_memory(tmp_path, "few", 2, rows, cfg)
    many_arrow, many_py = _peak_build_memory(tmp_path, "many", 16, rows, cfg)
    collection = 16 * rows * DIM * 4  # 40 MiB of descriptors in the large case
    # Arrow (decoded row groups) and numpy/Python (tracemalloc) peaks stay flat while the data grows 8x;
    # what remains is one row group (512 KiB) plus, for IVF, the 640-vector training sample (5 MiB).
    assert many_arrow < 1.25 * few_arrow + 128 * 1024, (few_arrow, many_arrow)
    assert many_py < 1.25 * few_py + 128 * 1024, (few_py, many_py)
    assert many_arrow < collection / 10 and many_py < collection / 6
