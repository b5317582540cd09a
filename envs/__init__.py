"""sandhop.envs: the sandbox-manager environments (Gymnasium and its JAX twin).

Importing this package registers `sandhop/SandboxManager-v0` with Gymnasium (also reachable
without an import as `gymnasium.make("sandhop.envs:sandhop/SandboxManager-v0")`).
"""

ENV_ID = "sandhop/SandboxManager-v0"


def register() -> None:
    import gymnasium
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(ENV_ID, entry_point="sandhop.envs.sandbox_env:SandboxManagerEnv",
                           vector_entry_point=None, disable_env_checker=False)


try:
    register()
except ImportError:  # the base install has no gymnasium; the env needs sandhop[train]
    pass
