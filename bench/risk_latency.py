"""Risk model speed in JAX on this machine: per-event incremental latency and batch throughput.

    python bench/risk_latency.py [--model small] [--events 2000] [--batch 64] [--seq-len 256]

Incremental: one event at a time through the jitted `RiskModel.step` with its key/value cache
(batch 1, as the live enforcer sees events), timed per call after a warm-up; p50 and p99.
Batch: the jitted full-sequence forward over `--batch` sequences of `--seq-len` events, in
events per second. Weights are freshly initialised (speed does not depend on training). Real
events come from the bundled traces, encoded with a spec fitted on them. The last output line
is one JSON object.
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

from sandhop.agents.features import encode_episodes, fit_spec
from sandhop.agents.risk_model import ModelConfig, RiskModel
from sandhop.datasets.traces import read_traces

DATA = Path(__file__).resolve().parents[1] / "datasets" / "data" / "traces"
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small", help="a configs/model/*.yaml name (default small)")
    ap.add_argument("--events", type=int, default=2000, help="incremental steps to time")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5, help="timed batch forwards")
    args = ap.parse_args()

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
    for i in range(50):  # warm-up: compile, and fill part of the cache
        r, _, cache = step(state, jnp.asarray(events[i % len(events)][None]), cache)
    r.block_until_ready()
    times = []
    for i in range(args.events):
        x = jnp.asarray(events[i % len(events)][None])
        t0 = time.perf_counter_ns()
        r, _, cache = step(state, x, cache)
        r.block_until_ready()
        times.append(time.perf_counter_ns() - t0)
    times_us = np.array(times) / 1e3

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
        "incremental_p50_us": round(float(np.percentile(times_us, 50)), 1),
        "incremental_p99_us": round(float(np.percentile(times_us, 99)), 1),
        "incremental_events": args.events,
        "batch_events_per_s": round(throughput), "batch": args.batch, "seq_len": args.seq_len,
    }
    print(f"{args.model} model ({params:,} parameters, context {cfg.context}) on {result['devices']}:")
    print(f"  incremental step, batch 1: p50 {result['incremental_p50_us']} us, p99 {result['incremental_p99_us']} us")
    print(f"  full-sequence forward, {args.batch} x {args.seq_len}: {result['batch_events_per_s']:,} events/s")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
