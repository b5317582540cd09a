"""`sandhop-train-agent`: train the PPO sandbox manager on the JAX twin (a Hydra app,
`configs/train_agent.yaml`).

    sandhop-train-agent                                   # dataset=default, agent=ppo
    sandhop-train-agent experiment=smoke                  # seconds: the small dataset, few updates
    sandhop-train-agent env.risk.source=model env.risk.checkpoint=runs/risk/X
    sandhop-train-agent agent.num_seeds=3                 # three seeds side by side in one jit
    sandhop-train-agent out=runs/agent/a                  # again: resumes where it stopped
    sandhop-train-agent init=artifacts/a                  # every member starts from an exported policy
    sandhop-train-agent -m agent.lr=1e-3,3e-4 seed=0,1    # a sweep (hparams_search=optuna, hydra/launcher=ray_local)

The run folder holds `config.yaml` (resolved), `checkpoints/` (Orbax: every member's runner
state — networks, optimiser, observation statistics, environments, keys — and, separately, the
policy alone), `metrics.csv` and `metrics.parquet` (one row per member and chunk of updates,
with the val evaluation where it ran) and `evaluation.json` (the greedy policy on the val split;
its mean episodic return is the sweep objective).

`init=ARTIFACT` warm-starts a fresh run (for `sandhop learn`, which retrains an artifact's models
on new data): the artifact is verified (`Artifact.load`), its env's actions, hidden size and
`normalize_obs` must match this run's, and every member then starts from its policy network
(embedding, actor, critic) and input normaliser; optimiser, environments and keys start fresh.
The start is saved as update 0 and recorded in `init.json` (the artifact's folder, the sha256 of
its manifest, which vouches for its weight files, and the agent run and member it came from),
repeated under `init` in `evaluation.json`. A resumed run continues from its checkpoint instead
(the artifact is still checked, and must be the init= the run started with).
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One XLA CPU device per core, so members (seeds) can run on separate cores: a single CPU device
# runs a program on one core. Only where nothing imported JAX before (it reads the flag once).
if "jax" not in sys.modules and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={len(os.sched_getaffinity(0))}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sandhop.agents.ppo import (AgentError, PPOConfig, PPOPolicy, chunk_row, episode_row, init_network,
                                input_sizes, make_evaluate, make_train)
from sandhop.envs.jax_env import JaxSandboxEnv  # noqa: E402
from sandhop.envs.spec import EnvSpec  # noqa: E402


class Trainer:
    """Owns the members' runner state, the jitted chunk and the checkpoints of one run folder."""

    def __init__(self, out: Path, config: PPOConfig, env: JaxSandboxEnv, seed: int) -> None:
        import orbax.checkpoint as ocp
        self.out, self.config, self.env = out, config, env
        init, chunk = make_train(config, env)
        hp = config.member_hparams()
        self.hparams = {k: jnp.asarray(v) for k, v in hp.items()}
        self.seeds = [seed + i // config.settings_per_seed for i in range(config.num_members)]
        keys = jnp.stack([jax.random.PRNGKey(s) for s in self.seeds])
        self._init = jax.jit(jax.vmap(init, in_axes=(0, None)))
        self._keys = keys
        # Members split evenly over the CPU devices (pmap), vmapped within each.
        n = jax.local_device_count()
        self.devices = n if n > 1 and config.num_members % n == 0 else 1
        if self.devices > 1:
            self._chunk = jax.pmap(jax.vmap(chunk, in_axes=(0, 0, None)), in_axes=(0, 0, None), donate_argnums=0)
        else:
            self._chunk = jax.jit(jax.vmap(chunk, in_axes=(0, 0, None)), donate_argnums=0)
        self.runner = None
        self.manager = ocp.CheckpointManager((out / "checkpoints").resolve(),
                                             options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

    @property
    def update(self) -> int:
        return int(self.runner.update[0])

    def chunk(self, runner, hparams: dict, env_params):
        """One jitted chunk of updates for every member: (runner, metrics), both [members, ...]."""
        if self.devices == 1:
            return self._chunk(runner, hparams, env_params)
        d = self.devices
        split = lambda a: a.reshape(d, a.shape[0] // d, *a.shape[1:])  # noqa: E731
        merge = lambda a: a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])  # noqa: E731
        runner, metrics = self._chunk(jax.tree_util.tree_map(split, runner),
                                      jax.tree_util.tree_map(split, hparams), env_params)
        return jax.tree_util.tree_map(merge, runner), jax.tree_util.tree_map(merge, metrics)

    def start(self) -> bool:
        """Restore the newest checkpoint (True) or initialise fresh members (False)."""
        import orbax.checkpoint as ocp
        step = self.manager.latest_step()
        if step is None:
            self.runner = self._init(self._keys, self.env.params)
            return False
        abstract = jax.eval_shape(self._init, self._keys, self.env.params)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(runner=ocp.args.StandardRestore(abstract)))
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentError(f"{self.out}: its checkpoint does not fit this agent/env config ({exc}); resume "
                             "with the run's own settings (config.yaml) or use a new out=") from None
        self.runner = restored["runner"]
        return True

    def start_from(self, start: "WarmStart") -> None:
        """Every member's networks and observation statistics from `start` (a fresh run, before its
        first update); optimiser, environments and keys stay as initialised."""
        def broadcast(ours, theirs):
            return jnp.broadcast_to(jnp.asarray(theirs, ours.dtype), ours.shape)
        self.runner = self.runner._replace(params=jax.tree_util.tree_map(broadcast, self.runner.params, start.params),
                                           norm=jax.tree_util.tree_map(broadcast, self.runner.norm, start.norm))

    def save(self, meta: dict) -> None:
        import orbax.checkpoint as ocp
        # On the host first: arrays merged from several devices would be saved with their
        # sharding, and a machine with another device count could not restore them.
        runner = jax.device_get(self.runner)
        policy = {"params": runner.params, "norm": runner.norm}
        self.manager.save(self.update, args=ocp.args.Composite(
            runner=ocp.args.StandardSave(runner), policy=ocp.args.StandardSave(policy),
            meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()


def member_names(config: PPOConfig, seeds: list[int]) -> list[dict]:
    """Per member: its seed and the hyperparameters it trains with."""
    hp = config.member_hparams()
    return [{"member": i, "seed": s, **{k: float(f"{v[i]:.6g}") for k, v in hp.items()}} for i, s in enumerate(seeds)]


def run(cfg: Any, out: Path | None = None) -> dict:
    """Train (or resume) one run and evaluate it on val; returns the evaluation."""
    import logging
    from omegaconf import OmegaConf
    for name in ("absl", "jax", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    use_compilation_cache()
    out = Path(out or cfg.out).expanduser().resolve()
    config = PPOConfig.from_config(cfg.agent)
    spec = EnvSpec.from_config(cfg.env)
    # Checked before anything is written: a refused init= leaves no run folder to conflict with.
    start = load_init(cfg.init, config, spec) if cfg.get("init") else None
    out.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    stored = out / "config.yaml"
    if stored.exists():
        before = OmegaConf.to_container(OmegaConf.load(stored), resolve=True)
        changed = [k for k in ("agent", "env", "dataset", "seed", "init") if before.get(k) != resolved.get(k)]
        if changed:
            raise AgentError(f"{out} holds a run with another {', '.join(changed)} config; resume with the same "
                             "settings (see its config.yaml) or use a new out=")
    stored.write_text(OmegaConf.to_yaml(resolved))
    progress = bool(cfg.get("progress", True))
    env = training_env(cfg, config, spec, progress)
    want_eval = bool(cfg.get("evaluate", True)) or config.eval_every_chunks > 0
    val_env = JaxSandboxEnv.from_episodes(_episodes("val", cfg, spec, progress), spec) if want_eval else None
    trainer = Trainer(out, config, env, int(cfg.seed))
    members = member_names(config, trainer.seeds)
    init_json = out / "init.json"
    if trainer.start():
        print(f"sandhop-train-agent: resuming {out} at update {trainer.update} of {config.num_updates}")
    elif start is not None:
        trainer.start_from(start)
        init_json.write_text(json.dumps(start.record, indent=2) + "\n")
        trainer.save({"update": 0, "num_updates": config.num_updates, "members": members})
    evaluate = jax.jit(jax.vmap(make_evaluate(config, val_env), in_axes=(0, 0, None))) if val_env else None
    metrics_csv = out / "metrics.csv"
    _drop_rows_after(metrics_csv, trainer.update)
    stop_after = cfg.get("stop_after_chunks")
    from tqdm import tqdm
    bar = tqdm(total=config.num_updates, initial=trainer.update, desc="training sandbox manager", unit="update",
               disable=not progress)
    chunks_done = 0
    try:
        while trainer.update < config.num_updates:
            if stop_after is not None and chunks_done >= int(stop_after):
                break
            started = time.perf_counter()
            trainer.runner, m = trainer.chunk(trainer.runner, trainer.hparams, env.params)
            m = jax.device_get(m)
            seconds = time.perf_counter() - started
            chunk = trainer.update // config.chunk_updates
            steps = config.chunk_updates * config.batch_size * config.num_members
            rows = [{**member, "update": trainer.update, "timesteps": trainer.update * config.batch_size,
                     "SPS": round(steps / seconds), "seconds": round(seconds, 3),
                     **chunk_row({k: v[i] for k, v in m.items()})} for i, member in enumerate(members)]
            if evaluate is not None and config.eval_every_chunks and chunk % config.eval_every_chunks == 0 \
                    and trainer.update < config.num_updates:
                for row, ev in zip(rows, _evaluate(evaluate, trainer.runner, val_env)):
                    row.update({f"val_{k}": v for k, v in ev.items()})
            _append_rows(metrics_csv, rows)
            trainer.save({"update": trainer.update, "num_updates": config.num_updates, "members": members})
            bar.update(config.chunk_updates)
            bar.set_postfix(ret=f"{rows[0]['episodic_return']:.3f}", through=f"{rows[0]['attacks_through']:.2f}",
                            broken=f"{rows[0]['tests_broken']:.3f}", SPS=rows[0]["SPS"])
            chunks_done += 1
    finally:
        bar.close()
    _write_parquet(metrics_csv)
    result: dict = {"update": trainer.update, "num_updates": config.num_updates, "members": members}
    if start is not None and init_json.exists():
        result["init"] = json.loads(init_json.read_text())
    if cfg.get("evaluate", True) and trainer.update >= config.num_updates:
        val = _evaluate(evaluate, trainer.runner, val_env)
        result["val"] = [{**m, **v} for m, v in zip(members, val)]
        result["objective"] = float(np.mean([v["episodic_return"] for v in val]))
        (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


@dataclass(frozen=True)
class WarmStart:
    """An exported policy and input normaliser that fit this run (`init=`), float32 numpy."""

    params: dict   # as `init_network` lays them out: embed, actor, critic
    norm: dict     # mean, var, count
    record: dict   # where it came from (init.json)


def load_init(path: str | Path, config: PPOConfig, spec: EnvSpec) -> WarmStart:
    """The policy of the artifact at `path`, verified as the runtime verifies it, and checked to
    fit this run: the same actions, dense inputs, hidden size and observation normalisation."""
    from sandhop.enforcement.runtime import MANIFEST, POLICY_FILE, Artifact, ArtifactError, sha256_file
    root = Path(path).expanduser().resolve()
    try:
        artifact = Artifact.load(root)
    except ArtifactError as exc:
        raise AgentError(f"init={root} cannot be used: {exc} (or train from scratch: init=null)") from exc
    theirs, ours = artifact.env_spec.action_names(), spec.action_names()
    if theirs != ours:
        only_theirs = [a for a in theirs if a not in ours] or ["none"]
        only_ours = [a for a in ours if a not in theirs] or ["none"]
        raise AgentError(f"init={root}: its policy acts on other actions than this run's env (only in the artifact: "
                         f"{', '.join(only_theirs)}; only in this run: {', '.join(only_ours)}); train with the "
                         f"artifact's env.categories=[{','.join(artifact.env_spec.categories)}] or start from "
                         "scratch (init=null)")
    embed = artifact.policy.params["embed"]["w"]
    if embed.ndim != 2:
        raise AgentError(f"init={root}: {POLICY_FILE} holds embed.w of shape {embed.shape}, not a matrix; re-export "
                         "the artifact or use init=null")
    n_dense, _ = input_sizes(spec)
    if embed.shape[0] != n_dense:
        raise AgentError(f"init={root}: its policy reads {embed.shape[0]} dense inputs, this run's env gives "
                         f"{n_dense} (another event model); re-export the artifact with this sandhop or use init=null")
    if embed.shape[1] != config.hidden:
        raise AgentError(f"init={root}: its policy has hidden size {embed.shape[1]}, this run's agent.hidden is "
                         f"{config.hidden}; set agent.hidden={embed.shape[1]} (or init=null)")
    normalized = bool(artifact.manifest["agent"]["normalize_obs"])
    if normalized != config.normalize_obs:
        raise AgentError(f"init={root}: its policy was trained with normalize_obs={normalized}, this run has "
                         f"agent.normalize_obs={config.normalize_obs}; set agent.normalize_obs={normalized}")
    # Every tensor's shape, where the checks above say nothing (an artifact at odds with itself).
    from sandhop.agents.export import flatten
    network = jax.eval_shape(lambda: init_network(jax.random.PRNGKey(0), spec, config.hidden))
    expected = flatten({**jax.tree_util.tree_map(lambda a: np.zeros(a.shape), network),
                        "norm": {"mean": np.zeros(n_dense), "var": np.zeros(n_dense), "count": np.zeros(())}})
    weights = flatten({**artifact.policy.params, "norm": artifact.policy.norm})   # float32, as in the file
    wrong = [f"{name} {weights[name].shape} (needs {a.shape})" for name, a in expected.items()
             if weights[name].shape != a.shape]
    if wrong:
        raise AgentError(f"init={root}: {POLICY_FILE} does not fit this network ({'; '.join(wrong)}); re-export "
                         "the artifact or use init=null")
    policy = jax.tree_util.tree_map(lambda a: np.array(a, np.float32),
                                    {"params": artifact.policy.params, "norm": artifact.policy.norm})
    agent = artifact.manifest.get("agent", {})
    record = {"artifact": str(root), "manifest_sha256": sha256_file(root / MANIFEST),
              "policy_sha256": artifact.manifest["files"][POLICY_FILE], "created": artifact.manifest.get("created"),
              "agent_run": agent.get("run"), "member": agent.get("member"), "seed": agent.get("seed")}
    return WarmStart(policy["params"], policy["norm"], record)


def use_compilation_cache() -> None:
    """Keep compiled programs on disk: the jobs of a sweep differ in traced hyperparameters only,
    so all but the first skip compilation (tens of seconds on two cores)."""
    from sandhop.datasets.splits import cache_dir
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def training_env(cfg: Any, config: PPOConfig, spec: EnvSpec, progress: bool) -> JaxSandboxEnv:
    """The twin over the train split as PPO sees it: with a risk model's out-of-fold scores
    (`agent.risk_scores`), simulated missed and false alarms (`agent.missed_alarms`,
    `agent.false_alarms`) and tests cut after `agent.train_max_steps` events."""
    train = _episodes("train", cfg, spec, progress)
    if spec.risk_source == "model" and config.risk_scores == "out_of_fold":
        from sandhop.envs.data import EnvError, out_of_fold_risk
        try:
            train = out_of_fold_risk(train, spec.risk_checkpoint)
        except EnvError as exc:
            raise AgentError(str(exc)) from None
        print(f"sandhop-train-agent: the train split's risk scores are out of fold ({spec.risk_checkpoint})")
    # Both draw their donors from the scores as loaded: a false alarm carries an attack's own
    # scores, a missed one a benign event's. They touch disjoint events (attack and benign ones).
    shown = train
    if config.missed_alarms > 0:
        shown, missed = missed_alarms(train, config.missed_alarms, int(cfg.seed))
        print(f"sandhop-train-agent: {len(missed)} missed alarms on early attack steps "
              f"(agent.missed_alarms={config.missed_alarms})")
    if config.false_alarms > 0:
        scored, alarmed = false_alarms(train, config.false_alarms, int(cfg.seed))
        if shown is train:
            shown = scored
        else:   # a copy of its own
            shown.risk[alarmed], shown.tags[alarmed] = scored.risk[alarmed], scored.tags[alarmed]
        print(f"sandhop-train-agent: {len(alarmed)} false alarms among the train split's "
              f"{int((~train.malicious).sum())} benign events (agent.false_alarms={config.false_alarms})")
    env = JaxSandboxEnv.from_episodes(shown, spec, progress=progress)
    if config.train_max_steps:   # training only: evaluation replays whole tests
        env.params = env.params.replace(max_steps=jnp.int32(config.train_max_steps))
    return env


def _episodes(split: str, cfg: Any, spec: EnvSpec, progress: bool):
    from sandhop.envs import data as envdata
    return envdata.load(split, cfg.dataset, spec, progress=progress)


def missed_alarms(episodes: Any, share: float, seed: int) -> tuple[Any, np.ndarray]:
    """A copy of `episodes` in which, in about `share` of the attacked tests, every attack step
    before the attack's damaging one carries the risk score and tags of a random benign event, and
    the indices of those steps.

    The risk model flags nearly every train attack at its first steps, so the policy seldom meets
    an attack that reaches its damaging step unflagged, and what it does there is left to chance.
    On held-out suites some do: a dropper whose connect scored 0.48 reached its spawn from /tmp
    (scored 0.95) at `observe`, and two of twelve seeds let it run. The damaging step keeps its
    scores: the policy learns to stop an attack there when nothing flagged it before."""
    rng = np.random.default_rng([seed, 1])   # a stream of its own: false alarms draw from `seed`
    episode = np.repeat(np.arange(len(episodes.keys)), episodes.length)
    position = np.arange(episodes.n_events) - np.repeat(episodes.start, episodes.length)
    damage = np.full(len(episodes.keys), np.iinfo(np.int64).max)
    np.minimum.at(damage, episode[episodes.damaging], position[episodes.damaging])
    chosen = np.array([bool(a) for a in episodes.attack]) & (rng.random(len(episodes.keys)) < share)
    hit = np.flatnonzero(episodes.malicious & chosen[episode] & (position < damage[episode]))
    benign = np.flatnonzero(~episodes.malicious)
    hit = hit if len(benign) else hit[:0]
    donors = rng.choice(benign, len(hit)) if len(hit) else hit
    return _scores_of(episodes, hit, donors), hit


def false_alarms(episodes: Any, share: float, seed: int) -> tuple[Any, np.ndarray]:
    """A copy of `episodes` in which about `share` of the benign events of kinds (category, target
    class) that no attack of the split uses carry the risk score and tags of a random attack event,
    and the indices of those events.

    The risk model scores a benign event of such a kind low throughout training, so nothing there
    tells the policy that an alarm on it may be false; on held-out suites the model does raise such
    alarms (a connect to a non-routable private address scored as exfiltration). Kinds that attacks
    use are left alone: there a benign event that looks like an attack is indistinguishable from one,
    and training the manager to let it pass would let attacks through."""
    rng = np.random.default_rng(seed)
    kind = episodes.kinds()
    attacked = np.isin(kind, kind[episodes.malicious])
    malicious = np.flatnonzero(episodes.malicious)
    candidates = (~episodes.malicious) & ~attacked
    hit = np.flatnonzero(candidates & (rng.random(len(kind)) < share)) if len(malicious) else np.zeros(0, np.int64)
    donors = rng.choice(malicious, len(hit)) if len(hit) else hit
    return _scores_of(episodes, hit, donors), hit


def _scores_of(episodes: Any, hit: np.ndarray, donors: np.ndarray) -> Any:
    """A copy of `episodes` in which events `hit` carry the risk and tags of events `donors`."""
    from dataclasses import replace
    risk = np.array(episodes.risk, np.float32, copy=True)
    tags = np.array(episodes.tags, np.float32, copy=True)
    risk[hit], tags[hit] = risk[donors], tags[donors]
    return replace(episodes, risk=risk, tags=tags)


def _evaluate(evaluate, runner, val_env: JaxSandboxEnv) -> list[dict]:
    """The greedy policy of every member on the whole val split (the twin)."""
    sums = jax.device_get(evaluate(runner.params, runner.norm, val_env.params))
    return [episode_row({k: v[i] for k, v in sums.items()}) for i in range(len(sums["episodes"]))]


def _append_rows(path: Path, rows: list[dict]) -> None:
    existing = list(csv.DictReader(path.open())) if path.exists() else []
    fieldnames = list(dict.fromkeys([*(existing[0].keys() if existing else []), *(k for r in rows for k in r)]))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(existing + rows)


def _drop_rows_after(path: Path, update: int) -> None:
    """A resumed run repeats the chunks after its checkpoint: drop their earlier rows."""
    if not path.exists():
        return
    rows = [r for r in csv.DictReader(path.open()) if int(r["update"]) <= update]
    if rows:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.unlink()


def _write_parquet(metrics_csv: Path) -> None:
    if metrics_csv.exists():
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq
        pq.write_table(pacsv.read_csv(metrics_csv), metrics_csv.with_suffix(".parquet"))


# --------------------------------------------------------------------------- trained runs

def run_folders(path: Path) -> list[Path]:
    """`path` itself when it is a run folder, else every run folder below it (a multirun)."""
    def is_run(p: Path) -> bool:
        return (p / "config.yaml").exists() and (p / "checkpoints").is_dir()
    if not path.exists():
        raise AgentError(f"{path} does not exist; pass the out= folder of sandhop-train-agent (or a multirun folder)")
    if is_run(path):
        return [path]
    runs = sorted((p for p in path.rglob("config.yaml") if is_run(p.parent)), key=lambda p: str(p))
    if not runs:
        raise AgentError(f"{path} holds no trained sandhop-train-agent run (a folder with config.yaml and "
                         "checkpoints/); train one first: sandhop-train-agent out=DIR")
    return [p.parent for p in runs]


def load_run(run_dir: Path) -> list[PPOPolicy]:
    """The newest checkpoint's policy of every member of one run folder."""
    import orbax.checkpoint as ocp
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(run_dir / "config.yaml")
    config = PPOConfig.from_config(cfg.agent)
    spec = EnvSpec.from_config(cfg.env)
    manager = ocp.CheckpointManager((run_dir / "checkpoints").resolve())
    step = manager.latest_step()
    if step is None:
        raise AgentError(f"{run_dir} has no checkpoint yet; train first (sandhop-train-agent out={run_dir})")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    members = meta["members"]
    n_dense, _ = input_sizes(spec)
    one = jax.eval_shape(lambda: {"params": init_network(jax.random.PRNGKey(0), spec, config.hidden),
                                  "norm": {"mean": jnp.zeros(n_dense), "var": jnp.zeros(n_dense),
                                           "count": jnp.float32(0)}})
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((len(members), *a.shape), a.dtype), one)
    try:
        policy = manager.restore(step, args=ocp.args.Composite(policy=ocp.args.StandardRestore(abstract)))["policy"]
    except (ValueError, KeyError, TypeError) as exc:
        raise AgentError(f"{run_dir}: its checkpoint does not match its config.yaml ({exc}); retrain") from None
    dataset = cfg.dataset.get("name", "default") if hasattr(cfg.dataset, "get") else str(cfg.dataset)
    env_config = OmegaConf.to_container(cfg.env, resolve=True)
    out = []
    for i, member in enumerate(members):
        take = jax.tree_util.tree_map(lambda a: np.asarray(a[i]), policy)
        hp = {k: v for k, v in member.items() if k not in ("member", "seed")}
        name = "ppo" if len(members) == 1 or config.settings_per_seed == 1 else \
            "ppo[" + ",".join(f"{k}={v:g}" for k, v in hp.items()) + "]"
        out.append(PPOPolicy(take["params"], take["norm"], spec, config, name=name, seed=int(member["seed"]),
                             env_config=env_config, dataset=dataset, run_dir=run_dir, hparams=hp))
    return out


def main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://sandhop.configs", config_name="train_agent")
    def app(cfg) -> float | None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        hc = HydraConfig.get()
        out = Path(hc.runtime.output_dir) if hc.mode == RunMode.MULTIRUN else None
        try:
            result = run(cfg, out)
        except AgentError as exc:
            raise SystemExit(f"sandhop-train-agent: {exc}") from None
        if "val" in result:
            print(json.dumps({"objective": result["objective"], "val": result["val"]}, indent=2))
        return result.get("objective")

    app()


if __name__ == "__main__":
    main()
