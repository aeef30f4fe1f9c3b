"""Packaging for the DELG Beam job: ships `beam_job` (with `beam_job.schemas`, a link to the repository's
`schemas/` folder) to Dataflow workers (--setup_file without a container; the images install it too).
pyproject.toml names the build system (so pip builds the same way with or without `wheel` installed) and
holds the tools' settings; this file holds the metadata, because Beam's `--setup_file` runs it.

The version pins live in ONE place, requirements.txt (and requirements-dev.txt for the retrieval
extras); this file only reads them. TensorFlow is deliberately NOT an install requirement: Dataflow
workers `pip install` this package's sdist (with its dependencies) at start-up, and a hard
`tensorflow-cpu` pin would make pip download tensorflow-cpu on top of the CUDA build baked into the GPU
container. Pick the TensorFlow flavour with an extra instead:

    pip install ".[cpu]"   # tensorflow-cpu (local runs, CPU Dataflow container)
    pip install ".[gpu]"   # tensorflow[and-cuda], same version (GPU Dataflow container)
"""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "beam_job" / "__init__.py").read_text()).group(1)
TENSORFLOW_PACKAGES = ("tensorflow", "tensorflow-cpu")
# skimage: --ransac reference; scipy: .mat ground truth
RETRIEVAL_PACKAGES = ("faiss-cpu", "opencv-python-headless", "scikit-image", "scipy")


def _pins(name):
    """{distribution name (lower case): requirement line} for one requirements file (no -r includes)."""
    pins = {}
    for line in (HERE / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        dist = re.split(r"[\[=<>!~; ]", line, maxsplit=1)[0].lower()
        pins[dist] = line
    return pins


RUNTIME = _pins("requirements.txt")
DEV = _pins("requirements-dev.txt")
_tf = [RUNTIME[name] for name in TENSORFLOW_PACKAGES if name in RUNTIME]
if len(_tf) != 1 or "==" not in _tf[0]:
    raise RuntimeError("requirements.txt must pin exactly one TensorFlow package, e.g. tensorflow-cpu==2.21.0")
TF_VERSION = _tf[0].split("==", 1)[1].strip()

setup(
    name="delg-beam-job",
    version=VERSION,
    description="Distributed DELG (global + local) image feature extraction with Apache Beam",
    # beam_job/schemas is a link to the top-level schemas/ folder (schemas/README.md), so find_packages
    # finds beam_job.schemas where its name says and no generic top-level "schemas" module is installed.
    packages=find_packages(include=["beam_job", "beam_job.*"]),
    package_data={"beam_job.schemas": ["README.md"]},
    include_package_data=False,
    python_requires=">=3.10,<3.13",
    install_requires=[line for dist, line in RUNTIME.items() if dist not in TENSORFLOW_PACKAGES],
    extras_require={
        "cpu": [f"tensorflow-cpu=={TF_VERSION}"],
        "gpu": [f"tensorflow[and-cuda]=={TF_VERSION}"],
        "retrieval": [DEV[name] for name in RETRIEVAL_PACKAGES],
    },
    entry_points={"console_scripts": [
        "delg-extract=beam_job.cli:console_main",
        "delg-retrieval=beam_job.report.retrieval:main",  # the retrieval commands plus `report`
    ]},
)
