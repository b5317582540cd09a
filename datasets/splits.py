"""Labelled train / val / test / novel splits of the trace dataset, selected by a Hydra config
of the `dataset` group (`configs/dataset/*.yaml`).

train, val and test are split **by suite** (a suite's benign traces are in one split only) and
injected with every selected scenario except the held-out families; `novel` injects only the
held-out families (and the hard negatives) into its own suites, by default the test suites, so
it measures attacks of a kind never seen in training on code never seen in training. A split
is a trace dataset (`<root>/<split>/suite=.../run-*.parquet`, readable by `read_traces`), and
`<root>/splits.json` is its manifest: the resolved config, suites and scenarios per split,
counts, and the sha256 of every source file.

Builds are deterministic and cached: the root is keyed by the config, the scenario library and
the source files, so `load()` builds once (a few seconds) and reuses it after.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from sandhop import __version__
from sandhop.datasets import scenarios as lib
from sandhop.datasets.inject import InjectConfig, InjectSummary, inject, library_fingerprint
from sandhop.datasets.traces import TraceError, read_traces, write_trace
from sandhop.enforcement.runtime import sha256_file

FORMAT = 1
SPLITS: tuple[str, ...] = ("train", "val", "test", "novel")
BUNDLED_TRACES = Path(__file__).resolve().parent / "data" / "traces"
MANIFEST = "splits.json"


class SplitError(ValueError):
    """A dataset config that cannot be built, or a split folder that is not one."""


@dataclass(frozen=True)
class SplitConfig:
    """The `dataset` config group, typed. Suites may be named without a version (`attrs`)."""

    name: str = "default"
    traces: str | None = None            # None: the bundled traces
    root: str | None = None              # None: <cache>/datasets/<name>-<key>
    seed: int = 0
    train: tuple[str, ...] = ()
    val: tuple[str, ...] = ()
    test: tuple[str, ...] = ()
    novel_suites: tuple[str, ...] | None = None  # None: the test suites
    novel_families: tuple[str, ...] = ()
    scenarios: str | tuple[str, ...] = "all"
    rate: float = 0.2
    hard_negative_rate: float = 0.1
    mix: Mapping[str, float] = field(default_factory=dict)
    max_units_per_suite: int | None = None

    @classmethod
    def from_config(cls, cfg: Any) -> "SplitConfig":
        """From a Hydra/OmegaConf node or a plain mapping (unknown keys are an error)."""
        try:
            from omegaconf import OmegaConf
            data = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
        except ImportError:
            data = dict(cfg)
        if data.get("kind", "traces") != "traces":
            raise SplitError(f"dataset {data.get('name')!r} is of kind {data.get('kind')!r}, not "
                             "labelled traces; it is loaded by its own loader")
        data.pop("kind", None)
        splits = data.pop("splits", {}) or {}
        novel = data.pop("novel", {}) or {}
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known) + sorted(f"splits.{k}" for k in set(splits) - {"train", "val", "test"}) \
            + sorted(f"novel.{k}" for k in set(novel) - {"suites", "families"})
        if unknown:
            raise SplitError(f"unknown dataset setting(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(known - {'train', 'val', 'test', 'novel_suites', 'novel_families'}))}, "
                             "splits.{train,val,test}, novel.{suites,families}")
        tup = lambda v: tuple(v) if v is not None else None  # noqa: E731
        if isinstance(data.get("scenarios"), list):
            data["scenarios"] = tuple(data["scenarios"])
        return cls(**data, train=tup(splits.get("train", ())), val=tup(splits.get("val", ())),
                   test=tup(splits.get("test", ())), novel_suites=tup(novel.get("suites")),
                   novel_families=tup(novel.get("families", ())))

    def as_dict(self) -> dict:
        return {"name": self.name, "traces": self.traces, "seed": self.seed,
                "splits": {"train": list(self.train), "val": list(self.val), "test": list(self.test)},
                "novel": {"suites": None if self.novel_suites is None else list(self.novel_suites),
                          "families": list(self.novel_families)},
                "scenarios": self.scenarios if isinstance(self.scenarios, str) else list(self.scenarios),
                "rate": self.rate, "hard_negative_rate": self.hard_negative_rate,
                "mix": dict(self.mix), "max_units_per_suite": self.max_units_per_suite}


# --------------------------------------------------------------------------- planning

def _resolve_suites(names: tuple[str, ...], present: list[str], split: str) -> list[str]:
    out = []
    for name in names:
        hits = [s for s in present if s == name or s.split("==", 1)[0] == name]
        if not hits:
            raise SplitError(f"split {split}: no suite {name!r} in the traces (they hold "
                             f"{', '.join(present)}); fix dataset.splits.{split}")
        out.extend(h for h in hits if h not in out)
    return out


def plan(cfg: SplitConfig, present: list[str]) -> dict[str, dict]:
    """Suites and scenario ids of each split, checked: train/val/test share no suite, novel
    shares none with train or val, no held-out family reaches train/val/test."""
    suites = {s: _resolve_suites(getattr(cfg, s), present, s) for s in ("train", "val", "test")}
    suites["novel"] = (_resolve_suites(cfg.novel_suites, present, "novel") if cfg.novel_suites is not None
                       else list(suites["test"]))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test"), ("train", "novel"), ("val", "novel")):
        shared = sorted(set(suites[a]) & set(suites[b]))
        if shared:
            raise SplitError(f"suite(s) {', '.join(shared)} are in both {a} and {b}; a suite belongs "
                             "to one split (novel may reuse the test suites only)")
    if not suites["train"]:
        raise SplitError("the train split has no suite; set dataset.splits.train")
    for family in cfg.novel_families:
        if family not in lib.FAMILIES:
            raise SplitError(f"novel family {family!r} is not a scenario family; known: {', '.join(lib.FAMILIES)}")
    if "benign" in cfg.novel_families:
        raise SplitError("the hard negatives (family benign) are in every split; hold out attack families only")
    chosen = lib.select(cfg.scenarios)
    seen = [s.id for s in chosen if s.family not in cfg.novel_families]
    novel = [s.id for s in chosen if s.family in cfg.novel_families or not s.malicious]
    if cfg.novel_families and not any(lib.get(i).malicious for i in novel):
        raise SplitError(f"the novel families {', '.join(cfg.novel_families)} hold no selected attack")
    if not any(lib.get(i).malicious for i in seen):
        raise SplitError("every selected attack is held out for novel; train would have no attack")
    return {split: {"suites": suites[split], "scenarios": novel if split == "novel" else seen}
            for split in SPLITS if suites[split] and (split != "novel" or cfg.novel_families)}


def key(cfg: SplitConfig, traces: Path) -> str:
    """Cache key: the config (without its root), the scenario library, the source files."""
    h = hashlib.sha256(json.dumps(cfg.as_dict(), sort_keys=True).encode())
    h.update(library_fingerprint().encode())
    h.update(FORMAT.to_bytes(2, "big"))
    for path, digest in sorted(_sources(traces).items()):
        h.update(f"{path}:{digest}".encode())
    return h.hexdigest()[:12]


def _sources(traces: Path) -> dict[str, str]:
    files = [traces] if traces.is_file() else sorted(traces.glob("suite=*/run-*.parquet"))
    return {str(p.relative_to(traces) if p != traces else p.name): sha256_file(p) for p in files}


def replace_folder(tmp: Path, root: Path) -> None:
    """Put a folder built aside in place of `root` (whole or not at all for readers)."""
    if root.exists():
        shutil.rmtree(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, root)


def cache_dir() -> Path:
    return Path(os.environ.get("SANDHOP_CACHE") or Path.home() / ".cache" / "sandhop")


def root_of(cfg: SplitConfig) -> Path:
    traces = Path(cfg.traces) if cfg.traces else BUNDLED_TRACES
    return Path(cfg.root) if cfg.root else cache_dir() / "datasets" / f"{cfg.name}-{key(cfg, traces)}"


# --------------------------------------------------------------------------- building

def build(cfg: SplitConfig | Any, root: str | Path | None = None, *, force: bool = False,
          progress: bool = False) -> Path:
    """Build the labelled splits of `cfg` into `root` (default: the keyed cache folder) and
    return it; an existing build with the same key is reused unless `force`. The folder appears
    complete or not at all."""
    cfg = cfg if isinstance(cfg, SplitConfig) else SplitConfig.from_config(cfg)
    traces = Path(cfg.traces) if cfg.traces else BUNDLED_TRACES
    if not traces.exists():
        raise SplitError(f"dataset.traces {traces} does not exist; record suites with `sandhop record` "
                         "or point dataset.traces at a trace dataset")
    root = Path(root) if root else root_of(cfg)
    k = key(cfg, traces)
    if (root / MANIFEST).exists() and not force:
        existing = read_manifest(root)
        if existing.get("key") == k:
            return root
        raise SplitError(f"{root} holds a build of another config (key {existing.get('key')}, this "
                         f"one is {k}); pass --force to replace it or choose another root")
    if root.exists() and any(root.iterdir()) and not (root / MANIFEST).exists():
        raise SplitError(f"{root} exists and is not a dataset build; choose an empty or new folder")

    table = read_traces(traces)
    present = sorted(set(table["suite"].to_pylist()))
    layout = plan(cfg, present)
    tmp = root.parent / f".{root.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir(parents=True)
    try:
        manifest = {"format": FORMAT, "sandhop": __version__, "key": k, "name": cfg.name,
                    "config": cfg.as_dict(), "scenario_library": library_fingerprint(),
                    "traces": str(traces), "sources": _sources(traces), "splits": {}}
        steps = list(layout.items())
        bar = tqdm(total=len(steps), desc=f"building dataset {cfg.name}", unit="split", disable=not progress)
        for index, (split, spec) in enumerate(steps):
            part = table.filter(pc.is_in(table["suite"], pa.array(spec["suites"])))
            part = _subsample(part, cfg.max_units_per_suite, cfg.seed)
            icfg = InjectConfig(scenarios=tuple(spec["scenarios"]), rate=cfg.rate,
                                hard_negative_rate=cfg.hard_negative_rate,
                                mix={m: w for m, w in cfg.mix.items()
                                     if {s.id for s in lib.select(m)} & set(spec["scenarios"])},
                                seed=cfg.seed * len(SPLITS) + SPLITS.index(split))
            runs, summary = inject(part, icfg)
            for suite, run_id, labelled in runs:
                write_trace(labelled, tmp / split, suite=suite, run_id=run_id,
                            run_info={"split": split, "dataset": cfg.name, "key": k})
            manifest["splits"][split] = _split_stats(spec, runs, summary)
            bar.update(1)
        bar.close()
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        replace_folder(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _subsample(table: pa.Table, per_suite: int | None, seed: int) -> pa.Table:
    """At most `per_suite` units (tests/collectors) of each suite, drawn per suite (so novel
    hosts the same tests as test); session rows stay."""
    if not per_suite:
        return table
    keep: set[tuple[str, str]] = set()
    pairs = sorted(set(zip(table["suite"].to_pylist(), table["test_id"].to_pylist())))
    by_suite: dict[str, list[str]] = {}
    for suite, tid in pairs:
        if tid:
            by_suite.setdefault(suite, []).append(tid)
    for suite, tids in by_suite.items():
        rng = random.Random(f"{seed}:{suite}:units")
        keep.update((suite, t) for t in (rng.sample(tids, per_suite) if len(tids) > per_suite else tids))
    mask = [not tid or (suite, tid) in keep
            for suite, tid in zip(table["suite"].to_pylist(), table["test_id"].to_pylist())]
    return table.filter(pa.array(mask))


def _split_stats(spec: dict, runs: list, summary: InjectSummary) -> dict:
    events = sum(t.num_rows for _, _, t in runs)
    malicious_tests = Counter()
    for _, _, t in runs:
        mal = t.filter(t["malicious"])
        malicious_tests.update(set(zip(mal["suite"].to_pylist(), mal["test_id"].to_pylist())))
    return {"suites": spec["suites"], "scenarios": spec["scenarios"],
            "families": sorted({lib.get(i).family for i in spec["scenarios"]}),
            "units": summary.units, "attacked_units": summary.attacked_units,
            "hard_negative_units": summary.hard_negative_units, "events": events,
            "malicious_events": summary.malicious_events, "by_scenario": summary.as_dict()["by_scenario"],
            "by_phase": summary.as_dict()["by_phase"]}


# --------------------------------------------------------------------------- reading

def read_manifest(root: str | Path) -> dict:
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SplitError(f"{root} is not a dataset build (no {MANIFEST}); build it with "
                         "`sandhop dataset build`") from None
    except json.JSONDecodeError as exc:
        raise SplitError(f"{path} is not valid JSON ({exc}); rebuild with `sandhop dataset build --force`") from None
    if manifest.get("format") != FORMAT:
        raise SplitError(f"{path} has format {manifest.get('format')!r}, this sandhop reads {FORMAT}; "
                         "rebuild with `sandhop dataset build --force`")
    return manifest


def load(cfg_or_root: SplitConfig | Any, split: str, *, progress: bool = False) -> pa.Table:
    """The labelled events of one split: from a build folder, or from a dataset config (built
    on first use)."""
    if split not in SPLITS:
        raise SplitError(f"unknown split {split!r}; one of {', '.join(SPLITS)}")
    if isinstance(cfg_or_root, (str, Path)):
        root = Path(cfg_or_root)
    else:
        root = build(cfg_or_root, progress=progress)
    manifest = read_manifest(root)
    if split not in manifest["splits"]:
        raise SplitError(f"{root} has no {split} split (it has {', '.join(manifest['splits'])}); "
                         "novel needs dataset.novel.families")
    try:
        return read_traces(root / split)
    except TraceError as exc:
        raise SplitError(f"{exc}; rebuild with `sandhop dataset build --force`") from None


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "build_dataset"):
    """The Hydra config `config_name` of sandhop's configs with command-line overrides; a bad
    override is a SplitError that names it and says how to list the choices."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("sandhop.configs", version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SplitError(f"bad config override in {' '.join(overrides) or '(none)'}: {first}. Choose "
                         f"a dataset with dataset=NAME (one of {', '.join(available())}) and set fields "
                         "as dataset.FIELD=VALUE (quote a value with commas, 'a,b', or write a list [a,b])") from None


def available() -> list[str]:
    import sandhop.configs as configs
    return sorted(p.stem for p in (Path(configs.__file__).parent / "dataset").glob("*.yaml"))


def format_stats(manifest: dict) -> str:
    """The split table of the dataset card (Markdown)."""
    lines = ["| split | suites | units (tests + collectors) | events | attacked units | hard-negative units | malicious events | scenarios |",
             "|---|---|---|---|---|---|---|---|"]
    for split, s in manifest["splits"].items():
        lines.append(f"| {split} | {', '.join(x.split('==')[0] for x in s['suites'])} | {s['units']:,} | "
                     f"{s['events']:,} | {s['attacked_units']:,} | {s['hard_negative_units']:,} | "
                     f"{s['malicious_events']:,} | {sum(lib.get(i).malicious for i in s['scenarios'])} attacks "
                     f"+ {sum(not lib.get(i).malicious for i in s['scenarios'])} hard negatives |")
    return "\n".join(lines)
