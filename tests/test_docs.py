"""The README's reference and the examples are generated from / checked against the code, and keep token
authorization on."""
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


def test_invalid_example_is_refused():
    assert not validate_file(REPO / "examples/invalid/model-config.yaml").ok


def test_readme_and_examples_keep_token_authorization_on():
    texts = [(REPO / "README.md").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in (REPO / "examples").rglob("*")
              if p.is_file() and "__pycache__" not in p.parts]
    for text in texts:
        assert "disable-token-auth" not in text and "disable_token_authorization" not in text


@pytest.mark.serve
def test_readme_testing_example_runs(tmp_path, monkeypatch):
    """The README's ts_plugin.testing example, run as written from a folder beside the examples."""
    from ts_plugin.testing import java_available

    if not java_available():
        pytest.skip("TorchServe needs Java 11+")
    text = (REPO / "README.md").read_text()
    example = text.split("To test it the way ts_plugin's own tests do", 1)[1].split("```python\n", 1)[1]
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    exec(compile(example.split("```", 1)[0], "README.md", "exec"), {})  # its own assert checks the answer
    assert (tmp_path / "work" / "store" / "chat" / "MAR-INF" / "MANIFEST.json").is_file()
