"""Bootstrap that makes child Python processes trace themselves.

A recording puts a folder on the children's PYTHONPATH holding a `sitecustomize.py` that starts
the tracer when the tracing variables are set, then hands over to whatever `sitecustomize` the
interpreter would otherwise have run. Beside it lies a copy of the few stdlib-only modules the
tracer needs (`pkg/sandhop/enforcement/...`), used only where sandhop itself is not importable
(a throwaway virtualenv, a different interpreter). Children started with `-I`, `-E` or `-S`, or
by a non-Python program that clears the environment, are not traced (their spawn still is).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

_MODULES = ("events.py", "tracer.py", "plugin.py", "boot.py", "policy.py", "engine.py", "guard.py")

MARKER = ".sandhop-boot"

SITECUSTOMIZE = '''\
# sandhop bootstrap (recorder and guard): generated, safe to delete after the run.
import os as _os
import sys as _sys

MARKER = "@MARKER@"


def _sandhop_start():
    if not (_os.environ.get("SANDHOP_SPOOL") or _os.environ.get("SANDHOP_GUARD")):
        return
    try:
        from sandhop.enforcement import tracer
    except ImportError:
        _sys.path.append(_os.path.join(_os.path.dirname(__file__), "pkg"))
        from sandhop.enforcement import tracer
    tracer.install_from_env()


def _forget_boot_dirs():
    """Take sandhop's folders back off sys.path: a recorded test must see the sys.path it would
    see unrecorded (some compare it). The modules are loaded; nothing needs the folders now."""
    def is_boot(p):
        p = _os.path.abspath(p or ".")
        return any(_os.path.isfile(_os.path.join(d, MARKER)) for d in (p, _os.path.dirname(p)))
    _sys.path[:] = [p for p in _sys.path if not is_boot(p)]


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
except Exception as _exc:
    if _os.environ.get("SANDHOP_GUARD"):  # enforcing: fail closed, never run unguarded
        _sys.stderr.write(f"sandhop: the guard could not start in pid {_os.getpid()} ({_exc!r}); "
                          "refusing to run this process unguarded\\n")
        _os._exit(126)
    # recording only: tracing must never stop the child from running
    _sys.stderr.write(f"sandhop: tracing disabled in pid {_os.getpid()}: {_exc!r}\\n")
_forget_boot_dirs()
_chain()
'''.replace("@MARKER@", MARKER)


def make_boot_dir(boot_dir: str | os.PathLike) -> Path:
    """Write the sitecustomize and a copy of the tracer's modules into `boot_dir`."""
    boot = Path(boot_dir)
    pkg = boot / "pkg" / "sandhop" / "enforcement"
    pkg.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent
    for name in _MODULES:
        shutil.copyfile(here / name, pkg / name)
    shutil.copytree(here / "tiers", pkg / "tiers", dirs_exist_ok=True)
    (pkg / "__init__.py").write_text('"""Copy of sandhop.enforcement for traced children."""\n')
    (pkg.parent / "__init__.py").write_text('"""Copy of sandhop for traced children."""\n')
    (boot / "sitecustomize.py").write_text(SITECUSTOMIZE)
    (boot / MARKER).write_text("a sandhop recorder bootstrap folder\n")
    return boot
