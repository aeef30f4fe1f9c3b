"""The run report: <output>/runs/<run_id>/report.html built from summary.json and a few Parquet columns.

What is read (through beam_job.storage, so local paths and gs:// alike):
  * every runs/*/summary.json (small);
  * for every feature row of the run: image_id, num_features, original_height, original_width;
  * image_id and path of every shard, through `resume.output_state` (the pipeline's own definition of
    the output's current features and failures);
  * failures shards: their five string columns;
  * for a bounded, deterministic sample (the rows with the smallest SHA-1 of image_id): `attention` of
    ATTENTION_SAMPLE_ROWS rows, and `path`, `locations`, `scales`, `attention` of SAMPLE_IMAGES rows,
    reading only the row groups that hold them, plus those images' files for the thumbnails.
No descriptor column (`descriptors`, `global_descriptor`) is ever read. `ColumnReader.requests` records
every (path, columns, row groups) request so tests can check this.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from beam_job import layout, storage
from beam_job.imaging import decode_image
from beam_job.pipeline.options import JobConfigError, check_run_id
from beam_job.pipeline.resume import list_shards, output_state
from beam_job.report.html import (
    bars_svg,
    colorbar_svg,
    colormap,
    data_uri,
    esc,
    figure,
    fmt,
    histogram_svg,
    jpeg_bytes,
    page,
    scatter_svg,
    table,
    thumbnail,
)

_LOGGER = logging.getLogger(__name__)

SAMPLE_IMAGES = 12  # images drawn with their keypoints
ATTENTION_SAMPLE_ROWS = 256  # rows whose attention scores make the attention histogram
SCATTER_POINTS = 1000  # image sizes plotted (the same hash order)
THUMB_SIDE = 320  # longest side of a sample thumbnail, pixels
FAILURE_EXAMPLES = 3  # examples listed per (stage, error type)
RADIUS_PER_SCALE = 6.0  # keypoint circle radius in original-image pixels per unit of `scales`
MIN_RADIUS = 1.2  # thumbnail pixels
DESCRIPTOR_COLUMNS = ("descriptors", "global_descriptor")
PER_ROW_COLUMNS = ["image_id", "num_features", "original_height", "original_width"]
KEYPOINT_COLUMNS = ["image_id", "path", "original_height", "original_width", "locations", "scales", "attention"]
FAILURE_COLUMNS = ["image_id", "path", "stage", "error_type", "message"]
STAGE_ORDER = ["read", "decode", "preprocess", "inference", "postprocess", "write"]


class ColumnReader:
    """Reads named columns (optionally some row groups) of Parquet files; records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, tuple[str, ...], tuple[int, ...] | None]] = []
        self._sizes: dict[str, list[int]] = {}

    def read(self, path: str, columns: Sequence[str], row_groups: Sequence[int] | None = None) -> pa.Table:
        self.requests.append((path, tuple(columns), tuple(row_groups) if row_groups is not None else None))
        with storage.open_read(path) as fh:
            pf = pq.ParquetFile(fh)
            md = pf.metadata
            self._sizes[path] = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            names = [c for c in columns if c in pf.schema_arrow.names]
            if row_groups is None:
                return pf.read(columns=names, use_threads=False)
            return pf.read_row_groups(list(row_groups), columns=names, use_threads=False)

    def row_group_sizes(self, path: str) -> list[int]:
        if path not in self._sizes:
            with storage.open_read(path) as fh:
                md = pq.ParquetFile(fh).metadata
                self._sizes[path] = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        return self._sizes[path]

    def read_rows(self, path: str, rows: Sequence[int], columns: Sequence[str]) -> pa.Table:
        """The given rows (shard row numbers), in that order, reading only the row groups holding them."""
        sizes = self.row_group_sizes(path)
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        groups = [int(np.searchsorted(starts, r, side="right") - 1) for r in rows]
        chosen = sorted(set(groups))
        offset, before = 0, {}
        for g in chosen:
            before[g] = offset
            offset += sizes[g]
        table = self.read(path, columns, chosen)
        take = [before[g] + int(r - starts[g]) for r, g in zip(rows, groups, strict=True)]
        return table.take(pa.array(take, pa.int64()))

    def descriptor_requests(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(p, c) for p, c, _ in self.requests if set(c) & set(DESCRIPTOR_COLUMNS)]


def sample_key(image_id: str) -> str:
    """The deterministic sampling order: rows sorted by SHA-1 of their image_id (independent of shard layout)."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------- runs


def list_runs(output: str) -> list[dict[str, Any]]:
    """Summaries of every run under <output>/runs/, oldest first (by finished/started time, then run id)."""
    try:
        paths = storage.match(layout.summaries_glob(output))
    except Exception:  # a missing local folder raises on some filesystems
        paths = []
    runs = []
    for p in paths:
        data = storage.read_json(p)
        if data:
            data.setdefault("run_id", p.rstrip("/").split("/")[-2])
            runs.append(data)
    runs.sort(key=lambda s: (s.get("finished_at") or s.get("started_at") or "", s["run_id"]))
    return runs


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _of_run(paths: Sequence[str], run_id: str) -> list[str]:
    """Shards written by a run: part-<run_id>-SSSSS-of-NNNNN.parquet (beam_job/layout.py)."""
    return [p for p in paths if layout.is_run_shard(_basename(p), run_id)]


@dataclass
class SampleImage:
    """A sampled feature row, its thumbnail and its keypoints in thumbnail pixels."""

    image_id: str
    path: str
    original_hw: tuple[int, int]
    locations: np.ndarray  # (N, 2) stored (y, x)
    scales: np.ndarray
    attention: np.ndarray
    thumb_jpeg: bytes | None = None
    thumb_size: tuple[int, int] = (0, 0)  # (width, height)
    decoded_hw: tuple[int, int] | None = None
    problem: str = ""


@dataclass
class RunData:
    """Everything the page shows, gathered once."""

    output: str
    summary: dict[str, Any]
    runs: list[dict[str, Any]]
    output_counts: dict[str, int]
    output_counts_source: str
    run_failures: dict[str, list[dict[str, str]]]  # "stage/error_type" -> example rows of this run
    output_failures: Counter  # "stage/error_type" -> current failures in the whole output
    num_features: np.ndarray
    sizes_hw: np.ndarray  # (n, 2) original (height, width), hash order
    attention_sample: np.ndarray
    attention_rows: int
    samples: list[SampleImage]
    plot_scope: str
    run_reports: dict[str, bool] = field(default_factory=dict)


def _read_image(path: str, config: dict[str, Any]) -> np.ndarray:
    with storage.open_read(path) as fh:
        data = fh.read()
    exif = bool(config.get("apply_exif_orientation", True))
    if config.get("max_image_pixels"):
        return decode_image(data, apply_exif_orientation=exif, max_pixels=int(config["max_image_pixels"]))
    return decode_image(data, apply_exif_orientation=exif)


def _load_sample_image(sample: SampleImage, config: dict[str, Any]) -> None:
    try:
        image = _read_image(sample.path, config)
    except Exception as exc:  # a moved or unreadable source: the points are still drawn on a blank frame
        sample.problem = f"image not readable from {sample.path}: {type(exc).__name__}: {exc}"[:300]
        h, w = sample.original_hw
        scale = min(1.0, THUMB_SIDE / max(h, w, 1))
        sample.thumb_size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return
    sample.decoded_hw = (int(image.shape[0]), int(image.shape[1]))
    if sample.decoded_hw != sample.original_hw:
        sample.problem = (f"the file decodes to {sample.decoded_hw[0]}x{sample.decoded_hw[1]} but the row says "
                          f"{sample.original_hw[0]}x{sample.original_hw[1]}: it changed since the run, points may be "
                          "off")
    thumb = thumbnail(image, THUMB_SIDE)
    sample.thumb_size = thumb.size
    sample.thumb_jpeg = jpeg_bytes(thumb)


def _pick_summary(output: str, runs: list[dict[str, Any]], run_id: str | None) -> dict[str, Any]:
    """The summary of run `run_id` (the latest run when None); JobConfigError (one line) when there is none."""
    if not runs:
        raise JobConfigError(f"{output} has no runs/<run_id>/summary.json: give the --output of a finished run")
    if run_id is None:
        return runs[-1]
    found = [s for s in runs if s["run_id"] == run_id]
    if not found:
        raise JobConfigError(f"run {run_id!r} not found under {layout.runs_dir(output)}; runs there: "
                             + ", ".join(s["run_id"] for s in runs[-5:]))
    return found[0]


def _failure_groups(reader: ColumnReader, failure_shards: list[str], run_failure_paths: set[str],
                    current: set[tuple[str, int]]) -> tuple[dict[str, list[dict[str, str]]], Counter]:
    """(examples of this run's failures by "stage/error_type", counts of the output's current failures by it);
    string columns only."""
    output_failures: Counter = Counter()
    run_failures: dict[str, list[dict[str, str]]] = defaultdict(list)
    for path in failure_shards:
        for row, r in enumerate(reader.read(path, FAILURE_COLUMNS).to_pylist()):
            key = f"{r['stage']}/{r['error_type']}"
            if (path, row) in current:
                output_failures[key] += 1
            if path in run_failure_paths and len(run_failures[key]) < FAILURE_EXAMPLES:
                run_failures[key].append(r)
    return run_failures, output_failures


def gather(output: str, run_id: str | None = None, reader: ColumnReader | None = None) -> RunData:
    """Read what the report needs; raises JobConfigError (one line) when the output has no such run."""
    output = output.rstrip("/") if output not in ("/", "") else output
    reader = reader or ColumnReader()
    runs = list_runs(output)
    summary = _pick_summary(output, runs, run_id)
    rid = summary["run_id"]
    config = summary.get("config") or {}

    feature_shards = list_shards(layout.features_dir(output))
    failure_shards = list_shards(layout.failures_dir(output))
    plot_shards = _of_run(feature_shards, rid)
    plot_scope = "this run"
    if not plot_shards:
        plot_shards, plot_scope = feature_shards, "the whole output (this run wrote no feature rows)"

    # Per-row scalar columns of the plotted shards.
    refs: list[tuple[str, str, int]] = []  # (sample key, shard, row)
    num_features, heights, widths = [], [], []
    for path in plot_shards:
        t = reader.read(path, PER_ROW_COLUMNS)
        ids = t.column("image_id").to_pylist()
        refs.extend((sample_key(i), path, r) for r, i in enumerate(ids))
        num_features.append(t.column("num_features").to_numpy())
        heights.append(t.column("original_height").to_numpy())
        widths.append(t.column("original_width").to_numpy())
    order = sorted(range(len(refs)), key=lambda j: refs[j][0])
    nf = np.concatenate(num_features) if num_features else np.zeros(0, np.int32)
    hw = np.stack([np.concatenate(heights), np.concatenate(widths)], axis=1) if heights else np.zeros((0, 2))
    hw = hw[order] if len(order) else hw

    # The output's current state, by the pipeline's own rule (resume.output_state: image_id and path columns).
    state = output_state(output)
    if isinstance(summary.get("output"), dict):
        output_counts = {k: int(summary["output"].get(k, 0)) for k in ("images", "features", "failures")}
        source = "as this run's summary.json recorded them at its end"
    else:  # summaries of older versions have no "output" section
        output_counts = {k: int(state.counts[k]) for k in ("images", "features", "failures")}
        source = "now, computed from the shards' image_id and path columns (this summary has no output section)"
    current = {(where[1], where[2]) for where in state.current.values()}  # (failure shard, row)

    # Failures: string columns only; examples from this run's shards, groups of the output's current ones.
    run_failures, output_failures = _failure_groups(reader, failure_shards, set(_of_run(failure_shards, rid)),
                                                    current)

    # Attention of a bounded sample, then keypoints of a smaller one: only the row groups holding them.
    attention_refs = [refs[j] for j in order[:ATTENTION_SAMPLE_ROWS]]
    att_parts = []
    for path, rows in _by_shard(attention_refs).items():
        col = reader.read_rows(path, rows, ["attention"]).column("attention").combine_chunks()
        att_parts.append(col.flatten().to_numpy(zero_copy_only=False))
    attention = np.concatenate(att_parts) if att_parts else np.zeros(0, np.float32)
    samples: dict[str, SampleImage] = {}
    picture_refs = [refs[j] for j in order[:SAMPLE_IMAGES]]
    for path, rows in _by_shard(picture_refs).items():
        t = reader.read_rows(path, rows, KEYPOINT_COLUMNS)
        for row in range(t.num_rows):
            loc = t.column("locations")[row].values
            locs = np.asarray(loc.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(-1, 2) \
                if loc is not None else np.zeros((0, 2), np.float32)
            iid = t.column("image_id")[row].as_py()
            samples[iid] = SampleImage(
                image_id=iid, path=t.column("path")[row].as_py(),
                original_hw=(int(t.column("original_height")[row].as_py()),
                             int(t.column("original_width")[row].as_py())),
                locations=locs,
                scales=np.asarray(t.column("scales")[row].as_py() or [], np.float32),
                attention=np.asarray(t.column("attention")[row].as_py() or [], np.float32),
            )
    ordered = sorted(samples.values(), key=lambda s: sample_key(s.image_id))
    for s in ordered:
        _load_sample_image(s, config)
    run_reports = {}
    for other in runs:
        if other["run_id"] != rid:
            try:
                run_reports[other["run_id"]] = storage.exists(layout.report_path(output, other["run_id"]))
            except Exception:
                run_reports[other["run_id"]] = False
    return RunData(output=output, summary=summary, runs=runs, output_counts=output_counts,
                   output_counts_source=source, run_failures=dict(run_failures), output_failures=output_failures,
                   num_features=nf, sizes_hw=hw, attention_sample=attention, attention_rows=len(attention_refs),
                   samples=ordered, plot_scope=plot_scope, run_reports=run_reports)


def _by_shard(refs: Sequence[tuple[str, str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for _, path, row in refs:
        out[path].append(row)
    return out


# --------------------------------------------------------------------------------------------- page


def is_untrained(summary: dict[str, Any]) -> bool:
    config = summary.get("config") or {}
    uri = str((summary.get("model") or {}).get("uri") or config.get("model") or "")
    return bool(config.get("untrained")) or uri.startswith("embedded:") or any(
        str(n).startswith("UNTRAINED") for n in summary.get("notes", []))


def _count_cell(key: str, value) -> str:
    return f"<span data-key=\"{esc(key)}\">{esc(fmt(value))}</span>"


def _counts_section(d: RunData) -> str:
    c = d.summary.get("counts", {})
    o = d.output_counts
    dash = "\u2014"
    rows = [
        ("listed", _count_cell("run.listed", c.get("listed")), dash),
        ("images", _count_cell("run.processed", c.get("processed")), _count_cell("output.images", o["images"])),
        ("features", _count_cell("run.features", c.get("features")), _count_cell("output.features", o["features"])),
        ("failures", _count_cell("run.failures", c.get("failures")), _count_cell("output.failures", o["failures"])),
        ("skipped (already have their row)", _count_cell("run.skipped_existing", c.get("skipped_existing")), dash),
        ("duplicate inputs", _count_cell("run.duplicate_inputs", c.get("duplicate_inputs")), dash),
    ]
    if "retried" in c:
        rows.append(("retried (had failed before)", _count_cell("run.retried", c["retried"]), dash))
        rows.append(("retried, still failing", _count_cell("run.retried_still_failing", c.get("retried_still_failing")),
                     dash))
    kp = d.summary.get("keypoints", {})
    note = (f"<p class=\"muted\">Run: images = features + failures processed by this run; failure ratio "
            f"{esc(fmt(c.get('failure_ratio')))}; {esc(fmt(kp.get('total')))} keypoints "
            f"({esc(fmt(kp.get('mean_per_image')))} per image). Whole output: its images (an input's failure counts "
            f"only while it has no feature row, and once however many runs it failed in), "
            f"{esc(d.output_counts_source)}.</p>")
    return "<h2 id=\"counts\">Counts</h2>" + table(["", "this run", "whole output"], rows, numeric=(1, 2),
                                                  attrs="id=\"counts-table\"") + note


def _failures_section(d: RunData) -> str:
    s = d.summary
    by_key = s.get("failures_by_stage_and_type") or {}
    keys = sorted(set(by_key) | set(d.output_failures),
                  key=lambda k: (STAGE_ORDER.index(k.split("/")[0]) if k.split("/")[0] in STAGE_ORDER else 99, k))
    if not keys:
        return "<h2 id=\"failures\">Failures</h2><p>No failures.</p>"
    rows = []
    for key in keys:
        stage, error_type = key.split("/", 1)
        examples = d.run_failures.get(key) or []
        if examples:
            ex = "".join(f"<li><code>{esc(r['path'])}</code>: {esc(r['message'])}</li>" for r in examples)
        elif (s.get("failure_examples") or {}).get(key):
            ex = f"<li>{esc(s['failure_examples'][key])}</li>"
        else:
            ex = ""
        rows.append(f"<tr><td><span data-stage=\"{esc(stage)}\">{esc(stage)}</span></td>"
                    f"<td><span data-error-type=\"{esc(error_type)}\">{esc(error_type)}</span></td>"
                    f"<td class=\"num\">{_count_cell(f'failures.run.{key}', by_key.get(key, 0))}</td>"
                    f"<td class=\"num\">{_count_cell(f'failures.output.{key}', d.output_failures.get(key, 0))}"
                    "</td></tr>"
                    + (f"<tr><td colspan=\"4\"><ul class=\"mono examples\">{ex}</ul></td></tr>" if ex else ""))
    stages = s.get("failures_by_stage") or {}
    stage_line = ", ".join(f"{esc(k)}: {esc(v)}" for k, v in stages.items())
    return ("<h2 id=\"failures\">Failures</h2>"
            + (f"<p>By stage (this run): {stage_line}</p>" if stage_line else "")
            + "<div class=\"scroll\"><table id=\"failures-table\"><thead><tr><th>stage</th><th>error type</th>"
              "<th class=\"num\">this run</th><th class=\"num\">whole output now</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table></div><p class=\"muted\">Under each group: examples (path: message) "
              "from this run's failures shards.</p>"
            + "<p class=\"muted\">Retry exactly the current failures: pass <code>failures/*.parquet</code> as "
              "<code>--manifest</code> with <code>--skip_existing</code>.</p>")


def _plots_section(d: RunData) -> str:
    nf = d.num_features
    hw = d.sizes_hw
    figs = [figure(histogram_svg(nf, "Keypoints per image", "keypoints", "keypoints", integer=True),
                   f"{len(nf)} images of {esc(d.plot_scope)}; mean {esc(fmt(float(nf.mean()) if len(nf) else None))}")]
    figs.append(figure(histogram_svg(d.attention_sample, "Attention scores", "attention", "attention"),
                       f"{len(d.attention_sample)} keypoints of a deterministic sample of {d.attention_rows} images"))
    pts = hw[:SCATTER_POINTS]
    longest = hw.max(axis=1) if len(hw) else np.zeros(0)
    cap = (f"{len(pts)} of {len(hw)} images (deterministic sample); longest side min / median / max: "
           f"{fmt(float(longest.min()))} / {fmt(float(np.median(longest)))} / {fmt(float(longest.max()))} px"
           if len(hw) else "no feature rows")
    figs.append(figure(scatter_svg(pts[:, 1] if len(pts) else [], pts[:, 0] if len(pts) else [],
                                   "Image sizes (original, after EXIF)", "width px", "height px", "sizes"), esc(cap)))
    timings = d.summary.get("timings_ms") or {}
    stages = sorted(timings, key=lambda k: (STAGE_ORDER.index(k) if k in STAGE_ORDER else 99, k))
    figs.append(figure(bars_svg(stages, {"p50 ms": [timings[k].get("p50_ms", 0) for k in stages],
                                         "p95 ms": [timings[k].get("p95_ms", 0) for k in stages]},
                                "Time per image by stage", "milliseconds", "timings"),
                       "per image, except write: per row group (building its Arrow table). " + esc(", ".join(
                           f"{k} mean {fmt(timings[k].get('mean_ms'))} ms" for k in stages))))
    return "<h2 id=\"plots\">Distributions</h2><div class=\"plots\">" + "".join(figs) + "</div>"


def _settings_section(d: RunData) -> str:
    s = d.summary
    model = s.get("model") or {}
    config = s.get("config") or {}
    job = s.get("job") or {}
    rows = [("model", f"<code>{esc(model.get('identity'))}</code>"),
            ("model URI", f"<code>{esc(model.get('uri'))}</code>"),
            ("preset", esc(config.get("name") or job.get("preset"))),
            ("precision (local descriptors)", esc(job.get("descriptor_dtype", "float32"))),
            ("schema", esc(s.get("schema_version"))), ("job version", esc(s.get("job_version")))]
    more = [(esc(k), f"<code>{esc(v)}</code>") for k, v in sorted(config.items()) if k not in ("name", "model")]
    more += [(f"job.{esc(k)}", f"<code>{esc(v)}</code>") for k, v in sorted(job.items())]
    notes = "".join(f"<p class=\"note\">{esc(n)}</p>" for n in s.get("notes", []))
    return ("<h2 id=\"settings\">Model and settings</h2>" + notes
            + table(["setting", "value"], rows, attrs="id=\"settings-table\"")
            + "<details><summary>every extraction setting and job flag</summary>"
            + table(["setting", "value"], more, attrs="id=\"config-table\"") + "</details>")


def keypoint_svg(sample: SampleImage, lo: float, hi: float) -> str:
    """SVG overlay in thumbnail pixels: one circle per keypoint at (x, y) * thumb/original, radius by scale,
    colour by attention; each circle keeps the stored location (to 0.01 px) in data-y / data-x."""
    tw, th = sample.thumb_size
    h, w = sample.original_hw
    sy, sx = th / max(h, 1), tw / max(w, 1)
    order = np.argsort(sample.attention, kind="stable") if len(sample.attention) else np.zeros(0, int)
    colors = colormap((sample.attention - lo) / (hi - lo) if hi > lo else np.full(len(sample.attention), 0.5))
    circles = []
    for i in order:  # lowest attention first, so the strongest are drawn on top
        y, x = (float(v) for v in sample.locations[i])
        r = max(MIN_RADIUS, RADIUS_PER_SCALE * float(sample.scales[i]) * sx)
        circles.append(f"<circle cx=\"{x * sx:.1f}\" cy=\"{y * sy:.1f}\" r=\"{r:.1f}\" color=\"{colors[i]}\" "
                       f"data-y=\"{y:.2f}\" data-x=\"{x:.2f}\"/>")
    return (f"<svg class=\"kp\" viewBox=\"0 0 {tw} {th}\" data-image-id=\"{esc(sample.image_id)}\" "
            f"data-original-height=\"{h}\" data-original-width=\"{w}\" data-thumb-width=\"{tw}\" "
            f"data-thumb-height=\"{th}\" preserveAspectRatio=\"none\">{''.join(circles)}</svg>")


def _samples_section(d: RunData) -> str:
    if not d.samples:
        return "<h2 id=\"samples\">Sample images</h2><p>No feature rows to show.</p>"
    att = np.concatenate([s.attention for s in d.samples]) if d.samples else np.zeros(0)
    lo, hi = (float(att.min()), float(att.max())) if att.size else (0.0, 1.0)
    cards = []
    for s in d.samples:
        tw, th = s.thumb_size
        if s.thumb_jpeg:
            img = (f"<img src=\"{data_uri(s.thumb_jpeg)}\" width=\"{tw}\" height=\"{th}\" "
                   f"alt=\"{esc(s.image_id)}\">")
        else:
            img = (f"<div style=\"width:{tw}px;height:{th}px;max-width:100%;aspect-ratio:{tw}/{th};"
                   "background:#ccc\"></div>")
        problem = f"<p class=\"note\">{esc(s.problem)}</p>" if s.problem else ""
        cards.append(
            f"<div class=\"card\" data-sample=\"{esc(s.image_id)}\"><div class=\"overlay\">{img}"
            f"{keypoint_svg(s, lo, hi)}"
            f"</div><div><b>{esc(s.image_id)}</b> <span class=\"muted\">{s.original_hw[1]}x{s.original_hw[0]} px, "
            f"{len(s.locations)} keypoints</span></div><div class=\"mono muted\">{esc(s.path)}</div>{problem}</div>")
    return ("<h2 id=\"samples\">Sample images with their keypoints</h2>"
            f"<p class=\"muted\">{len(d.samples)} images of {esc(d.plot_scope)} (the rows with the smallest SHA-1 of "
            f"image_id: the same images on every rebuild). Points at the stored (y, x) locations, radius "
            f"{fmt(RADIUS_PER_SCALE)} px \u00d7 scale (original pixels), colour by attention:</p>"
            + colorbar_svg(lo, hi, "attention") + "<div class=\"gallery\">" + "".join(cards) + "</div>")


def _runs_section(d: RunData) -> str:
    rid = d.summary["run_id"]
    rows = []
    for s in reversed(d.runs):
        c = s.get("counts", {})
        if s["run_id"] == rid:
            link = "this report"
        elif d.run_reports.get(s["run_id"]):
            link = f"<a href=\"../{esc(s['run_id'])}/{layout.REPORT_FILE}\">report</a>"
        else:
            link = f"<code>delg-extract report {esc(d.output)} --run_id {esc(s['run_id'])}</code>"
        rows.append((f"<code>{esc(s['run_id'])}</code>", esc(s.get("status")), esc(s.get("finished_at")),
                     esc(fmt(c.get("listed"))), esc(fmt(c.get("features"))), esc(fmt(c.get("failures"))),
                     esc(fmt(c.get("skipped_existing"))), link))
    return "<h2 id=\"runs\">Runs of this output</h2>" + table(
        ["run", "status", "finished", "listed", "features", "failures", "skipped", ""], rows, numeric=(3, 4, 5, 6))


def render(d: RunData) -> str:
    """The report page of gathered run data (one self-contained HTML document)."""
    s = d.summary
    head = [f"<h1>Run <code>{esc(s['run_id'])}</code></h1>"]
    if is_untrained(s):
        head.append("<div class=\"warning\" id=\"untrained-warning\">UNTRAINED MODEL: these features come from "
                    "random weights. They are deterministic but meaningless for retrieval (smoke tests only). Use "
                    "an official preset with its weights for real features.</div>")
    if s.get("status") != "succeeded":
        head.append(f"<div class=\"warning\" id=\"status-warning\">Run {esc(s.get('status'))}: "
                    f"{esc(s.get('reason'))}</div>")
    head.append(table(["", ""], [
        ("output", f"<code>{esc(d.output)}</code>"), ("status", esc(s.get("status"))),
        ("started / finished", f"{esc(s.get('started_at'))} / {esc(s.get('finished_at'))}"),
        ("elapsed", f"{esc(fmt(s.get('elapsed_s')))} s, {esc(fmt(s.get('images_per_s')))} images/s"),
        ("preset / model", f"{esc((s.get('config') or {}).get('name'))} / "
                           f"<code>{esc((s.get('model') or {}).get('identity'))}</code>"),
    ]))
    nav = ("<p><a href=\"#counts\">counts</a> \u00b7 <a href=\"#failures\">failures</a> \u00b7 <a href=\"#plots\">"
           "distributions</a> \u00b7 <a href=\"#settings\">settings</a> \u00b7 <a href=\"#samples\">keypoints</a> "
           "\u00b7 <a href=\"#runs\">runs</a></p>")
    body = "".join(head) + nav + _counts_section(d) + _failures_section(d) + _plots_section(d) + \
        _settings_section(d) + _samples_section(d) + _runs_section(d)
    return page(f"DELG run {s['run_id']}", body)


def _write_text(path: str, text: str) -> None:
    """Temp name then rename, so a reader never sees half a page (local or gs://)."""
    storage.write_bytes(path, text.encode("utf-8"), "text/html")


def write_run_report(output: str, run_id: str | None = None, reader: ColumnReader | None = None) -> str:
    """Build and write <output>/runs/<run_id>/report.html (the latest run when run_id is None); returns its path."""
    d = gather(output, run_id, reader)
    # The page goes beside the summary, named by the run id the summary holds: never a path outside runs/.
    rid = check_run_id(d.summary["run_id"], f"the run id in {layout.summaries_glob(d.output)}")
    path = layout.report_path(d.output, rid)
    _write_text(path, render(d))
    _LOGGER.info("run report: %s", path)
    return path


def write_run_report_after_run(output: str, run_id: str) -> str | None:
    """The end-of-run hook: write the report, but never fail a finished job because of it (logs a warning)."""
    try:
        return write_run_report(output, run_id)
    except Exception as exc:
        _LOGGER.warning("could not write the run report (%s: %s); retry with: delg-extract report %s --run_id %s",
                        type(exc).__name__, exc, output, run_id)
        return None


def report_command(argv: Sequence[str]) -> str:
    """`delg-extract report <output> [--run_id ID]`: writes the report, prints and returns its path."""
    parser = argparse.ArgumentParser(prog="delg-extract report",
                                     description="Write <output>/runs/<run_id>/report.html for an existing output.")
    parser.add_argument("output", help="the job's --output (local or gs://)")
    parser.add_argument("--run_id", "--run-id", default=None, help="the run to report (default: the latest)")
    args = parser.parse_args(list(argv))
    if args.run_id is not None:
        check_run_id(args.run_id)
    path = write_run_report(args.output, args.run_id)
    print(path)
    return path
