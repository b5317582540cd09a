"""Sweeps of `sandhop-train-agent` (docs/sweeps.md): every config of the app composes, with the
Optuna search and the Ray launchers, into values its typed parts accept; then real multiruns of
the smoke experiment: two seeds with the basic launcher, a two-trial Optuna study and two jobs on
a local Ray instance that the test starts."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sandhop.agents.ppo import PPOConfig
from sandhop.datasets.splits import SplitConfig
from sandhop.envs.spec import EnvSpec

HAS_OPTUNA = importlib.util.find_spec("hydra_plugins.hydra_optuna_sweeper") is not None
HAS_RAY = importlib.util.find_spec("ray") is not None and \
    importlib.util.find_spec("hydra_plugins.hydra_ray_launcher") is not None
needs_optuna = pytest.mark.skipif(not HAS_OPTUNA, reason="hydra-optuna-sweeper is not installed "
                                  "(pip install 'sandhop[sweeps]')")
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray or hydra-ray-launcher is not installed "
                               "(pip install 'sandhop[ray]')")

RAY_LAUNCHERS = ("ray_local", "ray_cluster")          # configs/hydra/launcher/
SEARCH_SPACE = {                                       # configs/hparams_search/optuna.yaml
    "agent.lr": ("log", 1e-4, 3e-3),
    "agent.ent_coef": ("log", 1e-3, 1e-1),
    "agent.clip_eps": ("linear", 0.1, 0.3),
    "agent.gae_lambda": ("choice", 0.9, 0.95, 0.98),
}


def compose_app(overrides=(), config_name="train_agent", hydra=False):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("sandhop.configs", version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


def options(group: str) -> list[str]:
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("sandhop.configs", version_base="1.3"):
            return sorted(GlobalHydra.instance().config_loader().get_group_options(group))
    finally:
        GlobalHydra.instance().clear()


def build_parts(cfg) -> None:
    """The typed configs the app builds from the composed one (sandhop.agents.train_agent.run)."""
    PPOConfig.from_config(cfg.agent)
    EnvSpec.from_config(cfg.env)
    if cfg.dataset.get("kind", "traces") == "traces":
        SplitConfig.from_config(cfg.dataset)


# --------------------------------------------------------------------------- composition

def test_defaults_compose_into_the_documented_values(monkeypatch):
    monkeypatch.delenv("SANDHOP_RUNS", raising=False)
    cfg = compose_app(hydra=True)
    choices = cfg.hydra.runtime.choices
    for group in ("agent", "env", "dataset"):         # each group's node is the option chosen
        assert cfg[group].name == choices[group]
    assert (choices.get("experiment"), choices.get("hparams_search")) == (None, None)
    assert (cfg.seed, cfg.evaluate, cfg.paths.runs) == (0, True, "runs")
    assert cfg.out.startswith(f"runs/agent/{cfg.dataset.name}-")
    assert cfg.hydra.sweep.dir.startswith("runs/agent-multirun/")
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"   # a folder per job
    assert cfg.hydra.job.chdir is False
    assert PPOConfig.from_config(cfg.agent).num_members == 2     # two seeds side by side
    build_parts(cfg)


@pytest.mark.parametrize("group", ["agent", "env", "dataset", "paths"])
def test_every_option_of_a_group_composes(group, monkeypatch, tmp_path):
    monkeypatch.setenv("SANDHOP_RUNS", str(tmp_path))
    names = options(group)
    assert names, f"configs/{group}/ is empty"
    for name in names:
        cfg = compose_app([f"{group}={name}"])
        assert cfg[group].get("name", name) == name
        if group == "paths":
            assert cfg.paths.runs == str(tmp_path) and cfg.out.startswith(f"{tmp_path}/agent/")
        build_parts(cfg)


def test_every_experiment_composes_with_its_app():
    """An experiment of this app composes and builds; the rest belong to train_risk (they override
    its `model` group) and compose there."""
    names = options("experiment")
    ours = []
    for name in names:
        try:
            cfg = compose_app([f"experiment={name}"])
        except HydraException:
            compose_app([f"experiment={name}"], config_name="train_risk")
            continue
        build_parts(cfg)
        ours.append(name)
    assert "smoke" in ours


def test_smoke_experiment_is_small():
    cfg = compose_app(["experiment=smoke"])
    assert cfg.dataset.name == "small" and cfg.progress is False
    config = PPOConfig.from_config(cfg.agent)
    assert (config.num_envs, config.num_steps, config.total_timesteps, config.eval_every_chunks) == (64, 16, 16384, 0)


@needs_optuna
@pytest.mark.parametrize("experiment", [None, "smoke"])
def test_optuna_search_composes(experiment):
    overrides = ["hparams_search=optuna"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = compose_app(overrides, hydra=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert (sweeper.direction, sweeper.n_trials, sweeper.n_jobs, sweeper.storage) == ("maximize", 20, 1, None)
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and isinstance(sweeper.sampler.seed, int)
    assert cfg.evaluate is True                       # the objective is the val evaluation
    assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
    import optuna
    assert isinstance(instantiate(sweeper.sampler), optuna.samplers.TPESampler)
    # The search space: every searched key exists in the config, with the documented range.
    assert set(sweeper.params) == set(SEARCH_SPACE)
    assert not any(k.startswith("env.reward") for k in sweeper.params)   # the reward defines the objective
    parser = OverridesParser.create()
    for key, expr in sweeper.params.items():
        assert OmegaConf.select(cfg, key) is not None, key
        sweep = parser.parse_override(f"{key}={expr}").value()
        kind, *bounds = SEARCH_SPACE[key]
        if kind == "choice":
            assert isinstance(sweep, ChoiceSweep) and sweep.list == bounds
        else:
            assert isinstance(sweep, IntervalSweep) and (sweep.start, sweep.end) == tuple(bounds)
            assert ("log" in sweep.tags) == (kind == "log")
    build_parts(cfg)


@needs_ray
@pytest.mark.parametrize("launcher", RAY_LAUNCHERS)
def test_ray_launchers_compose_and_extend_the_plugin(launcher, recwarn):
    from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
    cfg = compose_app(["experiment=smoke", f"hydra/launcher={launcher}"], hydra=True)
    ray = cfg.hydra.launcher.ray
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert ray.init.address == {"ray_local": None, "ray_cluster": "auto"}[launcher]
    # Joining a cluster refuses these: the plugin's own object_store_memory default included.
    assert ray.init.num_cpus is None and ray.init.object_store_memory is None and ray.init._temp_dir is None
    assert ray.remote.num_cpus == 1 and ray.remote.max_retries == 0
    if launcher == "ray_local":
        assert ray.init.include_dashboard is False
    # Keys of ours are set without a leading `+`.
    cfg = compose_app([f"hydra/launcher={launcher}", "hydra.launcher.ray.init.num_cpus=2",
                       "hydra.launcher.ray.init.address=ray://head:10001", "hydra.launcher.ray.remote.num_gpus=0.5"],
                      hydra=True)
    assert (cfg.hydra.launcher.ray.init.num_cpus, cfg.hydra.launcher.ray.remote.num_gpus) == (2, 0.5)
    assert isinstance(instantiate(cfg.hydra.launcher), RayLauncher)   # builds; starts nothing
    # Not a file named like the plugin's schema (hydra/launcher/ray): that is Hydra's deprecated
    # automatic schema matching and warns on every run.
    assert not [w for w in recwarn if "ConfigStore schema" in str(w.message)]


@needs_ray
@needs_optuna
def test_optuna_on_ray_composes():
    cfg = compose_app(["hparams_search=optuna", "hydra/launcher=ray_local", "hydra.sweeper.n_jobs=2"], hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.sweeper.n_jobs == 2
    assert cfg.hydra.launcher._target_.endswith("RayLauncher")


# --------------------------------------------------------------------------- real multiruns

@pytest.fixture(scope="module")
def app_env(tmp_path_factory) -> dict:
    """The environment of the app's processes: its own cache (dataset builds, compiled programs:
    the first job compiles, the others reuse it) and runs folder; no Ray cluster to join."""
    env = dict(os.environ)
    env["SANDHOP_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    env["SANDHOP_RUNS"] = str(tmp_path_factory.mktemp("runs"))
    env["HYDRA_FULL_ERROR"] = "1"
    env.pop("RAY_ADDRESS", None)
    return env


def train_agent(env: dict, cwd: Path, *overrides: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "sandhop.agents.train_agent", *overrides], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{' '.join(overrides)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def check_run(job: Path, seed: int, evaluated: bool) -> dict:
    """One job's folder holds a whole run; returns its resolved config."""
    assert (job / "checkpoints").is_dir() and any((job / "checkpoints").iterdir())
    text = (job / "config.yaml").read_text()
    assert "${" not in text                            # resolved
    config = yaml.safe_load(text)
    assert config["seed"] == seed
    header, *rows = (job / "metrics.csv").read_text().splitlines()
    assert rows and header.startswith("member,seed,")
    assert all(row.split(",")[1] == str(seed) for row in rows)
    assert (job / "metrics.parquet").exists()
    assert (job / ".hydra" / "overrides.yaml").exists()
    assert (job / "evaluation.json").exists() == evaluated
    return config


def objective(job: Path) -> float:
    value = json.loads((job / "evaluation.json").read_text())["objective"]
    assert isinstance(value, float) and math.isfinite(value)
    return value


def test_two_seeds_with_the_basic_launcher(app_env, tmp_path):
    sweep = tmp_path / "sweep"
    train_agent(app_env, tmp_path, "-m", "experiment=smoke", "seed=0,1", "evaluate=false", f"hydra.sweep.dir={sweep}")
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for seed in (0, 1):
        check_run(sweep / str(seed), seed, evaluated=False)
        assert f"seed={seed}" in yaml.safe_load((sweep / str(seed) / ".hydra" / "overrides.yaml").read_text())
    multirun = yaml.safe_load((sweep / "multirun.yaml").read_text())
    assert multirun["hydra"]["mode"] == "MULTIRUN" and "seed=0,1" in multirun["hydra"]["overrides"]["task"]
    assert not (Path(app_env["SANDHOP_RUNS"]) / "agent").exists()   # out= is not used in a multirun


@needs_optuna
def test_optuna_study_of_two_trials(app_env, tmp_path):
    import optuna
    sweep, db = tmp_path / "sweep", tmp_path / "optuna.db"
    storage = f"sqlite:///{db}"                        # absolute: sqlite:////tmp/...
    train_agent(app_env, tmp_path, "-m", "experiment=smoke", "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                f"hydra.sweeper.storage={storage}", f"hydra.sweep.dir={sweep}")
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and set(results["best_params"]) == set(SEARCH_SPACE)
    for key, value in results["best_params"].items():
        kind, *bounds = SEARCH_SPACE[key]
        assert value in bounds if kind == "choice" else bounds[0] <= value <= bounds[1], (key, value)
    # Each trial is a whole run trained with its sampled values; the best value is the best objective.
    trials = {}
    for job in sorted(p for p in sweep.iterdir() if p.is_dir()):
        config = check_run(job, 0, evaluated=True)
        trials[job.name] = (objective(job), {k: config["agent"][k.split(".")[1]] for k in SEARCH_SPACE})
    assert sorted(trials) == ["0", "1"]
    best_value = max(value for value, _ in trials.values())
    assert results["best_value"] == pytest.approx(best_value)
    assert any(params == pytest.approx(results["best_params"])    # ties: either trial may be the best
               for value, params in trials.values() if value == pytest.approx(best_value))
    # The study was kept in SQLite (Optuna 2.x storage: needs sqlalchemy<2).
    study = optuna.load_study(study_name="sandhop-train-agent", storage=storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    assert study.best_value == pytest.approx(best_value)


@pytest.fixture
def ray_temp_dir():
    # Ray's Unix sockets live in its session folder below this one, and their paths may not exceed
    # 107 bytes: a pytest tmp_path is too long for that, so a short folder under /tmp.
    path = Path(tempfile.mkdtemp(prefix="sandhop-ray-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_ray
def test_two_jobs_on_a_local_ray_instance(app_env, tmp_path, ray_temp_dir):
    sweep = tmp_path / "sweep"
    env = {**app_env, "RAY_AUTH_MODE": "disabled", "RAY_DEDUP_LOGS": "0"}
    out = train_agent(env, tmp_path, "-m", "experiment=smoke", "hydra/launcher=ray_local", "seed=0,1",
                      f"hydra.sweep.dir={sweep}", "hydra.launcher.ray.init.num_cpus=2",
                      "hydra.launcher.ray.init.object_store_memory=78643200",
                      f"hydra.launcher.ray.init._temp_dir={ray_temp_dir}")
    assert "Started a local Ray instance" in out.stdout + out.stderr
    values = []
    for seed in (0, 1):
        check_run(sweep / str(seed), seed, evaluated=True)
        values.append(objective(sweep / str(seed)))
    assert (sweep / "multirun.yaml").exists()
    # The jobs ran in Ray's worker processes: each printed what it returns, its objective, there.
    (session,) = ray_temp_dir.glob("session_2*")
    logs = "".join(p.read_text(errors="replace") for p in (session / "logs").glob("worker-*.out"))
    assert logs.count('"objective"') == 2
    for value in values:
        assert f'"objective": {value!r}' in logs
