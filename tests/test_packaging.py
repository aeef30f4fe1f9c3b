"""Packaging: the sdist that Beam stages for Dataflow (--setup_file) holds the whole job and installs offline."""

import email
import pathlib
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(path):
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            pins[re.split(r"[\[=<>!~; ]", line, maxsplit=1)[0].lower()] = line
    return pins


def _shipped_sources():
    """Every file git tracks under the two packages (what a Dataflow worker must receive)."""
    out = subprocess.run(
        ["git", "ls-files", "beam_job", "schemas"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    # Files other engineers have not committed yet are still on disk: include untracked ones too.
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "beam_job", "schemas"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return sorted(set(out + untracked))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """Build the sdist exactly as Beam does when `build` is not installed (`setup.py sdist`), into tmp."""
    tmp = tmp_path_factory.mktemp("sdist")
    (tmp / "egg").mkdir()
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp / "egg"), "sdist", "--dist-dir", str(tmp)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (archive,) = tmp.glob("*.tar.gz")
    return archive


def _members(archive):
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    top = names[0].split("/", 1)[0]
    return top, {name.split("/", 1)[1] for name in names if "/" in name}


def test_sdist_contains_both_packages_schema_docs_and_requirements(sdist):
    top, members = _members(sdist)
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "beam_job/__init__.py").read_text()).group(1)
    assert top == "delg-beam-job-" + version
    for required in (
        "setup.py",
        "requirements.txt",  # setup.py reads the pins from it when the worker builds the sdist
        "requirements-dev.txt",
        "beam_job/__init__.py",
        "beam_job/pipeline/__init__.py",
        "beam_job/delg/__init__.py",
        "schemas/__init__.py",
        "schemas/delg_v1.py",
    ):
        assert required in members, f"{required} missing from the sdist"
    if (ROOT / "schemas" / "README.md").exists():
        assert "schemas/README.md" in members
    missing = [path for path in _shipped_sources() if path not in members and not path.endswith(".pyc")]
    assert not missing, f"files of beam_job/ or schemas/ not shipped to workers: {missing}"
    # Nothing the workers do not need (tests, images, notebooks) is staged with every job.
    assert not [m for m in members if m.startswith(("tests/", "examples/", "benchmarks/", "docker/"))]


def test_sdist_installs_offline_with_pinned_requirements(sdist, tmp_path):
    """What a Dataflow worker does with the staged sdist: pip builds and installs it (here with no index)."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
         "--target", str(target), str(sdist)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    _, members = _members(sdist)
    installed = {str(p.relative_to(target)) for p in target.rglob("*.py") if "__pycache__" not in p.parts}
    # schemas/ installs as beam_job/schemas/: no generic top-level "schemas" module in users' environments.
    expected = {("beam_job/" + m) if m.startswith("schemas/") else m
                for m in members if m.endswith(".py") and m.startswith(("beam_job/", "schemas/"))}
    assert installed == expected and not (target / "schemas").exists()
    if (ROOT / "schemas" / "README.md").exists():
        assert (target / "beam_job" / "schemas" / "README.md").exists(), "schemas/README.md is not installed"
    (dist_info,) = target.glob("delg_beam_job-*.dist-info")
    meta = email.message_from_string((dist_info / "METADATA").read_text())
    requires = meta.get_all("Requires-Dist")
    plain = sorted(r for r in requires if "extra ==" not in r)

    runtime = _pins(ROOT / "requirements.txt")
    tf_line = runtime.get("tensorflow-cpu") or runtime["tensorflow"]
    tf_version = tf_line.split("==")[1]
    # Every runtime pin except TensorFlow is an install requirement, with the very same pin.
    assert plain == sorted(line for dist, line in runtime.items() if not dist.startswith("tensorflow"))
    assert all("==" in r for r in requires), f"unpinned requirement in {requires}"
    # TensorFlow comes through an extra, so the GPU container's CUDA build is not replaced by tensorflow-cpu.
    assert f'tensorflow-cpu=={tf_version}; extra == "cpu"' in requires
    assert f'tensorflow[and-cuda]=={tf_version}; extra == "gpu"' in requires
    scripts = (dist_info / "entry_points.txt").read_text()
    assert "delg-extract = beam_job.cli:console_main" in scripts
