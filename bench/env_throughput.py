"""Environment steps per second: the Gymnasium env and its JAX twin, side by side in one run.

    python bench/env_throughput.py [--dataset small] [--split train] [--envs 4096] [--steps 256]

Both replay the same split under the same random masked policy (each step a uniformly drawn
action, `stay` where the mask forbids it). Gymnasium: one `SandboxManagerEnv` (the bare env, no wrappers, so its figure is
its best), reset whenever an episode ends, for `--gym-steps` steps. Twin: `--envs` environments
vmapped and split over one XLA CPU device per core (`pmap`), `--steps` steps per `lax.scan`
inside one jit (autoreset included), timed over `--repeat` calls after a compile call; the
policy draws its actions inside the same jit. The
last output line is one JSON object with both figures and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import time

# One XLA CPU device per core: the twin's environments are split across them (a single device
# runs one computation on one core).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={len(os.sched_getaffinity(0))}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sandhop.envs import data as envdata  # noqa: E402
from sandhop.envs.jax_env import JaxSandboxEnv, hash32  # noqa: E402
from sandhop.envs.sandbox_env import SandboxManagerEnv  # noqa: E402
from sandhop.envs.spec import EnvSpec  # noqa: E402


def gym_steps_per_s(episodes: envdata.Episodes, spec: EnvSpec, steps: int, seed: int = 0) -> float:
    env = SandboxManagerEnv(episodes=episodes, env=spec.as_dict())
    actions = np.random.default_rng(seed).integers(env.action_space.n, size=steps)
    obs, _ = env.reset(seed=seed)
    t0 = time.perf_counter()
    for a in actions:
        obs, _, terminated, truncated, _ = env.step(a if obs["action_mask"][a] else 0)
        if terminated or truncated:
            obs, _ = env.reset()
    return steps / (time.perf_counter() - t0)


def random_masked(seed: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
    """The random masked policy: a uniformly drawn action per environment, `stay` where it is
    masked (integer hash of the step's seed and the environment's id: no PRNG-key splitting)."""
    action = (hash32(ids ^ seed) % jnp.uint32(mask.shape[-1])).astype(jnp.int32)
    return jnp.where(jnp.take_along_axis(mask, action[:, None], -1)[:, 0] > 0, action, 0)


def twin_rollout(twin: JaxSandboxEnv, n_envs: int, steps: int, devices: list):
    """A jitted scan of `steps` steps of `n_envs` environments, split evenly over `devices`."""
    params = twin.params
    per = n_envs // len(devices)
    reset = jax.vmap(twin.reset, in_axes=(0, None))
    step = jax.vmap(twin.step, in_axes=(0, 0, None))

    def run(seed, ids, obs, state):
        def body(carry, seed):
            obs, state, total = carry
            obs, state, reward, _, _, _ = step(state, random_masked(seed, ids, obs["action_mask"]), params)
            return (obs, state, total + reward.sum()), None
        seeds = hash32(seed + jnp.arange(steps, dtype=jnp.uint32))
        (obs, state, total), _ = jax.lax.scan(body, (obs, state, jnp.float32(0)), seeds)
        return obs, state, total

    keys = jax.random.split(jax.random.key(0), n_envs).reshape(len(devices), per)
    obs, state = jax.pmap(reset, in_axes=(0, None), devices=devices)(keys, params)
    ids = (jnp.arange(n_envs, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)).reshape(len(devices), per)
    return jax.pmap(run, in_axes=(None, 0, 0, 0), devices=devices), ids, obs, state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="small", help="a dataset config name (default small)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--envs", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=256, help="steps per jitted scan")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gym-steps", type=int, default=50_000)
    ap.add_argument("--devices", type=int, default=0, help="CPU devices for the twin (0: one per core)")
    args = ap.parse_args()

    spec = EnvSpec()
    t0 = time.perf_counter()
    episodes = envdata.load(args.split, args.dataset, spec, progress=True)
    twin = JaxSandboxEnv.from_episodes(episodes, spec)
    prepare_s = time.perf_counter() - t0

    devices = jax.local_devices()[: args.devices or None]
    run, ids, obs, state = twin_rollout(twin, args.envs, args.steps, devices)
    obs, state, total = run(jnp.uint32(1), ids, obs, state)
    total.block_until_ready()
    durations = []
    for r in range(args.repeat):
        t0 = time.perf_counter()
        obs, state, total = run(jnp.uint32(2 + r), ids, obs, state)
        total.block_until_ready()
        durations.append(time.perf_counter() - t0)
    twin_sps = args.envs * args.steps / float(np.median(durations))
    gym_sps = gym_steps_per_s(episodes, spec, args.gym_steps)

    result = {"dataset": args.dataset, "split": args.split, "episodes": len(episodes), "events": episodes.n_events,
              "distinct_events": len(episodes.targets), "prepare_s": round(prepare_s, 2),
              "gym_steps_per_s": round(gym_sps), "twin_steps_per_s": round(twin_sps), "twin_envs": args.envs,
              "twin_scan_steps": args.steps, "twin_devices": len(devices), "ratio": round(twin_sps / gym_sps, 1), "devices": str(jax.devices()[0])}
    print(f"{args.dataset}/{args.split}: {len(episodes):,} tests, {episodes.n_events:,} events "
          f"({len(episodes.targets):,} distinct); decision table and risk inputs in {prepare_s:.1f} s")
    print(f"  Gymnasium env (real engine per step): {gym_sps:,.0f} steps/s")
    print(f"  JAX twin ({args.envs} envs on {len(devices)} CPU devices x {args.steps} steps per jit): "
          f"{twin_sps:,.0f} steps/s")
    print(f"  ratio: {twin_sps / gym_sps:,.0f}x")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
