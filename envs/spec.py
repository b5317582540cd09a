"""What the sandbox manager sees and may do, written once for both environments.

The action layout, the observation, the action mask and the reward are defined here for numpy
(the Gymnasium env) and `jax.numpy` (the twin) alike: each shared function takes the array module
as its first argument, so the two environments cannot drift apart. The decisions themselves come
from the one `PolicyEngine` (live in the Gymnasium env, from a table it precomputed in the twin).

Actions (one flat `Discrete`):

| index | action |
|---|---|
| 0 | stay |
| 1 .. 5 | hop to observe, low, medium, high, lockdown (only to a stricter tier: de-escalation waits for the test boundary, which is the episode's end) |
| 6 .. 6+K-1 | grant category k (an allow rule for all of it; removes its revocation) |
| 6+K .. 6+2K-1 | revoke category k (a deny rule for all of it; removes its grant) |

A grant is masked in lockdown and where the category is already granted; a revocation where it is
already revoked. A masked action is treated as `stay` (and flagged in `info`), so random agents
that ignore the mask cannot crash an episode.

Quiet events: an event that every tier allows, with or without a grant of its category (reading
the stdlib, site-packages or a temporary file, an import, setting an environment variable; about
nine in ten events of real suites), keeps its decision whatever the manager does, unless its whole
category is revoked (a process spawn is never quiet: the child runs under the config current at
its start). At a quiet event of a category that is not revoked the mask allows only
`stay`: the manager acts before the next event whose decision it can change, with the risk
model's reading of everything before it. The live runtime therefore skips the policy at quiet
events and runs the risk model over them in one batch when the next event needs a score (the
fast path; `sandhop.enforcement.runtime`).

Observation (a `Dict`): `risk` [1] and `tags` [T] of the current event (T = inferred tags), its
`category` and `target_class` (indices into the event model's vocabularies), the current `tier`,
`permissions` [K] (0 tier default, 1 granted, 2 revoked), `recent` [2] (denied and redirected
events among the last `recent_window` decided ones), `progress` [1] (events decided so far over
`PROGRESS_EVENTS`, at most 1: causal, so a live enforcer that cannot know a test's length computes
it too), `alerts` (earlier events of the test, not quiet, with risk at least `ALERT_RISK`, at
most `ALERT_CAP`: what the test did before, so a lookup after reconnaissance reads otherwise than
one that opens a test) and `action_mask` [A].

Actions are offered where they change the current event's decision (`decisive`), so an
escalation comes at the moment it matters; `alerts` carries the history an earlier escalation
would otherwise have had to stand for.

Reward: minus the cost of the step's outcome (malicious step allowed; benign step denied or
redirected), minus the tier's per-step overhead, minus the cost of a hop or a permission change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

import numpy as np

from sandhop.enforcement.engine import NEVER_QUIET, TIER_LEVEL, TIERS, PolicyEngine, SandboxConfig
from sandhop.enforcement.events import CATEGORIES, INFERRED_TAGS, TARGET_CLASSES

EFFECTS: tuple[str, ...] = ("allow", "redirect", "deny")
PERMISSIONS: tuple[str, ...] = ("default", "granted", "revoked")
GRANTED, REVOKED = 1, 2
# outcome = 3 * malicious + effect
OUTCOMES: tuple[str, ...] = ("benign_allowed", "benign_redirected", "benign_denied",
                             "malicious_allowed", "malicious_redirected", "malicious_denied")
LOCKDOWN = TIER_LEVEL["lockdown"]
N_TIERS = len(TIERS)
PROGRESS_EVENTS = 128   # progress saturates here (where training cuts long tests)
OBS_KEYS: tuple[str, ...] = ("risk", "tags", "category", "target_class", "tier", "permissions", "recent",
                             "progress", "alerts", "action_mask")
ALERT_RISK = 0.5   # a calibrated risk model's "more likely malicious than not"
ALERT_CAP = 8


class EnvError(ValueError):
    """An environment that cannot be built as configured (says what and how to fix it)."""


@dataclass(frozen=True)
class EnvSpec:
    """The `env` config group, typed: action layout and reward parameters."""

    categories: tuple[str, ...] = tuple(c for c in CATEGORIES if c != "syscall")
    base_tier: str = "low"
    recent_window: int = 8
    max_episode_steps: int = 0      # 0: whole tests
    malicious_allowed: float = 10.0
    damaging_allowed: float = 0.0
    benign_denied: float = 1.0
    benign_redirected: float = 0.1
    hop: float = 0.05
    permission_change: float = 0.02
    tier_overhead: tuple[float, ...] = (0.0, 0.0005, 0.001, 0.002, 0.01)
    risk_source: str = "rules"
    risk_checkpoint: str | None = None

    def __post_init__(self) -> None:
        problems = []
        unknown = [c for c in self.categories if c not in CATEGORIES]
        if unknown:
            problems.append(f"env.categories has unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
        if len(set(self.categories)) != len(self.categories) or not self.categories:
            problems.append("env.categories must be a non-empty list without repeats (or null for all)")
        if self.base_tier not in TIER_LEVEL:
            problems.append(f"env.base_tier {self.base_tier!r} is not a tier; one of {', '.join(TIERS)}")
        if not 1 <= self.recent_window <= 32:
            problems.append(f"env.recent_window must be in 1..32, got {self.recent_window}")
        if self.max_episode_steps < 0:
            problems.append("env.max_episode_steps must be positive (or null for whole tests)")
        if len(self.tier_overhead) != N_TIERS:
            problems.append(f"env.reward.tier_overhead needs one cost per tier ({', '.join(TIERS)})")
        if self.risk_source not in ("rules", "model"):
            problems.append(f"env.risk.source {self.risk_source!r}: use rules or model")
        if self.risk_source == "model" and not self.risk_checkpoint:
            problems.append("env.risk.source=model needs env.risk.checkpoint=RUN_DIR (a sandhop-train-risk out= "
                            "folder)")
        if problems:
            raise EnvError("; ".join(problems))

    @classmethod
    def from_config(cls, cfg: Any = None, **overrides) -> "EnvSpec":
        """From the `env` config node (OmegaConf or mapping; None: configs/env/default.yaml) plus
        keyword overrides in the same nesting (`reward={"hop": 0.1}`, `base_tier="medium"`)."""
        data = plain_config(cfg) if cfg is not None else default_config()
        for k, v in overrides.items():
            if isinstance(v, Mapping) and isinstance(data.get(k), Mapping):
                data[k] = {**data[k], **v}
            else:
                data[k] = v
        data.pop("name", None)
        reward = dict(data.pop("reward", {}) or {})
        risk = dict(data.pop("risk", {}) or {})
        overhead = reward.pop("tier_overhead", None)
        known = {"categories", "base_tier", "recent_window", "max_episode_steps"}
        reward_known = {"malicious_allowed", "damaging_allowed", "benign_denied", "benign_redirected", "hop",
                        "permission_change"}
        unknown = sorted(set(data) - known) + sorted(f"reward.{k}" for k in set(reward) - reward_known) \
            + sorted(f"risk.{k}" for k in set(risk) - {"source", "checkpoint"})
        if unknown:
            raise EnvError(f"unknown env setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}, "
                           f"reward.{{{','.join(sorted(reward_known | {'tier_overhead'}))}}}, "
                           "risk.{source,checkpoint}")
        kwargs: dict[str, Any] = {k: data[k] for k in known if data.get(k) is not None}
        if "categories" in kwargs:
            kwargs["categories"] = tuple(kwargs["categories"])
        if "max_episode_steps" in kwargs:
            kwargs["max_episode_steps"] = int(kwargs["max_episode_steps"])
        kwargs.update({k: float(v) for k, v in reward.items()})
        if overhead is not None:
            if isinstance(overhead, Mapping):
                missing = [t for t in TIERS if t not in overhead]
                extra = [t for t in overhead if t not in TIER_LEVEL]
                if missing or extra:
                    raise EnvError(f"env.reward.tier_overhead needs exactly the tiers {', '.join(TIERS)} "
                                   f"(missing {missing}, unknown {extra})")
                overhead = [overhead[t] for t in TIERS]
            kwargs["tier_overhead"] = tuple(float(x) for x in overhead)
        if "source" in risk:
            kwargs["risk_source"] = str(risk["source"])
        if risk.get("checkpoint"):
            kwargs["risk_checkpoint"] = str(risk["checkpoint"])
        return cls(**kwargs)

    # ------------------------------------------------------------------ layout
    @property
    def n_categories(self) -> int:
        return len(self.categories)

    @property
    def n_actions(self) -> int:
        return 1 + N_TIERS + 2 * self.n_categories

    @property
    def base_level(self) -> int:
        return TIER_LEVEL[self.base_tier]

    def action_names(self) -> list[str]:
        return (["stay"] + [f"hop:{t}" for t in TIERS] + [f"grant:{c}" for c in self.categories]
                + [f"revoke:{c}" for c in self.categories])

    def category_slots(self) -> np.ndarray:
        """For each category of the event model, its permission slot (-1: no grant/revoke action)."""
        slot = {c: i for i, c in enumerate(self.categories)}
        return np.array([slot.get(c, -1) for c in CATEGORIES], np.int32)

    def outcome_costs(self) -> np.ndarray:
        """Reward of each outcome (see OUTCOMES), float32."""
        return np.array([0.0, -self.benign_redirected, -self.benign_denied, -self.malicious_allowed, 0.0, 0.0],
                        np.float32)

    def as_dict(self) -> dict:
        return {"categories": list(self.categories), "base_tier": self.base_tier,
                "recent_window": self.recent_window, "max_episode_steps": self.max_episode_steps or None,
                "risk": {"source": self.risk_source, "checkpoint": self.risk_checkpoint},
                "reward": {"malicious_allowed": self.malicious_allowed, "damaging_allowed": self.damaging_allowed,
                           "benign_denied": self.benign_denied,
                           "benign_redirected": self.benign_redirected, "hop": self.hop,
                           "permission_change": self.permission_change,
                           "tier_overhead": dict(zip(TIERS, self.tier_overhead))}}


def default_config() -> dict:
    from omegaconf import OmegaConf
    import sandhop.configs as configs
    from pathlib import Path
    return OmegaConf.to_container(OmegaConf.load(Path(configs.__file__).parent / "env" / "default.yaml"))


def plain_config(cfg: Any) -> dict:
    """A config node (OmegaConf, resolved) or mapping as a plain dict the caller may change."""
    import sys
    omegaconf = sys.modules.get("omegaconf")  # a config node exists only once omegaconf is loaded
    if omegaconf is not None and omegaconf.OmegaConf.is_config(cfg):
        return omegaconf.OmegaConf.to_container(cfg, resolve=True)
    import copy
    return copy.deepcopy(dict(cfg or {}))


# --------------------------------------------------------------------------- shared logic (numpy or jax.numpy)

def action_mask(xp, level, permissions, n_categories: int, quiet=False):
    """Which actions are valid in a state: stay; hops to stricter tiers; grants outside lockdown
    of categories not granted; revocations of categories not revoked. At a quiet event (see
    `is_quiet`) only stay."""
    act = ~xp.asarray(quiet, bool)
    stay = xp.ones((1,), bool)
    hops = (xp.arange(N_TIERS) > level) & act
    grants = (permissions != GRANTED) & (level < LOCKDOWN) & act
    revokes = (permissions != REVOKED) & act
    return xp.concatenate([stay, hops, grants, revokes])


def decisive(xp, row, level, permissions, slot, spawn=False):
    """Which actions change the current event's decision: stay; hops to a tier that decides it
    otherwise; a grant or revocation of its own category that does. `row` holds the event's effect
    under every (tier, permission of its category) (`decision_row`), `slot` its category's
    permission slot (-1: none). At a spawn (`spawn`) every action counts: the child starts under
    the config. Combined with `action_mask`: the manager escalates at the moment an escalation
    changes a decision. Every sequence of decisions stays reachable (until then each decision is
    the same either way, and more of the test has been seen), and no act is left whose effect
    comes only later; what an early escalation remembered, the observation's `alerts` carries."""
    k = permissions.shape[-1]
    perm = xp.where(slot >= 0, permissions[xp.maximum(slot, 0)], 0)
    now = row[level, perm]
    own = (xp.arange(k) == slot) & (slot >= 0)
    return xp.concatenate([xp.ones((1,), bool), (row[:, perm] != now) | spawn,
                           (own & (row[level, GRANTED] != now)) | spawn, (own & (row[level, REVOKED] != now)) | spawn])


def quiet_row(effects: np.ndarray, category) -> np.ndarray:
    """Whether events are quiet, from their decision-table rows [..., tiers, permissions] (effect
    indices) and categories (a name, or an array of names): allowed under every tier, by default
    and with the category granted, and not a spawn (`NEVER_QUIET`). The JAX twin reads this of
    the full table; the Gymnasium env and the runtime ask `PolicyEngine.quiet`, the same rule
    asked of the engine directly (the two envs are checked against each other step by step)."""
    return (effects[..., :REVOKED] == 0).all(axis=(-2, -1)) & ~np.isin(category, list(NEVER_QUIET))


def is_quiet(quiet, permission):
    """A quiet event is quiet now unless its category is revoked (then it is denied, and the
    manager may grant it back). Bools or arrays (numpy or jax) alike."""
    return quiet & (permission != REVOKED)


def _reachable(engine: PolicyEngine, category: str, slotted: bool, configs: dict, levels=range(N_TIERS),
               permissions=range(len(PERMISSIONS))):
    """(level, permission, config) for each config an event of `category` can be decided under
    (a category without grant/revoke actions: the tier's alone); configs cached in `configs`."""
    for level in levels:
        for p in (permissions if slotted else (0,)):
            cfg = configs.get((level, category, p))
            if cfg is None:
                cfg = configs[(level, category, p)] = engine.config(
                    TIERS[level], grants=(category,) if p == GRANTED else (),
                    revocations=(category,) if p == REVOKED else ())
            yield level, p, cfg


def decision_row(engine: PolicyEngine, category: str, target: str, cls: str, slotted: bool,
                 configs: dict | None = None) -> np.ndarray:
    """int8 [tiers, permissions]: the engine's effect on one event under every config a test can
    reach (a category without grant/revoke actions has only the tier's). `configs` caches the
    configs between calls."""
    row = np.zeros((N_TIERS, len(PERMISSIONS)), np.int8)
    for level, p, cfg in _reachable(engine, category, slotted, {} if configs is None else configs):
        row[level, p] = EFFECTS.index(engine.decide_target(category, target, cls, cfg).effect)
        if not slotted:
            row[level, 1:] = row[level, 0]
    return row


def outcome_of(malicious, effect):
    return 3 * malicious + effect


def step_reward(xp, costs, overhead, outcome, level, hopped, changed, hop_cost, permission_cost, damaging,
                damage_cost):
    """float32 reward of one step; the subtraction order is fixed so numpy and XLA agree exactly.
    `damaging`: the step is its attack's damaging one (charged `damage_cost` more when allowed)."""
    zero = xp.float32(0.0)
    return (costs[outcome] - overhead[level] - xp.where(hopped, hop_cost, zero)
            - xp.where(changed, permission_cost, zero) - xp.where(damaging & (outcome == 3), damage_cost, zero))


def add_alert(xp, alerts, risk, quiet):
    """`alerts` after an event: one more if it was not quiet and its risk reached `ALERT_RISK`
    (quiet events are not scored live: the runtime's fast path), at most `ALERT_CAP`."""
    hit = (~xp.asarray(quiet, bool)) & (xp.asarray(risk) >= ALERT_RISK)
    return xp.minimum(alerts + hit.astype(alerts.dtype), ALERT_CAP).astype(alerts.dtype)


def push_recent(xp, bits, hit, window: int):
    """Shift one decided event into a bit window of the last `window` events."""
    mask = xp.uint32((1 << window) - 1)
    return ((bits << xp.uint32(1)) | hit.astype(xp.uint32)) & mask


def flat_observation(xp, obs: Mapping, spec: EnvSpec):
    """One float32 vector of an observation (one-hot indices, counts scaled to [0, 1]): the input
    of a policy network. Works on one observation or a batch."""
    def onehot(x, n):
        return (x[..., None] == xp.arange(n)).astype(xp.float32)
    parts = [obs["risk"].astype(xp.float32), obs["tags"].astype(xp.float32),
             onehot(obs["category"], len(CATEGORIES)), onehot(obs["target_class"], len(TARGET_CLASSES)),
             onehot(obs["tier"], N_TIERS),
             onehot(obs["permissions"], len(PERMISSIONS)).reshape(*obs["permissions"].shape[:-1], -1),
             obs["recent"].astype(xp.float32) / xp.float32(spec.recent_window), obs["progress"].astype(xp.float32),
             xp.asarray(obs["alerts"]).astype(xp.float32)[..., None] / xp.float32(ALERT_CAP)]
    return xp.concatenate(parts, axis=-1)


def flat_size(spec: EnvSpec) -> int:
    return (1 + len(INFERRED_TAGS) + len(CATEGORIES) + len(TARGET_CLASSES) + N_TIERS
            + len(PERMISSIONS) * spec.n_categories + 2 + 1 + 1)


def progress_of(position):
    """`progress` of the event at `position` (0-based) in its test, float32."""
    return np.minimum(np.asarray(position, np.float32) / np.float32(PROGRESS_EVENTS), np.float32(1.0))


def apply_action(engine: PolicyEngine, config: SandboxConfig, permissions: np.ndarray, action: int,
                 spec: EnvSpec) -> tuple[SandboxConfig, bool, bool]:
    """Carry out a valid action on a test's config (the caller checked the mask): a hop through
    the engine (escalation now), or a grant / revocation of a whole category, which replaces the
    other. Updates `permissions` in place; returns (config, hopped, changed)."""
    if 1 <= action <= N_TIERS:
        return engine.hop(config, TIERS[action - 1]), True, False
    if action > N_TIERS:
        k = action - 1 - N_TIERS
        grant = k < spec.n_categories
        k = k if grant else k - spec.n_categories
        category = spec.categories[k]
        grants = set(config.grants) - {category}
        revocations = set(config.revocations) - {category}
        (grants if grant else revocations).add(category)
        permissions[k] = GRANTED if grant else REVOKED
        return replace(config, grants=tuple(sorted(grants)), revocations=tuple(sorted(revocations))), False, True
    return config, False, False
