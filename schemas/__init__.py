"""Versioned Parquet schemas of the job's outputs, installed as `beam_job.schemas` (column reference: README.md)."""

from .delg_v1 import (  # noqa: F401
    COORDINATE_CONVENTION,
    FAILURE_STAGES,
    FAILURES_SCHEMA,
    GLOBAL_DIM,
    LOCAL_DIM,
    SCHEMA_VERSION,
    features_schema,
    file_metadata,
    with_metadata,
)
