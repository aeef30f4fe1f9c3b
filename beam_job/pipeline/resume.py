"""An output across runs: its shards, its identity (one model, one configuration), temp leftovers, and its
*current* state (features, plus the failures not since resolved), computed when reading, never rewritten.

Model (docs/pipeline.md, "An output built by several runs"):
* An input is an (image_id, path) pair. `features/` holds each image_id at most once across runs. A resume
  (`--skip_existing`) leaves out the inputs that already have their final outcome: a feature row, or a
  `DuplicateImageIdError` failure row (`read_outcome_keys`); every other listed input is (re)tried, so an
  input whose row a killed run never committed gets it then, whichever of the two commits came first.
* `failures/` is append-only: each run adds its own failure shards and no later run rewrites or deletes
  them (only `--overwrite` clears an output). An input's *current* failure is its latest failure row
  (by run start time), and only while the input has no feature row. `current_failures()` gives that
  table; summaries count it; the raw `failures/*.parquet` remains a valid retry manifest.
* `_output.json` records the model identity and a fingerprint of the extraction settings of the output;
  a run that would mix in another model or other settings is refused before any work.
* A shard that cannot be read as the job wrote it (truncated, empty, not Parquet, another schema) is found
  before launch by `check_output_shards` (footers only) and named with the way out; a damaged data page of
  the id and path columns is found when the resume reads them (page checksums), named the same way
  (`DamagedShardError`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from beam_job import layout, storage
from beam_job.errors import first_line
from beam_job.layout import FAILURES, FEATURES, KINDS, TEMP_DIR_PREFIX
from beam_job.pipeline.options import JobConfig, JobConfigError
from beam_job.schemas import delg_v1

_LOGGER = logging.getLogger(__name__)

# Settings that do not change which features come out (names, documentation, where the model lives).
_NOT_FINGERPRINTED = ("name", "description", "model", "official_model_url")
# The error_type of the failure row of a second path listed under an image_id (transforms.DuplicateImageIdError):
# final once written, so a resume keeps it instead of writing it again.
DUPLICATE_ID_ERROR = "DuplicateImageIdError"


def has_shards(directory: str) -> bool:
    """True when the directory (local or gs://) holds at least one .parquet file. A listing error (permission
    denied, no such bucket) raises: it never reads as "no shards"."""
    return bool(storage.match(layout.shard_glob(directory), limit=1))


def list_shards(directory: str) -> list[str]:
    return storage.match(layout.shard_glob(directory))


def delete_paths(paths: Iterable[str]) -> int:
    paths = list(paths)
    storage.delete(paths)
    return len(paths)


_open = storage.open_read


# ----------------------------------------------------------------------------- temp leftovers

def temp_paths(output: str) -> list[str]:
    """Temp files of unfinished writes under the output: Beam's `beam-temp-*` directories beside the shards
    and the legacy `_tmp/` directory (beam_job/layout.py). Local directories are returned as directories, gs://
    as objects."""
    found: list[str] = []
    if output.startswith("gs://"):
        for pattern in layout.temp_dir_globs(output):
            found.extend(storage.match(pattern))
        return sorted(found)
    for parent in (layout.kind_dir(output, FEATURES), layout.kind_dir(output, FAILURES)):
        if os.path.isdir(parent):
            found.extend(storage.join(parent, name) for name in sorted(os.listdir(parent))
                         if name.startswith(TEMP_DIR_PREFIX))
    legacy = layout.legacy_tmp_dir(output)
    if os.path.isdir(legacy):
        found.append(legacy)
    return found


def remove_temp_files(output: str) -> int:
    """Delete every temp leftover under the output (only safe while this run holds the output's claim): the one
    place that deletes temp files besides Beam's own finalize (beam_job/layout.py)."""
    paths = temp_paths(output)
    if paths:
        _LOGGER.info("removing %d temp leftover(s) of unfinished writes under %s", len(paths), output)
        storage.delete(paths)
    return len(paths)


# ----------------------------------------------------------------------------- identity

def output_identity(job: JobConfig, model_identity: str) -> dict[str, Any]:
    """What makes an output one output: the model's identity (RunContext.model_identity), the extraction
    settings and their fingerprint."""
    settings = {k: v for k, v in job.extraction.to_dict().items() if k not in _NOT_FINGERPRINTED}
    settings["descriptor_dtype"] = job.descriptor_dtype
    canonical = json.dumps(settings, sort_keys=True, default=str)
    return {
        "schema_version": delg_v1.SCHEMA_VERSION,
        "model_identity": model_identity,
        "preset": job.extraction.name,
        "settings": settings,
        "settings_fingerprint": hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16],
    }


def _model_differs(recorded: str, current: str) -> bool:
    """Identities are '<uri>@sha256:<hex>'; without a hash (model not checked) only the URIs compare."""
    if "@sha256:" in recorded and "@sha256:" in current:
        return recorded != current
    return recorded.split("@sha256:")[0] != current.split("@sha256:")[0]


def identity_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two output identities (empty when the same)."""
    diffs = []
    if _model_differs(str(recorded.get("model_identity", "")), str(current.get("model_identity", ""))):
        diffs.append(f"model {recorded.get('model_identity')} -> {current.get('model_identity')}")
    old, new = recorded.get("settings", {}), current.get("settings", {})
    for key in sorted(set(old) | set(new)):
        if json.dumps(old.get(key), default=str) != json.dumps(new.get(key), default=str):
            diffs.append(f"{key} {old.get(key)!r} -> {new.get(key)!r}")
    return diffs


def _identity_problem(data: bytes) -> str | None:
    """Why `data` is not an output identity (None when it is): a JSON object with a text model_identity and
    an object of settings, as `output_identity` writes it."""
    try:
        value = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "it is empty" if not data.strip() else "it is not JSON"
    if not isinstance(value, dict):
        kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
        return f"it holds {kinds.get(type(value), 'null')}, not a JSON object"
    wrong = [f"{key} is not {what}" for key, kind, what in (("model_identity", str, "text"),
                                                             ("settings", dict, "an object"))
             if not isinstance(value.get(key), kind)]
    if not isinstance(value.get("preset", ""), (str, type(None))):
        wrong.append("preset is not text")
    return ", ".join(wrong) or None


def read_output_identity(output: str) -> dict[str, Any] | None:
    """The recorded identity: `_output.json`, else (outputs of earlier versions) the footer of a shard.

    An `_output.json` that is not an identity (not JSON, or JSON of another shape) raises JobConfigError (one
    line naming the file and the way out): it is never guessed at nor overwritten.
    """
    path = layout.identity_path(output)
    if storage.exists(path):
        data = storage.read_bytes(path)
        problem = _identity_problem(data)
        if problem:
            raise JobConfigError(
                f"{path} is not the output's identity ({problem}): restore it, or delete it to have the model and "
                "settings read from the shards' footers instead (or use --overwrite or another --output)")
        return json.loads(data.decode("utf-8"))
    shards = list_shards(layout.features_dir(output)) or list_shards(layout.failures_dir(output))
    if not shards:
        return None
    with _open(shards[0]) as fh:
        meta = pq.ParquetFile(fh).schema_arrow.metadata or {}
    try:
        config = json.loads(meta[delg_v1.META_CONFIG].decode())
    except (KeyError, ValueError):
        return None
    settings = {k: v for k, v in config.items() if k not in _NOT_FINGERPRINTED}
    dtype = meta.get(delg_v1.META_DESCRIPTOR_DTYPE, b"float32").decode()
    settings["descriptor_dtype"] = dtype
    return {"model_identity": meta.get(delg_v1.META_MODEL, b"").decode(), "preset": config.get("name"),
            "settings": settings}


def write_output_identity(output: str, identity: dict[str, Any]) -> None:
    storage.write_json(layout.identity_path(output), identity)


def clear_outputs(job: JobConfig) -> int:
    """--overwrite: delete earlier shards, temp leftovers, the identity and the success marker (runs/ stays).
    The one place that deletes shards (who deletes what: beam_job/layout.py)."""
    n = delete_paths(list_shards(job.features_dir) + list_shards(job.failures_dir))
    remove_temp_files(job.output)
    for path in (layout.success_path(job.output), layout.identity_path(job.output)):
        if storage.exists(path):
            storage.delete([path])
    return n


# ----------------------------------------------------------------------------- current state

# ----------------------------------------------------------------------------- damaged shards

class DamagedShardError(ValueError):
    """A shard under the output that is not what the job writes there; the message (one line) names the file
    and the way out."""


def damaged_shard_message(path: str, problem: str) -> str:
    """`<path> <problem>: <the way out>`, one line."""
    folder = path.rsplit("/", 1)[0]
    output = folder.rsplit("/", 1)[0]
    return (f"{path} {problem}: move it out of {folder}/ (or delete it) and run again with --skip_existing; its "
            f"inputs are then extracted again (or pass --overwrite to start {output} over)")


def _schema_problem(schema: pa.Schema, kind: str) -> str | None:
    """Why a shard's Arrow schema is not the job's schema for `kind` (None when it is)."""
    features = [delg_v1.features_schema(dtype) for dtype in ("float32", "float16")]
    if kind == FEATURES and any(schema.equals(s, check_metadata=False) for s in features):
        return None
    if kind == FAILURES and schema.equals(delg_v1.FAILURES_SCHEMA, check_metadata=False):
        return None
    if kind == FEATURES and schema.equals(delg_v1.FAILURES_SCHEMA, check_metadata=False):
        return f"holds failure rows (the failures schema), not feature rows: it belongs in {FAILURES}/"
    if kind == FAILURES and any(schema.equals(s, check_metadata=False) for s in features):
        return f"holds feature rows (the features schema), not failure rows: it belongs in {FEATURES}/"
    columns = ", ".join(schema.names[:6]) + (", ..." if len(schema.names) > 6 else "")
    return f"is a Parquet file of another schema (columns: {columns or 'none'}), not one of the job's {kind} shards"


def _shard_problem(path: str, kind: str) -> str | None:
    """Why one shard is not a readable shard of `kind`, from its footer alone (None when it is)."""
    try:
        with _open(path) as fh:
            schema = pq.ParquetFile(fh).schema_arrow
    except Exception as exc:  # pyarrow's own texts: "Parquet file size is 0 bytes", "magic bytes not found"
        return f"is not a readable Parquet file ({first_line(exc, 300)})"
    return _schema_problem(schema, kind)


def check_output_shards(output: str) -> None:
    """Before a resume's launch: every `features/*.parquet` and `failures/*.parquet` opens as Parquet and has
    the job's schema for its folder. Reads each shard's footer only (a few KB per shard, 16 at a time), not its
    data pages. Raises DamagedShardError (a ValueError; one line naming the first bad file and the way out).

    What a footer read finds: an empty, truncated or junk file, a damaged footer, another schema, a shard in
    the wrong folder. What it cannot find: a damaged data page; the resume finds one in the image_id and path
    columns when it reads them (page checksums, `read_columns`), and fails the job naming the file.
    """
    shards = [(path, kind) for kind in KINDS for path in list_shards(layout.kind_dir(output, kind))]
    if not shards:
        return
    with ThreadPoolExecutor(max_workers=min(16, len(shards))) as pool:
        problems = list(pool.map(lambda shard: _shard_problem(*shard), shards))
    bad = [(path, problem) for (path, _), problem in zip(shards, problems, strict=True) if problem]
    if bad:
        path, problem = bad[0]
        more = f" ({len(bad) - 1} more shard(s) are damaged too: run again to see the next)" if len(bad) > 1 else ""
        raise DamagedShardError(damaged_shard_message(path, problem) + more)


def read_columns(path: str, columns: list[str]) -> tuple[pa.Table, dict[bytes, bytes]]:
    """Some columns of one shard and its footer metadata. Pages are checked against their checksums (shards
    written since page checksums were turned on carry them); a shard that cannot be read raises
    DamagedShardError naming it."""
    try:
        with _open(path) as fh:
            pf = pq.ParquetFile(fh, page_checksum_verification=True)
            return pf.read(columns=columns), dict(pf.schema_arrow.metadata or {})
    except Exception as exc:  # truncated, not Parquet, a damaged page, a missing column
        raise DamagedShardError(damaged_shard_message(path, f"cannot be read ({first_line(exc, 300)})")) from None


Key = tuple[str, str]  # (image_id, path): one listed input


def read_outcome_keys(path: str, kind: str) -> list[Key]:
    """The inputs of one shard whose outcome a resume keeps (leaves out): every (image_id, path) of a feature
    shard; of a failure shard, only the `DuplicateImageIdError` rows (an id's second path stays a duplicate;
    every other failure is tried again)."""
    if kind == FEATURES:
        table, _ = read_columns(path, ["image_id", "path"])
        return list(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist(), strict=True))
    table, _ = read_columns(path, ["image_id", "path", "error_type"])
    return [(image_id, where) for image_id, where, error in zip(table.column("image_id").to_pylist(),
                                                                table.column("path").to_pylist(),
                                                                table.column("error_type").to_pylist(), strict=True)
            if error == DUPLICATE_ID_ERROR]


@dataclass
class OutputState:
    """The whole output as readers should see it (see the module docstring)."""

    feature_keys: set[Key] = field(default_factory=set)
    feature_ids: set[str] = field(default_factory=set)
    feature_rows: int = 0
    failure_rows: int = 0
    # key -> (run order, shard path, row index) of its latest failure row, only for unresolved inputs
    current: dict[Key, tuple[tuple[str, str], str, int]] = field(default_factory=dict)
    failure_keys_by_shard: dict[str, set[Key]] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        features = len(self.feature_ids)
        return {"images": features + len(self.current), "features": features, "failures": len(self.current),
                "duplicate_feature_rows": self.feature_rows - features,
                "superseded_failure_rows": self.failure_rows - len(self.current)}


def output_state(output: str) -> OutputState:
    """Read the (image_id, path) columns of every shard (and each failure shard's footer) of the output."""
    state = OutputState()
    for path in list_shards(layout.features_dir(output)):
        table, _ = read_columns(path, ["image_id", "path"])
        ids = table.column("image_id").to_pylist()
        state.feature_rows += len(ids)
        state.feature_ids.update(ids)
        state.feature_keys.update(zip(ids, table.column("path").to_pylist(), strict=True))
    latest: dict[Key, tuple[tuple[str, str], str, int]] = {}
    for path in list_shards(layout.failures_dir(output)):
        table, meta = read_columns(path, ["image_id", "path"])
        order = (meta.get(b"delg.run_started_at", b"").decode(), meta.get(b"delg.run_id", b"").decode())
        keys = list(zip(table.column("image_id").to_pylist(), table.column("path").to_pylist(), strict=True))
        state.failure_rows += len(keys)
        state.failure_keys_by_shard[path] = set(keys)
        for row, key in enumerate(keys):
            seen = latest.get(key)
            if seen is None or (order, path) > (seen[0], seen[1]):
                latest[key] = (order, path, row)
    state.current = {key: where for key, where in latest.items() if key not in state.feature_keys}
    return state


def duplicated_feature_ids(output: str) -> tuple[int, list[str]]:
    """(how many image ids have more than one feature row, the shards that hold those rows): what to name
    when `OutputState.counts` shows duplicate feature rows (a shard copied or added by hand). Reads the
    image_id column of every feature shard; called only then."""
    ids_by_shard = {path: read_columns(path, ["image_id"])[0].column(0).to_pylist()
                    for path in list_shards(layout.features_dir(output))}
    seen: set[str] = set()
    twice: set[str] = set()
    for ids in ids_by_shard.values():
        for image_id in ids:
            (twice if image_id in seen else seen).add(image_id)
    return len(twice), [path for path, ids in ids_by_shard.items() if twice.intersection(ids)]


def current_failures(output: str) -> pa.Table | None:
    """The output's current failures (one row per unresolved input, its latest failure), or None if none.

    Use it to read failures; `failures/*.parquet` as a whole also holds resolved and superseded rows.
    """
    state = output_state(output)
    rows_by_shard: dict[str, list[int]] = {}
    for _, path, row in state.current.values():
        rows_by_shard.setdefault(path, []).append(row)
    tables = []
    for path in sorted(rows_by_shard):
        with _open(path) as fh:
            table = pq.read_table(fh)
        tables.append(table.take(pa.array(sorted(rows_by_shard[path]), type=pa.int64())))
    if not tables:
        return None
    return pa.concat_tables(tables, promote_options="default").replace_schema_metadata(None)
