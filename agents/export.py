"""`sandhop export --risk RUN --agent RUN --out ARTIFACT`: trained models to a runtime artifact.

The artifact (`sandhop.enforcement.runtime` reads it) is a folder of `manifest.json` and two
safetensors files; no pickle. The manifest carries everything the runtime checks before it
enforces anything (format version, the feature spec and its hash, the event model, the tier
templates the policy was trained against, sha256 of every weight file) and what a person
auditing the artifact wants to see (the training configs and evaluation metrics of both runs,
the risk thresholds, which agent member was exported and why).

The agent must have been trained on this risk model's scores (`env.risk.source=model
env.risk.checkpoint=RUN`): a policy trained on other risk inputs would meet scores it never saw.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from sandhop.datasets.splits import replace_folder
from sandhop.enforcement.runtime import (FORMAT_VERSION, MANIFEST, POLICY_FILE, RISK_FILE, Artifact,
                                         event_model_hash, sha256_file, tier_templates)


class ExportError(ValueError):
    """Runs that cannot be exported together (says what and how to fix it)."""


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict / list of arrays as dotted names (`blocks.0.qkv.kernel`)."""
    out: dict[str, np.ndarray] = {}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    for k, v in items:
        name = f"{prefix}{k}"
        if isinstance(v, (dict, list, tuple)):
            out.update(flatten(v, name + "."))
        else:
            out[name] = np.ascontiguousarray(np.asarray(v, np.float32))
    return out


def risk_weights(model) -> dict[str, np.ndarray]:
    from flax import nnx
    state = nnx.state(model, nnx.Param)
    out = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        keys = [str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p)))) for p in path]
        keys = [k for k in keys if k != "value"]
        out[".".join(keys)] = np.ascontiguousarray(np.asarray(leaf, np.float32))
    return out


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} cannot be read ({exc}); finish the run (evaluate=true) or retrain") from None


def pick_member(policies: list, evaluation: dict, member: int | None) -> tuple[int, str]:
    if member is not None:
        if not 0 <= member < len(policies):
            raise ExportError(f"--member {member}: the agent run has members 0..{len(policies) - 1}")
        return member, "chosen with --member"
    val = evaluation.get("val") or []
    if len(policies) == 1 or not val:
        return 0, "the run's only member" if len(policies) == 1 else "member 0 (the run has no val results)"
    best = max(val, key=lambda r: r.get("episodic_return", -np.inf))
    return int(best["member"]), f"best val episodic_return ({best['episodic_return']:.4f}) of {len(val)} members"


def export(risk_run: str | Path, agent_run: str | Path, out: str | Path, *, member: int | None = None,
           force: bool = False) -> Path:
    from omegaconf import OmegaConf

    from sandhop.agents.ppo import AgentError
    from sandhop.agents.train_agent import load_run as load_agent
    from sandhop.agents.train_risk import TrainError, load_run as load_risk
    import sandhop

    risk_run, agent_run, out = (Path(p).expanduser().resolve() for p in (risk_run, agent_run, out))
    try:
        model, fspec, risk_cfg = load_risk(risk_run)
    except TrainError as exc:
        raise ExportError(f"--risk: {exc}") from None
    if str(risk_cfg.get("dataset", {}).get("kind", "traces")) != "traces":
        raise ExportError(f"--risk {risk_run} was trained on ADFA-LD system calls; export a model trained on "
                          "test traces (sandhop-train-risk dataset=default)")
    risk_eval = _json(risk_run / "evaluation.json")
    try:
        policies = load_agent(agent_run)
    except AgentError as exc:
        raise ExportError(f"--agent: {exc}") from None
    spec = policies[0].spec
    if spec.risk_source != "model" or Path(spec.risk_checkpoint or "").expanduser().resolve() != risk_run:
        trained_on = "rule-based risk" if spec.risk_source != "model" else f"the risk model {spec.risk_checkpoint}"
        raise ExportError(f"the agent {agent_run} was trained on {trained_on}, not on --risk {risk_run}; retrain it "
                          f"on this model's scores: sandhop-train-agent env.risk.source=model "
                          f"env.risk.checkpoint={risk_run}")
    agent_eval = _json(agent_run / "evaluation.json") if (agent_run / "evaluation.json").exists() else {}
    index, why = pick_member(policies, agent_eval, member)
    policy = policies[index]
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ExportError(f"{out} exists and is not empty; choose another --out or pass --force to replace it")

    from safetensors.numpy import save_file
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent if out.parent.exists() else None))
    try:
        save_file(risk_weights(model), str(tmp / RISK_FILE))
        save_file(flatten({**policy.params, "norm": policy.norm}), str(tmp / POLICY_FILE))
        manifest = {
            "format_version": FORMAT_VERSION,
            "sandhop_version": sandhop.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "feature_spec": json.loads(fspec.to_json()),
            "feature_fingerprint": fspec.fingerprint(),
            "event_model": event_model_hash(),
            "tiers": tier_templates(),
            "env": spec.as_dict(),
            "risk": {"run": str(risk_run), "model": dict(model.cfg.as_dict()),
                     "calibrator": risk_eval["calibrator"],
                     "thresholds": {k: v for k, v in risk_eval.items() if k.startswith(("threshold", "event_threshold"))},
                     "config": OmegaConf.to_container(risk_cfg, resolve=True),
                     "metrics": risk_eval.get("splits", {})},
            "agent": {"run": str(agent_run), "member": index, "seed": policy.seed, "why": why,
                      "hparams": policy.hparams, "normalize_obs": bool(policy.config.normalize_obs),
                      "config": OmegaConf.to_container(OmegaConf.load(agent_run / "config.yaml"), resolve=True),
                      "metrics": agent_eval.get("val", [])},
        }
        manifest["files"] = {name: sha256_file(tmp / name) for name in (RISK_FILE, POLICY_FILE)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=_plain) + "\n")
        Artifact.load(tmp)  # what the runtime will check, checked now
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o644)
        replace_folder(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _plain(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"{type(x).__name__} is not JSON serialisable")


def describe(root: str | Path) -> str:
    """A few lines on an artifact: what it holds and how it did."""
    root = Path(root)
    m = json.loads((root / MANIFEST).read_text())
    size = sum((root / f).stat().st_size for f in m["files"])
    test = m["risk"]["metrics"].get("test", {})
    val = next((r for r in m["agent"]["metrics"] if r.get("member") == m["agent"]["member"]), {})
    lines = [f"artifact {root} (format v{m['format_version']}, sandhop {m['sandhop_version']}, {size / 1e6:.1f} MB)",
             f"  risk model   {m['risk']['run']} ({m['risk']['model']['layers']} layers x {m['risk']['model']['width']}, "
             f"context {m['risk']['model']['context']}); test per-event ROC-AUC {test.get('event_roc_auc', float('nan')):.3f}",
             f"  manager      {m['agent']['run']} member {m['agent']['member']} (seed {m['agent']['seed']}; {m['agent']['why']}); "
             f"base tier {m['env']['base_tier']}",
             f"  on val       attacks through {val.get('attacks_through', float('nan')):.3f}, tests broken "
             f"{val.get('tests_broken', float('nan')):.3f} (per test)",
             f"  enforce with pytest --sandhop-enforce {root}   or   sandhop run {root} -- [pytest args]"]
    return "\n".join(lines)
