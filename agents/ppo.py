"""PPO for the sandbox manager, PureJaxRL style, read top to bottom.

`make_train(config, env)` returns `init(key)` and `train_chunk(runner)`: the rollout is a
`lax.scan` over the vmapped JAX twin, GAE a reverse scan, epochs and minibatches nested scans,
the policy a masked categorical; `train_chunk` runs `config.chunk_updates` whole updates inside
one jit. A small Python loop (`sandhop.agents.train_agent`) calls it, and between chunks
evaluates, writes Orbax checkpoints and logs; metrics are reduced on the device first.

Where this departs from PureJaxRL: `terminated` and `truncated` are kept apart (a truncated
test is bootstrapped with the value of its final observation; the twin's `step_env` gives it
before `autoreset`); observations are normalised by running statistics that are part of the
checkpoint; several seeds (and hyperparameter settings) train side by side in one jit, as
members along a leading axis (`vmap`); and episode-level results of the sandbox problem
(attacks let through, tests broken, tier) are tracked per environment on the device.

The networks are plain dense layers over a params pytree, written once for numpy and
`jax.numpy` (`sandhop.agents.network`), so the trained policy runs without JAX (`PPOPolicy`, and
the runtime enforcer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sandhop.agents.network import Inputs, heads, input_sizes, normalize, policy_inputs
from sandhop.envs.jax_env import EnvParams, EnvState, JaxSandboxEnv
from sandhop.envs.spec import EnvSpec, plain_config

# Hyperparameters that may differ between members of one jit (a list in the config: one value per member).
MEMBER_HPARAMS = ("lr", "ent_coef", "clip_eps", "vf_coef", "gamma", "gae_lambda")


class AgentError(ValueError):
    """An agent config or run that cannot work: what and how to fix it."""


RISK_SCORES = ("out_of_fold", "in_sample")   # which risk model scores the train split shows the manager


@dataclass(frozen=True)
class PPOConfig:
    """The `agent` config group (configs/agent/ppo.yaml), typed."""

    total_timesteps: int = 20_000_000
    num_envs: int = 2048
    num_steps: int = 32
    update_epochs: int = 2
    num_minibatches: int = 4
    lr: Any = 3e-4
    anneal_lr: bool = True
    gamma: Any = 0.99
    gae_lambda: Any = 0.95
    clip_eps: Any = 0.2
    ent_coef: Any = 0.01
    vf_coef: Any = 0.5
    max_grad_norm: float = 0.5
    hidden: int = 64
    false_alarms: float = 0.0
    missed_alarms: float = 0.0
    risk_scores: str = "in_sample"
    stay_bias: float = 0.0
    train_max_steps: int = 0
    normalize_obs: bool = True
    num_seeds: int = 1
    chunk_updates: int = 20
    eval_every_chunks: int = 5
    name: str = "ppo"

    def __post_init__(self) -> None:
        problems = []
        for f in ("total_timesteps", "num_envs", "num_steps", "update_epochs", "num_minibatches", "hidden",
                  "num_seeds", "chunk_updates"):
            if int(getattr(self, f)) < 1:
                problems.append(f"agent.{f} must be >= 1")
        if self.num_envs % max(self.num_minibatches, 1):
            problems.append(f"agent.num_envs ({self.num_envs}) must divide into agent.num_minibatches "
                            f"({self.num_minibatches}) equal groups of environments")
        lengths = {len(v) for v in (getattr(self, h) for h in MEMBER_HPARAMS) if isinstance(v, (list, tuple))}
        if len(lengths) > 1:
            problems.append(f"list-valued hyperparameters ({', '.join(MEMBER_HPARAMS)}) must all have the same "
                            f"length, got lengths {sorted(lengths)}")
        if self.train_max_steps < 0:
            problems.append("agent.train_max_steps must be >= 0 (null or 0: whole tests)")
        if not isinstance(self.false_alarms, (int, float)) or not 0.0 <= self.false_alarms < 1.0:
            problems.append(f"agent.false_alarms must be in [0, 1) (a share of benign events), got {self.false_alarms}")
        if not isinstance(self.missed_alarms, (int, float)) or not 0.0 <= self.missed_alarms <= 1.0:
            problems.append(f"agent.missed_alarms must be in [0, 1] (a share of attacked tests), got {self.missed_alarms}")
        if self.risk_scores not in RISK_SCORES:
            problems.append(f"agent.risk_scores {self.risk_scores!r}: use {' or '.join(RISK_SCORES)}")
        if self.eval_every_chunks < 0:
            problems.append("agent.eval_every_chunks must be >= 0 (0: evaluate only at the end)")
        if problems:
            raise AgentError("; ".join(problems))

    @classmethod
    def from_config(cls, cfg: Any) -> "PPOConfig":
        data = plain_config(cfg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise AgentError(f"unknown agent setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        ints = {"total_timesteps", "num_envs", "num_steps", "update_epochs", "num_minibatches", "hidden",
                "num_seeds", "chunk_updates", "eval_every_chunks"}
        if data.get("train_max_steps") is None:
            data.pop("train_max_steps", None)
        else:
            data["train_max_steps"] = int(data["train_max_steps"])
        for share in ("false_alarms", "missed_alarms"):
            if share in data:
                data[share] = float(data[share] or 0.0)   # null: none
        return cls(**{k: (int(v) if k in ints else tuple(v) if isinstance(v, list) else v) for k, v in data.items()})

    @property
    def batch_size(self) -> int:
        return self.num_envs * self.num_steps

    @property
    def num_chunks(self) -> int:
        return max(1, round(self.total_timesteps / (self.batch_size * self.chunk_updates)))

    @property
    def num_updates(self) -> int:
        """Whole chunks of updates, as near to total_timesteps as they come."""
        return self.num_chunks * self.chunk_updates

    @property
    def settings_per_seed(self) -> int:
        lengths = [len(v) for v in (getattr(self, h) for h in MEMBER_HPARAMS) if isinstance(v, (list, tuple))]
        return lengths[0] if lengths else 1

    @property
    def num_members(self) -> int:
        return self.num_seeds * self.settings_per_seed

    def member_hparams(self) -> dict[str, np.ndarray]:
        """Per member (seed-major: every setting of seed 0, then of seed 1, ...), float32."""
        m = self.settings_per_seed
        out = {}
        for h in MEMBER_HPARAMS:
            v = getattr(self, h)
            values = [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)] * m
            out[h] = np.tile(np.asarray(values, np.float32), self.num_seeds)
        return out

    def as_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


# --------------------------------------------------------------------------- networks (numpy or jax.numpy)

def init_network(key: jax.Array, spec: EnvSpec, hidden: int, stay_bias: float = 0.0) -> dict:
    """An embedding layer shared by actor and critic, then one tanh layer and a head each;
    orthogonal init (small for the policy head). `stay_bias` starts the policy mostly staying:
    a uniform start would escalate nearly every test within a few events (5 of 42 actions hop).
    The embedding table starts at zero, so a category or target class that training never gave a
    choice adds nothing: random rows made such an event act on noise (one seed hopped to `high` at
    writes to /dev/shm, a class the train split only writes as /dev/null, where nothing is offered)."""
    def dense(k, n_in, n_out, scale):
        return {"w": jax.nn.initializers.orthogonal(scale)(k, (n_in, n_out), jnp.float32),
                "b": jnp.zeros((n_out,), jnp.float32)}
    n_dense, n_rows = input_sizes(spec)
    k = jax.random.split(key, 6)   # k[1] seeded the table once; kept so the other layers start as before
    s2 = float(np.sqrt(2.0))
    return {"embed": {**dense(k[0], n_dense, hidden, s2),
                      "table": jnp.zeros((n_rows, hidden), jnp.float32)},
            "actor": [dense(k[2], hidden, hidden, s2),
                      {**dense(k[3], hidden, spec.n_actions, 0.01),
                       "b": jnp.zeros((spec.n_actions,), jnp.float32).at[0].set(stay_bias)}],
            "critic": [dense(k[4], hidden, hidden, s2), dense(k[5], hidden, 1, 1.0)]}


def update_normalizer(norm: dict, batch: jax.Array) -> dict:
    """Running mean and variance (parallel Welford) with a batch of raw flat observations."""
    n = jnp.float32(batch.shape[0])
    mean, var = batch.mean(axis=0), batch.var(axis=0)
    total = norm["count"] + n
    delta = mean - norm["mean"]
    new_mean = norm["mean"] + delta * n / total
    m2 = norm["var"] * norm["count"] + var * n + delta ** 2 * norm["count"] * n / total
    return {"mean": new_mean, "var": m2 / total, "count": total}


# --------------------------------------------------------------------------- the sandbox problem's episode results

class Episode(NamedTuple):
    """Running results of each environment's current episode (one entry per env)."""

    ret: jax.Array        # float32: return so far
    stopped: jax.Array    # bool: a malicious step was redirected or denied
    settled: jax.Array    # bool: the first damaging step has been decided
    through: jax.Array    # bool: that damaging step came with nothing stopped before or at it
    broken: jax.Array     # bool: a benign step was denied

    @staticmethod
    def zeros(n: int) -> "Episode":
        f = jnp.zeros((n,), bool)
        return Episode(jnp.zeros((n,), jnp.float32), f, f, f, f)


def track(ep: Episode, info: dict, reward: jax.Array) -> tuple[Episode, Episode]:
    """Add one step; returns (results so far including this step, running results after it)."""
    malicious = info["malicious"].astype(bool)
    allowed = info["effect"] == 0
    stopped = ep.stopped | (malicious & ~allowed)
    first_damage = info["damaging"] & ~ep.settled
    now = Episode(ep.ret + reward, stopped, ep.settled | info["damaging"],
                  jnp.where(first_damage, ~stopped, ep.through), ep.broken | (~malicious & (info["effect"] == 2)))
    return now, now


# Per-step sums of the sandbox problem's results, added up on the device (`episode_row` divides).
STEP_SUMS = ("episodes", "return_sum", "attacked", "through", "benign", "broken", "steps", "level_sum",
             "benign_steps", "benign_denied", "hops")


def step_stats(ep: Episode, info: dict, ended: jax.Array, attacked: jax.Array, live: jax.Array) -> dict:
    """`STEP_SUMS` of one step over the environments that are `live`; `ep` holds the results
    including this step, `ended` marks the episodes that ended with it."""
    f = jnp.float32
    benign_step = live & (info["malicious"] == 0)
    through = attacked & jnp.where(ep.settled, ep.through, ~ep.stopped)
    return {"episodes": ended.sum().astype(f), "return_sum": jnp.where(ended, ep.ret, 0.0).sum(),
            "attacked": (attacked & ended).sum().astype(f), "through": (through & ended).sum().astype(f),
            "benign": (~attacked & ended).sum().astype(f), "broken": (~attacked & ep.broken & ended).sum().astype(f),
            "steps": live.sum().astype(f), "level_sum": jnp.where(live, info["level"], 0).sum().astype(f),
            "benign_steps": benign_step.sum().astype(f),
            "benign_denied": (benign_step & (info["effect"] == 2)).sum().astype(f),
            "hops": (live & info["hopped"]).sum().astype(f)}


# --------------------------------------------------------------------------- training

class Transition(NamedTuple):
    inputs: Inputs         # raw (normalised with the statistics the rollout used)
    mask: jax.Array
    action: jax.Array
    log_prob: jax.Array
    value: jax.Array
    reward: jax.Array
    terminated: jax.Array
    truncated: jax.Array
    final_value: jax.Array  # value of the final observation where truncated (else 0)


class Runner(NamedTuple):
    """Everything one member's training carries from chunk to chunk (and into a checkpoint)."""

    params: dict
    opt_state: Any
    norm: dict
    env_state: EnvState
    obs: dict
    episode: Episode
    key: jax.Array
    update: jax.Array      # int32: updates done


def gae(traj: Transition, last_value: jax.Array, gamma, gae_lambda) -> tuple[jax.Array, jax.Array]:
    """Advantages and value targets [T, envs], a reverse scan over the rollout."""
    def backward(carry, t: Transition):
        advantage, next_value = carry
        done = t.terminated | t.truncated
        # terminated: nothing follows; truncated: the final observation's value; else the next step's
        bootstrap = jnp.where(t.truncated, t.final_value, jnp.where(t.terminated, 0.0, next_value))
        delta = t.reward + gamma * bootstrap - t.value
        advantage = delta + gamma * gae_lambda * (1.0 - done) * advantage
        return (advantage, t.value), advantage
    _, advantages = jax.lax.scan(backward, (jnp.zeros_like(last_value), last_value), traj, reverse=True)
    return advantages, advantages + traj.value


def make_optimizer(config: PPOConfig) -> optax.GradientTransformation:
    # The learning rate (and its annealing) is applied in the update, so it can differ per member.
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optax.scale_by_adam(eps=1e-5))


def make_train(config: PPOConfig, env: JaxSandboxEnv):
    """`init(key, env_params) -> Runner` and `train_chunk(runner, hparams, env_params) -> (runner,
    metrics)` for one member; vmap both over members (see `Trainer`)."""
    spec: EnvSpec = env.spec
    n_dense, _ = input_sizes(spec)
    optimizer = make_optimizer(config)
    num_envs, num_steps = config.num_envs, config.num_steps
    minibatch = config.batch_size // config.num_minibatches
    use_norm = config.normalize_obs
    v_reset = jax.vmap(env.reset, in_axes=(0, None))
    v_step = jax.vmap(env.step_env, in_axes=(0, 0, None))
    v_autoreset = jax.vmap(env.autoreset, in_axes=(0, 0, None))

    def inputs_of(obs):
        return policy_inputs(jnp, obs, spec)

    def sample(key, logits):
        # One uniform per environment (inverse CDF) instead of one Gumbel per action: the draw
        # is a visible share of a step's cost on a CPU.
        probs = jax.nn.softmax(logits)
        u = jax.random.uniform(key, logits.shape[:-1] + (1,))
        return jnp.minimum((jnp.cumsum(probs, -1) < u).sum(-1), logits.shape[-1] - 1)

    def init(key: jax.Array, env_params: EnvParams) -> Runner:
        k_net, k_env, key = jax.random.split(key, 3)
        params = init_network(k_net, spec, config.hidden, config.stay_bias)
        obs, env_state = v_reset(jax.random.split(k_env, num_envs), env_params)
        norm = {"mean": jnp.zeros((n_dense,), jnp.float32), "var": jnp.ones((n_dense,), jnp.float32),
                "count": jnp.float32(1e-4)}
        if use_norm:
            norm = update_normalizer(norm, inputs_of(obs).dense)
        return Runner(params, optimizer.init(params), norm, env_state, obs, Episode.zeros(num_envs), key,
                      jnp.int32(0))

    def rollout(runner: Runner, env_params: EnvParams):
        def env_step(carry, _):
            params, norm, env_state, obs, ep, key = carry
            key, k_act = jax.random.split(key)
            raw = inputs_of(obs)
            mask = obs["action_mask"].astype(bool)
            logits, v = heads(jnp, params, normalize(jnp, norm, raw, use_norm), mask)
            action = sample(k_act, logits)
            log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], 1)[:, 0]
            next_obs, next_state, reward, terminated, truncated, info = v_step(env_state, action, env_params)
            # The truncated tests' final observations, valued before autoreset replaces them.
            final_value = jax.lax.cond(
                truncated.any(),
                lambda: jnp.where(truncated, heads(jnp, params, normalize(jnp, norm, inputs_of(next_obs), use_norm),
                                                   next_obs["action_mask"].astype(bool))[1], 0.0),
                lambda: jnp.zeros_like(reward))
            done = terminated | truncated
            attacked = env_params.attacked[env_state.episode]
            now, ep = track(ep, info, reward)
            stats = step_stats(now, info, done, attacked, jnp.ones_like(done))
            ep = jax.tree_util.tree_map(lambda fresh, cur: jnp.where(done, fresh, cur), Episode.zeros(num_envs), ep)
            next_obs, next_state = v_autoreset(next_state, done, env_params)
            transition = Transition(raw, mask, action, log_prob, v, reward, terminated, truncated, final_value)
            return (params, norm, next_state, next_obs, ep, key), (transition, stats)

        carry = (runner.params, runner.norm, runner.env_state, runner.obs, runner.episode, runner.key)
        (_, _, env_state, obs, ep, key), (traj, stats) = jax.lax.scan(env_step, carry, None, num_steps)
        return runner._replace(env_state=env_state, obs=obs, episode=ep, key=key), traj, \
            jax.tree_util.tree_map(lambda s: s.sum(0), stats)

    def loss_fn(params, norm, batch, hp):
        traj, advantages, targets = batch
        logits, v = heads(jnp, params, normalize(jnp, norm, traj.inputs, use_norm), traj.mask)
        log_probs = jax.nn.log_softmax(logits)
        log_prob = jnp.take_along_axis(log_probs, traj.action[:, None], 1)[:, 0]
        v_clipped = traj.value + jnp.clip(v - traj.value, -hp["clip_eps"], hp["clip_eps"])
        value_loss = 0.5 * jnp.maximum((v - targets) ** 2, (v_clipped - targets) ** 2).mean()
        log_ratio = log_prob - traj.log_prob
        ratio = jnp.exp(log_ratio)
        # The policy terms average over the steps with a choice: at a quiet event only `stay` is
        # valid, and counting those (nine in ten steps) would shrink the policy's gradient tenfold
        # and skew the advantages' normalisation towards steps that cannot act.
        choice = (traj.mask.sum(-1) > 1).astype(jnp.float32)
        n = jnp.maximum(choice.sum(), 1.0)

        def mean(x):
            return (x * choice).sum() / n
        adv_mean = mean(advantages)
        adv = (advantages - adv_mean) / (jnp.sqrt(mean((advantages - adv_mean) ** 2)) + 1e-8)
        policy_loss = -mean(jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - hp["clip_eps"], 1 + hp["clip_eps"]) * adv))
        entropy = mean(-(jnp.exp(log_probs) * log_probs).sum(-1))
        total = policy_loss + hp["vf_coef"] * value_loss - hp["ent_coef"] * entropy
        return total, {"policy_loss": policy_loss, "value_loss": value_loss, "entropy": entropy,
                       "approx_kl": mean((ratio - 1) - log_ratio),
                       "clipfrac": mean((jnp.abs(ratio - 1) > hp["clip_eps"]).astype(jnp.float32))}

    def update(runner: Runner, hp: dict, env_params: EnvParams):
        runner, traj, stats = rollout(runner, env_params)
        last_value = heads(jnp, runner.params, normalize(jnp, runner.norm, inputs_of(runner.obs), use_norm),
                           runner.obs["action_mask"].astype(bool))[1]
        advantages, targets = gae(traj, last_value, hp["gamma"], hp["gae_lambda"])
        lr = hp["lr"] * (1.0 - runner.update / config.num_updates if config.anneal_lr else 1.0)

        def epoch(carry, _):
            params, opt_state, key = carry
            key, k_perm = jax.random.split(key)
            # Minibatches are shuffled groups of environments, each with its whole rollout: a
            # permutation of the environments costs ~1 ms, one of all steps ~50 ms per epoch.
            perm = jax.random.permutation(k_perm, num_envs)
            minibatches = jax.tree_util.tree_map(
                lambda a: jnp.swapaxes(a, 0, 1)[perm].reshape(config.num_minibatches, minibatch, *a.shape[2:]),
                (traj, advantages, targets))

            def step(carry, mb):
                params, opt_state = carry
                grads, info = jax.grad(loss_fn, has_aux=True)(params, runner.norm, mb, hp)
                updates, opt_state = optimizer.update(grads, opt_state, params)
                params = jax.tree_util.tree_map(lambda p, u: p - lr * u, params, updates)
                return (params, opt_state), info
            (params, opt_state), info = jax.lax.scan(step, (params, opt_state), minibatches)
            return (params, opt_state, key), info

        (params, opt_state, key), info = jax.lax.scan(epoch, (runner.params, runner.opt_state, runner.key), None,
                                                      config.update_epochs)
        norm = update_normalizer(runner.norm, traj.inputs.dense.reshape(-1, n_dense)) if use_norm else runner.norm
        residual = targets - traj.value
        metrics = jax.tree_util.tree_map(jnp.mean, info)
        metrics["explained_variance"] = 1.0 - residual.var() / (targets.var() + 1e-8)
        metrics.update(stats)
        return runner._replace(params=params, opt_state=opt_state, norm=norm, key=key,
                               update=runner.update + 1), metrics

    def train_chunk(runner: Runner, hp: dict, env_params: EnvParams):
        def body(runner, _):
            return update(runner, hp, env_params)
        runner, metrics = jax.lax.scan(body, runner, None, config.chunk_updates)
        return runner, {k: (v.sum() if k in STEP_SUMS else v.mean()) for k, v in metrics.items()}

    return init, train_chunk


def episode_row(m: dict) -> dict:
    """The sandbox problem's figures from `STEP_SUMS` (of a chunk, or of an evaluation)."""
    def ratio(a, b):
        return float(a) / float(b) if float(b) > 0 else float("nan")
    return {"episodic_return": ratio(m["return_sum"], m["episodes"]),
            "attacks_through": ratio(m["through"], m["attacked"]),
            "benign_denied": ratio(m["benign_denied"], m["benign_steps"]),
            "tests_broken": ratio(m["broken"], m["benign"]),
            "mean_tier": ratio(m["level_sum"], m["steps"]),
            "hops_per_episode": ratio(m["hops"], m["episodes"]),
            "episodes": int(m["episodes"])}


def chunk_row(m: dict) -> dict:
    """The fixed metric names of one chunk, from the on-device reductions of `train_chunk`."""
    return {**episode_row(m), **{k: float(m[k]) for k in ("approx_kl", "clipfrac", "explained_variance",
                                                          "policy_loss", "value_loss", "entropy")}}


# --------------------------------------------------------------------------- greedy evaluation on the twin

def make_evaluate(config: PPOConfig, env: JaxSandboxEnv):
    """`evaluate(params, norm, env_params) -> sums`: every episode of the twin's split once, greedy
    (argmax of the masked policy), all episodes side by side until the longest ends."""
    spec = env.spec
    use_norm = config.normalize_obs
    n_episodes = int(env.params.length.shape[0])
    v_reset_to = jax.vmap(env.reset_to, in_axes=(0, None))
    v_step = jax.vmap(env.step_env, in_axes=(0, 0, None))

    def evaluate(params: dict, norm: dict, env_params: EnvParams):
        obs, state = v_reset_to(jnp.arange(n_episodes), env_params)
        attacked = env_params.attacked
        zeros = {k: jnp.float32(0) for k in STEP_SUMS}

        def cond(carry):
            return ~carry[3].all()

        def body(carry):
            obs, state, ep, done, sums = carry
            x = normalize(jnp, norm, policy_inputs(jnp, obs, spec), use_norm)
            action = jnp.argmax(heads(jnp, params, x, obs["action_mask"].astype(bool))[0], -1)
            # A finished episode keeps stepping (past its end, harmlessly) but counts no more.
            obs, state, reward, terminated, truncated, info = v_step(state, action, env_params)
            live = ~done
            now, _ = track(ep, info, reward)
            ep = jax.tree_util.tree_map(lambda a, b: jnp.where(live, a, b), now, ep)
            ended = live & (terminated | truncated)
            stats = step_stats(ep, info, ended, attacked, live)
            sums = {k: sums[k] + stats[k] for k in sums}
            return obs, state, ep, done | ended, sums

        carry = (obs, state, Episode.zeros(n_episodes), jnp.zeros((n_episodes,), bool), zeros)
        return jax.lax.while_loop(cond, body, carry)[4]

    return evaluate


# --------------------------------------------------------------------------- the trained policy without JAX

class PPOPolicy:
    """One member's greedy policy in numpy, for the Gymnasium env and the runtime: `act(obs)`
    takes the env's observation dict and returns the argmax of the masked policy."""

    def __init__(self, params: dict, norm: dict, spec: EnvSpec, config: PPOConfig, *, name: str = "ppo",
                 seed: int = 0, env_config: dict | None = None, dataset: str = "default",
                 run_dir: Path | None = None, hparams: dict | None = None) -> None:
        self.params = jax.tree_util.tree_map(np.asarray, params)
        self.norm = {k: np.asarray(v) for k, v in norm.items()}
        self.spec = spec
        self.config = config
        self.name = name
        self.seed = seed
        self.env_config = env_config if env_config is not None else spec.as_dict()
        self.dataset = dataset
        self.run_dir = run_dir
        self.hparams = hparams or {}

    def reset(self, info: dict | None = None) -> None:
        """Nothing carries over between tests (the observation holds the recent history)."""

    def logits(self, obs: dict) -> np.ndarray:
        x = normalize(np, self.norm, policy_inputs(np, obs, self.spec), self.config.normalize_obs)
        return heads(np, self.params, x, np.asarray(obs["action_mask"]).astype(bool))[0]

    def act(self, obs: dict) -> int:
        return int(np.argmax(self.logits(obs), axis=-1))


def load_policies(path: str | Path) -> list[PPOPolicy]:
    """Every member of a `sandhop-train-agent` run folder, or of every run under a folder (a
    Hydra multirun): one policy per trained seed / setting."""
    from sandhop.agents.train_agent import load_run, run_folders
    path = Path(path).expanduser()
    policies = []
    for run in run_folders(path):
        policies.extend(load_run(run))
    return policies


