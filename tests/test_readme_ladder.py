"""README's runtime-adaptation example runs as printed (in a temporary directory: it saves a ladder)."""

from __future__ import annotations

from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.mark.usefixtures("one_thread")
def test_the_readme_ladder_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    text = README.read_text()
    block = text.split("## Runtime adaptation")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "README.md (runtime adaptation)", "exec"), {})  # noqa: S102  (our own README)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:4]] == ["0", "1", "2", "3"]
    assert all(line.split()[-1] == "True" for line in printed[:4])  # every rung meets its budget
    assert (tmp_path / "out" / "ladder" / "ladder.json").is_file()
    assert (tmp_path / "runs" / "ladder" / "ladder-state.json").is_file()  # the build's stages, to resume
