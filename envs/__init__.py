"""sandhop.envs: the sandbox-manager environments (Gymnasium and its JAX twin).

`import gymnasium, sandhop.envs` registers `sandhop/SandboxManager-v0` with Gymnasium (as does
importing `sandhop.envs.sandbox_env`; the id is also reachable without an import as
`gymnasium.make("sandhop.envs:sandhop/SandboxManager-v0")`). Importing this package alone does
not import Gymnasium: the live runtime (`sandhop.envs.spec`) must start fast, in every child
process of a managed test that needs it.
"""

import sys

ENV_ID = "sandhop/SandboxManager-v0"


def register() -> None:
    import gymnasium
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(ENV_ID, entry_point="sandhop.envs.sandbox_env:SandboxManagerEnv",
                           vector_entry_point=None, disable_env_checker=False)


if "gymnasium" in sys.modules:
    register()
