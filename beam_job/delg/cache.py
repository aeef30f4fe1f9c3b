"""The model cache on local disk: its directory, and building an entry exactly once across processes (no TensorFlow).

Used by loader.py (downloaded and unpacked models) and embedded.py (the exported embedded model), which
is why it is a module of its own: both import it, neither imports the other for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

SAVED_MODEL_FILE = "saved_model.pb"  # present in every SavedModel directory: marks a finished export


def default_cache_dir() -> str:
    """$DELG_CACHE_DIR, else ~/.cache/delg-beam."""
    return os.environ.get("DELG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "delg-beam")


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def build_once(
    target: str, build: Callable[[str], None], *, is_complete: Callable[[str], bool] | None = None
) -> str:
    """Create directory `target` exactly once, even when several processes race for it.

    `build(tmp_dir)` fills a fresh temporary directory next to `target`; it is then renamed onto
    `target` atomically. An exclusive file lock (`<target>.lock`) serialises builders, so the losers of
    a race find the finished directory and reuse it. A failed build leaves nothing behind.
    """
    complete = is_complete or os.path.isdir
    if complete(target):
        return target
    parent = os.path.dirname(os.path.abspath(target))
    os.makedirs(parent, exist_ok=True)
    with _file_lock(target + ".lock"):
        if complete(target):
            return target
        if os.path.exists(target):  # incomplete (e.g. emptied by hand): rebuild it
            shutil.rmtree(target, ignore_errors=True)
        prefix = "." + os.path.basename(target) + ".tmp-"
        for stale in os.listdir(parent):  # left by a builder that was killed; nobody else holds the lock now
            if stale.startswith(prefix):
                shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        try:
            build(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
