"""Tokenisation and batching: examples become token ids once (``PromptEncoder``), batches are padded per batch
(``MultiTaskCollator``) into the typed batches of ``batches.py`` (``TrainingBatch``, ``EvaluationBatch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from transformers import PreTrainedTokenizerBase

from malora_lightning.data.batches import ChoiceRows, EvaluationBatch, TrainingBatch
from malora_lightning.data.prompts import PredictPrompt
from malora_lightning.data.tasks import Example, TaskDataError
from malora_lightning.scoring import IGNORE_INDEX, target_pairs

# a text that no template changes, to learn what a format writes around a prompt or an answer: no whitespace to
# trim, no case to change
_SENTINEL = "\u2983\u2984"

LongTargets = Literal["error", "skip"]


def check_long_targets(value: object) -> None:
    if value not in get_args(LongTargets):
        raise ValueError(f"long_targets={value!r} is invalid: expected one of "
                         f"{', '.join(map(repr, get_args(LongTargets)))}")


@dataclass(frozen=True)
class EncodedExample:
    """An example in token ids: ``input_ids = prompt + answer``, ``labels`` masked on the prompt.

    A predict file's prompt (``PromptEncoder.encode_prompts``) has no answer tokens: ``input_ids`` is the prompt alone,
    ``target`` is None when the file gives none, and ``task_name`` None (``task_id`` -1) when it names no task.
    ``row`` is where the example came from, which its prediction names: a task example's row in its split
    (``Example.row``; None only for an example not made by ``Task.examples``), a predict file's data row
    (``PredictPrompt.row``).
    ``MultiTaskDataModule`` keeps its splits packed (`PackedExamples`, 4 bytes a token) and builds an example again,
    with fresh lists, each time a loader asks for it.
    """

    task_id: int
    task_name: str | None
    input_ids: list[int]
    labels: list[int]
    prompt_length: int
    target: str | None
    prompt: str  # the prompt text, before any chat template: what prediction files show
    choice_input_ids: tuple[list[int], ...] | None = None
    choice_labels: tuple[list[int], ...] | None = None
    gold: int | None = None
    counted: bool = True  # False: padding that evens out the ranks' evaluation shards (see EvaluationShardSampler)
    row: int | None = None  # last and optional, so that encoders written before it keep working


@dataclass(frozen=True)
class OpeningTokens:
    """An opening's token ids, of which the first ``head`` and the last ``tail`` are the prompt format's own (BOS,
    system turn, user header; end of the user turn, assistant header): a cut keeps them and drops tokens from the left
    of the prompt's text between them, so that the model still sees the format it was trained with."""

    ids: list[int]
    head: int = 0
    tail: int = 0


@dataclass
class TruncationStats:
    """How many examples of a task's split had their prompt cut from the left, and how many tokens were dropped;
    ``skipped``: how many were left out because their target (or, for an evaluation example, its longest choice)
    did not fit (``PromptEncoder(long_targets="skip")``), and the longest of those in tokens."""

    examples: int = 0
    truncated: int = 0
    tokens_dropped: int = 0
    skipped: int = 0
    longest_skipped: int = 0

    def add(self, other: TruncationStats) -> None:
        """Count ``other`` (the same split's next examples) in."""
        self.examples += other.examples
        self.truncated += other.truncated
        self.tokens_dropped += other.tokens_dropped
        self.skipped += other.skipped
        self.longest_skipped = max(self.longest_skipped, other.longest_skipped)


class TargetTooLong(TaskDataError):
    """A target (or a choice) that does not fit ``max_length`` with the prompt format's own tokens and one prompt
    token."""

    def __init__(self, message: str, length: int) -> None:
        super().__init__(message)
        self.length = length


class PromptEncoder:
    """Tokenises examples the way the model will see them.

    With the tokenizer's chat template, the prompt is the user turn and the target the assistant turn; the labels
    cover the target and the template's end-of-turn token, so the model learns to stop, and nothing after that
    token. Without one, a plain ``{prompt}\\nAnswer: {target}<eos>``. Subclass and override ``opening`` (the text
    generation starts from) and ``render`` (which begins with it) for another format.
    Prompts that do not fit ``max_length`` lose tokens from the left of the prompt's own text (counted in the
    returned stats); the format's tokens around it (BOS, system turn, user header, assistant header) are kept. A
    target that does not fit with them is an error, because cutting it would train on a wrong answer, unless
    ``long_targets="skip"``: then that example is left out of its split and counted (`TruncationStats.skipped`).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, use_chat_template: bool | None = None,
                 system_prompt: str | None = None, long_targets: LongTargets = "error"):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (got {max_length})")
        check_long_targets(long_targets)
        self.long_targets = long_targets
        has_template = getattr(tokenizer, "chat_template", None) is not None
        if use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self.system_prompt = system_prompt
        if not self.use_chat_template and system_prompt is not None:  # it would be left out of every example
            raise ValueError(f"system_prompt={system_prompt!r:.60} needs the chat template, but the plain prompt "
                             "format has no system turn (use_chat_template is off or the tokenizer has no template); "
                             "remove system_prompt, or use a tokenizer with a chat template")
        if not self.use_chat_template and tokenizer.eos_token is None:
            raise ValueError("the plain prompt format ends targets with the EOS token, but the tokenizer has none")
        pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        self.pad_token_id: int = pad_token_id
        self._special_texts = {token for token in (*tokenizer.all_special_tokens, *(
            added.content for added in tokenizer.added_tokens_decoder.values() if added.special)) if token}
        self.answer_prefix = self._template_answer_prefix() if self.use_chat_template else ""
        self._opening_special_ids = [] if self.use_chat_template else self._leading_special_ids()

    def opening(self, prompt: str) -> str:
        """The text before the answer: the prompt turn, the assistant header and ``answer_prefix`` (or
        ``{prompt}\\nAnswer:``)."""
        if not self.use_chat_template:
            return f"{prompt}\nAnswer:"
        generation_prompt = self.tokenizer.apply_chat_template(self._turns(prompt), tokenize=False,
                                                               add_generation_prompt=True)
        return generation_prompt + self.answer_prefix

    def _template_answer_prefix(self) -> str:
        """The fixed text the chat template writes between its generation prompt and the assistant's content (a
        Qwen3-style empty ``<think>`` block): part of the opening, so that it is neither trained as the answer nor
        generated before it. Empty when the template writes none, or renders the turn in a way `render` refuses."""
        turns = self._turns(_SENTINEL)
        generation_prompt = self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        full = self.tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": _SENTINEL}],
                                                  tokenize=False)
        start = full.find(_SENTINEL, len(generation_prompt))
        return full[len(generation_prompt):start] if full.startswith(generation_prompt) and start >= 0 else ""

    def _turns(self, prompt: str) -> list[dict[str, str]]:
        turns = [{"role": "user", "content": prompt}]
        if self.system_prompt is not None:
            turns.insert(0, {"role": "system", "content": self.system_prompt})
        return turns

    def render(self, prompt: str, target: str) -> tuple[str, str, str]:
        """``(opening, body, closing)``: ``opening(prompt)``, the answer (``target``; `` {target}`` in the plain
        format) and what closes the turn. Only ``body`` and ``closing`` are trained on; generation starts after
        ``opening``."""
        opening = self.opening(prompt)
        if not self.use_chat_template:
            return opening, f" {target}", self.tokenizer.eos_token
        turns = self._turns(prompt)
        full = self.tokenizer.apply_chat_template([*turns, {"role": "assistant", "content": target}], tokenize=False)
        if not full.startswith(opening + target):
            if full.startswith(opening + target.strip()):
                raise ValueError(f"the chat template trims the whitespace around the answer, so the target "
                                 f"{target!r:.60} cannot be trained as written; strip it (in the task's formatter or "
                                 "target template) or pass use_chat_template=False")
            raise ValueError("the chat template does not render '<prompt turn><assistant header><target>' as a plain "
                             "continuation of the prompt turn, so the target cannot be separated from the prompt; "
                             "pass use_chat_template=False or override PromptEncoder.render")
        return opening, target, self._through_end_of_turn(full[len(opening) + len(target):])

    def _through_end_of_turn(self, closing: str) -> str:
        """A chat template's ``closing`` up to and including its first special token, the end-of-turn token (EOS,
        ChatML's ``<|im_end|>``, Gemma's ``<end_of_turn>``): generation stops there (`closing_token_id`), so what the
        template writes after it (a newline before the next turn) is never generated and not trained on, whether or
        not that token is also the tokenizer's EOS. A closing without one is kept whole."""
        found = [(closing.find(token), -len(token)) for token in self._special_texts if token in closing]
        if not found:
            return closing
        start, negative_length = min(found)  # the earliest; the longest of those starting there
        return closing[:start - negative_length]

    def _render(self, prompt: str, target: str, where: str) -> tuple[str, str, str]:
        """``render``, a ValueError of it naming ``where`` (a task's row, a predict file's row): one row's text can
        fail to render (a target with outer whitespace under a template that trims it) where the others do not."""
        try:
            return self.render(prompt, target)
        except ValueError as error:
            raise TaskDataError(f"{where}: {error}") from error

    def closing_token_id(self) -> int | None:
        """Where a generated answer ends besides EOS: the first token of the closing ``render`` trains after every
        answer, when decoding without special tokens drops it (ChatML's ``<|im_end|>``, which on base models such as
        Qwen2.5 is not the EOS token): the text after it would be scored as part of the answer otherwise. None for a
        plain-text closing (a newline can also occur inside an answer, and decoding keeps it) or no closing."""
        closing = self._ids([self.render("?", "!")[2]], opening=False)[0]
        if closing and not self.tokenizer.decode(closing[:1], skip_special_tokens=True):
            return closing[0]
        return None

    def _leading_special_ids(self) -> list[int]:
        """The special tokens the tokenizer writes before a text (BOS; none for GPT-2 or Qwen), for the plain format's
        openings. Not those it writes after one (a Llama tokenizer's EOS with ``add_eos_token=True``): an opening
        goes on with the answer, so that EOS would sit between the prompt and the answer. Learned from "Answer",
        which the plain format writes anyway, so no tokenizer reads it as an unknown (special) token."""
        ids = self.tokenizer("Answer", add_special_tokens=True)["input_ids"]
        specials = set(self.tokenizer.all_special_ids)
        count = next((position for position, token in enumerate(ids) if token not in specials), len(ids))
        return ids[:count]

    def _ids(self, texts: list[str], *, opening: bool) -> list[list[int]]:
        # Chat templates write their own specials into the text; the plain format's openings get the tokenizer's
        # leading ones (``_leading_special_ids``).
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [self._opening_special_ids + ids for ids in encoded] if opening else encoded

    def _openings(self, openings: Sequence[str]) -> list[OpeningTokens]:
        """The ``openings`` (``opening(prompt)`` of each prompt) in token ids, with the format's own tokens
        around each prompt's text counted: learned from the opening of a sentinel prompt (the text before it and
        after it), as the longest common token prefix and suffix of the opening and that text. The text between them
        need not be the prompt verbatim: templates that trim the content (Llama 3's, Gemma's) write a prompt with
        outer whitespace without it. An opening that does not begin and end with them (a subclass's own format)
        protects nothing."""
        frame = self.opening(_SENTINEL).split(_SENTINEL)
        ids = self._ids(list(openings), opening=True)
        if len(frame) != 2:
            return [OpeningTokens(opening_ids) for opening_ids in ids]
        head_ids, tail_ids = self._ids(frame, opening=True)
        tokens = []
        for text, opening_ids in zip(openings, ids):
            if len(text) < len(frame[0]) + len(frame[1]) or not (text.startswith(frame[0]) and
                                                                  text.endswith(frame[1])):
                tokens.append(OpeningTokens(opening_ids))
                continue
            head = _common_prefix(opening_ids, head_ids)
            tail = min(_common_prefix(opening_ids[::-1], tail_ids[::-1]), len(opening_ids) - head)
            tokens.append(OpeningTokens(opening_ids, head, tail))
        return tokens

    def _fit(self, opening: OpeningTokens, answer_length: int, where: str, answer: str = "the target"
             ) -> tuple[list[int], int]:
        """The opening cut from the left of its prompt text to leave ``answer_length`` tokens of ``max_length``;
        ``(ids, tokens dropped)``. ``answer`` names what takes those tokens (the target, or a choice) in the error."""
        room = self.max_length - answer_length
        dropped = max(0, len(opening.ids) - room)
        if not dropped:
            return opening.ids, 0
        kept = room - opening.head - opening.tail  # tokens of the prompt's text
        if kept < 1:
            raise TargetTooLong(f"{where}: {answer} takes {answer_length} tokens but max_length is "
                                f"{self.max_length} and the prompt format's own tokens take "
                                f"{opening.head + opening.tail}; it, the format's own tokens and at least one token "
                                f"of the prompt's text must all fit, so raise max_length, shorten it or the system "
                                f"prompt, or leave such examples out with long_targets='skip'", answer_length)
        end = len(opening.ids) - opening.tail
        return opening.ids[:opening.head] + opening.ids[end - kept:], dropped

    def _answers(self, texts: Sequence[tuple[str, str, str]]) -> list[list[int]]:
        """The trained answer tokens (body, then closing) of ``render``'s texts."""
        bodies = self._ids([text[1] for text in texts], opening=False)
        closings = self._ids([text[2] for text in texts], opening=False)
        return [body + closing for body, closing in zip(bodies, closings)]

    def answer_lengths(self, examples: Sequence[Example], where: str = "example") -> list[int]:
        """How many tokens each example's answer takes as ``encode`` trains it, without fitting it into
        ``max_length`` (which ``encode`` refuses for a target that does not fit). ``where`` (``task 'x', test``)
        goes before ``row N`` in a rendering error."""
        texts = [self._render(example.prompt, example.target, f"{where} row {example.row}") for example in examples]
        return [len(answer) for answer in self._answers(texts)]

    def encode(self, examples: Sequence[Example], task_id: int, task_name: str, split: str, *,
               with_eval_fields: bool = False) -> tuple[list[EncodedExample], TruncationStats]:
        """Token ids for every example of one task's split; with ``with_eval_fields``, also the choice rows."""
        texts = [self._render(example.prompt, example.target, f"task {task_name!r}, {split} row {example.row}")
                 for example in examples]
        openings = self._openings([text[0] for text in texts])
        stats = TruncationStats(examples=len(examples))
        encoded = []
        for example, opening, answer in zip(examples, openings, self._answers(texts)):
            where = f"task {task_name!r}, {split} row {example.row}"
            choice_inputs = choice_labels = None
            try:
                prompt, dropped = self._fit(opening, len(answer), where)
                if with_eval_fields and example.choices is not None:
                    choice_inputs, choice_labels, choice_dropped = self._choice_rows(example, opening, len(answer),
                                                                                     where)
                    dropped = max(dropped, choice_dropped)
            except TargetTooLong as error:
                if self.long_targets == "error":
                    raise
                stats.skipped += 1
                stats.longest_skipped = max(stats.longest_skipped, error.length)
                continue
            stats.truncated += dropped > 0
            stats.tokens_dropped += dropped
            encoded.append(EncodedExample(
                task_id=task_id, task_name=task_name, input_ids=prompt + answer,
                labels=[IGNORE_INDEX] * len(prompt) + answer, prompt_length=len(prompt), target=example.target,
                prompt=example.prompt, row=example.row, choice_input_ids=choice_inputs, choice_labels=choice_labels,
                gold=example.gold))
        return encoded, stats

    def encode_prompts(self, prompts: Sequence[PredictPrompt], task_id: int, answer_room: int = 0
                       ) -> tuple[list[EncodedExample], TruncationStats]:
        """A predict file's prompts of one task (``task_id``; -1 for those without one) to generate answers to: each
        prompt's ``opening``, as a task's examples get it, without answer tokens, cut as ``encode`` cuts it:
        leaving room for the row's target when it has a task and a target that fits with the format's own tokens and
        a prompt token (so a prompt of the task's own splits is generated from the same tokens), else for
        ``answer_room`` tokens (the task's generation length) or as many as fit. A target is only echoed to the
        output otherwise: it never stops the run."""
        stats = TruncationStats(examples=len(prompts))
        targeted = [index for index, given in enumerate(prompts) if given.target is not None and task_id >= 0]
        answers = self._answers([self._render(prompts[index].prompt, prompts[index].target,
                                              f"predict file row {prompts[index].row}") for index in targeted])
        target_rooms = dict(zip(targeted, map(len, answers)))
        texts = [given.prompt for given in prompts]
        openings = self._openings([self.opening(text) for text in texts])
        encoded = []
        for index, (given, opening) in enumerate(zip(prompts, openings)):
            if opening.head + opening.tail >= self.max_length:  # not a target's fault: `_fit` would blame one
                raise TaskDataError(f"predict file row {given.row}: the prompt format's own tokens take "
                                    f"{opening.head + opening.tail} of max_length {self.max_length}, leaving no "
                                    "token for the prompt's text; raise max_length or shorten the system prompt")
            most = max(0, self.max_length - opening.head - opening.tail - 1)  # leaves the format and a prompt token
            room = target_rooms.get(index, answer_room)
            room = room if room <= most else min(answer_room, most)
            prompt, dropped = self._fit(opening, room, f"predict file row {given.row}")
            stats.truncated += dropped > 0
            stats.tokens_dropped += dropped
            encoded.append(EncodedExample(task_id=task_id, task_name=given.task, input_ids=prompt,
                                          labels=[IGNORE_INDEX] * len(prompt), prompt_length=len(prompt),
                                          target=given.target, prompt=given.prompt, row=given.row))
        return encoded, stats

    def _choice_rows(self, example: Example, opening: OpeningTokens, answer_length: int, where: str
                     ) -> tuple[tuple[list[int], ...], tuple[list[int], ...], int]:
        """One row per choice: the same (cut) prompt followed by the choice's tokens, labelled on the choice only.
        The end-of-turn token is left out: it is the same for every choice and would only add noise. The prompt is
        cut to leave room for the longest choice and for the trained answer (``answer_length``), so that it is the
        training and generation prompt whenever that one leaves as much room. A choice without tokens is an error:
        its score (0 over 0 tokens) would beat every other choice's."""
        bodies = self._ids([self._render(example.prompt, choice, f"{where}, choice {index}")[1]
                            for index, choice in enumerate(example.choices)], opening=False)
        for index, (choice, body) in enumerate(zip(example.choices, bodies)):
            if not body:
                raise TaskDataError(f"{where}: choice {index} ({choice!r:.60}) has no tokens once rendered as the "
                                    "answer, so it cannot be scored; every choice must render to at least one token")
        longest = max(range(len(bodies)), key=lambda index: len(bodies[index]))
        if len(bodies[longest]) > answer_length:
            answer = f"choice {longest} ({example.choices[longest]!r:.60}), the longest,"
            prompt, dropped = self._fit(opening, len(bodies[longest]), where, answer)
        else:
            prompt, dropped = self._fit(opening, answer_length, where)
        rows = tuple(prompt + body for body in bodies)
        labels = tuple([IGNORE_INDEX] * len(prompt) + body for body in bodies)
        return rows, labels, dropped


def _common_prefix(first: Sequence[int], second: Sequence[int]) -> int:
    """How many leading tokens two sequences share."""
    count = 0
    for one, other in zip(first, second):
        if one != other:
            break
        count += 1
    return count


def pad(sequences: Sequence[Sequence[int]], value: int, *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(padded [N, longest], attention mask)``; padding goes on the left for generation prompts."""
    longest = max(len(sequence) for sequence in sequences)
    padded = torch.full((len(sequences), longest), value, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        span = slice(longest - len(sequence), longest) if left else slice(0, len(sequence))
        padded[row, span] = torch.tensor(sequence, dtype=torch.long)
        mask[row, span] = 1
    return padded, mask


class MultiTaskCollator:
    """Pads a list of ``EncodedExample`` into a ``TrainingBatch`` (with its target ``pairs``), or with ``eval_fields``
    an ``EvaluationBatch``."""

    def __init__(self, pad_token_id: int, *, eval_fields: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.eval_fields = eval_fields

    def __call__(self, examples: Sequence[EncodedExample]) -> TrainingBatch | EvaluationBatch:
        input_ids, attention_mask = pad([example.input_ids for example in examples], self.pad_token_id)
        labels, _ = pad([example.labels for example in examples], IGNORE_INDEX)
        task_id = torch.tensor([example.task_id for example in examples], dtype=torch.long)
        task_name = [example.task_name for example in examples]
        if not self.eval_fields:
            # contiguous (a no-op where `nonzero` gives contiguous columns, as torch 2.13's does): a strided view would
            # go to the device through pageable memory (a copy that waits)
            rows, positions = target_pairs(labels)
            return TrainingBatch(input_ids, attention_mask, labels, task_id, task_name,
                                 pairs=(rows.contiguous(), positions.contiguous()))
        multiple_choice = {example.choice_input_ids is not None for example in examples}
        if len(multiple_choice) > 1:
            raise ValueError("an evaluation batch mixes multiple-choice and generative examples; evaluate each task "
                             "with its own dataloader")
        prompt_input_ids, prompt_attention_mask = pad([example.input_ids[: example.prompt_length]
                                                       for example in examples], self.pad_token_id, left=True)
        return EvaluationBatch(input_ids, attention_mask, labels, task_id, task_name,
                               prompts=[example.prompt for example in examples],
                               targets=[example.target for example in examples],
                               rows=[example.row for example in examples],
                               prompt_input_ids=prompt_input_ids, prompt_attention_mask=prompt_attention_mask,
                               counted=torch.tensor([example.counted for example in examples], dtype=torch.bool),
                               choices=self._choice_rows(examples) if multiple_choice.pop() else None)

    def _choice_rows(self, examples: Sequence[EncodedExample]) -> ChoiceRows:
        rows = [row for example in examples for row in example.choice_input_ids]
        input_ids, attention_mask = pad(rows, self.pad_token_id)
        labels, _ = pad([labels for example in examples for labels in example.choice_labels], IGNORE_INDEX)
        counts = [len(example.choice_input_ids) for example in examples]
        return ChoiceRows(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                          example_index=torch.repeat_interleave(torch.arange(len(examples)), torch.tensor(counts)),
                          gold=torch.tensor([example.gold for example in examples], dtype=torch.long),
                          num_choices=torch.tensor(counts, dtype=torch.long))
