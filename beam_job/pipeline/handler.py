"""DelgModelHandler: our RunInference ModelHandler (Beam's TF handlers cannot drive DELG, see docs/pipeline.md).

What Beam's ModelHandler does for us, through its own keyword arguments: one image per call
(`min_batch_size=1, max_batch_size=1`: images differ in size, so they are not stacked), the model loaded
once per worker process through `Shared` and used by all its threads, or with share_across_processes=True
(`--share_model_across_processes`, Beam's `large_model=True`) one copy per machine in a separate process
(MultiProcessShared), and the model-load metrics (one `RunInference/load_model_latency_milli_secs` update
per load, plus `model_byte_size`). Its other arguments do not apply: max_batch_duration_secs (streaming),
model_copies (one copy a machine is what the flag asks), env_vars (none needed).

What is ours: loading and calling the DELG extractor (TensorFlow is imported inside load_model, never at
module import); the methods-only DelgModelService (a MultiProcessShared proxy only forwards method calls);
get_num_bytes (the image bytes, instead of pickling the batch); and turning an error of the model call into
an InferenceError result, which ToRows writes as a failure row at stage "inference" (see InferenceError for
why not RunInference's dead letters).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from apache_beam.metrics import Metrics
from apache_beam.ml.inference import base as inference_base
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beam_job.config import ExtractionConfig
from beam_job.pipeline import METRICS_NAMESPACE

_LOGGER = logging.getLogger(__name__)

# Beam 2.77 imports the `resource` module in the same try block as its torch-only ModelManager, so without
# torch it sets it to None and RunInference logs "Resource module is not available for current platform" at
# every model load (and reports 0 bytes of memory). The module is there on Linux and macOS: give it back.
if getattr(inference_base, "resource", True) is None:
    try:
        import resource
    except ImportError:  # Windows: Beam's warning is then true
        pass
    else:
        inference_base.resource = resource


class DelgModelService:
    """The loaded model behind a methods-only interface (works directly and through a cross-process proxy)."""

    def __init__(self, config: ExtractionConfig):
        from beam_job.delg.extractor import DelgExtractor

        self._extractor = DelgExtractor(config)

    def extract(self, prepared):
        """PreparedImage -> DelgFeatures (see beam_job.features for shapes and conventions)."""
        return self._extractor.extract_prepared(prepared)

    def identity(self) -> str:
        return self._extractor.identity


# Lines of TensorFlow's wrapper text around an op's own error ("Graph execution error:", "Detected at node
# ... (most recent call last):" followed by indented stack lines, "N root error(s) found.").
_TF_WRAPPER_LINE = re.compile(r"^(Graph execution error:|Detected at node .*|<stack traces unavailable>|"
                              r"\d+ root error\(s\) found\.?)$")


def first_error_line(text: str) -> str:
    r"""The first line of an error text that says what went wrong, without TensorFlow's wrapper lines.

    'Graph execution error:\n\nDetected at node X defined at (most recent call last):\n  File ...\n
    input depth must be ...\n\t [[{{node X}}]]' -> 'input depth must be ...'. Plain one-line texts are
    returned as they are.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    in_stack = False
    for line in lines:
        if _TF_WRAPPER_LINE.match(line.strip()):
            in_stack = line.startswith("Detected at node")
            continue
        if in_stack and line[:1].isspace():
            continue  # a stack line under "Detected at node ..."
        return line.strip()
    return lines[0].strip() if lines else ""


class InferenceError(NamedTuple):
    """PredictionResult.inference of an image whose model call raised: the error's type name and the first line
    of its own text (str(exc) through first_error_line; "" when it has none).

    Caught here, in run_inference, rather than taken from RunInference's `with_exception_handling()` dead
    letters: Beam 2.77 hands those over as (exception type, repr(exception), traceback lines), and repr() of a
    TensorFlow error is 'InvalidArgumentError()' (its text lives in str(), tests/test_odd_inputs.py shows it),
    so the message had to be parsed back out of the traceback text. Here str(exc) is at hand.
    """

    error_type: str
    message: str


class DelgModelHandler(ModelHandler):
    """ModelHandler[PreparedImage, (DelgFeatures, identity, inference_ms) | InferenceError, DelgModelService].

    Wrap it in KeyedModelHandler to carry keys. Each prediction's `inference` is a tuple (DelgFeatures,
    model identity, milliseconds spent in the model call), or an InferenceError when the model call raised.
    """

    def __init__(self, config: ExtractionConfig, *, share_across_processes: bool = False):
        super().__init__(min_batch_size=1, max_batch_size=1, large_model=share_across_processes)
        self._config = config

    def load_model(self) -> DelgModelService:
        t0 = time.perf_counter()
        service = DelgModelService(self._config)
        _LOGGER.info("loaded DELG model %s in %.1f s", service.identity(), time.perf_counter() - t0)
        return service

    def run_inference(
        self,
        batch: Sequence[Any],
        model: DelgModelService,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        infer_ms = Metrics.distribution(METRICS_NAMESPACE, "inference_ms")
        identity = model.identity()
        out = []
        for task in batch:
            t0 = time.perf_counter()
            try:
                features = model.extract(task.prepared)
            except Exception as exc:  # the image becomes a failure row (stage "inference"), the job goes on
                _LOGGER.warning("inference failed for %s", task.path, exc_info=True)
                out.append(PredictionResult(task, InferenceError(type(exc).__name__, first_error_line(str(exc)))))
                continue
            ms = (time.perf_counter() - t0) * 1000.0
            infer_ms.update(int(round(ms)))
            out.append(PredictionResult(task, (features, identity, ms)))
        return out

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        # The default pickles the whole batch just to measure it; the image bytes are what matters.
        return sum(int(t.prepared.image.nbytes) for t in batch)
