#!/usr/bin/env bash
# Launch the DELG extraction job (python -m beam_job) on Google Cloud Dataflow, CPU or GPU workers.
#
# Driven by environment variables and/or ENV_FILE=dataflow/cpu.env (see dataflow/*.env.example; the
# environment wins, see "Precedence" below); arguments given to this script are passed through to the job
# after the generated flags.
#
# Required:
#   PROJECT          GCP project id
#   REGION           Dataflow region, e.g. us-central1
#   TEMP_LOCATION    gs:// folder for Beam's temporary and staging files
#   INPUT | MANIFEST image glob(s) (gs://bucket/images/*.jpg) and/or a manifest file (gs://...csv|txt)
#   OUTPUT           gs:// output folder for the Parquet shards, failures and run summary
#   CONTAINER_IMAGE  worker image built from docker/Dockerfile (cpu) or docker/Dockerfile.gpu (gpu, required):
#                    the package and every dependency are baked in, so workers install nothing at start
#                    (no --setup_file: starts without public IPs or NAT). Without it (cpu only) workers run
#                    Beam's default image and pip-install the staged sdist and requirements.txt from PyPI
#                    at start (--setup_file, --requirements_file): slower, and needs internet access.
# Optional (default):
#   MODE=cpu|gpu (cpu)          PRESET (r50_gldv2clean)
#   MODEL (the preset's): gs:// SavedModel dir or .tar.gz, http(s)://...tar.gz, embedded:<arch>, or a model
#                         baked into the image under /opt/delg/models/ (the launcher then skips its model check)
#   more --input patterns / any job or Beam flag: pass them as arguments to this script
#   MACHINE_TYPE (cpu: n2-highmem-8, gpu: g2-standard-8)      MAX_NUM_WORKERS (10)   NUM_WORKERS
#   GPU_TYPE (nvidia-l4)  GPU_COUNT (1)   HARNESS_THREADS (1)  JOB_NAME (delg-extract-MODE-UTC)
#   DISK_SIZE_GB (gpu: 100, room for the CUDA image; cpu: Dataflow's default)
#   STAGING_LOCATION  SERVICE_ACCOUNT  SUBNETWORK  NO_USE_PUBLIC_IPS=1  LABELS (k=v,k=v)
#   PYTHON (python3)  CONTAINER_PYTHON (3.11)  BEAM_VERSION (2.77.0): the launcher must match the image
#   DRY_RUN=1         build the whole job offline (Beam --dry_run=True), submit nothing
#   DRY_RUN_REPORT    with DRY_RUN=1: write the job that would be submitted (JSON) to this path
#   PRINT_COMMAND=1   check every variable, print the command that would run (one shell-quoted line), exit
#
# Precedence: a variable given on the command line (the environment of the call, e.g.
# MACHINE_TYPE=n2-standard-8 ENV_FILE=dataflow/cpu.env ./run_dataflow.sh) wins over the env file, for every
# variable; one set to '' there wins too (CONTAINER_IMAGE= drops the file's image). The file fills in the rest.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() {
  echo "run_dataflow.sh: $*" >&2
  exit 2
}

if [[ -n "${ENV_FILE:-}" ]]; then
  [[ -f "$ENV_FILE" ]] || die "ENV_FILE=$ENV_FILE does not exist"
  # The environment of the call wins over the file: remember every variable it sets (even to ''), source
  # the file, then put those values back. Indexed arrays and printf -v: bash 3.2 (macOS) runs this too.
  _given_names=()
  _given_values=()
  while IFS= read -r _name; do
    _given_names+=("$_name")
    _given_values+=("${!_name-}")
  done < <(compgen -e)
  set -a
  # shellcheck source=/dev/null
  . "$ENV_FILE"
  set +a
  for ((_i = 0; _i < ${#_given_names[@]}; _i++)); do
    _name=${_given_names[_i]}
    if [[ "${!_name-}" != "${_given_values[_i]}" ]]; then
      printf -v "$_name" '%s' "${_given_values[_i]}"
      export "${_name?}"
    fi
  done
  unset _given_names _given_values _name _i
fi

require() {  # require NAME "what it is, with an example"
  [[ -n "${!1:-}" ]] || die "missing required variable $1: $2"
}
require_gs() {
  require "$1" "$2"
  [[ "${!1}" == gs://?* ]] || die "$1 must be a gs:// path (Dataflow workers cannot reach local files), got '${!1}'"
}

require PROJECT "the GCP project id, e.g. PROJECT=my-project"
require REGION "the Dataflow region, e.g. REGION=us-central1"
require_gs TEMP_LOCATION "a gs:// folder for temporary and staging files, e.g. TEMP_LOCATION=gs://my-bucket/tmp"
require_gs OUTPUT "the gs:// output folder, e.g. OUTPUT=gs://my-bucket/delg/run1"
if [[ -z "${INPUT:-}" && -z "${MANIFEST:-}" ]]; then
  die "missing required variable INPUT or MANIFEST: set INPUT=gs://bucket/images/*.jpg and/or MANIFEST=gs://bucket/manifest.csv"
fi
for name in INPUT MANIFEST; do
  value=${!name:-}
  if [[ -n "$value" && "$value" != gs://* ]]; then
    die "$name must be on gs:// so that Dataflow workers can read it, got '$value'"
  fi
done
BAKED_MODELS=/opt/delg/models/  # where docker/Dockerfile* put baked-in models
case "${MODEL:-}" in
  "" | gs://?* | http://?* | https://?* | embedded:?* | "$BAKED_MODELS"?*) ;;
  *) die "MODEL must be gs://..., http(s)://...tar.gz, embedded:<arch> or a model baked into the image under $BAKED_MODELS, got '$MODEL'" ;;
esac

MODE=${MODE:-cpu}
case "$MODE" in
  cpu) default_machine=n2-highmem-8 ;;
  gpu) default_machine=g2-standard-8 ;;
  *) die "MODE must be cpu or gpu, got '$MODE'" ;;
esac
if [[ "$MODE" == gpu ]]; then
  require CONTAINER_IMAGE "MODE=gpu needs the CUDA worker image built from docker/Dockerfile.gpu, e.g. CONTAINER_IMAGE=us-central1-docker.pkg.dev/my-project/delg/worker-gpu:0.1.0"
  # The CUDA + TensorFlow image takes several GB unpacked on top of the boot disk's own use; do not rely on
  # Dataflow's batch default (25 GB with Dataflow Shuffle).
  DISK_SIZE_GB=${DISK_SIZE_GB:-100}
fi
if [[ -z "${CONTAINER_IMAGE:-}" && "${MODEL:-}" == "$BAKED_MODELS"* ]]; then
  die "MODEL=$MODEL lives in a worker image: set CONTAINER_IMAGE to the image it was baked into"
fi
MACHINE_TYPE=${MACHINE_TYPE:-$default_machine}
PRESET=${PRESET:-r50_gldv2clean}
MAX_NUM_WORKERS=${MAX_NUM_WORKERS:-10}
HARNESS_THREADS=${HARNESS_THREADS:-1}
GPU_TYPE=${GPU_TYPE:-nvidia-l4}
GPU_COUNT=${GPU_COUNT:-1}
PYTHON=${PYTHON:-python3}
CONTAINER_PYTHON=${CONTAINER_PYTHON:-3.11}
BEAM_VERSION=${BEAM_VERSION:-2.77.0}
JOB_NAME=${JOB_NAME:-delg-extract-${MODE}-$(date -u +%Y%m%d-%H%M%S)}

[[ "$JOB_NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] \
  || die "JOB_NAME must be lowercase letters, digits and '-', starting with a letter, got '$JOB_NAME'"
for name in MAX_NUM_WORKERS HARNESS_THREADS GPU_COUNT ${NUM_WORKERS:+NUM_WORKERS} ${DISK_SIZE_GB:+DISK_SIZE_GB}; do
  [[ "${!name}" =~ ^[1-9][0-9]*$ ]] || die "$name must be a positive integer, got '${!name}'"
done
if [[ "$MODE" == gpu ]]; then
  # Dataflow refuses these combinations only after the job is created; say it now.
  case "$GPU_TYPE" in
    nvidia-l4) [[ "$MACHINE_TYPE" == g2-* ]] || die "GPU_TYPE=nvidia-l4 needs a G2 MACHINE_TYPE (e.g. g2-standard-8), got '$MACHINE_TYPE'" ;;
    nvidia-tesla-t4) [[ "$MACHINE_TYPE" == n1-* ]] || die "GPU_TYPE=nvidia-tesla-t4 needs an N1 MACHINE_TYPE (e.g. n1-highmem-8), got '$MACHINE_TYPE'" ;;
  esac
fi

# The launcher pickles the pipeline for the workers: its Python minor version and Beam version must be
# the ones in the container, or workers fail at start-up long after submission.
launcher=$("$PYTHON" -c 'import sys, apache_beam; print("%d.%d %s" % (sys.version_info[0], sys.version_info[1], apache_beam.__version__))' 2>/dev/null) \
  || die "PYTHON=$PYTHON cannot import apache_beam: activate the project's virtualenv or set PYTHON"
[[ "$launcher" == "$CONTAINER_PYTHON $BEAM_VERSION" ]] \
  || die "launcher has Python/Beam '$launcher' but the container has '$CONTAINER_PYTHON $BEAM_VERSION' (set CONTAINER_PYTHON/BEAM_VERSION if you built another image)"

# ONE flag block for both modes; the worker environment and GPU mode append their settings below.
args=(
  --runner=DataflowRunner
  --project="$PROJECT"
  --region="$REGION"
  --temp_location="$TEMP_LOCATION"
  --job_name="$JOB_NAME"
  --machine_type="$MACHINE_TYPE"
  --max_num_workers="$MAX_NUM_WORKERS"
  --number_of_worker_harness_threads="$HARNESS_THREADS"
  --output="$OUTPUT"
  --preset="$PRESET"
)
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
  # Self-contained workers: the image holds Beam, TensorFlow and this package; nothing is staged or installed.
  args+=(--sdk_container_image="$CONTAINER_IMAGE" --sdk_location=container)
else
  # No image: workers install the package (sdist of setup.py) and its pins (TensorFlow included) from PyPI.
  args+=(--setup_file="$ROOT/setup.py" --requirements_file="$ROOT/requirements.txt" --requirements_cache=skip)
fi
[[ -n "${INPUT:-}" ]] && args+=(--input="$INPUT")
[[ -n "${MANIFEST:-}" ]] && args+=(--manifest="$MANIFEST")
[[ -n "${MODEL:-}" ]] && args+=(--model="$MODEL")
# A baked-in model exists only inside the worker image, not on the launcher: skip the launcher's model load.
[[ "${MODEL:-}" == "$BAKED_MODELS"* ]] && args+=(--skip_model_check)
[[ -n "${NUM_WORKERS:-}" ]] && args+=(--num_workers="$NUM_WORKERS")
[[ -n "${DISK_SIZE_GB:-}" ]] && args+=(--disk_size_gb="$DISK_SIZE_GB")
[[ -n "${STAGING_LOCATION:-}" ]] && args+=(--staging_location="$STAGING_LOCATION")
[[ -n "${SERVICE_ACCOUNT:-}" ]] && args+=(--service_account_email="$SERVICE_ACCOUNT")
[[ -n "${SUBNETWORK:-}" ]] && args+=(--subnetwork="$SUBNETWORK")
[[ "${NO_USE_PUBLIC_IPS:-0}" == 1 ]] && args+=(--no_use_public_ips)
[[ -n "${LABELS:-}" ]] && args+=(--labels="$LABELS")
if [[ "$MODE" == gpu ]]; then
  args+=(
    --dataflow_service_options="worker_accelerator=type:${GPU_TYPE};count:${GPU_COUNT};install-nvidia-driver"
    --experiments=no_use_multiple_sdk_containers  # one SDK process per VM: one TF runtime owns the GPU
  )
fi

# The checkout's beam_job wins over any installed copy: the launcher pickles what the image (built from this
# checkout) or the --setup_file sdist holds.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
  command=("$PYTHON" "$ROOT/dataflow/dry_run.py" "${args[@]}" --dry_run=True "$@")
  message="dry run of job $JOB_NAME ($MODE, $MACHINE_TYPE, ${CONTAINER_IMAGE:-no container: --setup_file}); nothing is submitted"
else
  command=("$PYTHON" -m beam_job "${args[@]}" "$@")
  message="submitting job $JOB_NAME ($MODE, $MACHINE_TYPE) to project $PROJECT, region $REGION"
fi
if [[ "${PRINT_COMMAND:-0}" == 1 ]]; then
  # The command with every setting resolved, shell-quoted on one line; nothing runs.
  printf '%q' "${command[0]}"
  printf ' %q' "${command[@]:1}"
  printf '\n'
  exit 0
fi
echo "run_dataflow.sh: $message" >&2
exec "${command[@]}"
