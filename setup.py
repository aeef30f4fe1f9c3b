"""Packaging for the DELG Beam job: ships `beam_job` and `schemas` to Dataflow workers (--setup_file)."""

import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(r'__version__ = "([^"]+)"', (HERE / "beam_job" / "__init__.py").read_text()).group(1)


def _requirements(name):
    lines = (HERE / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith(("#", "-r"))]


setup(
    name="delg-beam-job",
    version=VERSION,
    description="Distributed DELG (global + local) image feature extraction with Apache Beam",
    packages=find_packages(include=["beam_job", "beam_job.*", "schemas", "schemas.*"]),
    package_data={"schemas": ["README.md"]},
    python_requires=">=3.10,<3.13",
    install_requires=_requirements("requirements.txt"),
    extras_require={"retrieval": ["faiss-cpu==1.15.1", "opencv-python-headless==5.0.0.93"]},
    entry_points={"console_scripts": ["delg-extract=beam_job.cli:main", "delg-retrieval=beam_job.retrieval.cli:main"]},
)
