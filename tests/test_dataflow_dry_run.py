"""run_dataflow.sh: Beam's offline Dataflow dry run builds the full job (CPU and GPU) and bad settings fail clearly."""

import json
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "run_dataflow.sh"
DOC = ROOT / "docs" / "dataflow.md"
IMAGE = "us-central1-docker.pkg.dev/test-project/delg/worker:test"


def _offline_env(tmp_path, **overrides):
    """A minimal environment: no credentials, GCS pointed at a closed loopback port, no metadata server.

    Any attempt of the launcher to reach GCS therefore fails at once on 127.0.0.1 instead of leaving the
    machine; a dry run must not need it.
    """
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "home"),
        "CLOUDSDK_CONFIG": str(tmp_path / "gcloud"),
        "NO_GCE_CHECK": "true",
        "GCE_METADATA_HOST": "127.0.0.1:9",
        "GCE_METADATA_IP": "127.0.0.1:9",
        "STORAGE_EMULATOR_HOST": "http://127.0.0.1:9",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHON": sys.executable,
        "PROJECT": "test-project",
        "REGION": "us-central1",
        "TEMP_LOCATION": "gs://test-bucket/dataflow/tmp",
        "INPUT": "gs://test-bucket/images/*.jpg",
        "OUTPUT": "gs://test-bucket/delg/run-1",
        "PRESET": "tiny",
        "CONTAINER_IMAGE": IMAGE,
    }
    env.update({k: v for k, v in overrides.items() if v is not None})
    for k in [k for k, v in overrides.items() if v is None]:
        env.pop(k, None)
    return env


def _run(env, *args, timeout=240):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=str(ROOT), env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def _dry_run(tmp_path, *args, **overrides):
    report_path = tmp_path / "report.json"
    env = _offline_env(tmp_path, DRY_RUN="1", DRY_RUN_REPORT=str(report_path), **overrides)
    proc = _run(env, *args)
    assert proc.returncode == 0, f"dry run failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(report_path.read_text()), proc


def _documented_transforms():
    """Every "N transforms" figure docs/dataflow.md states (the job graph's size in the dry run)."""
    return [int(n) for n in re.findall(r"\b(\d+) transforms\b", DOC.read_text())]


def _check_documented_transforms(report):
    figures = _documented_transforms()
    assert figures, f"{DOC.relative_to(ROOT)} states no 'N transforms' figure"
    assert set(figures) == {report["transforms"]}, (
        f"{DOC.relative_to(ROOT)} says {sorted(set(figures))} transforms, the dry run builds "
        f"{report['transforms']}: update the page"
    )


FILE_IMAGE = "us-central1-docker.pkg.dev/test-project/delg/worker:from-env-file"


@pytest.fixture(scope="module")
def cpu_dry_run(tmp_path_factory):
    """The CPU dry run with a container image, run once for the tests that read it.

    It also reads an ENV_FILE whose MACHINE_TYPE and CONTAINER_IMAGE the environment of the call overrides
    (n2-highmem-4 and IMAGE win), while its NUM_WORKERS, which the environment does not set, applies.
    """
    tmp_path = tmp_path_factory.mktemp("cpu")
    env_file = tmp_path / "cpu.env"
    env_file.write_text(f"MACHINE_TYPE=n2-highmem-8\nCONTAINER_IMAGE={FILE_IMAGE}\nNUM_WORKERS=3\n")
    # Extra arguments pass through to the job (after the generated flags).
    return _dry_run(tmp_path, "--labels=team=vision", "--disk_size_gb=77",
                    MACHINE_TYPE="n2-highmem-4", MAX_NUM_WORKERS="7", ENV_FILE=str(env_file))


def test_script_syntax():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    assert os.access(SCRIPT, os.X_OK), "run_dataflow.sh must be executable"


SHELL_SCRIPTS = [SCRIPT, ROOT / ".ci" / "run", *sorted((ROOT / "scripts").glob("*.sh"))]


def test_shellcheck_clean():
    """Every shell script of the repository is shellcheck-clean; a missing shellcheck fails (.ci/run installs it)."""
    assert shutil.which("shellcheck"), "shellcheck is not installed: apt-get install -y shellcheck (.ci/run does)"
    proc = subprocess.run(["shellcheck", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_cpu_dry_run_builds_the_job_offline(cpu_dry_run):
    report, proc = cpu_dry_run
    opts = report["options"]
    assert opts["runner"] == "DataflowRunner" and opts["dry_run"] in (True, "True")
    assert opts["project"] == "test-project" and opts["region"] == "us-central1"
    assert opts["sdk_container_image"] == IMAGE and opts["sdk_location"] == "container"
    # The image holds the package and its dependencies: nothing to build, stage or pip-install at worker start.
    assert "setup_file" not in opts and "requirements_file" not in opts and "extra_packages" not in opts
    assert opts["job_name"].startswith("delg-extract-cpu-") and opts["job_name"] == report["job_name"]
    # The Dataflow request Beam would send: one worker pool on the machine type, running our image.
    (pool,) = report["environment"]["workerPools"]
    assert pool["machineType"] == "n2-highmem-4"
    assert pool["autoscalingSettings"]["maxNumWorkers"] == 7
    assert pool["numThreadsPerWorker"] == 1
    assert pool["diskSizeGb"] == 77 and opts["labels"] == ["team=vision"]
    assert [i["containerImage"] for i in pool["sdkHarnessContainerImages"]] == [IMAGE]
    assert report["container_images"] == [IMAGE]
    assert not report["environment"].get("serviceOptions"), "CPU jobs must not ask for accelerators"
    assert "no_use_multiple_sdk_containers" not in report["environment"]["experiments"]
    assert "workflow.tar.gz" not in report["staged_artifacts"] and report["setup_package_members"] == []
    assert not [name for name in report["staged_artifacts"] if name.endswith((".tar.gz", ".whl", ".zip"))]
    # The job graph is the real one (reading, inference, writing), not a stub.
    assert report["transforms"] > 10
    names = " ".join(report["transform_names"])
    assert "Extract" in names and "WriteFeatures" in names and "WriteFailures" in names, names
    assert "dry run OK" in proc.stderr
    # The job's own flags are Beam pipeline options (DelgOptions): the job Dataflow receives lists them.
    assert opts["output"] == "gs://test-bucket/delg/run-1" and opts["preset"] == "tiny"
    assert opts["input"] == ["gs://test-bucket/images/*.jpg"]


def test_command_line_wins_over_the_env_file_in_the_dry_run(cpu_dry_run):
    """MACHINE_TYPE=... CONTAINER_IMAGE=... ENV_FILE=f ./run_dataflow.sh: the variables of the call win over f's;
    f's value of a variable the call does not set (NUM_WORKERS) still applies."""
    report, proc = cpu_dry_run
    (pool,) = report["environment"]["workerPools"]
    assert pool["machineType"] == "n2-highmem-4", "the env file's n2-highmem-8 overrode the command line's"
    assert report["container_images"] == [IMAGE] and FILE_IMAGE not in json.dumps(report)
    assert report["options"]["num_workers"] == 3 and pool["numWorkers"] == 3
    assert "(cpu, n2-highmem-4, " + IMAGE + ")" in proc.stderr


def _printed_command(tmp_path, env_file_text, **overrides):
    """PRINT_COMMAND=1: the command the script would run, split back into its arguments (no job is built)."""
    env_file = tmp_path / "job.env"
    env_file.write_text(env_file_text)
    proc = _run(_offline_env(tmp_path, PRINT_COMMAND="1", ENV_FILE=str(env_file), **overrides), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 1, (proc.stdout, proc.stderr)
    return shlex.split(proc.stdout)


def test_every_variable_of_the_call_wins_over_the_env_file(tmp_path):
    """The precedence holds for any variable, not a list: the call's values win, an empty one included."""
    env_file_text = (
        "PROJECT=file-project\nREGION=europe-west1\nMACHINE_TYPE=n2-highmem-8\n"
        f"CONTAINER_IMAGE={FILE_IMAGE}\nMAX_NUM_WORKERS=20\nJOB_NAME=from-file\nLABELS=from=file\n"
        "NUM_WORKERS=3\nSUBNETWORK=regions/europe-west1/subnetworks/file\nDRY_RUN=1\n"
    )
    argv = _printed_command(tmp_path, env_file_text, MACHINE_TYPE="n2-standard-8", JOB_NAME="from-call",
                            MAX_NUM_WORKERS="5", LABELS="from=call", CONTAINER_IMAGE="", DRY_RUN="0")
    assert argv[:3] == [sys.executable, "-m", "beam_job"], "DRY_RUN=0 of the call must win over the file's 1"
    flags = argv[3:]
    # From the call (PROJECT and REGION are set by _offline_env too).
    assert "--project=test-project" in flags and "--region=us-central1" in flags
    assert "--machine_type=n2-standard-8" in flags and "--job_name=from-call" in flags
    assert "--max_num_workers=5" in flags and "--labels=from=call" in flags
    # CONTAINER_IMAGE= (empty) in the call drops the file's image: the no-container path.
    assert not [f for f in flags if f.startswith("--sdk_container_image")]
    assert f"--setup_file={ROOT / 'setup.py'}" in flags
    # From the file, where the call is silent.
    assert "--num_workers=3" in flags and "--subnetwork=regions/europe-west1/subnetworks/file" in flags
    assert [f for f in flags if f.startswith(("--project=", "--region="))] == ["--project=test-project",
                                                                              "--region=us-central1"]


def test_env_file_fills_in_what_the_call_does_not_set(tmp_path):
    """Without the variables in the call, the env file's MACHINE_TYPE and CONTAINER_IMAGE apply (and DRY_RUN=1)."""
    env_file_text = f"MACHINE_TYPE=n2-highmem-16\nCONTAINER_IMAGE={FILE_IMAGE}\nDRY_RUN=1\n"
    argv = _printed_command(tmp_path, env_file_text, CONTAINER_IMAGE=None)
    assert argv[:2] == [sys.executable, str(ROOT / "dataflow" / "dry_run.py")] and "--dry_run=True" in argv
    assert "--machine_type=n2-highmem-16" in argv
    assert f"--sdk_container_image={FILE_IMAGE}" in argv and "--sdk_location=container" in argv


def test_docs_state_the_dry_runs_transform_count(cpu_dry_run):
    """docs/dataflow.md quotes the job graph's size: it must be the one the dry run builds now."""
    _check_documented_transforms(cpu_dry_run[0])


def test_cpu_dry_run_without_a_container_stages_the_package(tmp_path):
    """The no-container path: Beam's default worker image installs the sdist and requirements.txt at start."""
    report, proc = _dry_run(tmp_path, CONTAINER_IMAGE=None)
    opts = report["options"]
    assert "sdk_container_image" not in opts and opts.get("sdk_location", "default") != "container"
    assert opts["setup_file"] == str(ROOT / "setup.py")
    assert opts["requirements_file"] == str(ROOT / "requirements.txt") and opts["requirements_cache"] == "skip"
    # The setup.py sdist was really built and staged as the workflow package, with the job inside it.
    assert report["staged_artifacts"]["workflow.tar.gz"].endswith(".tar.gz")
    assert report["staged_artifacts"]["requirements.txt"] == str(ROOT / "requirements.txt")
    members = report["setup_package_members"]
    for needed in ("setup.py", "requirements.txt", "beam_job/cli.py", "beam_job/pipeline/__init__.py",
                   "beam_job/schemas/delg_v1.py"):
        assert needed in members
    assert "no container" in proc.stderr


def test_gpu_dry_run_adds_accelerator_and_one_process_per_vm(tmp_path):
    report, _ = _dry_run(tmp_path, MODE="gpu", GPU_TYPE="nvidia-tesla-t4", GPU_COUNT="2", MACHINE_TYPE="n1-highmem-8",
                         JOB_NAME="delg-gpu-test", MODEL="/opt/delg/models/tiny")
    env = report["environment"]
    assert env["serviceOptions"] == ["worker_accelerator=type:nvidia-tesla-t4;count:2;install-nvidia-driver"]
    assert "no_use_multiple_sdk_containers" in env["experiments"]
    (pool,) = env["workerPools"]
    assert pool["machineType"] == "n1-highmem-8"
    assert pool["numThreadsPerWorker"] == 1
    (image,) = pool["sdkHarnessContainerImages"]
    assert image["containerImage"] == IMAGE and image["useSingleCorePerContainer"] is True
    assert report["job_name"] == "delg-gpu-test"
    # The CUDA image needs disk room: GPU runs always ask for a disk size (100 GB unless DISK_SIZE_GB says).
    assert pool["diskSizeGb"] == 100 and report["options"]["disk_size_gb"] == 100
    assert "setup_file" not in report["options"] and "workflow.tar.gz" not in report["staged_artifacts"]
    _check_documented_transforms(report)  # the page's figure holds for GPU jobs too


@pytest.mark.parametrize(
    "missing, message",
    [
        ("PROJECT", "missing required variable PROJECT"),
        ("REGION", "missing required variable REGION"),
        ("TEMP_LOCATION", "missing required variable TEMP_LOCATION"),
        ("OUTPUT", "missing required variable OUTPUT"),
        ("INPUT", "missing required variable INPUT or MANIFEST"),
    ],
)
def test_missing_variable_is_one_clear_line(tmp_path, missing, message):
    env = _offline_env(tmp_path, DRY_RUN="1", **{missing: None})
    proc = _run(env, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("run_dataflow.sh: ") and message in lines[0], proc.stderr


def test_gpu_mode_needs_a_container_image(tmp_path):
    """CONTAINER_IMAGE is optional on CPU (the --setup_file path) but the GPU mode cannot run without its image."""
    proc = _run(_offline_env(tmp_path, DRY_RUN="1", MODE="gpu", CONTAINER_IMAGE=None), timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "missing required variable CONTAINER_IMAGE: MODE=gpu needs the CUDA worker image" in lines[0]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"TEMP_LOCATION": "/tmp/local"}, "TEMP_LOCATION must be a gs:// path"),
        ({"OUTPUT": "out/"}, "OUTPUT must be a gs:// path"),
        ({"INPUT": "images/*.jpg"}, "INPUT must be on gs://"),
        ({"MODEL": "models/tiny"}, "MODEL must be gs://"),
        ({"MODEL": "/opt/delg/models/tiny", "CONTAINER_IMAGE": None}, "set CONTAINER_IMAGE to the image it was baked"),
        ({"MODE": "tpu"}, "MODE must be cpu or gpu"),
        ({"MODE": "gpu", "MACHINE_TYPE": "n1-standard-8"}, "nvidia-l4 needs a G2 MACHINE_TYPE"),
        ({"MAX_NUM_WORKERS": "ten"}, "MAX_NUM_WORKERS must be a positive integer"),
        ({"JOB_NAME": "My_Job"}, "JOB_NAME must be lowercase"),
        ({"CONTAINER_PYTHON": "3.10"}, "launcher has Python/Beam"),
    ],
)
def test_invalid_setting_is_one_clear_line(tmp_path, overrides, message):
    proc = _run(_offline_env(tmp_path, DRY_RUN="1", **overrides), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_env_file_is_read(tmp_path):
    env_file = tmp_path / "job.env"
    env_file.write_text("MODE=gpu\nMACHINE_TYPE=n2-standard-8\n")
    proc = _run(_offline_env(tmp_path, DRY_RUN="1", ENV_FILE=str(env_file)), timeout=60)
    # Read from the file: the GPU/machine mismatch it contains is reported.
    assert proc.returncode == 2 and "needs a G2 MACHINE_TYPE (e.g. g2-standard-8), got 'n2-standard-8'" in proc.stderr


def test_official_preset_without_model_fails_before_building(tmp_path):
    """The job's own validation runs in the dry run too: an official preset needs MODEL."""
    proc = _run(_offline_env(tmp_path, DRY_RUN="1", PRESET="r50_gldv2clean"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "preset 'r50_gldv2clean' has no model: pass --model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_beam_option_validation_error_is_one_line(tmp_path):
    proc = _run(_offline_env(tmp_path, DRY_RUN="1", PROJECT="p"), timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("delg-extract: error:")]
    assert len(errors) == 1 and "Invalid Project ID (p)" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
