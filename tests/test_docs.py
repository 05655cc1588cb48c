"""The README's reference and the examples are generated from / checked against the code."""
from __future__ import annotations

from pathlib import Path

import pytest

from ts_plugin.config import RULES, validate_file
from ts_plugin.config.reference import BEGIN, END, reference_markdown

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*/model-config.yaml") if p.parent.name != "invalid")


def test_readme_reference_is_current():
    text = (REPO / "README.md").read_text()
    block = text[text.index(BEGIN):text.index(END) + len(END)]
    assert block == reference_markdown(), "run `ts-plugin reference --write README.md`"
    assert all(code in block for code in RULES)


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.parent.name)
def test_examples_validate_cleanly(example):
    report = validate_file(example)
    assert report.findings == [], report.text()


def test_every_parallel_type_has_an_example_and_a_handler():
    assert {p.parent.name for p in EXAMPLES} == {"tp", "pp", "pptp", "custom"}
    for handler in ("deepspeed_handler.py", "pippy_handler.py", "pptp_handler.py", "accelerate_handler.py"):
        assert (REPO / "handlers" / handler).is_file()


def test_invalid_example_is_refused():
    assert not validate_file(REPO / "examples/invalid/model-config.yaml").ok
