"""Presets carry the official values; overrides are validated."""

import pytest

from beam_job.config import OFFICIAL_SCALES, PRESETS, ExtractionConfig, get_preset


@pytest.mark.parametrize(
    "name, arch, threshold",
    [
        ("r50_gldv2clean", "r50", 454.6),
        ("r101_gldv2clean", "r101", 357.48),
        ("r50_gld", "r50", 175.0),
        ("r101_gld", "r101", 166.1),
    ],
)
def test_official_presets_match_official_configs(name, arch, threshold):
    cfg = get_preset(name)
    assert cfg.architecture == arch
    assert cfg.score_threshold == threshold
    assert cfg.image_scales == OFFICIAL_SCALES
    assert cfg.global_scales_ind == (3, 4, 5)
    assert [cfg.image_scales[i] for i in cfg.global_scales_ind] == [0.70710677, 1.0, 1.4142135]
    assert cfg.max_feature_num == 1000 and cfg.max_image_size == 1024 and cfg.min_image_size == -1
    assert not cfg.use_square_images and not cfg.use_resized_coordinates
    assert cfg.global_pca is None and cfg.local_pca is None
    assert cfg.official_model_url.startswith("https://storage.googleapis.com/delf/") and not cfg.untrained


def test_kaggle_preset():
    cfg = get_preset("kaggle2020")
    assert cfg.image_scales == (0.70710677, 1.0, 1.4142135)
    assert cfg.global_scales_ind == (0, 1, 2) and cfg.score_threshold == 175.0


def test_embedded_presets_are_marked_untrained():
    for name in ("embedded", "tiny"):
        assert PRESETS[name].untrained and PRESETS[name].is_embedded_model


def test_overrides_are_validated_and_do_not_mutate_the_preset():
    cfg = get_preset("r50_gldv2clean", score_threshold=10.0, image_scales=[1.0, 2.0], global_scales_ind=[0])
    assert cfg.score_threshold == 10.0 and cfg.image_scales == (1.0, 2.0)
    assert PRESETS["r50_gldv2clean"].score_threshold == 454.6
    with pytest.raises(ValueError, match="out of range"):
        get_preset("r50_gldv2clean", image_scales=[1.0])
    with pytest.raises(ValueError, match="unknown config field"):
        get_preset("r50_gldv2clean", scale=1.0)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("r51")
    with pytest.raises(ValueError, match="max_image_size"):
        get_preset("tiny", max_image_size=0)


def test_config_round_trips_through_json_dict():
    cfg = get_preset("kaggle2020")
    import json

    assert ExtractionConfig.from_dict(json.loads(cfg.to_json())) == cfg
