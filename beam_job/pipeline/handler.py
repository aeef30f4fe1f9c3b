"""DelgModelHandler: our RunInference ModelHandler (Beam's TF handlers cannot drive DELG, see docs/pipeline.md).

One image per call (max_batch_size=1: images differ in size). The model is loaded by Beam once per worker
process through `Shared` and used by all threads of that process; with share_across_processes=True
(`--share_model_across_processes`) Beam keeps one copy per machine in a separate process
(MultiProcessShared), which only forwards method calls, so the loaded object is wrapped in a small
service class with methods only. TensorFlow is imported inside load_model, never at module import.
Model loads are counted by RunInference itself: one `RunInference/load_model_latency_milli_secs`
distribution update per load (its count), plus `model_byte_size`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterable, Optional, Sequence

from apache_beam.metrics import Metrics
from apache_beam.ml.inference import base as inference_base
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beam_job.pipeline import METRICS_NAMESPACE
from beam_job.config import ExtractionConfig

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


class DelgModelHandler(ModelHandler):
    """ModelHandler[PreparedImage, (DelgFeatures, inference_ms), DelgModelService] for RunInference.

    Wrap it in KeyedModelHandler to carry keys. Each prediction's `inference` is a tuple
    (DelgFeatures, model identity, milliseconds spent in the model call).
    """

    def __init__(self, config: ExtractionConfig, *, share_across_processes: bool = False):
        super().__init__(max_batch_size=1, min_batch_size=1, large_model=share_across_processes)
        self._config = config
        self._share = share_across_processes

    def load_model(self) -> DelgModelService:
        t0 = time.perf_counter()
        service = DelgModelService(self._config)
        _LOGGER.info("loaded DELG model %s in %.1f s", service.identity(), time.perf_counter() - t0)
        return service

    def run_inference(
        self,
        batch: Sequence[Any],
        model: DelgModelService,
        inference_args: Optional[Dict[str, Any]] = None,
    ) -> Iterable[PredictionResult]:
        infer_ms = Metrics.distribution(METRICS_NAMESPACE, "inference_ms")
        identity = model.identity()
        out = []
        for task in batch:
            t0 = time.perf_counter()
            features = model.extract(task.prepared)
            ms = (time.perf_counter() - t0) * 1000.0
            infer_ms.update(int(round(ms)))
            out.append(PredictionResult(task, (features, identity, ms)))
        return out

    def batch_elements_kwargs(self) -> Dict[str, Any]:
        return {"min_batch_size": 1, "max_batch_size": 1}

    def share_model_across_processes(self) -> bool:
        return self._share

    def get_num_bytes(self, batch: Sequence[Any]) -> int:
        # The default pickles the whole batch just to measure it; the image bytes are what matters.
        return sum(int(getattr(t.prepared, "image").nbytes) for t in batch)

    def get_metrics_namespace(self) -> str:
        return "RunInference"
