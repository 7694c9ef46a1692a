"""The README's two set-up commands stay the ones CI runs and the ones that work, and its no-Lightning snippet runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_readme_has_the_two_fresh_machine_commands():
    commands = readme_commands()
    assert len(commands) == 2
    default_job, tests = commands
    assert default_job.endswith("malora fit -c recipes/default.yaml") and (ROOT / "recipes/default.yaml").is_file()
    assert tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    tests = readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    expected = tests.replace("python3 -m venv .venv", 'python3 -m venv "$venv"').replace(
        ". .venv/bin/activate", '. "$venv/bin/activate"')
    assert expected in ci
    assert "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1" in ci


def readme_python_block(first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [block for block in blocks if block.startswith(first_line)]
    return block


def test_the_no_lightning_snippet_runs_as_written(monkeypatch, capsys):
    """The snippet once called load_base_model without importing it. Run verbatim, with the base it loads from the hub
    replaced by a tiny Llama and `batch` (the reader's own) given."""
    import torch

    import malora_lightning
    from tests.helpers import tiny_model

    monkeypatch.setattr(malora_lightning, "load_base_model", lambda name, quantization=None: tiny_model("llama"))
    ids = torch.randint(3, 200, (2, 8))
    namespace = {"batch": {"input_ids": ids, "labels": ids}}
    exec(readme_python_block("from malora_lightning import AdapterConfig"), namespace)
    assert "trainable params" in capsys.readouterr().out
    assert namespace["loss"].requires_grad and torch.isfinite(namespace["loss"])

