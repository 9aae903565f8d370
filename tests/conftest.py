from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
# Credentials of the S3 protocol server the tests run on loopback (moto); not real credentials.
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
os.environ.update(S3_TEST_ENV)
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is not present next to the project")
    return SHARED


@pytest.fixture
def tokenizer():
    from lance_core.tokenizer import ByteTokenizer

    return ByteTokenizer()


@pytest.fixture
def tiny_cfg():
    from lance_core.config import model_preset

    return model_preset("tiny")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **S3_TEST_ENV}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def latents(ray_local, tmp_path_factory) -> Path:
    """Tiny latent shards of six tasks (t2i, t2v, i2i, v2v, i2t, v2t), made once per session: ``lance synth``
    data through the precompute pipeline. Tests read them; none writes into them."""
    from pipelines.data.config import PrecomputeConfig
    from pipelines.data.pipeline import run_precompute
    from pipelines.data.synth import synth_all

    root = tmp_path_factory.mktemp("train-data")
    synth_all(root / "synth", count=8, seed=0)
    cfg = PrecomputeConfig(input=str(root / "synth" / "parquet"), output=str(root / "latents"), partition_size=8,
                           buckets=dict(image_area=64 * 64, video_area=64 * 96, vit_area=56 * 56),
                           video=dict(max_seconds=1.0), filters=dict(dedup=False))
    run_precompute(cfg, progress=False)
    return root / "latents"


@pytest.fixture
def lance_log():
    """What the ``lance`` loggers say during the test (whether or not a job set up logging before)."""
    import io
    import logging

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("lance")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)
