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

import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from beam_job import __version__
from beam_job.errors import first_line

if TYPE_CHECKING:
    from beam_job.launch import JobFailedError, RunOutcome
    from beam_job.pipeline.options import JobConfigError

PROG = "delg-extract"
__all__ = ["JobConfigError", "JobFailedError", "RunOutcome", "console_main", "exit_status", "main", "run"]

# Beam (1.1 s of imports) is imported when a run starts, inside `main`, so that a Ctrl-C at any moment of a
# run ends in one line; the names below are this module's too, looked up on first use (PEP 562).
_LAZY = {"JobConfigError": "beam_job.pipeline.options", "JobFailedError": "beam_job.launch",
         "RunOutcome": "beam_job.launch"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(__import__(_LAZY[name], fromlist=[name]), name)


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> RunOutcome | None:
    """Parse argv, validate, run the job and return a RunOutcome (None for `presets` and `report`).

    Raises JobConfigError before launch and JobFailedError when the job fails; both carry one line.
    `test_pipeline`: a beam.Pipeline to build into instead of creating one (tests).
    """
    from beam_job.launch import Launch
    from beam_job.pipeline.options import describe_presets, job_config_from_args, parse_job_args

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
    job = job_config_from_args(args)  # config-level checks (one line each)
    with Launch(job, pipeline_args, skip_model_check=args.skip_model_check, progress=not args.no_progress,
                progress_interval=args.progress_interval, verbose=args.verbose, test_pipeline=test_pipeline) as launch:
        return launch.run()


def exit_status(exc: BaseException) -> tuple[int, str] | None:
    """(exit status, the one line to print on stderr) for the job's own ends; None for anything else.

    2: invalid configuration (found before launch); 1: the job ran and failed; 128 + the signal's number when a
    signal stopped it (130 for Ctrl-C, 143 for SIGTERM, which the launch handles as Ctrl-C: launch.Interrupted).
    """
    if isinstance(exc, KeyboardInterrupt):  # first, with no import: it may have interrupted the imports
        signum = getattr(exc, "signum", signal.SIGINT)  # launch.Interrupted carries the signal and what became
        detail = getattr(exc, "detail", "no output was claimed yet")  # of the output; before it, nothing did
        return 128 + signum, f"{PROG}: stopped by {signal.Signals(signum).name}: {detail}"
    from beam_job.launch import JobFailedError
    from beam_job.pipeline.options import JobConfigError

    if isinstance(exc, JobConfigError):
        return 2, f"{PROG}: error: {exc}"
    if isinstance(exc, JobFailedError):
        return 1, f"{PROG}: job failed: {exc}"
    return None


def _not_an_interrupt(record: logging.LogRecord) -> bool:
    """Logging filter: drop the runner's error records about our own KeyboardInterrupt (main prints one line)."""
    return not (record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt))


# Beam warnings that say nothing about a local run (each multi_processing worker has no staging directory).
_HARMLESS_BEAM_WARNINGS = ("No semi_persistent_directory found",)


def _not_harmless_noise(record: logging.LogRecord) -> bool:
    """Logging filter: drop the Beam warnings of _HARMLESS_BEAM_WARNINGS (a clean run prints no warning)."""
    return not (record.name.startswith("apache_beam") and record.levelno == logging.WARNING
                and any(text in record.getMessage() for text in _HARMLESS_BEAM_WARNINGS))


def _runner_traceback_as_one_line(record: logging.LogRecord) -> bool:
    """Logging filter (without --verbose): a Beam record's traceback shortened to its exception's first line.

    When a worker dies the runner logs several pages of gRPC tracebacks; the job's own error line says what
    happened and what to do. --verbose keeps the tracebacks.
    """
    if record.name.startswith("apache_beam") and record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        record.msg = f"{record.getMessage()} ({type(exc).__name__}: {first_line(exc)}; --verbose shows more)"
        record.args = None
        record.exc_info = record.exc_text = None
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (see exit_status: 0 ok, 1 failed, 2 invalid, 130 stopped)."""
    if "--version" in (sys.argv[1:] if argv is None else argv):  # before logging, flag parsing and any work
        print(__version__)
        return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("apache_beam").setLevel(logging.WARNING)  # keep the job's own lines readable
    for handler in logging.getLogger().handlers:  # a stopped run ends in one line, not a runner's traceback
        handler.addFilter(_not_an_interrupt)
        handler.addFilter(_not_harmless_noise)
        if "--verbose" not in (sys.argv[1:] if argv is None else argv):
            handler.addFilter(_runner_traceback_as_one_line)
    try:
        run(argv)
    except (Exception, KeyboardInterrupt) as exc:
        ended = exit_status(exc)
        if ended is None:  # not one of the job's own ends: a bug, shown with its traceback
            raise
        print(ended[1], file=sys.stderr)
        return ended[0]
    return 0


def exit_without_teardown(status: int) -> None:
    """End the process now with `status`, once every output is closed, skipping the interpreter's teardown.

    Tearing down a process that has imported TensorFlow and Beam (module objects, TensorFlow's C++ static
    destructors, thread pools) takes 1.3-1.8 s here and does nothing for the user: every shard, summary and
    report is closed before `main` returns. The exit handlers registered with `atexit` (logging, temporary
    directories, weakref finalizers, coverage tools) still run first, then buffered output is flushed, then
    `os._exit`. It exits normally instead where a non-daemon thread is still running (the interpreter would
    wait for it) or the interpreter has no `atexit._run_exitfuncs` (not CPython): that private hook is the
    price of the saved second, and tests/test_cli.py runs both ways (with the hook, and with it deleted).
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
