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


# Markers (pyproject.toml): ``ray`` for a test that starts or uses a Ray cluster, ``deepspeed`` for one that
# builds a DeepSpeed engine or launches training ranks; ``make test-fast`` leaves them out, with the ``slow``
# ones. A test that asks for one of these fixtures (directly or through another fixture) gets the marker;
# modules whose every test qualifies carry ``pytestmark``.
BY_FIXTURE = {"ray": {"ray_local", "latents"}, "deepspeed": {"zero2_run"}}
# Tests that start them without a fixture saying so, in this process or in the processes they launch
# (``lance`` jobs, rank scripts, bench scripts), and end-to-end runs that are ``slow`` without a decorator.
# "file.py" is the whole module, "file.py::test" every parametrization, "file.py::test[id" those whose id
# starts so.
BY_NAME = {
    "ray": (
        "test_bench_smoke.py::test_bench_quick[dedup.py",
        "test_bench_smoke.py::test_bench_quick[planning.py",
        "test_bench_smoke.py::test_bench_quick[precompute.py",
        "test_bench_smoke.py::test_bench_quick[weight_sync.py",
        "test_demo.py::test_lance_demo_shows_the_system_learns_real_digits",
        "test_demo.py::test_lance_demo_synthetic_media_runs_every_task_and_writes_a_report",
        "test_user_paths.py::test_precompute_with_relative_paths_from_another_folder",
    ),
    "deepspeed": (
        "test_bench_smoke.py::test_bench_quick[activation_memory.py",
        "test_bench_smoke.py::test_bench_quick[sequence_parallel.py",
        "test_bench_smoke.py::test_gpu_check_dry_run",
        "test_demo.py::test_lance_demo_shows_the_system_learns_real_digits",
        "test_demo.py::test_lance_demo_synthetic_media_runs_every_task_and_writes_a_report",
        "test_grpo.py::test_grpo_raises_brightness",
        "test_grpo.py::test_reward_actor_death_is_retried_then_resume",
        "test_grpo.py::test_async_rollouts_one_update_behind_then_resume",
        "test_grpo_learners.py::test_two_ranks_update_as_one_rank_does",
        "test_grpo_learners.py::test_grpo_with_two_learner_ranks_checkpoints_and_resumes",
        "test_sequence_parallel.py::test_two_ranks_give_the_loss_and_gradients_of_one",
        "test_sequence_parallel.py::test_four_ranks_repeat_the_two_kv_heads",
        "test_sequence_parallel.py::test_scaled_long_pair_trains_on_two_ranks",
        "test_sequence_parallel.py::test_ray_train_step_with_two_sequence_parallel_workers",
        "test_torch_launcher.py",
        "test_train.py::test_tune_sweeps_the_config_space_and_writes_a_best_config",
    ),
    "slow": (
        "test_learning.py::test_overfits_fixed_batch_of_all_tasks",
        "test_train_plan_bench.py",
        "test_user_paths.py::test_missing_paths_are_named_before_any_work",
    ),
}


def _named(item, entries) -> bool:
    name = f"{item.path.name}::{item.name}"
    return any(entry in (item.path.name, name.split("[")[0]) or ("[" in entry and name.startswith(entry))
               for entry in entries)


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        for marker in ("ray", "deepspeed", "slow"):
            if fixtures & BY_FIXTURE.get(marker, set()) or _named(item, BY_NAME[marker]):
                item.add_marker(getattr(pytest.mark, marker))


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
