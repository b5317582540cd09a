"""The replayable form of a split: every test's events as flat arrays, their risk inputs, and the
decision table the JAX twin looks decisions up in (precomputed by the real `PolicyEngine`).

An episode is one unit of a trace (a test, or a collector): its events in recorded order
(session-level rows belong to no test and are left out). Arrays are flat over all events with
per-episode `start` and `length` (tests range from 1 to about 20,000 events, so padding every
test to the longest would be mostly padding).

Risk inputs per event (`risk` in [0, 1] and the inferred-tag probabilities) come from either
- `rules`: the rule-based score below, from category and target class alone (`RULES`); or
- `model`: a trained risk-model run folder (`sandhop-train-risk`'s out=): its calibrated risk
  score and tag head, computed once per (checkpoint, dataset build, split) and cached.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from sandhop.enforcement.engine import TIERS, PolicyEngine
from sandhop.enforcement.events import CATEGORIES, INFERRED_TAGS, TARGET_CLASSES
from sandhop.envs.spec import PERMISSIONS, EnvError, EnvSpec, decision_row, progress_of, quiet_row

SPLITS = ("train", "val", "test", "novel")

# Rule-based risk: (categories, target classes or None for any, risk, inferred tags). The first
# matching row decides; no row: LOW_RISK and no tags. A documented prior, not a learned model.
RULES: tuple[tuple[frozenset[str], frozenset[str] | None, float, tuple[str, ...]], ...] = (
    (frozenset({"net.connect", "net.send", "fs.read"}), frozenset({"metadata_ip"}), 0.95,
     ("credential_access", "reconnaissance")),
    (frozenset({"sys.tamper"}), None, 0.9, ("defense_evasion", "tampering")),
    (frozenset({"fs.read", "fs.meta", "env.read"}), frozenset({"home.secret", "system.secret", "proc.secret",
                                                             "env.secret"}), 0.85, ("credential_access",)),
    (frozenset({"net.connect", "net.send"}), frozenset({"public_net", "domain", "private_net", "link_local"}),
     0.6, ("exfiltration",)),
    (frozenset({"fs.write", "fs.delete"}), frozenset({"home", "home.secret", "site", "system", "python"}), 0.6,
     ("persistence",)),
    (frozenset({"proc.spawn"}), None, 0.5, ("execution",)),
    (frozenset({"code.exec"}), None, 0.5, ("execution",)),
    (frozenset({"code.native"}), frozenset({"tmp", "home", "cwd", "other", "string"}), 0.5, ("execution",)),
    (frozenset({"net.dns"}), frozenset({"domain"}), 0.3, ("exfiltration",)),
    (frozenset({"net.bind"}), frozenset({"public_net", "unspecified"}), 0.3, ("execution",)),
)
LOW_RISK = 0.05


def rule_risk(category: str, target_class: str) -> tuple[float, np.ndarray]:
    tags = np.zeros(len(INFERRED_TAGS), np.float32)
    for categories, classes, risk, names in RULES:
        if category in categories and (classes is None or target_class in classes):
            for t in names:
                tags[INFERRED_TAGS.index(t)] = 1.0
            return risk, tags
    return LOW_RISK, tags


@dataclass
class Episodes:
    """One split, ready to replay (see the module docstring)."""

    name: str
    keys: list[tuple[str, str, str]]          # (suite, run_id, test_id) per episode
    start: np.ndarray                          # int64 [E]
    length: np.ndarray                         # int32 [E]
    attack: list[str]                          # scenario id of an attacked episode, "" otherwise
    category: np.ndarray                       # int32 [N]: index into CATEGORIES
    target_class: np.ndarray                   # int32 [N]: index into TARGET_CLASSES
    event: np.ndarray                          # int32 [N]: index into `targets`
    targets: list[tuple[str, str, str]]        # distinct (category, target, target_class)
    malicious: np.ndarray                      # bool [N]
    damaging: np.ndarray                       # bool [N]
    progress: np.ndarray                       # float32 [N]: spec.progress_of(position in the episode)
    risk: np.ndarray = field(default=None)     # float32 [N]
    tags: np.ndarray = field(default=None)     # float32 [N, len(INFERRED_TAGS)]
    risk_source: str = ""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_events(self) -> int:
        return len(self.category)

    def target_categories(self) -> np.ndarray:
        """The category of each distinct event (`targets`), as an array of names."""
        return np.array([t[0] for t in self.targets], dtype=object)

    def kinds(self) -> np.ndarray:
        """int64 [N]: each event's kind, its (category, target class) as one index."""
        return self.category.astype(np.int64) * len(TARGET_CLASSES) + self.target_class

    def quiet(self, decisions: np.ndarray) -> np.ndarray:
        """bool [N]: which events are quiet (`spec.quiet_row`), from `decision_table`."""
        return quiet_row(decisions, self.target_categories())[self.event]

    def span(self, episode: int) -> slice:
        s = int(self.start[episode])
        return slice(s, s + int(self.length[episode]))

    def subset(self, episodes) -> "Episodes":
        """The given episodes only (in that order), e.g. to replay a sample."""
        idx = np.asarray(episodes, np.int64)
        rows = np.concatenate([np.arange(self.start[e], self.start[e] + self.length[e]) for e in idx]) \
            if len(idx) else np.zeros(0, np.int64)
        length = self.length[idx]
        start = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64) if len(idx) else idx
        return Episodes(self.name, [self.keys[e] for e in idx], start, length, [self.attack[e] for e in idx],
                        self.category[rows], self.target_class[rows], self.event[rows], self.targets,
                        self.malicious[rows], self.damaging[rows], self.progress[rows],
                        None if self.risk is None else self.risk[rows],
                        None if self.tags is None else self.tags[rows], self.risk_source)


# --------------------------------------------------------------------------- from a trace table

def from_table(table: pa.Table, name: str = "traces") -> Episodes:
    """Episodes of a labelled trace table (the schema of `sandhop.datasets.traces`), without risk
    inputs (see `with_risk`)."""
    needed = ["suite", "run_id", "test_id", "seq", "category", "target", "target_class", "malicious",
              "attack"]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise EnvError(f"{name}: the trace table lacks columns {missing}; build labelled splits with "
                       "`sandhop dataset build`")
    table = table.filter(pc.not_equal(table["test_id"], ""))
    if table.num_rows == 0:
        raise EnvError(f"{name} has no test events (no episodes); check the dataset's suites, or record "
                       "traces with `pytest --sandhop-record DIR`")
    table = table.sort_by([("suite", "ascending"), ("run_id", "ascending"), ("test_id", "ascending"),
                           ("seq", "ascending")])
    category = _vocabulary_index(table, "category", CATEGORIES, name)
    target_class = _vocabulary_index(table, "target_class", TARGET_CLASSES, name)
    key = pc.binary_join_element_wise(table["suite"], table["run_id"], table["test_id"], "\x1f")
    key = key.combine_chunks().dictionary_encode() if isinstance(key, pa.ChunkedArray) else key.dictionary_encode()
    key_ix = key.indices.to_numpy()
    bounds = np.flatnonzero(np.diff(key_ix)) + 1
    start = np.concatenate([[0], bounds]).astype(np.int64)
    length = np.diff(np.concatenate([start, [table.num_rows]])).astype(np.int32)
    keys = [tuple(str(key.dictionary[int(key_ix[s])]).split("\x1f")) for s in start]
    distinct = pc.binary_join_element_wise(table["category"], table["target"], table["target_class"], "\x00")
    distinct = (distinct.combine_chunks() if isinstance(distinct, pa.ChunkedArray) else distinct).dictionary_encode()
    targets = [tuple(s.split("\x00")) for s in distinct.dictionary.to_pylist()]
    malicious = table["malicious"].to_numpy(zero_copy_only=False).astype(bool)
    damaging = (table["damaging"].to_numpy(zero_copy_only=False).astype(bool) if "damaging" in table.column_names
                else np.zeros(table.num_rows, bool))
    attack_col = np.asarray(table["attack"].to_pylist(), object)
    attack = []
    for s, n in zip(start, length):
        hit = np.flatnonzero(malicious[s:s + n])
        attack.append(str(attack_col[s + hit[0]]) if len(hit) else "")
    pos = np.arange(table.num_rows, dtype=np.int64) - np.repeat(start, length)
    progress = progress_of(pos)
    return Episodes(name, keys, start, length, attack, category, target_class,
                    distinct.indices.to_numpy().astype(np.int32), targets, malicious, damaging, progress)


def _vocabulary_index(table: pa.Table, column: str, vocabulary: tuple[str, ...], name: str) -> np.ndarray:
    encoded = table[column].combine_chunks().dictionary_encode()
    values = encoded.dictionary.to_pylist()
    unknown = [v for v in values if v not in vocabulary]
    if unknown:
        row = pc.index(table[column], unknown[0]).as_py()
        test = table["test_id"][row].as_py()
        raise EnvError(f"{name}: event {row} (test {test!r}) has {column} {unknown[0]!r}, which is not in this "
                       f"sandhop's event model ({', '.join(vocabulary)}); re-record the trace with this sandhop "
                       "or drop those events")
    index = np.array([vocabulary.index(v) for v in values], np.int32)
    return index[encoded.indices.to_numpy()]


# --------------------------------------------------------------------------- risk inputs

def with_risk(episodes: Episodes, spec: EnvSpec, table: pa.Table | None = None, cache_key: str | None = None) -> Episodes:
    """Attach the risk inputs `spec.risk_source` names (see the module docstring)."""
    if spec.risk_source == "rules":
        risk = np.empty(episodes.n_events, np.float32)
        tags = np.empty((episodes.n_events, len(INFERRED_TAGS)), np.float32)
        combo = episodes.kinds()
        for c in np.unique(combo):
            sel = combo == c
            risk[sel], tags[sel] = rule_risk(CATEGORIES[c // len(TARGET_CLASSES)], TARGET_CLASSES[c % len(TARGET_CLASSES)])
        episodes.risk, episodes.tags, episodes.risk_source = risk, tags, "rules"
        return episodes
    if table is None:
        raise EnvError("risk from a model needs the trace table the episodes came from")
    episodes.risk, episodes.tags = model_risk(episodes, table, spec.risk_checkpoint, cache_key)
    episodes.risk_source = f"model:{spec.risk_checkpoint}"
    return episodes


def check_checkpoint(run_dir: str | Path):
    """The feature spec of a risk-model run folder, refused unless it describes this sandhop's
    event model (categories, target classes, phases, inferred tags)."""
    from sandhop.agents.features import FeatureError, FeatureSpec
    run = Path(run_dir).expanduser()
    spec_file = run / "spec.json"
    if not (run / "config.yaml").is_file() or not spec_file.is_file():
        raise EnvError(f"{run} is not a risk-model run folder (needs config.yaml and spec.json); pass the out= "
                       "folder of sandhop-train-risk as env.risk.checkpoint, or use env.risk.source=rules")
    try:
        spec = FeatureSpec.from_json(spec_file.read_text())
    except (ValueError, FeatureError) as exc:
        raise EnvError(f"{spec_file}: {exc}") from None
    from sandhop.enforcement.events import PHASES
    differs = [name for name, ours in (("categories", CATEGORIES), ("target_classes", TARGET_CLASSES),
                                       ("phases", PHASES), ("tags", INFERRED_TAGS))
               if tuple(getattr(spec, name)) != ours]
    if differs:
        raise EnvError(f"the feature spec of {run} does not match this sandhop's event model (it differs in "
                       f"{', '.join(differs)}): retrain the risk model with this sandhop, or use "
                       "env.risk.source=rules")
    if _dataset_kind(run) != "traces":
        raise EnvError(f"{run} was trained on ADFA-LD system calls, not on test traces; train on a trace "
                       "dataset (sandhop-train-risk dataset=default)")
    return spec


def _dataset_kind(run: Path) -> str:
    from omegaconf import OmegaConf
    return str(OmegaConf.load(run / "config.yaml").get("dataset", {}).get("kind", "traces"))


def _fingerprint(run: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(run.rglob("*")):
        if p.is_file() and p.suffix not in (".png", ".csv", ".log"):
            st = p.stat()
            h.update(f"{p.relative_to(run)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def model_risk(episodes: Episodes, table: pa.Table, checkpoint: str, cache_key: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated risk and tag probabilities of every event from a trained risk model; cached
    under <cache>/risk/ when `cache_key` names the data (a dataset build and split)."""
    run = Path(checkpoint).expanduser().resolve()
    check_checkpoint(run)
    cache = None
    if cache_key:
        from sandhop.datasets.splits import cache_dir
        cache = cache_dir() / "risk" / f"{_fingerprint(run)}-{cache_key}.npz"
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                if len(z["risk"]) == episodes.n_events:
                    return z["risk"], z["tags"]
    import json
    from sandhop.agents.features import encode_episodes
    from sandhop.agents.risk_model import Calibrator
    from sandhop.agents.train_risk import load_run, score_episodes
    model, fspec, _ = load_run(run)
    evaluation = run / "evaluation.json"
    if not evaluation.is_file():
        raise EnvError(f"{run} has no evaluation.json (its calibration); finish the run with evaluate=true")
    calibrator = Calibrator(**json.loads(evaluation.read_text())["calibrator"])
    enc = encode_episodes(table.to_pydict(), fspec)
    where = {k: i for i, k in enumerate(episodes.keys)}
    outputs = score_episodes(model, enc.features)
    risk = np.zeros(episodes.n_events, np.float32)
    tags = np.zeros((episodes.n_events, len(INFERRED_TAGS)), np.float32)
    for key, out in zip(enc.keys, outputs):
        span = episodes.span(where[key])
        risk[span] = calibrator(out["risk"], out["surprise"]).astype(np.float32)
        tags[span] = out["tags"].astype(np.float32)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, risk=risk, tags=tags)
        os.replace(tmp, cache)
    return risk, tags


def out_of_fold_risk(episodes: Episodes, checkpoint: str) -> Episodes:
    """A copy of `episodes`, the train split of the risk model in `checkpoint`, with the run's
    out-of-fold scores: each test scored by the fold model that did not train on it
    (`sandhop-train-risk out_of_fold=K`). On held-out suites the model scores benign look-alikes
    of attacks higher than it scores the tests it trained on; these scores show the manager that."""
    import json
    from dataclasses import replace

    import pyarrow.parquet as pq

    from sandhop.agents.train_risk import OUT_OF_FOLD
    run = Path(checkpoint).expanduser().resolve()
    path = run / OUT_OF_FOLD
    if not path.is_file():
        raise EnvError(f"{run} has no out-of-fold scores ({OUT_OF_FOLD}): add them to the run with `sandhop-train-risk "
                       f"out={run} out_of_fold=2` and the run's other settings (its config.yaml; the trained model "
                       "is kept), or train the manager on the in-sample scores: agent.risk_scores=in_sample")
    unreadable = (OSError, ValueError, KeyError, AttributeError, pa.ArrowException)
    retrain = f"retrain the risk model (sandhop-train-risk out={run})"
    try:
        table = pq.read_table(path)
        meta = json.loads((table.schema.metadata or {}).get(b"sandhop.out_of_fold", b"{}"))
    except unreadable as exc:
        raise EnvError(f"{path} is not readable as out-of-fold scores ({exc}); {retrain}") from None
    if meta.get("format") != 1 or tuple(meta.get("tags", ())) != INFERRED_TAGS:
        raise EnvError(f"{path} has format {meta.get('format')} and tags {meta.get('tags')}; this sandhop reads "
                       f"format 1 with tags {list(INFERRED_TAGS)}: {retrain}")
    try:
        keys = list(zip(*(table[c].to_pylist() for c in ("suite", "run_id", "test_id"))))
        columns = {c: table[c].combine_chunks() for c in ("malicious", "risk", "tags")}
        offsets = columns["risk"].offsets.to_numpy()
        malicious = columns["malicious"].values.to_numpy(zero_copy_only=False)
        risk_values = columns["risk"].values.to_numpy()
        tag_values = columns["tags"].values.flatten().to_numpy().reshape(-1, len(INFERRED_TAGS))
    except unreadable as exc:
        raise EnvError(f"{path} is not readable as out-of-fold scores ({exc}); {retrain}") from None
    where = {k: i for i, k in enumerate(keys)}
    rows = np.empty(episodes.n_events, np.int64)
    missing = 0
    for e, key in enumerate(episodes.keys):
        i = where.get(key)
        span = episodes.span(e)
        if i is None or offsets[i + 1] - offsets[i] != span.stop - span.start \
                or not np.array_equal(malicious[offsets[i]:offsets[i + 1]], episodes.malicious[span]):
            missing += 1
            continue
        rows[span] = np.arange(offsets[i], offsets[i + 1])
    if missing:
        raise EnvError(f"the out-of-fold scores of {run} (dataset {meta.get('dataset')!r}) lack {missing} of the "
                       f"{len(episodes)} tests of {episodes.name} as they are (key, event count and labels): the risk model "
                       "was trained on another dataset, or on this one before it changed. Train it on this one, or use "
                       "agent.risk_scores=in_sample")
    return replace(episodes, risk=risk_values[rows].astype(np.float32), tags=tag_values[rows].astype(np.float32),
                   risk_source=f"{episodes.risk_source} (out of fold)")


# --------------------------------------------------------------------------- loading a split

_LOADED: dict[tuple, Episodes] = {}


def load(split: str, dataset: Any = "default", spec: EnvSpec | None = None, *, progress: bool = False) -> Episodes:
    """Episodes of one split of a dataset, with risk inputs. `dataset`: a dataset config name
    (`default`, `small`), a dataset config node, or the folder of a dataset build. Loaded once
    per process (vector envs share it)."""
    from sandhop.datasets import splits
    spec = spec or EnvSpec()
    if split not in SPLITS:
        raise EnvError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    if isinstance(dataset, (str, os.PathLike)) and Path(dataset).expanduser().is_dir():
        root = Path(dataset).expanduser().resolve()
    elif isinstance(dataset, str):
        if dataset not in splits.available():
            raise EnvError(f"unknown dataset {dataset!r}; one of {', '.join(splits.available())} (or the folder "
                           "of a `sandhop dataset build`)")
        root = splits.build(splits.compose([f"dataset={dataset}"]).dataset, progress=progress)
    else:
        root = splits.build(dataset, progress=progress)
    key = (str(root), split, spec.risk_source, spec.risk_checkpoint)
    if key not in _LOADED:
        try:
            table = splits.load(root, split)
        except splits.SplitError as exc:
            raise EnvError(str(exc)) from None
        episodes = from_table(table, f"{root.name}/{split}")
        with_risk(episodes, spec, table, f"{root.name}-{split}")
        _LOADED.clear()  # one split at a time: the training split is large
        _LOADED[key] = episodes
    return _LOADED[key]


# --------------------------------------------------------------------------- the decision table

def decision_table(episodes: Episodes, spec: EnvSpec, engine: PolicyEngine | None = None,
                   progress: bool = False, cache: bool = True) -> np.ndarray:
    """int8 [targets, tiers, permissions]: the engine's effect (index into EFFECTS) for every
    distinct event under every config a test can reach (`spec.decision_row`). Cached under
    <cache>/decisions/, keyed by everything a decision depends on: the tier files, the engine's
    roots, the categories with grant/revoke actions and the targets themselves."""
    engine = engine or PolicyEngine()
    path = None
    if cache:
        from sandhop.datasets.splits import cache_dir
        from sandhop.enforcement.runtime import tier_templates
        h = hashlib.sha256()
        for tier, digest in tier_templates(engine).items():
            h.update(f"{tier} {digest}\n".encode())
        h.update(repr(engine.roots).encode() + repr(spec.categories).encode())
        for t in episodes.targets:
            h.update("\0".join(t).encode("utf-8", "surrogatepass") + b"\n")
        path = cache_dir() / "decisions" / f"{h.hexdigest()[:24]}.npy"
        if path.is_file():
            try:
                table = np.load(path, allow_pickle=False)
                if table.shape == (len(episodes.targets), len(TIERS), len(PERMISSIONS)):
                    return table
            except (OSError, ValueError):
                pass  # a damaged cache file is rebuilt
    slots = spec.category_slots()
    table = np.zeros((len(episodes.targets), len(TIERS), len(PERMISSIONS)), np.int8)
    configs: dict = {}
    from tqdm import tqdm
    for u, (category, target, cls) in enumerate(tqdm(episodes.targets, desc="decision table", unit="target",
                                                     disable=not progress, mininterval=1.0)):
        table[u] = decision_row(engine, category, target, cls, slots[CATEGORIES.index(category)] >= 0, configs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, table)
        os.replace(tmp, path)
    return table
