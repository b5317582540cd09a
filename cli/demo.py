"""`sandhop demo`: the main job, end to end, on the bundled data.

At this stage it records one bundled real suite (an sdist shipped in `datasets/data/suites/`)
with the current interpreter and prints a summary table of its trace, then builds the labelled
train / val / test / novel splits of the bundled traces (`dataset=default`: attack scenarios
injected into real traces) and prints their statistics. Steps whose results exist are reused
unless `--force`.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from importlib import resources
from pathlib import Path

BUNDLED_SUITES = "suites"


def bundled_sdists() -> dict[str, Path]:
    """name -> sdist archive shipped with sandhop."""
    folder = Path(str(resources.files("sandhop.datasets") / "data" / BUNDLED_SUITES))
    return {p.name.split("-", 1)[0].lower(): p for p in sorted(folder.glob("*.tar.gz"))}


def run_demo(out: Path, *, suite: str = "click", force: bool = False, progress=print) -> int:
    from sandhop.datasets import traces
    from sandhop.datasets.record import read_manifest, recipe_for, run_suite, unpack_sdist

    sdists = bundled_sdists()
    if suite not in sdists:
        raise ValueError(f"no bundled suite {suite!r}; bundled: {', '.join(sdists) or 'none'}")
    if importlib.util.find_spec("pytest") is None:
        raise ImportError("the demo runs a test suite and needs pytest", name="pytest")
    archive = sdists[suite]
    spec = archive.name[: -len(".tar.gz")].replace("-", "==", 1)
    recipe = recipe_for(spec)
    out = out.resolve()
    trace_root = out / "traces"
    progress(f"sandhop demo -> {out}")

    existing = next((r for r in reversed(read_manifest(trace_root))
                     if r["suite"] == recipe.spec and (trace_root / r["trace"]).exists()), None)
    if existing and not force:
        progress(f"[1/3] reusing the recording of {recipe.spec} ({existing['trace']}); --force redoes it")
        row = existing
    else:
        if force and trace_root.exists():
            shutil.rmtree(trace_root)
        work = out / "work"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        src = unpack_sdist(archive, work / "src")
        progress(f"[1/3] recording the real test suite of {recipe.spec} (bundled sdist) "
                 f"under pytest --sandhop-record; log: {work / 'record.log'}")
        result = run_suite(recipe, src, sys.executable, trace_root, work / "record.log",
                           isolated=False, extra_env={"PYTHONPATH": str(src / "src")})
        row = result.manifest_row
    progress("[2/3] summary of the trace")
    table = traces.read_traces(trace_root, suites=[recipe.spec])
    print(traces.format_summary(traces.summarise(table)))
    tests = row["tests"]
    print(f"\n{recipe.spec}: {sum(tests.values())} tests ({', '.join(f'{k} {v}' for k, v in sorted(tests.items()))}), "
          f"{row['events']} events, {row['wall_s']} s under the recorder")
    print(f"trace: {trace_root / row['trace']}")

    from sandhop.datasets import splits
    cfg = splits.SplitConfig.from_config(splits.compose(["dataset=default"]).dataset)
    root = out / "dataset"
    reused = (root / splits.MANIFEST).exists() and not force
    progress(f"[3/3] {'reusing' if reused else 'building'} the labelled splits (dataset=default: attack "
             f"scenarios injected into the bundled traces of real suites) -> {root}")
    root = splits.build(cfg, root, force=force, progress=sys.stderr.isatty())
    print(splits.format_stats(splits.read_manifest(root)))
    return 0
