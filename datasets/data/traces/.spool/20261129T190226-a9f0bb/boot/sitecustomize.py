# sandhop recorder bootstrap: generated, safe to delete after the run.
import os as _os
import sys as _sys


def _sandhop_start():
    if not _os.environ.get("SANDHOP_SPOOL"):
        return
    try:
        from sandhop.enforcement import tracer
    except ImportError:
        _sys.path.append(_os.path.join(_os.path.dirname(__file__), "pkg"))
        from sandhop.enforcement import tracer
    tracer.install_from_env()


def _chain():
    """Run the sitecustomize this one shadows, as the interpreter would have."""
    import importlib.machinery
    import importlib.util
    here = _os.path.dirname(_os.path.abspath(__file__))
    rest = [p for p in _sys.path if _os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


try:
    _sandhop_start()
except Exception as _exc:  # tracing must never stop the child from running
    _sys.stderr.write(f"sandhop: tracing disabled in pid {_os.getpid()}: {_exc!r}\n")
_chain()
