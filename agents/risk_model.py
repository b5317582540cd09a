"""The risk model: a causal transformer over one test's event stream (DESIGN 3.5).

Each event (a row of `FeatureSpec.encode`) is embedded as the sum of its category, op, target
class, phase, time-delta bucket and hashed target-piece embeddings. Pre-norm transformer blocks
attend causally over a sliding window of the last `context` events, with rotary position
encoding, so the same network runs on a whole sequence (a banded causal mask) or one event at a
time (a ring-buffer key/value cache of `context` slots), and both give the same numbers.

Three heads per position:
- `lm_*`: the next event's category, op and target class (a factorised language model). The
  surprise of event t is its negative log-likelihood under the prediction made at t - 1;
- `risk`: one logit, is this event part of an attack;
- `tags`: one logit per inferred behaviour tag.

`risk_score` combines the risk logit and the surprise with a calibrator fitted on validation
data (Platt scaling on both), giving a probability in [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sandhop.agents.features import N_FIXED, PAD, FeatureSpec


@dataclass(frozen=True)
class ModelConfig:
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 4              # MLP hidden = mlp * width
    context: int = 64         # events each position attends to (itself and the previous ones)
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must split into {self.heads} heads of an even size "
                             "(rotary encoding rotates pairs)")
        for name in ("width", "layers", "heads", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- building blocks

def rotary(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotate pairs of features of x [..., T, H, D] by angles that grow with the position [T]
    (or [B, T]): dot products then depend on relative positions only."""
    d = x.shape[-1]
    freqs = 1.0 / (10000 ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions[..., None].astype(jnp.float32) * freqs            # [..., T, D/2]
    cos, sin = jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]  # [..., T, 1, D/2]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
        d = cfg.width
        self.heads, self.head_dim = cfg.heads, d // cfg.heads
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
        self.out = nnx.Linear(d, d, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, cfg.mlp * d, rngs=rngs)
        self.down = nnx.Linear(cfg.mlp * d, d, rngs=rngs)
        self.rate = cfg.dropout

    def _qkv(self, h: jax.Array, positions: jax.Array):
        *lead, _ = h.shape
        q, k, v = jnp.split(self.qkv(h), 3, axis=-1)
        shape = (*lead, self.heads, self.head_dim)
        q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        return rotary(q, positions), rotary(k, positions), v

    def _drop(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        # explicit keys keep the forward pass a pure function of (params, inputs, key)
        if key is None or self.rate == 0:
            return x
        keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), 0.0)

    def _finish(self, x: jax.Array, attended: jax.Array, key: jax.Array | None) -> jax.Array:
        k1, k2 = jax.random.split(key) if key is not None else (None, None)
        x = x + self._drop(self.out(attended), k1)
        return x + self._drop(self.down(jax.nn.gelu(self.up(self.norm2(x)))), k2)

    def __call__(self, x: jax.Array, mask: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """x [B, T, d]; mask [T, T] or [B, T, T] (True: may attend); `key` enables dropout."""
        positions = jnp.arange(x.shape[1])
        q, k, v = self._qkv(self.norm1(x), positions)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim)
        scores = jnp.where(mask[..., None, :, :] if mask.ndim == 3 else mask, scores, -1e30)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        return self._finish(x, attended.reshape(x.shape), key)

    def step(self, x: jax.Array, k_cache: jax.Array, v_cache: jax.Array, position: jax.Array):
        """One event per sequence: x [B, d], caches [B, C, H, Dh], position [] (absolute)."""
        context = k_cache.shape[1]
        q, k, v = self._qkv(self.norm1(x)[:, None, :], position[None])
        slot = position % context
        k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k, slot, axis=1)
        v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v, slot, axis=1)
        filled = jnp.arange(context) <= position                              # slots written so far
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_cache) / jnp.sqrt(self.head_dim)
        scores = jnp.where(filled[None, None, None, :], scores, -1e30)
        attended = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v_cache)
        out = self._finish(x[:, None, :], attended.reshape(x.shape[0], 1, -1), None)
        return out[:, 0], k_cache, v_cache


class Cache(NamedTuple):
    keys: jax.Array      # [layers, B, C, H, Dh]
    values: jax.Array    # [layers, B, C, H, Dh]
    position: jax.Array  # [] int32: absolute position of the next event


class RiskModel(nnx.Module):
    def __init__(self, spec: FeatureSpec, cfg: ModelConfig, *, rngs: nnx.Rngs) -> None:
        d = cfg.width
        self.spec_json, self.cfg = spec.to_json(), cfg
        self.category = nnx.Embed(spec.n_categories, d, rngs=rngs)
        self.op = nnx.Embed(spec.n_ops, d, rngs=rngs)
        self.target_class = nnx.Embed(spec.n_classes, d, rngs=rngs)
        self.phase = nnx.Embed(spec.n_phases, d, rngs=rngs)
        self.dt = nnx.Embed(spec.dt_buckets, d, rngs=rngs)
        self.piece = nnx.Embed(spec.piece_buckets, d, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.layers)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)
        self.lm_category = nnx.Linear(d, spec.n_categories, rngs=rngs)
        self.lm_op = nnx.Linear(d, spec.n_ops, rngs=rngs)
        self.lm_class = nnx.Linear(d, spec.n_classes, rngs=rngs)
        self.risk = nnx.Linear(d, 1, rngs=rngs)
        self.tags = nnx.Linear(d, len(spec.tags), rngs=rngs)

    @property
    def spec(self) -> FeatureSpec:
        return FeatureSpec.from_json(self.spec_json)

    def embed(self, x: jax.Array) -> jax.Array:
        """x [..., width] int -> [..., d]; padded pieces (0) add nothing."""
        pieces = x[..., N_FIXED:]
        piece_sum = jnp.sum(self.piece(pieces) * (pieces != PAD)[..., None], axis=-2)
        return (self.category(x[..., 0]) + self.op(x[..., 1]) + self.target_class(x[..., 2])
                + self.phase(x[..., 3]) + self.dt(x[..., 4]) + piece_sum)

    def heads(self, h: jax.Array) -> dict[str, jax.Array]:
        h = self.norm(h)
        return {"lm_category": self.lm_category(h), "lm_op": self.lm_op(h), "lm_class": self.lm_class(h),
                "risk": self.risk(h)[..., 0], "tags": self.tags(h), "hidden": h}

    def __call__(self, x: jax.Array, mask: jax.Array | None = None, *, key: jax.Array | None = None
                 ) -> dict[str, jax.Array]:
        """x [B, T, width] int32 (right-padded with 0) -> per-position outputs. The default mask
        is causal within the sliding window; `key` turns dropout on (training)."""
        if mask is None:
            t = x.shape[1]
            i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
            mask = (j <= i) & (i - j < self.cfg.context)
        h = self.embed(x)
        keys = jax.random.split(key, len(self.blocks)) if key is not None else [None] * len(self.blocks)
        for block, k in zip(self.blocks, keys):
            h = block(h, mask, k)
        return self.heads(h)

    def init_cache(self, batch: int) -> Cache:
        shape = (self.cfg.layers, batch, self.cfg.context, self.cfg.heads, self.cfg.width // self.cfg.heads)
        return Cache(jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros((), jnp.int32))

    def step(self, x: jax.Array, cache: Cache) -> tuple[dict[str, jax.Array], Cache]:
        """One event per sequence, x [B, width] -> its outputs, and the cache after it."""
        h = self.embed(x)
        keys, values = [], []
        for layer, block in enumerate(self.blocks):
            h, k, v = block.step(h, cache.keys[layer], cache.values[layer], cache.position)
            keys.append(k)
            values.append(v)
        return self.heads(h), Cache(jnp.stack(keys), jnp.stack(values), cache.position + 1)


# --------------------------------------------------------------------------- losses and scores

def next_event_nll(out: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """Surprise of each event t >= 1 under the prediction at t - 1: [B, T] (t = 0 gets 0)."""
    def nll(logits, target):
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.take_along_axis(logp, target[:, 1:, None], axis=-1)[..., 0]
    total = nll(out["lm_category"], x[..., 0]) + nll(out["lm_op"], x[..., 1]) + nll(out["lm_class"], x[..., 2])
    return jnp.pad(total, ((0, 0), (1, 0)))


def next_event_entropy(out: dict[str, jax.Array]) -> jax.Array:
    """Entropy of the prediction each event t >= 1 was scored under (made at t - 1): [B, T].
    Surprise minus entropy is how much more surprising an event was than the model expected
    anything there to be."""
    def entropy(logits):
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    total = entropy(out["lm_category"]) + entropy(out["lm_op"]) + entropy(out["lm_class"])
    return jnp.pad(total, ((0, 0), (1, 0)))


def losses(out: dict[str, jax.Array], x: jax.Array, malicious: jax.Array, tags: jax.Array,
           weights: dict[str, float], *, valid: jax.Array | None = None,
           predicted: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted sum of: LM loss on benign next events (the model of a *normal* test), risk BCE
    and tag BCE (tags only on malicious events, where they are defined). `valid` marks real
    events (default: not padding), `predicted` the events that have a prediction before them
    (default: every valid event but the first)."""
    valid = (x[..., 0] != PAD).astype(jnp.float32) if valid is None else valid.astype(jnp.float32)
    predicted = valid.at[:, 0].set(0.0) if predicted is None else predicted.astype(jnp.float32)
    lm_mask = predicted * (1.0 - malicious)
    lm = jnp.sum(next_event_nll(out, x) * lm_mask) / jnp.maximum(jnp.sum(lm_mask), 1.0)
    risk = jnp.sum(_bce(out["risk"], malicious) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    tag_mask = valid * malicious
    tag = jnp.sum(jnp.mean(_bce(out["tags"], tags), axis=-1) * tag_mask) / jnp.maximum(jnp.sum(tag_mask), 1.0)
    total = weights.get("lm", 1.0) * lm + weights.get("risk", 1.0) * risk + weights.get("tags", 0.5) * tag
    return total, {"loss": total, "lm": lm, "risk": risk, "tags": tag}


def _bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


@dataclass(frozen=True)
class Calibrator:
    """risk score = sigmoid(a * risk_logit + b * surprise + c), fitted on validation events."""

    a: float = 1.0
    b: float = 0.0
    c: float = 0.0

    def __call__(self, risk_logit, surprise):
        z = self.a * np.asarray(risk_logit, np.float64) + self.b * np.asarray(surprise, np.float64) + self.c
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    @classmethod
    def fit(cls, risk_logit: np.ndarray, surprise: np.ndarray, labels: np.ndarray, steps: int = 500) -> "Calibrator":
        """Logistic regression on the two features (Newton steps; a handful of parameters)."""
        X = np.stack([np.asarray(risk_logit, np.float64), np.asarray(surprise, np.float64),
                      np.ones(len(labels))], axis=1)
        y = np.asarray(labels, np.float64)
        w = np.array([1.0, 0.0, 0.0])
        for _ in range(steps):
            p = 1.0 / (1.0 + np.exp(-np.clip(X @ w, -60, 60)))
            grad = X.T @ (p - y) + 1e-4 * w
            hess = (X * (p * (1 - p))[:, None]).T @ X + 1e-4 * np.eye(3)
            delta = np.linalg.solve(hess, grad)
            w -= delta
            if np.max(np.abs(delta)) < 1e-8:
                break
        return cls(float(w[0]), float(w[1]), float(w[2]))


def expected_calibration_error(prob: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    prob, labels = np.asarray(prob, np.float64), np.asarray(labels, np.float64)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (prob >= lo) & ((prob < hi) if hi < 1 else (prob <= hi))
        if inside.any():
            ece += inside.mean() * abs(prob[inside].mean() - labels[inside].mean())
    return float(ece)
