"""`sandhop/SandboxManager-v0`: the sandbox manager's Gymnasium environment.

One episode replays one test's trace, one step per event. Each step applies the agent's action to
the test's `SandboxConfig` (hop to a stricter tier, grant or revoke a category), asks the real
`PolicyEngine` for the decision on the event, and returns the reward of what happened. There is
no rule logic here: actions, observation, mask and reward are defined in `sandhop.envs.spec`.

    env = gymnasium.make("sandhop/SandboxManager-v0", split="train", dataset="small")
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(0)

`terminated`: the test's last event was decided. `truncated`: `env.max_episode_steps` events were
decided before that. The env does not reset itself; vector envs autoreset on the next step
(Gymnasium's default, declared in `metadata`). `reset(options={"episode": i})` replays episode i.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from sandhop.enforcement.engine import NEVER_QUIET, PolicyEngine
from sandhop.enforcement.events import CATEGORIES, INFERRED_TAGS, TARGET_CLASSES
from sandhop.envs import data as envdata, register
from sandhop.envs.spec import (ALERT_CAP, EFFECTS, N_TIERS, OUTCOMES, PERMISSIONS, EnvSpec, action_mask, apply_action,
                               add_alert, decision_row, decisive, is_quiet, outcome_of, push_recent, step_reward)


def observation_space(spec: EnvSpec) -> spaces.Dict:
    return spaces.Dict({
        "risk": spaces.Box(0.0, 1.0, (1,), np.float32),
        "tags": spaces.Box(0.0, 1.0, (len(INFERRED_TAGS),), np.float32),
        "category": spaces.Discrete(len(CATEGORIES)),
        "target_class": spaces.Discrete(len(TARGET_CLASSES)),
        "tier": spaces.Discrete(N_TIERS),
        "permissions": spaces.MultiDiscrete([len(PERMISSIONS)] * spec.n_categories),
        "recent": spaces.MultiDiscrete([spec.recent_window + 1] * 2),
        "progress": spaces.Box(0.0, 1.0, (1,), np.float32),
        "alerts": spaces.Discrete(ALERT_CAP + 1),
        "action_mask": spaces.MultiBinary(spec.n_actions),
    })


class SandboxManagerEnv(gym.Env):
    """See the module docstring. Arguments: `split` (train, val, test, novel), `dataset` (a
    dataset config name, node or build folder), `env` (the env config node or mapping; None:
    configs/env/default.yaml) and keyword overrides of it (`base_tier="medium"`,
    `reward={"hop": 0.1}`); or `episodes` already loaded (`sandhop.envs.data`)."""

    metadata = {"render_modes": ["ansi"], "render_fps": 30, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(self, split: str = "train", dataset: Any = "default", env: Any = None, *,
                 episodes: envdata.Episodes | None = None, engine: PolicyEngine | None = None,
                 render_mode: str | None = None, **overrides) -> None:
        self.env_spec = EnvSpec.from_config(env, **overrides)
        self.episodes = episodes if episodes is not None else envdata.load(split, dataset, self.env_spec)
        if len(self.episodes) == 0:
            raise envdata.EnvError(f"{self.episodes.name} has no episodes; choose a split with tests")
        if self.episodes.risk is None:
            envdata.with_risk(self.episodes, self.env_spec)
        self.engine = engine or PolicyEngine()
        self.render_mode = render_mode
        self.observation_space = observation_space(self.env_spec)
        self.action_space = spaces.Discrete(self.env_spec.n_actions)
        self._names = self.env_spec.action_names()
        self._slot = self.env_spec.category_slots()
        self._costs = self.env_spec.outcome_costs()
        self._overhead = np.asarray(self.env_spec.tier_overhead, np.float32)
        self._hop_cost = np.float32(self.env_spec.hop)
        self._permission_cost = np.float32(self.env_spec.permission_change)
        self._damage_cost = np.float32(self.env_spec.damaging_allowed)
        self._episode = -1
        self._last: dict = {}
        # per distinct event: 1 quiet, 0 not, -1 not yet asked (the engine decides it once), and
        # its effect under every (tier, permission) once it was not quiet (`spec.decision_row`)
        self._quiet = np.full(len(self.episodes.targets), -1, np.int8)
        self._rows: dict[int, np.ndarray] = {}
        self._configs: dict = {}

    # ------------------------------------------------------------------ Gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = options or {}
        if "episode" in options:
            episode = int(options["episode"])
            if not 0 <= episode < len(self.episodes):
                raise ValueError(f"episode {episode} out of range: this split has {len(self.episodes)}")
        else:
            episode = int(self.np_random.integers(len(self.episodes)))
        self._episode = episode
        self._start = int(self.episodes.start[episode])
        self._length = int(self.episodes.length[episode])
        self._t = 0
        self.config = self.engine.config(self.env_spec.base_tier)
        self._permissions = np.zeros(self.env_spec.n_categories, np.int64)
        self._denied = np.uint32(0)
        self._redirected = np.uint32(0)
        self._alerts = np.int64(0)
        self._last = {}
        self._mask = self._compute_mask()
        suite, run_id, test_id = self.episodes.keys[episode]
        return self._observation(), {"episode": episode, "suite": suite, "run_id": run_id, "test_id": test_id,
                                     "attack": self.episodes.attack[episode], "length": self._length}

    def step(self, action):
        if self._episode < 0:
            raise RuntimeError("call reset() before step()")
        if self._t >= self._length:
            raise RuntimeError("the episode is over; call reset()")
        action = int(action)
        valid = 0 <= action < self.env_spec.n_actions and bool(self._mask[action])
        i = self._start + self._t
        self._alerts = add_alert(np, self._alerts, self.episodes.risk[i], self._quiet_now)
        hopped = changed = False
        if valid:
            self.config, hopped, changed = apply_action(self.engine, self.config, self._permissions, action,
                                                        self.env_spec)
        category, target, cls = self.episodes.targets[int(self.episodes.event[i])]
        decision = self.engine.decide_target(category, target, cls, self.config)
        effect = EFFECTS.index(decision.effect)
        malicious = bool(self.episodes.malicious[i])
        outcome = outcome_of(int(malicious), effect)
        level = self.config.level
        damaging = bool(self.episodes.damaging[i])
        reward = step_reward(np, self._costs, self._overhead, outcome, level, hopped, changed, self._hop_cost,
                             self._permission_cost, np.bool_(damaging), self._damage_cost)
        window = self.env_spec.recent_window
        self._denied = push_recent(np, self._denied, np.bool_(effect == 2), window)
        self._redirected = push_recent(np, self._redirected, np.bool_(effect == 1), window)
        self._t += 1
        terminated = self._t >= self._length
        limit = self.env_spec.max_episode_steps
        truncated = not terminated and limit > 0 and self._t >= limit
        quiet = not self._mask[1:].any() and bool(self._quiet[int(self.episodes.event[i])])
        info = {"decision": decision.effect, "rule_id": decision.rule_id, "reason": decision.reason, "quiet": quiet,
                "malicious": malicious, "damaging": damaging,
                "attack": self.episodes.attack[self._episode], "tier": self.config.tier,
                "outcome": OUTCOMES[outcome], "action": self._names[action] if valid else "stay",
                "invalid_action": not valid, "category": category, "target": target, "event": self._t - 1}
        self._last = info
        if truncated:
            self._length = self._t  # the episode is over for step()
        self._mask = self._compute_mask()
        return self._observation(), float(reward), terminated, truncated, info

    def render(self):
        if self.render_mode != "ansi":
            return None
        if not self._last:
            return f"[{self.config.tier if self._episode >= 0 else '-'}] (no step yet)"
        i = self._last
        return (f"[{i['tier']}] {i['action']:<22} {i['category']:<12} {i['target'][:60]:<60} -> {i['decision']}"
                f" ({i['rule_id']}){'  MALICIOUS' if i['malicious'] else ''}")

    # ------------------------------------------------------------------ observation
    def action_masks(self) -> np.ndarray:
        """The valid actions now (also `obs["action_mask"]`), int8."""
        return self._mask.copy()

    def _compute_mask(self) -> np.ndarray:
        """The mask at the current event (the last one once the episode is over, as the
        observation shows it); sets `_quiet_now`, whether that event is quiet."""
        e = self.episodes
        i = self._start + min(self._t, int(e.length[self._episode]) - 1)
        u = int(e.event[i])
        if self._quiet[u] < 0:
            category, target, cls = e.targets[u]
            self._quiet[u] = self.engine.quiet(category, target, cls)
        slot = self._slot[int(e.category[i])]
        quiet = self._quiet_now = is_quiet(bool(self._quiet[u]), self._permissions[slot] if slot >= 0 else 0)
        mask = action_mask(np, self.config.level, self._permissions, self.env_spec.n_categories, quiet)
        if quiet:
            return mask.astype(np.int8)
        row = self._rows.get(u)
        if row is None:
            category, target, cls = e.targets[u]
            row = self._rows[u] = decision_row(self.engine, category, target, cls, slot >= 0, self._configs)
        spawn = e.targets[u][0] in NEVER_QUIET
        return (mask & decisive(np, row, self.config.level, self._permissions, slot, spawn)).astype(np.int8)

    def _observation(self) -> dict:
        e = self.episodes
        done = self._t >= int(e.length[self._episode])
        i = self._start + min(self._t, int(e.length[self._episode]) - 1)
        return {
            "risk": e.risk[i:i + 1].astype(np.float32),
            "tags": e.tags[i].astype(np.float32),
            "category": np.int64(e.category[i]),
            "target_class": np.int64(e.target_class[i]),
            "tier": np.int64(min(self.config.level, N_TIERS - 1)),
            "permissions": self._permissions.copy(),
            "recent": np.array([int(self._denied).bit_count(), int(self._redirected).bit_count()], np.int64),
            "progress": np.array([1.0 if done else e.progress[i]], np.float32),
            "alerts": np.int64(self._alerts),
            "action_mask": self.action_masks(),
        }


register()  # importing the env registers its id (as `import gymnasium, sandhop.envs` does)
