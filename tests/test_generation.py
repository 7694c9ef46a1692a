"""Greedy answers of `MALoRAModule.generate_predictions` on a tiny random Llama, its logits forced by a hook on the
output head: where an answer ends, and decoding that no checkpoint's generation_config changes; and a batch that
mixes tasks, each row answered and checked as its own task."""

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from malora_lightning.adapters import AdapterConfig
from malora_lightning.data import GeneratorSource, Task, final_answer, register_task
from malora_lightning.data import tasks as tasks_module
from malora_lightning.data.batches import EvaluationBatch
from malora_lightning.data.builtin import format_row
from malora_lightning.data.collate import MultiTaskCollator, PromptEncoder
from malora_lightning.data.tasks import Example, first_line
from malora_lightning.evaluation import EvaluationMixin, batch_rows
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


class _FixedAnswers(MALoRAModule):
    """Answers every prompt with "12 apples", recording the length and the prompts of each generation."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[int, list[str]]] = []

    def generate_predictions(self, batch: EvaluationBatch, max_new_tokens: int) -> list[str]:
        self.calls.append((max_new_tokens, list(batch.prompts)))
        return ["12 apples"] * len(batch.prompts)


class _Outputs(Callback):
    def __init__(self) -> None:
        self.outputs = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.outputs.append(outputs)


@pytest.mark.parametrize("math_first", [True, False])
def test_a_batch_mixing_tasks_answers_and_checks_each_row_as_its_own_task(tiny_model_dir, tmp_path, monkeypatch,
                                                                          math_first):
    """Dataloaders given to the trainer can mix tasks in a batch: every row was generated with the first row's task's
    length and checked by its answer check, so "12 apples" for 12 scored right or wrong by which task came first."""
    monkeypatch.setattr(tasks_module, "_REGISTRY", dict(tasks_module._REGISTRY))
    rows = [{"prompt": "Tom has 5 and gets 7. How many?", "target": "12"}]
    for name, answer, length in [("word_math", final_answer, 30), ("plain_sum", first_line, 3)]:
        register_task(Task(name=name, source=GeneratorSource(lambda split, seed: rows), formatter=format_row,
                           answer=answer, max_new_tokens=length))
    encoder = PromptEncoder(tiny_tokenizer(chat_template=True), 64)
    examples = {name: encoder.encode([Example(prompt=prompt, target="12", row=0)], task_id, name, "validation")[0][0]
                for task_id, (name, prompt) in enumerate([("word_math", "Tom has 5 and gets 7."),
                                                          ("plain_sum", "What is 5 + 7?")])}
    order = ["word_math", "plain_sum"] if math_first else ["plain_sum", "word_math"]
    loader = DataLoader([examples[name] for name in order], batch_size=2,
                        collate_fn=MultiTaskCollator(encoder.pad_token_id, eval_fields=True))
    module = _FixedAnswers(model_name_or_path=str(tiny_model_dir), quantization=None,
                           adapter=AdapterConfig(method="lora", rank=2))
    outputs = _Outputs()
    make_trainer(tmp_path, callbacks=[outputs], limit_val_batches=1.0).validate(module, dataloaders=loader,
                                                                                verbose=False)
    [output] = outputs.outputs
    assert dict(zip(output.task_name, output.correct.tolist())) == {"word_math": True, "plain_sum": False}
    assert sorted(module.calls) == [(3, [examples["plain_sum"].prompt]), (30, [examples["word_math"].prompt])]
    module.calls = []
    [answers] = make_trainer(tmp_path).predict(module, dataloaders=loader)
    assert {answer.task: answer.correct for answer in answers} == {"word_math": True, "plain_sum": False}
    assert [answer.task for answer in answers] == order
    assert sorted(module.calls) == [(3, [examples["plain_sum"].prompt]), (30, [examples["word_math"].prompt])]


def test_a_mixed_batchs_rows_are_answered_as_in_a_batch_of_their_own(tiny_model_dir, tmp_path):
    """A row of a mixed batch is answered with its own task's length, as in a batch of its task: generated for the
    longest, a shorter task's answer ran on past its length."""
    module, data = make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["add_2digit", "reverse_words"],
                                                          eval_batch_size=2)
    make_trainer(tmp_path).validate(module, data, verbose=False)
    module.eval()
    loaders = data.val_dataloader()
    batches = [next(iter(loaders[name])) for name in ("add_2digit", "reverse_words")]
    collator = data.build_collator(eval_fields=True)
    examples = [loaders[name].dataset.examples[index] for name in ("add_2digit", "reverse_words") for index in (0, 1)]
    with torch.no_grad():
        own = [answer for batch, name in zip(batches, ("add_2digit", "reverse_words"))
               for answer in module.generate_predictions(batch, module.generation_length(module.task(name)))]
        mixed = collator([examples[0], examples[2], examples[1], examples[3]])
        answers = [answer.prediction for answer in module.predict_step(mixed, 0)]
    assert len({module.generation_length(task) for task in data.tasks}) == 2
    assert answers == [own[0], own[2], own[1], own[3]]


def test_batch_rows_of_a_multiple_choice_batch_are_the_rows_collated_on_their_own():
    """A mixed batch's rows are generated in groups of one length; a group of multiple-choice rows keeps its own
    choice rows, numbered from 0 within the group, as a batch of those examples alone holds them."""
    tokenizer = tiny_tokenizer()
    examples = [Example(prompt="pick one of them", target="B", choices=("A", "B"), gold=1, row=0),
                Example(prompt="q", target="no", choices=("no", "yes", "maybe"), gold=0, row=1),
                Example(prompt="which", target="y", choices=("x", "y"), gold=1, row=2)]
    encoder = PromptEncoder(tokenizer, 64)
    encoded, _ = encoder.encode(examples, task_id=0, task_name="toy", split="validation", with_eval_fields=True)
    collator = MultiTaskCollator(encoder.pad_token_id, eval_fields=True)
    part = batch_rows(collator(encoded), [1, 2])
    alone = collator([encoded[1], encoded[2]])
    assert part.rows == alone.rows == [1, 2] and part.targets == ["no", "y"]
    assert torch.equal(part.prompt_input_ids, alone.prompt_input_ids)  # the longest prompt's left padding dropped
    assert torch.equal(part.prompt_attention_mask, alone.prompt_attention_mask)
    for field in ("example_index", "gold", "num_choices"):
        assert torch.equal(getattr(part.choices, field), getattr(alone.choices, field)), field
    assert part.choices.example_index.tolist() == [0, 0, 0, 1, 1]
    width = alone.choices.input_ids.shape[1]  # right padding: the whole batch's rows are only wider
    for field in ("input_ids", "attention_mask", "labels"):
        rows = getattr(part.choices, field)
        assert torch.equal(rows[:, :width], getattr(alone.choices, field)), field
    assert part.choices.attention_mask[:, width:].eq(0).all()


def test_a_batch_naming_a_task_the_data_module_lacks_is_refused_with_its_tasks():
    tasks = [SimpleNamespace(name="alpha"), SimpleNamespace(name="beta")]  # all `task` reads of them
    evaluator = SimpleNamespace(_datamodule=SimpleNamespace(tasks=tasks))
    assert EvaluationMixin.task(evaluator, "beta") is tasks[1]
    with pytest.raises(ValueError, match=r"^a batch names task 'gamma', which the data module does not have; its "
                                         r"tasks: alpha, beta$"):
        EvaluationMixin.task(evaluator, "gamma")
