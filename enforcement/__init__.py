"""sandhop.enforcement: event model, recorder, and (later) the policy engine and runtime.

Kept free of heavy imports: the recorder loads this package into every traced process.
"""
