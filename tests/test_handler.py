"""DelgModelHandler's settings come through Beam's own ModelHandler arguments: one image per call, sharing per flag."""

import numpy as np

from beam_job.config import get_preset
from beam_job.imaging import prepare_image
from beam_job.pipeline.handler import DelgModelHandler
from beam_job.pipeline.transforms import ImageTask


def test_one_image_per_call_and_the_model_shared_across_processes_only_when_asked():
    from apache_beam.ml.inference.base import KeyedModelHandler

    for share in (False, True):
        handler = KeyedModelHandler(DelgModelHandler(get_preset("tiny"), share_across_processes=share))
        assert dict(handler.batch_elements_kwargs()) == {"min_batch_size": 1, "max_batch_size": 1}
        assert handler.share_model_across_processes() is share
        assert handler.model_copies() == 1  # with sharing: one copy per machine
        assert handler.get_metrics_namespace() == "RunInference"  # where load_model_latency_milli_secs goes


def test_batch_size_in_bytes_is_the_image_bytes():
    prepared = prepare_image(np.zeros((40, 50, 3), np.uint8), get_preset("tiny"))
    tasks = [ImageTask(f"id{i}", f"{i}.png", prepared=prepared) for i in range(2)]
    assert DelgModelHandler(get_preset("tiny")).get_num_bytes(tasks) == 2 * prepared.image.nbytes
