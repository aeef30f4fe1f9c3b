"""Inputs: glob patterns and manifests (CSV, plain text, Parquet) turned into (image_id, path) pairs.

Manifest formats (detected per file):
  * Parquet (name ends in .parquet): columns `path` and optional `image_id`; the failures table of an
    earlier run is such a manifest, so re-running it retries exactly the failed images.
  * CSV with a header line that has a `path` column (optional `image_id`; other columns are ignored).
  * plain text: one path a line; blank lines and lines starting with '#' are skipped.
When `image_id` is absent or empty it is derived from the path: `derive_image_id(path)`, the first 16 hex
digits of SHA-1 of the path string exactly as listed (so the same path always gets the same id).

Listing happens in our own DoFns (one call per pattern / manifest file) rather than MatchFiles/ReadFromText,
so that each worker can switch to anonymous credentials for a GCS emulator first, exact paths are never
pushed through MatchFiles (which drops or rejects missing files), and CSV quoting is parsed properly.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_job.pipeline.gcs_auth import use_anonymous_credentials_if_emulated

_LOGGER = logging.getLogger(__name__)
NAMESPACE = "delg"
_GLOB_CHARS = "*?["


def derive_image_id(path: str) -> str:
    """Stable id of an input without an explicit image_id: 16 hex digits of SHA-1 of the path (UTF-8)."""
    return hashlib.sha1(path.encode("utf-8")).hexdigest()[:16]


def has_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in _GLOB_CHARS)


def is_parquet_manifest(path: str) -> bool:
    return path.lower().endswith(".parquet")


def _header_columns(first_line: str) -> Optional[List[str]]:
    """The CSV header's column names when the line is a header with a `path` column, else None."""
    try:
        cells = next(csv.reader([first_line]))
    except (csv.Error, StopIteration):
        return None
    names = [c.strip().lower() for c in cells]
    return names if "path" in names else None


def _text_records(stream: Iterable[str], source: str) -> Iterator[Tuple[str, str]]:
    """(image_id, path) from a text manifest stream (CSV with header, or one path a line)."""
    lines = iter(stream)
    first = None
    for line in lines:
        if line.strip() and not line.lstrip().startswith("#"):
            first = line
            break
    if first is None:
        return
    header = _header_columns(first)
    if header is None:
        if source.lower().endswith(".csv"):
            raise ValueError(f"CSV manifest {source} has no 'path' column in its header line: add a header 'path[,image_id]'")
        path = first.strip()
        yield derive_image_id(path), path
        for line in lines:
            path = line.strip()
            if path and not path.startswith("#"):
                yield derive_image_id(path), path
        return
    path_col = header.index("path")
    id_col = header.index("image_id") if "image_id" in header else None
    for lineno, cells in enumerate(csv.reader(lines), start=2):
        if not cells or not any(c.strip() for c in cells):
            continue
        if path_col >= len(cells):
            raise ValueError(f"manifest {source} line {lineno}: no value in the 'path' column")
        path = cells[path_col].strip()
        if not path:
            raise ValueError(f"manifest {source} line {lineno}: empty path")
        image_id = cells[id_col].strip() if id_col is not None and id_col < len(cells) else ""
        yield (image_id or derive_image_id(path)), path


def _parquet_records(fileobj, source: str) -> Iterator[Tuple[str, str]]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fileobj)
    names = pf.schema_arrow.names
    if "path" not in names:
        raise ValueError(f"Parquet manifest {source} has no 'path' column (columns: {', '.join(names)})")
    columns = ["path"] + (["image_id"] if "image_id" in names else [])
    for batch in pf.iter_batches(columns=columns, batch_size=65536):
        paths = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(paths)
        for image_id, path in zip(ids, paths):
            if path:
                yield (image_id or derive_image_id(path)), path


def read_manifest(path: str) -> Iterator[Tuple[str, str]]:
    """Yield (image_id, path) for every entry of one manifest file (local or gs://)."""
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        if is_parquet_manifest(path):
            yield from _parquet_records(raw, path)
            return
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        yield from _text_records(text, path)


def match_paths(pattern: str) -> List[str]:
    """Files matching a glob (local or gs://), sorted; directories are left out."""
    result = FileSystems.match([pattern])[0]
    out = []
    for meta in result.metadata_list:
        p = meta.path
        if p.endswith("/"):
            continue
        if "://" not in p:
            import os

            if os.path.isdir(p):
                continue
        out.append(p)
    return sorted(out)


class ExpandGlobFn(beam.DoFn):
    """pattern -> (image_id, path) for every file it matches (one FileSystems.match call per pattern)."""

    def setup(self):
        use_anonymous_credentials_if_emulated()
        self._listed = Metrics.counter(NAMESPACE, "inputs_listed")

    def process(self, pattern: str):
        paths = match_paths(pattern)
        _LOGGER.info("input pattern %s matched %d files", pattern, len(paths))
        self._listed.inc(len(paths))
        for path in paths:
            yield derive_image_id(path), path


class ExpandManifestPatternFn(beam.DoFn):
    """manifest file or pattern -> manifest file paths."""

    def setup(self):
        use_anonymous_credentials_if_emulated()

    def process(self, pattern: str):
        if has_glob(pattern):
            yield from match_paths(pattern)
        else:
            yield pattern


class ReadManifestFn(beam.DoFn):
    """manifest file -> (image_id, path) per entry, streamed."""

    def setup(self):
        use_anonymous_credentials_if_emulated()
        self._listed = Metrics.counter(NAMESPACE, "inputs_listed")

    def process(self, manifest: str):
        n = 0
        for record in read_manifest(manifest):
            n += 1
            yield record
        self._listed.inc(n)
        _LOGGER.info("manifest %s listed %d images", manifest, n)


class ListInputs(beam.PTransform):
    """Globs and manifests -> PCollection[(image_id, path)], one element per listed path (duplicates kept)."""

    def __init__(self, inputs: Sequence[str], manifests: Sequence[str]):
        super().__init__()
        self._inputs = list(inputs)
        self._manifests = list(manifests)

    def expand(self, pbegin):
        parts = []
        if self._inputs:
            parts.append(
                pbegin
                | "GlobPatterns" >> beam.Create(self._inputs, reshuffle=False)
                | "ExpandGlobs" >> beam.ParDo(ExpandGlobFn())
            )
        if self._manifests:
            parts.append(
                pbegin
                | "ManifestPatterns" >> beam.Create(self._manifests, reshuffle=False)
                | "ExpandManifestPatterns" >> beam.ParDo(ExpandManifestPatternFn())
                | "ReadManifests" >> beam.ParDo(ReadManifestFn())
            )
        if len(parts) == 1:
            return parts[0]
        return parts | "MergeInputs" >> beam.Flatten()


# ----------------------------------------------------------------------------- launcher-side checks

def check_inputs(inputs: Sequence[str], manifests: Sequence[str], *, count: bool = False) -> Optional[int]:
    """Validate inputs before launch; raise ValueError (one line) on the first problem.

    Every --input pattern must match at least one file; every manifest must exist and (text) have a
    usable first line. With count=True the listed inputs are counted (for progress) and returned; this
    lists everything on the launcher, so it is only done for local runs.
    """
    total = 0
    for pattern in inputs:
        if count:
            n = len(match_paths(pattern))
        else:
            n = len(FileSystems.match([pattern], limits=[1])[0].metadata_list) if has_glob(pattern) else (
                1 if FileSystems.exists(pattern) else 0)
        if n == 0:
            raise ValueError(f"--input {pattern} matches no file: check the path and quote the glob")
        total += n
    for pattern in manifests:
        files = match_paths(pattern) if has_glob(pattern) else [pattern]
        if not files or not all(FileSystems.exists(f) for f in files):
            missing = pattern if not files else next(f for f in files if not FileSystems.exists(f))
            raise ValueError(f"--manifest {missing} does not exist")
        for manifest in files:
            if count:
                total += sum(1 for _ in read_manifest(manifest))
            else:
                # Reads only the first record: catches a CSV without a 'path' column before launch.
                next(iter(read_manifest(manifest)), None)
    return total if count else None
