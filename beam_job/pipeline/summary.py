"""The run's last step: remove temp leftovers, read the output's current state, write
runs/<run_id>/summary.json, then write (or remove) _SUCCESS. Idempotent: it can run twice (a retry).

FinalizeRunFn runs once, after both sinks have committed (their final file names and the committed
per-row-group stats arrive as side inputs). It never raises on a bad outcome: the summary carries the
status ("succeeded" or "failed" with a one-line reason) decided by `run_status` for the output as a
whole, and the launcher turns a failed status into exit status 1 (docs/pipeline.md, "Exit status and
_SUCCESS").
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import apache_beam as beam

from beam_job import __version__, layout, storage
from beam_job.layout import FAILURES, FEATURES
from beam_job.pipeline.failpoints import failpoint
from beam_job.pipeline.options import JobConfig, RunContext
from beam_job.pipeline.progress import images_per_s
from beam_job.pipeline.resume import (
    OutputState,
    duplicated_feature_ids,
    output_identity,
    output_state,
    read_columns,
    remove_temp_files,
)
from beam_job.pipeline.stats import describe, merge_into, new_timing
from beam_job.schemas import delg_v1
from beam_job.storage import write_json

_LOGGER = logging.getLogger(__name__)

DUCKDB_FLOAT16_NOTE = (
    "descriptors are stored as Parquet FLOAT16; pyarrow and pandas read them as float16, DuckDB reads them "
    "as FLOAT (float32)"
)


def _now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _merge_stats(infos: list[dict[str, Any]]) -> dict[str, Any]:
    timings: dict[str, dict[str, Any]] = {}
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    models: Counter = Counter()
    keypoints = 0
    for info in infos:
        stats = info["stats"]
        for stage, entry in stats["timings"].items():
            merge_into(timings.setdefault(stage, new_timing()), entry)
        failures.update(stats["failures"])
        for key, example in stats["examples"].items():
            examples.setdefault(key, example)
        models.update(stats["models"])
        keypoints += stats["keypoints"]
    return {"timings": timings, "failures": failures, "examples": examples, "models": models, "keypoints": keypoints}


def _ratio(part: float, whole: float) -> float:
    return round(part / whole, 6) if whole else 0.0


def _names(paths: list[str], most: int = 3) -> str:
    shown = ", ".join(paths[:most])
    return shown + (f" and {len(paths) - most} more" if len(paths) > most else "")


def run_status(run: Mapping[str, float], output: Mapping[str, float], max_failure_ratio: float,
               duplicated: tuple[int, list[str]] | None = None) -> tuple[str, str]:
    """("succeeded" | "failed", one-line reason) for a run (docs/pipeline.md, "Exit status and _SUCCESS").

    The run fails when
    * features/ holds an image id more than once (`duplicated`: how many ids, in which shards; a shard copied
      or added by hand): the output breaks its promise of one row per input, whatever the ratios;
    * the output's current failures exceed `max_failure_ratio` of its images (the whole output);
    * the inputs this run lists failed above that ratio, judged on their outcomes in the output after the run
      (a feature row, whichever run wrote it, or a current failure), leaving out the inputs that had already
      failed before this run and still fail: a retry of failures that still fail does not fail a good output,
      a run that lists only broken inputs is not hidden by a big good output, and a killed run plus its resume
      is judged as the run would have been had it not been killed (the resume counts the outcomes the killed
      run committed; both kinds of rows count, whichever was committed first).
    """
    if duplicated and output.get("duplicate_feature_rows"):
        ids, shards = duplicated
        return "failed", (f"features/ holds {ids} image id(s) more than once ({output['duplicate_feature_rows']} "
                          f"extra feature row(s), in {_names(shards)}): an output holds one row per input, so a "
                          "shard was copied or added by hand: move the extra shard(s) out of features/ and run "
                          "again with --skip_existing (inputs found in no other shard are extracted again)")
    if output["images"] and output["failures"] / output["images"] > max_failure_ratio:
        ratio = output["failures"] / output["images"]
        return "failed", (f"{output['failures']} of {output['images']} images failed ({ratio:.0%} > "
                          f"--max_failure_ratio {max_failure_ratio:.0%}, over the whole output)")
    still = run["retried_still_failing"] + run.get("skipped_existing_failures", 0)
    judged = run["skipped_existing"] + run["processed"] - still
    failed = run["failures"] - run["retried_still_failing"]
    if judged and failed / judged > max_failure_ratio:
        return "failed", (f"{failed} of the {judged} images this run lists failed ({failed / judged:.0%} > "
                          f"--max_failure_ratio {max_failure_ratio:.0%}; inputs already failing before this run "
                          "are not counted)")
    return "succeeded", ""


Skipped = int | Mapping[str, int]


def _skipped_counts(skipped: Skipped) -> tuple[int, int]:
    """(inputs skipped, of which their kept outcome is a failure row): `skipped` is a count (all feature rows)
    or {kind: count} as the pipeline counts it (kind: the kind of the row the input already has)."""
    if isinstance(skipped, Mapping):
        return int(sum(skipped.values())), int(skipped.get(FAILURES, 0))
    return int(skipped), 0


def build_summary(job: JobConfig, run: RunContext, infos: list[dict[str, Any]], files: dict[str, list[str]],
                  listed: int,
                  skipped: Skipped, duplicates: int, state: OutputState, retried: tuple[int, int],
                  cleanup: dict[str, Any], finished_at: str | None = None,
                  duplicated: tuple[int, list[str]] | None = None) -> dict[str, Any]:
    """The summary dict (JSON-serialisable) of a finished run.

    infos: committed stats dicts {"kind", "rows", "stats"}; files: this run's final shard paths per kind;
    skipped: see `_skipped_counts`; state: the output after this run; retried: (inputs of this run with an
    earlier failure row, of which still failing); duplicated: (image ids with more than one feature row, the
    shards holding them), when the output has such rows.
    """
    skipped_total, skipped_failing = _skipped_counts(skipped)
    merged = _merge_stats(infos)
    n_features = sum(i["rows"] for i in infos if i["kind"] == FEATURES)
    n_failures = sum(i["rows"] for i in infos if i["kind"] == FAILURES)
    processed = n_features + n_failures
    by_stage: Counter = Counter()
    by_type: Counter = Counter()
    for key, count in merged["failures"].items():
        stage, error_type = key.split("/", 1)
        by_stage[stage] += count
        by_type[error_type] += count
    run_counts: dict[str, float] = {  # counts, and the failure ratio
        "listed": listed,
        "duplicate_inputs": duplicates,
        "skipped_existing": skipped_total,
        "skipped_existing_failures": skipped_failing,
        "processed": processed,
        "features": n_features,
        "failures": n_failures,
        "failure_ratio": _ratio(n_failures, processed),
        "retried": retried[0],
        "retried_still_failing": retried[1],
    }
    output_counts: dict[str, float] = dict(state.counts)
    output_counts["failure_ratio"] = _ratio(output_counts["failures"], output_counts["images"])
    status, reason = run_status(run_counts, output_counts, job.max_failure_ratio, duplicated)
    if status == "failed" and merged["failures"] and not output_counts["duplicate_feature_rows"]:
        top_key, top_n = merged["failures"].most_common(1)[0]
        reason += f"; most common in this run: {top_key} ({top_n}x), e.g. {merged['examples'].get(top_key, '')}"
    started = run.started_at or None
    elapsed = None
    if started:
        try:
            t0 = datetime.datetime.fromisoformat(started)
            t1 = datetime.datetime.fromisoformat(finished_at or _now_iso())
            elapsed = max((t1 - t0).total_seconds(), 1e-3)
        except ValueError:
            elapsed = None
    rate = images_per_s(processed, elapsed)
    timings = {stage: describe(entry) for stage, entry in sorted(merged["timings"].items())}
    identity = {"this_run": output_identity(job, run.model_identity)}
    if run.recorded_identity:
        identity["recorded_before"] = json.loads(run.recorded_identity)
    summary: dict[str, Any] = {
        "schema_version": delg_v1.SCHEMA_VERSION,
        "job_version": __version__,
        "run_id": job.run_id,
        "status": status,
        "reason": reason,
        "started_at": started,
        "finished_at": finished_at or _now_iso(),
        "elapsed_s": round(elapsed, 3) if elapsed else None,
        "images_per_s": round(rate, 3) if rate is not None else None,  # the one rate
        "counts": run_counts,
        "output": output_counts,
        "failures_by_stage": dict(sorted(by_stage.items())),
        "failures_by_error_type": dict(sorted(by_type.items())),
        "failures_by_stage_and_type": dict(sorted(merged["failures"].items())),
        "failure_examples": dict(sorted(merged["examples"].items())),
        "keypoints": {"total": merged["keypoints"],
                      "mean_per_image": round(merged["keypoints"] / n_features, 3) if n_features else 0.0},
        "timings_ms": timings,
        "model": {"identity": (merged["models"].most_common(1)[0][0] if merged["models"] else run.model_identity),
                  "identities_seen": dict(merged["models"]), "uri": job.extraction.model},
        "output_identity": identity,
        "config": job.extraction.to_dict(),
        "job": job.to_summary_dict(),
        "shards": {FEATURES: sorted(files.get(FEATURES, [])), FAILURES: sorted(files.get(FAILURES, []))},
        "cleanup": cleanup,
        "notes": [DUCKDB_FLOAT16_NOTE] if job.descriptor_dtype == "float16" else [],
    }
    if job.extraction.untrained or job.extraction.is_embedded_model:
        summary["notes"].append("UNTRAINED model: features are meaningless for retrieval (smoke tests only)")
    return summary


def _retried(state: OutputState, run_failure_files: list[str], run_feature_keys: set[tuple[str, str]]):
    """(inputs of this run that had a failure row from an earlier run, of which failed again)."""
    mine = set(run_failure_files)
    earlier: set[tuple[str, str]] = set()
    now_failing: set[tuple[str, str]] = set()
    for path, keys in state.failure_keys_by_shard.items():
        (now_failing if path in mine else earlier).update(keys)
    return len((run_feature_keys | now_failing) & earlier), len(now_failing & earlier)


def run_files(job: JobConfig, kind: str) -> list[str]:
    """This run's committed shards of a kind. Listed by name rather than taken from the sink's output: a
    retried commit step only returns the files it renamed itself, not those its failed attempt renamed."""
    return storage.match(layout.run_shards_glob(job.output, kind, job.run_id))


def finalize_run(job: JobConfig, run: RunContext, infos: list[dict[str, Any]], listed: int, skipped: Skipped,
                 duplicates: int) -> dict[str, Any]:
    """Everything after the commit, idempotent: temp cleanup, output state, summary.json, _SUCCESS."""
    failpoint("finalize")
    feature_files, failure_files = run_files(job, FEATURES), run_files(job, FAILURES)
    t0 = time.perf_counter()
    removed = remove_temp_files(job.output)  # leftovers of killed runs too: this run holds the claim
    state = output_state(job.output)
    run_feature_keys: set[tuple[str, str]] = set()
    for path in feature_files:
        table, _ = read_columns(path, ["image_id", "path"])
        ids, paths = table.column("image_id").to_pylist(), table.column("path").to_pylist()
        run_feature_keys.update(zip(ids, paths, strict=True))
    retried = _retried(state, failure_files, run_feature_keys)
    duplicated = duplicated_feature_ids(job.output) if state.counts["duplicate_feature_rows"] else None
    cleanup = {"temp_leftovers_removed": removed, "finalize_ms": round((time.perf_counter() - t0) * 1000.0, 3)}
    files = {FEATURES: feature_files, FAILURES: failure_files}
    summary = build_summary(job, run, infos, files, int(listed), skipped, int(duplicates), state, retried, cleanup,
                            duplicated=duplicated)
    write_json(job.summary_path, summary)
    failpoint("success")
    if summary["status"] == "succeeded":
        write_json(job.success_path, {"run_id": job.run_id, "summary": job.summary_path,
                                      "finished_at": summary["finished_at"], "output": summary["output"],
                                      "schema_version": delg_v1.SCHEMA_VERSION})
    elif storage.exists(job.success_path):
        storage.delete([job.success_path])
    _LOGGER.info("run %s %s: %d features, %d failures; output: %s; summary %s", job.run_id, summary["status"],
                 summary["counts"]["features"], summary["counts"]["failures"], summary["output"], job.summary_path)
    return summary


class FinalizeRunFn(beam.DoFn):
    """One trigger element -> the run summary dict (see module docstring); never raises on a bad outcome."""

    def __init__(self, job: JobConfig, run: RunContext):
        self._job = job
        self._run = run

    def process(self, _unused, infos, listed, skipped, duplicates, features_committed=(), failures_committed=()):
        # features_committed / failures_committed: the sinks' outputs, side inputs only so that this step
        # waits for both commits; the files are listed by name (see run_files).
        yield finalize_run(self._job, self._run, list(infos), listed, skipped, duplicates)
