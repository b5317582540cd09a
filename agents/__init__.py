"""sandhop.agents: the risk model, the sandbox manager and their training entry points."""
