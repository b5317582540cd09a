"""The pure-JAX twin of `sandhop/SandboxManager-v0` (gymnax / Gymnasium `FuncEnv` style).

`reset` and `step` are pure functions of frozen `EnvState` and `EnvParams` pytrees, so they jit
end to end and vmap over thousands of environments. Traces live in `EnvParams` as flat padded
arrays (see `sandhop.envs.data`); the decision on an event is looked up in a table the real
`PolicyEngine` precomputed for every (distinct event, tier, permission of its category): the
twin holds no rule logic. Actions, observation, mask and reward are the shared definitions of
`sandhop.envs.spec`, so the twin and the Gymnasium env cannot drift apart (a test replays both).

    twin = JaxSandboxEnv.from_split("train", dataset="small")
    obs, state = twin.reset(jax.random.key(0), twin.params)
    obs, state, reward, terminated, truncated, info = twin.step(state, action, twin.params)

`step` resets a finished episode in the same call (autoreset mode SAME_STEP: the returned
observation is the next episode's first); `step_env` does not. A new episode is drawn from the
state's own counter-based stream, so stepping needs no PRNG key.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from gymnasium.vector import AutoresetMode

from sandhop.enforcement.engine import NEVER_QUIET, PolicyEngine
from sandhop.enforcement.events import CATEGORIES, TARGET_CLASSES
from sandhop.envs import data as envdata
from sandhop.envs.spec import (N_TIERS, PERMISSIONS, EnvSpec, action_mask, add_alert, decisive, flat_observation,
                               is_quiet, outcome_of, push_recent, step_reward)


@struct.dataclass
class EnvState:
    episode: jax.Array       # int32
    start: jax.Array         # int32: the episode's first event row
    length: jax.Array        # int32: its number of events
    t: jax.Array             # int32: events decided in this episode
    level: jax.Array         # int32: the tier
    permissions: jax.Array   # int32 [K]
    denied: jax.Array        # uint32: bit window of recent denials
    redirected: jax.Array    # uint32
    alerts: jax.Array        # int32: earlier events not quiet with risk >= ALERT_RISK (capped)
    rng: jax.Array           # uint32: counter of the episode stream


# EnvParams.meta packs per event: category (bits 0-4), target class (5-10), malicious (11),
# permission slot + 1 (12-17; 0: the category has no grant/revoke action), damaging (18), quiet (19).
_CLASS_SHIFT, _MALICIOUS_SHIFT, _SLOT_SHIFT, _DAMAGING_SHIFT, _QUIET_SHIFT = 5, 11, 12, 18, 19
_SPAWN = np.isin(np.array(CATEGORIES), list(NEVER_QUIET))   # by category index: every action counts there


@struct.dataclass
class EnvParams:
    """Traces flat over events (rows); a step gathers one word of each row array."""

    start: jax.Array         # int32 [E]
    length: jax.Array        # int32 [E]
    attacked: jax.Array      # bool [E]: the episode holds an injected attack
    meta: jax.Array          # uint32 [N]: category, target class, malicious, permission slot, quiet (see above)
    floats: jax.Array        # float32 [N, 1 + T + 1]: risk, tag probabilities, progress
    decisions: jax.Array     # uint32 [N]: the engine's effect under each (tier, permission), 2 bits each
    costs: jax.Array         # float32 [6]: reward of each outcome
    overhead: jax.Array      # float32 [tiers]
    hop: jax.Array
    permission_change: jax.Array
    damage: jax.Array
    base_level: jax.Array
    max_steps: jax.Array     # 0: none


def make_params(episodes: envdata.Episodes, decisions: np.ndarray, spec: EnvSpec) -> EnvParams:
    """Arrays of the twin from episodes and the engine's table [targets, tiers, permissions]
    (expanded to one row per event: a step then needs one gather for its decision)."""
    slots = spec.category_slots().astype(np.int64)
    assert len(CATEGORIES) <= 32 and len(TARGET_CLASSES) <= 64 and spec.n_categories < 63, "meta bit layout"
    assert decisions.shape[1] * decisions.shape[2] <= 16, "2 bits per decision in a uint32"
    meta = (episodes.category.astype(np.int64) | episodes.target_class.astype(np.int64) << _CLASS_SHIFT
            | episodes.malicious.astype(np.int64) << _MALICIOUS_SHIFT | (slots[episodes.category] + 1) << _SLOT_SHIFT
            | episodes.damaging.astype(np.int64) << _DAMAGING_SHIFT
            | episodes.quiet(decisions).astype(np.int64) << _QUIET_SHIFT)
    floats = np.concatenate([episodes.risk[:, None], episodes.tags, episodes.progress[:, None]], axis=1)
    flat = decisions.reshape(len(decisions), -1).astype(np.int64)
    packed = (flat << (2 * np.arange(flat.shape[1]))).sum(axis=1)[episodes.event]
    return EnvParams(
        start=jnp.asarray(episodes.start, jnp.int32), length=jnp.asarray(episodes.length, jnp.int32),
        attacked=jnp.asarray([bool(a) for a in episodes.attack], bool),
        meta=jnp.asarray(meta.astype(np.uint32)), floats=jnp.asarray(floats, jnp.float32),
        decisions=jnp.asarray(packed.astype(np.uint32)),
        costs=jnp.asarray(spec.outcome_costs()), overhead=jnp.asarray(spec.tier_overhead, jnp.float32),
        hop=jnp.float32(spec.hop), permission_change=jnp.float32(spec.permission_change),
        damage=jnp.float32(spec.damaging_allowed),
        base_level=jnp.int32(spec.base_level), max_steps=jnp.int32(spec.max_episode_steps))


def hash32(x: jax.Array) -> jax.Array:
    """A 32-bit integer hash (lowbias32): the episode stream's next draw."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


class JaxSandboxEnv:
    """Pure functions over (state, params); `params` of the split it was built from."""

    autoreset_mode = AutoresetMode.SAME_STEP

    def __init__(self, spec: EnvSpec, params: EnvParams, episodes: envdata.Episodes | None = None) -> None:
        self.spec = spec
        self.params = params
        self.episodes = episodes
        self.n_actions = spec.n_actions

    @classmethod
    def from_episodes(cls, episodes: envdata.Episodes, spec: EnvSpec | None = None,
                      engine: PolicyEngine | None = None, progress: bool = False) -> "JaxSandboxEnv":
        spec = spec or EnvSpec()
        if len(episodes) == 0:
            raise envdata.EnvError(f"{episodes.name} has no episodes; choose a split with tests")
        if episodes.risk is None:
            envdata.with_risk(episodes, spec)
        decisions = envdata.decision_table(episodes, spec, engine, progress=progress)
        return cls(spec, make_params(episodes, decisions, spec), episodes)

    @classmethod
    def from_split(cls, split: str = "train", dataset: Any = "default", env: Any = None, *,
                   progress: bool = False, **overrides) -> "JaxSandboxEnv":
        spec = EnvSpec.from_config(env, **overrides)
        return cls.from_episodes(envdata.load(split, dataset, spec, progress=progress), spec, progress=progress)

    # ------------------------------------------------------------------ pure functions
    def reset(self, key: jax.Array, params: EnvParams) -> tuple[dict, EnvState]:
        bits = jax.random.bits(key, (), jnp.uint32)
        return self.reset_to(self._draw(bits, params), params, bits)

    def reset_to(self, episode, params: EnvParams, rng=0) -> tuple[dict, EnvState]:
        state = self._fresh(jnp.int32(episode), params, jnp.uint32(rng))
        return self.observation(state, params), state

    def _fresh(self, episode: jax.Array, params: EnvParams, rng: jax.Array) -> EnvState:
        return EnvState(episode=episode, start=params.start[episode], length=params.length[episode],
                        t=jnp.int32(0), level=params.base_level,
                        permissions=jnp.zeros((self.spec.n_categories,), jnp.int32), denied=jnp.uint32(0),
                        redirected=jnp.uint32(0), alerts=jnp.int32(0), rng=rng)

    @staticmethod
    def _draw(rng: jax.Array, params: EnvParams) -> jax.Array:
        return (hash32(rng) % jnp.uint32(params.length.shape[0])).astype(jnp.int32)

    def observation(self, state: EnvState, params: EnvParams) -> dict:
        i = state.start + jnp.minimum(state.t, state.length - 1)
        meta, floats = params.meta[i], params.floats[i]
        return {
            "risk": floats[:1],
            "tags": floats[1:-1],
            "category": (meta & 31).astype(jnp.int32),
            "target_class": ((meta >> _CLASS_SHIFT) & 63).astype(jnp.int32),
            "tier": state.level,
            "permissions": state.permissions,
            "recent": jnp.stack([jax.lax.population_count(state.denied),
                                 jax.lax.population_count(state.redirected)]).astype(jnp.int32),
            "progress": jnp.where(state.t >= state.length, jnp.float32(1.0), floats[-1:]),
            "alerts": state.alerts,
            "action_mask": self._mask(state, meta, params.decisions[i])[0].astype(jnp.int8),
        }

    def _quiet(self, state: EnvState, meta: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(whether the event with this meta word is quiet now, its category's permission slot)."""
        slot = ((meta >> _SLOT_SHIFT) & 63).astype(jnp.int32) - 1
        permission = jnp.where(slot >= 0, state.permissions[jnp.maximum(slot, 0)], 0)
        return is_quiet(((meta >> _QUIET_SHIFT) & 1).astype(bool), permission), slot

    def _mask(self, state: EnvState, meta: jax.Array, decisions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(the valid actions at the event with this meta word and packed decision row: only stay
        at a quiet one, elsewhere those that change its decision, `spec.decisive`; whether it is
        quiet now)."""
        quiet, slot = self._quiet(state, meta)
        row = ((decisions >> (2 * jnp.arange(N_TIERS * len(PERMISSIONS), dtype=jnp.uint32))) & 3).reshape(
            N_TIERS, len(PERMISSIONS))
        spawn = jnp.asarray(_SPAWN)[meta & 31]
        return action_mask(jnp, state.level, state.permissions, self.spec.n_categories, quiet) \
            & decisive(jnp, row, state.level, state.permissions, slot, spawn), quiet

    def step_env(self, state: EnvState, action: jax.Array, params: EnvParams):
        """One event, without autoreset: (obs, state, reward, terminated, truncated, info)."""
        new, reward, terminated, truncated, info = self._transition(state, action, params)
        return self.observation(new, params), new, reward, terminated, truncated, info

    def step(self, state: EnvState, action: jax.Array, params: EnvParams):
        """`step_env`, then a finished episode is replaced by the next one of the state's stream
        (SAME_STEP autoreset: the observation returned is the new episode's first)."""
        new, reward, terminated, truncated, info = self._transition(state, action, params)
        obs, state = self.autoreset(new, terminated | truncated, params)
        return obs, state, reward, terminated, truncated, info

    def autoreset(self, state: EnvState, done: jax.Array, params: EnvParams) -> tuple[dict, EnvState]:
        """Replace a finished episode by the next of the state's stream (after `step_env`, for
        agents that need the final observation of a truncated episode first)."""
        rng = jnp.where(done, state.rng + jnp.uint32(1), state.rng)
        fresh = self._fresh(jnp.where(done, self._draw(rng, params), state.episode), params, rng)
        state = jax.tree_util.tree_map(lambda a, b: jnp.where(done, a, b), fresh, state)
        return self.observation(state, params), state

    def _transition(self, state: EnvState, action: jax.Array, params: EnvParams):
        k = self.spec.n_categories
        action = jnp.asarray(action, jnp.int32)
        i = state.start + state.t
        meta = params.meta[i]
        mask, quiet = self._mask(state, meta, params.decisions[i])
        alerts = add_alert(jnp, state.alerts, params.floats[i, 0], quiet)
        valid = (action >= 0) & (action < self.n_actions) & mask[jnp.clip(action, 0, self.n_actions - 1)]
        action = jnp.where(valid, action, 0)
        hopped = (action >= 1) & (action <= N_TIERS)
        level = jnp.where(hopped, action - 1, state.level)
        grant = (action > N_TIERS) & (action <= N_TIERS + k)
        revoke = action > N_TIERS + k
        changed = grant | revoke
        slot_k = jnp.where(grant, action - 1 - N_TIERS, action - 1 - N_TIERS - k)
        permissions = jnp.where(changed & (jnp.arange(k) == slot_k), jnp.where(grant, 1, 2), state.permissions)
        slot = ((meta >> _SLOT_SHIFT) & 63).astype(jnp.int32) - 1
        malicious = ((meta >> _MALICIOUS_SHIFT) & 1).astype(jnp.int32)
        permission = jnp.where(slot >= 0, permissions[jnp.maximum(slot, 0)], 0)
        shift = (2 * (level * len(PERMISSIONS) + permission)).astype(jnp.uint32)
        effect = ((params.decisions[i] >> shift) & 3).astype(jnp.int32)
        outcome = outcome_of(malicious, effect)
        damaging = ((meta >> _DAMAGING_SHIFT) & 1).astype(bool)
        reward = step_reward(jnp, params.costs, params.overhead, outcome, level, hopped, changed, params.hop,
                             params.permission_change, damaging, params.damage)
        t = state.t + 1
        terminated = t >= state.length
        truncated = ~terminated & (params.max_steps > 0) & (t >= params.max_steps)
        new = state.replace(t=t, level=level, permissions=permissions, alerts=alerts,
                            denied=push_recent(jnp, state.denied, effect == 2, self.spec.recent_window),
                            redirected=push_recent(jnp, state.redirected, effect == 1, self.spec.recent_window))
        info = {"effect": effect, "outcome": outcome, "malicious": malicious, "invalid_action": ~valid,
                "damaging": damaging, "hopped": hopped, "level": level}
        return new, reward, terminated, truncated, info

    def flat(self, obs: dict) -> jax.Array:
        """The observation as one float32 vector (a batch of them for batched observations)."""
        return flat_observation(jnp, obs, self.spec)
