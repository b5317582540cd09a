"""Reference sandbox managers that a learned policy must beat: every static tier, a risk-threshold
rule tuned on the validation split, and an oracle that knows which events are malicious.

Every policy (these and the PPO policies of `sandhop.agents.ppo`) follows `Policy`: `reset(info)`
after `env.reset`, then `act(obs)` per step with the Gymnasium env's observation of one env. A
baseline says on which tier its tests start (`base_tier`), because hops only go stricter within a
test: static `observe` can only be had by starting there.

    rule = ThresholdRule.tune(envdata.load("val", "default"), EnvSpec(base_tier="observe"))
    rule.threshold, rule.tier        # e.g. 0.6, "high"
"""

from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np

from sandhop.enforcement.engine import NEVER_QUIET, TIER_LEVEL, TIERS, PolicyEngine
from sandhop.envs import data as envdata
from sandhop.envs.spec import LOCKDOWN, EnvSpec

STAY = 0
TUNED_TIERS: tuple[str, ...] = ("medium", "high", "lockdown")


class Policy(Protocol):
    """What `sandhop evaluate` replays. Optional attributes: `base_tier` (str: the tier every
    test starts at; absent or None: the env config's) and `bind(env)` (called once per env
    before its episodes, for policies that need more than the observation, like the oracle)."""

    name: str
    seed: int

    def reset(self, info: dict) -> None: ...

    def act(self, obs: dict) -> int: ...


class StaticTier:
    """One tier for every event of every test: the sandbox without a manager."""

    seed = 0

    def __init__(self, tier: str) -> None:
        if tier not in TIER_LEVEL:
            raise ValueError(f"static:{tier}: unknown tier; one of {', '.join(TIERS)}")
        self.tier = tier
        self.base_tier = tier
        self.name = f"static:{tier}"
        self._level = TIER_LEVEL[tier]

    def reset(self, info: dict) -> None:
        pass

    def act(self, obs: dict) -> int:
        # Started from a weaker base (another env config): hop once, at the first step.
        return 1 + self._level if int(obs["tier"]) < self._level else STAY


def quiet(obs: dict) -> bool:
    """Whether the observation is of a quiet event: its mask allows only stay."""
    return not np.asarray(obs["action_mask"])[1:].any()


def hop_when_offered(policy: Any, obs: dict, level: int) -> int:
    """The hop to `level` if the mask offers it now (it changes this event's decision), marking
    `policy._hopped`; else stay, to try again at the next event."""
    if obs["action_mask"][1 + level]:
        policy._hopped = True
        return 1 + level
    return STAY


class ThresholdRule:
    """Start at the base tier; the first time the risk of an event that is not quiet (the
    manager acts only at those; `sandhop.envs.spec`) reaches `threshold`, hop to `tier` (before
    that event is decided, or at the first event after it where the hop is offered: where it
    changes a decision, the same decisions as hopping at once) and stay there for the rest of the
    test."""

    seed = 0
    name = "threshold"

    def __init__(self, threshold: float, tier: str, base_tier: str | None = "observe") -> None:
        if tier not in TIER_LEVEL:
            raise ValueError(f"threshold rule: unknown tier {tier!r}; one of {', '.join(TIERS)}")
        self.threshold = float(threshold)
        self.tier = tier
        self.base_tier = base_tier
        self.tuning: dict[str, Any] = {}   # how tune() chose it (val return, tests broken, grid size)
        self._level = TIER_LEVEL[tier]
        self._hopped = False

    def __repr__(self) -> str:
        return f"ThresholdRule(threshold={self.threshold:.4g}, tier={self.tier!r}, base_tier={self.base_tier!r})"

    def reset(self, info: dict) -> None:
        self._due = self._hopped = False

    def act(self, obs: dict) -> int:
        if self._hopped:
            return STAY
        if not self._due:
            if obs["risk"][0] < self.threshold or quiet(obs):
                return STAY
            self._due = True
            if int(obs["tier"]) >= self._level:
                self._hopped = True
                return STAY
        # The hop is offered where it changes a decision (`spec.decisive`): taken at the first such event.
        return hop_when_offered(self, obs, self._level)

    @classmethod
    def tune(cls, episodes: envdata.Episodes, spec: EnvSpec, *, tiers: Sequence[str] = TUNED_TIERS,
             max_candidates: int = 200, engine: PolicyEngine | None = None) -> "ThresholdRule":
        """The (threshold, tier) with the best mean episodic return on `episodes` (the val split)
        under `spec`'s reward, starting from `spec.base_tier`; ties go to fewer broken tests."""
        grid = threshold_grid(episodes, spec, tiers=tiers, max_candidates=max_candidates, engine=engine)
        order = np.lexsort((grid["attacks_through"], grid["tests_broken"], -np.round(grid["mean_return"], 9)))
        best = int(order[0])
        rule = cls(float(grid["threshold"][best]), str(grid["tier"][best]), spec.base_tier)
        rule.tuning = {"split": episodes.name, "mean_return": float(grid["mean_return"][best]),
                       "tests_broken": int(grid["tests_broken"][best]),
                       "attacks_through": int(grid["attacks_through"][best]), "candidates": len(order)}
        return rule


def threshold_candidates(risk: np.ndarray, max_candidates: int = 200) -> np.ndarray:
    """The distinct risk values (each one a different rule), or that many quantiles of them."""
    values = np.unique(np.asarray(risk, np.float32))
    if len(values) > max_candidates:
        values = np.unique(np.quantile(risk, np.linspace(0.0, 1.0, max_candidates), method="inverted_cdf"))
    return values.astype(np.float32)


def threshold_grid(episodes: envdata.Episodes, spec: EnvSpec, *, tiers: Sequence[str] = TUNED_TIERS,
                   max_candidates: int = 200, engine: PolicyEngine | None = None) -> dict[str, np.ndarray]:
    """Every (threshold, tier) rule's mean episodic return, broken tests and attacks through on
    `episodes`, computed exactly from the engine's decision table with prefix sums over events (no
    replay): a rule is "base tier before the first crossing, target tier from it on"."""
    if episodes.risk is None:
        envdata.with_risk(episodes, spec)
    table = envdata.decision_table(episodes, spec, engine)
    effect = table[episodes.event, :, 0].T   # [tiers, events]; no grants
    loud = ~episodes.quiet(table)   # the rule never revokes: quiet events stay quiet
    malicious = episodes.malicious
    costs, overhead = spec.outcome_costs(), np.asarray(spec.tier_overhead, np.float32)
    step = (costs[3 * malicious.astype(np.int64)[None] + effect] - overhead[:, None]
            - np.float32(spec.damaging_allowed) * (episodes.damaging[None] & malicious[None] & (effect == 0))
            ).astype(np.float64)
    rewards = _prefix(step)
    denials = _prefix((effect == 2) & ~malicious[None])
    stops = _prefix((effect != 0) & malicious[None])
    n = episodes.n_events
    start = episodes.start.astype(np.int64)
    length = episodes.length.astype(np.int64)
    end = start + (np.minimum(length, spec.max_episode_steps) if spec.max_episode_steps else length)  # truncation
    benign = np.array([not a for a in episodes.attack])
    cut = np.minimum(attack_cut(episodes), end)   # per episode: the steps whose malicious ones decide if it is stopped
    attacked = ~benign
    base = spec.base_level
    position = np.arange(n, dtype=np.int64)
    rows: dict[str, list] = {"threshold": [], "tier": [], "mean_return": [], "tests_broken": [],
                             "attacks_through": []}
    # the hop to a tier is taken at the first event, at or after the crossing, where it changes the
    # decision (or a spawn; `spec.decisive`): the tier decides from there, the same decisions as from the crossing
    spawn = np.isin(episodes.target_categories()[episodes.event], list(NEVER_QUIET))
    offered = {tier: np.flatnonzero(loud & ((effect[TIER_LEVEL[tier]] != effect[base]) | spawn)) for tier in tiers}
    for threshold in threshold_candidates(episodes.risk[loud], max_candidates):
        first = np.minimum(np.minimum.reduceat(np.where((episodes.risk >= threshold) & loud, position, n), start), end)
        for tier in tiers:
            level = TIER_LEVEL[tier]
            at = offered[tier]
            k = np.searchsorted(at, first)
            switch = np.where(k < len(at), at[np.minimum(k, len(at) - 1)], n) if len(at) else np.full_like(first, n)
            switch = np.minimum(switch, end)
            hop, switch = (switch < end, switch) if level > base else (np.zeros(len(start), bool), end)
            level = max(level, base)

            def over(prefix: np.ndarray, stop: np.ndarray) -> np.ndarray:
                """Sum of a per-step quantity over [start, stop): base tier before `switch`, `level` after."""
                mid = np.minimum(switch, stop)
                return prefix[base, mid] - prefix[base, start] + prefix[level, np.maximum(stop, mid)] - prefix[level, mid]

            total = over(rewards, end) - hop * np.float64(np.float32(spec.hop))
            rows["threshold"].append(float(threshold))
            rows["tier"].append(tier)
            rows["mean_return"].append(float(total.mean()))
            rows["tests_broken"].append(int(((over(denials, end) > 0) & benign).sum()))
            rows["attacks_through"].append(int(((over(stops, cut) == 0) & attacked).sum()))
    return {k: np.asarray(v) for k, v in rows.items()}


def _prefix(x: np.ndarray) -> np.ndarray:
    """[rows, n+1] running sums along events, 0 first, so a span's sum is two lookups."""
    x = np.asarray(x, np.float64 if x.dtype.kind == "f" else np.int64)
    return np.concatenate([np.zeros((x.shape[0], 1), x.dtype), np.cumsum(x, axis=1)], axis=1)


def attack_cut(episodes: envdata.Episodes) -> np.ndarray:
    """Per episode, the end (exclusive, as an event index) of the steps whose malicious ones decide
    whether its attack is stopped: up to and including the first damaging step, else the whole
    episode."""
    end = episodes.start.astype(np.int64) + episodes.length.astype(np.int64)
    damaging = np.flatnonzero(episodes.damaging)
    # the first damaging event at or after each episode's start, if it lies inside the episode
    k = np.searchsorted(damaging, episodes.start)
    nearest = damaging[np.minimum(k, len(damaging) - 1)] if len(damaging) else end
    first = np.where(k < len(damaging), nearest, end)
    return np.where(first < end, first + 1, end)


class Oracle:
    """Knows the labels: at a test's first malicious event whose decision an action can change
    (not a quiet one: the mask allows only stay there), it chooses the least strict tier under
    which the real engine allows none of the test's malicious events from there on that any tier
    stops, hops to it there or at the first event after where the hop is offered (it changes a
    decision), and stays there. Benign tests run at the base tier (observe) throughout. It reads the
    labels from `env.episodes` (bound with `bind`) and counts its own steps, so it needs no
    private state of the env."""

    seed = 0
    name = "oracle"

    def __init__(self, base_tier: str | None = "observe") -> None:
        self.base_tier = base_tier
        self._episodes: envdata.Episodes | None = None
        self._engine: PolicyEngine | None = None
        self._i = self._end = 0
        self._done = self._hopped = False
        self._level: int | None = None

    def bind(self, env: Any) -> None:
        self._episodes, self._engine = env.episodes, env.engine
        self._configs = [self._engine.config(t) for t in TIERS]

    def reset(self, info: dict) -> None:
        if self._episodes is None:
            raise RuntimeError("the oracle needs the env's labels: call oracle.bind(env) before replaying")
        episode = int(info["episode"])
        self._i = int(self._episodes.start[episode])
        self._end = self._i + int(self._episodes.length[episode])
        self._done = self._hopped = False
        self._level: int | None = None

    def act(self, obs: dict) -> int:
        i, self._i = self._i, self._i + 1
        e = self._episodes
        if self._level is not None and not self._hopped:
            return hop_when_offered(self, obs, self._level)
        if self._done or not e.malicious[i] or quiet(obs):
            return STAY
        self._done = True
        self._level = self._choose(i, int(obs["tier"]))
        return STAY if self._level is None else hop_when_offered(self, obs, self._level)

    def _choose(self, i: int, current: int) -> int | None:
        """The least strict tier from `current` on that stops every malicious event of the test
        from `i` on that any tier stops (None: `current` already does, or none does)."""
        e = self._episodes

        def allowed(j: int, level: int) -> bool:
            category, target, cls = e.targets[int(e.event[j])]
            return self._engine.decide_target(category, target, cls, self._configs[level]).effect == "allow"
        stoppable = [j for j in range(i, self._end) if e.malicious[j] and not allowed(j, LOCKDOWN)]
        for level in range(current, LOCKDOWN + 1):
            if not any(allowed(j, level) for j in stoppable):
                return None if level == current else level
        return None
