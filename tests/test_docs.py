"""The documentation site: its generated blocks equal what docs/generate.py makes of the code and the committed result
files, and `mkdocs build --strict` passes, failing on a broken link or a reference to an object that no longer
exists. mkdocs comes with the `dev` extra (through `docs`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import preftune
from preftune.config import SECTIONS, Config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def load_generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generate = load_generator()


def mkdocs(config: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` of `config` into `site`, reading this checkout's package wherever the config is."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_generated_pages_are_current():
    stale = generate.stale_pages()
    assert not stale, (f"stale generated docs: {', '.join(str(p.relative_to(ROOT)) for p in stale)}; "
                       "run python docs/generate.py")


def test_the_results_pages_and_their_files():
    for name in generate.RESULTS_PAGES:
        page = (DOCS / "results" / f"{name}.md").read_text(encoding="utf-8")
        assert f"<!-- generated: results-{name} " in page, name
        if (DOCS / "results" / f"{name}.json").exists():
            result = generate.read_result(name)
            assert result["date"] and result["command"] and result["machine"]["cores"], name
            assert result["date"] in page and result["command"] in page, name


def edit_first_number(text: str, after: str) -> str:
    """`text` with the first signed decimal number after `after` changed by one in its last digit."""
    start = text.index(after)
    match = re.compile(r"[+-]\d+\.(\d+)").search(text, start)
    digits = match.group(1)
    changed = digits[:-1] + str((int(digits[-1]) + 1) % 10)
    return text[: match.start(1)] + changed + text[match.end(1):]


def test_a_number_edited_by_hand_in_a_results_page_is_caught():
    """The check compares the committed page with what the script makes of the result file: a number typed over
    in the page differs from it, and regenerating restores the measured one."""
    page = DOCS / "results" / "frontier.md"
    committed = page.read_text(encoding="utf-8")
    assert generate.render_page(committed) == committed
    edited = edit_first_number(committed, "| DPO beta=0.1 |")
    assert edited != committed
    assert generate.render_page(edited) != edited  # the check fails on the edited page
    assert generate.render_page(edited) == committed


def test_every_option_is_in_the_configuration_reference_once():
    page = (DOCS / "reference" / "configuration.md").read_text(encoding="utf-8")
    defaults = Config()
    for section in SECTIONS:
        for field in dataclasses.fields(getattr(defaults, section)):
            flag = "--" + field.name.replace("_", "-")
            assert page.count(f"| `{flag}` / `{section}.{field.name}` |") == 1, flag


def test_every_loss_is_in_the_loss_table():
    from preftune.objectives.losses import LOSSES

    page = (DOCS / "losses.md").read_text(encoding="utf-8")
    for name, spec in LOSSES.items():
        assert f"| `{name}` | {generate.cell(spec.meaning)} |" in page, name


def public_functions(module) -> list[str]:
    """The functions a module defines whose names do not start with an underscore (mkdocstrings' filter)."""
    names = getattr(module, "__all__", None) or [n for n in vars(module) if not n.startswith("_")]
    return [f"{module.__name__}.{name}" for name in names
            if inspect.isfunction(getattr(module, name, None))
            and getattr(module, name).__module__ == module.__name__]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("site")
    built = mkdocs(ROOT / "mkdocs.yml", folder)
    assert built.returncode == 0, built.stderr[-5000:]
    return folder


def test_the_site_builds_strictly_and_lists_every_public_function(site):
    api = (site / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for name in preftune.__all__:
        assert f'id="preftune.{name}"' in api, name
    library = "".join(page.read_text(encoding="utf-8") for page in (site / "reference" / "library").rglob("*.html"))
    modules = [importlib.import_module(name) for name in generate.package_modules()]
    functions = [name for module in modules for name in public_functions(module)]
    assert len(functions) > 100
    missing = [name for name in functions if f'id="{name}"' not in library]
    assert not missing, f"functions missing from the library reference: {missing}"
    configuration = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "--learning-rate" in configuration and "rl.kl_coef" in configuration


@pytest.mark.parametrize("case", ["broken link", "missing object"])
def test_the_strict_build_fails_on_a_broken_link_or_a_missing_object(tmp_path, case):
    """The project's mkdocs.yml (its validation settings, strict) over one page that links to a page that does not
    exist, or documents an object that no longer exists: the build fails and names it."""
    docs = tmp_path / "docs"
    docs.mkdir()
    body = "[gone](no-such-page.md)" if case == "broken link" else "::: preftune.no_such_function"
    (docs / "index.md").write_text(f"# Page\n\n{body}\n", encoding="utf-8")
    config = tmp_path / "mkdocs.yml"
    config.write_text(f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\nnav:\n  - index.md\n", encoding="utf-8")
    built = mkdocs(config, tmp_path / "site")
    assert built.returncode != 0
    assert ("no-such-page.md" if case == "broken link" else "preftune.no_such_function") in built.stderr


def test_record_keeps_the_command_its_machine_and_what_it_wrote(tmp_path):
    """benchmarks/record.py runs a command in a fresh WORKDIR and writes the result file the results pages read:
    the command as given, the date, the machine (cores, measured matmul rate), the JSON it printed and the files
    it wrote (JSON parsed, CSV as rows)."""
    script = ("import json, pathlib, sys; d = pathlib.Path(sys.argv[1]); d.mkdir(); "
              "(d / 'r.json').write_text(json.dumps({'gain': 0.25})); (d / 't.csv').write_text('a,b\\n1,x\\n'); "
              "print(json.dumps({'steps': 3}))")
    output = tmp_path / "result.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "record.py"), str(output), "--collect",
                    "WORKDIR/out/r.json", "--collect", "WORKDIR/out/t.csv", "--", "python", "-c", script,
                    "WORKDIR/out"], cwd=ROOT, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads(output.read_text())
    assert result["command"].startswith("python -c ") and result["command"].endswith(" WORKDIR/out")
    assert result["machine"]["cores"] >= 1 and result["machine"]["matmul_fp32_gflops"] > 0
    assert result["date"] and result["wall_seconds"] >= 0
    assert result["stdout"] == {"steps": 3}
    assert result["files"] == {"r.json": {"gain": 0.25}, "t.csv": [{"a": "1", "b": "x"}]}
