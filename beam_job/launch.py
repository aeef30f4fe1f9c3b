"""One run on the launcher side, in order: the checks, the output's claim, its identity, the run, the release.

    with Launch(job, pipeline_args) as launch:   # every check; the claim is held from here ...
        outcome = launch.run()                   # the pipeline, its summary, the run report
                                                 # ... to here, released however the block ends

Everything that can refuse a run does so in `__enter__`, before any work, with a one-line JobConfigError:
the inputs are listed, the model is checked, and only then the output is claimed (so a refused run creates
no output folder), then the run id, the shards already there and the output's identity are checked, and
`--overwrite` clears the earlier shards last. `run()` raises JobFailedError (one line) when the job fails.
`__exit__` releases the claim, removes the progress folder and, when the launch created the output folder
and left nothing in it, that folder too. The command line (`beam_job.cli`) only parses and prints.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from beam_job import layout, storage
from beam_job.errors import first_line
from beam_job.pipeline.options import JobConfig, JobConfigError, RunContext
from beam_job.processes import process_alive

if TYPE_CHECKING:
    from beam_job.pipeline.claim import Claim

_LOGGER = logging.getLogger("beam_job.launch")
PROGRESS_DIR_PREFIX = "delg-progress-"  # + "<launcher pid>-": a folder of a dead launcher is removed (see below)


class JobFailedError(RuntimeError):
    """The job ran and failed; the message is one line."""


STOPPED_DETAIL = ("the output's claim is released and committed shards are kept; run the same command with "
                  "--skip_existing to finish")


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (SIGINT: Ctrl-C; SIGTERM: `timeout`, `docker stop`, Kubernetes).

    detail: what became of the output and the job, and what to do (the command line prints it).
    """

    def __init__(self, signum: int = signal.SIGINT, detail: str = STOPPED_DETAIL):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.detail = detail


class _StopOnSignals:
    """While a launch runs, SIGINT and SIGTERM raise Interrupted in the main thread and are remembered.

    Ctrl-C and SIGTERM then end the same way: `Launch.run` removes this run's Beam temp folders (after
    cancelling a remote runner's job), `Launch.__exit__` releases the claim and removes the progress folder,
    and the command line prints one line. A runner that catches
    the KeyboardInterrupt inside a bundle and raises its own error instead is seen through: `Launch.run`
    raises Interrupted when a signal came. Outside the main thread (a launch from a worker thread) nothing
    is installed.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, _frame) -> None:
        self.signum = signum
        raise Interrupted(signum)

    def __enter__(self) -> _StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


@dataclass
class RunOutcome:
    """What `Launch.run()` returns: the settings, the run's context, its summary dict, Beam's PipelineResult and
    the metric lines."""

    job: JobConfig
    context: RunContext
    summary: dict[str, Any]
    result: Any
    metrics: list[str]


# Texts of a runner's error that mean an SDK worker process died rather than raised (a SIGKILL, the kernel's
# OOM killer, a segfault): FnApiRunner's multi-process mode reports a lost gRPC channel, the portable runners
# a worker that stopped answering. Said as such, with the way out, instead of the transport's own words.
_DEAD_WORKER_TEXTS = ("Channel closed prematurely", "Socket closed", "SDK harness", "SDK worker",
                      "Connection reset by peer", "StatusCode.UNAVAILABLE")


def job_error_line(exc: BaseException) -> str:
    """One line for a runner's (often multi-page) error: the last 'SomeError: ...' line, or a dead worker."""
    text = str(exc)
    said = next((m for m in _DEAD_WORKER_TEXTS if m.lower() in text.lower()), None)
    if said is not None:
        return (f"a worker process died during the run (killed, out of memory or crashed; the runner said "
                f"{said!r}): nothing committed is lost, run again with --skip_existing to finish")
    candidates = [ln.strip() for ln in text.splitlines() if ln.strip() and ("Error" in ln or "Exception" in ln)]
    line = candidates[-1] if candidates else first_line(exc)
    return line[:500]


def is_dry_run(options) -> bool:
    """Beam's --dry_run (DataflowRunner builds and validates the job without submitting it)."""
    from apache_beam.options.pipeline_options import TestOptions

    value = options.view_as(TestOptions).dry_run
    return bool(value) and str(value).lower() not in ("false", "0")


def check_model(job: JobConfig, local: bool = True) -> str:
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
        raise JobConfigError(f"model {cfg.model} cannot be used: {first_line(exc)}") from None


def _pid_of_progress_dir(name: str) -> int | None:
    pid = name[len(PROGRESS_DIR_PREFIX):].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def remove_stale_progress_dirs(parent: str | None = None) -> int:
    """Remove the progress folders of launchers on this machine that are gone (SIGKILLed); the count removed."""
    parent = parent or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(parent)
    except OSError:
        return 0
    for name in names:
        pid = _pid_of_progress_dir(name) if name.startswith(PROGRESS_DIR_PREFIX) else None
        if pid is not None and pid != os.getpid() and not process_alive(pid):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed += 1
    return removed


class _RunnerThreadErrors:
    """While the pipeline runs, an exception that ends one of the runner's threads (FnApiRunner's worker
    watchers when a worker process dies, its gRPC readers) is logged as one WARNING line instead of Python's
    default traceback on stderr; the run's own error then says what happened (job_error_line)."""

    def __enter__(self) -> _RunnerThreadErrors:
        self._previous = threading.excepthook
        threading.excepthook = self._hook
        return self

    def __exit__(self, *exc_info) -> None:
        threading.excepthook = self._previous

    @staticmethod
    def _hook(args) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        _LOGGER.warning("runner thread %s ended: %s: %s", name, args.exc_type.__name__,
                        first_line(args.exc_value) if args.exc_value is not None else "")


class Launch:
    """A run of the job on its output, as a context manager (see the module docstring for the order).

    job: the user's settings; pipeline_args: Beam's flags (the default runner is added here);
    skip_model_check: trust --model without reading it (the identity is then its URI);
    progress / progress_interval: the progress bar or line (local runners only); verbose: log Beam's metrics at
    the end (else at DEBUG level); test_pipeline: a beam.Pipeline to build into instead of creating one (tests).

    Entering sets `context`, the RunContext the checks found out (model identity, start time, the identity the
    output recorded, later the progress folder), which the pipeline receives beside `job`.
    """

    def __init__(self, job: JobConfig, pipeline_args: Sequence[str], *, skip_model_check: bool = False,
                 progress: bool = True, progress_interval: float = 10.0, verbose: bool = False,
                 test_pipeline=None):
        from apache_beam.options.pipeline_options import PipelineOptions

        from beam_job.pipeline.pipeline import is_local_runner, with_default_runner

        self.job = job
        self.pipeline_args = with_default_runner(pipeline_args)
        self.options = PipelineOptions(self.pipeline_args)
        self.local = is_local_runner(self.options)
        self.dry_run = is_dry_run(self.options)
        self.total: int | None = None  # images listed (local runners; None when not counted)
        self._skip_model_check = skip_model_check
        self._progress = progress and self.local
        self._progress_interval = progress_interval
        self._verbose = verbose
        self._test_pipeline = test_pipeline
        self._claim: Claim | None = None
        self._created_output = False
        self._progress_dir: str | None = None
        self._signals = _StopOnSignals()
        self._lost_to: str | None = None  # who holds the output's claim now, when this run lost it
        self._result: Any = None  # the runner's PipelineResult once submitted (remote runners: before the end)
        self._keep_claim = False  # a remote job that could not be stopped may still write: the claim stays
        self.context: RunContext  # what the checks found out (model identity, start time, ...): set on entering

    # ------------------------------------------------------------------ checks and claim
    def __enter__(self) -> Launch:
        self._signals.__enter__()
        try:
            return self._enter()
        except BaseException:
            self._signals.__exit__()
            raise

    def _enter(self) -> Launch:
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        if self.dry_run:
            _LOGGER.info("--dry_run: skipping the input, output and model checks that need storage access")
            if not self.job.extraction.model:
                check_model(self.job)  # raises: no model at all
            self.context = RunContext(model_identity=self.job.extraction.model or "", started_at=started)
            return self
        _LOGGER.info("run %s: checking the inputs, the model (TensorFlow starts up) and the output %s",
                     self.job.run_id, self.job.output)  # the first line the user sees, before TensorFlow's
        self.total = self._count_inputs()
        identity = self._model_identity()
        self._created_output = not storage.exists(self.job.output + "/")
        self._claim = self._take_claim()
        try:
            self.context = RunContext(model_identity=identity, started_at=started)
            self._check_output()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._keep_claim:  # a remote job may still write: its temp files and the claim stay
                _LOGGER.warning("keeping the claim on %s: the job on the runner may still be running", self.job.output)
                self._claim = None
            self._release()  # this run's temp files were removed by run() when it did not end well
        finally:
            self._signals.__exit__()

    def _remove_own_temp_files(self) -> None:
        """After a run that did not end well: its Beam temp folders (a resume never reads them; committed shards
        stay)."""
        from beam_job.pipeline.resume import delete_paths, temp_paths

        mine = [path for path in temp_paths(self.job.output) if layout.is_run_temp(path, self.job.run_id)]
        try:
            delete_paths(mine)
        except Exception:  # best effort: the next run's FinalizeRun removes leftovers too
            _LOGGER.warning("could not remove this run's temp files under %s", self.job.output, exc_info=True)

    def _count_inputs(self) -> int | None:
        from beam_job.pipeline.inputs import check_inputs

        job = self.job
        try:
            total = check_inputs(job.inputs, job.manifests, count=self.local)
        except ValueError as exc:
            raise JobConfigError(first_line(exc)) from None
        except OSError as exc:  # BeamIOError and friends: storage unreachable, no credentials, no permission
            raise JobConfigError(
                f"cannot list the inputs ({first_line(exc)}): check the paths and your storage credentials "
                "(gcloud auth application-default login)"
            ) from None
        if self.local and total == 0:
            raise JobConfigError("the inputs list no image: check the manifests and patterns")
        return total

    def _model_identity(self) -> str:
        if self._skip_model_check:
            if not self.job.extraction.model:
                check_model(self.job, self.local)  # raises: no model at all
            return self.job.extraction.model or ""
        return check_model(self.job, self.local)

    def _take_claim(self) -> Claim:
        """Take the output's claim (this also proves it is writable); JobConfigError (one line) if held."""
        from beam_job.pipeline import claim

        job = self.job
        try:
            return claim.acquire(job.output, job.run_id, take_over=job.take_over_claim)
        except claim.ClaimError as exc:
            raise JobConfigError(str(exc)) from None
        except Exception as exc:  # permission denied, bucket missing, read-only disk, ...
            raise JobConfigError(f"--output {job.output} is not writable ({first_line(exc)}): pick a directory "
                                 "you can write to") from None

    def _check_output(self) -> None:
        """With the claim held: the run id, the shards already there (readable, of our schema), --overwrite, the
        output's identity."""
        from beam_job.pipeline.resume import DamagedShardError, check_output_shards, clear_outputs, has_shards

        job = self.job
        if storage.exists(job.run_dir + "/") or storage.exists(job.summary_path):
            raise JobConfigError(f"run id {job.run_id} was already used on {job.output}: pick another --run_id")
        existing = has_shards(job.features_dir) or has_shards(job.failures_dir)
        if existing and not (job.skip_existing or job.overwrite):
            raise JobConfigError(
                f"{job.output} already holds features/failures shards: pass --skip_existing to resume, "
                "--overwrite to replace them, or another --output"
            )
        if existing and job.overwrite:  # only once everything else checked out
            n = clear_outputs(job)
            _LOGGER.info("--overwrite: deleted %d earlier shard(s) under %s", n, job.output)
            existing = False
        if existing:  # before the identity, which may read a shard's footer: a damaged one is named here
            try:
                check_output_shards(job.output)
            except DamagedShardError as exc:
                raise JobConfigError(str(exc)) from None
        self._check_identity(existing)

    def _check_identity(self, existing: bool) -> None:
        """An output is one model and one configuration: refuse (one line) a run that would mix in another."""
        from beam_job.pipeline.resume import (
            identity_differences,
            output_identity,
            read_output_identity,
            write_output_identity,
        )

        job = self.job
        current = output_identity(job, self.context.model_identity)
        recorded = read_output_identity(job.output) if existing else None
        if recorded is not None:
            diffs = identity_differences(recorded, current)
            if diffs and not job.allow_config_change:
                shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
                raise JobConfigError(
                    f"{job.output} was made with another model or other settings ({shown}): use another "
                    "--output, --overwrite to replace it, or --allow_config_change to mix them knowingly"
                )
            if diffs:
                _LOGGER.warning("--allow_config_change: adding to %s with %s", job.output, "; ".join(diffs))
                self.context = self.context.replace(recorded_identity=json.dumps(recorded, sort_keys=True))
        if recorded is None or not existing:
            write_output_identity(job.output, current)

    def _release(self) -> None:
        from beam_job.pipeline import claim

        if self._progress_dir:
            shutil.rmtree(self._progress_dir, ignore_errors=True)
            self._progress_dir = None
        if self._claim is not None:
            claim.release(self._claim)
            self._claim = None
            if self._created_output:
                self._remove_if_empty(self.job.output)

    @staticmethod
    def _remove_if_empty(output: str) -> None:
        """Remove the output folder this launch created when nothing was written to it (a refused run)."""
        if "://" not in output:
            try:
                os.rmdir(output)
            except OSError:  # not empty (the run wrote to it), or already gone
                pass

    # ------------------------------------------------------------------ the run
    def run(self) -> RunOutcome:
        """Run the pipeline on the claimed output; the exit status comes from the run summary's status.

        A ClaimKeeper watches the claim meanwhile: a claim file deleted under the run is put back, and a claim
        taken by another run stops this one (JobFailedError naming that run; nothing of the output touched).
        """
        from beam_job.pipeline.pipeline import metrics_report, run_pipeline

        job = self.job
        if self.dry_run:
            result = run_pipeline(job, self.context, self.pipeline_args, self._test_pipeline)
            return RunOutcome(job=job, context=self.context, summary={}, result=result, metrics=[])
        if self._progress:
            remove_stale_progress_dirs()
            self._progress_dir = tempfile.mkdtemp(prefix=f"{PROGRESS_DIR_PREFIX}{os.getpid()}-")
            self.context = self.context.replace(progress_dir=self._progress_dir)
        _LOGGER.info("run %s: %s images listed, output %s, preset %s, model %s", job.run_id,
                     self.total if self.total is not None else "?", job.output, job.extraction.name,
                     self.context.model_identity)
        from beam_job.pipeline.claim import ClaimKeeper

        assert self._claim is not None, "Launch.run() is called inside `with Launch(...)`, which takes the claim"
        try:
            with ClaimKeeper(self._claim, self._claim_lost), _RunnerThreadErrors():
                result = self._run_pipeline(job)
        except BaseException as exc:
            interrupted = not isinstance(exc, Exception) or self._signals.signum is not None
            stopped = self._stop_remote_job() if interrupted or self._lost_to else ""
            if self._lost_to is not None:  # the output is another run's now: touch nothing of it but ours
                if not self._keep_claim:
                    self._remove_own_temp_files()
                raise JobFailedError(
                    f"the output's claim was taken by {self._lost_to} while this run was running: this run "
                    f"stopped{stopped} (its committed shards are kept); let that run finish, then resume with "
                    "--skip_existing") from None
            if self._keep_claim:  # the remote job may still write: leave the output as it is
                raise Interrupted(self._signals.signum or signal.SIGINT, stopped.lstrip("; ")) from None
            # Shards may have been committed before the end: the output is not known to be complete.
            if storage.exists(job.success_path):
                storage.delete([job.success_path])
            self._remove_own_temp_files()  # nothing in them was committed; a resume never reads them
            if interrupted:  # a signal, even where the runner caught our KeyboardInterrupt and raised its own
                detail = (stopped.lstrip("; ") + "; " if stopped else "") + STOPPED_DETAIL
                raise Interrupted(self._signals.signum or signal.SIGINT, detail) from None
            raise JobFailedError(f"the job failed: {job_error_line(exc)}") from exc
        lines = metrics_report(result)
        for line in lines:  # committed values, or attempted ones marked "(attempted)" (e.g. on Flink)
            _LOGGER.log(logging.INFO if self._verbose else logging.DEBUG, "metric: %s", line)  # --verbose
        return RunOutcome(job=job, context=self.context, summary=self._finish(), result=result, metrics=lines)

    def _claim_lost(self, holder: str) -> None:
        """ClaimKeeper's call when another run holds the output now: stop this run (the main thread)."""
        import _thread

        self._lost_to = holder
        _LOGGER.error("the output's claim was taken by %s: stopping this run", holder)
        _thread.interrupt_main()

    def _run_pipeline(self, job: JobConfig):
        from beam_job.pipeline.pipeline import run_pipeline

        if not self._progress_dir:
            return run_pipeline(job, self.context, self.pipeline_args, self._test_pipeline, self._submitted)
        from beam_job.pipeline.progress import ProgressMonitor

        with ProgressMonitor(self._progress_dir, self.total, self._progress_interval,
                             started_at=self.context.started_at):  # the rate since the run started, as the summary's
            return run_pipeline(job, self.context, self.pipeline_args, self._test_pipeline, self._submitted)

    def _submitted(self, result) -> None:
        self._result = result

    def _stop_remote_job(self, wait_s: float = 60.0) -> str:
        """Cancel the job a remote runner (Dataflow, Flink, a portable job service) still runs for this launcher,
        which is stopping; "" when there is none. Returns how it went, for the one line the user reads. When the
        job cannot be cancelled, or has not stopped after `wait_s`, it may still write to the output: the claim
        is kept (`_keep_claim`) and the way out named."""
        from apache_beam.runners.runner import PipelineState

        result = self._result
        if self.local or result is None:
            return ""
        try:
            if PipelineState.is_terminal(result.state):
                return ""
            result.cancel()
            deadline = time.monotonic() + wait_s
            while not PipelineState.is_terminal(result.state) and time.monotonic() < deadline:
                time.sleep(1.0)
            state = result.state
        except Exception as exc:
            state, why = None, first_line(exc)
        else:
            why = f"state {state} after {wait_s:.0f} s"
        if state is not None and PipelineState.is_terminal(state):
            return f"; the job on the runner was cancelled ({state})"
        self._keep_claim = True
        return (f"; the job on the runner could not be cancelled ({why}) and may still be running: the output "
                f"stays claimed; stop the job on the runner, then run the same command with --skip_existing "
                f"--take_over_claim {self.job.run_id}")

    def _finish(self) -> dict[str, Any]:
        """Read the run's summary, log the done line, write the run report; JobFailedError when it failed."""
        from beam_job.report.run import write_run_report_after_run

        job = self.job
        summary = storage.read_json(job.summary_path)
        if not summary:
            raise JobFailedError(f"the job ended without writing its summary {job.summary_path}")
        c, o = summary["counts"], summary["output"]
        _LOGGER.info("done: %d features, %d failures (%s), %s images/s; output: %d images, %d features, %d "
                     "current failures; summary %s", c["features"], c["failures"], summary.get("failures_by_stage"),
                     summary.get("images_per_s"), o["images"], o["features"], o["failures"], job.summary_path)
        write_run_report_after_run(job.output, job.run_id)  # failed runs get their page too
        if summary.get("status") != "succeeded":
            raise JobFailedError(summary.get("reason") or "the run summary says the run failed")
        return summary

