"""The one `PolicyEngine`: every allow/deny/redirect decision in sandhop is made here.

The live guard, the Gymnasium environment, the JAX twin's precomputed decision tables, the
runtime enforcer and the benchmarks all call `PolicyEngine.decide`. It is pure and
deterministic: the same (event, config) always gives the same `Decision`, whatever was decided
before. Precedence: deny > redirect > allow > the tier's default, over the tier's rules plus the
config's runtime grants (allow rules) and revocations (deny rules). A compiled matcher per
(config, category) and a decision cache keyed by (config, category, target, class) keep the hot
path at a dictionary lookup.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Protocol

from sandhop.enforcement import events as ev
from sandhop.enforcement.policy import (TIERS_DIR, Policy, PolicyError, Rule, executable_of, parse_rule,
                                        read_policy_file, specialise)

TIERS: tuple[str, ...] = ("observe", "low", "medium", "high", "lockdown")
TIER_LEVEL: dict[str, int] = {t: i for i, t in enumerate(TIERS)}
# A spawn hands the config current at that moment to the child, whose guard enforces it (a
# Python child also runs the learned manager; any other program has none), so acting before a
# spawn matters even when every tier allows the spawn itself.
NEVER_QUIET: frozenset[str] = frozenset({"proc.spawn"})
_PRECEDENCE = ("deny", "redirect", "allow")
_KNOWN_CATEGORIES = frozenset(ev.CATEGORIES)


class HopError(ValueError):
    """A hop the rules of DESIGN 3.2 do not allow (leaving lockdown)."""


@dataclass(frozen=True)
class Decision:
    effect: str            # allow | deny | redirect
    rule_id: str           # `<policy>:<line>`, `grant:<n>`, `revoke:<n>`, or `<policy>:default`
    reason: str
    redirect_to: str = ""
    rule_text: str = ""    # the rule as written ("" for a tier default)

    @property
    def allowed(self) -> bool:
        return self.effect == "allow"


@dataclass(frozen=True)
class SandboxConfig:
    """A tier plus runtime grants and revocations (rule lines without the effect, such as
    `net.connect example.com:443`, or a bare category for all of it).

    Hopping follows DESIGN 3.2: `hop_to` a stricter tier takes effect at once; a hop to a more
    permissive tier waits in `pending` until `at_test_boundary()`; lockdown is never left within a
    test (the next test starts from its own base config)."""

    tier: str = "medium"
    grants: tuple[str, ...] = ()
    revocations: tuple[str, ...] = ()
    level: int = -1        # strictness; -1: that of the named tier template
    pending: str = ""      # a de-escalation waiting for the test boundary
    pending_level: int = -1
    key: tuple = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.level < 0:
            if self.tier not in TIER_LEVEL:
                raise ValueError(f"unknown tier {self.tier!r}; tiers are {', '.join(TIERS)} "
                                 "(a policy file needs PolicyEngine.config(path))")
            object.__setattr__(self, "level", TIER_LEVEL[self.tier])
        object.__setattr__(self, "key", (self.tier, self.grants, self.revocations))

    def __hash__(self) -> int:
        return hash(self.key)

    def grant(self, *rules: str) -> "SandboxConfig":
        return replace(self, grants=self.grants + tuple(r for r in rules if r not in self.grants))

    def revoke(self, *rules: str) -> "SandboxConfig":
        return replace(self, revocations=self.revocations + tuple(r for r in rules if r not in self.revocations))

    def hop_to(self, tier: str, level: int | None = None) -> "SandboxConfig":
        level = TIER_LEVEL.get(tier, -1) if level is None else level
        if level < 0:
            raise ValueError(f"unknown tier {tier!r}; tiers are {', '.join(TIERS)}")
        lockdown = TIER_LEVEL["lockdown"]
        if self.level >= lockdown and level < lockdown:
            raise HopError("lockdown is one-way: a test that reached it stays there until it ends")
        if level >= self.level:
            return replace(self, tier=tier, level=level, pending="", pending_level=-1)
        return replace(self, pending=tier, pending_level=level)

    def at_test_boundary(self) -> "SandboxConfig":
        """Apply a pending de-escalation (called between tests)."""
        if not self.pending:
            return self
        return replace(self, tier=self.pending, level=self.pending_level, pending="", pending_level=-1)


class _Target(Protocol):
    category: str
    target: str
    target_class: str


class PolicyEngine:
    """Loads tier templates and policy files; decides. See the module docstring."""

    def __init__(self, roots: ev.Roots | None = None, *, tiers_dir: Path = TIERS_DIR,
                 cache_size: int = 1 << 16) -> None:
        self.roots = roots or ev.Roots.current()
        self.policies: dict[str, Policy] = {}
        self.levels: dict[str, int] = dict(TIER_LEVEL)
        self._tiers_dir = tiers_dir
        self._compiled: dict[tuple, dict[str, tuple]] = {}  # config key -> category -> (ordered, default)
        self._tier_parts: dict[tuple, tuple] = {}        # (tier, category) -> (rules by effect, default)
        self._runtime_rules: dict[tuple, Rule] = {}      # (grant/revocation text, position, effect) -> Rule
        self._cache: dict[tuple, Decision] = {}
        self._loading: dict[str, None] = {}
        self.cache_size = cache_size
        self._tier_configs: tuple[SandboxConfig, ...] = ()
        # Tier templates load on first use: a child process needs only its own tier.

    # ----------------------------------------------------------------- loading
    def load_tier(self, tier: str) -> Policy:
        if tier not in self.policies:
            path = self._tiers_dir / f"{tier}.policy"
            if not path.is_file():
                raise PolicyError(str(path), 0, 0, f"no tier template {tier!r}; tiers are {', '.join(TIERS)}")
            self.policies[tier] = read_policy_file(path, roots=self.roots, resolve=self._resolve, name=tier)
        return self.policies[tier]

    def _resolve(self, name: str, base: Path | None = None) -> Policy:
        if name in TIERS:
            return self.load_tier(name)
        p = Path(name).expanduser()
        return self.load_file(base / p if base is not None and not p.is_absolute() else p)

    def load_file(self, path: str | Path) -> Policy:
        """Load a user's policy file; it becomes a tier named by its path."""
        p = Path(path).expanduser().resolve()
        name = str(p)
        if name not in self.policies:
            if not p.is_file():
                raise PolicyError(str(path), 0, 0, f"no such policy file; give a tier ({', '.join(TIERS)}) "
                                  "or the path of a policy file")
            if name in self._loading:
                raise PolicyError(str(path), 0, 0, "extends cycle: " + " -> ".join([*self._loading, name]))
            self._loading[name] = None
            try:
                policy = read_policy_file(p, roots=self.roots, name=name,
                                          resolve=lambda n: self._resolve(n, p.parent))
            finally:
                self._loading.pop(name, None)
            self.policies[name] = policy
            self.levels[name] = self.levels.get(policy.extends, TIER_LEVEL["medium"])
        return self.policies[name]

    def config(self, tier_or_file: str, *, grants: Iterable[str] = (), revocations: Iterable[str] = ()) -> SandboxConfig:
        """A config for a tier name or a policy file (validating grants and revocations now)."""
        name = tier_or_file if tier_or_file in TIERS else self.load_file(tier_or_file).name
        cfg = SandboxConfig(tier=name, grants=tuple(grants), revocations=tuple(revocations),
                            level=self.levels[name])
        for effect, texts in (("allow", cfg.grants), ("deny", cfg.revocations)):
            for i, text in enumerate(texts, 1):
                self._runtime_rule(text, i, effect)  # raise on a bad grant now, not at the first event
        self._tier_part(name, ev.CATEGORIES[0])
        return cfg

    def hop(self, config: SandboxConfig, tier_or_file: str) -> SandboxConfig:
        name = tier_or_file if tier_or_file in TIERS else self.load_file(tier_or_file).name
        return config.hop_to(name, self.levels[name])

    # ----------------------------------------------------------------- compiling
    def _tier_part(self, tier: str, category: str) -> tuple[dict[str, tuple], Decision]:
        """A tier's own (matcher, decision) pairs for one category, by effect, and its default."""
        key = (tier, category)
        part = self._tier_parts.get(key)
        if part is None:
            if tier not in self.policies:
                self._resolve(tier)
            policy = self.policies[tier]
            by_effect = {e: tuple(self._compiled_rule(r, category) for r in policy.rules
                                  if r.effect == e and category in r.categories) for e in _PRECEDENCE}
            short = _short(policy.name)
            default = Decision(policy.default, f"{short}:default", f"no rule of {short} matches this "
                               f"{category}; its default is {policy.default}")
            part = self._tier_parts[key] = (by_effect, default)
        return part

    @staticmethod
    def _compiled_rule(rule: Rule, category: str) -> tuple:
        # The decision a rule makes is fixed: build it once, not per event.
        return (specialise(rule, category), Decision(rule.effect, rule.rule_id, f"{rule.effect} by "
                                                     f"`{rule.text}` ({rule.rule_id})", rule.redirect_to, rule.text))

    def _runtime_rule(self, text: str, i: int, effect: str) -> Rule:
        """A grant (allow) or revocation (deny) of a config, parsed once per (text, position)."""
        key = (text, i, effect)
        rule = self._runtime_rules.get(key)
        if rule is None:
            kind, prefix = ("grant", "grant") if effect == "allow" else ("revocation", "revoke")
            rule = parse_rule(text, roots=self.roots, source=f"{kind} {text!r}", rule_id=f"{prefix}:{i}",
                              effect=effect)
            if len(self._runtime_rules) >= self.cache_size:
                self._runtime_rules.clear()
            self._runtime_rules[key] = rule
        return rule

    def _rules_for(self, config: SandboxConfig, category: str) -> tuple[tuple, Decision]:
        """The ordered (matcher, decision) pairs of one config for one category: by precedence,
        the tier's rules before the config's revocations (deny) and grants (allow). Compiled on
        first use per (config, category): an agent that hops and grants makes many configs."""
        per_config = self._compiled.get(config.key)
        if per_config is None:
            if len(self._compiled) >= self.cache_size:
                self._compiled.clear()
            per_config = self._compiled[config.key] = {}
        compiled = per_config.get(category)
        if compiled is not None:
            return compiled
        by_effect, default = self._tier_part(config.tier, category)
        extra = {"allow": config.grants, "deny": config.revocations}
        ordered: list = []
        for effect in _PRECEDENCE:
            ordered.extend(by_effect[effect])
            for i, text in enumerate(extra.get(effect, ()), 1):
                rule = self._runtime_rule(text, i, effect)
                if category in rule.categories:
                    ordered.append(self._compiled_rule(rule, category))
        compiled = per_config[category] = (tuple(ordered), default)
        return compiled

    # ----------------------------------------------------------------- deciding
    def decide(self, event: _Target, config: SandboxConfig) -> Decision:
        return self.decide_target(event.category, event.target, event.target_class, config)

    def quiet(self, category: str, target: str, target_class: str) -> bool:
        """Whether no hop can change the event's decision: every tier allows it (asked from the
        strictest down, stopping at the first that does not) and it is no spawn (`NEVER_QUIET`).
        A grant is an allow rule ordered after every deny and redirect rule, so such an event
        stays allowed with its category granted; only a revocation of it changes it."""
        if category in NEVER_QUIET:
            return False
        if not self._tier_configs:
            self._tier_configs = tuple(self.config(t) for t in reversed(TIERS))
        return all(self.decide_target(category, target, target_class, cfg).effect == "allow"
                   for cfg in self._tier_configs)

    def decide_target(self, category: str, target: str, target_class: str, config: SandboxConfig) -> Decision:
        key = (config.key, category, target, target_class)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        decision = self._decide_cold(category, target, target_class, config)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[key] = decision
        return decision

    def _decide_cold(self, category: str, target: str, target_class: str, config: SandboxConfig) -> Decision:
        if category not in _KNOWN_CATEGORIES:
            return Decision("deny", "engine:unknown-category", f"unknown category {category!r}: denied (fail closed)")
        ordered, default = self._rules_for(config, category)
        for match, decision in ordered:
            if match(target, target_class):
                return decision
        return default

    def decide_all(self, events: Iterable[_Target], config: SandboxConfig) -> Decision:
        """One decision for several views of one operation (a connect to an IP and the names it
        was looked up as). A rule that denies any view wins, then one that redirects, then any
        allow; only when no rule speaks for any view does the tier's default decide."""
        decisions = [self.decide(e, config) for e in events]
        if not decisions:
            raise ValueError("decide_all needs at least one event")
        for effect in _PRECEDENCE:
            for d in decisions:
                if d.effect == effect and not d.rule_id.endswith(":default"):
                    return d
        return decisions[0]

    def cache_clear(self) -> None:
        self._cache.clear()

    # ----------------------------------------------------------------- messages
    def how_to_allow(self, category: str, target: str, target_class: str, config: SandboxConfig,
                     decision: Decision | None = None) -> str:
        """What to add so this operation is allowed: a policy line or marker, or the tier that
        allows it when a deny rule (which no allow can beat) decided. `decision`: the one made
        (for an operation decided over several views, see `decide_all`)."""
        d = decision or self.decide_target(category, target, target_class, config)
        if d.effect == "allow":
            return "it is allowed"
        line = suggest_rule(category, target)
        if d.effect == "deny" and d.rule_id.endswith(":default"):
            return (f"add `allow {line}` to the policy, or mark the test "
                    f"`@pytest.mark.sandhop(allow=[{line!r}])`")
        for tier in reversed(TIERS[:TIER_LEVEL.get(config.tier, TIER_LEVEL["medium"])]):
            if self.decide_target(category, target, target_class, SandboxConfig(tier=tier)).effect == "allow":
                return (f"`{d.rule_text or d.rule_id}` ({d.rule_id}) beats any allow; run the test at a tier "
                        f"without it: `@pytest.mark.sandhop(tier={tier!r})`, or use a policy file without that line")
        return f"`{d.rule_text or d.rule_id}` ({d.rule_id}) beats any allow; use a policy file without that line"


def suggest_rule(category: str, target: str) -> str:
    """The narrowest rule line (without effect) that names this exact target."""
    if category == "proc.spawn":
        exe = executable_of(target)
        return f"{category} {literal_glob(exe.rsplit('/', 1)[-1] if '/' in exe else exe)}"
    if category in ("net.connect", "net.bind", "net.send") and target.startswith(("/", "${")):
        return f"{category} unix:{literal_glob(target)}"
    if category.startswith("fs.") or category == "code.native":
        return f"{category} {literal_glob(target)}"
    return category + " " + re.sub(r"[*?]|\s", "?", target)


def literal_glob(text: str) -> str:
    """A glob that matches exactly `text`: wildcards as one-character sets, whitespace as `?`
    (rules are split on whitespace)."""
    return re.sub(r"\s", "?", re.sub(r"[*?\[]", lambda m: f"[{m.group()}]", text))


def _short(name: str) -> str:
    return Path(name).name if "/" in name else name
