"""The README's two set-up commands stay the ones CI runs and the ones that work, and its Python snippets run."""

import re
from pathlib import Path

import pytest
import yaml

from tests.test_offline_models import SMOLLM2, needs_smollm2

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith("python3 -m venv")]


def test_readme_has_the_two_fresh_machine_commands():
    commands = readme_commands()
    assert len(commands) == 2
    default_job, tests = commands
    assert default_job.endswith("malora fit -c recipes/default.yaml") and (ROOT / "recipes/default.yaml").is_file()
    assert tests.endswith("python -m pytest -n 2")


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



@pytest.mark.slow
@needs_smollm2
def test_the_transformers_snippet_runs_as_written_and_generates_with_the_saved_adapters(tmp_path, monkeypatch, capsys):
    """Run verbatim on an adapter folder saved from SmolLM2 in nf4 (the default job's base), with random B so that
    the adapters change the answer: it prints what the saved model itself generates."""
    import torch
    from transformers import AutoTokenizer

    from malora_lightning import AdapterConfig, inject_adapters, load_base_model, save_adapters
    from malora_lightning.offline_models import resolve_model_path

    folder = "runs/default/lightning_logs/version_0/checkpoints/adapter"
    model = load_base_model(SMOLLM2, quantization="nf4", input_grads=False)  # as trained, as load_adapted_model loads
    inject_adapters(model, AdapterConfig(method="malora", rank=4, shared_rank=8, num_experts=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.5)
    monkeypatch.chdir(tmp_path)
    save_adapters(model.eval(), folder)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(SMOLLM2))
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "What is 12 + 30?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    def answer(max_new_tokens: int = 8) -> str:
        with torch.no_grad():
            new_tokens = model.generate(**inputs, max_new_tokens=max_new_tokens)[0, inputs["input_ids"].shape[1]:]
        return tokenizer.decode(new_tokens, skip_special_tokens=True)

    saved_answer = answer()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.zero_()  # every adapter adds zero: the base model's answer
    # the adapters matter: the base model's answer already differs in its first token, so it differs from the saved
    # one (generating all 8 of its tokens only to compare them costs seconds on CPU)
    base_start = answer(max_new_tokens=1)
    assert base_start and not saved_answer.startswith(base_start)

    exec(readme_python_block("from transformers import AutoTokenizer"), {})
    assert capsys.readouterr().out.strip() == saved_answer.strip()


def test_the_task_spec_example_builds_its_tasks():
    """The README's task-spec YAML is what a first recipe of one's own copies: its specs must be valid as written."""
    from malora_lightning.data.tasks import task_from_spec

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    data = next(yaml.safe_load(block)["data"] for block in blocks if "task_specs:" in block)
    tasks = [task_from_spec(spec) for spec in data["task_specs"]]
    assert [task.name for task in tasks] == data["tasks"]
    assert [task.kind for task in tasks] == ["multiple_choice", "generative"]
    assert tasks[0].formatter({"text": "ok", "options": ["negative", "positive"], "label": 1}).prompt == \
        "Classify {literally in braces}:\nok"


def test_the_default_recipe_states_the_fit_times_the_readme_measured():
    """recipes/default.yaml's header cites README.md for the fit's time on 2 vCPUs, and kept 6.7-7.9 minutes for AVX2
    after the README's table had grown to 6.7-12.0 (and 4.2-4.7 for AVX512-BF16, the EPYC's alone, beside the Xeon's
    5.7-6.1): each range must span the table's rows that compute in that dtype."""
    header = " ".join(line.removeprefix("#").strip() for line in (ROOT / "recipes/default.yaml").read_text()
                      .splitlines() if line.startswith("#"))
    table = (ROOT / "README.md").read_text().split("| 2 vCPUs | computes in | fit |", 1)[1].split("\n\n", 1)[0]
    measured: dict[str, list[float]] = {}
    for row in table.splitlines()[2:]:
        dtype, fit = [cell.strip() for cell in row.split("|")[2:4]]
        measured.setdefault(dtype, []).extend(map(float, re.match(r"([\d.]+)–([\d.]+) min", fit).groups()))
    for dtype, cpus in (("bf16", "AVX512-BF16"), ("float32", "AVX2-only")):
        stated = re.search(rf"([\d.]+)-([\d.]+) minutes on 2 {cpus} vCPUs, which compute in {dtype}", header)
        assert stated is not None, f"recipes/default.yaml no longer states the {cpus} fit time"
        assert tuple(map(float, stated.groups())) == (min(measured[dtype]), max(measured[dtype]))
