# The development environment, sourced (from the repository root) by scripts/test.sh and .ci/run:
# the Debian packages the tests and the lint need, and .venv with requirements-dev.txt and the project (editable),
# left activated. Reinstalls only when the requirement files, setup.py or pyproject.toml changed (a stamp in .venv).
# shellcheck shell=bash
export NO_GCE_CHECK=true TF_CPP_MIN_LOG_LEVEL=2 PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian packages, only those missing, installed when this runs as root or with passwordless sudo; otherwise
# one line names them and the tests that need them fail saying so (none is skipped).
missing=()
command -v shellcheck >/dev/null || missing+=(shellcheck)
command -v chromium >/dev/null || missing+=(chromium)
command -v chromedriver >/dev/null || missing+=(chromium-driver)
# Flink runs on Java 11 or 17; Maven builds Beam's Flink job server once (flink/pom.xml).
command -v java >/dev/null || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || missing+=(maven)
if [ ${#missing[@]} -gt 0 ]; then
  as_root=
  if [ "$(id -u)" -ne 0 ]; then
    as_root="sudo -n"
  fi
  if command -v apt-get >/dev/null && { [ -z "$as_root" ] || sudo -n true 2>/dev/null; } \
     && $as_root apt-get update -q -q \
     && $as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -q "${missing[@]}" >/dev/null; then
    :
  else
    echo "dev_env.sh: could not install ${missing[*]} (needs apt-get as root or passwordless sudo); the tests that need them will fail" >&2
  fi
fi

# The venv and the requirements, reinstalled only when what they come from changed.
if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck source=/dev/null  # created above
. .venv/bin/activate
stamp=.venv/.delg-test-stamp
want=$( { pwd; python --version; cat requirements.txt requirements-dev.txt setup.py pyproject.toml; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "dev_env.sh: installing requirements-dev.txt and the project into .venv" >&2
  python -m pip install -q -r requirements-dev.txt
  # setuptools' editable build warns on every install (a notice about same-named folders): shown only on failure.
  if ! log=$(python -m pip install -q --no-deps -e . 2>&1); then
    echo "$log" >&2
    false
  fi
  echo "$want" >"$stamp"
fi
