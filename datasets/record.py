"""Record a real test suite: what `sandhop record NAME==VERSION` and `sandhop demo` run.

A recording downloads the suite's sdist, installs it with its test requirements into a throwaway
virtualenv, runs its tests under `pytest --sandhop-record`, converts the spooled trace to
Parquet, and appends one row to the dataset's `manifest.jsonl`. The venv has no sandhop: the
plugin and tracer are loaded from a copy put on its PYTHONPATH (see `enforcement/boot.py`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from sandhop.datasets import traces
from sandhop.datasets.suites import SUITES, SuiteRecipe, pip_install_args, pytest_argv
from sandhop.enforcement.boot import make_boot_dir
from sandhop.enforcement.plugin import SPOOL_DIRNAME

MANIFEST = "manifest.jsonl"


class RecordError(RuntimeError):
    """A recording could not be made; the message says which step failed and what to do."""


@dataclass(frozen=True)
class RecordResult:
    suite: str
    trace: Path
    manifest_row: dict


def read_manifest(root: Path) -> list[dict]:
    """The rows of a dataset's manifest, oldest first (empty if there is none yet)."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def recipe_for(spec: str) -> SuiteRecipe:
    """The recipe for NAME==VERSION: the known one, or a generic one for other suites."""
    name, sep, version = spec.partition("==")
    if not sep or not name or not version:
        raise RecordError(f"suite {spec!r} must be written NAME==VERSION, e.g. click==8.5.1")
    known = SUITES.get(name.lower())
    if known is None:
        return SuiteRecipe(name=name.lower(), version=version, requirements=("pytest",),
                           notes="generic recipe: no tested recipe for this suite")
    if known.version != version:
        from dataclasses import replace
        return replace(known, version=version, notes=f"recipe tested with {known.version}; {known.notes}")
    return known


def _run(cmd: list[str], *, log: Path, cwd: Path | None = None, env: dict | None = None,
         what: str) -> subprocess.CompletedProcess:
    with open(log, "a") as fh:
        fh.write(f"\n$ {shlex.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 and what:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RecordError(f"{what} failed (exit {proc.returncode}); full log: {log}\n{tail}")
    return proc


def fetch_sdist(recipe: SuiteRecipe, work: Path, log: Path) -> Path:
    """Download and unpack the sdist; returns the source root."""
    dl = work / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          "--disable-pip-version-check", recipe.spec, "-d", str(dl)], log=log,
         what=f"downloading the sdist of {recipe.spec} (is the name and version on the package index?)")
    archives = sorted(dl.iterdir())
    if not archives:
        raise RecordError(f"pip downloaded nothing for {recipe.spec}; see {log}")
    return unpack_sdist(archives[0], work / "src")


def unpack_sdist(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    else:
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    roots = [p for p in dest.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise RecordError(f"{archive.name} does not unpack to a single folder")
    return roots[0]


def make_venv(recipe: SuiteRecipe, src: Path, work: Path, log: Path) -> Path:
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], log=log, what="creating the virtualenv")
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
          *pip_install_args(recipe, str(src))],
         log=log, what=f"installing {recipe.spec} and its test requirements")
    return python


def suite_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment for running another project's pytest: without the options and
    the worker identity of a pytest running us (PYTEST_ADDOPTS, an xdist worker's PYTEST_XDIST_*,
    which make plugins such as pytest-benchmark believe they run under xdist), plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTEST_ADDOPTS", "PYTEST_CURRENT_TEST") and not k.startswith("PYTEST_XDIST_")}
    env.update(extra or {})
    return env


def pytest_command(recipe: SuiteRecipe, python: str | Path, out: Path, *, load_plugin: bool) -> list[str]:
    """`load_plugin`: the interpreter has no sandhop installed, so name the plugin explicitly.

    Option values are joined with `=`: pytest looks for its ini file above every argument that
    is an existing path, and the trace folder must not lend the suite another project's config.
    """
    return [str(python), "-m", "pytest", *pytest_argv(recipe),
            *(["-p", "sandhop.enforcement.plugin"] if load_plugin else []),
            f"--sandhop-record={out}", f"--sandhop-suite={recipe.spec}"]


def run_suite(recipe: SuiteRecipe, src: Path, python: str | Path, out: Path, log: Path, *,
              isolated: bool, extra_env: dict[str, str] | None = None) -> RecordResult:
    """Run the suite's tests under the recorder, convert the trace, append the manifest row.

    `isolated`: `python` is a venv without sandhop; the plugin is loaded from a copy.
    """
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = suite_env(extra_env)
    # A fresh temp root: ${tmp} paths come out the same on every recording, and pytest does not
    # spend the first test cleaning up basetemp folders other runs left behind.
    tmp = log.parent / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    env["TMPDIR"] = str(tmp)
    if isolated:
        boot = make_boot_dir(log.parent / "sandhop-boot")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(boot / "pkg"), env.get("PYTHONPATH", "")) if p)
    runs_before = set(out.glob("suite=*/run-*.parquet"))
    spools_before = set((out / SPOOL_DIRNAME).glob("*"))
    cmd = pytest_command(recipe, python, out, load_plugin=isolated)
    started = time.time()
    proc = _run(cmd, cwd=src, env=env, log=log, what="")
    wall = time.time() - started
    if proc.returncode not in (0, 1):  # 1: some tests failed, which is data, not an error
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-20:])
        raise RecordError(f"pytest could not run the {recipe.spec} suite (exit {proc.returncode}); "
                          f"log: {log}\n{tail}")
    # Where sandhop (with pyarrow) ran the tests, the plugin converted the trace itself; in a
    # throwaway venv it left the spool for us.
    for spool in sorted(set((out / SPOOL_DIRNAME).glob("*")) - spools_before):
        traces.convert_spool(spool, out)
        shutil.rmtree(spool)
    new = sorted(set(out.glob("suite=*/run-*.parquet")) - runs_before)
    if len(new) != 1:
        raise RecordError(f"expected one new trace under {out}, found {len(new)}; log: {log}")
    trace = new[0]
    run_info = traces.read_run_info(trace)
    table = traces.read_traces(trace)
    row = {
        "suite": recipe.spec, "name": recipe.name, "version": recipe.version,
        "run_id": run_info["run_id"], "trace": str(trace.relative_to(out)),
        "python": run_info["python"], "platform": platform.platform(),
        "tests": run_info.get("outcomes", {}),
        "deselected": [asdict(d) for d in recipe.deselect],
        "events": table.num_rows,
        "events_by_category": dict(sorted(Counter(table.column("category").to_pylist()).items())),
        "wall_s": round(wall, 2),
        "command": shlex.join(["python", *cmd[1:]]).replace(str(out), "$OUT"),
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(out / MANIFEST, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return RecordResult(recipe.spec, trace, row)


def record(spec: str, out: Path, *, keep: bool = False, progress=print) -> RecordResult:
    """`sandhop record NAME==VERSION --out DIR`: everything a user would otherwise do by hand."""
    recipe = recipe_for(spec)
    work = Path(tempfile.mkdtemp(prefix=f"sandhop-record-{recipe.name}-"))
    log = work / "record.log"
    try:
        progress(f"[1/4] downloading the sdist of {recipe.spec}")
        src = fetch_sdist(recipe, work, log)
        progress("[2/4] installing it and its test requirements into a throwaway venv")
        python = make_venv(recipe, src, work, log)
        progress(f"[3/4] running its tests under the recorder (log: {log})")
        result = run_suite(recipe, src, python, out, log, isolated=True)
        progress(f"[4/4] wrote {result.trace} and a row of {out / MANIFEST}")
        return result
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def record_local(spec: str, source: Path, out: Path, *, progress=print) -> RecordResult:
    """`sandhop record NAME==VERSION --source DIR`: a suite already on disk (its tests under
    DIR/tests), run with this interpreter, so it needs what it imports installed here (the
    bundled web shop: sandhop[browser] and Debian's chromium)."""
    recipe = recipe_for(spec)
    source = Path(source).resolve()
    if not (source / "tests").is_dir():
        raise RecordError(f"{source} has no tests/ folder; --source names a suite's root (its tests in tests/)")
    recipe = SuiteRecipe(name=recipe.name, version=recipe.version, requirements=(), install_from_source=False)
    work = Path(tempfile.mkdtemp(prefix=f"sandhop-record-{recipe.name}-"))
    try:
        progress(f"running the tests of {source} under the recorder (log: {work / 'record.log'})")
        result = run_suite(recipe, source, sys.executable, out, work / "record.log", isolated=False)
        progress(f"wrote {result.trace} and a row of {out / MANIFEST}")
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)
