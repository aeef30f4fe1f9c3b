"""Load any DELG SavedModel (TF2 `serving_default` or TF1 graph via `.prune`) from a dir, gs://, .tar.gz or embedded.

`load_delg_model(uri)` resolves the URI to a local SavedModel directory (downloading / unpacking once
into a cache shared safely by concurrent worker processes), detects the export format, checks that the
model has the inputs and outputs the official DELG extractor uses, and returns a `LoadedDelgModel` whose
`run()` computes local and global features of one image in ONE model call.

Supported URIs:
  * a local SavedModel directory;
  * `gs://bucket/dir` (objects copied into the cache through the project's storage layer, beam_job.storage);
  * a `.tar.gz` / `.tgz` archive, local, `gs://` or `http(s)://` (the official pretrained tarballs);
  * `embedded:<arch>` (our fixed-seed, UNTRAINED DELG, exported on first use; see embedded.py).

Model formats:
  * "tf2": `signatures['serving_default']` with the official keyword inputs input_image (uint8 [H,W,3]),
    input_scales (float32 [S]), input_max_feature_num (int32 []), input_abs_thres (float32 []),
    input_global_scales_ind (int32 [G]); outputs boxes, features, scales, scores, global_descriptors.
    A local-only export lacks input_global_scales_ind and global_descriptors.
  * "tf1": a graph SavedModel (the official pretrained tarballs), driven through
    `.prune(feeds, fetches)` on tensor names 'input_image:0', ... 'global_descriptors:0'. The graph is
    inspected to find which of them exist and which placeholders each output depends on, which covers
    local-only, global-only and the Kaggle 2020 model (global_descriptors depends only on the image and
    scales and returns one row per input scale; `run()` then keeps the requested rows itself).

The cache directory and its build-once helper are in cache.py. TensorFlow is imported lazily. No Beam.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from beam_job.config import EMBEDDED_MODEL_PREFIX
from beam_job.delg.cache import SAVED_MODEL_FILE, build_once, default_cache_dir
from beam_job.errors import first_line

logger = logging.getLogger(__name__)

_TARBALL_SUFFIXES = (".tar.gz", ".tgz")

# Official tensor / signature names.
IN_IMAGE = "input_image"
IN_SCALES = "input_scales"
IN_MAX_FEATURES = "input_max_feature_num"
IN_THRESHOLD = "input_abs_thres"
IN_GLOBAL_IND = "input_global_scales_ind"
LOCAL_OUTPUTS = ("boxes", "features", "scales", "scores")
GLOBAL_OUTPUT = "global_descriptors"
OFFICIAL_INPUTS = (IN_IMAGE, IN_SCALES, IN_MAX_FEATURES, IN_THRESHOLD, IN_GLOBAL_IND)
OFFICIAL_OUTPUTS = (*LOCAL_OUTPUTS, GLOBAL_OUTPUT)

_HINT = "pass the unpacked model directory or the official .tar.gz (see docs/delg-core.md)"


class ModelLoadError(ValueError):
    """The model URI cannot be resolved, or the SavedModel lacks an input/output DELG extraction needs."""


def _key(*parts: Any) -> str:
    return hashlib.sha256("\x00".join(str(p) for p in parts).encode("utf-8")).hexdigest()[:16]


def _safe_name(uri: str) -> str:
    base = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    for suffix in _TARBALL_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[:60] or "model"


# --------------------------------------------------------------------------------------------------
# Remote (gs://) access through the project's storage layer
# --------------------------------------------------------------------------------------------------


def _storage():
    """The project's storage layer (Beam's FileSystems), imported only for remote URIs: loading a local
    model never imports Beam."""
    from beam_job import storage

    return storage


def read_remote_bytes(uri: str) -> bytes:
    """The whole content of one remote (gs://) file; ModelLoadError (one line) when it cannot be read."""
    try:
        return _storage().read_bytes(uri)
    except Exception as err:  # BeamIOError, FileNotFoundError, google.api_core errors
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ModelLoadError(f"{uri} cannot be read ({reason})") from None


def _remote_listing(pattern: str) -> list[tuple[str, int, float]]:
    """(path, size, modified) of the remote files matching a glob; [] when none."""
    return _storage().listing(pattern)


# --------------------------------------------------------------------------------------------------
# URI resolution
# --------------------------------------------------------------------------------------------------


def _is_tarball(uri: str) -> bool:
    path = urllib.parse.urlparse(uri).path if "://" in uri else uri
    return path.lower().endswith(_TARBALL_SUFFIXES)


def _find_saved_model_dir(root: str, origin: str) -> str:
    found = sorted(dirpath for dirpath, _, files in os.walk(root) if SAVED_MODEL_FILE in files)
    if not found:
        raise ModelLoadError(f"{origin} contains no {SAVED_MODEL_FILE}: it is not a SavedModel archive; {_HINT}")
    if len(found) > 1:
        rel = [os.path.relpath(f, root) for f in found]
        raise ModelLoadError(
            f"{origin} contains several SavedModels ({', '.join(rel)}): unpack it and pass one directory"
        )
    return found[0]


def _unpack_tarball(archive: str, dest: str, origin: str) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(dest, filter="data")  # refuses absolute paths, '..', devices, unsafe links
    except (tarfile.TarError, OSError, EOFError) as err:
        reason = " ".join(str(err).split())[:200]
        raise ModelLoadError(f"{origin} is not a readable .tar.gz archive ({reason}); download it again") from None


def _resolve_tarball(uri: str, cache_dir: str) -> str:
    if uri.startswith("gs://"):
        found = _remote_listing(uri)
        if not found:
            raise ModelLoadError(f"{uri} does not exist")
        stamp = f"{found[0][1]}:{found[0][2]}"
    elif uri.startswith(("http://", "https://")):
        stamp = "url"
    else:
        path = os.path.abspath(os.path.expanduser(uri))
        if not os.path.isfile(path):
            raise ModelLoadError(f"{uri} does not exist: give the path of the downloaded .tar.gz or a model directory")
        st = os.stat(path)
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        uri = path
    target = os.path.join(cache_dir, "models", f"{_safe_name(uri)}-{_key(uri, stamp)}")

    def build(tmp: str) -> None:
        archive = uri
        if uri.startswith("gs://") or uri.startswith(("http://", "https://")):
            archive = os.path.join(tmp, ".download.tar.gz")
            logger.info("Downloading %s", uri)
            if uri.startswith("gs://"):
                _storage().download(uri, archive)
            else:
                try:
                    with urllib.request.urlopen(uri, timeout=60) as resp, open(archive, "wb") as out:
                        shutil.copyfileobj(resp, out, length=1 << 20)
                except OSError as err:
                    reason = " ".join(str(err).split())[:200]
                    raise ModelLoadError(
                        f"cannot download {uri} ({reason}); download it by hand and pass the file"
                    ) from None
        logger.info("Unpacking %s into %s", uri, target)
        unpacked = os.path.join(tmp, "unpacked")
        _unpack_tarball(archive, unpacked, uri)
        if archive != uri:
            os.remove(archive)
        _find_saved_model_dir(unpacked, uri)  # validate before publishing

    build_once(target, build)
    return _find_saved_model_dir(os.path.join(target, "unpacked"), uri)


def _resolve_gcs_dir(uri: str, cache_dir: str) -> str:
    prefix = uri.rstrip("/") + "/"
    listing = _remote_listing(prefix + "**")
    if not listing:
        raise ModelLoadError(f"{uri} is empty or does not exist; {_HINT}")
    if not any(path[len(prefix):] == SAVED_MODEL_FILE for path, _, _ in listing):
        raise ModelLoadError(f"{uri} is not a SavedModel (no {SAVED_MODEL_FILE}): {_HINT}")
    target = os.path.join(cache_dir, "models", f"{_safe_name(uri)}-{_key(uri.rstrip('/'), listing)}")

    def build(tmp: str) -> None:
        logger.info("Copying %d objects of %s into %s", len(listing), uri, target)
        for path, _, _ in listing:
            rel = path[len(prefix):]
            if not rel or rel.startswith("/") or ".." in rel.split("/"):
                continue
            dest = os.path.join(tmp, rel)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            _storage().download(path, dest)

    build_once(target, build)
    return target


def resolve_model_path(uri: str, *, cache_dir: str | None = None) -> str:
    """The local SavedModel directory for a model URI (downloading / unpacking into the cache once)."""
    if not uri or not isinstance(uri, str):
        raise ModelLoadError(
            "no model given: pass --model with a SavedModel directory, .tar.gz, gs:// URI or embedded:<arch>"
        )
    cache = os.path.abspath(os.path.expanduser(cache_dir or default_cache_dir()))
    if uri.startswith(EMBEDDED_MODEL_PREFIX):
        from beam_job.delg.embedded import embedded_model_path

        arch = uri[len(EMBEDDED_MODEL_PREFIX) :] or "r50"
        try:
            return embedded_model_path(arch, cache_dir=cache)
        except ValueError as err:
            raise ModelLoadError(str(err)) from None
    if _is_tarball(uri):
        return _resolve_tarball(uri, cache)
    if uri.startswith("gs://"):
        return _resolve_gcs_dir(uri, cache)
    if uri.startswith(("http://", "https://")):
        raise ModelLoadError(f"{uri}: only .tar.gz / .tgz archives can be loaded over http(s)")
    path = os.path.abspath(os.path.expanduser(uri))
    if not os.path.exists(path):
        raise ModelLoadError(f"{uri} does not exist: {_HINT}")
    if os.path.isfile(path):
        raise ModelLoadError(f"{uri} is a file, not a SavedModel directory: {_HINT}")
    if not os.path.isfile(os.path.join(path, SAVED_MODEL_FILE)):
        raise ModelLoadError(f"{uri} is not a SavedModel (no {SAVED_MODEL_FILE}): {_HINT}")
    return path


# --------------------------------------------------------------------------------------------------
# The loaded model
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedDelgModel:
    """A DELG SavedModel ready to run, whatever its export format.

    uri:          the URI it was loaded from.
    local_path:   the local SavedModel directory.
    format:       "tf2" (serving_default signature) or "tf1" (graph driven through .prune).
    has_local:    the model outputs boxes, features, scales, scores.
    has_global:   the model outputs global_descriptors.
    takes_global_scales_ind: the model selects global rows itself (input_global_scales_ind). When False
                  (Kaggle 2020 model) it returns one row per input scale and run() keeps the requested ones.
    identity:     "<uri>@sha256:<first 12 hex of saved_model.pb>", for output metadata ("+bf16" appended
                  when run in bfloat16).
    precision:    "fp32" or "bf16", the compute precision it runs in.
    """

    uri: str
    local_path: str
    format: str
    has_local: bool
    has_global: bool
    takes_global_scales_ind: bool
    identity: str
    precision: str
    _call: Callable[..., dict[str, np.ndarray]] = dataclasses.field(repr=False)
    _keep: Any = dataclasses.field(default=None, repr=False)  # keeps the loaded TF object alive

    @property
    def is_embedded(self) -> bool:
        return self.uri.startswith(EMBEDDED_MODEL_PREFIX)

    def run(
        self,
        image: np.ndarray,
        scales: Sequence[float],
        max_feature_num: int,
        abs_thres: float,
        global_scales_ind: Sequence[int],
    ) -> dict[str, np.ndarray]:
        """Run the model once on one image; raw outputs as numpy arrays.

        image: uint8 [H, W, 3] RGB (already resized by the caller). scales: pyramid scales.
        Returns the keys present among:
          boxes [N, 4] float32 (ymin, xmin, ymax, xmax) receptive boxes in input-image pixels,
          features [N, D] float32 raw local descriptors, scales [N] float32 (1/scale), scores [N, 1] float32,
          global_descriptors [G, 2048] float32 raw (un-normalised) rows for the scales in
          global_scales_ind, in increasing scale-index order (as the official graph returns them).
        """
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} {list(image.shape)}")
        scale_array = np.asarray(scales, dtype=np.float32).reshape(-1)
        out = self._call(
            image,
            scale_array,
            int(max_feature_num),
            float(abs_thres),
            np.asarray(global_scales_ind, dtype=np.int32).reshape(-1),
        )
        if self.precision != "fp32" and "boxes" in out and len(out["boxes"]):
            out["boxes"], out["scales"] = exact_receptive_geometry(out["boxes"], out["scales"], scale_array)
        return out


def exact_receptive_geometry(boxes: np.ndarray, inv_scales: np.ndarray, scales: np.ndarray):
    """The float32 boxes and 1/scale outputs that the fp32 graph gives, recovered from a bf16 run's.

    In bf16 the Grappler pass also rewrites the box arithmetic, (stride * cell + offset) / scale and 1 / scale,
    which moved keypoints by up to 0.4% of their coordinates (1/sqrt(2) came out as 0.70703125). Both are pure
    functions of the cell index and the requested scale, so each row's level is the requested scale nearest its
    1/scale, its cell index the nearest integer, and the geometry is computed again in float32 exactly as the
    graph computes it (multiply-add of integers, then one correctly rounded division: the same bits). Keeping
    the pass away from the division instead (its deny list) also turned off bf16 for the whole network. Rows
    that do not fit the DELG grid (a model with other geometry) are left as the model gave them.
    """
    from beam_job.delg.architecture import FEATURE_STRIDE, RECEPTIVE_BOX_OFFSETS

    scales = np.asarray(scales, np.float32)
    inverse = np.float32(1.0) / scales
    level = np.argmin(np.abs(np.asarray(inv_scales, np.float32).reshape(-1, 1) - inverse.reshape(1, -1)), axis=1)
    s = scales[level].reshape(-1, 1)
    bias = np.array(RECEPTIVE_BOX_OFFSETS, np.float32)
    cells = (np.asarray(boxes, np.float64) * s - bias) / FEATURE_STRIDE
    index = np.rint(cells)
    exact = (np.float32(FEATURE_STRIDE) * index.astype(np.float32) + bias) / s
    fits = (np.abs(cells - index).max(axis=1) < 0.25) & (index[:, 0] == index[:, 2]) & (index[:, 1] == index[:, 3])
    fixed_boxes = np.where(fits[:, None], exact, boxes).astype(np.float32)
    fixed_scales = np.where(fits, inverse[level], inv_scales).astype(np.float32)
    return fixed_boxes, fixed_scales


def _select_global_rows(rows: np.ndarray, global_scales_ind: np.ndarray) -> np.ndarray:
    """Rows of a per-scale [S, D] array at the requested indices, in increasing order, no duplicates."""
    keep = sorted({int(i) for i in global_scales_ind})
    bad = [i for i in keep if not 0 <= i < rows.shape[0]]
    if bad:
        raise ValueError(f"global_scales_ind {bad} out of range for {rows.shape[0]} scales")
    return rows[keep]


def _sha12(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def _missing_local(names) -> list[str]:
    return [n for n in LOCAL_OUTPUTS if n not in names]


@dataclasses.dataclass(frozen=True)
class DelgModelInfo:
    """What a DELG SavedModel offers, read from its saved_model.pb alone (no weights restored, no graph run).

    format:      "tf2" (an object graph with signatures) or "tf1" (a graph driven through .prune).
    has_local / has_global / takes_global_scales_ind: as LoadedDelgModel.
    feeds:       official input names the model call takes, in official order.
    fetches:     official output names the model call returns, in official order.
    dtypes:      input name -> TensorFlow dtype enum value of that input.
    identity:    "<uri>@sha256:<first 12 hex of saved_model.pb>".
    """

    format: str
    has_local: bool
    has_global: bool
    takes_global_scales_ind: bool
    feeds: tuple[str, ...]
    fetches: tuple[str, ...]
    dtypes: tuple[tuple[str, int], ...]
    identity: str


def _meta_graph(local_path: str, where: str):
    """The serving MetaGraphDef of a SavedModel and whether tf.saved_model.load reads it as a TF2 object graph."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    try:
        with open(os.path.join(local_path, SAVED_MODEL_FILE), "rb") as handle:
            proto.ParseFromString(handle.read())
    except Exception as err:  # DecodeError and friends: one line
        raise ModelLoadError(f"{where}: {SAVED_MODEL_FILE} cannot be parsed ({first_line(err)}); {_HINT}") from None
    if not proto.meta_graphs:
        raise ModelLoadError(f"{where}: {SAVED_MODEL_FILE} holds no MetaGraph; {_HINT}")
    # tf.saved_model.load's own rule: one MetaGraph with an object graph is a TF2 model, anything else TF1.
    is_tf2 = len(proto.meta_graphs) == 1 and proto.meta_graphs[0].HasField("object_graph_def")
    serving = [m for m in proto.meta_graphs if "serve" in m.meta_info_def.tags]
    return (serving or list(proto.meta_graphs))[0], is_tf2


def _check_tf2(meta, where: str):
    """Inputs/outputs of the serving_default signature; returns (has_local, has_global, takes_gsi, dtypes)."""
    signatures = meta.signature_def
    if "serving_default" not in signatures:
        keys = sorted(k for k in signatures.keys() if not k.startswith("__"))
        raise ModelLoadError(
            f"{where} has no 'serving_default' signature (signatures: {keys or 'none'}): "
            "export it with the official export_local_and_global_model.py or beam_job.delg.export"
        )
    sig = signatures["serving_default"]
    inputs = {name: info.dtype for name, info in sig.inputs.items()}
    outputs = set(sig.outputs.keys())
    extra = sorted(set(inputs) - set(OFFICIAL_INPUTS))
    if extra:
        raise ModelLoadError(
            f"{where} serving_default has unexpected input(s) {extra} (inputs: {sorted(inputs)}); "
            f"a DELG export takes {', '.join(OFFICIAL_INPUTS)}"
        )
    for name in (IN_IMAGE, IN_SCALES):
        if name not in inputs:
            raise ModelLoadError(
                f"{where} serving_default lacks input '{name}' (inputs: {sorted(inputs)}); "
                "fixed-scale global-only exports (Kaggle format, --input_scales_list) are not supported: "
                "export without --input_scales_list"
            )
    has_global = GLOBAL_OUTPUT in outputs
    present_local = [n for n in LOCAL_OUTPUTS if n in outputs]
    if present_local and _missing_local(outputs):
        raise ModelLoadError(
            f"{where} serving_default lacks output(s) {_missing_local(outputs)} (outputs: {sorted(outputs)})"
        )
    has_local = bool(present_local)
    if not (has_local or has_global):
        raise ModelLoadError(
            f"{where} serving_default has neither local (boxes, features, scales, scores) nor "
            f"global_descriptors outputs (outputs: {sorted(outputs)})"
        )
    if has_local:
        for name in (IN_MAX_FEATURES, IN_THRESHOLD):
            if name not in inputs:
                raise ModelLoadError(f"{where} serving_default lacks input '{name}' needed by its local outputs")
    return has_local, has_global, IN_GLOBAL_IND in inputs, inputs


def _node_name(edge: str) -> str:
    return edge.lstrip("^").split(":", 1)[0]


def _placeholder_deps(nodes: dict[str, Any], name: str) -> set:
    """Names of the Placeholder nodes that node `name` depends on (data and control edges) in a GraphDef."""
    seen = set()
    stack = [name]
    found = set()
    while stack:
        current = stack.pop()
        if current in seen or current not in nodes:
            continue
        seen.add(current)
        node = nodes[current]
        official_default = node.op == "PlaceholderWithDefault" and current in OFFICIAL_INPUTS
        if node.op in ("Placeholder", "PlaceholderV2") or official_default:
            found.add(current)
        stack.extend(_node_name(edge) for edge in node.input)
    return found


def _check_tf1(meta, where: str):
    """Tensors of a TF1 graph; returns (has_local, has_global, takes_gsi, feed dtypes, fetch names)."""
    nodes = {node.name: node for node in meta.graph_def.node}
    for name in (IN_IMAGE, IN_SCALES):
        if name not in nodes:
            raise ModelLoadError(f"{where} graph has no '{name}:0' tensor: not a DELG export ({_HINT})")
    present_local = [n for n in LOCAL_OUTPUTS if n in nodes]
    if present_local and _missing_local(present_local):
        raise ModelLoadError(
            f"{where} graph lacks output tensor(s) {[n + ':0' for n in _missing_local(present_local)]} "
            f"(has {[n + ':0' for n in present_local]})"
        )
    has_local = bool(present_local)
    has_global = GLOBAL_OUTPUT in nodes
    if not (has_local or has_global):
        raise ModelLoadError(
            f"{where} graph has neither local (boxes:0, features:0, scales:0, scores:0) nor "
            "global_descriptors:0 outputs"
        )
    fetch_names = [n for n in OFFICIAL_OUTPUTS if n in nodes]
    needed: set = set()
    for name in fetch_names:
        deps = _placeholder_deps(nodes, name)
        unknown = sorted(deps - set(OFFICIAL_INPUTS))
        if unknown:
            raise ModelLoadError(
                f"{where}: output '{name}:0' depends on placeholder(s) {unknown} that DELG extraction cannot feed"
            )
        needed |= deps
    takes_gsi = has_global and IN_GLOBAL_IND in _placeholder_deps(nodes, GLOBAL_OUTPUT)
    feed_names = [n for n in OFFICIAL_INPUTS if n in needed or n in (IN_IMAGE, IN_SCALES)]
    dtypes = {n: nodes[n].attr["dtype"].type for n in feed_names}
    return has_local, has_global, takes_gsi, dtypes, fetch_names


def inspect_delg_model(uri: str, *, cache_dir: str | None = None) -> tuple[str, DelgModelInfo]:
    """Resolve a model URI and check it from its saved_model.pb alone: (local path, DelgModelInfo).

    Runs every check load_delg_model runs on the model's inputs and outputs, without restoring weights or
    building a graph (milliseconds and a few MB instead of the whole model); raises ModelLoadError (one line).
    """
    local_path = resolve_model_path(uri, cache_dir=cache_dir)
    meta, is_tf2 = _meta_graph(local_path, uri)
    if is_tf2:
        has_local, has_global, takes_gsi, dtypes = _check_tf2(meta, uri)
        fetches = [n for n in OFFICIAL_OUTPUTS if n in meta.signature_def["serving_default"].outputs]
    else:
        has_local, has_global, takes_gsi, dtypes, fetches = _check_tf1(meta, uri)
    info = DelgModelInfo(
        format="tf2" if is_tf2 else "tf1",
        has_local=has_local,
        has_global=has_global,
        takes_global_scales_ind=takes_gsi,
        feeds=tuple(n for n in OFFICIAL_INPUTS if n in dtypes),
        fetches=tuple(fetches),
        dtypes=tuple(sorted(dtypes.items())),
        identity=f"{uri}@sha256:{_sha12(os.path.join(local_path, SAVED_MODEL_FILE))}",
    )
    return local_path, info


def _model_call(info: DelgModelInfo, function, *, keyword: bool):
    """The per-image call of a loaded signature (keyword inputs) or pruned function (positional inputs)."""
    import tensorflow as tf

    dtypes = {name: tf.dtypes.as_dtype(value) for name, value in info.dtypes}
    fix_rows = info.has_global and not info.takes_global_scales_ind

    def call(image, scales, max_feature_num, abs_thres, gsi):
        feeds = {IN_IMAGE: image, IN_SCALES: scales, IN_MAX_FEATURES: max_feature_num, IN_THRESHOLD: abs_thres,
                 IN_GLOBAL_IND: gsi}
        tensors = [tf.constant(feeds[name], dtype=dtypes[name]) for name in info.feeds]
        if keyword:
            result = function(**dict(zip(info.feeds, tensors, strict=True)))
            out = {name: result[name].numpy() for name in info.fetches}
        else:
            out = {name: tensor.numpy() for name, tensor in zip(info.fetches, function(*tensors), strict=True)}
        if fix_rows:
            out[GLOBAL_OUTPUT] = _select_global_rows(out[GLOBAL_OUTPUT], gsi)
        return out

    return call


def load_delg_model(uri: str, *, cache_dir: str | None = None, precision: str = "fp32") -> LoadedDelgModel:
    """Resolve, check, load a DELG SavedModel; raises ModelLoadError (one line) when it cannot be used.

    precision: "fp32" (default, the model as exported) or "bf16" (see beam_job.delg.precision); set for the
    whole process before the model's graph is built.
    """
    from beam_job.delg.precision import use_precision, with_precision

    local_path, info = inspect_delg_model(uri, cache_dir=cache_dir)
    try:
        use_precision(precision)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    import tensorflow as tf

    try:
        obj = tf.saved_model.load(local_path)
    except Exception as err:
        raise ModelLoadError(f"{uri}: TensorFlow cannot load this SavedModel ({first_line(err)}); {_HINT}") from None
    if info.format == "tf1":
        try:
            function = obj.prune([n + ":0" for n in info.feeds], [n + ":0" for n in info.fetches])
        except Exception as err:  # pragma: no cover - TF-internal failures are reported on one line
            raise ModelLoadError(f"{uri}: cannot prune the graph to DELG inputs/outputs ({first_line(err)})") from None
        keep: Any = (obj, function)
    else:
        function = obj.signatures["serving_default"]
        keep = obj
    identity = with_precision(info.identity, precision)
    model = LoadedDelgModel(
        uri=uri,
        local_path=local_path,
        format=info.format,
        has_local=info.has_local,
        has_global=info.has_global,
        takes_global_scales_ind=info.takes_global_scales_ind,
        identity=identity,
        precision=precision,
        _call=_model_call(info, function, keyword=info.format == "tf2"),
        _keep=keep,
    )
    logger.info(
        "Loaded DELG model %s (%s; local=%s, global=%s, global_scales_ind input=%s, %s) from %s",
        identity, info.format, info.has_local, info.has_global, info.takes_global_scales_ind, precision, local_path,
    )
    return model
