"""sandhop.envs: the sandbox-manager environments (Gymnasium and its JAX twin)."""
