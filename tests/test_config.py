import json
import subprocess
import sys

import pytest

from lance_core.config import ConfigError, ModelConfig, load_config, model_preset
from lance_core.flops import count_parameters
from lance_core.model import build_model

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_bad_backend_names_field_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        model_preset("tiny", attention_backend="cudnn")
    message = str(err.value)
    assert "model.attention_backend" in message and "'sdpa'" in message and "'flex'" in message
    assert "cudnn" in message


def test_unknown_field_and_unknown_preset_are_named():
    with pytest.raises(ConfigError, match="model.hidden_sise"):
        model_preset("tiny", hidden_sise=3)
    with pytest.raises(ConfigError, match="allowed: lance-3b, lance-3b-video, tiny"):
        model_preset("lance-7b")


def test_shape_constraints_are_explained():
    with pytest.raises(ConfigError, match="mrope_section"):
        model_preset("tiny", mrope_section=(2, 2, 2))
    with pytest.raises(ConfigError, match="num_kv_heads"):
        model_preset("tiny", num_kv_heads=3)
    with pytest.raises(ConfigError, match=r"hidden_size \(4\) must be even and at least 6"):
        model_preset("tiny", hidden_size=4, vit={"out_hidden_size": 4})
    with pytest.raises(ConfigError, match="model.num_layers"):
        load_config(ModelConfig, {**model_preset("tiny").model_dump(), "num_layers": 0}, prefix="model")


def test_lance_3b_has_exactly_the_released_parameter_count():
    model = build_model(model_preset("lance-3b"), device="meta")
    counts = count_parameters(model)
    assert counts.total == 6_185_205_808
    assert counts.und_expert == counts.gen_expert
    assert 2.9e9 < counts.active_per_token < 3.2e9


def test_model_info_cli_json():
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "model-info", "--preset", "lance-3b", "--json"],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    assert info["parameters"]["total"] == 6_185_205_808
    assert info["training_flops_per_token"] > 6 * info["parameters"]["active_per_token"]


def test_model_info_counts_the_vit_of_the_video_checkpoint(capsys):
    from jobs.model_info import main

    assert main(["--preset", "lance-3b-video", "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["parameters"]
    assert (params["total"], params["tensors"], params["vit"]) == (7_105_548_336, 1_411, 668_684_288)
    image = count_parameters(build_model(model_preset("lance-3b"), device="meta"))
    assert params["active_per_token"] == image.active_per_token  # the frozen ViT and table are not active


def test_presets_differ_only_in_sizes():
    tiny, big = model_preset("tiny"), model_preset("lance-3b")
    assert tiny.qk_norm == big.qk_norm and tiny.mape == big.mape
    assert (big.hidden_size, big.num_layers, big.num_heads, big.num_kv_heads, big.head_dim) == (2048, 36, 16, 2, 128)
