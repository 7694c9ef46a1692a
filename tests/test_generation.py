"""Greedy answers of `MALoRAModule.generate_predictions` on a tiny random Llama, its logits forced by a hook on the
output head: where an answer ends, and decoding that no checkpoint's generation_config changes."""

from collections.abc import Callable

import torch

from malora_lightning.data.batches import EvaluationBatch
from malora_lightning.module import MALoRAModule
from tests.helpers import tiny_tokenizer
from tests.test_module import make_data, make_module, make_trainer

EOS, IM_END = 2, 4  # </s>, the model's generation_config EOS; <|im_end|>, ChatML's end-of-turn token


def chatml_base_model(model_dir, root) -> tuple[MALoRAModule, EvaluationBatch]:
    """The tests' chat model with the tokenizer of a ChatML base model (Qwen2.5 base): EOS is </s>, not the
    <|im_end|> that closes every trained answer; and a batch of validation prompts."""
    tokenizer = tiny_tokenizer(chat_template=True)
    tokenizer.eos_token = "</s>"
    module, data = make_module(model_dir), make_data(model_dir, tasks=["add_2digit"])
    data.tokenizer_object = tokenizer
    make_trainer(root).validate(module, data, verbose=False)  # builds the model and loads the data
    module.eval()
    return module, next(iter(data.val_dataloader()["add_2digit"]))


def generate_with_logits(module: MALoRAModule, batch: EvaluationBatch, logits: Callable[[int], torch.Tensor],
                         max_new_tokens: int) -> list[str]:
    """The module's answers when the output head gives ``logits(step)`` (a vocabulary vector) at every position."""
    step = iter(range(max_new_tokens))

    def force(head, inputs, output) -> torch.Tensor:
        return logits(next(step)).to(output.dtype).expand_as(output).clone()

    hook = module.model.lm_head.register_forward_hook(force)
    try:
        with torch.no_grad():
            return module.generate_predictions(batch, max_new_tokens)
    finally:
        hook.remove()


def one_hot_script(module: MALoRAModule, script: list[int]) -> Callable[[int], torch.Tensor]:
    vocabulary = module.model.config.vocab_size
    return lambda step: torch.nn.functional.one_hot(torch.tensor(script[step]), vocabulary).float() * 1e4


def test_generation_stops_at_the_end_of_turn_token_the_labels_teach(tiny_model_dir, tmp_path):
    """A model that writes the answer, its end-of-turn token, then more: decoding drops the special token, so before
    generation stopped there the rambling after it was scored as part of the answer."""
    module, batch = chatml_base_model(tiny_model_dir, tmp_path)
    tokenizer = module.tokenizer
    assert module.model.generation_config.eos_token_id == tokenizer.eos_token_id == EOS
    assert module.stop_token_ids() == [EOS, IM_END]
    script = tokenizer("#### 7", add_special_tokens=False)["input_ids"] + [IM_END] + \
        tokenizer("\n#### 8\nmore", add_special_tokens=False)["input_ids"]
    answers = generate_with_logits(module, batch, one_hot_script(module, script), len(script))
    assert answers == ["#### 7"] * len(answers)


def test_greedy_decoding_ignores_the_checkpoints_generation_config(tiny_model_dir, tmp_path):
    """transformers fills every setting the evaluation's GenerationConfig leaves unset from the model's own, as hub
    checkpoints ship them (Qwen2.5-Instruct: repetition_penalty 1.05): greedy answers must stay the argmax."""
    module, batch = chatml_base_model(tiny_model_dir, tmp_path)
    vocabulary = module.model.config.vocab_size
    a, z = module.tokenizer("aZ", add_special_tokens=False)["input_ids"]  # 'a' is in every prompt ("assistant")

    def scores(**chosen: float) -> Callable[[int], torch.Tensor]:
        logits = torch.zeros(vocabulary)
        for token, value in chosen.items():
            logits[{"a": a, "z": z, "stop": IM_END}[token]] = value
        return lambda step: logits

    module.model.generation_config.repetition_penalty = 1.2  # would turn 'a' (2.0 / 1.2) below 'Z' (1.8)
    module.model.generation_config.min_new_tokens = 3  # would forbid stopping before 3 tokens
    assert generate_with_logits(module, batch, scores(a=2.0, z=1.8), 4)[0] == "aaaa"
    assert generate_with_logits(module, batch, scores(stop=5.0, a=1.0), 4)[0] == ""
    assert module.model.generation_config.repetition_penalty == 1.2  # the model's own config is left as it was
    assert module.model.generation_config.min_new_tokens == 3
