"""prepare_model: the synthparts CNN is trained once per recipe and reused only when the recipe is the same."""

from __future__ import annotations

from phpn_core.config import load_config
from phpn_core.models.synthparts_cnn import load_model
from tasks.prepare import prepare_model

TINY = dict(dataset={"n_classes": 2, "train_per_class": 4, "test_per_class": 2, "image_size": 48},
            compute={"device": "cpu"})


def test_trained_model_is_reused_only_for_the_same_recipe(tmp_path):
    first = prepare_model.fn(load_config(None, model={"train_epochs": 1, "feature_stride": 8}, **TINY), str(tmp_path))
    assert first["trained"] and load_model(first["checkpoint"]).stride == 8
    again = prepare_model.fn(load_config(None, model={"train_epochs": 1, "feature_stride": 8}, **TINY), str(tmp_path))
    assert not again["trained"] and again["digest"] == first["digest"]
    other = prepare_model.fn(load_config(None, model={"train_epochs": 1, "feature_stride": 16}, **TINY),
                             str(tmp_path))
    assert other["trained"] and other["digest"] != first["digest"]
    assert load_model(other["checkpoint"]).stride == 16
