"""sandhop: dynamic, learned sandboxing of test execution."""

__version__ = "0.1.0"
