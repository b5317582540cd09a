"""The sandbox manager's policy network, written once for numpy and `jax.numpy`.

Every function takes the array module as its first argument: PPO trains it under JAX
(`sandhop.agents.ppo`), and the runtime enforcer runs the exported weights with numpy alone, so
this module imports nothing but numpy and the event model.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from sandhop.enforcement.events import CATEGORIES, INFERRED_TAGS, TARGET_CLASSES
from sandhop.envs.spec import ALERT_CAP, N_TIERS, EnvSpec


class Inputs(NamedTuple):
    """A policy's view of an observation: the dense part (risk, tags, recent counts, progress,
    alerts, and per category whether it is granted or revoked) and one row index per categorical part
    (category, target class, tier) into one embedding table. Gathering three rows costs a
    fraction of the one-hot matmul they equal (86 columns); the permissions stay dense, as 18
    more gathers per step cost three times the whole rest of a minibatch's gradient on a CPU."""

    dense: Any   # float32 [..., D]
    index: Any   # int32 [..., 3]


def input_sizes(spec: EnvSpec) -> tuple[int, int]:
    """(dense inputs, rows of the embedding table)."""
    return 1 + len(INFERRED_TAGS) + 2 + 1 + 1 + 2 * spec.n_categories, len(CATEGORIES) + len(TARGET_CLASSES) + N_TIERS


def policy_inputs(xp, obs: dict, spec: EnvSpec) -> Inputs:
    permissions = obs["permissions"]
    dense = xp.concatenate([obs["risk"].astype(xp.float32), obs["tags"].astype(xp.float32),
                            obs["recent"].astype(xp.float32) / xp.float32(spec.recent_window),
                            obs["progress"].astype(xp.float32),
                            xp.asarray(obs["alerts"]).astype(xp.float32)[..., None] / xp.float32(ALERT_CAP),
                            (permissions == 1).astype(xp.float32), (permissions == 2).astype(xp.float32)], axis=-1)
    o_class = len(CATEGORIES)
    o_tier = o_class + len(TARGET_CLASSES)
    index = xp.stack([xp.asarray(obs["category"]).astype(xp.int32),
                      xp.asarray(obs["target_class"]).astype(xp.int32) + o_class,
                      xp.asarray(obs["tier"]).astype(xp.int32) + o_tier], axis=-1)
    return Inputs(dense, index)


def actor(xp, params: dict, inputs: Inputs, mask):
    """(masked policy logits, shared hidden layer). Invalid actions get a large negative logit
    (not -inf: no NaN in the entropy). The runtime needs no more than this."""
    e = params["embed"]
    h = xp.tanh(inputs.dense @ e["w"] + e["b"] + e["table"][inputs.index].sum(axis=-2))
    a = params["actor"]
    logits = xp.tanh(h @ a[0]["w"] + a[0]["b"]) @ a[1]["w"] + a[1]["b"]
    return xp.where(mask, logits, xp.float32(-1e9)), h


def heads(xp, params: dict, inputs: Inputs, mask):
    """(masked policy logits, value)."""
    logits, h = actor(xp, params, inputs, mask)
    c = params["critic"]
    return logits, (xp.tanh(h @ c[0]["w"] + c[0]["b"]) @ c[1]["w"] + c[1]["b"])[..., 0]


def normalize(xp, norm: dict, inputs: Inputs, enabled: bool) -> Inputs:
    """The continuous inputs scaled by running statistics (the categorical ones need none)."""
    if not enabled:
        return inputs
    x = xp.clip((inputs.dense - norm["mean"]) / xp.sqrt(norm["var"] + xp.float32(1e-8)), -10.0, 10.0)
    return Inputs(x.astype(xp.float32), inputs.index)
