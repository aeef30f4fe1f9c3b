"""Embedded default model: exported once per cache (even with racing processes), reused, loudly marked untrained."""

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from beam_job.delg import embedded
from beam_job.delg.loader import load_delg_model

from helpers import tiny_tf2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RACER = textwrap.dedent(
    """
    import logging, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    from beam_job.delg.embedded import embedded_model_path
    sys.stdout.write(embedded_model_path("tiny", cache_dir=sys.argv[1]))
    """
)


def test_two_processes_racing_export_one_valid_model(tmp_path, tmp_path_factory, monkeypatch):
    cache = str(tmp_path / "cache")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", TF_NUM_INTRAOP_THREADS="1", PYTHONPATH=ROOT)
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                         cwd=ROOT, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    paths = {out for out, _ in results}
    assert len(paths) == 1
    path = paths.pop()
    exports = sum(err.count("Exporting the embedded DELG tiny") for _, err in results)
    assert exports == 1  # one process built it, the other waited on the lock and reused it
    assert all("UNTRAINED" in err and "MEANINGLESS" in err for _, err in results)  # both warn
    assert os.path.basename(path).startswith("tiny-seed0-v")
    expected = sorted([os.path.basename(path), os.path.basename(path) + ".lock"])
    assert sorted(os.listdir(os.path.join(cache, "embedded"))) == expected

    # The raced export is a valid model, with exactly the weights of any other export of the same seed.
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    args = (image, [0.70710677, 1.0], 20, 0.0, [0, 1])
    raced = load_delg_model(path).run(*args)
    reference = load_delg_model(tiny_tf2(tmp_path_factory)).run(*args)
    assert set(raced) == set(reference)
    np.testing.assert_array_equal(raced["boxes"], reference["boxes"])
    for key in reference:  # same weights; multi-threaded TF CPU kernels may differ in the last bits
        np.testing.assert_allclose(raced[key], reference[key], rtol=1e-5, atol=1e-6)

    # Reused afterwards: the model is not built again.
    from beam_job.delg import keras_model

    def no_build(*a, **k):
        raise AssertionError("embedded model rebuilt")

    monkeypatch.setattr(keras_model, "build_delg", no_build)
    assert embedded.embedded_model_path("tiny", cache_dir=cache) == path


def test_warning_and_bad_arch(tmp_path_factory, monkeypatch, caplog):
    monkeypatch.setattr(embedded, "_warned", set())
    cache = str(tmp_path_factory.getbasetemp() / "delg-cache")
    with caplog.at_level(logging.WARNING, logger="beam_job.delg.embedded"):
        first = embedded.embedded_model_path("tiny", cache_dir=cache)
        second = embedded.embedded_model_path("tiny", cache_dir=cache)
    assert first == second == tiny_tf2(tmp_path_factory)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "embedded:tiny" in warnings[0] and "UNTRAINED" in warnings[0]
    assert "https://storage.googleapis.com/delf/r50delg_gldv2clean_20200914.tar.gz" in warnings[0]
    with pytest.raises(ValueError, match="unknown embedded architecture 'r18'"):
        embedded.embedded_model_path("r18", cache_dir=cache)


def test_version_tracks_model_code():
    version = embedded._code_version()
    assert version.startswith(f"v{embedded.EMBEDDED_FORMAT_VERSION}-") and len(version) == len("v1-") + 10
    assert version == embedded._code_version()  # stable for unchanged code
