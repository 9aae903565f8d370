"""One ``model:`` section for every job, and the encoder identity that ties latents to the model that trains
on them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lance_core.config import ConfigError, model_preset
from lance_core.encoder_identity import (
    CHUNK_BYTES,
    WHOLE_FILE_BYTES,
    encoder_identity,
    identity_mismatch,
    weights_digest,
)
from lance_core.model_section import ModelSection
from pipelines.data.config import PrecomputeConfig
from pipelines.data.pipeline import check_same_encoder
from pipelines.rl.config import load_grpo_config
from pipelines.train.config import DataSection, load_train_config
from pipelines.train.plan import DataError, make_plan


def test_every_job_names_the_model_the_same_way(tmp_path):
    section = {"preset": "tiny", "overrides": {"attention_backend": "sdpa"},
               "weights": {"vae": str(tmp_path / "vae.pth"), "vit": str(tmp_path / "qwen")}}
    train = load_train_config({"model": section}).model
    grpo = load_grpo_config({"model": section}).model
    precompute = PrecomputeConfig.model_validate({"model": section}).model
    assert train == grpo == precompute
    built = train.build()
    assert built.attention_backend == "sdpa"
    assert (built.vae.path, built.vit.path) == (str(tmp_path / "vae.pth"), str(tmp_path / "qwen"))


def test_grpo_validates_the_model_when_the_config_loads():
    with pytest.raises(ConfigError, match=r"grpo\.model: Value error, overrides\.hidden_sise: Extra inputs"):
        load_grpo_config({"model": {"preset": "tiny", "overrides": {"hidden_sise": 3}}})
    with pytest.raises(ConfigError, match=r"grpo\.model\.preset.*unknown model preset 'lance-7b'"):
        load_grpo_config({"model": {"preset": "lance-7b"}})
    with pytest.raises(ConfigError, match=r"grpo\.model.*tokenizer"):
        load_grpo_config({"model": {"preset": "tiny", "tokenizer": "qwen2.5"}})  # 512 rows: ids do not fit


def test_encoder_weights_are_given_once_as_model_weights():
    with pytest.raises(ConfigError, match=r"vae\.path: give the VAE weights as model\.weights\.vae"):
        load_train_config({"model": {"overrides": {"vae": {"path": "w/vae"}}}})
    # the lance-3b-video checkpoint holds the ViT: it is the ViT's weights unless another is named
    video = ModelSection(preset="lance-3b-video", weights={"lance": "/w/lance.safetensors"}).build()
    assert video.vit.path == "/w/lance.safetensors"
    assert ModelSection(preset="lance-3b", weights={"lance": "/w/lance.safetensors"}).build().vit.path is None


def test_weights_digest_follows_the_content_not_the_path(tmp_path):
    small = tmp_path / "a.safetensors"
    small.write_bytes(b"x" * 1000)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "a.safetensors").write_bytes(b"x" * 1000)
    assert weights_digest(str(small)) == weights_digest(str(tmp_path / "b" / "a.safetensors"))
    (tmp_path / "b" / "a.safetensors").write_bytes(b"x" * 999 + b"y")
    assert weights_digest(str(small)) != weights_digest(str(tmp_path / "b" / "a.safetensors"))
    # a file larger than the whole-file limit: sampled chunks see a change spread over the file (a fine-tune
    # changes nearly every tensor)
    big = tmp_path / "big.pth"
    data = bytearray(WHOLE_FILE_BYTES + 5 * CHUNK_BYTES)
    big.write_bytes(data)
    before = weights_digest(str(big))
    data[WHOLE_FILE_BYTES // 2::2**20] = b"\x01" * len(data[WHOLE_FILE_BYTES // 2::2**20])
    big.write_bytes(data)
    assert weights_digest(str(big)) != before
    # a folder: the weight files and their names
    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 10)
    (folder / "README.md").write_text("not part of the weights")
    digest = weights_digest(str(folder))
    (folder / "README.md").write_text("changed")
    assert weights_digest(str(folder)) == digest
    (folder / "config.json").write_text('{"a": 1}')
    assert weights_digest(str(folder)) != digest
    with pytest.raises(FileNotFoundError, match="weights not found"):
        weights_digest(str(tmp_path / "absent"))


def test_identity_names_what_differs(tmp_path):
    weights = tmp_path / "vae.pth"
    weights.write_bytes(b"v" * 100)
    tiny = encoder_identity(model_preset("tiny"))
    assert identity_mismatch(tiny, encoder_identity(model_preset("tiny"))) == []
    assert tiny["vae"]["weights"] == "random:seed=0"
    other_seed = encoder_identity(model_preset("tiny", vae={"seed": 1}))
    assert identity_mismatch(tiny, other_seed) == [
        "vae.weights: 'random:seed=0' in the shards, 'random:seed=1' in the model"]
    real = encoder_identity(model_preset("tiny", vae={"path": str(weights)}))
    assert real["vae"]["weights"].startswith("sha256:")
    wider = encoder_identity(model_preset("lance-3b"))
    assert any(line.startswith("vae.base_dim") for line in identity_mismatch(tiny, wider))
    assert any(line.startswith("vit.depth") for line in identity_mismatch(tiny, wider))


def _shard_root(tmp_path: Path, encoder: dict | None) -> Path:
    root = tmp_path / "latents"
    root.mkdir()
    manifest = {"schema": "lance-latent-shards/1", "shards": []}
    if encoder is not None:
        manifest["encoder"] = encoder
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_training_refuses_latents_of_another_encoder(tmp_path):
    root = _shard_root(tmp_path, encoder_identity(model_preset("tiny")))
    data = DataSection(uris=(str(root),))
    with pytest.raises(DataError, match=r"made by other encoders than the model's \(vae.weights: 'random:seed=0' in "
                                        r"the shards, 'random:seed=1' in the model\)"):
        make_plan(data, {"t2i": 1.0}, encoder_identity(model_preset("tiny", vae={"seed": 1})))
    # the same encoders pass the check (and this root has no rows)
    with pytest.raises(DataError, match="empty dataset after filtering"):
        make_plan(data, {"t2i": 1.0}, encoder_identity(model_preset("tiny")))


def test_latents_without_an_encoder_record_are_planned_with_a_note(tmp_path):
    root = _shard_root(tmp_path, None)
    with pytest.raises(DataError, match="empty dataset"):
        make_plan(DataSection(uris=(str(root),)), {"t2i": 1.0}, encoder_identity(model_preset("tiny")))


def test_a_resumed_precompute_refuses_weights_changed_under_the_same_path(tmp_path):
    weights = tmp_path / "vae.pth"
    weights.write_bytes(b"v" * 100)
    cfg = PrecomputeConfig.model_validate({"output": str(tmp_path / "latents"),
                                           "model": {"weights": {"vae": str(weights)}}})
    made_by = encoder_identity(cfg.model.build())
    _shard_root(tmp_path, made_by)
    check_same_encoder(cfg, made_by)
    weights.write_bytes(b"w" * 100)
    with pytest.raises(ValueError, match=r"encoded by other encoders than model.weights names now \(vae.weights"):
        check_same_encoder(cfg, encoder_identity(cfg.model.build()))


@pytest.mark.slow
def test_the_precompute_manifest_records_its_encoders(latents):
    manifest = json.loads((latents / "manifest.json").read_text())
    assert manifest["encoder"] == encoder_identity(model_preset("tiny"))
