"""--version on both tools: the package version on stdout, exit 0, before the heavy imports (Beam, TensorFlow)."""

import pathlib
import subprocess
import sys

import pytest

import beam_job
from beam_job import cli
from beam_job.retrieval import cli as retrieval_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
BIN = pathlib.Path(sys.executable).parent
HEAVY = ("apache_beam", "tensorflow", "faiss", "cv2", "pyarrow")


def _run(*argv):
    return subprocess.run([*argv], cwd=str(ROOT), capture_output=True, text=True, timeout=120)


def _imported(stderr):
    """Top-level packages in `-X importtime`'s report."""
    lines = [line for line in stderr.splitlines() if line.startswith("import time:")]
    return {line.split("|")[-1].strip().split(".")[0] for line in lines}


@pytest.mark.parametrize(
    "module", ["beam_job", "beam_job.retrieval.cli"], ids=["python -m beam_job", "python -m beam_job.retrieval.cli"],
)
def test_module_entry_prints_the_version_before_heavy_imports(module):
    # -X importtime lists every module imported on stderr: the heavy ones must not be among them.
    proc = _run(sys.executable, "-X", "importtime", "-m", module, "--version")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == beam_job.__version__ + "\n"
    assert not _imported(proc.stderr) & set(HEAVY), sorted(_imported(proc.stderr) & set(HEAVY))


@pytest.mark.parametrize("tool", ["delg-extract", "delg-retrieval"])
def test_console_script_prints_the_version(tool):
    """The installed console scripts (setup.py entry points: beam_job.cli:console_main, retrieval.cli:main)."""
    script = BIN / tool
    assert script.exists(), f"{tool} is not installed next to {sys.executable}: pip install --no-deps -e ."
    proc = _run(str(script), "--version")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == beam_job.__version__ + "\n"


def test_version_wins_over_other_arguments(capsys):
    """Anywhere on the command line, as argparse's version action: nothing is parsed, validated or run."""
    assert cli.main(["--input", "missing/*.jpg", "--version"]) == 0
    assert capsys.readouterr().out == beam_job.__version__ + "\n"
    with pytest.raises(SystemExit) as exit_info:
        retrieval_cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == beam_job.__version__ + "\n"
    assert "--version" in retrieval_cli.build_parser().format_help()
