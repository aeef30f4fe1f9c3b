"""Packaging: the sdist that Beam stages for Dataflow (--setup_file) holds the whole job and installs offline; a
fresh venv's own pip installs the project (editable and not) with `beam_job.schemas`; the console scripts run."""

import email
import importlib.metadata
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
    # beam_job/schemas is a link to schemas/ (listed by git as one entry): its files ship as beam_job/schemas/.
    shipped = {("beam_job/" + p) if p.startswith("schemas/") else p for p in out + untracked}
    return sorted(shipped - {"beam_job/schemas"})


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
        "pyproject.toml",  # the build system the worker's pip builds the sdist with
        "beam_job/schemas/__init__.py",
        "beam_job/schemas/delg_v1.py",
        "beam_job/schemas/README.md",
    ):
        assert required in members, f"{required} missing from the sdist"
    missing = [path for path in _shipped_sources() if path not in members and not path.endswith(".pyc")]
    assert not missing, f"files of beam_job/ or schemas/ not shipped to workers: {missing}"
    # Nothing the workers do not need (tests, images, notebooks) is staged with every job, and the schema once.
    assert not [m for m in members if m.startswith(("tests/", "examples/", "benchmarks/", "docker/", "schemas/"))]


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
    expected = {m for m in members if m.endswith(".py") and m.startswith("beam_job/")}
    assert installed == expected and not (target / "schemas").exists()
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


def test_schemas_package_is_a_link_to_the_top_level_schemas_folder():
    """Tools that read imports (and readers of the tree) find beam_job.schemas where its name says."""
    link = ROOT / "beam_job" / "schemas"
    assert link.is_symlink() and link.resolve() == (ROOT / "schemas").resolve()
    assert (link / "delg_v1.py").is_file()


def _copy_installed(name, site):
    """Put an installed distribution's files into another venv's site-packages (what `pip install NAME` leaves
    there), offline: the fresh venv gets `wheel` the way TensorFlow's requirements bring it in."""
    dist = importlib.metadata.distribution(name)
    for file in dist.files:
        source = pathlib.Path(dist.locate_file(file))
        if ".." in file.parts or "__pycache__" in file.parts or not source.is_file():
            continue  # scripts in bin/, bytecode
        (site / file).parent.mkdir(parents=True, exist_ok=True)
        (site / file).write_bytes(source.read_bytes())


def _spec(python, module, cwd):
    """(origin, files of the package folder) of `module` as `python` finds it, run from `cwd` (not the checkout)."""
    code = (f"import importlib.util, os; s = importlib.util.find_spec({module!r}); "
            "print(s.origin); print(*sorted(os.listdir(s.submodule_search_locations[0])))")
    out = subprocess.run([python, "-c", code], cwd=cwd, capture_output=True, text=True, check=True).stdout
    origin, files = out.splitlines()
    return pathlib.Path(origin), set(files.split())


def test_fresh_venv_with_its_own_pip_installs_editable_and_not(sdist, tmp_path):
    """A fresh `python -m venv` with the pip it ships (23.x for Python 3.11) and `wheel` installed: without
    pyproject.toml's build system pip took `setup.py develop`, and `import beam_job.schemas` failed. Offline:
    --no-index --no-deps --no-build-isolation (the venv's own setuptools builds; build isolation would fetch one
    from PyPI, which the acceptance check `pip install -e .` does)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = pathlib.Path(subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    for name in ("wheel", "packaging"):  # wheel and its one requirement
        _copy_installed(name, site)
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    schema_files = {"__init__.py", "delg_v1.py", "README.md"}

    subprocess.run([*pip, "-e", str(ROOT)], check=True, capture_output=True, timeout=180)
    origin, files = _spec(python, "beam_job.schemas", elsewhere)
    assert origin == ROOT / "beam_job" / "schemas" / "__init__.py" and schema_files <= files
    assert (venv / "bin" / "delg-extract").exists() and (venv / "bin" / "delg-retrieval").exists()

    subprocess.run([*pip, str(sdist)], check=True, capture_output=True, timeout=180)
    origin, files = _spec(python, "beam_job.schemas", elsewhere)
    assert origin == site / "beam_job" / "schemas" / "__init__.py" and schema_files <= files
    assert not (site / "schemas").exists()


@pytest.mark.parametrize("script", ["delg-extract", "delg-retrieval"])
def test_console_scripts_print_the_version(script, tmp_path):
    """The console scripts installed next to this interpreter (the project's venv) run from any directory."""
    version = re.search(r'__version__ = "([^"]+)"', (ROOT / "beam_job/__init__.py").read_text()).group(1)
    out = subprocess.run([str(pathlib.Path(sys.executable).parent / script), "--version"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == version, out.stderr[-2000:]
