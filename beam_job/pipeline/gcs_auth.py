"""Offline-safe GCS credentials: anonymous credentials when a GCS emulator (STORAGE_EMULATOR_HOST) is in use.

Beam's gs:// filesystem asks google-auth for application-default credentials with 4 retries and back-off;
on a machine without credentials and without a metadata server that stalls every process ~21 s before it
falls back to anonymous access. Against a local GCS-protocol server (`STORAGE_EMULATOR_HOST`) no
credentials are needed, so every process of the job (launcher, and each worker in its DoFn `setup` or
model handler `load_model`) calls `use_anonymous_credentials_if_emulated()` before touching gs://.
Worker subprocesses do not inherit in-process patches, which is why the job itself does this.
"""

from __future__ import annotations

import logging
import os
import threading

_LOGGER = logging.getLogger(__name__)
_LOCK = threading.Lock()
_DONE = False

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"


def use_anonymous_credentials_if_emulated() -> bool:
    """When STORAGE_EMULATOR_HOST is set, make google.auth.default() return anonymous credentials.

    Idempotent and cheap; returns True when the emulator mode is on. Never does anything on real GCS
    (the variable is unset there), so production credentials are untouched.
    """
    global _DONE
    if not os.environ.get(EMULATOR_ENV):
        return False
    with _LOCK:
        if _DONE:
            return True
        import google.auth
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT", "emulator-project")

        def _anonymous_default(*_args, **_kwargs):
            return AnonymousCredentials(), project

        google.auth.default = _anonymous_default
        _DONE = True
        _LOGGER.debug("GCS emulator at %s: using anonymous credentials", os.environ[EMULATOR_ENV])
    return True
