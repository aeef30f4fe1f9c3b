"""load_delg_model: TF2 / TF1 (.prune) formats and variants, dir / .tar.gz / gs:// / http(s) URIs, load-time errors."""

import functools
import http.server
import os
import tarfile
import threading

import numpy as np
import pytest
import tensorflow as tf

from beam_job.delg import loader
from beam_job.delg.cache import build_once, default_cache_dir
from beam_job.delg.loader import ModelLoadError, load_delg_model

from helpers import cached_model, tiny_tf1, tiny_tf2

SCALES = [0.70710677, 1.0]
GSI = [0, 1]


@functools.cache
def _image(h: int = 72, w: int = 104, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _run(model, image=None, max_feature_num=50, gsi=GSI):
    return model.run(_image() if image is None else image, SCALES, max_feature_num, 0.0, gsi)


# ------------------------------------------------------------------------------------------------------
# Real tiny DELG exports
# ------------------------------------------------------------------------------------------------------


def test_tf2_export(tmp_path_factory):
    path = tiny_tf2(tmp_path_factory)
    model = load_delg_model(path)
    assert (model.format, model.has_local, model.has_global, model.takes_global_scales_ind) == ("tf2", True, True, True)
    assert model.local_path == path
    digest = loader._sha12(os.path.join(path, "saved_model.pb"))
    assert model.identity == f"{path}@sha256:{digest}" and len(digest) == 12
    out = _run(model)
    assert set(out) == {"boxes", "features", "scales", "scores", "global_descriptors"}
    n = out["boxes"].shape[0]
    assert 0 < n <= 50
    assert out["features"].shape == (n, 128) and out["scores"].shape == (n, 1) and out["scales"].shape == (n,)
    assert out["global_descriptors"].shape == (2, 2048)
    assert all(v.dtype == np.float32 for v in out.values())
    assert np.all(np.diff(out["scores"][:, 0]) <= 0)  # sorted by attention
    assert np.all(np.isin(out["scales"], np.float32(1) / np.asarray(SCALES, np.float32)))  # 1 / scale


def test_tf1_export_matches_tf2(tmp_path_factory):
    tf2 = _run(cached_model(tiny_tf2(tmp_path_factory)))
    model = cached_model(tiny_tf1(tmp_path_factory))
    assert (model.format, model.has_local, model.has_global, model.takes_global_scales_ind) == ("tf1", True, True, True)
    tf1 = _run(model)
    np.testing.assert_array_equal(tf1["boxes"], tf2["boxes"])
    np.testing.assert_array_equal(tf1["scales"], tf2["scales"])
    np.testing.assert_allclose(tf1["scores"], tf2["scores"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(tf1["features"], tf2["features"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(tf1["global_descriptors"], tf2["global_descriptors"], rtol=1e-5, atol=1e-5)
    # The requested global rows only: index 1 alone is the second row of the full request.
    one = _run(model, gsi=[1])["global_descriptors"]
    np.testing.assert_allclose(one, tf1["global_descriptors"][1:], rtol=1e-5, atol=1e-5)


def test_tf1_export_driven_like_the_official_extractor(tmp_path_factory):
    """The official extractor's TF1 path: prune with feeds in ITS order (thres before max_feature_num), positional
    call."""
    path = tiny_tf1(tmp_path_factory)
    pruned = tf.saved_model.load(path).prune(
        ["input_image:0", "input_scales:0", "input_abs_thres:0", "input_max_feature_num:0",
         "input_global_scales_ind:0"],
        ["boxes:0", "features:0", "scales:0", "scores:0", "global_descriptors:0"],
    )
    image = _image()
    official = [t.numpy() for t in pruned(tf.constant(image), tf.constant(SCALES), tf.constant(0.0), tf.constant(50),
                                          tf.constant(GSI))]
    ours = _run(cached_model(path))
    for name, value in zip(["boxes", "features", "scales", "scores", "global_descriptors"], official, strict=True):
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    np.testing.assert_array_equal(ours["boxes"], official[0])


def test_tf1_local_only_and_global_only(tmp_path_factory):
    full = _run(cached_model(tiny_tf1(tmp_path_factory)))
    local = cached_model(tiny_tf1(tmp_path_factory, "local"))
    flags = (local.format, local.has_local, local.has_global, local.takes_global_scales_ind)
    assert flags == ("tf1", True, False, False)
    out = _run(local)
    assert set(out) == {"boxes", "features", "scales", "scores"}
    np.testing.assert_array_equal(out["boxes"], full["boxes"])

    glob = cached_model(tiny_tf1(tmp_path_factory, "global"))
    assert (glob.has_local, glob.has_global, glob.takes_global_scales_ind) == (False, True, True)
    out = _run(glob, gsi=[1])
    assert set(out) == {"global_descriptors"}
    np.testing.assert_allclose(out["global_descriptors"], full["global_descriptors"][1:], rtol=1e-5, atol=1e-5)


def test_tf1_kaggle_style_global_rows_selected_after_the_call(tmp_path_factory):
    full = cached_model(tiny_tf1(tmp_path_factory))
    kaggle = cached_model(tiny_tf1(tmp_path_factory, "kaggle"))
    assert (kaggle.has_local, kaggle.has_global, kaggle.takes_global_scales_ind) == (True, True, False)
    image = _image(64, 96, seed=3)
    scales = [0.5, 0.70710677, 1.0]
    ref = full.run(image, scales, 30, 0.0, [0, 2])
    out = kaggle.run(image, scales, 30, 0.0, [2, 0, 2])  # order and duplicates do not matter, as in the graph
    assert out["global_descriptors"].shape == (2, 2048)
    np.testing.assert_allclose(out["global_descriptors"], ref["global_descriptors"], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out["boxes"], ref["boxes"])


def test_tf1_model_is_pruned_once_with_all_feeds(tmp_path_factory, monkeypatch):
    """One pruned function computes local and global together: prune is called once, at load."""
    calls = []
    real_load = tf.saved_model.load

    def load(path, *a, **k):
        obj = real_load(path, *a, **k)
        real_prune = obj.prune

        def prune(feeds, fetches):
            calls.append((list(feeds), list(fetches)))
            return real_prune(feeds, fetches)

        obj.prune = prune
        return obj

    monkeypatch.setattr(tf.saved_model, "load", load)
    model = load_delg_model(tiny_tf1(tmp_path_factory))
    _run(model)
    _run(model)
    assert calls == [
        (
            ["input_image:0", "input_scales:0", "input_max_feature_num:0", "input_abs_thres:0",
             "input_global_scales_ind:0"],
            ["boxes:0", "features:0", "scales:0", "scores:0", "global_descriptors:0"],
        )
    ]


# ------------------------------------------------------------------------------------------------------
# URIs: .tar.gz (local, gs://, http), gs:// directory, embedded:
# ------------------------------------------------------------------------------------------------------


def _tarball(src: str, dest: str, top: str = "r50delg_test_20200914") -> str:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname=top)
    return dest


def test_local_tarball_is_unpacked_once(tmp_path_factory, tmp_path, monkeypatch):
    archive = _tarball(tiny_tf1(tmp_path_factory), str(tmp_path / "model.tar.gz"))
    cache = str(tmp_path / "cache")
    model = load_delg_model(archive, cache_dir=cache)
    assert model.format == "tf1" and model.local_path.endswith(os.path.join("unpacked", "r50delg_test_20200914"))
    assert model.local_path.startswith(cache)
    np.testing.assert_array_equal(_run(model)["boxes"], _run(cached_model(tiny_tf1(tmp_path_factory)))["boxes"])

    def fail(*a, **k):
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(loader, "_unpack_tarball", fail)
    again = load_delg_model(archive, cache_dir=cache)
    assert again.local_path == model.local_path
    assert [e for e in os.listdir(os.path.join(cache, "models")) if not e.endswith(".lock")] == [
        os.path.basename(os.path.dirname(os.path.dirname(model.local_path)))
    ]


def test_default_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DELG_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("DELG_CACHE_DIR")
    assert default_cache_dir().endswith(os.path.join(".cache", "delg-beam"))


def test_gcs_tarball_and_directory(tmp_path_factory, tmp_path, gcs_bucket):
    src = tiny_tf1(tmp_path_factory)
    archive = _tarball(src, str(tmp_path / "m.tgz"))
    gcs_bucket.blob("models/m.tgz").upload_from_filename(archive)
    for dirpath, _, files in os.walk(src):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), src)
            gcs_bucket.blob(f"dirs/tiny/{rel}").upload_from_filename(os.path.join(dirpath, name))
    ref = _run(cached_model(src))
    cache = str(tmp_path / "cache")
    for uri in (f"gs://{gcs_bucket.name}/models/m.tgz", f"gs://{gcs_bucket.name}/dirs/tiny"):
        model = load_delg_model(uri, cache_dir=cache)
        assert model.format == "tf1" and model.uri == uri and model.local_path.startswith(cache)
        np.testing.assert_array_equal(_run(model)["boxes"], ref["boxes"])
    # A trailing slash names the same directory: same cache entry, byte-identical files.
    copied = loader.resolve_model_path(f"gs://{gcs_bucket.name}/dirs/tiny/", cache_dir=cache)
    assert copied == model.local_path
    with open(os.path.join(copied, "saved_model.pb"), "rb") as a, open(os.path.join(src, "saved_model.pb"), "rb") as b:
        assert a.read() == b.read()
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_delg_model(f"gs://{gcs_bucket.name}/models/missing.tar.gz", cache_dir=cache)
    with pytest.raises(ModelLoadError, match="empty or does not exist"):
        load_delg_model(f"gs://{gcs_bucket.name}/nothing-here", cache_dir=cache)


def test_http_tarball(tmp_path_factory, tmp_path):
    serve_dir = tmp_path / "www"
    serve_dir.mkdir()
    _tarball(tiny_tf1(tmp_path_factory, "local"), str(serve_dir / "local.tar.gz"))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(serve_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/local.tar.gz"
        model = load_delg_model(url, cache_dir=str(tmp_path / "cache"))
        assert model.format == "tf1" and model.has_local and not model.has_global
        with pytest.raises(ModelLoadError, match="cannot download"):
            load_delg_model(url.replace("local.tar.gz", "missing.tar.gz"), cache_dir=str(tmp_path / "cache"))
    finally:
        server.shutdown()
        server.server_close()


def test_embedded_uri(tmp_path_factory):
    cache = str(tmp_path_factory.getbasetemp() / "delg-cache")
    model = load_delg_model("embedded:tiny", cache_dir=cache)
    assert model.format == "tf2" and model.is_embedded and model.local_path == tiny_tf2(tmp_path_factory)
    assert model.identity.startswith("embedded:tiny@sha256:")
    with pytest.raises(ModelLoadError, match="unknown embedded architecture 'r18'"):
        load_delg_model("embedded:r18", cache_dir=cache)


# ------------------------------------------------------------------------------------------------------
# Load-time errors: one line, naming what is missing
# ------------------------------------------------------------------------------------------------------


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_not_a_saved_model(tmp_path):
    (tmp_path / "foo").mkdir()
    (tmp_path / "foo" / "variables.index").write_bytes(b"x")
    with pytest.raises(ModelLoadError) as excinfo:
        load_delg_model(str(tmp_path / "foo"))
    message = _one_line(excinfo)
    assert "foo is not a SavedModel (no saved_model.pb)" in message and ".tar.gz" in message
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_delg_model(str(tmp_path / "nope"))
    (tmp_path / "x.bin").write_bytes(b"1")
    with pytest.raises(ModelLoadError, match="is a file, not a SavedModel"):
        load_delg_model(str(tmp_path / "x.bin"))
    with pytest.raises(ModelLoadError, match="no model given"):
        load_delg_model("")


def test_bad_tarballs(tmp_path):
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball at all")
    with pytest.raises(ModelLoadError) as excinfo:
        load_delg_model(str(tmp_path / "junk.tar.gz"), cache_dir=str(tmp_path / "cache"))
    assert "not a readable .tar.gz" in _one_line(excinfo)
    (tmp_path / "content").mkdir()
    (tmp_path / "content" / "README").write_text("hi")
    _tarball(str(tmp_path / "content"), str(tmp_path / "empty.tar.gz"))
    with pytest.raises(ModelLoadError) as excinfo:
        load_delg_model(str(tmp_path / "empty.tar.gz"), cache_dir=str(tmp_path / "cache"))
    assert "contains no saved_model.pb" in _one_line(excinfo)
    # Failed builds leave nothing behind in the cache (only lock files).
    assert all(e.endswith(".lock") for e in os.listdir(tmp_path / "cache" / "models"))


def _save_tf2_toy(path, fn, names):
    specs = {
        "input_image": tf.TensorSpec([None, None, 3], tf.uint8),
        "input_scales": tf.TensorSpec([None], tf.float32),
        "input_max_feature_num": tf.TensorSpec([], tf.int32),
        "input_abs_thres": tf.TensorSpec([], tf.float32),
        "input_global_scales_ind": tf.TensorSpec([None], tf.int32),
        "image": tf.TensorSpec([None, None, 3], tf.uint8),
    }
    module = tf.Module()
    module.f = tf.function(fn, input_signature=[specs[n] for n in names])
    tf.saved_model.save(module, str(path))
    return str(path)


def _toy_outputs(image, scales, drop=()):
    n = tf.shape(scales)[0]
    out = {
        "boxes": tf.zeros([n, 4]),
        "features": tf.ones([n, 128]),
        "scales": 1.0 / scales,
        "scores": tf.ones([n, 1]),
        "global_descriptors": tf.ones([n, 2048]) * tf.reduce_mean(tf.cast(image, tf.float32)),
    }
    return {k: v for k, v in out.items() if k not in drop}


def test_tf2_wrong_input_names(tmp_path):
    def f(image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind):
        return _toy_outputs(image, input_scales)

    names = ["image", "input_scales", "input_max_feature_num", "input_abs_thres", "input_global_scales_ind"]
    path = _save_tf2_toy(tmp_path / "m", f, names)
    with pytest.raises(ModelLoadError) as excinfo:
        load_delg_model(path)
    assert "unexpected input(s) ['image']" in _one_line(excinfo)


def test_tf2_missing_output(tmp_path):
    def f(input_image, input_scales, input_max_feature_num, input_abs_thres, input_global_scales_ind):
        return _toy_outputs(input_image, input_scales, drop=("scales",))

    path = _save_tf2_toy(tmp_path / "m", f, ["input_image", "input_scales", "input_max_feature_num", "input_abs_thres",
                                             "input_global_scales_ind"])
    with pytest.raises(ModelLoadError) as excinfo:
        load_delg_model(path)
    assert "lacks output(s) ['scales']" in _one_line(excinfo)


def test_tf2_toy_global_only_and_no_signature(tmp_path):
    def f(input_image, input_scales, input_global_scales_ind):
        descriptors = _toy_outputs(input_image, input_scales)["global_descriptors"]
        return {"global_descriptors": tf.gather(descriptors, input_global_scales_ind)}

    path = _save_tf2_toy(tmp_path / "g", f, ["input_image", "input_scales", "input_global_scales_ind"])
    model = load_delg_model(path)
    flags = (model.format, model.has_local, model.has_global, model.takes_global_scales_ind)
    assert flags == ("tf2", False, True, True)
    out = model.run(np.full((12, 12, 3), 4, np.uint8), [1.0, 2.0, 3.0], 10, 0.0, [2])
    np.testing.assert_array_equal(out["global_descriptors"], np.full((1, 2048), 4.0, np.float32))

    module = tf.Module()
    module.v = tf.Variable(1.0)
    tf.saved_model.save(module, str(tmp_path / "nosig"))
    with pytest.raises(ModelLoadError) as excinfo:
        load_delg_model(str(tmp_path / "nosig"))
    assert "no 'serving_default' signature" in _one_line(excinfo)


def _save_tf1_toy(path, outputs=("boxes", "features", "scales", "scores", "global_descriptors"),
                  extra_placeholder=False):
    graph = tf.Graph()
    with graph.as_default():
        image = tf.compat.v1.placeholder(tf.uint8, [None, None, 3], name="input_image")
        scales = tf.compat.v1.placeholder(tf.float32, [None], name="input_scales")
        tf.compat.v1.placeholder(tf.int32, [], name="input_max_feature_num")
        thres = tf.compat.v1.placeholder(tf.float32, [], name="input_abs_thres")
        gsi = tf.compat.v1.placeholder(tf.int32, [None], name="input_global_scales_ind")
        values = _toy_outputs(image, scales)
        values["scores"] = values["scores"] * thres
        # Un-frozen variables (resource and legacy ref), as in the official pretrained tarballs.
        weight = tf.compat.v1.get_variable("weight", initializer=tf.fill([1, 2048], 3.0))
        bias = tf.compat.v1.Variable(tf.zeros([1, 2048]), name="bias", use_resource=False)
        values["global_descriptors"] = tf.gather(values["global_descriptors"] * weight + bias, gsi)
        if extra_placeholder:
            foo = tf.compat.v1.placeholder(tf.float32, [], name="foo")
            values["features"] = values["features"] * foo
        for name in outputs:
            tf.identity(values[name], name=name)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            builder = tf.compat.v1.saved_model.Builder(str(path))
            builder.add_meta_graph_and_variables(sess, ["serve"])
            builder.save()
    return str(path)


def test_tf1_missing_output_and_unfeedable_placeholder(tmp_path):
    path = _save_tf1_toy(tmp_path / "a", outputs=("boxes", "features", "scores", "global_descriptors"))
    with pytest.raises(ModelLoadError) as excinfo:
        load_delg_model(path)
    assert "lacks output tensor(s) ['scales:0']" in _one_line(excinfo)

    path = _save_tf1_toy(tmp_path / "b", extra_placeholder=True)
    with pytest.raises(ModelLoadError) as excinfo:
        load_delg_model(path)
    assert "'features:0' depends on placeholder(s) ['foo']" in _one_line(excinfo)

    path = _save_tf1_toy(tmp_path / "c", outputs=("boxes",))
    with pytest.raises(ModelLoadError, match=r"lacks output tensor\(s\) \['features:0', 'scales:0', 'scores:0'\]"):
        load_delg_model(path)


def test_tf1_toy_feeds_in_graph_dtypes(tmp_path):
    model = load_delg_model(_save_tf1_toy(tmp_path / "ok"))
    assert (model.format, model.has_local, model.has_global, model.takes_global_scales_ind) == ("tf1", True, True, True)
    out = model.run(np.full((12, 12, 3), 2, np.uint8), [1.0, 0.5], 7, 3.0, [1])
    np.testing.assert_array_equal(out["scales"], np.array([1.0, 2.0], np.float32))
    np.testing.assert_array_equal(out["scores"], np.full((2, 1), 3.0, np.float32))
    np.testing.assert_array_equal(out["global_descriptors"], np.full((1, 2048), 6.0, np.float32))  # restored weight 3
    with pytest.raises(ValueError, match="uint8"):
        model.run(np.zeros((12, 12), np.uint8), [1.0], 7, 3.0, [0])


def test_build_once_threads_race(tmp_path):
    """Concurrent builders (separate lock file handles) build exactly once and all get the finished dir."""
    import time

    built = []

    def build(tmp):
        built.append(tmp)
        time.sleep(0.2)
        with open(os.path.join(tmp, "saved_model.pb"), "w") as handle:
            handle.write("ok")

    target = str(tmp_path / "t")
    results = []
    threads = [threading.Thread(target=lambda: results.append(build_once(target, build))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and results == [target] * 4
    assert sorted(os.listdir(tmp_path)) == ["t", "t.lock"]


def test_build_once_removes_leftovers_of_a_killed_builder(tmp_path):
    target = str(tmp_path / "t")
    os.makedirs(tmp_path / ".t.tmp-dead1234" / "half")  # what a killed builder leaves behind

    def boom(tmp):
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        build_once(target, boom)
    assert sorted(os.listdir(tmp_path)) == ["t.lock"]  # the failed build cleaned up too
    assert build_once(target, lambda tmp: open(os.path.join(tmp, "x"), "w").close()) == target
    assert os.listdir(target) == ["x"]
