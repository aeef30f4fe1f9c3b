#!/usr/bin/env bash
# The project's test command (README: "Run the tests"). Offline; about 10 minutes on 2 cores, the Flink
# cluster tests (marker flink, about 5 minutes) included.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_GCE_CHECK=true TF_CPP_MIN_LOG_LEVEL=2
python -m pytest -q tests "$@"
