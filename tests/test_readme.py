"""The README's two set-up commands stay the ones CI runs and the ones that work."""

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
