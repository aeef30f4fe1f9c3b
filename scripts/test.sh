#!/usr/bin/env bash
# The project's test command (README: "Run the tests"), self-sufficient on a fresh clone with no venv active:
#   1. the Debian packages some tests need (shellcheck, chromium + chromium-driver, Java + Maven for Flink),
#      installed when missing and this runs as root or with passwordless sudo; otherwise one line names them
#      and the tests that need them fail saying so (no test is skipped);
#   2. .venv (created with python3 when missing), requirements-dev.txt and the project (editable), installed
#      only when the requirement files, setup.py or pyproject.toml changed since the last install (a stamp);
#   3. Flink's distribution and Beam's job server (scripts/flink_cluster.py prepare, cached) when the selected
#      tests include the flink ones;
#   4. pytest, with this script's arguments passed through (none: the whole suite, tests/).
# Fast tier (the edit-test loop): bash scripts/test.sh -m "not slow and not flink"
#   (312 tests, 65-70 s on 2 cores of an "Intel(R) Xeon(R) Processor", load average 1.1-1.6 from other work)
# One file:                        bash scripts/test.sh tests/test_report.py
# Offline once set up; the whole suite takes about 10 minutes on 2 cores, the Flink tests about 5 of them.
set -euo pipefail
cd "$(dirname "$0")/.."

# 1-2. The Debian packages and the venv (activated here).
# shellcheck source=scripts/dev_env.sh
. scripts/dev_env.sh

# 3. Flink's artifacts, when the flink tests are among the selected ones (fetched and built once per machine,
# then cached: ~/.cache/delg-beam/flink, ~/.m2).
# Named files other than tests/test_flink.py, or a marker expression with "not flink", settle it without
# collecting; otherwise pytest's collection (a few seconds) says.
flink=maybe
case " $* " in *"not flink"*) flink=no ;; esac
if [ "$flink" = maybe ]; then
  files=0 folders=0
  for arg in "$@"; do
    case "$arg" in
      *test_flink.py*) flink=yes ;;
      *.py|*.py::*) files=$((files + 1)) ;;
      *) if [ -d "$arg" ]; then folders=$((folders + 1)); fi ;;
    esac
  done
  if [ "$flink" = maybe ] && [ "$files" -gt 0 ] && [ "$folders" -eq 0 ]; then
    flink=no
  fi
fi
if [ "$flink" = yes ] || { [ "$flink" = maybe ] \
    && python -m pytest --collect-only -q "$@" 2>/dev/null | grep -q '^tests/test_flink\.py::'; }; then
  python scripts/flink_cluster.py prepare
fi

# 4. The tests (pyproject.toml's testpaths: tests/ when no path is given).
exec python -m pytest -q "$@"
