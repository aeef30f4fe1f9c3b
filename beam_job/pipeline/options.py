"""Job flags and the frozen JobConfig that every step of the Beam job receives (no Beam flags here).

`parse_job_args(argv)` splits argv into our flags (a JobConfig) and Beam's own flags (returned untouched,
so `--runner`, `--direct_num_workers`, `--project`, ... pass straight through to PipelineOptions).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from beam_job.config import PRESETS, ExtractionConfig, get_preset

DEFAULT_PRESET = "embedded"
DEFAULT_ROWS_PER_SHARD = 256
DEFAULT_ROW_GROUP_SIZE = 16
DEFAULT_MAX_FAILURE_RATIO = 0.5
DEFAULT_MAX_FILE_BYTES = 256 * 1024 * 1024
FAILURE_ROWS_PER_SHARD = 50_000


class JobConfigError(ValueError):
    """Invalid job configuration, found before launch. The message is one line saying what to fix."""


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus 6 random hex digits, e.g. 20261123T211400Z-3f9a1c."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclass(frozen=True)
class JobConfig:
    """Everything the pipeline needs, validated on the launcher and pickled to workers.

    inputs:            glob patterns of image files (local or gs://).
    manifests:         manifest files or patterns: CSV with a `path` header (optional `image_id`), plain
                       text (one path a line) or Parquet with `path` (+ `image_id`), e.g. a failures table.
    output:            output root (local dir or gs:// prefix), see docs/pipeline.md for the layout.
    extraction:        the ExtractionConfig (preset plus overrides).
    descriptor_dtype:  "float32" or "float16" for local descriptors.
    rows_per_shard:    at most this many feature rows per Parquet file.
    row_group_size:    feature rows per Parquet row group (bounds writer memory: a row can hold 512 KB).
    skip_existing:     leave out images whose image_id is already in <output>/features.
    overwrite:         delete earlier features/failures/_SUCCESS under output before the run.
    allow_config_change: let --skip_existing add rows of another model or other settings to the output
                       (refused by default; the summary then records both identities).
    take_over_claim:   the run id of a crashed run whose claim on the output this run replaces.
    max_failure_ratio: the run fails when failures / processed images exceeds this (0..1).
    share_model_across_processes: one model copy per machine (Beam large_model) instead of per process.
    max_file_bytes:    files larger than this fail at the read stage instead of being loaded.
    run_id:            names this run's shards, temp dir and summary.
    model_identity:    identity of the model checked on the launcher (or its URI when not checked).
    progress_dir:      local directory where workers report progress (local runners only), else None.
    existing_features: True when <output>/features held shards before this run (set by the launcher).
    started_at:        ISO time the launcher started the run.
    recorded_identity: JSON of the output identity recorded before this run, when it differed and
                       --allow_config_change accepted it (set by the launcher), else "".
    """

    inputs: Tuple[str, ...]
    manifests: Tuple[str, ...]
    output: str
    extraction: ExtractionConfig
    descriptor_dtype: str = "float32"
    rows_per_shard: int = DEFAULT_ROWS_PER_SHARD
    row_group_size: int = DEFAULT_ROW_GROUP_SIZE
    skip_existing: bool = False
    overwrite: bool = False
    allow_config_change: bool = False
    take_over_claim: Optional[str] = None
    max_failure_ratio: float = DEFAULT_MAX_FAILURE_RATIO
    share_model_across_processes: bool = False
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    run_id: str = field(default_factory=new_run_id)
    model_identity: str = ""
    progress_dir: Optional[str] = None
    existing_features: bool = False
    started_at: str = ""
    recorded_identity: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "manifests", tuple(self.manifests))
        object.__setattr__(self, "output", self.output.rstrip("/") if self.output not in ("/", "") else self.output)
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

    def replace(self, **changes: Any) -> "JobConfig":
        return dataclasses.replace(self, **changes)

    # Output layout (see docs/pipeline.md).
    @property
    def features_dir(self) -> str:
        return join(self.output, "features")

    @property
    def failures_dir(self) -> str:
        return join(self.output, "failures")

    @property
    def run_dir(self) -> str:
        return join(self.output, "runs", self.run_id)

    @property
    def summary_path(self) -> str:
        return join(self.run_dir, "summary.json")

    @property
    def success_path(self) -> str:
        return join(self.output, "_SUCCESS")

    def to_summary_dict(self) -> Dict[str, Any]:
        """The job settings recorded in the run summary (JSON-serialisable)."""
        return {
            "inputs": list(self.inputs),
            "manifests": list(self.manifests),
            "output": self.output,
            "preset": self.extraction.name,
            "descriptor_dtype": self.descriptor_dtype,
            "rows_per_shard": self.rows_per_shard,
            "row_group_size": self.row_group_size,
            "skip_existing": self.skip_existing,
            "overwrite": self.overwrite,
            "allow_config_change": self.allow_config_change,
            "take_over_claim": self.take_over_claim,
            "max_failure_ratio": self.max_failure_ratio,
            "share_model_across_processes": self.share_model_across_processes,
            "max_file_bytes": self.max_file_bytes,
        }


def join(base: str, *parts: str) -> str:
    """Join path parts with '/' for both local paths and gs:// URIs."""
    out = base.rstrip("/")
    for part in parts:
        out = out + "/" + part.strip("/")
    return out


def _number(text: str, expected: str) -> float:
    """float(text), refusing what is not a finite number (float() also takes 'nan', 'inf' and '1e999')."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def _csv_floats(text: str) -> Tuple[float, ...]:
    try:
        return tuple(_number(v, "") for v in text.split(",") if v.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, e.g. 0.707,1.0, got {text!r}") from None


def _csv_ints(text: str) -> Tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1, got {text!r}")


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


def build_arg_parser() -> argparse.ArgumentParser:
    """The job's own flags. Beam flags are not declared here; unknown flags go to Beam."""
    parser = _OneLineParser(
        prog="delg-extract",
        description="Extract DELG global + local features from images into Parquet shards (Apache Beam).",
        epilog="Other --flags are Apache Beam pipeline options and pass through unchanged (--runner, "
        "--direct_num_workers, --direct_running_mode, --project, --region, --temp_location, ...). The default "
        "runner is the offline FnApiRunner. 'delg-extract presets' lists the presets. See docs/pipeline.md.",
        allow_abbrev=False,
    )
    io_group = parser.add_argument_group("inputs and outputs")
    io_group.add_argument("--input", action="append", default=[], metavar="PATTERN",
                          help="glob of image files, local or gs:// (repeatable), e.g. 'photos/**/*.jpg'")
    io_group.add_argument("--manifest", action="append", default=[], metavar="FILE",
                          help="manifest file or pattern (repeatable): CSV with a 'path' header and optional "
                          "'image_id', plain text with one path a line, or Parquet (e.g. <output>/failures/*.parquet)")
    io_group.add_argument("--output", required=False, help="output directory or gs:// prefix")
    io_group.add_argument("--descriptor_dtype", choices=("float32", "float16"), default="float32",
                          help="storage type of the local descriptors (default float32)")
    io_group.add_argument("--rows_per_shard", type=int, default=DEFAULT_ROWS_PER_SHARD,
                          help=f"feature rows per Parquet file (default {DEFAULT_ROWS_PER_SHARD})")
    io_group.add_argument("--row_group_size", type=int, default=DEFAULT_ROW_GROUP_SIZE,
                          help=f"feature rows per Parquet row group (default {DEFAULT_ROW_GROUP_SIZE})")
    io_group.add_argument("--skip_existing", action="store_true",
                          help="resume: leave out images whose image_id is already in <output>/features")
    io_group.add_argument("--overwrite", action="store_true",
                          help="delete earlier features, failures and _SUCCESS under --output first")
    io_group.add_argument("--allow_config_change", action="store_true",
                          help="with --skip_existing: accept another model or other extraction settings than the "
                          "output was made with (refused by default; the summary records both)")
    io_group.add_argument("--take_over_claim", metavar="RUN_ID",
                          help="take over the output's claim left by the crashed run RUN_ID (named in the error)")
    io_group.add_argument("--max_failure_ratio", type=_ratio, default=DEFAULT_MAX_FAILURE_RATIO,
                          help="fail the job when failed/processed images exceeds this "
                          f"(default {DEFAULT_MAX_FAILURE_RATIO}; 1 disables)")
    io_group.add_argument("--max_file_bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                          help="files larger than this fail at the read stage (default 256 MiB)")

    model_group = parser.add_argument_group("model and extraction settings")
    model_group.add_argument("--preset", default=DEFAULT_PRESET, choices=sorted(PRESETS),
                             help=f"extraction preset (default {DEFAULT_PRESET}); list them with 'delg-extract presets'")
    model_group.add_argument("--model", help="model URI: SavedModel dir, .tar.gz, gs:// or embedded:<arch>")
    model_group.add_argument("--image_scales", type=_csv_floats, help="pyramid scales, e.g. 0.707,1.0,1.414")
    model_group.add_argument("--global_scales_ind", type=_csv_ints, help="indices of scales pooled for the global descriptor")
    model_group.add_argument("--max_feature_num", type=int, help="at most this many local features per image")
    model_group.add_argument("--score_threshold", type=_finite, help="attention threshold for local features")
    model_group.add_argument("--max_image_size", type=int, help="shrink the longest side to this first (-1: off)")
    model_group.add_argument("--min_image_size", type=int, help="grow the longest side to this first (-1: off)")
    model_group.add_argument("--max_image_pixels", type=int, help="refuse images with more pixels (decompression bombs)")
    model_group.add_argument("--no_exif", action="store_true", help="do not rotate images by their EXIF orientation")
    model_group.add_argument("--no_local_features", action="store_true", help="global descriptors only")
    model_group.add_argument("--skip_model_check", action="store_true",
                             help="do not load the model on the launcher before launch")
    model_group.add_argument("--share_model_across_processes", action="store_true",
                             help="one model copy per machine (Beam large_model) instead of one per process")

    run_group = parser.add_argument_group("run")
    run_group.add_argument("--run_id", help="name of this run (default: UTC time + random suffix)")
    run_group.add_argument("--no_progress", action="store_true", help="no progress log lines on local runs")
    run_group.add_argument("--progress_interval", type=_seconds, default=10.0,
                           help="seconds between progress lines on local runs (default 10)")
    run_group.add_argument("--list_presets", action="store_true", help="print the presets and exit")
    return parser


_OVERRIDE_FLAGS = (
    "model", "image_scales", "global_scales_ind", "max_feature_num", "score_threshold",
    "max_image_size", "min_image_size", "max_image_pixels",
)


def extraction_config_from_args(args: argparse.Namespace) -> ExtractionConfig:
    """The preset with the flag overrides applied; raises JobConfigError with the validation message."""
    overrides: Dict[str, Any] = {name: getattr(args, name) for name in _OVERRIDE_FLAGS if getattr(args, name) is not None}
    if args.no_exif:
        overrides["apply_exif_orientation"] = False
    if args.no_local_features:
        overrides["use_local_features"] = False
    try:
        return get_preset(args.preset, **overrides)
    except ValueError as exc:
        raise JobConfigError(f"invalid extraction settings: {exc}") from None


def parse_job_args(argv: Sequence[str]) -> Tuple[argparse.Namespace, List[str]]:
    """Split argv into (our parsed flags, Beam's flags)."""
    parser = build_arg_parser()
    args, beam_args = parser.parse_known_args(list(argv))
    unknown = unknown_beam_args(beam_args)
    if unknown:
        what = "unexpected argument" if not unknown[0].startswith("-") else "unknown flag"
        raise JobConfigError(f"{what} {unknown[0]!r}: neither a delg-extract flag nor a Beam pipeline option (see --help)")
    return args, beam_args


def unknown_beam_args(beam_args: Sequence[str]) -> List[str]:
    """The args that no registered Beam PipelineOptions class accepts (Beam itself only warns and drops them)."""
    try:
        from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

        parser = _BeamArgumentParser(allow_abbrev=False)
        for cls in PipelineOptions.__subclasses__():
            cls._add_argparse_args(parser)  # the same registry Beam parses with
        _, unknown = parser.parse_known_args(list(beam_args))
    except Exception:  # a Beam-internal change must not block launches; Beam will warn instead
        return []
    return list(unknown)


def job_config_from_args(args: argparse.Namespace, **extra: Any) -> JobConfig:
    """A JobConfig from parsed flags (extra: launcher-decided fields such as model_identity)."""
    if not args.output:
        raise JobConfigError("--output is required: an output directory or gs:// prefix")
    kwargs: Dict[str, Any] = dict(
        inputs=tuple(args.input),
        manifests=tuple(args.manifest),
        output=args.output,
        extraction=extraction_config_from_args(args),
        descriptor_dtype=args.descriptor_dtype,
        rows_per_shard=args.rows_per_shard,
        row_group_size=args.row_group_size,
        skip_existing=args.skip_existing,
        overwrite=args.overwrite,
        allow_config_change=args.allow_config_change,
        take_over_claim=args.take_over_claim,
        max_failure_ratio=args.max_failure_ratio,
        share_model_across_processes=args.share_model_across_processes,
        max_file_bytes=args.max_file_bytes,
    )
    if args.run_id:
        kwargs["run_id"] = args.run_id
    kwargs.update(extra)
    return JobConfig(**kwargs)


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
