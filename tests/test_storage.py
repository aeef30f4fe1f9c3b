"""The one storage layer (beam_job/storage.py): local and gs:// (loopback emulator) alike, listing errors raise,
one gs:// stack in the code, and the model layer imports Beam only for remote URIs."""

import os
import re
import subprocess
import sys

import pytest

from beam_job import storage
from beam_job.pipeline.resume import has_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return f"gs://{request.getfixturevalue('gcs_bucket').name}/root"


def test_write_read_list_rename_delete_round_trip(root, tmp_path):
    storage.write_bytes(f"{root}/a/one.bin", b"1" * 10)
    storage.write_bytes(f"{root}/a/b/two.bin", b"2" * 20)
    assert storage.read_bytes(f"{root}/a/one.bin") == b"1" * 10
    assert storage.read_bytes(f"{root}/a/b/two.bin", limit=5) == b"22222"
    assert storage.match(f"{root}/a/*.bin") == [f"{root}/a/one.bin"]  # '*' stays in its folder
    assert storage.match(f"{root}/a/**.bin") == [f"{root}/a/b/two.bin", f"{root}/a/one.bin"]
    assert storage.match(f"{root}/*/one.bin") == [f"{root}/a/one.bin"]  # wildcard in a folder name
    assert [(p, n) for p, n, _ in storage.listing(f"{root}/a/**")] == [(f"{root}/a/b/two.bin", 20),
                                                                       (f"{root}/a/one.bin", 10)]
    assert storage.match(f"{root}/nothing/*.bin") == [] and storage.match(f"{root}/a/one.bin", limit=1)
    storage.rename([f"{root}/a/one.bin"], [f"{root}/c/one.bin"])
    assert not storage.exists(f"{root}/a/one.bin") and storage.exists(f"{root}/c/one.bin")
    local = tmp_path / "copy.bin"
    assert storage.download(f"{root}/c/one.bin", str(local)) == 10 and local.read_bytes() == b"1" * 10
    storage.delete([f"{root}/c/one.bin"])
    assert not storage.exists(f"{root}/c/one.bin")
    assert not [n for n in storage.match(f"{root}/**") if ".tmp-" in n]  # write_bytes left no temp file


def test_a_listing_that_fails_is_an_error_not_an_empty_output(gcs_bucket):
    missing = "gs://no-such-bucket-for-delg/out"
    with pytest.raises(OSError, match=r"NotFound|not found|404"):  # Beam's BeamIOError
        storage.match(f"{missing}/features/*.parquet")
    with pytest.raises(OSError, match=r"NotFound|not found|404"):
        has_shards(f"{missing}/features")  # before: False, so a resume would have redone everything
    assert has_shards(f"gs://{gcs_bucket.name}/empty/features") is False


def test_one_gs_stack_in_the_code():
    """Beam's FileSystems only in beam_job/storage.py; google-cloud-storage only for the claim's precondition;
    no pyarrow.fs anywhere."""
    allowed = {"FileSystems": {"storage.py"}, "google.cloud": {"claim.py"}, "pyarrow.fs": set()}
    pattern = re.compile(r"^\s*(?:from|import) (apache_beam\.io\.filesystems|google\.cloud|pyarrow\.fs)\b", re.M)
    found = {}
    for dirpath, _, files in os.walk(os.path.join(REPO, "beam_job")):
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(dirpath, name), encoding="utf-8") as fh:
                    for m in pattern.finditer(fh.read()):
                        key = "FileSystems" if "filesystems" in m.group(1) else m.group(1)
                        found.setdefault(key, set()).add(name)
    for key, names in found.items():
        assert names <= allowed[key], (key, names)


def test_loading_a_local_model_imports_no_beam():
    code = ("import sys; from beam_job.config import get_preset; from beam_job.delg.extractor import DelgExtractor; "
            "import numpy as np; from beam_job.imaging import prepare_image; "
            "e = DelgExtractor(get_preset('tiny')); e.extract(np.zeros((40, 50, 3), np.uint8)); "
            "print([m for m in sys.modules if m.startswith('apache_beam')][:3])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
