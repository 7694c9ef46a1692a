"""Evaluation and prediction for `MALoRAModule`: scoring multiple choice by log-likelihood, generating answers, and
the per-example results the callbacks aggregate.

A mixin, so that its small methods (`score_choices`, `generate_predictions`) stay override points of the module
class, while `module.py` reads as build / step / optimise. It uses the module's `model`, `settings` (the base and
`max_new_tokens`), `target_log_likelihoods`, `target_logits` (one-token multiple choice scores from the gold rows'
logits, not through `target_log_likelihoods`) and the trainer's data module (its tasks and tokenizer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from transformers import AutoTokenizer, GenerationConfig

from malora_lightning.adapters import frozen_adapter_weights, scoring_pass
from malora_lightning.adapters.routing import ScoringPass
from malora_lightning.callbacks.per_task_metrics import PerTaskMetrics
from malora_lightning.callbacks.predictions import Prediction
from malora_lightning.data.batches import ChoiceRows, EvaluationBatch, EvaluationOutput, check_batch
from malora_lightning.data.tasks import Task, get_task
from malora_lightning.offline_models import resolve_model_path
from malora_lightning.scoring import choose_choices, gold_rows, one_token_choices, pair_log_likelihoods, target_pairs

# tokens generated for a predict file's prompt without a task (or a task of unknown length) when max_new_tokens is None
DEFAULT_MAX_NEW_TOKENS = 128

T = TypeVar("T")


class EvaluationMixin:
    """validation_step, test_step and predict_step of `MALoRAModule`."""

    @property
    def _datamodule(self):
        """The trainer's data module; None outside a trainer or when the trainer was given dataloaders."""
        return self._trainer.datamodule if self._trainer is not None else None

    @property
    def tokenizer(self):
        """The data module's tokenizer when there is one (normally the model's own; `MALoRAModule._check_vocabulary`
        refuses one with more tokens than the model embeds), else the model's own."""
        datamodule = self._datamodule
        if datamodule is not None and getattr(datamodule, "tokenizer", None) is not None:
            return datamodule.tokenizer
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.settings.model_name_or_path),
                                                            trust_remote_code=self.settings.trust_remote_code)
        return self._tokenizer

    def task(self, name: str) -> Task:
        """The data module's task of that name (its generation length and answer checker); when the trainer was
        given dataloaders, the registered task of that name (`get_task`), whose generation length is unmeasured."""
        tasks = getattr(self._datamodule, "tasks", None)
        if tasks is None:
            return get_task(name)
        by_name = {task.name: task for task in tasks}
        if name not in by_name:
            raise ValueError(f"a batch names task {name!r}, which the data module does not have; its tasks: "
                             f"{', '.join(by_name)}")
        return by_name[name]

    def generation_length(self, task: Task | None) -> int:
        """Tokens to generate for an answer: the task's own length, capped by `max_new_tokens`; without a task (or
        when its length is unknown: a task with no validation or test rows to measure, or a registered task read
        without a data module, `task`), `max_new_tokens` or DEFAULT_MAX_NEW_TOKENS."""
        cap = self.settings.max_new_tokens
        if task is None or task.max_new_tokens is None:
            return cap or DEFAULT_MAX_NEW_TOKENS
        return task.max_new_tokens if cap is None else min(task.max_new_tokens, cap)

    def score_choices(self, log_likelihood: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Score of each (example, choice) row; the best-scoring choice is the answer. Default: length-normalised
        log-likelihood of the choice tokens (override for unnormalised or calibrated scoring)."""
        return log_likelihood / tokens.clamp(min=1)

    def stop_token_ids(self) -> list[int]:
        """The tokens an answer ends at: the model's EOS id(s), the tokenizer's, and the end-of-turn token the data
        module's prompt format trains after every answer (`PromptEncoder.closing_token_id` of the encoder it built),
        which on ChatML base models is not the EOS. Without a data module's encoder the prompt format is unknown: the
        EOS ids only."""
        model_eos = self.model.generation_config.eos_token_id
        ids = [model_eos] if isinstance(model_eos, int) else list(model_eos or [])
        ids.append(self.tokenizer.eos_token_id)
        encoder = getattr(self._datamodule, "encoder", None)
        if encoder is not None:
            ids.append(encoder.closing_token_id())
        return list(dict.fromkeys(token for token in ids if token is not None))

    def generate_predictions(self, batch: EvaluationBatch, max_new_tokens: int) -> list[str]:
        """Greedy answers to the left-padded prompts, cut at `stop_token_ids` and decoded without special tokens."""
        tokenizer = self.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, use_cache=True,
                                  eos_token_id=self.stop_token_ids())
        prompt = batch.prompt_input_ids
        # one forward per new token: cast the adapter weights once
        with frozen_adapter_weights(self.model), global_generation_defaults(self.model):
            generated = self.model.generate(input_ids=prompt, attention_mask=batch.prompt_attention_mask,
                                            generation_config=config)
        return tokenizer.batch_decode(generated[:, prompt.shape[1]:], skip_special_tokens=True)

    def _generated_answers(self, batch: EvaluationBatch, tasks: Sequence[Task | None]) -> list[str]:
        """`generate_predictions`'s answer to each prompt of `batch`, each generated with its own task's
        `generation_length` (`tasks`, one per row). A batch of one task (every loader of the data module) is one call;
        a batch mixing tasks of other lengths (dataloaders given to the trainer) is generated in groups of rows of one
        length: generated for the longest, a shorter task's greedy answer ran on past its length, so a prompt was
        answered otherwise than in a batch of its own task."""
        lengths = [self.generation_length(task) for task in tasks]
        if len(set(lengths)) == 1:
            return self._checked_predictions(self.generate_predictions(batch, lengths[0]), batch)
        answers = [""] * len(lengths)
        for length in sorted(set(lengths)):
            rows = [row for row, own in enumerate(lengths) if own == length]
            part = batch_rows(batch, rows)
            for row, answer in zip(rows, self._checked_predictions(self.generate_predictions(part, length), part)):
                answers[row] = answer
        return answers

    def _checked_predictions(self, predictions: object, batch: EvaluationBatch) -> list[str]:
        """`generate_predictions`'s answers, one text per prompt of `batch`, or a TypeError naming the override: a
        string, or a list of another length, was zipped with the batch's targets and rows, scoring characters or
        dropping examples, or failed later naming neither."""
        count = batch.prompt_input_ids.shape[0]
        if not isinstance(predictions, (list, tuple)) or len(predictions) != count \
                or not all(isinstance(prediction, str) for prediction in predictions):
            length = f" of {len(predictions)}" if isinstance(predictions, (list, tuple)) else ""
            raise TypeError(f"{type(self).__name__}.generate_predictions returned a {type(predictions).__name__}"
                            f"{length} for a batch of {count} prompts: it must return a list of one answer text (str) "
                            "per prompt, in batch order")
        return list(predictions)

    def choice_log_likelihoods(self, choices: ChoiceRows, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`target_log_likelihoods` of every (example, choice) row when each choice is one token after its example's
        shared prompt (`one_token_choices`), from one forward over the gold rows (`gold`, one per example): the logits
        before the choice token are the same in every row of an example, so the other rows need not run (a
        four-choice task ran four times the tokens)."""
        rows, positions = target_pairs(choices.labels)  # one pair per row, in row order
        logits = self.target_logits(choices.input_ids[gold], choices.attention_mask[gold],
                                    torch.arange(gold.numel(), device=gold.device), positions[gold])
        return pair_log_likelihoods(logits[choices.example_index], choices.labels[rows, positions + 1], rows,
                                    choices.labels.shape[0])

    def evaluate_batch(self, batch: EvaluationBatch) -> EvaluationOutput:
        """Per-example loss and correctness, the raw material of `PerTaskMetrics` and the run report.

        Multiple choice: one forward over the (example, choice) rows gives both the decision and the loss, which is
        the gold choice's mean token NLL; when every choice is one token after a shared prompt, one forward over
        the gold rows alone (`choice_log_likelihoods`). Generation: the loss of the teacher-forced target, then
        greedy decoding. The forward the loss comes from is declared as the scoring pass (`scoring_pass`): routing
        observers such as `RoutingStats` count that one (its gold-choice rows for multiple choice) and not the
        generation forwards.
        Padding examples (`batch.counted` False) go through every forward, as the other ranks' examples do, but not
        into the scored rows or the output.
        """
        check_batch(batch, training=False)  # a collator of your own: its mistakes named, not scored
        num_examples = batch.input_ids.shape[0]
        choices = batch.choices
        if choices is not None:
            gold = gold_rows(choices.example_index, choices.gold)
            if one_token_choices(choices.input_ids, choices.attention_mask, choices.labels, choices.example_index,
                                 num_examples):
                # the gold rows' forward is the scoring pass: the tokens the full forward's scored rows hold
                with scoring_pass(self.model, ScoringPass(batch.task_id, batch.counted)):
                    log_likelihood, tokens = self.choice_log_likelihoods(choices, gold)
            else:
                row_scored = torch.zeros(choices.example_index.shape[0], dtype=torch.bool, device=gold.device)
                row_scored[gold] = True
                row_scored &= batch.counted[choices.example_index]
                with scoring_pass(self.model, ScoringPass(batch.task_id[choices.example_index], row_scored)):
                    log_likelihood, tokens = self.target_log_likelihoods(choices.input_ids, choices.attention_mask,
                                                                         choices.labels)
            chosen = choose_choices(self.score_choices(log_likelihood, tokens), choices.example_index, num_examples)
            output = EvaluationOutput(batch.task_name, loss=-log_likelihood[gold] / tokens[gold].clamp(min=1),
                                      correct=chosen == choices.gold, predictions=chosen.tolist())
            return counted_rows(output, batch.counted)
        with scoring_pass(self.model, ScoringPass(batch.task_id, batch.counted)):
            log_likelihood, tokens = self.target_log_likelihoods(batch.input_ids, batch.attention_mask, batch.labels)
        # each row's own task: a batch of dataloaders given to the trainer can mix tasks, and every row was checked
        # (and generated) as its first row's task, so its score depended on which task came first
        tasks = [self.task(name) for name in batch.task_name]
        predictions = self._generated_answers(batch, tasks)
        correct = torch.tensor([task.is_correct(p, t) for task, p, t in zip(tasks, predictions, batch.targets)],
                               device=tokens.device)
        output = EvaluationOutput(batch.task_name, loss=-log_likelihood / tokens.clamp(min=1), correct=correct,
                                  predictions=predictions)
        return counted_rows(output, batch.counted)

    def on_validation_start(self) -> None:
        self._warn_without_metrics("validation")
        self._warn_of_cut_answers()

    def on_test_start(self) -> None:
        self._warn_without_metrics("test")
        self._warn_of_cut_answers()

    def on_predict_start(self) -> None:
        self._warn_of_cut_answers()
        self._warn_of_unreachable_targets()

    def _warn_of_cut_answers(self) -> None:
        """A `max_new_tokens` cap below a generative task's answer length (its registered budget, or its longest
        answer) cuts those answers short (`cuts_short`), and exact match scores every one of them wrong."""
        cap = self.settings.max_new_tokens
        tasks = getattr(self._datamodule, "tasks", None)
        if cap is None or tasks is None:
            return
        cut = {task.name: task.max_new_tokens for task in tasks if task.kind == "generative"
               and task.max_new_tokens is not None and cuts_short(cap, task.max_new_tokens)}
        if cut:
            rank_zero_warn(f"model max_new_tokens={cap} is below the answer length in tokens of tasks {cut}: their "
                           f"answers longer than {cap} tokens are cut short and scored wrong; raise max_new_tokens "
                           "or leave it None (each task's own length)")

    def _warn_of_unreachable_targets(self) -> None:
        """A predict file's target longer than its row's `generation_length` cannot be generated whole, so the row's
        `correct` can be false for a right answer. The length stays its task's (its validation and test answers', or
        its spec's) all the same, as in fit, validate and test, so that a checkpoint answers a prompt alike in every
        stage: a length taken from the row's target would let the reference answer, there only to check the answer
        against, tell the generation how long to be. Warned of instead, naming the rows (`cuts_short`)."""
        datamodule = self._datamodule
        lengths = getattr(datamodule, "predict_target_lengths", None)
        if not lengths:
            return
        cut = {}  # task name -> (rows, their longest target, the rows' generation length)
        for name, rows in lengths.items():
            budget = self.generation_length(self.task(name))
            long = sorted(row for row, length in rows.items() if cuts_short(budget, length))
            if long:
                cut[name] = (long, max(rows[row] for row in long), budget)
        if not cut:
            return
        named = "; ".join(f"task {name!r}: {len(long)} row{'s' * (len(long) > 1)} ({', '.join(map(str, long[:5]))}"
                          f"{', ...' * (len(long) > 5)}), targets of up to {longest} tokens, generated with {budget}"
                          for name, (long, longest, budget) in cut.items())
        cap = self.settings.max_new_tokens
        raise_cap = "raise model.max_new_tokens, " if cap in {budget for _, _, budget in cut.values()} else ""
        rank_zero_warn(f"predict_file {datamodule.settings.predict_file}: rows with a target longer than the answers "
                       f"their task generates ({named}; counting the end-of-turn token): their answers are cut at "
                       "that length, so their 'correct' can be false for a right answer. A task generates as many "
                       "tokens as its longest validation or test answer (or its task spec's max_new_tokens), capped "
                       f"by model.max_new_tokens, whatever a predict file's targets: {raise_cap}give the task a "
                       "longer max_new_tokens in its task spec (validate and test then generate as many), or leave "
                       f"the task out of these rows to generate up to {cap or DEFAULT_MAX_NEW_TOKENS} tokens, unscored")

    def _warn_without_metrics(self, stage: str) -> None:
        """The steps only hand back per-example results: without `PerTaskMetrics` (which the `malora` command
        attaches, and a plain `Trainer` does not) the run logs and returns no metric, and a ModelCheckpoint monitoring
        one fails."""
        if not any(isinstance(callback, PerTaskMetrics) for callback in self.trainer.callbacks):
            rank_zero_warn(f"{stage} scores every example, but no PerTaskMetrics callback is attached, so no metric "
                           "is logged or returned: pass callbacks=[malora_lightning.callbacks.PerTaskMetrics()] to "
                           "the Trainer (the malora command attaches it)")

    def validation_step(self, batch: EvaluationBatch, batch_idx: int, dataloader_idx: int = 0) -> EvaluationOutput:
        """Per-example results; the `PerTaskMetrics` callback aggregates and logs them per task."""
        return self.evaluate_batch(batch)

    def test_step(self, batch: EvaluationBatch, batch_idx: int, dataloader_idx: int = 0) -> EvaluationOutput:
        return self.evaluate_batch(batch)

    def predict_step(self, batch: EvaluationBatch, batch_idx: int, dataloader_idx: int = 0) -> list[Prediction]:
        """Greedy answers to a batch of prompts (one task, or none, per predict dataloader), checked where the task
        and the target are known; padding examples are answered (every rank generates alike) but not returned."""
        check_batch(batch, training=False)
        tasks = [None if name is None else self.task(name) for name in batch.task_name]
        predictions = self._generated_answers(batch, tasks)
        # getattr: `rows` is optional (EvaluationBatch.rows), and a batch class of your own may not have it
        rows = getattr(batch, "rows", None)
        answers = [Prediction(row=row, task=None if task is None else task.name, prompt=prompt, prediction=prediction,
                              target=target,
                              correct=None if task is None or target is None else task.is_correct(prediction, target))
                   for row, task, prompt, prediction, target in zip(rows or [None] * len(tasks), tasks,
                                                                    batch.prompts, predictions, batch.targets)]
        return counted_only(answers, batch.counted)


def cuts_short(generated: int, answer_length: int) -> bool:
    """Whether generating `generated` tokens cuts short an answer of `answer_length` tokens as `PromptEncoder` counts
    them (`Task.max_new_tokens`, a predict file's targets): with its end-of-turn token, which decoding drops, so one
    token fewer still keeps the answer whole."""
    return answer_length - 1 > generated


@contextmanager
def global_generation_defaults(model) -> Iterator[None]:
    """``model.generate`` with transformers' global defaults for every setting the given config leaves unset, so that
    greedy decoding is the same on every checkpoint. transformers 5 (``GenerationMixin._prepare_generation_config``)
    fills each unset (None) field from ``model.generation_config``: a checkpoint's repetition_penalty, min_new_tokens,
    num_beams, suppress_tokens or bad_words_ids would apply, and None cannot switch off those whose off value is None.
    The model's own config is set aside for the call instead."""
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


def batch_rows(batch: EvaluationBatch, rows: Sequence[int]) -> EvaluationBatch:
    """The examples `rows` (in increasing order) of `batch` as a batch of their own, as the collator would pad them:
    their prompts without the columns that are left padding in every one of them, and their choice rows if any."""
    index = torch.tensor(rows, dtype=torch.long, device=batch.input_ids.device)
    prompt_mask = batch.prompt_attention_mask[index]
    width = int(prompt_mask.sum(1).max())
    choices = batch.choices
    if choices is not None:
        position = torch.full_like(batch.task_id, -1)
        position[index] = torch.arange(len(rows), device=index.device)
        example = position[choices.example_index]
        kept = example >= 0
        choices = ChoiceRows(input_ids=choices.input_ids[kept], attention_mask=choices.attention_mask[kept],
                             labels=choices.labels[kept], example_index=example[kept], gold=choices.gold[index],
                             num_choices=choices.num_choices[index])
    return dataclasses.replace(
        batch, input_ids=batch.input_ids[index], attention_mask=batch.attention_mask[index],
        labels=batch.labels[index], task_id=batch.task_id[index], task_name=[batch.task_name[row] for row in rows],
        prompts=[batch.prompts[row] for row in rows], targets=[batch.targets[row] for row in rows],
        prompt_input_ids=batch.prompt_input_ids[index][:, -width:], prompt_attention_mask=prompt_mask[:, -width:],
        counted=batch.counted[index], choices=choices,
        # a batch class of your own may have no `rows` field, which replace would refuse
        **({} if getattr(batch, "rows", None) is None else {"rows": [batch.rows[row] for row in rows]}))


def counted_only(rows: Sequence[T], counted: torch.Tensor) -> list[T]:
    """The rows whose ``counted`` flag ([B] bool) is set, in order."""
    return [row for row, keep in zip(rows, counted.tolist(), strict=True) if keep]


def counted_rows(output: EvaluationOutput, counted: torch.Tensor) -> EvaluationOutput:
    """``output`` without the rows of padding examples (``counted`` False), so that whoever reads the step's outputs
    (`PerTaskMetrics`, the benchmarks' example records) scores every real example once."""
    return EvaluationOutput(
        task_name=counted_only(output.task_name, counted), loss=output.loss[counted],
        correct=None if output.correct is None else output.correct[counted],
        predictions=None if output.predictions is None else counted_only(output.predictions, counted))
