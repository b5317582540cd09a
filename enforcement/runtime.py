"""The runtime enforcer's models: an exported artifact, verified and run with numpy alone.

`sandhop export` (`sandhop.agents.export`) writes an artifact folder:

    manifest.json        format version, sandhop version, feature spec and its hash, the event
                         model, tier templates, env settings, calibration, thresholds, training
                         configs, evaluation metrics, sha256 of every weight file
    risk.safetensors     the risk transformer (names as in the Flax model: blocks.0.qkv.kernel)
    policy.safetensors   the sandbox manager's network and its input normaliser

`Artifact.load` refuses anything it cannot vouch for: a missing or corrupt weight file, a hash
that does not match, another format version, a feature spec or event model other than this
sandhop's, tier templates that changed since training. There is no silent fallback; a static
tier instead of the artifact is an explicit choice (`--sandhop-fallback-tier`).

`Manager` is what runs per event in the pytest process: the risk model one event at a time
(a ring-buffer key/value cache of the model's context, as in `RiskModel.step`), the observation
the Gymnasium env would give (`sandhop.envs.spec`), the policy's greedy action, and the action
carried out on the test's `SandboxConfig` (`spec.apply_action`); the one `PolicyEngine` then
decides the event under that config, in the guard.

The fast path: at a quiet event (every tier allows it, granted or not; `sandhop.envs.spec`) the
policy may only stay, as in training, so the manager neither scores it nor asks the policy; the
risk model reads it together with the next event that needs a score (`RiskRuntime.defer`). About
nine in ten events of real suites are quiet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sandhop.agents.features import N_FIXED, PAD, FeatureError, FeatureSpec, dt_bucket_one
from sandhop.agents.network import Inputs, actor, normalize
from sandhop.enforcement.engine import NEVER_QUIET, TIERS, PolicyEngine, SandboxConfig
from sandhop.enforcement.events import CATEGORIES, INFERRED_TAGS, PHASES, TARGET_CLASSES
from sandhop.envs.spec import (ALERT_CAP, GRANTED, PROGRESS_EVENTS, REVOKED, EnvSpec, action_mask, add_alert,
                               apply_action, decision_row, decisive, is_quiet, progress_of, push_recent)

FORMAT_VERSION = 2   # 2: the policy reads `alerts`, and acts where an action changes the decision
ROTARY_TABLE = 1 << 15   # positions whose rotary angles are kept in a table (a few MB at most)
MANIFEST = "manifest.json"
RISK_FILE, POLICY_FILE = "risk.safetensors", "policy.safetensors"
EVENT_MODEL = {"categories": CATEGORIES, "target_classes": TARGET_CLASSES, "phases": PHASES,
               "tags": INFERRED_TAGS}


class ArtifactError(ValueError):
    """An artifact that cannot be used as it is (says what is wrong and how to fix it)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tier_templates(engine: PolicyEngine | None = None) -> dict[str, str]:
    """sha256 of each built-in tier's rules as this sandhop's engine reads them."""
    engine = engine or PolicyEngine()
    out = {}
    for tier in TIERS:
        policy = engine.load_tier(tier)
        text = f"default {policy.default}\n" + "".join(f"{r.rule_id} {r.text}\n" for r in policy.rules)
        out[tier] = hashlib.sha256(text.encode()).hexdigest()
    return out


def event_model_hash() -> str:
    return hashlib.sha256(json.dumps({k: list(v) for k, v in EVENT_MODEL.items()}, sort_keys=True).encode()
                          ).hexdigest()[:16]


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc}); re-export the artifact") from None


# --------------------------------------------------------------------------- the risk model in numpy

def _normalize(x: np.ndarray, inv_n: float) -> np.ndarray:
    """Layer norm without its affine part (folded into the next matmul at load time)."""
    d = x - x.sum() * inv_n
    return d * np.float32(1.0 / math.sqrt(float(d @ d) * inv_n + 1e-6))


def _normalize_rows(x: np.ndarray, inv_n: float) -> np.ndarray:
    """`_normalize` of each row."""
    d = x - x.sum(axis=1, keepdims=True) * np.float32(inv_n)
    return d * (np.float32(1.0) / np.sqrt((d * d).sum(axis=1, keepdims=True) * np.float32(inv_n) + np.float32(1e-6)))


def _fold(scale: np.ndarray, bias: np.ndarray, kernel: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(LN(x) * scale + bias) @ kernel + b == LN(x) @ kernel' + b'."""
    k64 = kernel.astype(np.float64)
    return ((scale.astype(np.float64)[:, None] * k64).astype(np.float32),
            (bias.astype(np.float64) @ k64 + b).astype(np.float32))


@dataclass
class RiskState:
    """One test's risk-model state: the key/value ring buffer (keys [L, H, Dh, C] and values
    [L, H, C, Dh], laid out for the two attention matmuls), the next position, and the
    prediction the next event will be scored under."""

    keys: np.ndarray
    values: np.ndarray
    position: int = 0
    prediction: np.ndarray | None = None   # LM logits (category, op, class) for the next event
    last_t_ns: int | None = None
    node: int = 0   # where this test's events so far lie in the prefix cache (0: its root, -1: off it)
    # events read but not yet run through the network (quiet ones: run in one batch when the
    # next event needs a score); rows and embeddings in buffers that grow by doubling
    pending: int = 0
    pending_rows: np.ndarray | None = None
    pending_embedded: np.ndarray | None = None


class RiskRuntime:
    """`RiskModel.step` in numpy, plus the calibrated score: per event, (risk in [0, 1], tag
    probabilities, risk logit, surprise)."""

    def __init__(self, weights: dict[str, np.ndarray], spec: FeatureSpec, model: dict, calibrator: dict,
                 cache_limit: int = 20000) -> None:
        self.spec = spec
        self.width, self.layers = int(model["width"]), int(model["layers"])
        self.n_heads, self.context = int(model["heads"]), int(model["context"])
        self.head_dim = self.width // self.n_heads
        self.calibrator = (float(calibrator["a"]), float(calibrator["b"]), float(calibrator["c"]))
        try:
            w = {k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()}
            self.tables = [w[f"{name}.embedding"] for name in ("category", "op", "target_class", "phase", "dt")]
            self.piece = w["piece.embedding"]
            names = ("lm_category", "lm_op", "lm_class", "risk", "tags")
            sizes = [w[f"{n}.bias"].shape[0] for n in names]
            self.blocks = []
            for i in range(self.layers):
                def get(part, name):
                    return w[f"blocks.{i}.{part}.{name}"]
                qkv_w, qkv_b = _fold(get("norm1", "scale"), get("norm1", "bias"), get("qkv", "kernel"), get("qkv", "bias"))
                # the attention's 1/sqrt(head size) folded into q (rotation is linear)
                qkv_w[:, :self.width] *= np.float32(1.0 / math.sqrt(self.head_dim))
                qkv_b[:self.width] *= np.float32(1.0 / math.sqrt(self.head_dim))
                up_w, up_b = _fold(get("norm2", "scale"), get("norm2", "bias"), get("up", "kernel"), get("up", "bias"))
                # gelu's factor 1/2 folded into the down projection
                self.blocks.append((qkv_w, qkv_b, get("out", "kernel"), get("out", "bias"), up_w, up_b,
                                    get("down", "kernel") * np.float32(0.5), get("down", "bias")))
            # one matmul for every head: LM (category, op, class), risk, tags
            self.head_w, self.head_b = _fold(w["norm.scale"], w["norm.bias"],
                                             np.concatenate([w[f"{n}.kernel"] for n in names], axis=1),
                                             np.concatenate([w[f"{n}.bias"] for n in names]))
        except KeyError as exc:
            raise ArtifactError(f"{RISK_FILE} lacks the tensor {exc.args[0]!r}; re-export the artifact") from None
        expected = {"category.embedding": spec.n_categories, "op.embedding": spec.n_ops,
                    "target_class.embedding": spec.n_classes, "phase.embedding": spec.n_phases,
                    "dt.embedding": spec.dt_buckets, "piece.embedding": spec.piece_buckets}
        for name, rows in expected.items():
            if w[name].shape != (rows, self.width):
                raise ArtifactError(f"{RISK_FILE}: {name} has shape {w[name].shape}, the feature spec needs "
                                    f"({rows}, {self.width}); the artifact is inconsistent, re-export it")
        edges = np.cumsum([0] + sizes)
        self.cuts = [slice(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]
        self.lm_starts, self.lm_sizes = edges[:3].astype(np.intp), np.asarray(sizes[:3], np.intp)
        # Rotary encoding as x * cos + swap(x) * sin, where swap exchanges each pair and negates
        # its first element. Angles in float64: at position 10^4 a float32 angle is off by
        # 10^-3 rad, while training (windows of a few hundred positions) never saw such error.
        self.freqs = 1.0 / (10000 ** (np.arange(0, self.head_dim, 2, dtype=np.float32) / self.head_dim)).astype(np.float64)
        self.swap = np.arange(self.head_dim).reshape(-1, 2)[:, ::-1].reshape(-1)
        self.sign = np.tile(np.array([-1.0, 1.0], np.float32), self.head_dim // 2)
        self._cos = self._sin = np.zeros((0, self.head_dim), np.float32)
        self.inv_n = 1.0 / self.width
        # Prefix cache: tests of a suite often begin with the same events (fixtures, imports).
        # The model's state after a prefix depends on the encoded events alone, so a trie of
        # prefixes holds, per event, its key/value columns and outputs: a hit replays them
        # (exact) instead of running the network. Bounded; when full, new prefixes run uncached.
        # Nodes are rows of preallocated arrays and keys are bytes, so caching creates no objects
        # the garbage collector tracks (a suite's leak test counts them: gc.get_objects()).
        self.prefixes: dict[bytes, int] = {}
        self.cached, self.cache_limit = 0, cache_limit
        n = cache_limit + 1
        self._kv = np.zeros((n, 2, self.layers, self.n_heads, self.head_dim), np.float32)
        self._lm = np.zeros((n, int(edges[3])), np.float32)
        self._tags = np.zeros((n, sizes[4]), np.float32)
        self._scalars = np.zeros((n, 3), np.float64)   # risk, logit, surprise
        self.hits = self.misses = 0
        self._threads = None
        self.c1 = np.float32(math.sqrt(2 / math.pi))
        self.c2 = np.float32(math.sqrt(2 / math.pi) * 0.044715)

    def _rotary(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin (the pair sign folded in) [n, head size] of positions start .. start+n-1,
        from tables grown by doubling up to ROTARY_TABLE positions (computed beyond)."""
        end = start + n
        if end > len(self._cos) and end <= ROTARY_TABLE:
            size = min(max(end, 2 * len(self._cos), 256), ROTARY_TABLE)
            self._cos, self._sin = self._angles(np.arange(size))
        if end <= len(self._cos):
            return self._cos[start:end], self._sin[start:end]
        return self._angles(np.arange(start, end))

    def _angles(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        angles = positions.astype(np.float64)[:, None] * self.freqs[None, :]
        return (np.repeat(np.cos(angles), 2, axis=1).astype(np.float32),
                np.repeat(np.sin(angles), 2, axis=1).astype(np.float32) * self.sign)

    def new_state(self) -> RiskState:
        return RiskState(np.zeros((self.layers, self.n_heads, self.head_dim, self.context), np.float32),
                         np.zeros((self.layers, self.n_heads, self.context, self.head_dim), np.float32))

    def embed(self, row: np.ndarray) -> np.ndarray:
        """The event's embedding without its time delta (cacheable per distinct event)."""
        t = self.tables
        x = t[0][row[0]] + t[1][row[1]] + t[2][row[2]] + t[3][row[3]]
        for piece in row[N_FIXED:]:
            if piece != PAD:
                x = x + self.piece[piece]
        return x

    def defer(self, state: RiskState, row: np.ndarray, embedded: np.ndarray) -> None:
        """Read an event without scoring it now: the next `step` runs it through the network
        first, in one batch with the other deferred ones (the same numbers as stepping each)."""
        n = state.pending
        if state.pending_rows is None or n == len(state.pending_rows):
            size = max(64, 2 * n)
            rows, embedded_all = np.zeros((size, len(row)), row.dtype), np.zeros((size, self.width), np.float32)
            if n:
                rows[:n], embedded_all[:n] = state.pending_rows[:n], state.pending_embedded[:n]
            state.pending_rows, state.pending_embedded = rows, embedded_all
        state.pending_rows[n] = row
        state.pending_embedded[n] = embedded
        state.pending = n + 1

    def step(self, state: RiskState, row: np.ndarray, embedded: np.ndarray | None = None
             ) -> tuple[float, np.ndarray, float, float]:
        """Score one encoded event [width] and advance the state; `embedded`: `embed(row)`.
        Deferred events run first, so the score is what stepping through all of them gives."""
        if state.pending:
            self.defer(state, row, self.embed(row) if embedded is None else embedded)
            n, state.pending = state.pending, 0
            return self.run(state, state.pending_rows[:n], state.pending_embedded[:n])
        p = state.position
        slot = p % self.context
        node = state.node
        if node >= 0:
            key = node.to_bytes(4, "little") + row.tobytes()
            hit = self.prefixes.get(key)
            if hit is not None:
                kv = self._kv[hit]
                state.keys[:, :, :, slot] = kv[0]
                state.values[:, :, slot, :] = kv[1]
                state.prediction, state.position, state.node = self._lm[hit], p + 1, hit
                self.hits += 1
                risk, logit, surprise = self._scalars[hit]
                return float(risk), self._tags[hit], float(logit), float(surprise)
        self.misses += 1
        # (one event's vector-matrix products are too small for OpenBLAS to thread)
        return self._network_step(state, row, embedded, p, slot, node, key if node >= 0 else None)

    def _network_step(self, state: RiskState, row: np.ndarray, embedded: np.ndarray | None, p: int, slot: int,
                      node: int, key: bytes | None) -> tuple[float, np.ndarray, float, float]:
        x = (self.embed(row) if embedded is None else embedded) + self.tables[4][row[4]]
        filled = min(p + 1, self.context)
        cos, sin = self._rotary(p, 1)
        cos, sin = cos[0], sin[0]
        heads, hd, w, inv_n = self.n_heads, self.head_dim, self.width, self.inv_n
        keys_all, values_all = state.keys, state.values
        ks, vs = [], []
        for layer, (qkv_w, qkv_b, out_w, out_b, up_w, up_b, down_w, down_b) in enumerate(self.blocks):
            qkv = _normalize(x, inv_n) @ qkv_w + qkv_b
            qk = qkv[:2 * w].reshape(2 * heads, hd)
            qk = qk * cos + qk[:, self.swap] * sin
            keys, values = keys_all[layer], values_all[layer]
            ks.append(qk[heads:])
            vs.append(qkv[2 * w:].reshape(heads, hd))
            keys[:, :, slot] = ks[-1]
            values[:, slot, :] = vs[-1]
            scores = np.matmul(qk[:heads, None, :], keys[:, :, :filled])
            scores = np.exp(scores - scores.max(axis=2, keepdims=True))
            attended = np.matmul(scores / scores.sum(axis=2, keepdims=True), values[:, :filled, :])
            x = x + (attended.reshape(w) @ out_w + out_b)
            u = _normalize(x, inv_n) @ up_w + up_b
            x = x + ((u * (np.float32(1) + np.tanh(u * (self.c1 + self.c2 * u * u)))) @ down_w + down_b)
        out = _normalize(x, inv_n) @ self.head_w + self.head_b
        lm = out[:self.cuts[2].stop]
        surprise = 0.0
        if state.prediction is not None:
            surprise = float(self._surprises(state.prediction[None], row[None])[0])
        state.prediction = lm
        state.position = p + 1
        logit = float(out[self.cuts[3]][0])
        a, bb, cc = self.calibrator
        z = min(max(a * logit + bb * surprise + cc, -60.0), 60.0)
        risk = 1.0 / (1.0 + math.exp(-z))
        tags = (1.0 / (1.0 + np.exp(-out[self.cuts[4]]))).astype(np.float32)
        if node >= 0 and self.cached < self.cache_limit:
            self.cached += 1
            state.node = self.cached
            self.prefixes[key] = self.cached
            self._kv[self.cached, 0], self._kv[self.cached, 1] = ks, vs
            self._lm[self.cached], self._tags[self.cached] = lm, tags
            self._scalars[self.cached] = risk, logit, surprise
        else:
            state.node = -1
        return risk, tags, logit, surprise

    def run(self, state: RiskState, rows: np.ndarray, embedded: np.ndarray) -> tuple[float, np.ndarray, float, float]:
        """Score encoded events [n, width] in order (what `step` on each in turn gives, within
        float rounding) and advance the state: the scores of the last. Prefixes the cache knows
        are replayed from it; the rest run through the network in blocks of up to the context
        (causal attention over the key/value ring plus the block)."""
        n, j = len(rows), 0
        while j < n and state.node >= 0:
            hit = self.prefixes.get(state.node.to_bytes(4, "little") + rows[j].tobytes())
            if hit is None:
                break
            slot = state.position % self.context
            kv = self._kv[hit]
            state.keys[:, :, :, slot] = kv[0]
            state.values[:, :, slot, :] = kv[1]
            state.prediction, state.position, state.node = self._lm[hit], state.position + 1, hit
            self.hits += 1
            j += 1
        if j == n:
            risk, logit, surprise = self._scalars[state.node]
            return float(risk), self._tags[state.node], float(logit), float(surprise)
        with self._one_blas_thread():
            while j < n:
                m = min(self.context, n - j)
                last = self._block(state, rows[j:j + m], embedded[j:j + m])
                j += m
        return last

    def _one_blas_thread(self):
        """The network's matrix products on one BLAS thread. OpenBLAS splits even a block's
        small products over threads, which on a busy test machine wait for each other: ten
        times slower here (measured, 2 cores). Scoped, so the suite's own numpy keeps its
        threads."""
        if self._threads is None:
            try:
                from threadpoolctl import ThreadpoolController
                self._threads = ThreadpoolController()
            except ImportError:   # a base dependency; without it the products just run threaded
                self._threads = False
        return self._threads.limit(limits=1, user_api="blas") if self._threads else contextlib.nullcontext()

    def _block(self, state: RiskState, rows: np.ndarray, embedded: np.ndarray) -> tuple[float, np.ndarray, float, float]:
        m, p0, c = len(rows), state.position, self.context
        self.misses += m
        x = embedded + self.tables[4][rows[:, 4]]
        cos, sin = self._rotary(p0, m)
        cos, sin = cos[:, None, :], sin[:, None, :]
        heads, hd, w = self.n_heads, self.head_dim, self.width
        # keys before the block in position order (ring slots of positions p0-C .. p0-1), then
        # the block's own; query i sees the last C positions up to its own
        order = (p0 + np.arange(c)) % c
        i = np.arange(m)[:, None]
        visible = np.concatenate([(np.arange(c)[None, :] > i) & (p0 - c + np.arange(c)[None, :] >= 0),
                                  np.arange(m)[None, :] <= i], axis=1)
        slots = (p0 + np.arange(m)) % c
        ks, vs = [], []
        for layer, (qkv_w, qkv_b, out_w, out_b, up_w, up_b, down_w, down_b) in enumerate(self.blocks):
            qkv = _normalize_rows(x, self.inv_n) @ qkv_w + qkv_b
            qk = qkv[:, :2 * w].reshape(m, 2 * heads, hd)
            qk = qk * cos + qk[:, :, self.swap] * sin
            k_new, v_new = qk[:, heads:], qkv[:, 2 * w:].reshape(m, heads, hd)
            keys, values = state.keys[layer], state.values[layer]
            all_keys = np.concatenate([keys[:, :, order], k_new.transpose(1, 2, 0)], axis=2)
            all_values = np.concatenate([values[:, order, :], v_new.transpose(1, 0, 2)], axis=1)
            scores = np.matmul(qk[:, :heads].transpose(1, 0, 2), all_keys)
            scores = np.where(visible, scores, np.float32(-np.inf))
            scores = np.exp(scores - scores.max(axis=2, keepdims=True))
            attended = np.matmul(scores / scores.sum(axis=2, keepdims=True), all_values)
            keys[:, :, slots] = k_new.transpose(1, 2, 0)
            values[:, slots, :] = v_new.transpose(1, 0, 2)
            ks.append(k_new)
            vs.append(v_new)
            x = x + (attended.transpose(1, 0, 2).reshape(m, w) @ out_w + out_b)
            u = _normalize_rows(x, self.inv_n) @ up_w + up_b
            x = x + ((u * (np.float32(1) + np.tanh(u * (self.c1 + self.c2 * u * u)))) @ down_w + down_b)
        out = _normalize_rows(x, self.inv_n) @ self.head_w + self.head_b
        lm = out[:, :self.cuts[2].stop]
        logits = out[:, self.cuts[3].start].astype(np.float64)
        tags = (1.0 / (1.0 + np.exp(-out[:, self.cuts[4]]))).astype(np.float32)
        # surprise of each event under the prediction made at the event before it
        before = np.concatenate([lm[:1] if state.prediction is None else state.prediction[None], lm[:-1]])
        surprise = self._surprises(before, rows)
        if state.prediction is None:
            surprise[0] = 0.0
        a, bb, cc = self.calibrator
        risk = 1.0 / (1.0 + np.exp(-np.clip(a * logits + bb * surprise + cc, -60.0, 60.0)))
        state.prediction, state.position = lm[-1], p0 + m
        for t in range(m):
            if state.node < 0 or self.cached >= self.cache_limit:
                state.node = -1
                break
            self.cached += 1
            self.prefixes[state.node.to_bytes(4, "little") + rows[t].tobytes()] = state.node = self.cached
            self._kv[self.cached, 0] = [k[t] for k in ks]
            self._kv[self.cached, 1] = [v[t] for v in vs]
            self._lm[self.cached], self._tags[self.cached] = lm[t], tags[t]
            self._scalars[self.cached] = risk[t], logits[t], surprise[t]
        return float(risk[-1]), tags[-1], float(logits[-1]), float(surprise[-1])

    def _surprises(self, before: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """float64 [m]: -log p(category) - log p(op) - log p(class) of each event [m, width]
        under the LM logits [m, ...] made at the event before it."""
        x = before.astype(np.float64)
        top = np.maximum.reduceat(x, self.lm_starts, axis=1)
        total = np.add.reduceat(np.exp(x - np.repeat(top, self.lm_sizes, axis=1)), self.lm_starts, axis=1)
        picked = np.take_along_axis(x, self.lm_starts + rows[:, :3], axis=1)
        return (top + np.log(total) - picked).sum(axis=1)

    def dt_bucket(self, state: RiskState, t_ns: int) -> int:
        """The time-delta bucket of the test's next event, at `t_ns` (0 for a test's first event
        gets bucket 1, as `FeatureSpec.encode` gives it)."""
        dt = 0 if state.last_t_ns is None else t_ns - state.last_t_ns
        state.last_t_ns = t_ns
        return dt_bucket_one(dt, self.spec.dt_buckets)

    def encode(self, state: RiskState, features: np.ndarray, t_ns: int) -> np.ndarray:
        """The event's features with its time-delta bucket."""
        row = features.copy()
        row[4] = self.dt_bucket(state, t_ns)
        return row


# --------------------------------------------------------------------------- the policy in numpy

class PolicyRuntime:
    """The exported sandbox manager's greedy policy (`sandhop.agents.network`)."""

    def __init__(self, weights: dict[str, np.ndarray], spec: EnvSpec, normalize_obs: bool) -> None:
        try:
            self.params = {"embed": {k: weights[f"embed.{k}"] for k in ("w", "b", "table")},
                           "actor": [{k: weights[f"actor.{i}.{k}"] for k in ("w", "b")} for i in range(2)],
                           "critic": [{k: weights[f"critic.{i}.{k}"] for k in ("w", "b")} for i in range(2)]}
            self.norm = {k: weights[f"norm.{k}"] for k in ("mean", "var", "count")}
        except KeyError as exc:
            raise ArtifactError(f"{POLICY_FILE} lacks the tensor {exc.args[0]!r}; re-export the artifact") from None
        if self.params["actor"][1]["w"].shape[1] != spec.n_actions:
            raise ArtifactError(f"{POLICY_FILE}: the policy has {self.params['actor'][1]['w'].shape[1]} actions, "
                                f"the env settings {spec.n_actions}; the artifact is inconsistent, re-export it")
        self.spec = spec
        self.normalize_obs = normalize_obs
        self._window = np.float32(spec.recent_window)
        self._o_class, self._o_tier = len(CATEGORIES), len(CATEGORIES) + len(TARGET_CLASSES)
        self._n_tags = len(INFERRED_TAGS)

    def act_fast(self, risk: float, tags: np.ndarray, category: int, cls: int, level: int, permissions: np.ndarray,
                 denied: int, redirected: int, progress, alerts: int, mask: np.ndarray) -> int:
        """The greedy action for the observation's parts and the action mask, without building
        the observation (it assembles the inputs `network.policy_inputs` would, in the same
        float32 steps; the tests compare the actions with the JAX policy's). No value head."""
        t, k = self._n_tags, self.spec.n_categories
        dense = np.empty(5 + t + 2 * k, np.float32)
        dense[0] = risk
        dense[1:1 + t] = tags
        dense[1 + t] = np.float32(denied) / self._window
        dense[2 + t] = np.float32(redirected) / self._window
        dense[3 + t] = progress
        dense[4 + t] = np.float32(alerts) / np.float32(ALERT_CAP)
        dense[5 + t:5 + t + k] = permissions == 1
        dense[5 + t + k:] = permissions == 2
        index = np.array([category, cls + self._o_class, min(level, len(TIERS) - 1) + self._o_tier], np.int32)
        inputs = normalize(np, self.norm, Inputs(dense, index), self.normalize_obs)
        return int(np.argmax(actor(np, self.params, inputs, mask)[0]))


# --------------------------------------------------------------------------- the artifact

@dataclass
class Artifact:
    root: Path
    manifest: dict
    feature_spec: FeatureSpec
    env_spec: EnvSpec
    risk: RiskRuntime
    policy: PolicyRuntime

    @property
    def base_tier(self) -> str:
        return self.env_spec.base_tier

    @property
    def name(self) -> str:
        return f"{self.root.name} (sandhop artifact v{self.manifest.get('format_version')}, " \
               f"{self.manifest.get('created', '?')})"

    @classmethod
    def load(cls, root: str | Path, engine: PolicyEngine | None = None) -> "Artifact":
        root = Path(root).expanduser()
        manifest = read_manifest(root)
        verify_files(root, manifest)
        try:
            fspec = FeatureSpec.from_json(manifest["feature_spec"])
        except (FeatureError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{root / MANIFEST}: its feature spec cannot be read ({exc}); re-export the "
                                "artifact with this sandhop") from None
        if fspec.fingerprint() != manifest.get("feature_fingerprint"):
            raise ArtifactError(f"{root / MANIFEST}: the feature spec does not match its recorded hash "
                                f"({fspec.fingerprint()} vs {manifest.get('feature_fingerprint')}): the manifest "
                                "was edited; re-export the artifact")
        differs = [k for k, ours in EVENT_MODEL.items() if tuple(getattr(fspec, k)) != tuple(ours)]
        if differs:
            raise ArtifactError(f"{root}: the artifact's feature spec does not match this sandhop's event model "
                                f"(it differs in {', '.join(differs)}): the models were trained on another event "
                                "model; retrain and re-export with this sandhop, or run a static tier with "
                                "--sandhop-fallback-tier TIER")
        ours = tier_templates(engine)
        changed = [t for t, h in manifest.get("tiers", {}).items() if ours.get(t) != h]
        if changed or set(manifest.get("tiers", {})) != set(ours):
            raise ArtifactError(f"{root}: the tier templates changed since the artifact was trained (tiers "
                                f"{', '.join(changed) or 'added or removed'}), so its policy learned other "
                                "decisions; retrain and re-export, or run a static tier with --sandhop-fallback-tier TIER")
        try:
            env_spec = EnvSpec.from_config(manifest["env"])
            risk = RiskRuntime(_load_safetensors(root / RISK_FILE), fspec, manifest["risk"]["model"],
                               manifest["risk"]["calibrator"])
            policy = PolicyRuntime(_load_safetensors(root / POLICY_FILE), env_spec,
                                   bool(manifest["agent"]["normalize_obs"]))
        except (KeyError, TypeError) as exc:
            raise ArtifactError(f"{root / MANIFEST} lacks {exc}; re-export the artifact with this sandhop") from None
        except ValueError as exc:
            if isinstance(exc, ArtifactError):
                raise
            raise ArtifactError(f"{root / MANIFEST}: {exc}; re-export the artifact") from None
        return cls(root, manifest, fspec, env_spec, risk, policy)


def read_manifest(root: Path) -> dict:
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact folder; make one with `sandhop export --risk RUN --agent RUN "
                            f"--out {root}`")
    path = root / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST}: not a sandhop artifact; make one with `sandhop export`")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a manifest (a JSON object); re-export the artifact")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{root}: artifact format version {version!r}, this sandhop reads version "
                            f"{FORMAT_VERSION}; re-export it with this sandhop, or use the sandhop that wrote it "
                            f"({manifest.get('sandhop_version', 'unknown')})")
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or {RISK_FILE, POLICY_FILE} - set(files):
        raise ArtifactError(f"{root / MANIFEST} does not list the sha256 of {RISK_FILE} and {POLICY_FILE}; "
                            "re-export the artifact")
    for name, expected in files.items():
        path = root / name
        if Path(name).name != name:
            raise ArtifactError(f"{root / MANIFEST} names a weight file outside the artifact ({name!r})")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing; the artifact is incomplete: copy it whole, or re-export it")
        actual = sha256_file(path)
        if actual != expected:
            raise ArtifactError(f"{path}: sha256 {actual[:16]}… does not match the manifest's {str(expected)[:16]}…; "
                                "the file is corrupt or was changed: re-export the artifact")


# --------------------------------------------------------------------------- per test, per event

@dataclass
class _Episode:
    test_id: str
    config: SandboxConfig
    risk: RiskState
    permissions: np.ndarray
    denied: np.uint32 = np.uint32(0)
    redirected: np.uint32 = np.uint32(0)
    events: int = 0
    quiet: int = 0      # events on the fast path (not scored, no action)
    actions: int = 0
    alerts: int = 0     # the observation's `alerts` (spec.add_alert)
    max_risk: float = 0.0
    steps: list = field(default_factory=list)
    # quiet events not yet encoded: (category, op, target, class, phase) and the time-delta
    # bucket, in parallel lists of strings and ints (no per-event object the gc tracks); most
    # tests end before another scored event needs them, and then they are never encoded
    waiting: tuple[list, ...] = field(default_factory=lambda: ([], [], [], [], [], []))


class Manager:
    """The artifact's risk model and policy, driving one `SandboxConfig` per test (or collector).

    `event(...)` is called by the guard before it decides an event: it scores the event, builds
    the observation, takes the policy's action and returns the config to decide under. After the
    decision, `decided(effect)` records it (the `recent` window of the next observation). A test's
    first event starts an episode from the config the test began with (the base tier, or its
    marker); nothing carries over between tests."""

    def __init__(self, artifact: Artifact, engine: PolicyEngine, *, keep_steps: bool = False) -> None:
        self.artifact = artifact
        self.engine = engine
        self.spec = artifact.env_spec
        self.fspec = artifact.feature_spec
        self.cat_index = {c: i for i, c in enumerate(CATEGORIES)}
        self.cls_index = {c: i for i, c in enumerate(TARGET_CLASSES)}
        self.actions = self.spec.action_names()
        self.keep_steps = keep_steps
        self.episode: _Episode | None = None
        self._features: dict[tuple, tuple] = {}
        self._actions: dict[bytes, int] = {}
        self._quiet: dict[str, bool] = {}
        self._masks: dict[tuple, np.ndarray] = {}
        self._configs: dict = {}
        self._slots = self.spec.category_slots()
        self.events = self.quiet_events = 0

    def begin(self, test_id: str, config: SandboxConfig) -> None:
        """Start an episode from `config`; whole categories it grants or revokes (a child process
        starts from its parent's config, grants and revocations the parent's manager made included)
        are the episode's permissions."""
        permissions = np.array([GRANTED if c in config.grants else REVOKED if c in config.revocations else 0
                                for c in self.spec.categories], np.int64)
        self.episode = _Episode(test_id, config, self.artifact.risk.new_state(), permissions)

    def features(self, category: str, op: str, target: str, cls: str, phase: str) -> tuple[np.ndarray, np.ndarray]:
        """The event's features and embedding (both cached: the same operations recur)."""
        key = (category, op, target, cls, phase)
        hit = self._features.get(key)
        if hit is None:
            if len(self._features) > 65536:
                self._features.clear()
            row = self.fspec.encode_event(category, op, target, cls, phase)
            hit = self._features[key] = (row, self.artifact.risk.embed(row))
        return hit

    def _row(self, category: str, op: str, target: str, cls: str, phase: str, bucket: int) -> tuple[np.ndarray, np.ndarray]:
        """The event's features with its time-delta bucket, and its embedding."""
        features, embedded = self.features(category, op, target, cls, phase)
        row = features.copy()
        row[4] = bucket
        return row, embedded

    def quiet(self, category: str, target: str, cls: str) -> bool:
        """Whether the event is quiet now: every tier allows it (asked of the engine once per
        distinct event) and its category is not revoked in this test."""
        key = f"{category}\0{cls}\0{target}"
        known = self._quiet.get(key)
        slot = self._slots[self.cat_index[category]]
        if known is None:
            if len(self._quiet) > 65536:
                self._quiet.clear()
            known = self._quiet[key] = self.engine.quiet(category, target, cls)
        return known and bool(is_quiet(True, self.episode.permissions[slot] if slot >= 0 else 0))

    def mask(self, category: str, target: str, cls: str, quiet: bool = False) -> np.ndarray:
        """bool [A]: the valid actions at the event (`spec.action_mask`; at one that is not quiet,
        those that change its decision, `spec.decisive`, from its effects under every tier and
        permission, asked of the engine once per distinct event)."""
        ep = self.episode
        level = min(ep.config.level, len(TIERS) - 1)   # a custom tier may rank above lockdown
        mask = action_mask(np, level, ep.permissions, self.spec.n_categories, quiet)
        if quiet:
            return mask
        key = (category, cls, target, level, ep.permissions.tobytes())   # the mask is a function of these
        known = self._masks.get(key)
        if known is None:
            slot = int(self._slots[self.cat_index[category]])
            row = decision_row(self.engine, category, target, cls, slot >= 0, self._configs)
            if len(self._masks) > 65536:
                self._masks.clear()
            known = self._masks[key] = mask & decisive(np, row, level, ep.permissions, slot, category in NEVER_QUIET)
        return known

    def observe(self, category: str, cls: str, risk: float, tags: np.ndarray, mask: np.ndarray) -> dict:
        ep = self.episode
        level = ep.config.level
        return {"risk": np.array([risk], np.float32), "tags": tags,
                "category": np.int64(self.cat_index[category]), "target_class": np.int64(self.cls_index[cls]),
                "tier": np.int64(min(level, len(TIERS) - 1)), "permissions": ep.permissions.copy(),
                "recent": np.array([int(ep.denied).bit_count(), int(ep.redirected).bit_count()], np.int64),
                "progress": np.array([progress_of(ep.events)], np.float32), "alerts": np.int64(ep.alerts),
                "action_mask": mask.astype(np.int8)}

    def event(self, category: str, op: str, target: str, cls: str, phase: str, t_ns: int) -> tuple[SandboxConfig, dict]:
        """The config this event is decided under, and what the models said (for the audit):
        risk (None on the fast path), action and tier."""
        ep = self.episode
        risk_model = self.artifact.risk
        bucket = risk_model.dt_bucket(ep.risk, t_ns)
        if self.quiet(category, target, cls):
            if self.keep_steps:
                nan = np.full(len(INFERRED_TAGS), np.nan, np.float32)
                ep.steps.append({"risk": None, "action": "stay", "tier": ep.config.tier, "quiet": True,
                                 "obs": self.observe(category, cls, np.nan, nan,
                                                     self.mask(category, target, cls, quiet=True))})
            for column, value in zip(ep.waiting, (category, op, target, cls, phase, bucket)):
                column.append(value)
            ep.events += 1
            ep.quiet += 1
            self.events += 1
            self.quiet_events += 1
            return ep.config, {"risk": None, "action": "stay", "tier": ep.config.tier}
        if ep.waiting[0]:
            for waiting in zip(*ep.waiting):
                risk_model.defer(ep.risk, *self._row(*waiting))
            for column in ep.waiting:
                column.clear()
        risk, tags, logit, surprise = risk_model.step(ep.risk, *self._row(category, op, target, cls, phase, bucket))
        # The action is a function of the observation alone; this key determines it exactly
        # (the recent-decision bits and the capped event count are finer than what it shows).
        # (bytes: a key creates no object the garbage collector tracks; see RiskRuntime)
        mask = self.mask(category, target, cls)
        key = b"".join((struct.pack("<dqqqqq", risk, ep.config.level, int(ep.denied), int(ep.redirected),
                                    min(ep.events, PROGRESS_EVENTS), ep.alerts), tags.tobytes(), ep.permissions.tobytes(),
                        mask.tobytes(), f"{category}\0{cls}".encode()))
        obs = self.observe(category, cls, risk, tags, mask) if self.keep_steps else None
        action = self._actions.get(key)
        if action is None:
            action = self.artifact.policy.act_fast(risk, tags, self.cat_index[category], self.cls_index[cls],
                                                   ep.config.level, ep.permissions, int(ep.denied).bit_count(),
                                                   int(ep.redirected).bit_count(), progress_of(ep.events), ep.alerts,
                                                   mask)
            if len(self._actions) > 65536:
                self._actions.clear()
            self._actions[key] = action
        if action:
            ep.config, _, _ = apply_action(self.engine, ep.config, ep.permissions, action, self.spec)
            ep.actions += 1
        ep.events += 1
        ep.alerts = int(add_alert(np, np.int64(ep.alerts), np.float32(risk), False))
        ep.max_risk = max(ep.max_risk, risk)
        self.events += 1
        said = {"risk": risk, "action": self.actions[action], "tier": ep.config.tier}
        if self.keep_steps:
            ep.steps.append({**said, "quiet": False, "obs": obs, "logit": logit, "surprise": surprise, "tags": tags})
        return ep.config, said

    def decided(self, effect: str) -> None:
        ep = self.episode
        if effect == "allow" and not ep.denied and not ep.redirected:
            return   # an empty window stays empty (most events)
        window = self.spec.recent_window
        ep.denied = push_recent(np, ep.denied, np.bool_(effect == "deny"), window)
        ep.redirected = push_recent(np, ep.redirected, np.bool_(effect == "redirect"), window)

    def replay(self, test_id: str, events: dict, config: SandboxConfig | None = None) -> list[str]:
        """Run a recorded test (event columns category, op, target, target_class, phase, t_ns,
        in order) through the manager and the engine, as the guard would live: the decision
        effect of each event."""
        self.begin(test_id, config or self.engine.config(self.spec.base_tier))
        effects = []
        for cat, op, target, cls, phase, t in zip(events["category"], events["op"], events["target"],
                                                  events["target_class"], events["phase"], events["t_ns"]):
            config, _ = self.event(cat, op, target, cls, phase, int(t))
            effect = self.engine.decide_target(cat, target, cls, config).effect
            self.decided(effect)
            effects.append(effect)
        return effects

