"""The embedded default model: our Keras DELG with fixed-seed (UNTRAINED) weights, exported once to a local cache.

`embedded_model_path(arch)` lets the job run with nothing downloaded. The features it gives are
deterministic but MEANINGLESS for retrieval; a WARNING says so every time a process first uses it, and
the output metadata records `untrained` (see beam_job.config presets "embedded" / "tiny").
"""

from __future__ import annotations

import hashlib
import logging
import os

from beam_job.config import ARCHITECTURES as _ARCHITECTURE_SPECS
from beam_job.delg.cache import SAVED_MODEL_FILE, build_once, default_cache_dir

logger = logging.getLogger(__name__)

ARCHITECTURES = tuple(_ARCHITECTURE_SPECS)  # the names embedded:<arch> accepts
# Bump when the export layout changes; the source hash below also invalidates the cache on model-code edits.
EMBEDDED_FORMAT_VERSION = 1
_MODEL_MODULES = ("architecture", "keras_model", "folded", "graph", "export")

OFFICIAL_MODELS_HINT = (
    "for real features download an official model, e.g. "
    "https://storage.googleapis.com/delf/r50delg_gldv2clean_20200914.tar.gz (preset r50_gldv2clean) or "
    "https://storage.googleapis.com/delf/r101delg_gldv2clean_20200914.tar.gz (preset r101_gldv2clean), "
    "and pass --preset r50_gldv2clean --model <that .tar.gz or its unpacked directory>"
)
UNTRAINED_WARNING = (
    "DELG model {what} has UNTRAINED fixed-seed random weights: its features are deterministic but "
    "MEANINGLESS for retrieval; " + OFFICIAL_MODELS_HINT
)

_warned: set[str] = set()


def _code_version() -> str:
    """Short hash of our model code and backbone table, so an edited architecture never reuses a stale export."""
    digest = hashlib.sha256(str(EMBEDDED_FORMAT_VERSION).encode())
    digest.update(repr(sorted(_ARCHITECTURE_SPECS.items())).encode())  # the table lives in beam_job/config.py
    here = os.path.dirname(os.path.abspath(__file__))
    for name in _MODEL_MODULES:
        path = os.path.join(here, name + ".py")
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                digest.update(handle.read())
    return f"v{EMBEDDED_FORMAT_VERSION}-{digest.hexdigest()[:10]}"


def warn_untrained(what: str) -> None:
    """Log the untrained-model WARNING once per process for `what`."""
    if what not in _warned:
        _warned.add(what)
        logger.warning(UNTRAINED_WARNING.format(what=what))


def embedded_model_path(arch: str = "r50", cache_dir: str | None = None, seed: int = 0) -> str:
    """Local TF2 SavedModel directory of our DELG `arch` with fixed-seed weights, exported on first use.

    The export lives in <cache>/embedded/<arch>-seed<seed>-<version> (cache: $DELG_CACHE_DIR or
    ~/.cache/delg-beam). It is built once under a file lock in a temporary directory and renamed into
    place atomically, so concurrent worker processes never see or produce a half-written model.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"unknown embedded architecture {arch!r}: use one of {', '.join(ARCHITECTURES)} (e.g. embedded:r50)"
        )
    seed = int(seed)
    cache = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    target = os.path.join(cache, "embedded", f"{arch}-seed{seed}-{_code_version()}")

    def complete(path: str) -> bool:
        return os.path.isfile(os.path.join(path, SAVED_MODEL_FILE))

    def build(tmp: str) -> None:
        from beam_job.delg.export import export_tf2
        from beam_job.delg.keras_model import build_delg

        logger.info("Exporting the embedded DELG %s (seed %d) to %s (first use; done once)", arch, seed, target)
        model = build_delg(arch=arch, seed=seed)
        export_dir = os.path.join(tmp, "export")
        export_tf2(model, export_dir)
        # Publish the SavedModel files at the top of the temporary dir, which is renamed onto target.
        for entry in os.listdir(export_dir):
            os.rename(os.path.join(export_dir, entry), os.path.join(tmp, entry))
        os.rmdir(export_dir)

    build_once(target, build, is_complete=complete)
    warn_untrained(f"embedded:{arch}" + (f" (seed {seed})" if seed else ""))
    return target
