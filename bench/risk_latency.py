"""Risk model speed on this machine: per-event latency in JAX and in the numpy runtime, batch
throughput in JAX, and (with an artifact) the runtime manager's whole per-event step.

    python bench/risk_latency.py [--model small] [--events 2000] [--batch 64] [--seq-len 256]
                                 [--artifact DIR]

Incremental: one event at a time through the jitted `RiskModel.step` with its key/value cache
(batch 1, as the live enforcer sees events), timed per call after a warm-up; p50 and p99.
Numpy: the same events, one at a time, through `RiskRuntime.step` (what `--sandhop-enforce`
runs) built from the same weights, its prefix cache off so every event runs the network; it runs
straight through like the JAX loop (no reset between tests, so once the key/value cache is full
every event attends over the whole context, the dearest case); p50, p99, the ratio JAX p50 /
numpy p50, and the largest risk-logit difference between the two over the first events (they
compute the same model). Numpy batches: the same events read by `RiskRuntime.run` in batches of 8
and of 64 (how the runtime reads the quiet events it defers on its fast path), per event. Batch:
the jitted full-sequence forward over `--batch` sequences of `--seq-len` events, in events per
second. Weights are freshly initialised (speed does not
depend on training). Real events come from the bundled traces, encoded with a spec fitted on
them.

With `--artifact DIR` (made by `sandhop export`): the runtime's whole per-event path, timed per
event, on the same traces' raw events, each test starting an episode at the artifact's base tier:
`Manager.event` (the artifact's own risk model, the observation, the policy's action and its
effect on the test's config), a `PolicyEngine` decision under the config it returns, and
`Manager.decided`; caches on, as in a real run: p50 and p99 over all events, and apart for the
quiet events (the fast path: no score, no policy) and the scored ones (which also read the quiet
events deferred before them), with the quiet share and the share of events the risk model's
prefix cache answered. The last output line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sandhop.agents.export import risk_weights
from sandhop.agents.features import encode_episodes, fit_spec
from sandhop.agents.risk_model import ModelConfig, RiskModel
from sandhop.datasets.traces import read_traces
from sandhop.enforcement.engine import PolicyEngine
from sandhop.enforcement.runtime import Artifact, ArtifactError, Manager, RiskRuntime

DATA = Path(__file__).resolve().parents[1] / "datasets" / "data" / "traces"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
WARM_UP = 50


def percentiles_us(times_ns: list[int]) -> tuple[float, float]:
    times_us = np.array(times_ns) / 1e3
    return round(float(np.percentile(times_us, 50)), 1), round(float(np.percentile(times_us, 99)), 1)


def trace_episodes(columns: dict) -> list[list[int]]:
    """Row indices of each test or collector in event order, grouped as `encode_episodes` does
    (session rows, which belong to no test, dropped)."""
    keys = list(zip(columns["suite"], columns["run_id"], columns["test_id"]))
    groups: dict[tuple, list[int]] = {}
    for i in sorted(range(len(keys)), key=lambda i: (keys[i], columns["seq"][i])):
        if keys[i][2]:
            groups.setdefault(keys[i], []).append(i)
    return list(groups.values())


def time_manager(artifact: Artifact, columns: dict, n_events: int) -> dict:
    """The runtime's whole per-event path, per event: manager step, engine decision, `decided`."""
    engine = PolicyEngine()
    manager = Manager(artifact, engine)
    start = engine.config(artifact.base_tier)
    stay = manager.actions[0]
    cat, op, target, cls, phase, t_ns = (columns[c] for c in ("category", "op", "target", "target_class", "phase", "t_ns"))
    order = [(i, j == 0) for rows in trace_episodes(columns) for j, i in enumerate(rows)]
    n_events = n_events or len(order) - WARM_UP
    times, actions, quiet = [], 0, []
    risk = artifact.risk
    for k in range(WARM_UP + n_events):
        if k == WARM_UP:
            hits, misses = risk.hits, risk.misses
        i, first = order[k % len(order)]
        if first:
            manager.begin(columns["test_id"][i], start)  # a new test: its own episode, as the guard does
        t0 = time.perf_counter_ns()
        config, said = manager.event(cat[i], op[i], target[i], cls[i], phase[i], t_ns[i])
        manager.decided(engine.decide_target(cat[i], target[i], cls[i], config).effect)
        elapsed = time.perf_counter_ns() - t0
        if k >= WARM_UP:
            times.append(elapsed)
            quiet.append(said["risk"] is None)
            actions += said["action"] != stay
    p50, p99 = percentiles_us(times)
    quiet = np.array(quiet)
    scored_p50, scored_p99 = percentiles_us(np.array(times)[~quiet].tolist() or [0])
    quiet_p50, _ = percentiles_us(np.array(times)[quiet].tolist() or [0])
    hits, misses = risk.hits - hits, risk.misses - misses
    return {"manager_step_p50_us": p50, "manager_step_p99_us": p99, "manager_step_mean_us": round(np.mean(times) / 1e3, 1),
            "manager_events": n_events, "manager_quiet_share": round(float(quiet.mean()), 3),
            "manager_scored_step_p50_us": scored_p50, "manager_scored_step_p99_us": scored_p99,
            "manager_quiet_step_p50_us": quiet_p50,
            "manager_actions": actions, "manager_prefix_cache_hit_rate": round(hits / max(hits + misses, 1), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help="a configs/model/*.yaml name (default small)")
    ap.add_argument("--events", type=int, default=2000, help="incremental steps to time")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5, help="timed batch forwards")
    ap.add_argument("--manager-events", type=int, default=0,
                    help="events of the manager timing (default 0: every event of the traces, once)")
    ap.add_argument("--artifact", metavar="DIR", default=None,
                    help="also time the runtime manager's whole per-event step with this exported artifact")
    args = ap.parse_args()
    artifact = None
    if args.artifact:
        try:
            artifact = Artifact.load(args.artifact)
        except ArtifactError as exc:
            raise SystemExit(f"--artifact {args.artifact}: {exc}") from None

    import yaml
    cfg = ModelConfig(**yaml.safe_load((CONFIGS / f"{args.model}.yaml").read_text()))
    columns = read_traces(DATA, suites=["flask==3.1.3", "requests==2.34.2", "werkzeug==3.1.9"]).to_pydict()
    spec = fit_spec([columns])
    events = np.concatenate(encode_episodes(columns, spec).features)
    model = RiskModel(spec, cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, x, cache):
        out, cache = nnx.merge(graphdef, state).step(x, cache)
        return out["risk"], out["lm_op"], cache

    @jax.jit
    def forward(state, x):
        out = nnx.merge(graphdef, state)(x)
        return out["risk"], out["lm_op"]

    cache = model.init_cache(1)
    for i in range(WARM_UP):  # warm-up: compile, and fill part of the cache
        r, _, cache = step(state, jnp.asarray(events[i % len(events)][None]), cache)
    r.block_until_ready()
    times = []
    for i in range(args.events):
        x = jnp.asarray(events[i % len(events)][None])
        t0 = time.perf_counter_ns()
        r, _, cache = step(state, x, cache)
        r.block_until_ready()
        times.append(time.perf_counter_ns() - t0)
    jax_p50, jax_p99 = percentiles_us(times)

    # numpy: the enforcer's runtime with the same weights, over the same events in the same order;
    # its prefix cache off (cache_limit=0), so every event runs the network, as in JAX
    runtime = RiskRuntime(risk_weights(model), spec, cfg.as_dict(), {"a": 1.0, "b": 0.1, "c": 0.0}, cache_limit=0)
    probe_cache, probe = model.init_cache(1), runtime.new_state()
    logit_diff = 0.0
    for row in events[:2 * cfg.context]:  # past a full context, so the ring buffers wrap in both
        r, _, probe_cache = step(state, jnp.asarray(row[None]), probe_cache)
        logit_diff = max(logit_diff, abs(float(r[0]) - runtime.step(probe, row)[2]))
    np_state = runtime.new_state()
    for i in range(WARM_UP):
        runtime.step(np_state, events[i % len(events)])
    np_times = []
    for i in range(args.events):
        row = events[i % len(events)]
        t0 = time.perf_counter_ns()
        runtime.step(np_state, row)
        np_times.append(time.perf_counter_ns() - t0)
    np_p50, np_p99 = percentiles_us(np_times)
    # numpy, events read in batches (the fast path: quiet events wait for the next scored one)
    batched = {}
    for size in (8, 64):
        np_state, per_event = runtime.new_state(), []
        for i in range(0, args.events, size):
            rows = np.stack([events[j % len(events)] for j in range(i, i + size)])
            embedded = np.stack([runtime.embed(r) for r in rows])
            t0 = time.perf_counter_ns()
            runtime.run(np_state, rows, embedded)
            per_event.append((time.perf_counter_ns() - t0) / size)
        batched[size] = round(float(np.median(per_event)) / 1e3, 1)

    n = args.batch * args.seq_len
    reps = -(-n // len(events))
    batch = jnp.asarray(np.tile(events, (reps, 1))[:n].reshape(args.batch, args.seq_len, -1))
    forward(state, batch)[0].block_until_ready()
    durations = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        forward(state, batch)[0].block_until_ready()
        durations.append(time.perf_counter() - t0)
    throughput = n / float(np.median(durations))

    params = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    result = {
        "model": args.model, "params": params, "context": cfg.context, "devices": str(jax.devices()[0]),
        "incremental_p50_us": jax_p50, "incremental_p99_us": jax_p99, "incremental_events": args.events,
        "numpy_step_p50_us": np_p50, "numpy_step_p99_us": np_p99,
        "jax_over_numpy_p50": round(jax_p50 / np_p50, 2), "numpy_vs_jax_max_logit_diff": float(f"{logit_diff:.2g}"),
        "numpy_batch8_per_event_us": batched[8], "numpy_batch64_per_event_us": batched[64],
        "batch_events_per_s": round(throughput), "batch": args.batch, "seq_len": args.seq_len,
    }
    if artifact is not None:
        result.update(artifact=str(artifact.root), artifact_model=artifact.manifest["risk"]["model"],
                      **time_manager(artifact, columns, args.manager_events))
    print(f"{args.model} model ({params:,} parameters, context {cfg.context}) on {result['devices']}:")
    print(f"  incremental step, batch 1, JAX:   p50 {jax_p50} us, p99 {jax_p99} us")
    print(f"  incremental step, batch 1, numpy: p50 {np_p50} us, p99 {np_p99} us "
          f"(JAX p50 / numpy p50 {result['jax_over_numpy_p50']}; risk logits agree to {logit_diff:.1e})")
    print(f"  numpy, events read in batches (the fast path's deferred quiet events): {batched[8]} us per event "
          f"in batches of 8, {batched[64]} us in batches of 64 (median)")
    print(f"  full-sequence forward, {args.batch} x {args.seq_len}: {result['batch_events_per_s']:,} events/s")
    if artifact is not None:
        print(f"  runtime manager step (artifact {artifact.root.name}: risk, observation, policy, action, "
              f"decision): p50 {result['manager_step_p50_us']} us, p99 {result['manager_step_p99_us']} us, mean "
              f"{result['manager_step_mean_us']} us ({result['manager_actions']} actions in {result['manager_events']} events; "
              f"{result['manager_quiet_share']:.0%} quiet, p50 {result['manager_quiet_step_p50_us']} us; scored "
              f"p50 {result['manager_scored_step_p50_us']} us, p99 {result['manager_scored_step_p99_us']} us; the "
              f"prefix cache answered {result['manager_prefix_cache_hit_rate']:.0%} of the events the model read)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
