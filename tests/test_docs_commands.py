"""The README's and docs' bash command blocks run as written (tiny model, examples/ photos, offline), so they
cannot drift from the code; every command there is either run here or listed below with why it cannot be.

Each command of a fenced ```bash block (backslash continuations joined, comments dropped) is known by its
words (`command_key`). RUN lists, in order, the commands this test runs in a scratch folder holding copies of
examples/ and dataflow/: later commands use what earlier ones wrote, as a reader following the page would.
Before running, TINY (and PER_COMMAND) substitutions make a command fit here: the tiny preset for the embedded
one, the examples/ photos for `photos/`. `delg-extract`, `python -m beam_job` and `delg-retrieval` run in this
process (bash expands their words, so quoting and globs behave as in a shell; TensorFlow is imported once);
anything else runs in bash. Commands that cannot run here are matched by NOT_RUN (a prefix of their words)
with the reason. A command in neither fails `test_every_doc_command_is_run_or_listed_as_not_runnable`.
Everything the commands write must be ignored by git (doc commands write into out/, never into tracked files).
"""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
_FENCE = re.compile(r"^([ \t]*)```bash\n(.*?)^\1```", re.S | re.M)


def doc_commands():
    """[(doc file, command text)] of every fenced bash block, continuation lines joined, comment lines dropped."""
    out = []
    for name in DOC_FILES:
        with open(os.path.join(REPO, name), encoding="utf-8") as fh:
            text = fh.read()
        for block in _FENCE.finditer(text):
            indent = block.group(1)
            lines = [ln[len(indent):] if ln.startswith(indent) else ln for ln in block.group(2).splitlines()]
            joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
            out += [(name, ln.strip()) for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    return out


def command_key(command):
    """A command's words, without its comment: how RUN and NOT_RUN name it."""
    return " ".join(shlex.split(command, comments=True))


# Commands run here, in this order: (doc file, command key).
RUN = [
    ("README.md", "delg-extract --manifest examples/manifest.csv --output out/demo --preset embedded"),
    ("README.md", "python -m beam_job --input photos/*.jpg --output out/photos --preset embedded "
                  "--direct_num_workers=2 --direct_running_mode=multi_processing"),
    ("README.md", "delg-extract --list_presets"),
    ("README.md", "cp dataflow/cpu.env.example dataflow/cpu.env"),
    ("README.md", "DRY_RUN=1 ENV_FILE=dataflow/cpu.env ./run_dataflow.sh"),
    ("docs/dataflow.md", "MACHINE_TYPE=n2-standard-8 DRY_RUN=1 ENV_FILE=dataflow/cpu.env ./run_dataflow.sh"),
    ("README.md", "delg-retrieval build out/photos out/index/"),
    ("README.md", "delg-retrieval query out/index/ --image query.jpg --k 100 --rerank 100 --output out/results.csv"),
    ("README.md", "delg-retrieval draw-matches out/index/ query.jpg <image_id> --out out/match.png"),
    ("docs/pipeline.md", "delg-extract --input photos/*.jpg --output out/ --preset embedded --direct_num_workers=2 "
                         "--direct_running_mode=multi_processing"),
    ("docs/pipeline.md", "delg-extract presets"),
    ("docs/pipeline.md", "delg-extract --manifest out/failures/*.parquet --output out/ --preset embedded "
                         "--skip_existing"),
    ("docs/report.md", "delg-retrieval build out/demo out/demo-index --kind flat"),
    ("docs/report.md", "printf query_id,image_id\\nastronaut,astronaut\\ncoffee,coffee\\nchelsea,chelsea\\n"
                       "rocket,rocket\\n > out/demo-queries.csv"),
    ("docs/report.md", "printf id,images\\nastronaut,astronaut\\ncoffee,coffee\\nchelsea,chelsea\\nrocket,rocket\\n > "
                       "out/demo-solution.csv"),
    ("docs/report.md", "delg-retrieval query out/demo-index --queries out/demo-queries.csv --k 3 --rerank 3 "
                       "--keep_self --output out/demo-results.parquet"),
    ("docs/report.md", "delg-retrieval report out/demo-results.parquet --index out/demo-index --queries "
                       "out/demo-queries.csv --gnd out/demo-solution.csv --k 2 --max_queries 2 --out out/demo-pages"),
    ("docs/report.md", "delg-extract report out/demo"),
]

# Applied to every command run here, where they occur.
TINY = [
    ("--preset embedded", "--preset tiny"),  # the embedded R50 takes 15-20 s a photo here; tiny, milliseconds
    ("'photos/*.jpg'", "'examples/images/*.jpg'"),  # the reader's photos: the repository's example photos
    ("query.jpg", "examples/images/coffee.jpg"),
    # Two worker processes import TensorFlow each (about 30 s here): two threads instead, same flags.
    ("--direct_running_mode=multi_processing", "--direct_running_mode=multi_threading"),
]
# Placeholders a reader fills in: what they stand for here.
PER_COMMAND = {
    "delg-retrieval draw-matches out/index/ query.jpg <image_id> --out out/match.png":
        [("<image_id>", "IMAGE_ID_OF_ASTRONAUT")],
}

# Commands not run here: the first words of the command -> why.
NOT_RUN = {
    "bash scripts/quickstart.sh": "creates .venv and installs the requirements from PyPI (network, minutes); the "
                                  "extraction it runs is README's delg-extract --manifest examples/manifest.csv",
    "python3 -m venv": "creates a virtual environment to install into; the test environment is one",
    "pip install": "installs packages (network); the test environment has them",
    "bash .ci/run": "CI itself (apt, a fresh venv, the whole suite)",
    "bash scripts/test.sh": "the test suite itself, of which this test is part",
    "curl ": "downloads the official weights (network, 0.1-0.4 GB)",
    "tar xzf": "unpacks the downloaded official weights",
    "gsutil ": "copies to a Cloud Storage bucket (credentials, network)",
    "gcloud ": "Google Cloud set-up (credentials, network)",
    "docker ": "builds or runs the worker images (Docker daemon, network; see tests/test_docker_images.py)",
    "REPO=": "names the Artifact Registry repository for the docker commands",
    "delg-extract --preset r50_gldv2clean": "needs the official weights (downloaded)",
    "python -m beam_job --preset r50_gldv2clean": "needs the official weights (downloaded)",
    "delg-extract --input photos/*.jpg --output out/ --preset r50_gldv2clean": "needs the official weights",
    "python -m beam_job ...": "a placeholder for the command above it",
    "ENV_FILE=dataflow/cpu.env ./run_dataflow.sh": "submits a Dataflow job (a GCP project, credentials)",
    "ENV_FILE=dataflow/gpu.env ./run_dataflow.sh": "submits a Dataflow job on GPU workers (a GCP project)",
    "PROJECT=my-project": "submits a Dataflow job (a GCP project, credentials)",
    "python scripts/flink_cluster.py": "a Flink cluster (Java, Maven, minutes; tests/test_flink.py runs one)",
    "python -m beam_job --input photos/*.jpg --output out/flink": "needs the Flink cluster started above",
    "python benchmarks/": "benchmarks: minutes of CPU, and timings are never asserted in tests",
    "TF_NUM_INTRAOP_THREADS=1 python benchmarks/": "benchmarks: minutes of CPU, and timings are never asserted",
    "delg-retrieval eval-revisitop rox.parquet gnd_roxford5k.pkl": "needs Revisited Oxford's ground truth "
                                                                   "(downloaded) and its rankings",
    "delg-retrieval report rox.parquet": "needs Revisited Oxford's rankings and ground truth (downloaded)",
    "delg-extract report gs://bucket/out": "needs a Cloud Storage bucket",
    "delg-retrieval query index/ --queries queries.csv --k 100": "a template (queries.csv is the reader's); the same "
                                                                 "command runs on the demo in docs/report.md",
    "delg-retrieval report results.parquet --index index/": "the reader's results and index (docs/report.md's "
                                                           "template of the options, docs/retrieval.md's tour); "
                                                           "docs/report.md's demo report runs here",
    # docs/retrieval.md: the whole tour on the reader's official-model features (ids img-001..., Revisited Oxford).
    "delg-retrieval build out/ index/": "the tour of docs/retrieval.md on official-model features of the reader's "
                                        "photos; README's retrieval block runs the same commands on the examples",
    "delg-retrieval query index/": "the tour of docs/retrieval.md (the reader's ids img-001..., queries.csv, "
                                   "Revisited Oxford files); README's and docs/report.md's queries run here",
    "delg-retrieval revisitop-queries gnd_roxford5k.pkl": "needs Revisited Oxford's ground truth and photos",
    "delg-retrieval eval-gldv2 results.parquet retrieval_solution.csv": "needs GLDv2's retrieval solution",
    "delg-retrieval draw-matches index/ query.jpg img-042": "the tour of docs/retrieval.md (the reader's ids); "
                                                            "README's draw-matches runs here",
    "delg-retrieval contact-sheet index/ img-001": "the tour of docs/retrieval.md (the reader's ids)",
}


def _not_run_reason(key):
    return next((why for prefix, why in NOT_RUN.items() if key.startswith(prefix)), None)


def test_every_doc_command_is_run_or_listed_as_not_runnable():
    commands = doc_commands()
    assert len(commands) > 40, "the fenced bash blocks were not found"
    keys = {(name, command_key(cmd)) for name, cmd in commands}
    unlisted = sorted(f"{name}: {key}" for name, key in keys if (name, key) not in RUN and not _not_run_reason(key))
    assert not unlisted, ("doc commands neither run by this test nor listed in NOT_RUN (run it on tiny data, or "
                          f"say why it cannot run here): {unlisted}")
    both = sorted(f"{name}: {key}" for name, key in RUN if _not_run_reason(key))
    assert not both, f"listed as run and as not runnable: {both}"
    stale = [entry for entry in RUN if entry not in keys]
    assert not stale, f"RUN names commands no doc has any more: {stale}"
    unused = [prefix for prefix in NOT_RUN if not any(key.startswith(prefix) for _, key in keys)]
    assert not unused, f"NOT_RUN names commands no doc has any more: {unused}"
    for key, substitutions in PER_COMMAND.items():
        assert any(k == key for _, k in RUN), key
        assert all(old in key for old, _ in substitutions), key


def _offline_env(workdir):
    """No credentials, Cloud Storage and the metadata server on a closed loopback port: nothing leaves."""
    env = dict(os.environ)
    env.update({
        "PATH": os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
        "PYTHON": sys.executable,
        "CLOUDSDK_CONFIG": str(workdir / ".gcloud"),
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    return env


def _workdir(tmp_path):
    """A scratch copy of what the commands read: examples/ and dataflow/ copied, run_dataflow.sh and the files
    it stages linked."""
    work = tmp_path / "repo"
    work.mkdir()
    shutil.copytree(os.path.join(REPO, "examples"), work / "examples")
    shutil.copytree(os.path.join(REPO, "dataflow"), work / "dataflow",
                    ignore=shutil.ignore_patterns("__pycache__", "*.env"))
    for name in ("run_dataflow.sh", "setup.py", "requirements.txt"):
        os.symlink(os.path.join(REPO, name), work / name)
    (work / ".gcloud").mkdir()
    return work


def _files(root):
    return {os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files}


def _in_process(words, capsys):
    """Run one of our console commands in this process; its exit status and what it printed."""
    from beam_job import cli
    from beam_job.report import retrieval

    if words[0] == "delg-extract":
        status = cli.main(words[1:])
    elif words[:3] == ["python", "-m", "beam_job"]:
        status = cli.main(words[3:])
    else:
        status = retrieval.main(words[1:])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


@pytest.mark.slow  # about 45 s: jobs, retrieval, reports, two dry runs (the listing check above is fast)
def test_the_doc_commands_run_as_written(tmp_path, monkeypatch, capsys):
    from beam_job.pipeline.inputs import derive_image_id

    work = _workdir(tmp_path)
    before = _files(work)
    env = _offline_env(work)
    monkeypatch.chdir(work)
    by_key = {(name, command_key(cmd)): cmd for name, cmd in doc_commands()}
    ours = ("delg-extract ", "delg-retrieval ", "python -m beam_job ")
    for name, key in RUN:
        command = by_key[(name, key)]
        for old, new in TINY + PER_COMMAND.get(key, []):
            command = command.replace(old, new)
        command = command.replace("IMAGE_ID_OF_ASTRONAUT", derive_image_id("examples/images/astronaut.jpg"))
        if command.startswith(ours) and not re.search(r"[|;&<>]", command.split(" #")[0]):
            # bash makes the words (quotes, globs) as for the real command; the command runs here.
            expanded = subprocess.run(["bash", "-c", "printf '%s\\0' " + command], cwd=work, env=env,
                                      capture_output=True, check=True).stdout.decode()
            status, output = _in_process(expanded.split("\0")[:-1], capsys)
        else:
            proc = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True,
                                  timeout=300)
            status, output = proc.returncode, proc.stdout + proc.stderr
        assert status == 0, f"{name}: {command}\nexit status {status}:\n{output[-3000:]}"

    assert (work / "out" / "demo" / "_SUCCESS").exists() and (work / "out" / "match.png").exists()
    assert (work / "out" / "demo-pages" / "index.html").exists()
    written = sorted(_files(work) - before)
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=REPO, input="\n".join(written),
                             capture_output=True, text=True).stdout.split()
    assert written and not set(written) - set(ignored), (
        f"doc commands wrote files git does not ignore (write under out/): {sorted(set(written) - set(ignored))}")
