"""Command line of the Beam job: `delg-extract` / `python -m beam_job` (validate, launch, report).

    delg-extract --input 'photos/*.jpg' --output out/ [--preset embedded] [Beam flags...]
    delg-extract presets
    delg-extract report <output> [--run_id ID]      (write runs/<run_id>/report.html of an existing output)
    delg-extract --version                          (the package version, beam_job.__version__)

Invalid configuration fails before launch with one line saying what to fix (exit status 2); a job that
fails (e.g. --max_failure_ratio exceeded) exits 1 with a one-line reason. Beam's own flags (--runner,
--direct_num_workers, --direct_running_mode, --project, ...) pass through; the default runner is the
offline FnApiRunner.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from beam_job import __version__
from beam_job.pipeline.options import (
    JobConfig,
    JobConfigError,
    describe_presets,
    job_config_from_args,
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


def _claim_output(job: JobConfig):
    """Take the output's claim (this also proves it is writable); JobConfigError (one line) if held."""
    from beam_job.pipeline import claim

    try:
        return claim.acquire(job.output, job.run_id, take_over=job.take_over_claim)
    except claim.ClaimError as exc:
        raise JobConfigError(str(exc)) from None
    except Exception as exc:  # permission denied, bucket missing, read-only disk, ...
        raise JobConfigError(f"--output {job.output} is not writable ({_first_line(exc)}): pick a directory you "
                             "can write to") from None


def _check_output_identity(job: JobConfig, existing: bool) -> JobConfig:
    """An output is one model and one configuration: refuse (one line) a run that would mix in another."""
    from beam_job.pipeline.resume import (
        identity_differences,
        output_identity,
        read_output_identity,
        write_output_identity,
    )

    current = output_identity(job)
    recorded = read_output_identity(job.output) if existing else None
    if recorded is not None:
        diffs = identity_differences(recorded, current)
        if diffs and not job.allow_config_change:
            shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
            raise JobConfigError(
                f"{job.output} was made with another model or other settings ({shown}): use another --output, "
                "--overwrite to replace it, or --allow_config_change to mix them knowingly"
            )
        if diffs:
            _LOGGER.warning("--allow_config_change: adding to %s with %s", job.output, "; ".join(diffs))
            job = job.replace(recorded_identity=json.dumps(recorded, sort_keys=True))
    if recorded is None or not existing:
        write_output_identity(job.output, current)
    return job


def _check_model(job: JobConfig, local: bool = True) -> str:
    """Check the model from its signature/graph metadata (no weights restored) and return its identity.

    local: whether the runner runs the workers on this machine (pipeline.is_local_runner). When it does not,
    this machine's CPU is not judged for the precision (bf16 needs the workers' CPUs, which check themselves
    when they load the model, precision.use_precision); the precision's name and every model check still run.
    """
    cfg = job.extraction
    if not cfg.model:
        url = cfg.official_model_url
        hint = f" (official weights: {url})" if url else ""
        raise JobConfigError(
            f"preset {cfg.name!r} has no model: pass --model <SavedModel dir, .tar.gz or gs:// URI>{hint}")
    try:
        from beam_job.delg.extractor import check_extraction

        if not local and cfg.precision != "fp32":
            _LOGGER.info("--precision %s on a remote runner: each worker checks its own CPU when it loads the "
                         "model (this machine's is not judged)", cfg.precision)
        return check_extraction(cfg, here=local)
    except (ValueError, OSError) as exc:
        raise JobConfigError(f"model {cfg.model} cannot be used: {_first_line(exc)}") from None


def _is_dry_run(options) -> bool:
    from apache_beam.options.pipeline_options import TestOptions

    value = options.view_as(TestOptions).dry_run
    return bool(value) and str(value).lower() not in ("false", "0")


def prepare_job(args, pipeline_args: Sequence[str]):
    """Validate everything before launch and claim the output.

    Returns (JobConfig, PipelineOptions, is_local, total or None, Claim or None). The caller must release
    the claim (`claim.release`) when the run ends; on any error here it is already released.
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    from beam_job import storage

    from beam_job.pipeline import claim as output_claim
    from beam_job.pipeline.inputs import check_inputs
    from beam_job.pipeline.pipeline import is_local_runner, with_default_runner
    from beam_job.pipeline.resume import clear_outputs, has_shards

    job = job_config_from_args(args)  # config-level checks (one line each)
    options = PipelineOptions(with_default_runner(pipeline_args))
    local = is_local_runner(options)
    dry_run = _is_dry_run(options)
    total = None
    extra: Dict[str, Any] = {"started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if dry_run:
        _LOGGER.info("--dry_run: skipping the input, output and model checks that need storage access")
        extra["model_identity"] = job.extraction.model or ""
        if not job.extraction.model:
            _check_model(job)  # raises: no model at all
        return job.replace(**extra), options, local, None, None
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
    held = _claim_output(job)
    try:
        if storage.exists(job.run_dir + "/") or storage.exists(job.summary_path):
            raise JobConfigError(f"run id {job.run_id} was already used on {job.output}: pick another --run_id")
        existing = has_shards(job.features_dir) or has_shards(job.failures_dir)
        if existing and not (job.skip_existing or job.overwrite):
            raise JobConfigError(
                f"{job.output} already holds features/failures shards: pass --skip_existing to resume, "
                "--overwrite to replace them, or another --output"
            )
        if args.skip_model_check:
            extra["model_identity"] = job.extraction.model or ""
            if not job.extraction.model:
                _check_model(job, local)
        else:
            extra["model_identity"] = _check_model(job, local)
        job = job.replace(**extra)
        if existing and job.overwrite:  # only once everything else checked out
            n = clear_outputs(job)
            _LOGGER.info("--overwrite: deleted %d earlier shard(s) under %s", n, job.output)
            existing = False
        job = _check_output_identity(job, existing)
        job = job.replace(existing_features=has_shards(job.features_dir))
    except BaseException:
        output_claim.release(held)
        raise
    return job, options, local, total, held


def run(argv: Optional[Sequence[str]] = None, test_pipeline=None) -> Optional[RunOutcome]:
    """Parse argv, validate, run the job and return a RunOutcome (None for `presets`).

    Raises JobConfigError before launch and JobFailedError when the job fails; both carry one line.
    `test_pipeline`: a beam.Pipeline to build into instead of creating one (tests).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["presets"]:
        print(describe_presets())
        return None
    if argv[:1] == ["report"]:
        from beam_job.report.run import report_command

        report_command(argv[1:])
        return None
    args, pipeline_args = parse_job_args(argv)
    if args.list_presets:
        print(describe_presets())
        return None
    job, options, local, total, held = prepare_job(args, pipeline_args)

    from beam_job.pipeline import claim as output_claim
    from beam_job.pipeline.pipeline import run_pipeline, with_default_runner

    if _is_dry_run(options):
        result = run_pipeline(job, with_default_runner(pipeline_args), test_pipeline)
        return RunOutcome(job=job, summary={}, result=result, metrics=[])
    try:
        return _run_claimed(job, args, pipeline_args, local, total, test_pipeline)
    finally:
        output_claim.release(held)


def _run_claimed(job: JobConfig, args, pipeline_args: Sequence[str], local: bool, total: Optional[int],
                 test_pipeline) -> RunOutcome:
    """Run the job on a claimed output; the exit status comes from the run summary's status."""
    from beam_job import storage
    from beam_job.pipeline.pipeline import metrics_report, run_pipeline
    from beam_job.pipeline.progress import ProgressMonitor
    from beam_job.pipeline.summary import read_json

    progress_dir = None
    if local and not args.no_progress:
        progress_dir = tempfile.mkdtemp(prefix="delg-progress-")
        job = job.replace(progress_dir=progress_dir)
    _LOGGER.info("run %s: %s images listed, output %s, preset %s, model %s", job.run_id,
                 total if total is not None else "?", job.output, job.extraction.name, job.model_identity)
    try:
        if progress_dir:
            with ProgressMonitor(progress_dir, total, args.progress_interval):
                result = run_pipeline(job, pipeline_args, test_pipeline)
        else:
            result = run_pipeline(job, pipeline_args, test_pipeline)
    except Exception as exc:
        # Shards may have been committed before the failure: the output is not known to be complete.
        if storage.exists(job.success_path):
            storage.delete([job.success_path])
        raise JobFailedError(f"the job failed: {_last_error_line(exc)}") from exc
    finally:
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
    lines = metrics_report(result)
    for line in lines:  # committed values, or attempted ones marked "(attempted)" (e.g. on Flink)
        _LOGGER.info("metric: %s", line)
    summary = read_json(job.summary_path)
    if not summary:
        raise JobFailedError(f"the job ended without writing its summary {job.summary_path}")
    c, o = summary["counts"], summary["output"]
    _LOGGER.info("done: %d features, %d failures (%s), %s images/s; output: %d images, %d features, %d current "
                 "failures; summary %s", c["features"], c["failures"], summary.get("failures_by_stage"),
                 summary.get("images_per_s"), o["images"], o["features"], o["failures"], job.summary_path)
    from beam_job.report.run import write_run_report_after_run

    write_run_report_after_run(job.output, job.run_id)  # failed runs get their page too
    if summary.get("status") != "succeeded":
        raise JobFailedError(summary.get("reason") or "the run summary says the run failed")
    return RunOutcome(job=job, summary=summary, result=result, metrics=lines)


def _last_error_line(exc: BaseException) -> str:
    """The most specific line of a runner's (often multi-page) error: the last 'SomeError: ...' line."""
    text = str(exc)
    candidates = [ln.strip() for ln in text.splitlines() if ln.strip() and ("Error" in ln or "Exception" in ln)]
    line = candidates[-1] if candidates else _first_line(exc)
    return line[:500]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 job failed, 2 invalid configuration)."""
    if "--version" in (sys.argv[1:] if argv is None else argv):  # before logging, flag parsing and any work
        print(__version__)
        return 0
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


def exit_without_teardown(status: int) -> None:
    """End the process now with `status`, once every output is closed, skipping the interpreter's teardown.

    Tearing down a process that has imported TensorFlow and Beam (module objects, TensorFlow's C++ static
    destructors, thread pools) takes 1.3-1.8 s here and does nothing for the user: every shard, summary and
    report is closed before `main` returns. The exit handlers registered with `atexit` (logging, temporary
    directories, weakref finalizers, coverage tools) still run first, then buffered output is flushed, then
    `os._exit`. It exits normally instead where a non-daemon thread is still running (the interpreter would
    wait for it) or the interpreter has no `atexit._run_exitfuncs` (not CPython).
    """
    import atexit
    import os
    import threading

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if run_exit_handlers is None or others:
        sys.exit(status)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to write there
            pass
    os._exit(status)


def console_main() -> None:
    """`delg-extract` and `python -m beam_job`: main(), then exit_without_teardown (see there)."""
    exit_without_teardown(main())


if __name__ == "__main__":
    console_main()
