"""README's multi-task example runs as printed (in a temporary directory: specialize writes a run)."""

from __future__ import annotations

from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.usefixtures("one_thread")
def test_the_readme_multitask_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = README.read_text()
    block = text.split("## Several tasks")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (several tasks)", "exec"), {})  # noqa: S102  (our own README)
    printed = capsys.readouterr().out
    assert "digit/accuracy" in printed and "ink/mse" in printed and "Jaccard" in printed
    assert (tmp_path / "runs" / "specialize" / "overlap.json").is_file()
    assert (tmp_path / "runs" / "specialize" / "ink" / "state.json").is_file()
