"""PPO training throughput: environment steps per second, rollout and update together.

    python bench/ppo_throughput.py [--dataset default] [--chunks 3] [agent overrides: agent.num_envs=4096 ...]

Runs the jitted chunk of `sandhop.agents.ppo` (the agent config `configs/agent/ppo.yaml`, or
overrides) on the train split's twin: one compile call, then `--chunks` timed calls. One env
step counts once however many epochs reuse it. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from sandhop.agents.train_agent import Trainer, use_compilation_cache  # first: one XLA CPU device per core

import jax  # noqa: E402
import numpy as np  # noqa: E402

from sandhop.agents.ppo import PPOConfig  # noqa: E402
from sandhop.envs import data as envdata  # noqa: E402
from sandhop.envs.jax_env import JaxSandboxEnv  # noqa: E402
from sandhop.envs.spec import EnvSpec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="default")
    parser.add_argument("--chunks", type=int, default=3, help="timed chunks after the compile call")
    parser.add_argument("overrides", nargs="*", help="agent.KEY=VALUE (Hydra syntax)")
    args = parser.parse_args()
    from hydra import compose, initialize_config_module
    with initialize_config_module("sandhop.configs", version_base="1.3"):
        cfg = compose("train_agent", overrides=[f"dataset={args.dataset}", *args.overrides])
    use_compilation_cache()
    config = PPOConfig.from_config(cfg.agent)
    spec = EnvSpec.from_config(cfg.env)
    env = JaxSandboxEnv.from_episodes(envdata.load("train", cfg.dataset, spec), spec)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(Path(tmp), config, env, 0)
        trainer.start()
        t0 = time.perf_counter()
        trainer.runner, m = trainer.chunk(trainer.runner, trainer.hparams, env.params)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(args.chunks):
            t0 = time.perf_counter()
            trainer.runner, m = trainer.chunk(trainer.runner, trainer.hparams, env.params)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
    steps = config.chunk_updates * config.batch_size * config.num_members
    sps = [steps / t for t in times]
    result = {"bench": "ppo_throughput", "dataset": args.dataset, "cores": len(os.sched_getaffinity(0)),
              "devices": jax.device_count(), "member_devices": trainer.devices, "num_envs": config.num_envs, "num_steps": config.num_steps,
              "update_epochs": config.update_epochs, "num_minibatches": config.num_minibatches,
              "hidden": config.hidden, "members": config.num_members, "steps_per_chunk": steps,
              "first_call_s": round(compile_s, 2), "steps_per_s_median": round(float(np.median(sps))),
              "steps_per_s": [round(s) for s in sps], "target": 500_000}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
