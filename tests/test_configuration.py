"""DecdConfig: values of the wrong type in config.json are refused, naming the field; a config says which image-text
loss it trains."""

import json
from pathlib import Path

import pytest

from configuration_decd import DecdConfig
from inference_decd import ModelLoadError, load_model
from modeling_decd import DecdModel

from .helpers import tiny_config

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# config.json of the wrong types
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, expected", [
    ("image_size", "384x128", r"DecdConfig\.image_size must be \[height, width\]"),
    ("projection_dim", -5, r"DecdConfig\.projection_dim must be a positive integer, got -5"),
    ("temperature", None, r"DecdConfig\.temperature must be a positive number, got None"),
    ("learnable_temperature", "no", r"DecdConfig\.learnable_temperature must be true or false"),
    ("sew_margin", "0.1", r"DecdConfig\.sew_margin must be a number >= 0"),
    ("sew_formulation", "widen", r"DecdConfig\.sew_formulation must be one of \('tighten', 'relax', 'compress'\)"),
])
def test_config_json_values_of_the_wrong_type_name_the_field(tmp_path, field, value, expected):
    DecdModel(tiny_config()).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=expected):
        load_model(tmp_path, device="cpu")


def test_a_config_says_which_image_text_loss_it_trains():
    assert DecdConfig(sew_margin=0).similarity_loss.startswith("SDM")  # Sew off
    assert DecdConfig().similarity_loss.startswith("Sew, reading 'compress'")  # the default
    assert DecdConfig(sew_margin=0.1, caption_quality="none").similarity_loss.startswith("SDM")  # no margin applies
    assert DecdConfig(sew_margin=0.05, sew_formulation="compress").similarity_loss == (
        "Sew, reading 'compress' (docs/method.md), strength 0.05, caption quality 'density'")
    # An old config.json without sew_formulation trained the first reading.
    assert DecdConfig.from_dict({"sew_margin": 0.1}).similarity_loss.startswith("Sew, reading 'tighten'")
