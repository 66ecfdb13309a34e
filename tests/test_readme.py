"""The configuration reference (docs/reference/configuration.md) is generated from the config's field docs; keep
them identical. The README is a front page: it links there and carries no copy of its own to go stale."""

from __future__ import annotations

from pathlib import Path

from preftune.config import reference_markdown

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGE = ROOT / "docs" / "reference" / "configuration.md"
START = "<!-- generated: config-reference (docs/generate.py writes this block; edit the generator or its inputs) -->"
END = "<!-- end generated: config-reference -->"


def test_the_configuration_reference_is_current():
    text = PAGE.read_text(encoding="utf-8")
    section = text[text.index(START) + len(START) : text.index(END)].strip()
    assert section == reference_markdown().strip(), (
        "docs/reference/configuration.md is stale: regenerate it with python docs/generate.py"
    )


def test_the_readme_links_the_reference_and_holds_no_copy():
    text = README.read_text(encoding="utf-8")
    assert "docs/reference/configuration.md" in text
    assert "| `--learning-rate`" not in text and "config reference: generated" not in text
