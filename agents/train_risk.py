"""`sandhop-train-risk`: train the risk model (a Hydra app, `configs/train_risk.yaml`).

    sandhop-train-risk                                  # dataset=default, model=small (about 3 min here)
    sandhop-train-risk dataset=small model=tiny         # a smoke run
    sandhop-train-risk dataset=default model=base train.epochs=4
    sandhop-train-risk experiment=adfa_ld               # LM-only anomaly detection on ADFA-LD
    sandhop-train-risk out=runs/risk/a                  # again: resumes where it stopped
    sandhop-train-risk init=artifacts/a                 # start from an exported artifact's risk model

The run folder (`out`) holds `config.yaml` (the resolved config), `spec.json` (the feature
spec), `checkpoints/` (Orbax: model and optimiser state, step, epoch), `metrics.csv` (one row per
epoch) and, at the end, `evaluation.json` plus ROC and reliability plots. Training packs short
tests together into rows of `train.seq_len` events (attention never crosses two tests) and
crops long ones; each epoch's order is drawn from (seed, epoch), so a resumed run sees exactly
the batches an uninterrupted one would.

`init=ARTIFACT` (a `sandhop export` folder; test-trace datasets only) starts from that artifact's
risk model, as `sandhop learn` retrains an artifact on new data: the artifact's feature spec is
used as it is (not fitted on the training data, so ops it never saw encode as unknown), the
model and feature settings must be the artifact's, and a fresh run loads every parameter from
its `risk.safetensors` (the optimiser state starts fresh; a resumed run continues from its own
checkpoint). The run folder then also holds `init.json`: the artifact's path, the sha256 of
its manifest, its feature fingerprint and the risk run it was exported from.
"""

from __future__ import annotations

import csv
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sandhop.agents.features import UNK, Encoded, FeatureError, FeatureSpec, encode_episodes, fit_spec
from sandhop.agents.risk_model import ModelConfig, RiskModel, losses, next_event_entropy, next_event_nll
from sandhop.enforcement.runtime import (EVENT_MODEL, MANIFEST, RISK_FILE, ArtifactError, read_manifest,
                                         sha256_file, verify_files)


class TrainError(ValueError):
    """A run that cannot start or continue: what and how to fix it."""


# --------------------------------------------------------------------------- data

@dataclass
class Packed:
    """Episodes packed into rows: x [R, L, W], segment [R, L] (0 padding, k: k-th episode of the
    row), malicious [R, L], tags [R, L, n_tags]."""

    x: np.ndarray
    segment: np.ndarray
    malicious: np.ndarray
    tags: np.ndarray

    def __len__(self) -> int:
        return len(self.x)

    def batch(self, rows: np.ndarray, size: int) -> dict[str, jax.Array]:
        """Rows `rows`, padded with empty rows (segment 0: masked everywhere) to `size`, so every
        batch has one shape and the step compiles once."""
        pad = size - len(rows)
        take = lambda a: np.concatenate([a[rows], np.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a[rows]  # noqa: E731
        return {"x": jnp.asarray(take(self.x)), "segment": jnp.asarray(take(self.segment)),
                "malicious": jnp.asarray(take(self.malicious)), "tags": jnp.asarray(take(self.tags))}


def pack(enc: Encoded, seq_len: int) -> Packed:
    """First-fit packing of episodes (cropped into chunks of at most `seq_len`) into rows."""
    chunks = []
    for f, m, t in zip(enc.features, enc.malicious, enc.tags):
        for start in range(0, len(f), seq_len):
            chunks.append((f[start:start + seq_len], m[start:start + seq_len], t[start:start + seq_len]))
    chunks.sort(key=lambda c: -len(c[0]))
    rows: list[list] = []
    free: list[int] = []
    for chunk in chunks:
        n = len(chunk[0])
        slot = next((i for i, room in enumerate(free) if room >= n), None)
        if slot is None:
            rows.append([])
            free.append(seq_len)
            slot = len(rows) - 1
        rows[slot].append(chunk)
        free[slot] -= n
    width, n_tags = enc.spec.width, len(enc.spec.tags)
    x = np.zeros((len(rows), seq_len, width), np.int32)
    seg = np.zeros((len(rows), seq_len), np.int32)
    mal = np.zeros((len(rows), seq_len), np.float32)
    tags = np.zeros((len(rows), seq_len, n_tags), np.float32)
    for r, row in enumerate(rows):
        at = 0
        for k, (f, m, t) in enumerate(row, start=1):
            n = len(f)
            x[r, at:at + n], seg[r, at:at + n], mal[r, at:at + n], tags[r, at:at + n] = f, k, m, t
            at += n
    return Packed(x, seg, mal, tags)


def attention_mask(segment: jax.Array, context: int) -> jax.Array:
    """[B, T, T]: causal, within the sliding window, and only inside one episode."""
    t = segment.shape[1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    band = (j <= i) & (i - j < context)
    same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] > 0)
    return band[None] & same


def packed_losses(model: RiskModel, batch: dict, weights: dict, key: jax.Array | None = None,
                  unk_rate: float = 0.0):
    x = batch["x"]
    if key is not None and unk_rate > 0:
        # some input ops become "unknown", so the model has seen unknown ops and learns to expect
        # anything after one (targets stay the real ops)
        key, sub = jax.random.split(key)
        hide = jax.random.bernoulli(sub, unk_rate, x.shape[:2]) & (x[..., 1] > UNK)
        x = x.at[..., 1].set(jnp.where(hide, UNK, x[..., 1]))
    out = model(x, attention_mask(batch["segment"], model.cfg.context), key=key)
    seg = batch["segment"]
    valid = seg > 0
    # an episode's first event in a row has no prediction before it: no LM target there
    predicted = valid & jnp.concatenate([jnp.zeros_like(seg[:, :1], bool), seg[:, 1:] == seg[:, :-1]], axis=1)
    return losses(out, batch["x"], batch["malicious"], batch["tags"], weights, valid=valid, predicted=predicted)


# --------------------------------------------------------------------------- inference

def score_episodes(model: RiskModel, features: list[np.ndarray], batch: int = 64,
                   seq_len: int | None = None) -> list[dict[str, np.ndarray]]:
    """Per-event outputs of whole episodes, exactly as the incremental path would give them:
    `risk` (logit), `surprise` (next-event NLL; 0 for the first event), `entropy` (of the
    prediction that event was scored under), `tags` (probabilities), `hidden` (final hidden state). Long episodes run as overlapping windows; a window's output
    is kept only where the position's whole receptive field (`layers * (context - 1)` events
    back: each layer looks `context - 1` further), and the one before it, lie inside the window."""
    # +1: an event's surprise comes from the prediction one position before it
    reach = model.cfg.layers * (model.cfg.context - 1) + 1
    seq_len = max(seq_len or max(256, 2 * reach), reach + 1)
    stride = seq_len - reach
    pieces = []  # (episode, start, keep_from, array)
    for e, f in enumerate(features):
        if len(f) <= seq_len:
            pieces.append((e, 0, 0, f))
        else:
            for s in range(0, len(f), stride):
                pieces.append((e, s, 0 if s == 0 else reach, f[s:s + seq_len]))
                if s + seq_len >= len(f):
                    break
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        out = m(x)
        return {"risk": out["risk"], "surprise": next_event_nll(out, x),
                "tags": jax.nn.sigmoid(out["tags"]), "hidden": out["hidden"], "entropy": next_event_entropy(out)}

    results: list[dict[str, list]] = [{"risk": [], "surprise": [], "tags": [], "hidden": [], "entropy": []}
                                      for _ in features]
    order = sorted(range(len(pieces)), key=lambda i: len(pieces[i][3]))
    width = features[0].shape[1] if features else 0
    for b in range(0, len(order), batch):
        idx = order[b:b + batch]
        length = max(len(pieces[i][3]) for i in idx)
        length = 1 << (length - 1).bit_length()  # few distinct shapes: few compilations
        x = np.zeros((len(idx), length, width), np.int32)
        for r, i in enumerate(idx):
            x[r, :len(pieces[i][3])] = pieces[i][3]
        out = jax.device_get(run(state, jnp.asarray(x)))
        for r, i in enumerate(idx):
            e, start, keep, arr = pieces[i]
            n = len(arr)
            for key in results[e]:
                results[e][key].append((start + keep, out[key][r, keep:n]))
    final = []
    for e, res in enumerate(results):
        merged = {}
        for key, parts in res.items():
            parts.sort(key=lambda p: p[0])
            merged[key] = np.concatenate([p[1] for p in parts])[: len(features[e])]
        final.append(merged)
    return final


# --------------------------------------------------------------------------- training

def make_optimizer(cfg: Any, total_steps: int) -> optax.GradientTransformation:
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 1))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=float(cfg.lr), warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=float(cfg.lr) * float(cfg.final_lr_fraction))
    return optax.chain(optax.clip_by_global_norm(float(cfg.clip)),
                       optax.adamw(schedule, weight_decay=float(cfg.weight_decay)))


class Trainer:
    """Owns the model, optimiser and checkpoints of one run folder."""

    def __init__(self, out: Path, spec: FeatureSpec, model_cfg: ModelConfig, train_cfg: Any,
                 total_steps: int, seed: int) -> None:
        import orbax.checkpoint as ocp
        self.out, self.spec, self.train_cfg = out, spec, train_cfg
        # one compiled program instead of an eager compile per initialiser and shape
        self.model = nnx.jit(lambda: RiskModel(spec, model_cfg, rngs=nnx.Rngs(params=seed)))()
        self.tx = make_optimizer(train_cfg, total_steps)
        self.graphdef, self.state = nnx.split(self.model)
        self.params = nnx.state(self.model, nnx.Param)
        self.opt_state = self.tx.init(self.params)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.manager = ocp.CheckpointManager(
            (out / "checkpoints").resolve(),
            options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
        weights = dict(train_cfg.loss_weights)
        unk_rate = float(train_cfg.get("unk_rate", 0.0))
        graphdef = self.graphdef

        def loss_fn(params, rest, batch, key):
            return packed_losses(nnx.merge(graphdef, params, rest), batch, weights, key, unk_rate)

        @jax.jit
        def train_step(params, rest, opt_state, batch, key):
            (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, batch, key)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, parts

        @jax.jit
        def eval_step(params, rest, batch):
            model = nnx.merge(graphdef, params, rest)
            return packed_losses(model, batch, weights)[1]

        self._train_step, self._eval_step = train_step, eval_step
        self.rest = nnx.state(self.model, nnx.Not(nnx.Param))

    # ---- checkpoints
    def save(self) -> None:
        import orbax.checkpoint as ocp
        pure = {"params": nnx.to_pure_dict(self.params),
                "opt": {str(i): leaf for i, leaf in enumerate(jax.tree_util.tree_leaves(self.opt_state))}}
        meta = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "spec_fingerprint": self.spec.fingerprint()}
        if self.step in self.manager.all_steps():  # saved mid-epoch at this step: now the epoch is done
            self.manager.delete(self.step)
        self.manager.save(self.step, args=ocp.args.Composite(state=ocp.args.StandardSave(pure),
                                                             meta=ocp.args.JsonSave(meta)), force=True)
        self.manager.wait_until_finished()

    def restore(self) -> bool:
        """Continue from the newest checkpoint of the run folder; False when there is none."""
        import orbax.checkpoint as ocp
        step = self.manager.latest_step()
        if step is None:
            return False
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("spec_fingerprint") != self.spec.fingerprint():
            raise TrainError(f"{self.out}: its checkpoint was trained on another feature spec "
                             f"({meta.get('spec_fingerprint')} vs {self.spec.fingerprint()}); use a new out=")
        leaves = jax.tree_util.tree_leaves(self.opt_state)
        abstract = {"params": nnx.to_pure_dict(self.params), "opt": {str(i): leaf for i, leaf in enumerate(leaves)}}
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract)))["state"]
        except (ValueError, KeyError) as exc:
            raise TrainError(f"{self.out}: its checkpoint does not fit this model config ({exc}); "
                             "resume with the run's own config.yaml, or use a new out=") from None
        nnx.replace_by_pure_dict(self.params, state["params"])
        treedef = jax.tree_util.tree_structure(self.opt_state)
        self.opt_state = jax.tree_util.tree_unflatten(treedef, [state["opt"][str(i)] for i in range(len(leaves))])
        self.step, self.epoch, self.batch_in_epoch = meta["step"], meta["epoch"], meta["batch_in_epoch"]
        return True

    def current_model(self) -> RiskModel:
        return nnx.merge(self.graphdef, self.params, self.rest)

    def load_weights(self, path: Path) -> None:
        """Every parameter from an artifact's risk weights (named as `export.risk_weights` names
        them), for a warm start; the optimiser state stays as it is (fresh)."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        from sandhop.agents.export import risk_weights
        try:
            stored = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise TrainError(f"{path} is not a readable safetensors file ({exc}); re-export the artifact") from None
        model = self.current_model()
        ours = risk_weights(model)  # name -> array, in the order of nnx.state(model, nnx.Param)'s leaves
        problems = ([f"{name} is missing" for name in ours if name not in stored]
                    + [f"{name} is not a parameter of this model" for name in stored if name not in ours]
                    + [f"{name} has shape {stored[name].shape}, this model's {value.shape}"
                       for name, value in ours.items() if name in stored and stored[name].shape != value.shape])
        if problems:
            raise TrainError(f"{path} does not fit this model ({'; '.join(problems[:5])}"
                             f"{f'; and {len(problems) - 5} more' if len(problems) > 5 else ''}): the artifact "
                             "was exported from another model or feature spec; re-export it, or start without init=")
        params = nnx.state(model, nnx.Param)
        leaves = [jnp.asarray(stored[name], leaf.dtype)
                  for name, leaf in zip(ours, jax.tree_util.tree_leaves(params))]
        self.params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), leaves)

    # ---- the loop
    def train_epoch(self, data: Packed, seed: int, batch_size: int, save_every: int, bar=None,
                    stop_after: int | None = None) -> dict:
        order = np.random.default_rng([seed, self.epoch]).permutation(len(data))
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        sums: dict[str, float] = {}
        for b in range(self.batch_in_epoch, len(batches)):
            batch = data.batch(batches[b], batch_size)
            key = jax.random.fold_in(jax.random.key(seed), self.step)
            self.params, self.opt_state, parts = self._train_step(self.params, self.rest, self.opt_state, batch, key)
            self.step += 1
            self.batch_in_epoch = b + 1
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(parts['loss']):.3f}")
            if save_every and self.step % save_every == 0:
                self.save()
            if stop_after is not None and self.step >= stop_after:
                raise KeyboardInterrupt(f"stopped after step {self.step}")
        n = max(len(batches), 1)
        self.epoch += 1
        self.batch_in_epoch = 0
        return {f"train_{k}": v / n for k, v in sums.items()}

    def evaluate_loss(self, data: Packed, batch_size: int) -> dict:
        sums: dict[str, float] = {}
        n = 0
        for i in range(0, len(data), batch_size):
            parts = self._eval_step(self.params, self.rest, data.batch(np.arange(i, min(i + batch_size, len(data))),
                                                                        batch_size))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            n += 1
        return {f"val_{k}": v / max(n, 1) for k, v in sums.items()}


def steps_per_epoch(rows: int, batch_size: int) -> int:
    return max(1, -(-rows // batch_size))


def write_metrics_row(path: Path, row: dict) -> None:
    new = not path.exists()
    if not new:
        with open(path) as f:
            header = next(csv.reader(f), [])
        if set(header) != set(row):
            row = {k: row.get(k, "") for k in header}
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def encode_split(table, spec: FeatureSpec) -> Encoded:
    return encode_episodes(table.to_pydict(), spec)


def check_spec_file(out: Path, spec: FeatureSpec) -> None:
    path = out / "spec.json"
    if path.exists():
        try:
            stored = FeatureSpec.from_json(path.read_text())
        except (json.JSONDecodeError, FeatureError) as exc:
            raise TrainError(f"{path}: {exc}; use a new out=") from None
        try:
            stored.check_compatible(spec, "this run's data")
        except FeatureError as exc:
            raise TrainError(f"{out} was trained on other data: {exc}") from None
    else:
        path.write_text(spec.to_json())


def timer() -> float:
    return time.perf_counter()


# --------------------------------------------------------------------------- data sources

ADFA_DIRECTIONS = ("forward", "backward")


def adfa_episodes(traces, spec: FeatureSpec | None = None, direction: str = "forward"
                  ) -> tuple[Encoded, FeatureSpec]:
    """ADFA-LD traces as episodes: one event per system call (op = its i386 name); the spec's
    op vocabulary is fitted on the traces given when `spec` is None (the training split).
    `direction="backward"` reverses each trace's calls, so the LM predicts a call from the calls
    after it (training and scoring must use the same direction: it is `dataset.direction`)."""
    from sandhop.datasets.adfa import syscall_names
    if direction not in ADFA_DIRECTIONS:
        raise TrainError(f"dataset.direction={direction!r}: use one of {', '.join(ADFA_DIRECTIONS)}")
    names = syscall_names()
    if spec is None:
        spec = FeatureSpec.fit({names.get(int(n), f"syscall_{n}") for t in traces for n in np.unique(t.syscalls)},
                               pieces=0, dt_buckets=2)
    op_ix = {o: i + 2 for i, o in enumerate(spec.ops)}
    fixed = np.array([spec.categories.index("syscall") + 1, 0, spec.target_classes.index("syscall") + 1,
                      spec.phases.index("call") + 1, 1], np.int32)
    enc = Encoded(spec)
    lookup: dict[int, int] = {}
    for t in traces:
        calls = t.syscalls[::-1] if direction == "backward" else t.syscalls
        ids = np.array([lookup.setdefault(int(n), op_ix.get(names.get(int(n), f"syscall_{n}"), 1))
                        for n in calls], np.int32)
        f = np.tile(np.concatenate([fixed, np.zeros(spec.pieces, np.int32)]), (len(ids), 1))
        f[:, 1] = ids
        enc.keys.append(("adfa-ld", t.split, t.name))
        enc.features.append(f)
        enc.malicious.append(np.zeros(len(ids), np.float32))  # LM-only: labels are never trained on
        enc.tags.append(np.zeros((len(ids), len(spec.tags)), np.float32))
        enc.damaging.append(np.zeros(len(ids), bool))
        enc.attack.append(t.family)
    return enc, spec


def load_data(cfg: Any, spec: FeatureSpec | None = None) -> tuple[dict[str, Encoded], FeatureSpec, str]:
    """Encoded splits of the configured dataset: (splits, spec, kind). The spec is fitted on the
    training split unless one is given (a warm start's: test-trace datasets only)."""
    kind = cfg.dataset.get("kind", "traces")
    if kind == "adfa_ld":
        if spec is not None:
            raise TrainError("ADFA-LD runs fit their own feature spec (system call names); start without init=")
        from sandhop.datasets.adfa import load_adfa
        traces = load_adfa(cfg.dataset.get("path"))
        training = [t for t in traces if t.split == "training"]
        rng = np.random.default_rng(int(cfg.seed))
        held = set(rng.choice(len(training), size=max(1, int(len(training) * float(cfg.train.holdout))),
                              replace=False).tolist())
        direction = str(cfg.dataset.get("direction", "forward"))
        train_enc, spec = adfa_episodes([t for i, t in enumerate(training) if i not in held], None, direction)
        val_enc, _ = adfa_episodes([t for i, t in enumerate(training) if i in held], spec, direction)
        normal, _ = adfa_episodes([t for t in traces if t.split == "validation"], spec, direction)
        attack, _ = adfa_episodes([t for t in traces if t.split == "attack"], spec, direction)
        return {"train": train_enc, "val": val_enc, "normal": normal, "attack": attack,
                "_traces": traces}, spec, kind
    from sandhop.datasets import splits
    root = splits.build(cfg.dataset, progress=bool(cfg.progress))
    tables = {name: splits.load(root, name) for name in splits.read_manifest(root)["splits"]}
    train_cols = tables["train"].to_pydict()
    if spec is None:
        spec = fit_spec([train_cols], pieces=int(cfg.features.pieces),
                        piece_buckets=int(cfg.features.piece_buckets), dt_buckets=int(cfg.features.dt_buckets))
    data = {"train": encode_episodes(train_cols, spec)}
    for name, table in tables.items():
        if name != "train":
            data[name] = encode_split(table, spec)
    return data, spec, kind


# --------------------------------------------------------------------------- warm start

@dataclass(frozen=True)
class WarmStart:
    """The artifact `init=` names, checked against this run's config: its folder, manifest,
    feature spec and the sha256 of its manifest."""

    root: Path
    manifest: dict
    spec: FeatureSpec
    manifest_sha256: str

    def record(self) -> dict:
        """What the run's init.json says it started from."""
        return {"artifact": str(self.root), "manifest_sha256": self.manifest_sha256,
                "feature_fingerprint": self.spec.fingerprint(), "risk_run": self.manifest["risk"].get("run")}


def read_warm_start(cfg: Any) -> WarmStart | None:
    """The artifact of `cfg.init` (None when unset). Checked as far as the risk model needs: the
    manifest, the sha256 of every weight file, the feature spec (its hash, this sandhop's event
    model) and the model config; not the policy or tier templates, which a retrain may replace."""
    if cfg.get("init") is None:
        return None
    kind = cfg.dataset.get("kind", "traces")
    if kind != "traces":
        raise TrainError(f"init={cfg.init}: an artifact's risk model reads test traces, this dataset is "
                         f"{kind} (dataset.kind); train it from scratch (init=null)")
    root = Path(str(cfg.init)).expanduser().resolve()
    try:
        manifest = read_manifest(root)
        verify_files(root, manifest)
    except ArtifactError as exc:
        raise TrainError(f"init={root}: {exc}") from None
    try:
        spec = FeatureSpec.from_json(manifest["feature_spec"])
        theirs = dict(manifest["risk"]["model"])
    except (FeatureError, KeyError, TypeError, ValueError) as exc:
        raise TrainError(f"init={root}: its manifest's feature spec or risk model cannot be read ({exc}); "
                         "re-export the artifact with this sandhop") from None
    if spec.fingerprint() != manifest.get("feature_fingerprint"):
        raise TrainError(f"init={root}: the feature spec does not match its recorded hash ({spec.fingerprint()} "
                         f"vs {manifest.get('feature_fingerprint')}): the manifest was edited; re-export the artifact")
    differs = [k for k, ours in EVENT_MODEL.items() if tuple(getattr(spec, k)) != tuple(ours)]
    if differs:
        raise TrainError(f"init={root}: the artifact's feature spec differs from this sandhop's event model in "
                         f"{', '.join(differs)}; train from scratch (init=null)")
    ours = ModelConfig(**cfg.model).as_dict()
    differs = [k for k in ours if k != "dropout" and ours[k] != theirs.get(k)]
    if differs:
        raise TrainError(f"init={root}: the model config differs from the artifact's risk model in "
                         f"{', '.join(f'{k} ({ours[k]} here, {theirs.get(k)} there)' for k in differs)}; pass "
                         f"{' '.join(f'model.{k}={theirs.get(k)}' for k in differs)} (or the model=... that has them)")
    differs = [k for k in ("pieces", "piece_buckets", "dt_buckets") if int(cfg.features[k]) != getattr(spec, k)]
    if differs:
        raise TrainError(f"init={root}: the features config differs from the artifact's feature spec in "
                         f"{', '.join(differs)}; pass {' '.join(f'features.{k}={getattr(spec, k)}' for k in differs)}")
    return WarmStart(root, manifest, spec, sha256_file(root / MANIFEST))


# --------------------------------------------------------------------------- out-of-fold scores

OUT_OF_FOLD = "out_of_fold.parquet"


def fold_of(suite: str, test_id: str, folds: int) -> int:
    """The fold of a test: stable, and the same for every run of the test (`sandhop learn` repeats
    runs), so no fold model trains on a copy of a test it scores."""
    return zlib.crc32(f"{suite}\x1f{test_id}".encode()) % folds


def train_out_of_fold(out: Path, data: dict[str, Encoded], cfg: Any, spec: FeatureSpec, model_cfg: ModelConfig,
                      warm: "WarmStart | None", folds: int) -> dict:
    """Score every test of the train split with a model that did not train on it, for the sandbox
    manager's training (`agent.risk_scores=out_of_fold`): the tests fall into `folds` folds by
    `fold_of`; the model of fold k trains (as the main one, from the same start) on the other
    folds in `folds/<k+1>-of-<folds>/`, is calibrated on val and scores fold k. Writes OUT_OF_FOLD
    (one row per test: its key, fold, and calibrated risk and tags per event); returns a summary
    per fold."""
    from sandhop.agents import evaluate_risk as ev
    enc = data["train"]
    fold = np.array([fold_of(suite, test, folds) for suite, _, test in enc.keys])
    sizes = np.bincount(fold, minlength=folds)
    if sizes.min() == 0:
        raise TrainError(f"out_of_fold={folds}: the train split's {len(enc)} tests make {sizes.tolist()} per fold; "
                         "use fewer folds (or out_of_fold=0 for none)")
    risk: list = [None] * len(enc)
    tags: list = [None] * len(enc)
    summary = []
    for k in range(folds):
        inside = np.flatnonzero(fold == k)
        trainer = fit(out / "folds" / f"{k + 1}-of-{folds}", enc.subset(np.flatnonzero(fold != k)), data["val"],
                      cfg, spec, model_cfg, warm, f"risk model, fold {k + 1} of {folds}")
        model = trainer.current_model()
        calibrator = ev.fit_calibrator(data["val"], score_episodes(model, data["val"].features))
        held = enc.subset(inside)
        outputs = score_episodes(model, held.features)
        flat, prob, probs = ev.episode_probs(held, outputs, calibrator)
        for i, p, o in zip(inside, probs, outputs):
            risk[i], tags[i] = p.astype(np.float32), np.asarray(o["tags"], np.float32)
        labels = flat["malicious"] > 0
        row = {"fold": k, "folder": f"folds/{k + 1}-of-{folds}", "tests": int(len(inside)), "events": int(len(prob))}
        if labels.any() and (~labels).any():
            row["event_roc_auc"] = ev.roc_metrics(prob[~labels], prob[labels])["roc_auc"]
        summary.append(row)
    from sandhop.datasets import splits
    write_out_of_fold(out / OUT_OF_FOLD, enc, fold, folds, risk, tags, dataset=splits.build(cfg.dataset).name)
    return {"folds": folds, "file": OUT_OF_FOLD, "per_fold": summary}


def write_out_of_fold(path: Path, enc: Encoded, fold: np.ndarray, folds: int, risk: list[np.ndarray],
                      tags: list[np.ndarray], dataset: str) -> None:
    """OUT_OF_FOLD: one row per test with its key, fold, and per event its label (so a reader can
    tell that the scores belong to its events), calibrated risk and tags."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(r) for r in risk])]).astype(np.int32))
    table = pa.table({
        "suite": [k[0] for k in enc.keys], "run_id": [k[1] for k in enc.keys], "test_id": [k[2] for k in enc.keys],
        "fold": pa.array(fold.astype(np.int16)),
        "malicious": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(enc.malicious) > 0)),
        "risk": pa.ListArray.from_arrays(offsets, pa.array(np.concatenate(risk).astype(np.float32))),
        "tags": pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(
            pa.array(np.concatenate(tags).astype(np.float32).reshape(-1)), len(enc.spec.tags))),
    })
    meta = {"format": 1, "folds": folds, "dataset": dataset, "tags": list(enc.spec.tags)}
    table = table.replace_schema_metadata({"sandhop.out_of_fold": json.dumps(meta)})
    tmp = path.with_suffix(".tmp.parquet")
    pq.write_table(table, tmp)
    tmp.replace(path)


# --------------------------------------------------------------------------- the app

def run(cfg: Any) -> dict:
    """Train (or resume) and evaluate one run; returns the evaluation."""
    import logging
    from omegaconf import OmegaConf
    for name in ("absl", "jax", "orbax"):  # their INFO lines would drown the progress bar under Hydra
        logging.getLogger(name).setLevel(logging.WARNING)
    warm = read_warm_start(cfg)  # before the run folder is written: a refused init leaves nothing behind
    folds = int(cfg.get("out_of_fold") or 0)
    if folds == 1 or folds < 0:
        raise TrainError(f"out_of_fold={folds}: use 2 or more folds (each model trains on the others), or 0 for none")
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    stored = out / "config.yaml"
    if stored.exists():
        before = OmegaConf.to_container(OmegaConf.load(stored), resolve=True)
        changed = [k for k in ("model", "dataset", "features", "init") if before.get(k) != resolved.get(k)]
        if changed:
            raise TrainError(f"{out} holds a run with another {', '.join(changed)} config; resume with the "
                             "same settings (see its config.yaml) or use a new out=")
    stored.write_text(OmegaConf.to_yaml(resolved))
    data, spec, kind = load_data(cfg, None if warm is None else warm.spec)
    check_spec_file(out, spec)
    model_cfg = ModelConfig(**cfg.model)
    started = timer()
    trainer = fit(out, data["train"], data["val"], cfg, spec, model_cfg, warm, "training risk model")
    model = trainer.current_model()
    if not cfg.get("evaluate", True):
        return {"step": trainer.step, "epoch": trainer.epoch}
    if kind == "adfa_ld":
        from sandhop.agents.adfa_lm import evaluate_adfa
        result = evaluate_adfa(model, data, cfg, out)
    else:
        result = evaluate_traces(model, data, out)
        if folds:
            result["out_of_fold"] = train_out_of_fold(out, data, cfg, spec, model_cfg, warm, folds)
    result["train_seconds_this_run"] = round(timer() - started, 1)
    (out / "evaluation.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def fit(out: Path, train_enc: Encoded, val_enc: Encoded, cfg: Any, spec: FeatureSpec, model_cfg: ModelConfig,
        warm: "WarmStart | None", desc: str) -> "Trainer":
    """Train (or resume) one model in `out` on `train_enc`, with a checkpoint and a metrics.csv row
    (val loss) after every epoch; returns the trainer at the end of training."""
    seq_len = int(cfg.train.seq_len)
    train, val = pack(train_enc, seq_len), pack(val_enc, seq_len)
    batch_size = int(cfg.train.batch_size)
    epochs = int(cfg.train.epochs)
    total = epochs * steps_per_epoch(len(train), batch_size)
    trainer = Trainer(out, spec, model_cfg, cfg.train, total, int(cfg.seed))
    if trainer.restore():
        print(f"sandhop-train-risk: resuming {out} at step {trainer.step} (epoch {trainer.epoch})")
    elif warm is not None:
        trainer.load_weights(warm.root / RISK_FILE)
        (out / "init.json").write_text(json.dumps(warm.record(), indent=2) + "\n")
        print(f"sandhop-train-risk: starting {out} from the risk model of {warm.root}")
    from tqdm import tqdm
    bar = tqdm(total=total, initial=trainer.step, desc=desc, unit="step", disable=not cfg.progress)
    started = timer()   # metrics.csv's seconds: this model's training time in this process
    stop_after = cfg.train.get("stop_after_steps")
    try:
        while trainer.epoch < epochs:
            row = trainer.train_epoch(train, int(cfg.seed), batch_size, int(cfg.train.save_every_steps), bar,
                                      stop_after=None if stop_after is None else int(stop_after))
            row.update(trainer.evaluate_loss(val, batch_size))
            trainer.save()
            write_metrics_row(out / "metrics.csv", {"epoch": trainer.epoch, "step": trainer.step,
                                                    "seconds": round(timer() - started, 2), **row})
    finally:
        bar.close()
    return trainer


def evaluate_traces(model: RiskModel, data: dict[str, Encoded], out: Path) -> dict:
    from sandhop.agents import evaluate_risk as ev
    outputs = {name: score_episodes(model, enc.features) for name, enc in data.items() if name != "train"}
    calibrator = ev.fit_calibrator(data["val"], outputs["val"])
    flat, prob, probs = ev.episode_probs(data["val"], outputs["val"], calibrator)
    per_test, attacked = ev.test_scores(data["val"], probs)
    threshold = ev.threshold_at_fpr(per_test[~attacked], 0.01)
    event_threshold = ev.threshold_at_fpr(prob[flat["malicious"] == 0], 0.001)
    results = {name: ev.evaluate_split(enc, outputs[name], calibrator, threshold, event_threshold)
               for name, enc in data.items() if name != "train"}
    plots = ev.plot(results, out)
    return {"calibrator": {"a": calibrator.a, "b": calibrator.b, "c": calibrator.c},
            "threshold_at_1pct_val_fpr": threshold,
            "event_threshold_at_0.1pct_val_fpr": event_threshold,
            "splits": {k: ev.public(v) for k, v in results.items()},
            "plots": [p.name for p in plots]}


def load_run(run_dir: str | Path) -> tuple[RiskModel, FeatureSpec, Any]:
    """The trained model of a run folder (its newest checkpoint), its spec and its config."""
    from omegaconf import OmegaConf
    run_dir = Path(run_dir).expanduser().resolve()
    for name in ("config.yaml", "spec.json"):
        if not (run_dir / name).exists():
            raise TrainError(f"{run_dir} is not a risk-model run folder (no {name}); pass the out= folder "
                             "of sandhop-train-risk")
    cfg = OmegaConf.load(run_dir / "config.yaml")
    try:
        spec = FeatureSpec.from_json((run_dir / "spec.json").read_text())
    except json.JSONDecodeError as exc:
        raise TrainError(f"{run_dir / 'spec.json'} is not valid JSON ({exc}); retrain") from None
    trainer = Trainer(run_dir, spec, ModelConfig(**cfg.model), cfg.train, 1, int(cfg.seed))
    if not trainer.restore():
        raise TrainError(f"{run_dir} has no checkpoint yet; train first (sandhop-train-risk out={run_dir})")
    return trainer.current_model(), spec, cfg


def main() -> None:
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://sandhop.configs", config_name="train_risk")
    def app(cfg) -> None:
        try:
            result = run(cfg)
        except (TrainError, FeatureError) as exc:
            raise SystemExit(f"sandhop-train-risk: {exc}") from None
        print(json.dumps(_headline(result), indent=2, default=float))

    app()


def _headline(result: dict) -> dict:
    if "splits" not in result:
        return result
    keep = ("event_roc_auc", "test_roc_auc", "test_detection_at_1pct_fpr", "flagged_before_damage",
            "tag_macro_f1", "ece")
    return {split: {k: r[k] for k in keep if k in r} for split, r in result["splits"].items()}

