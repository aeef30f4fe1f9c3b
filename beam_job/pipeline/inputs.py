r"""Inputs: glob patterns and manifests (CSV, plain text, Parquet) turned into (image_id, path) pairs.

Manifest formats (detected per file):
  * Parquet (name ends in .parquet): columns `path` and optional `image_id`; the failures table of an
    earlier run is such a manifest, so re-running it retries exactly the failed images. Its `path` column
    is in the stored form (`path_to_text`, below), as every table this job writes.
  * CSV with a header line that has a `path` column (optional `image_id`; other columns are ignored).
    Parsed strictly: a quote that is never closed, text after a closing quote, a cell over the csv
    module's field limit (131,072 characters; no path is that long) or a row with more non-empty cells
    than the header is a `ManifestError` naming the file and the line, never rows silently lost.
  * plain text: one path a line. Lines that are empty or only whitespace, and lines whose first character
    is '#', are skipped; every other line is a path exactly as written, without its line ending.
Paths are taken verbatim (CSV quoting by the csv module; nothing stripped). A text manifest's line ends
with "\n", "\r\n" or "\r"; the line ending is not part of the path (names with CR or LF: use a quoted CSV).
Text manifests are UTF-8 (a BOM is allowed); bytes that are not UTF-8 are kept as the raw bytes of the name.
When `image_id` is absent or empty it is derived from the path: `derive_image_id(path)`, the first 16 hex
digits of SHA-1 of the path's bytes (its UTF-8 encoding; the raw bytes of a local name that is not UTF-8).

Paths between the steps of the job and in the `path` column are text in the *stored form*: a path that is
valid UTF-8 is kept as it is; a local name that is not (Linux names are bytes) is written with `\xHH` for
each byte that is not UTF-8 (see `path_to_text` / `text_to_path` and docs/pipeline.md). Beam's coders and
Parquet strings need valid UTF-8, so Python's surrogate-escaped str of such a name cannot travel as is.

An --input that names a folder (a local directory, or a gs:// prefix ending in '/') lists the files directly in
it, as `folder/*` does (not recursive: use `folder/**` for every file below it), whatever their extension; see
`folder_pattern`. A glob matches case-sensitively ('*.jpg' leaves out 'x.JPG'); local runs warn about such
files (`warn_case_skipped`).

Listing happens in our own DoFns (one call per pattern / manifest file, through `beam_job.storage.match`)
rather than MatchFiles/ReadFromText, so that exact paths are never pushed through MatchFiles (which drops
or rejects missing files), entries Beam's local listing cannot stat (a broken symlink) still get a row, and
CSV quoting is parsed properly."""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
import stat
from collections.abc import Iterable, Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_job import storage
from beam_job.pipeline import METRICS_NAMESPACE
from beam_job.storage import has_glob

_LOGGER = logging.getLogger(__name__)
# What `text_to_path` reads as an escape in the stored form: "\\" (one backslash) or "\x80".."\xff" (one byte).
_ESCAPE = re.compile(r"\\(?:\\|x[89a-f][0-9a-f])")


def path_bytes(path: str) -> bytes:
    """The bytes of a path as the OS gives it (str with surrogate escapes for bytes that are not UTF-8)."""
    try:
        return path.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte: keep it rather than fail
        return path.encode("utf-8", "surrogatepass")


def path_to_text(path: str) -> str:
    r"""The stored form of a path: valid UTF-8 text that `text_to_path` turns back into the same path.

    A path that is valid UTF-8 and holds no "\\" or "\x80".."\xff" text is stored as it is (every ordinary
    name, local or gs://). Otherwise every backslash is doubled and every byte that is not UTF-8 is
    written as \xHH (Python's 'backslashreplace'), e.g. b"caf\xe9.jpg" -> "caf\\xe9.jpg" as text.
    """
    raw = path_bytes(path)
    try:
        text = raw.decode("utf-8")
        if not _ESCAPE.search(text):
            return text
    except UnicodeDecodeError:
        pass
    return raw.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def text_to_path(text: str) -> str:
    """The path (as the OS takes it: str with surrogate escapes) of a stored-form text."""
    if "\\" not in text or not _ESCAPE.search(text):
        return text
    out = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(text):
        out += text[pos:match.start()].encode("utf-8")
        token = match.group(0)
        out += b"\\" if token == "\\\\" else bytes([int(token[2:], 16)])
        pos = match.end()
    out += text[pos:].encode("utf-8")
    return out.decode("utf-8", "surrogateescape")


def check_regular_file(path: str) -> None:
    """Raise OSError unless a local path is a regular file (gs:// paths pass): a FIFO would block the read
    forever and a device could stream without end, so they fail at the read stage like a missing file."""
    if "://" in path:
        return
    mode = os.stat(path).st_mode  # FileNotFoundError for a missing file or a broken link
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"is a directory: {path_to_text(path)!r}")
    if not stat.S_ISREG(mode):
        raise OSError(f"not a regular file (a FIFO, socket or device): {path_to_text(path)!r}")


def derive_image_id(path: str) -> str:
    """Stable id of an input without an explicit image_id: 16 hex digits of SHA-1 of the path's bytes.

    `path` as the listing gives it (not the stored form); for every UTF-8 name these are its UTF-8 bytes.
    """
    return hashlib.sha1(path_bytes(path)).hexdigest()[:16]


def listed(path: str, image_id: str = "") -> tuple[str, str]:
    """The (image_id, stored-form path) element of a path as listed (glob, CSV or text manifest)."""
    return (image_id or derive_image_id(path)), path_to_text(path)


def is_parquet_manifest(path: str) -> bool:
    return path.lower().endswith(".parquet")


class ManifestError(ValueError):
    """A manifest that cannot be read as what it says it is; the message is one line naming file and line."""


def _header_columns(first_line: str) -> list[str] | None:
    """The CSV header's column names when the line is a header with a `path` column, else None."""
    try:
        cells = next(csv.reader([first_line]))
    except (csv.Error, StopIteration):
        return None
    names = [c.strip().lower() for c in cells]
    return names if "path" in names else None


def _without_line_ending(line: str) -> str:
    """A text manifest line without its "\\n", "\\r\\n" or "\\r" (nothing else is removed)."""
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith(("\n", "\r")):
        return line[:-1]
    return line


def _is_entry(line: str) -> bool:
    """A text manifest line that lists a path (not blank, not a '#' comment)."""
    return bool(line.strip()) and not line.startswith("#")


def _text_records(stream: Iterable[str], source: str) -> Iterator[tuple[str, str]]:
    """(image_id, stored-form path) from a text manifest stream (CSV with header, or one path a line)."""
    lines = iter(stream)
    first = None
    consumed = 0  # lines read so far (for the line numbers of CSV errors)
    for line in lines:
        consumed += 1
        if _is_entry(line):
            first = line
            break
    if first is None:
        return
    header = _header_columns(first)
    if header is None:
        if source.lower().endswith(".csv"):
            raise ManifestError(f"CSV manifest {source} has no 'path' column in its header line (line {consumed}): "
                                "add a header 'path[,image_id]'")
        yield listed(_without_line_ending(first))
        for line in lines:
            if _is_entry(line):
                yield listed(_without_line_ending(line))
        return
    yield from _csv_records(lines, source, header, consumed)


def _csv_error(exc: csv.Error, source: str, start: int, end: int) -> ManifestError:
    """The one-line error of a CSV record that the csv module refused (it began on line `start`)."""
    where = f"CSV manifest {source}, line {start}"
    text = str(exc)
    if "field larger than field limit" in text:
        return ManifestError(f"{where}: a cell is longer than {csv.field_size_limit()} characters, more than any path "
                             "(a quote that is never closed?): check the quotes from that line on")
    if "unexpected end of data" in text:
        return ManifestError(f"{where}: a quoted cell opened there is never closed (it runs to the end of the file): "
                             "close the quote, and double every quote inside a quoted cell")
    lines = f"line {start}" if end <= start else f"lines {start}-{end}"
    return ManifestError(f"CSV manifest {source}, {lines}: malformed CSV ({text}): quote a cell that holds a comma, "
                         "a quote or a line break, and double every quote inside it")


def _csv_records(lines: Iterator[str], source: str, header: list[str], offset: int) -> Iterator[tuple[str, str]]:
    """The records after the header line (`offset` lines were read before them), parsed strictly."""
    path_col = header.index("path")
    id_col = header.index("image_id") if "image_id" in header else None
    reader = csv.reader(lines, strict=True)
    while True:
        start = offset + reader.line_num + 1  # the line the next record begins on
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise _csv_error(exc, source, start, offset + reader.line_num) from None
        if not cells or not any(c.strip() for c in cells):
            continue
        if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
            raise ManifestError(
                f"CSV manifest {source}, line {start}: {len(cells)} cells where the header has {len(header)}: "
                "quote a path that holds a comma")
        path = cells[path_col] if path_col < len(cells) else ""
        image_id = cells[id_col].strip() if id_col is not None and id_col < len(cells) else ""
        if not path:
            # Nothing to read: no row can be made for it (logged and counted, as documented).
            Metrics.counter(METRICS_NAMESPACE, "manifest_lines_without_path").inc()
            _LOGGER.warning("manifest %s, line %d: a line without a path was skipped: %r", source, start, cells)
            continue
        yield listed(path, path_to_text(image_id))


def _parquet_records(fileobj, source: str) -> Iterator[tuple[str, str]]:
    """(image_id, path) from a Parquet manifest; its `path` column is already in the stored form."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(fileobj)
    names = pf.schema_arrow.names
    if "path" not in names:
        raise ValueError(f"Parquet manifest {source} has no 'path' column (columns: {', '.join(names)})")
    columns = ["path"] + (["image_id"] if "image_id" in names else [])
    for batch in pf.iter_batches(columns=columns, batch_size=65536):
        paths = batch.column(0).to_pylist()
        ids = batch.column(1).to_pylist() if len(columns) == 2 else [None] * len(paths)
        for image_id, text in zip(ids, paths, strict=True):
            if text:
                yield (image_id or derive_image_id(text_to_path(text))), text


def read_manifest(path: str) -> Iterator[tuple[str, str]]:
    """Yield (image_id, stored-form path) for every entry of one manifest file (local or gs://)."""
    with storage.open_read(path) as raw:
        if is_parquet_manifest(path):
            yield from _parquet_records(raw, path)
            return
        # newline="": lines keep their own ending (csv needs it for quoted newlines); see _without_line_ending.
        text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
        yield from _text_records(text, path)


def folder_pattern(pattern: str) -> str:
    """The glob an --input stands for: a folder (a local directory, or a gs:// prefix ending in '/') lists the
    files directly in it (`folder/*`, not recursive, as a glob ending in '/' does); anything else is itself."""
    if has_glob(pattern):
        return pattern
    if storage.is_remote(pattern):
        return pattern + "*" if pattern.endswith("/") else pattern
    if os.path.isdir(pattern):
        return pattern + "*" if pattern.endswith("/") else pattern + "/*"
    return pattern


# A glob whose last part ends in '*' and a literal extension ('photos/*.jpg'): matching is case-sensitive, as
# on any Linux file system and in gs://, so it leaves out 'x.JPG'; see `case_variant_pattern`.
_LITERAL_EXTENSION = re.compile(r"\*\.([A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*)\Z")


def case_variant_pattern(pattern: str) -> str | None:
    """The glob that also matches every letter case of the pattern's literal extension ('d/*.jpg' ->
    'd/*.[jJ][pP][gG]'), or None when the pattern does not end in '*.<extension>'."""
    found = _LITERAL_EXTENSION.search(pattern)
    if not found:
        return None
    any_case = "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in found.group(1))
    return pattern[:found.start(1)] + any_case


def warn_case_skipped(pattern: str, matched: Sequence[str]) -> int:
    """Log one warning when `pattern` ('*.jpg') leaves out files whose extension differs only in case ('.JPG'),
    naming how many and how to include them; returns that number. Lists the folder a second time."""
    variant = case_variant_pattern(pattern)
    if variant is None:
        return 0
    skipped = sorted(set(storage.match(variant)) - set(matched))
    if skipped:
        extensions = sorted({os.path.splitext(p)[1] for p in skipped})
        _LOGGER.warning("--input %s matched %d files and left out %d whose extension differs only in case (%s, "
                        "e.g. %s): add --input '%s' for them, or give the folder (it reads every file in it)",
                        pattern, len(matched), len(skipped), ", ".join(extensions), path_to_text(skipped[0]),
                        path_to_text(pattern[:-len(extensions[0])] + extensions[0]))
    return len(skipped)


class ExpandGlobFn(beam.DoFn):
    """pattern -> (image_id, path) for every file it matches (one listing per pattern)."""

    def setup(self):
        self._listed = Metrics.counter(METRICS_NAMESPACE, "inputs_listed")

    def process(self, pattern: str):
        paths = storage.match(folder_pattern(text_to_path(pattern)))
        _LOGGER.info("input pattern %s matched %d files", pattern, len(paths))
        self._listed.inc(len(paths))
        for path in paths:
            yield listed(path)


class ExpandManifestPatternFn(beam.DoFn):
    """manifest file or pattern -> manifest file paths (stored form)."""

    def process(self, pattern: str):
        if has_glob(pattern):
            yield from (path_to_text(p) for p in storage.match(text_to_path(pattern)))
        else:
            yield pattern


class ReadManifestFn(beam.DoFn):
    """manifest file -> (image_id, path) per entry, streamed."""

    def setup(self):
        self._listed = Metrics.counter(METRICS_NAMESPACE, "inputs_listed")

    def process(self, manifest: str):
        n = 0
        for record in read_manifest(text_to_path(manifest)):
            n += 1
            yield record
        self._listed.inc(n)
        _LOGGER.info("manifest %s listed %d images", manifest, n)


class ListInputs(beam.PTransform):
    """Globs and manifests -> PCollection[(image_id, path)], one element per listed path (duplicates kept).

    Paths are in the stored form (`path_to_text`); open them with `text_to_path(path)`.
    """

    def __init__(self, inputs: Sequence[str], manifests: Sequence[str]):
        super().__init__()
        self._inputs = [path_to_text(p) for p in inputs]
        self._manifests = [path_to_text(p) for p in manifests]

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

# A manifest up to this size is read through on the launcher before a remote launch too (local runs read every
# manifest to count the inputs), so that a malformed one is refused before launch; a larger one is checked
# there up to its first record, and in full by the job (a malformed line then fails the job, naming it).
LAUNCHER_CHECK_BYTES = 64 << 20


def _size_or_none(path: str) -> float:
    """The file's size, or infinity when it cannot be had (the first-record read then reports the problem)."""
    try:
        return storage.size(path)
    except Exception:
        return float("inf")


def check_inputs(inputs: Sequence[str], manifests: Sequence[str], *, count: bool = False) -> int | None:
    """Validate inputs before launch; raise ValueError (one line) on the first problem.

    Every --input pattern (or folder) must match at least one file; every manifest must exist and parse
    (text manifests up to LAUNCHER_CHECK_BYTES in full, larger ones up to their first record). With
    count=True the listed inputs are counted (for progress) and returned; this lists and reads everything
    on the launcher, so it is only done for local runs, which also warn about files a '*.jpg' leaves out
    for their extension's case (`warn_case_skipped`).
    """
    total = 0
    for given in inputs:
        pattern = folder_pattern(given)
        if count:
            matched = storage.match(pattern)
            n = len(matched)
            if n:
                warn_case_skipped(pattern, matched)
        else:
            n = len(storage.match(pattern, limit=1)) if has_glob(pattern) else (1 if storage.exists(pattern) else 0)
        if n == 0:
            if pattern != given:
                raise ValueError(f"--input {given} matches no file: the folder holds no file (its subfolders are not "
                                 f"listed: use '{storage.join(given, '**')}' for every file below it)")
            hint = ""
            if storage.is_remote(given) and not has_glob(given) and storage.match(given + "/*", limit=1):
                hint = f" (a folder: write it with a trailing '/', '{given}/')"
            raise ValueError(f"--input {given} matches no file{hint}: check the path and quote the glob")
        total += n
    for pattern in manifests:
        files = storage.match(pattern) if has_glob(pattern) else [pattern]
        if not files or not all(storage.exists(f) for f in files):
            missing = pattern if not files else next(f for f in files if not storage.exists(f))
            raise ValueError(f"--manifest {missing} does not exist")
        for manifest in files:
            if count or (not is_parquet_manifest(manifest) and _size_or_none(manifest) <= LAUNCHER_CHECK_BYTES):
                n = sum(1 for _ in read_manifest(manifest))  # reads it all: a malformed line is refused here
                total += n
            else:
                # Reads only the first record: catches a CSV without a 'path' column before launch.
                next(iter(read_manifest(manifest)), None)
    return total if count else None
