"""The risk model: shapes, causality, incremental = full inference, learning, resumable Hydra
training with Orbax checkpoints, ADFA-LD scoring, and clear errors for mismatched specs."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("hydra")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from sandhop.agents.features import FeatureError, FeatureSpec, N_FIXED  # noqa: E402
from sandhop.agents.risk_model import ModelConfig, RiskModel, next_event_nll  # noqa: E402

SPEC = FeatureSpec.fit(["open", "socket.connect", "subprocess.Popen", "environ.get"], pieces=2, piece_buckets=64)


def random_events(rng: np.random.Generator, b: int, t: int, spec: FeatureSpec = SPEC) -> np.ndarray:
    x = np.zeros((b, t, spec.width), np.int32)
    x[..., 0] = rng.integers(1, spec.n_categories, (b, t))
    x[..., 1] = rng.integers(1, spec.n_ops, (b, t))
    x[..., 2] = rng.integers(1, spec.n_classes, (b, t))
    x[..., 3] = rng.integers(1, spec.n_phases, (b, t))
    x[..., 4] = rng.integers(1, spec.dt_buckets, (b, t))
    x[..., N_FIXED:] = rng.integers(0, spec.piece_buckets, (b, t, spec.pieces))
    return x


def model(context: int = 8, seed: int = 0) -> RiskModel:
    """A fresh module object each call, over parameters initialised once per (context, seed)."""
    return nnx.merge(*_initialised(context, seed))


@functools.lru_cache(maxsize=None)
def _initialised(context: int, seed: int):
    # Initialised as Trainer does, in one jitted program (compiled once: the context is not part of
    # it), rather than op by op, which compiled a random initialiser for every parameter shape.
    cfg = ModelConfig(width=16, layers=2, heads=2, mlp=2, context=context, dropout=0.0)
    return nnx.split(nnx.jit(lambda: RiskModel(SPEC, cfg, rngs=nnx.Rngs(params=seed)))())


# Whole-sequence and one-event calls compiled as one program each (as score_episodes, the trainer
# and bench/risk_latency.py run them), not op by op: op-by-op dispatch compiles every primitive
# of every new shape separately, which was most of these tests' time. The model code is the same.
@nnx.jit
def forward(m: RiskModel, x: jax.Array) -> dict[str, jax.Array]:
    return m(x)


@nnx.jit
def step(m: RiskModel, x: jax.Array, cache):
    return m.step(x, cache)


@pytest.fixture(scope="module", autouse=True)
def xla_cache(tmp_path_factory):
    """A persistent compilation cache for this module. Every `Trainer` (each run, each
    `load_run`) and every `score_episodes` call jits fresh closures, so in-process caching never
    hits and the same programs were compiled again and again (compiling was about 80% of this
    module's time); with this cache a program of the same HLO is loaded instead. It only saves
    time: the programs and their results are the same. The previous settings come back after."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    before = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)  # not each eager op
    cc.reset_cache()  # an earlier module may have compiled already, with the cache off
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    cc.reset_cache()


def test_output_shapes_and_dtypes():
    m = model()
    out = forward(m, jnp.asarray(random_events(np.random.default_rng(0), 3, 11)))
    assert out["lm_category"].shape == (3, 11, SPEC.n_categories)
    assert out["lm_op"].shape == (3, 11, SPEC.n_ops) and out["lm_class"].shape == (3, 11, SPEC.n_classes)
    assert out["risk"].shape == (3, 11) and out["tags"].shape == (3, 11, len(SPEC.tags))
    assert all(v.dtype == jnp.float32 for v in out.values())
    with pytest.raises(ValueError, match="even size"):
        ModelConfig(width=12, heads=4)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(2, 23))
def test_future_events_never_change_past_outputs(seed, cut):
    m = model()
    rng = np.random.default_rng(seed)
    x = random_events(rng, 1, 24)
    y = x.copy()
    y[:, cut:] = random_events(rng, 1, 24 - cut)
    a, b = forward(m, jnp.asarray(x)), forward(m, jnp.asarray(y))
    for key in ("risk", "tags", "lm_op"):
        np.testing.assert_allclose(np.asarray(a[key])[:, :cut], np.asarray(b[key])[:, :cut], atol=1e-5)


def test_incremental_path_equals_full_sequence_inference():
    m = model(context=6)
    x = jnp.asarray(random_events(np.random.default_rng(1), 2, 20))  # longer than the window
    full = forward(m, x)
    cache, steps = m.init_cache(2), []
    for t in range(20):
        out, cache = step(m, x[:, t], cache)
        steps.append(out)
    for key in ("risk", "tags", "lm_category", "lm_op", "lm_class"):
        inc = np.stack([np.asarray(o[key]) for o in steps], axis=1)
        np.testing.assert_allclose(inc, np.asarray(full[key]), atol=1e-5, rtol=1e-5)


def test_windowed_scoring_of_long_episodes_equals_the_incremental_path():
    from sandhop.agents.train_risk import score_episodes
    m = model(context=5)
    long = random_events(np.random.default_rng(2), 1, 40)[0]
    scored = score_episodes(m, [long, long[:7]], seq_len=12)  # 2 layers x 4 back (+1): keeps 3 of 12
    cache, risk = m.init_cache(1), []
    for t in range(40):
        out, cache = step(m, jnp.asarray(long[None, t]), cache)
        risk.append(float(out["risk"][0]))
    np.testing.assert_allclose(scored[0]["risk"], risk, atol=1e-5)
    full = forward(m, jnp.asarray(long[None]))
    np.testing.assert_allclose(scored[0]["surprise"], np.asarray(next_event_nll(full, jnp.asarray(long[None])))[0],
                               atol=1e-4)
    assert len(scored[1]["risk"]) == 7


# --------------------------------------------------------------------------- Hydra app

def compose(*overrides: str):
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    GlobalHydra.instance().clear()
    with initialize_config_module("sandhop.configs", version_base="1.3"):
        return hydra_compose("train_risk", overrides=list(overrides))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("group,name", [(g, p.stem) for g in ("model", "dataset", "experiment")
                                        for p in sorted((CONFIGS / g).glob("*.yaml"))])
def test_every_config_composes(group, name):
    cfg = compose(f"{group}={name}")
    ModelConfig(**cfg.model)
    assert cfg.dataset.name and cfg.train.epochs >= 1


# One tiny dataset and training setup for every trainer below. The suites the evaluation holds out
# are set here, so a single run serves the resume, evaluation and refusal tests; the optimiser
# settings are those of the tiny-batch test (a constant 1e-2 after one warm-up step), so its
# trainer is the runs' trainer and their programs compile once.
TINY = ("model=tiny", "dataset=small", "dataset.max_units_per_suite=12", "dataset.splits.test=[requests]",
        "dataset.splits.val=[packaging]", "train.seq_len=32", "train.batch_size=8", "train.epochs=2",
        "train.lr=1e-2", "train.final_lr_fraction=1.0", "train.warmup_steps=1", "train.weight_decay=0.0",
        "train.save_every_steps=1", "progress=false", "out_of_fold=0")   # folds: tests/test_out_of_fold.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One dataset cache for the module: the small dataset is built once, not once per run."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SANDHOP_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """Tiny runs that the tests below only read (or copy before changing): `whole`, trained in
    one go and evaluated; `part`, stopped after step 3 (mid-epoch: this data makes 2 steps an
    epoch) and then resumed to the end."""
    from sandhop.agents.train_risk import run
    base = tmp_path_factory.mktemp("runs")
    whole, part = base / "whole", base / "part"
    evaluation = run(compose(*TINY, f"out={whole}"))
    interrupted = None
    try:
        run(compose(*TINY, f"out={part}", "evaluate=false", "train.stop_after_steps=3"))
    except KeyboardInterrupt as exc:
        if "stopped after step" not in str(exc):
            raise  # a real Ctrl-C
        interrupted = exc
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        resumed = run(compose(*TINY, f"out={part}", "evaluate=false"))
    return SimpleNamespace(whole=whole, part=part, evaluation=evaluation, interrupted=interrupted,
                           resumed=resumed, log=log.getvalue())


@pytest.fixture(scope="module")
def tiny_data(cache):
    """The TINY config, its encoded splits and feature spec."""
    from sandhop.agents.train_risk import load_data
    cfg = compose(*TINY)
    data, spec, _ = load_data(cfg)
    return cfg, data, spec


def test_a_tiny_batch_is_learned(tiny_data, tmp_path):
    from sandhop.agents.train_risk import Packed, Trainer, pack, steps_per_epoch
    cfg, encoded, spec = tiny_data
    # the trainer `run` builds for TINY (same spec, model, settings and step count), so the
    # programs are the runs' ones; the batch, 4 rows of 16 events, is padded to their shape
    seq_len, batch_size = int(cfg.train.seq_len), int(cfg.train.batch_size)
    total = int(cfg.train.epochs) * steps_per_epoch(len(pack(encoded["train"], seq_len)), batch_size)
    rng = np.random.default_rng(3)
    x = np.zeros((4, seq_len, spec.width), np.int32)
    x[:, :16] = random_events(rng, 4, 16, spec)
    segment = np.zeros((4, seq_len), np.int32)
    segment[:, :16] = 1
    malicious = np.zeros((4, seq_len), np.float32)
    malicious[:, :16] = rng.random((4, 16)) < 0.3
    data = Packed(x, segment, malicious, np.zeros((4, seq_len, len(spec.tags)), np.float32))
    trainer = Trainer(tmp_path, spec, ModelConfig(**cfg.model), cfg.train, total, int(cfg.seed))
    first = trainer.evaluate_loss(data, batch_size)
    for _ in range(100):  # 50 steps already take both losses below 5% of their start
        trainer.train_epoch(data, 0, batch_size, 0)
    last = trainer.evaluate_loss(data, batch_size)
    assert last["val_lm"] < 0.3 * first["val_lm"] and last["val_risk"] < 0.3 * first["val_risk"]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _params(out: Path):
    from sandhop.agents.train_risk import load_run
    m, _, _ = load_run(out)
    return jax.tree_util.tree_leaves(nnx.state(m, nnx.Param))


def test_an_interrupted_run_resumes_where_it_stopped(runs):
    part = runs.part
    assert isinstance(runs.interrupted, KeyboardInterrupt)
    assert "resuming" in runs.log and "at step 3 (" in runs.log  # where it stopped: mid-epoch 2
    assert runs.resumed["epoch"] == 2
    whole, resumed = _params(runs.whole), _params(part)
    assert len(whole) == len(resumed) > 0
    for a, b in zip(whole, resumed):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    rows = list(csv.DictReader(open(part / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"] and "val_loss" in rows[0]
    assert (part / "config.yaml").exists() and (part / "spec.json").exists()


def test_training_evaluates_on_held_out_suites_and_novel(runs):
    result, out = runs.evaluation, runs.whole
    assert set(result["splits"]) == {"val", "test", "novel"}
    for split in ("val", "test", "novel"):
        r = result["splits"][split]
        for key in ("event_roc_auc", "test_roc_auc", "test_detection_at_1pct_fpr", "flagged_before_damage",
                    "flagged_before_damage_at_event_threshold", "event_fpr_at_event_threshold",
                    "tag_macro_f1", "ece"):
            assert key in r and 0.0 <= r[key] <= 1.0, (split, key, r.get(key))
    assert (out / "roc.png").stat().st_size > 1000 and (out / "reliability.png").exists()
    assert json.loads((out / "evaluation.json").read_text())["splits"]["test"]["episodes"] > 0


def test_resuming_with_another_model_config_is_refused(runs, tmp_path):
    from sandhop.agents.train_risk import TrainError, run
    out = copy_run(runs.whole, tmp_path / "run")
    with pytest.raises(TrainError, match="another model config"):
        run(compose(*TINY, f"out={out}", "evaluate=false", "model.width=32"))


# --------------------------------------------------------------------------- ADFA-LD

ADFA = {
    **{f"Training_Data_Master/UTD-{i:04d}.txt": " ".join(["3 4 5 6"] * (3 + i % 4)) for i in range(12)},
    **{f"Validation_Data_Master/UVD-{i:04d}.txt": " ".join(["3 4 5 6"] * 4) for i in range(6)},
    **{f"Attack_Data_Master/Adduser_{i}/UAD-Adduser-{i}-1.txt": "11 102 11 102 3 6 11 102" for i in range(1, 4)},
}


def test_adfa_experiment_and_the_score_command(tmp_path, cache, capsys):
    from sandhop.agents.train_risk import run
    from sandhop.cli import main
    data = tmp_path / "adfa"
    for rel, text in ADFA.items():
        (data / rel).parent.mkdir(parents=True, exist_ok=True)
        (data / rel).write_text(text)
    out = tmp_path / "run"
    # 4 epochs (8 steps): these attacks score far above every normal trace after one already
    result = run(compose("experiment=adfa_ld", "model=tiny", f"dataset.path={data}", f"out={out}",
                         "train.epochs=4", "train.seq_len=32", "train.batch_size=4", "progress=false",
                         "train.holdout=0.25", "train.warmup_steps=2", "train.lr=1e-2", "train.save_every_steps=0"))
    lm, stide = result["adfa_ld"]["lm"], result["adfa_ld"]["stide"]
    assert lm["n_normal"] == 6 and lm["n_attack"] == 3 and stide["n_attack"] == 3
    assert lm["roc_auc"] > 0.9  # attacks are made of calls the normal traces never make
    assert main(["adfa", "score", "--checkpoint", str(out), "--data", str(data), "--out", str(tmp_path / "s.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == len(ADFA) and {"file", "score"} == set(rows[0])
    attack = [float(r["score"]) for r in rows if r["file"].startswith("attack/")]
    normal = [float(r["score"]) for r in rows if r["file"].startswith("validation/")]
    assert min(attack) > max(normal)
    # the experiment trains backward; the command reads that from the checkpoint's config, so it
    # gives the run's own scores (a forward reading of these traces would not)
    assert result["adfa_ld"]["settings"] == {"direction": "backward", "window": 64, "mode": "surprise+novelty"}
    in_run = {r["file"]: float(r["score"]) for r in csv.DictReader(open(out / "adfa_scores.csv"))}
    for r in rows:
        if not r["file"].startswith("training/"):
            assert float(r["score"]) == pytest.approx(in_run[r["file"].rsplit("/", 1)[-1]], rel=1e-4, abs=1e-4)


def test_backward_adfa_episodes_reverse_each_trace():
    from sandhop.agents.train_risk import TrainError, adfa_episodes
    from sandhop.datasets.adfa import Trace
    traces = [Trace("training", "", "", "a", np.array([3, 4, 5, 6, 6], np.int32)),
              Trace("training", "", "", "b", np.array([192, 3], np.int32))]
    forward, spec = adfa_episodes(traces)
    backward, spec_b = adfa_episodes(traces, None, "backward")
    assert spec_b.fingerprint() == spec.fingerprint()  # same vocabulary either way
    for f, b in zip(forward.features, backward.features):
        np.testing.assert_array_equal(b, f[::-1])
        assert len(set(f[:, 1])) > 1 and (f[:, 0] == f[0, 0]).all()  # ops differ by call, the rest is fixed
    with pytest.raises(TrainError, match="dataset.direction='sideways'"):
        adfa_episodes(traces, spec, "sideways")


def test_min_window_surprise():
    from sandhop.agents.adfa_lm import Scorer, min_window_mean
    values = np.array([5.0, 1.0, 2.0, 0.0, 9.0, 1.0])
    assert min_window_mean(values, 2) == pytest.approx(1.0)      # (2 + 0) / 2
    assert min_window_mean(values, 3) == pytest.approx(1.0)      # (1 + 2 + 0) / 3
    assert min_window_mean(values, 6) == pytest.approx(3.0)      # one window: the mean
    assert min_window_mean(values, 64) == pytest.approx(3.0)     # shorter than the window: the mean
    assert min_window_mean(values, None) == pytest.approx(3.0)
    assert min_window_mean(values[:0], 2) == 0.0
    brute = min(np.mean(values[i:i + 4]) for i in range(3))
    assert min_window_mean(values, 4) == pytest.approx(brute)

    # the scorer's surprise part: NLL - entropy, without the first call (nothing predicts it)
    def output(nll, hidden):
        nll = np.asarray(nll, np.float32)
        return {"surprise": nll, "entropy": np.full_like(nll, 0.5), "hidden": np.asarray(hidden, np.float32)}
    rng = np.random.default_rng(0)
    outs = [output([0.0, 5.5, 1.5, 2.5, 0.5, 9.5, 1.5], rng.normal(size=(7, 3))) for _ in range(5)]
    scorer = Scorer.fit(outs, outs, window=2)
    surprise, novelty = scorer.raw(outs)
    np.testing.assert_allclose(surprise, 1.0)
    assert novelty.shape == (5,) and np.isfinite(novelty).all()
    assert Scorer.fit(outs, outs, window=None).parts(outs)[0][0] == pytest.approx(3.0)

    # stored as JSON; a file from before the window existed keeps its whole-trace mean
    stored = json.dumps(asdict(scorer))
    assert Scorer.from_json(stored) == scorer
    old = {k: v for k, v in asdict(scorer).items() if k != "window"}
    assert Scorer.from_json(json.dumps(old)).window is None
    with pytest.raises(ValueError, match="score window 0"):
        Scorer.from_json(json.dumps({**old, "window": 0}))


def test_a_checkpoint_refuses_data_of_another_spec(runs, tmp_path, capsys):
    from sandhop.agents.train_risk import TrainError, check_spec_file, load_run
    from sandhop.cli import main
    out = copy_run(runs.whole, tmp_path / "run")  # a copy: its spec.json is overwritten below
    other = FeatureSpec.fit(["x"], pieces=1)
    with pytest.raises(TrainError, match="trained on other data"):
        check_spec_file(out, other)
    _, spec, _ = load_run(out)
    with pytest.raises(FeatureError, match="another feature spec"):
        spec.check_compatible(other)
    assert main(["adfa", "score", "--checkpoint", str(out), "--data", str(tmp_path), "--out",
                 str(tmp_path / "s.csv")]) == 1
    assert "not ADFA-LD" in capsys.readouterr().err
    with pytest.raises(TrainError, match="not a risk-model run folder"):
        load_run(tmp_path)
    (out / "spec.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(FeatureError, match="version 99"):
        load_run(out)


def test_run_specific_parts_of_names_encode_alike_and_meaningful_ones_do_not():
    """A test's temporary file gets a new random name every run (pytest's folders a new number):
    the features, and so the risk, must not move with it."""
    spec = FeatureSpec.fit(["open"], pieces=4, piece_buckets=1 << 16)

    def row(category, target):
        return spec.encode_event(category, "open", target, "tmp", "call").tolist()
    spawn = "/usr/bin/cat '${tmp}/%s'"
    assert row("proc.spawn", spawn % "tmpgryynxwn") == row("proc.spawn", spawn % "tmpi5s8779q")
    assert row("fs.write", "${tmp}/pytest-of-root/pytest-1066/test_pager_0/tmpgryynxwn") == \
        row("fs.write", "${tmp}/pytest-of-root/pytest-7/test_pager_12/tmp_k2j9x0q")
    assert row("fs.read", "${home}/.ssh/id_rsa") != row("fs.read", "${home}/.ssh/id_ed25519")
    assert row("fs.write", "${tmp}/tmp_path_factory") != row("fs.write", "${tmp}/tmp_cache_folder")
