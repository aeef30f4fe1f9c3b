#!/usr/bin/env bash
# One command from a fresh clone: install into .venv, then run the job on the four demo photos in
# examples/images with the embedded (untrained) DELG model. Extra arguments go to delg-extract.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
# shellcheck source=/dev/null  # created above
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -e .
delg-extract --manifest examples/manifest.csv --output "${OUTPUT:-out/demo}" --preset embedded --overwrite "$@"
