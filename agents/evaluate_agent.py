"""`sandhop evaluate`: replay held-out splits through the Gymnasium env and the real `PolicyEngine`
under each sandbox manager (PPO runs, every static tier, the tuned threshold rule, the oracle) and
compare them: attacks stopped before their damaging step, tests broken, overhead, return.

Every reported figure comes from stepping `SandboxManagerEnv` episode by episode (no twin, no
decision-table shortcut); only the threshold rule's tuning on val uses the exact table shortcut.
Each policy runs in an env built from one shared env config whose `base_tier` the policy may set
(static tier T starts at T; threshold and oracle at observe), over the same loaded episodes.

    sandhop evaluate --policies ppo:runs/agent,static,threshold,oracle --split test,novel --out eval/

writes `results.parquet` (one row per policy x seed x split), `results.md` (per split: mean and
95 % t-interval over seeds, and which policies Pareto-dominate which on attacks through vs tests
broken) and `pareto_<split>.png`.
"""

from __future__ import annotations

import copy
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from sandhop.agents.baselines import Oracle, Policy, StaticTier, ThresholdRule
from sandhop.enforcement.engine import TIER_LEVEL, TIERS, PolicyEngine
from sandhop.envs import data as envdata
from sandhop.envs.spec import EnvSpec, default_config, plain_config

# Per policy, seed and split (the columns of results.parquet after policy, seed, split).
METRICS: tuple[str, ...] = ("attacks_through", "attacks_stopped_pct", "tests_broken", "tests_broken_pct",
                            "malicious_steps_allowed", "benign_steps_denied", "mean_tier", "mean_tier_cost",
                            "hops_per_test", "episodic_return", "episodes", "attacks", "benign_tests", "steps")
# What results.md shows per split (episodes, attacks, steps go in the heading).
SHOWN: tuple[str, ...] = METRICS[:10]
BASELINES = ("static", "threshold", "oracle")


# --------------------------------------------------------------------------- replay

def replay(policy: Policy, env: Any, episodes: Sequence[int] | None = None, *, progress: bool = False,
           desc: str = "") -> dict[str, float]:
    """The metrics of `policy` over `episodes` (default: all) of a `SandboxManagerEnv`, stepping
    each one from `reset(options={"episode": i})` until it terminates or is truncated."""
    from tqdm import tqdm
    order = range(len(env.episodes)) if episodes is None else [int(e) for e in episodes]
    overhead = np.asarray(env.env_spec.tier_overhead, np.float64)
    n = attacks = through = broken = mal_allowed = ben_denied = hops = steps = 0
    tier_sum = cost_sum = total = 0.0
    for e in tqdm(order, desc=desc or policy.name, unit="test", disable=not progress, mininterval=0.5, leave=False):
        obs, info = env.reset(options={"episode": e})
        policy.reset(info)
        attacked = bool(info["attack"])
        deciding = True            # still at or before the first damaging step
        stopped = denied_any = False
        done = False
        while not done:
            obs, reward, terminated, truncated, step = env.step(policy.act(obs))
            done = terminated or truncated
            total += reward
            level = TIER_LEVEL[step["tier"]]
            tier_sum += level
            cost_sum += overhead[level]
            hops += step["action"].startswith("hop:")
            steps += 1
            if step["malicious"]:
                if step["decision"] == "allow":
                    mal_allowed += 1
                elif deciding:
                    stopped = True
            elif step["decision"] == "deny":
                ben_denied += 1
                denied_any = True
            if step["damaging"]:
                deciding = False
        n += 1
        attacks += attacked
        through += attacked and not stopped
        broken += (not attacked) and denied_any
    benign = n - attacks
    return {"attacks_through": through,
            "attacks_stopped_pct": 100.0 * (attacks - through) / attacks if attacks else float("nan"),
            "tests_broken": broken, "tests_broken_pct": 100.0 * broken / benign if benign else float("nan"),
            "malicious_steps_allowed": mal_allowed, "benign_steps_denied": ben_denied,
            "mean_tier": tier_sum / steps if steps else float("nan"),
            "mean_tier_cost": cost_sum / steps if steps else float("nan"),
            "hops_per_test": hops / n if n else float("nan"), "episodic_return": total / n if n else float("nan"),
            "episodes": n, "attacks": attacks, "benign_tests": benign, "steps": steps}


def policy_spec(policy: Policy, spec: EnvSpec) -> EnvSpec:
    """The env config `policy` runs under: `spec` with the policy's own base tier, if it has one."""
    tier = getattr(policy, "base_tier", None)
    return spec if tier in (None, spec.base_tier) else replace(spec, base_tier=tier)


def spread(n: int, at_most: int | None) -> np.ndarray | None:
    """`at_most` episode indices spread evenly over a split of `n` (None: all of them)."""
    if at_most is None or at_most >= n:
        return None
    return np.unique(np.linspace(0, n - 1, max(at_most, 1)).round().astype(np.int64))


def evaluate(policies: Sequence[Policy], splits: Sequence[str], spec: EnvSpec, dataset: Any = "default", *,
             max_episodes: int | None = None, engine: PolicyEngine | None = None,
             progress: bool = False) -> list[dict[str, Any]]:
    """One row (policy, seed, split, metrics) per policy and split: each split's episodes are
    loaded once and replayed through one env per policy (`policy_spec`), all asking one engine.
    `max_episodes` replays an even spread of that many episodes per split (for quick checks)."""
    from sandhop.envs.sandbox_env import SandboxManagerEnv
    engine = engine or PolicyEngine()
    rows = []
    for split in splits:
        episodes = envdata.load(split, dataset, spec, progress=progress)
        chosen = spread(len(episodes), max_episodes)
        for policy in policies:
            env = SandboxManagerEnv(split, dataset, policy_spec(policy, spec).as_dict(), episodes=episodes,
                                    engine=engine)
            bind = getattr(policy, "bind", None)
            if callable(bind):
                bind(env)
            metrics = replay(policy, env, chosen, progress=progress, desc=f"{split} {policy.name}")
            rows.append({"policy": policy.name, "seed": int(policy.seed), "split": split, **metrics})
    return rows


# --------------------------------------------------------------------------- summaries

def confidence_interval(values: Sequence[float], level: float = 0.95) -> float:
    """Half-width of the t-distribution interval of the mean (nan for one value)."""
    x = np.asarray(values, np.float64)
    if len(x) < 2:
        return float("nan")
    from scipy.stats import t
    return float(t.ppf(0.5 + level / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))


def summarise(rows: Sequence[Mapping[str, Any]], split: str) -> list[dict[str, Any]]:
    """Per policy (in first-seen order) on one split: seeds, and each metric's mean and CI."""
    names = list(dict.fromkeys(r["policy"] for r in rows if r["split"] == split))
    out = []
    for name in names:
        mine = [r for r in rows if r["split"] == split and r["policy"] == name]
        entry: dict[str, Any] = {"policy": name, "seeds": len(mine)}
        for m in METRICS:
            values = [float(r[m]) for r in mine]
            entry[m] = float(np.mean(values))
            entry[f"{m}_ci"] = confidence_interval(values)
        out.append(entry)
    return out


def dominates(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """`a` is no worse than `b` on attacks through and tests broken, and better on one."""
    x = (a["attacks_through"], a["tests_broken"])
    y = (b["attacks_through"], b["tests_broken"])
    return x[0] <= y[0] and x[1] <= y[1] and x != y


def pareto(summary: Sequence[Mapping[str, Any]]) -> tuple[dict[str, list[str]], list[str]]:
    """Which policies each one dominates (means over seeds), and the non-dominated ones."""
    beaten = {a["policy"]: [b["policy"] for b in summary if dominates(a, b)] for a in summary}
    front = [a["policy"] for a in summary if not any(dominates(b, a) for b in summary)]
    return beaten, front


def _cell(metric: str, mean: float, ci: float, seeds: int) -> str:
    if math.isnan(mean):
        return "—"
    if metric in ("mean_tier_cost",):
        digits = 5
    elif metric in ("episodic_return", "mean_tier", "hops_per_test"):
        digits = 3
    elif metric.endswith("_pct"):
        digits = 1
    else:
        digits = 0 if seeds == 1 else 1
    spread_ = "—" if seeds == 1 or math.isnan(ci) else f"{ci:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread_}"


def markdown(rows: Sequence[Mapping[str, Any]], notes: Sequence[str] = ()) -> str:
    """results.md: notes, then per split a table (mean ± 95 % CI over seeds) and its Pareto line."""
    lines = ["# sandhop evaluate", ""]
    lines += [f"- {n}" for n in notes]
    lines += ["- cells: mean ± half-width of the 95 % t-interval over seeds (— : one seed, a deterministic "
              "policy)", ""]
    for split in dict.fromkeys(r["split"] for r in rows):
        summary = summarise(rows, split)
        first = summary[0]
        lines += [f"## {split}: {first['episodes']:.0f} tests ({first['attacks']:.0f} attacked), "
                  f"{first['steps']:.0f} events", ""]
        lines.append("| policy | seeds | " + " | ".join(SHOWN) + " |")
        lines.append("|---|---:|" + "---:|" * len(SHOWN))
        for s in summary:
            cells = [_cell(m, s[m], s[f"{m}_ci"], s["seeds"]) for m in SHOWN]
            lines.append(f"| {s['policy']} | {s['seeds']} | " + " | ".join(cells) + " |")
        beaten, front = pareto(summary)
        said = [f"{a} dominates {', '.join(b)}" for a, b in beaten.items() if b]
        lines += ["", f"Pareto (attacks_through vs tests_broken, means): {'; '.join(said) or 'no policy dominates another'}."
                  f" Non-dominated: {', '.join(front)}.", ""]
    return "\n".join(lines)


def plot_pareto(rows: Sequence[Mapping[str, Any]], split: str, path: Path) -> None:
    """Tests broken (x) vs attacks through (y): seeds faint, the mean large with CI bars, and the
    front of the non-dominated means as a step line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    summary = summarise(rows, split)
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "osD^vP*Xh<>p"
    for k, s in enumerate(summary):
        color, marker = f"C{k % 10}", markers[k % len(markers)]
        mine = [r for r in rows if r["split"] == split and r["policy"] == s["policy"]]
        if len(mine) > 1:
            ax.scatter([r["tests_broken"] for r in mine], [r["attacks_through"] for r in mine], color=color,
                       marker=marker, alpha=0.25, s=20)
        err = lambda m: 0.0 if math.isnan(s[f"{m}_ci"]) else s[f"{m}_ci"]  # noqa: E731
        ax.errorbar(s["tests_broken"], s["attacks_through"], xerr=err("tests_broken"),
                    yerr=err("attacks_through"), color=color, marker=marker, markersize=10, capsize=3,
                    linestyle="none", label=s["policy"])
    # one label per point: policies with the same means (static high and lockdown, often) share it
    at: dict[tuple[float, float], list[str]] = {}
    for s in summary:
        at.setdefault((s["tests_broken"], s["attacks_through"]), []).append(s["policy"])
    ax.margins(0.08)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    placed: list[tuple[float, float]] = []
    for (x, y), names in sorted(at.items()):
        u, v = (x - x0) / (x1 - x0), (y - y0) / (y1 - y0)
        crowd = sum(abs(u - a) < 0.08 and abs(v - b) < 0.05 for a, b in placed)  # stack labels of near points
        placed.append((u, v))
        right = u > 0.7
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(-7 if right else 7, 7 + 11 * crowd),
                    ha="right" if right else "left", fontsize=8)
    _, front = pareto(summary)
    points = sorted((s["tests_broken"], s["attacks_through"]) for s in summary if s["policy"] in front)
    if points:  # the staircase bounding what the front dominates, out to the plot's edges
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        xs = [points[0][0]] + [p[0] for p in points] + [x1]
        ys = [y1] + [p[1] for p in points] + [points[-1][1]]
        ax.step(xs, ys, where="post", color="grey", linestyle="--", linewidth=1, label="Pareto front")
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
    ax.set_xlabel("tests broken (benign tests with a denied step)")
    ax.set_ylabel("attacks through (not stopped before damage)")
    ax.set_title(f"sandbox managers on {split}: lower left is better")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: Sequence[Mapping[str, Any]], out: Path, notes: Sequence[str] = ()) -> str:
    """results.parquet, results.md and pareto_<split>.png under `out`; returns the markdown."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    out.mkdir(parents=True, exist_ok=True)
    columns = ["policy", "seed", "split", *METRICS]
    pq.write_table(pa.Table.from_pylist([{c: r[c] for c in columns} for r in rows]), out / "results.parquet")
    text = markdown(rows, notes)
    (out / "results.md").write_text(text + "\n")
    for split in dict.fromkeys(r["split"] for r in rows):
        plot_pareto(rows, split, out / f"pareto_{split}.png")
    return text


# --------------------------------------------------------------------------- command-line inputs

def parse_policy_list(text: str) -> list[tuple[str, str]]:
    """`ppo:RUN_DIR,static,static:TIER,threshold,oracle` as (kind, argument) pairs."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError("--policies is empty; name at least one of ppo:RUN_DIR, static, static:TIER, threshold, "
                         "oracle")
    parsed = []
    for item in items:
        kind, _, arg = item.partition(":")
        if kind == "static" and arg and arg not in TIER_LEVEL:
            raise ValueError(f"--policies {item}: unknown tier {arg!r}; use static (every tier) or static:TIER "
                             f"with TIER one of {', '.join(TIERS)}")
        if kind == "ppo" and not arg:
            raise ValueError("--policies ppo needs its run folder: ppo:RUN_DIR (the out= folder of "
                             "sandhop-train-agent, or a multirun folder of them)")
        if kind in ("threshold", "oracle") and arg:
            raise ValueError(f"--policies {item}: {kind} takes no argument (the threshold rule is tuned on val)")
        if kind not in ("ppo", *BASELINES):
            raise ValueError(f"--policies: unknown policy {item!r}; use ppo:RUN_DIR, static, static:TIER "
                             f"({', '.join(TIERS)}), threshold or oracle, comma-separated")
        parsed.append((kind, arg))
    return list(dict.fromkeys(parsed))


def parse_splits(text: str) -> list[str]:
    splits = list(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))
    unknown = [s for s in splits if s not in envdata.SPLITS]
    if unknown or not splits:
        raise ValueError(f"--split {text!r}: unknown split(s) {unknown or '(none given)'}; use a comma list of "
                         f"{', '.join(envdata.SPLITS)} (held-out: test, novel)")
    return splits


def parse_env_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` settings of the env config as one nested mapping (`risk.source=model` ->
    {"risk": {"source": "model"}}); values are read as YAML (numbers, null, lists)."""
    import yaml
    tree: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key = key.strip().removeprefix("env.")
        if not eq or not key:
            raise ValueError(f"--env {item!r}: expected KEY=VALUE, e.g. --env risk.source=model or --env "
                             "base_tier=observe")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            parsed = value
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"--env {item!r}: {p} is set to a value and a mapping at once")
        node[leaf] = parsed
    return tree


def _merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict:
    merged = copy.deepcopy(dict(base))
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(merged.get(k), Mapping):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = copy.deepcopy(v)
    return merged


def load_trained(run_dir: str | Path) -> list[Policy]:
    """The PPO policies of a sandhop-train-agent run folder (or multirun folder): one per seed,
    each with `env_config` and `dataset`."""
    run = Path(run_dir).expanduser()
    if not run.is_dir():
        raise ValueError(f"ppo:{run_dir}: no such folder; pass the out= folder of sandhop-train-agent (or a "
                         "multirun folder of such runs)")
    from sandhop.agents.ppo import AgentError, load_policies
    try:
        policies = list(load_policies(run))
    except AgentError as exc:
        raise ValueError(f"ppo:{run_dir}: {exc}") from None
    return policies


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def common_spec(trained: Sequence[Any], overrides: Mapping[str, Any]) -> EnvSpec:
    """The env config every policy shares: the PPO runs' (which must agree) or the default, with
    `--env` overrides on top."""
    if not trained:
        return EnvSpec.from_config(_merge(default_config(), overrides))
    specs = [(p.name, p.seed, EnvSpec.from_config(_merge(plain_config(p.env_config), overrides))) for p in trained]
    name0, seed0, spec0 = specs[0]
    for name, seed, spec in specs[1:]:
        if spec != spec0:
            a, b = _flat(spec0.as_dict()), _flat(spec.as_dict())
            keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
            detail = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys)
            raise ValueError(f"--policies: {name0} (seed {seed0}) and {name} (seed {seed}) were trained with "
                             f"different env configs ({detail}); evaluate them separately, or pass --env "
                             "KEY=VALUE to evaluate both under one config")
    return spec0


def choose_dataset(dataset: str | None, trained: Sequence[Any]) -> str:
    if dataset:
        return dataset
    names = list(dict.fromkeys(str(p.dataset) for p in trained))
    if len(names) > 1:
        raise ValueError(f"--policies: the PPO runs were trained on different datasets ({', '.join(names)}); pass "
                         "--dataset NAME to evaluate them all on one")
    return names[0] if names else "default"


# --------------------------------------------------------------------------- the command

def evaluate_command(policies: str = "static,threshold,oracle", splits: str = "test,novel",
                     out: Path = Path("eval"), dataset: str | None = None, env_overrides: Sequence[str] = (),
                     progress: bool = False) -> int:
    """`sandhop evaluate`: build the policies (tuning the threshold rule on val), replay every
    episode of each split, write results under `out` and print the markdown tables."""
    wanted = parse_policy_list(policies)
    chosen_splits = parse_splits(splits)
    overrides = parse_env_overrides(env_overrides)
    loaded = {arg: load_trained(arg) for kind, arg in wanted if kind == "ppo"}
    trained = [p for ps in loaded.values() for p in ps]
    dataset = choose_dataset(dataset, trained)
    spec = common_spec(trained, overrides)
    start_tier = overrides.get("base_tier", "observe")   # where the threshold rule and the oracle start
    EnvSpec.from_config(_merge(spec.as_dict(), {"base_tier": start_tier}))  # a bad tier fails here, clearly
    engine = PolicyEngine()
    built: list[Policy] = []
    notes = [f"dataset: {dataset}; risk inputs: {spec.risk_source}"
             + (f" ({spec.risk_checkpoint})" if spec.risk_checkpoint else ""),
             "reward: " + ", ".join(f"{k} {v}" for k, v in _flat(spec.as_dict()["reward"]).items()),
             f"base tier: static:T starts at T; threshold and oracle at {start_tier}"
             + (f"; ppo at {spec.base_tier} (its training config)" if trained else "")]
    for kind, arg in wanted:
        if kind == "static":
            built += [StaticTier(t) for t in ((arg,) if arg else TIERS)]
        elif kind == "oracle":
            built.append(Oracle(start_tier))
        elif kind == "ppo":
            for p in loaded[arg]:
                if len(loaded) > 1:   # several runs: tell their rows apart by folder
                    p.name = f"{p.name}@{arg}"
                built.append(p)
        elif kind == "threshold":
            tuning_spec = replace(spec, base_tier=start_tier)
            rule = ThresholdRule.tune(envdata.load("val", dataset, tuning_spec, progress=progress), tuning_spec,
                                      engine=engine)
            t = rule.tuning
            notes.append(f"threshold rule: hop {start_tier} -> {rule.tier} at the first event with risk >= "
                         f"{rule.threshold:.4g}; tuned on {t['split']} over {t['candidates']} (threshold, tier) "
                         f"candidates (val: mean return {t['mean_return']:.4f}, {t['tests_broken']} tests broken, "
                         f"{t['attacks_through']} attacks through)")
            built.append(rule)
    built = list({p.name + f"\0{p.seed}": p for p in built}.values())
    rows = evaluate(built, chosen_splits, spec, dataset, engine=engine, progress=progress)
    text = write_results(rows, Path(out), notes)
    print(text)
    print(f"sandhop evaluate: wrote {Path(out) / 'results.parquet'}, results.md and pareto_*.png", file=sys.stderr)
    return 0
