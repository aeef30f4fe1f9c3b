"""Command line of the Beam job: `delg-extract` / `python -m beam_job` (validate, launch, report).

    delg-extract --input 'photos/*.jpg' --output out/ [--preset embedded] [Beam flags...]
    delg-extract presets

Invalid configuration fails before launch with one line saying what to fix (exit status 2); a job that
fails (e.g. --max_failure_ratio exceeded) exits 1 with a one-line reason. Beam's own flags (--runner,
--direct_num_workers, --direct_running_mode, --project, ...) pass through; the default runner is the
offline FnApiRunner.
"""

from __future__ import annotations

import datetime
import logging
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from beam_job.pipeline.options import (
    JobConfig,
    JobConfigError,
    describe_presets,
    job_config_from_args,
    join,
    parse_job_args,
)

_LOGGER = logging.getLogger("beam_job.cli")
PROG = "delg-extract"


class JobFailedError(RuntimeError):
    """The job ran and failed; the message is one line."""


@dataclass
class RunOutcome:
    """What `run()` returns: the job config, the run summary dict and Beam's PipelineResult."""

    job: JobConfig
    summary: Dict[str, Any]
    result: Any
    metrics: List[str]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _check_output_writable(output: str) -> None:
    from apache_beam.io.filesystem import CompressionTypes
    from apache_beam.io.filesystems import FileSystems

    probe = join(output, "_tmp", f".write-check-{uuid.uuid4().hex}")
    try:
        with FileSystems.create(probe, compression_type=CompressionTypes.UNCOMPRESSED) as fh:
            fh.write(b"ok")
        FileSystems.delete([probe])
    except Exception as exc:
        raise JobConfigError(f"--output {output} is not writable ({_first_line(exc)}): pick a directory you can write to") from None


def _check_model(job: JobConfig) -> str:
    """Load the model on the launcher (as workers will) and return its identity; JobConfigError if unusable."""
    cfg = job.extraction
    if not cfg.model:
        url = cfg.official_model_url
        hint = f" (official weights: {url})" if url else ""
        raise JobConfigError(f"preset {cfg.name!r} has no model: pass --model <SavedModel dir, .tar.gz or gs:// URI>{hint}")
    try:
        from beam_job.pipeline.handler import DelgModelService

        return DelgModelService(cfg).identity()
    except (ValueError, OSError) as exc:
        raise JobConfigError(f"model {cfg.model} cannot be used: {_first_line(exc)}") from None


def _is_dry_run(options) -> bool:
    from apache_beam.options.pipeline_options import TestOptions

    value = options.view_as(TestOptions).dry_run
    return bool(value) and str(value).lower() not in ("false", "0")


def prepare_job(args, beam_args: Sequence[str]):
    """Validate everything before launch; returns (JobConfig, PipelineOptions, is_local, total or None)."""
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_job.pipeline.gcs_auth import use_anonymous_credentials_if_emulated
    from beam_job.pipeline.inputs import check_inputs
    from beam_job.pipeline.pipeline import is_local_runner, with_default_runner
    from beam_job.pipeline.resume import clear_outputs, has_shards

    job = job_config_from_args(args)  # config-level checks (one line each)
    options = PipelineOptions(with_default_runner(beam_args))
    local = is_local_runner(options)
    dry_run = _is_dry_run(options)
    use_anonymous_credentials_if_emulated()
    total = None
    extra: Dict[str, Any] = {"started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if dry_run:
        _LOGGER.info("--dry_run: skipping the input, output and model checks that need storage access")
        extra["model_identity"] = job.extraction.model or ""
        if not job.extraction.model:
            _check_model(job)  # raises: no model at all
        return job.replace(**extra), options, local, None
    try:
        total = check_inputs(job.inputs, job.manifests, count=local)
    except ValueError as exc:
        raise JobConfigError(_first_line(exc)) from None
    except OSError as exc:  # BeamIOError and friends: storage unreachable, no credentials, no permission
        raise JobConfigError(
            f"cannot list the inputs ({_first_line(exc)}): check the paths and your storage credentials "
            "(gcloud auth application-default login)"
        ) from None
    if local and total == 0:
        raise JobConfigError("the inputs list no image: check the manifests and patterns")
    _check_output_writable(job.output)
    existing = has_shards(job.features_dir) or has_shards(job.failures_dir)
    if existing and not (job.skip_existing or job.overwrite):
        raise JobConfigError(
            f"{job.output} already holds features/failures shards: pass --skip_existing to resume, "
            "--overwrite to replace them, or another --output"
        )
    if args.skip_model_check:
        extra["model_identity"] = job.extraction.model or ""
        if not job.extraction.model:
            _check_model(job)
    else:
        extra["model_identity"] = _check_model(job)
    if existing and job.overwrite:  # only once everything else checked out
        n = clear_outputs(job)
        _LOGGER.info("--overwrite: deleted %d earlier shard(s) under %s", n, job.output)
    extra["existing_features"] = has_shards(job.features_dir)
    return job.replace(**extra), options, local, total


def run(argv: Optional[Sequence[str]] = None, test_pipeline=None) -> Optional[RunOutcome]:
    """Parse argv, validate, run the job and return a RunOutcome (None for `presets`).

    Raises JobConfigError before launch and JobFailedError when the job fails; both carry one line.
    `test_pipeline`: a beam.Pipeline to build into instead of creating one (tests).
    """
    from apache_beam.io.filesystems import FileSystems

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["presets"]:
        print(describe_presets())
        return None
    args, beam_args = parse_job_args(argv)
    if args.list_presets:
        print(describe_presets())
        return None
    job, options, local, total = prepare_job(args, beam_args)

    from beam_job.pipeline.pipeline import metrics_report, run_pipeline, with_default_runner
    from beam_job.pipeline.progress import ProgressMonitor
    from beam_job.pipeline.summary import read_json

    if _is_dry_run(options):
        result = run_pipeline(job, with_default_runner(beam_args), test_pipeline)
        return RunOutcome(job=job, summary={}, result=result, metrics=[])

    if FileSystems.exists(job.success_path):
        FileSystems.delete([job.success_path])  # a run in progress: the output is not complete
    progress_dir = None
    if local and not args.no_progress:
        progress_dir = tempfile.mkdtemp(prefix="delg-progress-")
        job = job.replace(progress_dir=progress_dir)
    _LOGGER.info("run %s: %s images listed, output %s, preset %s, model %s", job.run_id,
                 total if total is not None else "?", job.output, job.extraction.name, job.model_identity)
    try:
        if progress_dir:
            with ProgressMonitor(progress_dir, total, args.progress_interval):
                result = run_pipeline(job, beam_args, test_pipeline)
        else:
            result = run_pipeline(job, beam_args, test_pipeline)
    except Exception as exc:
        summary = read_json(job.summary_path)
        if summary and summary.get("status") == "failed" and summary.get("reason"):
            raise JobFailedError(summary["reason"]) from exc
        raise JobFailedError(f"the job failed: {_last_error_line(exc)}") from exc
    finally:
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
    lines = metrics_report(result)
    if local:
        for line in lines:
            _LOGGER.info("metric: %s", line)
    summary = read_json(job.summary_path) or {}
    if summary:
        c = summary["counts"]
        _LOGGER.info("done: %d features, %d failures (%s), %s images/s; summary %s", c["features"], c["failures"],
                     summary.get("failures_by_stage"), summary.get("images_per_s"), job.summary_path)
    return RunOutcome(job=job, summary=summary, result=result, metrics=lines)


def _last_error_line(exc: BaseException) -> str:
    """The most specific line of a runner's (often multi-page) error: the last 'SomeError: ...' line."""
    text = str(exc)
    candidates = [ln.strip() for ln in text.splitlines() if ln.strip() and ("Error" in ln or "Exception" in ln)]
    line = candidates[-1] if candidates else _first_line(exc)
    return line[:500]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 job failed, 2 invalid configuration)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("apache_beam").setLevel(logging.WARNING)  # keep the job's own lines readable
    try:
        run(argv)
    except JobConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except JobFailedError as exc:
        print(f"{PROG}: job failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
