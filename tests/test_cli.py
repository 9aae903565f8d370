"""The ``lance`` command's conventions, without starting Ray: ``--set section.field=value`` and the errors
that name the flag, shipped configs by name from any folder, ``--version``, ``--log-level``, and ``--help``
of every job without the heavy imports."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from jobs.cli import COMMANDS, main
from jobs.config_io import CONFIG_DIR, FieldOverrides, read_yaml, resolve_config, shipped_configs
from lance_core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _lance(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


# ---------------------------------------------------------------------------------------------- --set
def test_set_puts_yaml_values_at_dotted_fields_after_the_flags(tmp_path, monkeypatch):
    from pipelines.train.config import load_train_config

    monkeypatch.chdir(tmp_path)
    fields = FieldOverrides()
    fields.flag("--steps", "steps", 5)
    fields.flag("--workers", "scaling.workers", None)  # not given: no change
    fields.sets(["optim.lr=3e-4", "deepspeed.zero_stage=1", "data.uris=[a, b]", "eval.samples=false",
                 "tune.scheduler.grace_period=2", "steps=7"])
    given = read_yaml("train_tiny")
    data = fields.apply(given)
    cfg = load_train_config(data, flags=fields.flags)
    assert (cfg.optim.lr, cfg.deepspeed.zero_stage, cfg.eval.samples, cfg.steps) == (3e-4, 1, False, 7)
    assert cfg.data.uris == (str(tmp_path / "a"), str(tmp_path / "b"))
    assert cfg.tune.scheduler.grace_period == 2 and cfg.scaling.workers == given["scaling"]["workers"]
    assert "lr" not in given.get("optim", {}) or given["optim"]["lr"] != 3e-4, "the YAML mapping is not changed"
    assert fields.flags["steps"] == "--set steps" and fields.flags["optim.lr"] == "--set optim.lr"


def test_set_errors_name_the_flag():
    from pipelines.train.config import load_train_config

    fields = FieldOverrides()
    fields.flag("--steps", "steps", 0)
    fields.sets(["optim.lrr=0.1", "mixture.weights={t2q: 1}"])
    with pytest.raises(ConfigError) as err:
        load_train_config(fields.apply(read_yaml("train_tiny")), flags=fields.flags)
    message = str(err.value)
    assert "train.optim.lrr (--set optim.lrr): Extra inputs are not permitted" in message
    assert "train.steps (--steps): Input should be greater than 0" in message
    assert "(--set mixture.weights)" in message and "t2q" in message
    for bad, named in (("optim", "--set optim: give section.field=value"), ("optim..lr=1", "--set optim..lr="),
                       ("steps.x=1", "--set steps.x: steps holds"), ("optim.lr=[1", "--set optim.lr: '[1'")):
        fields = FieldOverrides()
        with pytest.raises(ConfigError, match="^" + named.replace("[", r"\[").replace(".", r"\.")):
            fields.sets([bad])
            fields.apply({"steps": 3})


def test_cli_set_of_a_field_that_does_not_exist(capsys):
    """Validation fails before any work: no Ray."""
    assert main(["train", "--config", "train_tiny", "--set", "optim.lrr=0.1"]) == 2
    assert "train.optim.lrr (--set optim.lrr): Extra inputs are not permitted" in capsys.readouterr().err
    assert main(["grpo", "--config", "grpo_tiny", "--set", "rollout.group_size=1"]) == 2
    assert "grpo.rollout.group_size (--set rollout.group_size)" in capsys.readouterr().err
    assert main(["demo", "--set", "synth_count=0"]) == 2
    assert "demo.synth_count (--set synth_count)" in capsys.readouterr().err


def test_count_flags_are_checked_with_the_flag_named(capsys):
    for argv, flag in ((["train", "--steps", "0"], "--steps"), (["tune", "--samples", "-1"], "--samples"),
                       (["grpo", "--epochs", "x"], "--epochs"), (["demo", "--steps", "0"], "--steps")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and f"argument {flag}: must be" in capsys.readouterr().err


def test_grpo_steps_are_optimizer_steps_and_epochs_are_epochs(capsys):
    from jobs.grpo import _epochs_of_steps

    assert _epochs_of_steps(6, {}) == 6  # learner.minibatches defaults to 1: a step is an epoch
    assert _epochs_of_steps(6, {"learner": {"minibatches": 2}}) == 3
    with pytest.raises(ConfigError, match=r"^--steps: 3 optimizer steps .* multiple of 2, or --epochs"):
        _epochs_of_steps(3, {"learner": {"minibatches": 2}})
    assert main(["grpo", "--config", "grpo_lance3b", "--steps", "3"]) == 2
    assert "--steps: 3 optimizer steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["grpo", "--epochs", "2", "--steps", "2"])
    assert "not allowed with argument" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- --print-config
def _loader(job: str):
    """The validation of ``job``'s config, to read a printed config back."""
    from lance_core.config import load_config

    if job in ("train", "tune"):
        from pipelines.train.config import load_train_config

        return load_train_config
    if job == "grpo":
        from pipelines.rl.config import load_grpo_config

        return load_grpo_config
    if job == "demo":
        from pipelines.demo import load_demo_config

        return load_demo_config
    from pipelines.data.config import PrecomputeConfig

    return lambda data: load_config(PrecomputeConfig, data)


CONFIG_JOBS = ("precompute", "train", "grpo", "tune", "demo")


@pytest.mark.parametrize("job", CONFIG_JOBS)
def test_print_config_shows_every_field_and_runs_nothing(job, tmp_path, monkeypatch, capsys):
    """Without --config: the defaults of every field (the field reference); the output is a config that
    validates back to itself; nothing is written, nothing starts."""
    import yaml

    monkeypatch.chdir(tmp_path)
    assert main([job, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert isinstance(printed, dict) and len(printed) > 3
    assert _loader(job)(printed).model_dump(mode="json") == printed
    assert not list(tmp_path.iterdir()), "--print-config runs nothing"
    with pytest.raises(SystemExit):
        main([job, "--help"])
    assert "--print-config" in capsys.readouterr().out


def test_print_config_applies_the_file_the_flags_and_set(tmp_path, monkeypatch, capsys):
    import yaml

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "train_tiny", "--steps", "5", "--set", "optim.lr=3e-4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    given = read_yaml("train_tiny")
    assert (printed["steps"], printed["optim"]["lr"]) == (5, 3e-4)
    assert printed["model"]["preset"] == given["model"]["preset"] and "log_dir" not in given and "log_dir" in printed
    assert printed["output"] == str(tmp_path / given["output"]), "paths as resolved"
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert main(["train", "--config", "printed.yaml", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == printed, "the printed config is a --config of its own"
    assert main(["train", "--config", "train_tiny", "--set", "optim.lrr=1", "--print-config"]) == 2
    assert "train.optim.lrr (--set optim.lrr)" in capsys.readouterr().err
    assert main(["tune", "--config", "train_tiny", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == given["name"], "not <name>-tune"


def test_grpo_logs_its_run_folder_at_the_start(tmp_path, monkeypatch, lance_log):
    from pipelines.rl import loop

    seen = []

    def run_grpo(cfg, output, mode):
        seen.append(lance_log.getvalue())
        return {"epochs": 1}

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loop, "run_grpo", run_grpo)
    assert main(["grpo", "--config", "grpo_tiny", "--output", "runs/g"]) == 0
    assert len(seen) == 1 and f"run folder: {tmp_path / 'runs' / 'g'}\n" in seen[0], "logged before the run starts"


# ---------------------------------------------------------------------------------------------- --config NAME
def test_shipped_configs_resolve_by_name_and_paths_still_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "train_tiny" in shipped_configs() and CONFIG_DIR == ROOT / "jobs" / "configs"
    assert resolve_config("train_tiny") == resolve_config("train_tiny.yaml") == CONFIG_DIR / "train_tiny.yaml"
    (tmp_path / "train_tiny.yaml").write_text("steps: 3\n")  # a file of the name in the current folder wins
    assert read_yaml("train_tiny.yaml") == {"steps": 3} and read_yaml("train_tiny")["steps"] != 3
    assert resolve_config(str(CONFIG_DIR / "grpo_tiny.yaml")) == CONFIG_DIR / "grpo_tiny.yaml"
    with pytest.raises(ConfigError, match="'train_tine' does not exist and is not the name of a shipped config "
                                          r"\(demo, .*train_tiny, train_video_long\)"):
        resolve_config("train_tine")
    with pytest.raises(ConfigError, match=r"'cfg/x.yaml' does not exist \(shipped configs, by name: demo, "):
        resolve_config("cfg/x.yaml")


def test_config_by_name_from_another_folder(tmp_path):
    out = _lance(["train", "--config", "train_tiny", "--set", "optim.lr=-1"], tmp_path)
    assert out.returncode == 2 and "train.optim.lr (--set optim.lr): Input should be greater than 0" in out.stderr
    out = _lance(["precompute", "--config", "nope"], tmp_path)
    assert out.returncode == 2 and "precompute_tiny" in out.stderr and "train_tiny" in out.stderr
    assert not list(tmp_path.iterdir()), "nothing written"


# ---------------------------------------------------------------------------------------------- the command
def test_version(tmp_path):
    out = _lance(["--version"], tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == f"lance {version('lance-train')}"


def test_log_level_from_the_flag_or_the_environment(monkeypatch, capsys):
    logger = logging.getLogger("lance")
    try:
        assert main(["--log-level", "warning", "train", "--config", "nope"]) == 2
        assert logger.level == logging.WARNING
        assert main(["train", "--log-level=DEBUG", "--config", "nope"]) == 2
        assert logger.level == logging.DEBUG
        monkeypatch.setenv("LANCE_LOG_LEVEL", "error")
        assert main(["grpo", "--config", "nope"]) == 2
        assert logger.level == logging.ERROR
        monkeypatch.setenv("LANCE_LOG_LEVEL", "loud")
        with pytest.raises(SystemExit):
            main(["grpo", "--config", "nope"])
        assert "argument --log-level: 'loud' is not one of" in capsys.readouterr().err
    finally:
        logger.setLevel(logging.INFO)


def test_submit_lists_the_jobs_pipelines_submit_knows():
    from jobs.submit import JOBS
    from pipelines.submit import JOBS as SUBMITTABLE

    assert JOBS == SUBMITTABLE


HEAVY = ["ray", "torch", "deepspeed", "transformers", "pipelines"]
HELP_PROBE = """
import json, sys
from jobs.cli import main
heavy_names, heavy, codes = set(json.loads(sys.argv[1])), {}, {}
for job in sys.argv[2:]:
    try:
        codes[job] = main([job, "--help"])
    except SystemExit as done:
        codes[job] = done.code
    heavy[job] = sorted({m.split(".")[0] for m in sys.modules} & heavy_names)
print(json.dumps({"codes": codes, "heavy": heavy}))
"""


def test_help_of_every_job_answers_without_heavy_imports(tmp_path):
    """One process asks every job for --help in turn; none may have imported Ray, torch, DeepSpeed,
    transformers or ``pipelines`` by then (a job imports them in main, after parsing)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, json.dumps(HEAVY), *COMMANDS], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == dict.fromkeys(COMMANDS, 0)
    assert result["heavy"] == {job: [] for job in COMMANDS}
    for job in COMMANDS:
        assert f"usage: lance {job}" in out.stdout


@pytest.mark.parametrize("job", list(COMMANDS))
def test_help_of_each_job_in_its_own_process(job, tmp_path):
    out = _lance([job, "--help"], tmp_path)
    assert out.returncode == 0 and out.stdout.startswith(f"usage: lance {job}"), out.stderr
