"""Job flags (one table, FLAGS, registered with Beam as DelgOptions) and the frozen JobConfig every step receives.

`parse_job_args(argv)` parses our flags (one-line errors) and returns argv whole for PipelineOptions, which
parses Beam's flags (`--runner`, `--direct_num_workers`, `--project`, ...) and ours alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import difflib
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions

from beam_job import layout
from beam_job.config import PRECISIONS, PRESETS, ExtractionConfig, get_preset

DEFAULT_PRESET = "embedded"
DEFAULT_ROWS_PER_SHARD = 256
DEFAULT_ROW_GROUP_SIZE = 16
DEFAULT_MAX_FAILURE_RATIO = 0.5
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
FAILURE_ROWS_PER_SHARD = 50_000


class JobConfigError(ValueError):
    """Invalid job configuration, found before launch. The message is one line saying what to fix."""


# A run id names files and folders (features/part-<run_id>-*, runs/<run_id>/, Beam's beam-temp-part-<run_id>-*):
# one path component of a safe alphabet, never '.' or '..', short enough for file names (255 bytes with
# Beam's 48-character temp prefix and suffix).
RUN_ID_MAX_LENGTH = 128
_RUN_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*\Z")
RUN_ID_RULE = (f"1 to {RUN_ID_MAX_LENGTH} letters, digits, '.', '_' or '-', starting with a letter, digit or '_' "
               "(e.g. 20261123T211400Z-3f9a1c)")


def run_id_problem(run_id: Any) -> str | None:
    """Why `run_id` cannot name a run (None when it can): see RUN_ID_RULE."""
    if not isinstance(run_id, str):
        return f"a run id must be text, got {type(run_id).__name__}"
    if not run_id or len(run_id) > RUN_ID_MAX_LENGTH or not _RUN_ID.match(run_id):
        shown = run_id if len(run_id) <= 60 else run_id[:60] + "..."
        return f"run id {shown!r} is not allowed: use {RUN_ID_RULE}"
    return None


def check_run_id(run_id: Any, flag: str = "--run_id") -> str:
    """`run_id` when it can name a run's files; JobConfigError (one line) naming `flag` otherwise."""
    problem = run_id_problem(run_id)
    if problem:
        raise JobConfigError(f"{flag}: {problem}")
    return run_id


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus 6 random hex digits, e.g. 20261123T211400Z-3f9a1c."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def _number(text: str, expected: str) -> float:
    """float(text), refusing what is not a finite number (float() also takes 'nan', 'inf' and '1e999')."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _csv_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(_number(v, "") for v in text.split(",") if v.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated finite numbers, e.g. 0.707,1.0, got {text!r}") from None


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1, got {text!r}") from None


def _finite(text: str) -> float:
    return _number(text, "a finite number")


def _ratio(text: str) -> float:
    return _number(text, "a number between 0 and 1")


def _seconds(text: str) -> float:
    value = _number(text, "a number of seconds > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


class _OneLineParser(argparse.ArgumentParser):
    """argparse that raises JobConfigError (one line) instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise JobConfigError(message)


# ----------------------------------------------------------------------------- the flags, defined once

IO, MODEL, RUN = "inputs and outputs", "model and extraction settings", "run"


@dataclass(frozen=True)
class Flag:
    """One delg-extract flag. argparse (through DelgOptions, Beam's options registry), the JobConfig /
    ExtractionConfig it fills, the run summary and the docs table are all derived from FLAGS.

    target: "job" (JobConfig field `dest`), "extraction" (ExtractionConfig override `dest`; `invert` for
    --no_x switches of a boolean setting) or "launcher" (read by the launcher only).
    Values must survive Beam's options round trip (workers re-parse the options as `--name=value`), so
    list-valued settings are kept as their comma-separated text and converted in `job_config_from_args`.
    """

    name: str
    help: str
    group: str
    target: str
    dest: str = ""
    default: Any = None
    type: Callable[[str], Any] | None = None
    action: str | None = None
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    invert: bool = False

    @property
    def field(self) -> str:
        return self.dest or self.name

    @property
    def shown_metavar(self) -> str | None:
        if self.action == "store_true":
            return None
        if self.metavar:
            return self.metavar
        if self.choices:
            return "{" + ",".join(self.choices) + "}" if len(self.choices) <= 3 else "NAME"
        names: dict[Any, str] = {int: "N", float: "X"}
        return names.get(self.type, "VALUE" if self.type is None else "X")

    def add_to(self, parser) -> None:
        kwargs: dict[str, Any] = {"help": self.help, "default": self.default, "dest": self.name}
        for key in ("type", "action", "choices"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        if self.shown_metavar:
            kwargs["metavar"] = self.shown_metavar
        parser.add_argument(f"--{self.name}", **kwargs)


def _csv_text(parse: Callable[[str], tuple[Any, ...]]) -> Callable[[str], str]:
    """argparse type that validates a comma-separated list but keeps its text (see Flag)."""

    def check(text: str) -> str:
        parse(text)
        return text

    return check


FLAGS: tuple[Flag, ...] = (
    Flag("input", "glob of image files, local or gs:// (repeatable; quote it), e.g. 'photos/*.jpg'; Beam's glob "
         "rules: dir/** matches every file below dir, dir/**/*.jpg only files inside subdirectories", IO, "job",
         dest="inputs", action="append", metavar="PATTERN"),
    Flag("manifest", "manifest file or pattern (repeatable): CSV with a 'path' header and optional 'image_id', "
         "plain text with one path a line, or Parquet (e.g. <output>/failures/*.parquet)", IO, "job",
         dest="manifests", action="append", metavar="FILE"),
    Flag("output", "output directory or gs:// prefix (required)", IO, "job", metavar="DIR"),
    Flag("descriptor_dtype", "storage type of the local descriptors", IO, "job", default="float32",
         choices=("float32", "float16")),
    Flag("rows_per_shard", "feature rows per Parquet file at most", IO, "job", default=DEFAULT_ROWS_PER_SHARD,
         type=int),
    Flag("row_group_size", "feature rows per Parquet row group (bounds writer memory: a row can hold 512 KB)",
         IO, "job", default=DEFAULT_ROW_GROUP_SIZE, type=int),
    Flag("skip_existing", "resume: leave out inputs (image_id, path) that already have their row in <output>", IO,
         "job", default=False, action="store_true"),
    Flag("overwrite", "delete earlier features, failures, _output.json and _SUCCESS under --output first", IO,
         "job", default=False, action="store_true"),
    Flag("allow_config_change", "with --skip_existing: accept another model or other extraction settings than "
         "the output was made with (refused by default; the summary records both)", IO, "job", default=False,
         action="store_true"),
    Flag("take_over_claim", "take over the output's claim left by the crashed run RUN_ID (named in the error)",
         IO, "job", metavar="RUN_ID"),
    Flag("max_failure_ratio", "the run fails when the output's current failures, or this run's new images, "
         "fail above this ratio (1 disables)", IO, "job", default=DEFAULT_MAX_FAILURE_RATIO, type=_ratio),
    Flag("max_file_bytes", "files larger than this fail at the read stage", IO, "job",
         default=DEFAULT_MAX_FILE_BYTES, type=int),
    Flag("preset", "extraction preset; list them with 'delg-extract presets'", MODEL, "extraction",
         default=DEFAULT_PRESET, choices=tuple(sorted(PRESETS))),
    Flag("model", "model URI: SavedModel dir, .tar.gz (local, gs:// or http(s)://), gs:// dir, or "
         "embedded:<arch>", MODEL, "extraction", metavar="URI"),
    Flag("image_scales", "pyramid scales, e.g. 0.707,1.0,1.414", MODEL, "extraction", type=_csv_text(_csv_floats),
         metavar="LIST"),
    Flag("global_scales_ind", "indices of scales pooled for the global descriptor, e.g. 3,4,5", MODEL,
         "extraction", type=_csv_text(_csv_ints), metavar="LIST"),
    Flag("max_feature_num", "at most this many local features per image", MODEL, "extraction", type=int),
    Flag("score_threshold", "attention threshold for local features", MODEL, "extraction", type=_finite),
    Flag("max_image_size", "shrink the longest side to this first (-1: off)", MODEL, "extraction", type=int),
    Flag("min_image_size", "grow the longest side to this first (-1: off)", MODEL, "extraction", type=int),
    Flag("max_image_pixels", "refuse images with more pixels, checked on the header before decoding "
         "(decompression bombs)", MODEL, "extraction", type=int),
    Flag("precision", "model compute precision: fp32 (the model as exported, exact) or bf16 (bfloat16 compute on "
         "CPUs with native bf16, float32 outputs; approximate, see docs/performance.md)", MODEL, "extraction",
         choices=PRECISIONS),
    Flag("no_exif", "do not rotate images by their EXIF orientation (the reference extractor does not)", MODEL,
         "extraction",
         dest="apply_exif_orientation", default=False, action="store_true", invert=True),
    Flag("no_local_features", "global descriptors only", MODEL, "extraction", dest="use_local_features",
         default=False, action="store_true", invert=True),
    Flag("share_model_across_processes", "one model copy per machine (Beam large_model) instead of one per "
         "process", MODEL, "job", default=False, action="store_true"),
    Flag("skip_model_check", "do not check the model on the launcher before launch", MODEL, "launcher",
         default=False, action="store_true"),
    Flag("run_id", "name of this run: up to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-' "
         "(default: UTC time + random suffix)", RUN, "job", metavar="ID"),
    Flag("no_progress", "no progress bar or progress lines on local runs", RUN, "launcher", default=False,
         action="store_true"),
    Flag("progress_interval", "seconds between progress lines on local runs (on a terminal a bar replaces them)",
         RUN, "launcher", default=10.0, type=_seconds),
    Flag("verbose", "also log Beam's metrics (counters and distributions) when the run ends", RUN, "launcher",
         default=False, action="store_true"),
    Flag("list_presets", "print the presets and exit", RUN, "launcher", default=False, action="store_true"),
)
_EXTRACTION_LISTS = {"image_scales": _csv_floats, "global_scales_ind": _csv_ints}


def flag_default(name: str) -> Any:
    """The default of a flag, for the JobConfig field it fills (so the two cannot disagree)."""
    return next(f.default for f in FLAGS if f.name == name)


@dataclass(frozen=True)
class JobConfig:
    """The user's settings of a run (flags and preset), validated on the launcher and pickled to workers.

    What the launcher finds out when it starts the run (the model's identity, the start time, what the
    output recorded before, the progress folder) is not here: it travels beside this, as a RunContext.

    inputs:            glob patterns of image files (local or gs://).
    manifests:         manifest files or patterns: CSV with a `path` header (optional `image_id`), plain
                       text (one path a line) or Parquet with `path` (+ `image_id`), e.g. a failures table.
    output:            output root (local dir or gs:// prefix), see docs/pipeline.md for the layout.
    extraction:        the ExtractionConfig (preset plus overrides).
    descriptor_dtype:  "float32" or "float16" for local descriptors.
    rows_per_shard:    at most this many feature rows per Parquet file.
    row_group_size:    feature rows per Parquet row group (bounds writer memory: a row can hold 512 KB).
    skip_existing:     leave out inputs (image_id, path) that already have their row in <output> (a feature row,
                       or the DuplicateImageIdError row of a second path).
    overwrite:         delete earlier features/failures/_SUCCESS under output before the run.
    allow_config_change: let --skip_existing add rows of another model or other settings to the output
                       (refused by default; the summary then records both identities).
    take_over_claim:   the run id of a crashed run whose claim on the output this run replaces.
    max_failure_ratio: the run fails when failures / processed images exceeds this (0..1).
    share_model_across_processes: one model copy per machine (Beam large_model) instead of per process.
    max_file_bytes:    files larger than this fail at the read stage instead of being loaded.
    run_id:            names this run's shards, temp dir and summary: --run_id, else generated with the settings.
                       It stays with the settings because every path of the run (layout.py) derives from the
                       output and it, on the launcher and the workers alike, and the user may choose it.
    """

    inputs: tuple[str, ...]
    manifests: tuple[str, ...]
    output: str
    extraction: ExtractionConfig
    descriptor_dtype: str = flag_default("descriptor_dtype")
    rows_per_shard: int = flag_default("rows_per_shard")
    row_group_size: int = flag_default("row_group_size")
    skip_existing: bool = flag_default("skip_existing")
    overwrite: bool = flag_default("overwrite")
    allow_config_change: bool = flag_default("allow_config_change")
    take_over_claim: str | None = flag_default("take_over_claim")
    max_failure_ratio: float = flag_default("max_failure_ratio")
    share_model_across_processes: bool = flag_default("share_model_across_processes")
    max_file_bytes: int = flag_default("max_file_bytes")
    run_id: str = field(default_factory=new_run_id)

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "manifests", tuple(self.manifests))
        object.__setattr__(self, "output", self.output.rstrip("/") if self.output not in ("/", "") else self.output)
        check_run_id(self.run_id)  # it names shards, temp folders and runs/<run_id>/: before any path is built
        if not self.output:
            raise JobConfigError("--output is empty: give an output directory or gs:// prefix")
        if not self.inputs and not self.manifests:
            raise JobConfigError("no inputs: give --input 'images/*.jpg' and/or --manifest list.csv")
        if self.descriptor_dtype not in ("float32", "float16"):
            raise JobConfigError(f"--descriptor_dtype must be float32 or float16, got {self.descriptor_dtype!r}")
        if self.rows_per_shard < 1:
            raise JobConfigError(f"--rows_per_shard must be >= 1, got {self.rows_per_shard}")
        if self.row_group_size < 1:
            raise JobConfigError(f"--row_group_size must be >= 1, got {self.row_group_size}")
        if not 0.0 <= self.max_failure_ratio <= 1.0:
            raise JobConfigError(f"--max_failure_ratio must be between 0 and 1, got {self.max_failure_ratio}")
        if self.skip_existing and self.overwrite:
            raise JobConfigError("--skip_existing and --overwrite contradict each other: pick one")
        if self.max_file_bytes < 1:
            raise JobConfigError(f"--max_file_bytes must be >= 1, got {self.max_file_bytes}")
        if not self.extraction.use_global_features:
            raise JobConfigError(
                "use_global_features=False is not supported by the delg_v1 output: every row stores a global "
                "descriptor (pyarrow cannot read back null fixed-size lists, apache/arrow#35692)"
            )

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)

    # This run's paths under the output (defined in beam_job/layout.py).
    @property
    def features_dir(self) -> str:
        return layout.features_dir(self.output)

    @property
    def failures_dir(self) -> str:
        return layout.failures_dir(self.output)

    @property
    def run_dir(self) -> str:
        return layout.run_dir(self.output, self.run_id)

    @property
    def summary_path(self) -> str:
        return layout.summary_path(self.output, self.run_id)

    @property
    def success_path(self) -> str:
        return layout.success_path(self.output)

    def to_summary_dict(self) -> dict[str, Any]:
        """The job settings recorded in the run summary (JSON-serialisable): every job flag, plus the preset."""
        out: dict[str, Any] = {"preset": self.extraction.name}
        for flag in FLAGS:
            if flag.target == "job":
                value = getattr(self, flag.field)
                out[flag.field] = list(value) if isinstance(value, tuple) else value
        return out


def add_flags(parser) -> None:
    """Add every delg-extract flag, in its group, to an argparse parser (Beam's or ours)."""
    groups: dict[str, Any] = {}
    for flag in FLAGS:
        if flag.group not in groups:
            groups[flag.group] = parser.add_argument_group(flag.group)
        flag.add_to(groups[flag.group])


class DelgOptions(PipelineOptions):
    """The job's flags as Beam pipeline options: Beam parses them with its own, lists them in the job's
    pipeline options (and Dataflow's options panel), and `view_as(DelgOptions)` reads them."""

    @classmethod
    def _add_argparse_args(cls, parser) -> None:  # Beam's documented hook for custom options
        add_flags(parser)


def build_arg_parser() -> argparse.ArgumentParser:
    """The parser behind `delg-extract --help` and the launcher's one-line errors: the same flags as DelgOptions."""
    parser = _OneLineParser(
        prog="delg-extract",
        description="Extract DELG global + local features from images into Parquet shards (Apache Beam).",
        epilog="Other --flags are Apache Beam pipeline options and pass through unchanged (--runner, "
        "--direct_num_workers, --direct_running_mode, --project, --region, --temp_location, ...). The default "
        "runner is the offline FnApiRunner. 'delg-extract presets' lists the presets; 'delg-extract report "
        "<output>' writes a run's HTML report. See docs/pipeline.md.",
        allow_abbrev=False,
    )
    add_flags(parser)
    return parser


def extraction_config_from_args(args: argparse.Namespace) -> ExtractionConfig:
    """The preset with the flag overrides applied; raises JobConfigError with the validation message."""
    overrides: dict[str, Any] = {}
    for flag in FLAGS:
        value = getattr(args, flag.name)
        if flag.target != "extraction" or flag.name == "preset" or value is None:
            continue
        if flag.invert:
            if value:
                overrides[flag.field] = False
            continue
        overrides[flag.field] = _EXTRACTION_LISTS[flag.name](value) if flag.name in _EXTRACTION_LISTS else value
    try:
        return get_preset(args.preset, **overrides)
    except ValueError as exc:
        raise JobConfigError(f"invalid extraction settings: {exc}") from None


def parse_job_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(our parsed flags, the whole argv for PipelineOptions): Beam parses our flags too, through DelgOptions,
    so they are part of the job's pipeline options. Every flag, ours and Beam's, may be spelled with hyphens
    (`--max-feature-num 500`): `normalize_flag_spelling` rewrites it to its one spelling, `--max_feature_num`,
    in the argv returned. Unknown flags and stray arguments fail in one line."""
    argv = list(argv)
    argv = normalize_flag_spelling(argv, {f.name for f in FLAGS})
    load_runner_options(argv)  # a runner's own options (Dask's, for one) are known from here on
    argv = normalize_flag_spelling(argv, beam_option_names())
    args, rest = build_arg_parser().parse_known_args(argv)
    unknown = unknown_beam_args(rest)
    if unknown:
        raise JobConfigError(_unknown_arg_message(unknown[0], argv))
    return args, argv


def beam_option_names() -> set[str]:
    """The names (dests, e.g. direct_num_workers) of every option a registered Beam PipelineOptions class defines
    (ours included, through DelgOptions), as Beam itself parses them."""
    return set(PipelineOptions([]).get_all_options())


def normalize_flag_spelling(argv: Sequence[str], names: set[str]) -> list[str]:
    """argv with `--some-flag[=v]` rewritten to `--some_flag[=v]` where `some_flag` is in `names`.

    Beam's parser, like ours, knows each flag by its underscore name only and would drop the hyphenated
    spelling with a warning; users of fire- or click-based tools type hyphens by habit. Values are left as
    they are (only the word that follows '--', before any '='). Everything after a bare '--' is left alone.
    """
    out: list[str] = []
    for i, arg in enumerate(argv):
        if arg == "--":
            return out + list(argv[i:])
        if arg.startswith("--") and "-" in arg[2:].split("=", 1)[0]:
            name, sep, value = arg[2:].partition("=")
            spelled = name.replace("-", "_")
            if spelled in names:
                arg = f"--{spelled}{sep}{value}"
        out.append(arg)
    return out


def _unknown_arg_message(arg: str, argv: Sequence[str]) -> str:
    """The one line for an argument neither we nor Beam accept: a stray word (most often the second path of an
    unquoted glob the shell expanded) or an unknown flag (with the closest known flag, when one is close)."""
    if not arg.startswith("-"):
        at = argv.index(arg)
        flag_at = at - 1
        while flag_at >= 0 and not argv[flag_at].startswith("-"):
            flag_at -= 1
        flag = argv[flag_at] if flag_at >= 0 else ""
        paths = list(argv[flag_at + 1:at + 1])
        while at + 1 < len(argv) and not argv[at + 1].startswith("-"):
            at += 1
            paths.append(argv[at])
        if flag in ("--input", "--manifest") and all(os.path.lexists(p) for p in paths):
            return (f"unexpected argument {arg!r}: {flag} takes one pattern, and the shell expanded an unquoted glob "
                    f"into {len(paths)} paths: quote the glob, e.g. {flag} {_glob_of(paths)!r}")
        return (f"unexpected argument {arg!r}: neither a delg-extract flag nor a Beam pipeline option (see --help; "
                "quote a glob, e.g. --input 'photos/*.jpg')")
    name = arg[2:].split("=", 1)[0] if arg.startswith("--") else arg.lstrip("-")
    close = difflib.get_close_matches(name.replace("-", "_"), sorted(beam_option_names()), n=1, cutoff=0.8)
    hint = f"; did you mean --{close[0]}?" if close else ""
    return f"unknown flag {arg!r}: neither a delg-extract flag nor a Beam pipeline option (see --help){hint}"


def _glob_of(paths: Sequence[str]) -> str:
    """A glob for the paths an unquoted one was expanded into: their common folder, '*', their common extension."""
    folders = {os.path.dirname(p) for p in paths}
    extensions = {os.path.splitext(p)[1] for p in paths}
    folder = folders.pop() if len(folders) == 1 else "..."
    pattern = "*" + (extensions.pop() if len(extensions) == 1 else "")
    return os.path.join(folder, pattern) if folder else pattern


def unknown_beam_args(beam_args: Sequence[str]) -> list[str]:
    """The args no registered Beam PipelineOptions class accepts (Beam itself only warns and drops them).

    Flags: those Beam keeps only with `retain_unknown_options=True`. Stray words: a word that is neither a
    flag nor the value following a flag without '='.
    """
    beam_args = list(beam_args)
    strays = [a for i, a in enumerate(beam_args)
              if not a.startswith("-") and (i == 0 or not beam_args[i - 1].startswith("-") or "=" in beam_args[i - 1])]
    if strays:
        return strays
    load_runner_options(beam_args)
    quiet = logging.getLogger("apache_beam.options.pipeline_options")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "Discarding unparseable args": we report them ourselves
    try:
        options = PipelineOptions(beam_args)
        names = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    finally:
        quiet.setLevel(level)
    names = {n.split("=", 1)[0].replace("-", "_") for n in names}  # Beam keeps --a-b as a_b
    return [a for a in beam_args if a.startswith("--") and a[2:].split("=", 1)[0].replace("-", "_") in names]


def load_runner_options(beam_args: Sequence[str]) -> None:
    """Import the module of the runner that `--runner` names, as Beam does when the pipeline is built, so that
    the options it defines (Dask's, for one) are registered before the unknown-flag check. A runner that
    cannot be loaded fails in one line."""
    from apache_beam.runners.runner import create_runner

    args = list(beam_args)
    names = [a.split("=", 1)[1] for a in args if a.startswith("--runner=")]
    names += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--runner"]
    for name in names:
        try:
            create_runner(name)
        except (ImportError, ValueError, AttributeError) as exc:
            raise JobConfigError(f"--runner {name}: cannot load this Beam runner ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


@dataclass(frozen=True)
class RunContext:
    """What the launcher found out when it started a run, beside its settings (JobConfig); pickled to workers.

    model_identity:    the model checked on the launcher (`<uri>@sha256:<12 hex>`, or its URI when the check was
                       skipped); it goes into every row and shard footer.
    started_at:        ISO time (UTC, whole seconds) the launcher began the run; rates are measured from it.
    recorded_identity: JSON of the output identity recorded before this run, when it differed and
                       --allow_config_change accepted it, else "" (what the output held).
    progress_dir:      local folder where workers report progress (local runners with progress on), else None.
    """

    model_identity: str
    started_at: str
    recorded_identity: str = ""
    progress_dir: str | None = None

    def replace(self, **changes: Any) -> RunContext:
        return dataclasses.replace(self, **changes)


def job_config_from_args(args: argparse.Namespace, **extra: Any) -> JobConfig:
    """A JobConfig from parsed flags (extra: settings to set beside the flags, e.g. in tests)."""
    if not args.output:
        raise JobConfigError("--output is required: an output directory or gs:// prefix")
    kwargs: dict[str, Any] = {"extraction": extraction_config_from_args(args)}
    for flag in FLAGS:
        value = getattr(args, flag.name)
        if flag.target == "job" and flag.action == "append":
            kwargs[flag.field] = tuple(value or ())
        elif flag.target == "job" and value is not None:
            kwargs[flag.field] = value
    kwargs.update(extra)
    return JobConfig(**kwargs)


def flags_markdown() -> str:
    """The flags table of docs/pipeline.md (a test keeps the docs equal to it)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for flag in FLAGS:
        if flag.action == "store_true":
            default = "off"
        elif flag.action == "append":
            default = "(repeatable)"
        elif flag.default is None:
            default = {"extraction": "preset's", "job": ""}.get(flag.target, "")
        else:
            default = f"`{flag.default}`"
        if flag.name == "run_id":
            default = "UTC time + random"
        name = f"`--{flag.name}`" if not flag.shown_metavar else f"`--{flag.name} {flag.shown_metavar}`"
        rows.append(f"| {name} | {default} | {flag.help} |")
    return "\n".join(rows)


def describe_presets() -> str:
    """Human-readable list of presets (for `delg-extract presets`)."""
    lines = []
    for name, cfg in PRESETS.items():
        model = cfg.model or f"(give --model; official weights: {cfg.official_model_url or 'n/a'})"
        lines.append(f"{name}\n    model: {model}\n    scales: {list(cfg.image_scales)}  global_scales_ind: "
                     f"{list(cfg.global_scales_ind)}  max_feature_num: {cfg.max_feature_num}  "
                     f"score_threshold: {cfg.score_threshold}  max_image_size: {cfg.max_image_size}\n    "
                     f"{cfg.description}")
    return "\n".join(lines)
