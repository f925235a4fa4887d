"""README's runtime-adaptation, several-tasks, model-updates, compression and language-model examples run as
printed (each in a temporary directory: they write a ladder, run directories and models)."""

from __future__ import annotations

from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"

pytestmark = pytest.mark.usefixtures("one_thread")


def run_section(heading: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the first python block under README's ``## heading`` with ``tmp_path`` as working directory."""
    block = README.read_text().split(f"## {heading}")[1].split("```python")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(compile(block, f"README.md ({heading})", "exec"), {})  # noqa: S102  (our own README)


def test_the_readme_ladder_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run_section("Runtime adaptation", tmp_path, monkeypatch)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in printed[:4]] == ["0", "1", "2", "3"]
    assert all(line.split()[-1] == "True" for line in printed[:4])  # every rung meets its budget
    assert (tmp_path / "out" / "ladder" / "ladder.json").is_file()
    assert (tmp_path / "runs" / "ladder" / "ladder-state.json").is_file()  # the build's stages, to resume


def test_the_readme_multitask_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run_section("Several tasks", tmp_path, monkeypatch)
    printed = capsys.readouterr().out
    assert "digit/accuracy" in printed and "ink/mse" in printed and "Jaccard" in printed
    assert (tmp_path / "runs" / "specialize" / "overlap.json").is_file()
    assert (tmp_path / "runs" / "specialize" / "ink" / "state.json").is_file()


def test_the_readme_model_updates_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run_section("Model updates", tmp_path, monkeypatch)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("within tolerance: ")  # the drift check's verdict
    assert printed[-2].split()[0] in ("kept", "grown", "abandoned") and printed[-2].endswith("step(s)")
    assert printed[-1].startswith("a and b ") and "MACs a " in printed[-1]  # the diff of the two plans


def test_the_readme_compression_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    run_section("Compression", tmp_path, monkeypatch)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("compress: ") and "budget met" in printed[0]
    size = (tmp_path / "out" / "small" / "model.safetensors.zst").stat().st_size
    assert printed[-1] == f"{size} bytes on disk"
    assert (tmp_path / "out" / "report" / "report.html").is_file()


def test_the_readme_language_model_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    run_section("Language models", tmp_path, monkeypatch)
    printed = capsys.readouterr().out.splitlines()
    magnitude, sparsegpt = (float(line.split("perplexity ")[1].split()[0]) for line in printed[:2])
    dense = float(printed[0].split("dense ")[1].rstrip(")"))
    assert sparsegpt - dense < 0.25 * (magnitude - dense)  # SparseGPT keeps far more of the model at 60%
    assert printed[2].startswith("budget met")
    assert (tmp_path / "out" / "llama" / "config.json").is_file()
