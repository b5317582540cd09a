"""The distribution: a built wheel installs into a fresh venv and gives the sandhop namespace only."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("enforcement", "datasets", "envs", "agents", "configs")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # Build from a copy so the checkout gets no build/ or egg-info litter.
    src = tmp_path_factory.mktemp("src") / "sandhop"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "sandhop-demo", ".venv*"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "--disable-pip-version-check", "-w", str(dist), str(src)], check=True)
    (found,) = dist.glob("sandhop-*.whl")
    return found


def test_wheel_holds_only_the_sandhop_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"sandhop", next(t for t in top if t.endswith(".dist-info"))}
    for sub in SUBPACKAGES:
        assert f"sandhop/{sub}/__init__.py" in names
    assert any(n.startswith("sandhop/datasets/data/suites/") for n in names)
    for tier in ("observe", "low", "medium", "high", "lockdown"):
        assert f"sandhop/enforcement/tiers/{tier}.policy" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sandhop = sandhop.enforcement.plugin" in text and "sandhop = sandhop.cli:main" in text


def test_wheel_installs_into_a_fresh_venv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", str(wheel)], check=True)
    probe = (
        "import importlib.util, sandhop, sandhop.enforcement.events, sandhop.enforcement.tracer\n"
        f"for sub in {SUBPACKAGES!r}: __import__('sandhop.' + sub)\n"
        "for generic in ('enforcement', 'datasets', 'envs', 'agents', 'configs'):\n"
        "    assert importlib.util.find_spec(generic) is None, generic\n"
        "from sandhop.enforcement.engine import PolicyEngine\n"
        "engine = PolicyEngine()\n"
        "assert engine.decide_target('fs.read', '${home}/.ssh/id_rsa', 'home.secret', engine.config('medium')).effect == 'deny'\n"
        "print(sandhop.__file__)\n"
    )
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True, cwd=tmp_path)
    assert str(venv) in out.stdout
    helped = subprocess.run([str(venv / "bin" / "sandhop"), "--help"], check=True, capture_output=True, text=True)
    for command in ("demo", "record", "trace", "audit"):
        assert command in helped.stdout


def test_this_environment_registers_the_plugin_and_script():
    eps = metadata.entry_points()
    assert any(ep.value == "sandhop.enforcement.plugin" for ep in eps.select(group="pytest11"))
    assert any(ep.value == "sandhop.cli:main" for ep in eps.select(group="console_scripts"))
