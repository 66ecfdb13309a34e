"""The package installs as one: `python -m build` makes an sdist and a wheel (the wheel built from the sdist, so the
sdist is complete), their metadata is complete, and the wheel installed into a fresh virtual environment, with no
clone beside it, runs `preftune --version`, `preftune --help` and a short `preftune train` on a file. pip takes the
dependencies from its cache or the package index (torch==2.13.0 from the machine's wheels where it has them)."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import preftune
from tests.conftest import PAIRS, write_jsonl

pytestmark = pytest.mark.slow  # a build and a virtual environment with torch and transformers: a few minutes

ROOT = Path(__file__).resolve().parent.parent


def run(command: list, cwd: Path, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                            env=env)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--outdir", out, ROOT], cwd=out)
    return out


def only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_the_sdist_and_the_wheel_carry_the_package_and_its_metadata(dist):
    version = preftune.__version__
    wheel = only(dist, f"preftune-{version}-py3-none-any.whl")
    sdist = only(dist, f"preftune-{version}.tar.gz")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = Parser().parsestr(archive.read(f"preftune-{version}.dist-info/METADATA").decode())
        entry_points = archive.read(f"preftune-{version}.dist-info/entry_points.txt").decode()
    assert "preftune/recipes/online/loop.py" in names and "preftune/objectives/losses.py" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "docs/"))]
    assert f"preftune-{version}.dist-info/licenses/LICENSE" in names
    assert metadata["Name"] == "preftune" and metadata["Version"] == version
    assert metadata["Requires-Python"] == ">=3.11" and metadata["License-Expression"] == "Apache-2.0"
    assert metadata["Summary"] and metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().startswith("# preftune")  # the long description is the README
    classifiers = metadata.get_all("Classifier")
    assert "Programming Language :: Python :: 3.11" in classifiers and len(classifiers) >= 5
    assert any(r.startswith("torch==") for r in metadata.get_all("Requires-Dist"))
    assert "preftune = preftune.cli:main" in entry_points
    with tarfile.open(sdist) as archive:
        members = {m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name}
    assert {"README.md", "LICENSE", "pyproject.toml", "preftune/__init__.py", "CHANGELOG.md"} <= members
    assert not [m for m in members if m.startswith("tests/")]  # they need the repository: fixtures, shared data


def test_the_wheel_in_a_fresh_virtualenv_trains(dist, tmp_path, tiny_model_dir):
    wheel = only(dist, "preftune-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], cwd=tmp_path)  # no --system-site-packages: only what the wheel needs
    # the environment of a user's shell: no PYTHONPATH pointing at this clone
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheel], cwd=tmp_path, env=env)
    work = tmp_path / "work"  # no repository beside it
    work.mkdir()
    preftune_bin = venv / "bin" / "preftune"
    version = run([preftune_bin, "--version"], cwd=work, env=env)
    assert version.stdout.strip() == f"preftune {preftune.__version__}"
    assert "train" in run([preftune_bin, "--help"], cwd=work, env=env).stdout
    located = run([venv / "bin" / "python", "-c", "import preftune; print(preftune.__file__)"], cwd=work, env=env)
    assert Path(located.stdout.strip()).is_relative_to(venv)  # the installed copy, not this clone
    data = write_jsonl(work / "pairs.jsonl", PAIRS)
    run([preftune_bin, "train", "--model", tiny_model_dir, "--data", data, "--output-dir", work / "run",
         "--max-steps", "2", "--batch-size", "2", "--report-to", "none"], cwd=work, env=env)
    assert (work / "run" / "model.safetensors").exists()
    assert len((work / "run" / "metrics.jsonl").read_text().splitlines()) >= 2
