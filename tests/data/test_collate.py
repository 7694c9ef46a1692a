"""Tokenisation and batching with the byte-level test tokenizer: one token per byte, so every expected position can be
counted by hand. Specials: <pad>=0, <s>=1, </s>=2, <|im_start|>=3, <|im_end|>=4."""

import json

import pytest
import torch
from tokenizers.processors import TemplateProcessing

from malora_lightning.data import IGNORE_INDEX, Example, MultiTaskCollator, PromptEncoder, TaskDataError
from malora_lightning.data.batches import TrainingBatch
from malora_lightning.data.collate import EncodedExample, TruncationStats
from malora_lightning.data.prompts import PredictPrompt
from malora_lightning.scoring import target_pairs

PAD, BOS, EOS, IM_START, IM_END = 0, 1, 2, 3, 4


def encode(tokenizer, examples, max_length=64, eval_fields=False, **kwargs):
    encoder = PromptEncoder(tokenizer, max_length, **kwargs)
    encoded, stats = encoder.encode(examples, task_id=3, task_name="toy", split="train", with_eval_fields=eval_fields)
    return encoder, encoded, stats


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_plain_format_masks_exactly_the_prompt_and_the_padding(tokenizer):
    examples = [Example(prompt="ab", target="cd", row=0), Example(prompt="hello", target="world", row=1)]
    encoder, encoded, _ = encode(tokenizer, examples)
    batch = MultiTaskCollator(encoder.pad_token_id)(encoded)
    # "ab\nAnswer:" is 10 bytes, then " cd" and </s>: 14 tokens; "hello\nAnswer:" 13 + " world" 6 + </s> = 20
    assert batch.input_ids.shape == (2, 20)
    expected_labels = [[IGNORE_INDEX] * 10 + ids(tokenizer, " cd") + [EOS] + [IGNORE_INDEX] * 6,
                       [IGNORE_INDEX] * 13 + ids(tokenizer, " world") + [EOS]]
    assert batch.labels.tolist() == expected_labels
    assert batch.attention_mask.tolist() == [[1] * 14 + [0] * 6, [1] * 20]
    assert batch.input_ids[0, 14:].tolist() == [PAD] * 6
    assert batch.input_ids[0, :14].tolist() == ids(tokenizer, "ab\nAnswer: cd") + [EOS]
    assert batch.task_id.tolist() == [3, 3] and batch.task_id.dtype == torch.long
    assert batch.task_name == ["toy", "toy"]
    assert type(batch) is TrainingBatch  # training batches carry no evaluation fields


def test_a_training_batch_carries_the_target_pairs_of_its_labels_made_on_the_cpu():
    """The loss's (row, position) pairs were made on the device in every step (`target_pairs`: a data-dependent
    shape, which waits for the queued kernels); the collator makes them from the labels it pads. Position t predicts
    the label at t + 1: the prompt (-100), the padding (-100) and a row's first token are never targets."""
    def example(prompt: list[int], answer: list[int]) -> EncodedExample:
        return EncodedExample(task_id=0, task_name="toy", input_ids=prompt + answer,
                              labels=[IGNORE_INDEX] * len(prompt) + answer, prompt_length=len(prompt), target=None,
                              prompt="")

    batch = MultiTaskCollator(PAD)([example([5, 6, 7], [8, 9]), example([5], [8, 9, 10, 11]),
                                    example([5, 6], [8])])
    assert batch.labels.tolist() == [[-100, -100, -100, 8, 9], [-100, 8, 9, 10, 11], [-100, -100, 8, -100, -100]]
    rows, positions = batch.pairs
    assert rows.tolist() == [0, 0, 1, 1, 1, 1, 2] and positions.tolist() == [2, 3, 0, 1, 2, 3, 1]
    expected_rows, expected_positions = target_pairs(batch.labels)
    assert torch.equal(rows, expected_rows) and torch.equal(positions, expected_positions)
    assert rows.is_contiguous() and positions.is_contiguous()  # a strided view goes to a GPU through pageable memory
    evaluation = MultiTaskCollator(PAD, eval_fields=True)([example([5, 6, 7], [8, 9])])
    assert evaluation.pairs is None  # evaluation reads none (and `batch_rows` would leave them stale)


def test_chat_template_labels_only_the_assistant_answer_and_end_of_turn(chat_tokenizer):
    encoder, (example,), _ = encode(chat_tokenizer, [Example(prompt="ab", target="cd", row=0)])
    opening = [IM_START] + ids(chat_tokenizer, "user\nab") + [IM_END] + ids(chat_tokenizer, "\n") + [IM_START] + \
        ids(chat_tokenizer, "assistant\n")
    assert example.input_ids == opening + ids(chat_tokenizer, "cd") + [IM_END]  # the template's trailing "\n" dropped
    assert example.labels == [IGNORE_INDEX] * len(opening) + ids(chat_tokenizer, "cd") + [IM_END]
    assert example.prompt_length == len(opening) == 21


@pytest.mark.parametrize("eos, template_closing, trained_closing", [
    ("</s>", "<|im_end|>\n", [IM_END]),  # a ChatML base model (Qwen2.5): the end of turn is not EOS
    ("<|im_end|>", "<|im_end|>\n", [IM_END]),  # a ChatML chat model: it is
    ("</s>", "\n<|im_end|>\n</s>", ["\n", IM_END]),  # EOS after the end of turn
    ("</s>", "</s><|im_end|>", [EOS]),  # the first special token ends the answer, whichever it is
    ("</s>", "\n\n", ["\n\n"]),  # no special token: the closing is plain text, kept whole
])
def test_the_trained_answer_ends_at_the_first_special_token_of_the_templates_closing(
        chat_tokenizer, eos, template_closing, trained_closing):
    """What a template writes after its end-of-turn token (a newline before the next turn) is never generated, since
    generation stops at that token: training on it taught nothing and cost a token per example (it was trained
    unless that token was the tokenizer's EOS)."""
    chat_tokenizer.eos_token = eos
    chat_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{{ " + json.dumps(template_closing) + " if m['role'] == 'assistant' else '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    _, (example,), _ = encode(chat_tokenizer, [Example(prompt="ab", target="cd", row=0)])
    answer = ids(chat_tokenizer, "cd") + [token for part in trained_closing
                                          for token in (ids(chat_tokenizer, part) if isinstance(part, str) else [part])]
    assert example.input_ids[example.prompt_length:] == answer
    assert example.labels[example.prompt_length:] == answer
    turns = [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}]
    assert chat_tokenizer.apply_chat_template(turns, tokenize=False).endswith(template_closing)


def test_an_end_of_turn_token_that_is_only_an_added_special_token_ends_the_trained_answer(chat_tokenizer):
    """Llama 3's <|eot_id|> is a special added token that no special-token attribute names (all_special_tokens
    leaves it out): the closing is cut there too, not trained on to the template's trailing newline."""
    from tokenizers import AddedToken

    chat_tokenizer.add_tokens([AddedToken("<|eot_id|>", special=True)])
    eot = chat_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert "<|eot_id|>" not in chat_tokenizer.all_special_tokens
    chat_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "{{ '<|eot_id|>\n' if m['role'] == 'assistant' else '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    _, (example,), _ = encode(chat_tokenizer, [Example(prompt="ab", target="cd", row=0)])
    assert example.labels[example.prompt_length:] == ids(chat_tokenizer, "cd") + [eot]


def test_system_prompt_becomes_the_first_turn(chat_tokenizer):
    _, (example,), _ = encode(chat_tokenizer, [Example(prompt="ab", target="cd", row=0)], system_prompt="be brief")
    system = [IM_START] + ids(chat_tokenizer, "system\nbe brief") + [IM_END] + ids(chat_tokenizer, "\n")
    user = [IM_START] + ids(chat_tokenizer, "user\nab") + [IM_END] + ids(chat_tokenizer, "\n")
    opening = system + user + [IM_START] + ids(chat_tokenizer, "assistant\n")
    assert example.input_ids == opening + ids(chat_tokenizer, "cd") + [IM_END]
    assert example.labels == [IGNORE_INDEX] * len(opening) + ids(chat_tokenizer, "cd") + [IM_END]


@pytest.mark.parametrize("use_chat_template", [None, False])
def test_a_system_prompt_without_a_chat_template_is_refused(tokenizer, chat_tokenizer, use_chat_template):
    """The plain format has no system turn: the prompt was left out of every example without a word."""
    tokenizer = tokenizer if use_chat_template is None else chat_tokenizer
    with pytest.raises(ValueError, match="system_prompt='be brief' needs the chat template, but the plain prompt"):
        PromptEncoder(tokenizer, 64, use_chat_template=use_chat_template, system_prompt="be brief")


def test_use_chat_template_can_be_forced_either_way(tokenizer, chat_tokenizer):
    _, (plain,), _ = encode(chat_tokenizer, [Example(prompt="ab", target="cd", row=0)], use_chat_template=False)
    assert plain.input_ids == ids(chat_tokenizer, "ab\nAnswer: cd") + [chat_tokenizer.eos_token_id]
    with pytest.raises(ValueError, match="use_chat_template=True but the tokenizer has no chat template"):
        PromptEncoder(tokenizer, 64, use_chat_template=True)


def test_long_prompts_are_cut_from_the_left_of_their_text_and_counted(tokenizer):
    examples = [Example(prompt="abcdefghij", target="xy", row=0), Example(prompt="a", target="b", row=1)]
    _, encoded, stats = encode(tokenizer, examples, max_length=13)
    # "abcdefghij\nAnswer:" (18) + " xy</s>" (4) > 13: keep the format's "\nAnswer:" and the last prompt token
    assert encoded[0].input_ids == ids(tokenizer, "j\nAnswer: xy") + [EOS]
    assert encoded[0].labels == [IGNORE_INDEX] * 9 + ids(tokenizer, " xy") + [EOS]
    assert encoded[1].input_ids == ids(tokenizer, "a\nAnswer: b") + [EOS]  # 12: untouched
    assert (stats.examples, stats.truncated, stats.tokens_dropped) == (2, 1, 9)


def test_a_cut_keeps_the_bos_token_of_the_plain_format(tokenizer):
    """A tokenizer that starts every text with BOS (Llama's): the cut took BOS first."""
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    _, (example,), stats = encode(tokenizer, [Example(prompt="abcdefghij", target="xy", row=0)], max_length=14)
    assert example.input_ids == [BOS] + ids(tokenizer, "j\nAnswer: xy") + [EOS]
    assert example.labels == [IGNORE_INDEX] * 10 + ids(tokenizer, " xy") + [EOS]
    assert stats.tokens_dropped == 9
    _, (whole,), _ = encode(tokenizer, [Example(prompt="abcdefghij", target="xy", row=0)], max_length=64)
    assert whole.input_ids == [BOS] + ids(tokenizer, "abcdefghij\nAnswer: xy") + [EOS]  # untouched as before


def test_a_tokenizer_that_appends_eos_puts_no_eos_between_prompt_and_answer(tokenizer, chat_tokenizer):
    """A Llama tokenizer with add_eos_token=True ends every encoding with EOS: the plain format's prompt got it,
    "ab\nAnswer:</s> cd</s>", and a generation prompt ended with EOS."""
    plain_ids = ids(tokenizer, "ab\nAnswer:")
    chat_whole = encode(chat_tokenizer, [Example(prompt="ab", target="cd", row=0)])[1][0]
    appends_eos = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", BOS), ("</s>", EOS)])
    tokenizer.backend_tokenizer.post_processor = appends_eos
    encoder, (whole,), _ = encode(tokenizer, [Example(prompt="ab", target="cd", row=0)])
    assert whole.input_ids == [BOS] + plain_ids + ids(tokenizer, " cd") + [EOS]
    assert whole.labels == [IGNORE_INDEX] * 11 + ids(tokenizer, " cd") + [EOS]
    (prompt,), _ = encoder.encode_prompts([PredictPrompt(prompt="ab", row=0)], task_id=-1)
    assert prompt.input_ids == [BOS] + plain_ids
    _, (cut,), stats = encode(tokenizer, [Example(prompt="abcdefghij", target="cd", row=0)], max_length=14)
    assert cut.input_ids == [BOS] + ids(tokenizer, "j\nAnswer: cd") + [EOS]
    assert stats.tokens_dropped == 9
    chat_tokenizer.backend_tokenizer.post_processor = appends_eos  # the chat template writes its own specials
    assert encode(chat_tokenizer, [Example(prompt="ab", target="cd", row=0)])[1][0] == chat_whole


def test_a_cut_keeps_the_chat_templates_turns_around_the_prompts_text(chat_tokenizer):
    """The cut took <|im_start|>, then the system turn and the user header first."""
    examples = [Example(prompt="abcdefghij", target="xy", row=0)]
    system = [IM_START] + ids(chat_tokenizer, "system\nbe brief") + [IM_END] + ids(chat_tokenizer, "\n")
    user_header = [IM_START] + ids(chat_tokenizer, "user\n")
    end_of_turn = [IM_END] + ids(chat_tokenizer, "\n") + [IM_START] + ids(chat_tokenizer, "assistant\n")
    answer = ids(chat_tokenizer, "xy") + [IM_END]
    _, (whole,), _ = encode(chat_tokenizer, examples, system_prompt="be brief")
    assert whole.input_ids == system + user_header + ids(chat_tokenizer, "abcdefghij") + end_of_turn + answer
    length = len(system + user_header + end_of_turn + answer) + 3
    encoder, (cut,), stats = encode(chat_tokenizer, examples, max_length=length, system_prompt="be brief")
    assert cut.input_ids == system + user_header + ids(chat_tokenizer, "hij") + end_of_turn + answer
    assert cut.labels == [IGNORE_INDEX] * (length - len(answer)) + answer
    assert (stats.truncated, stats.tokens_dropped) == (1, 7)
    prompts, _ = encoder.encode_prompts([PredictPrompt(prompt="abcdefghij", task="toy", target="xy", row=0)],
                                        task_id=0)
    assert prompts[0].input_ids == cut.input_ids[:cut.prompt_length]  # a predict file's prompt is cut the same way
    with pytest.raises(TaskDataError, match=r"task 'toy', train row 0: the target takes 3 tokens but max_length is "
                                            rf"{length - 3} and the prompt format's own tokens take {length - 6}; "
                                            r"it, the format's own tokens and at least one token of the prompt's "
                                            r"text must all fit, so raise max_length, shorten it or the system "
                                            r"prompt, or leave such examples out with long_targets='skip'"):
        encode(chat_tokenizer, examples, max_length=length - 3, system_prompt="be brief")


class TwicePromptEncoder(PromptEncoder):
    """A subclass's own format that writes the prompt twice: no single text between the format's own tokens."""

    def opening(self, prompt):
        return f"{prompt}\n{prompt}\nAnswer:"


def test_a_cut_of_an_opening_that_is_not_the_format_around_the_prompt_protects_no_token(tokenizer):
    """Its own tokens cannot be told from the prompt's, so the cut drops tokens from the left of the whole opening,
    the BOS that a cut of the plain format keeps included."""
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    example = Example(prompt="abcdefghij", target="cd", row=0)
    encoder = TwicePromptEncoder(tokenizer, 64)
    (whole,), _ = encoder.encode([example], task_id=0, task_name="toy", split="train")
    opening = [BOS] + ids(tokenizer, "abcdefghij\nabcdefghij\nAnswer:")
    assert whole.input_ids == opening + ids(tokenizer, " cd") + [EOS]
    encoder = TwicePromptEncoder(tokenizer, 20)
    (cut,), stats = encoder.encode([example], task_id=0, task_name="toy", split="train")
    assert cut.input_ids == opening[-16:] + ids(tokenizer, " cd") + [EOS]
    assert (stats.truncated, stats.tokens_dropped) == (1, len(opening) - 16)


@pytest.mark.parametrize(("max_length", "remove", "message"), [
    (1, (), r"^max_length must be >= 2 \(got 1\)$"),
    (64, ("eos_token",), r"^the plain prompt format ends targets with the EOS token, but the tokenizer has none$"),
])
def test_an_encoder_that_cannot_encode_is_refused(tokenizer, max_length, remove, message):
    for attribute in remove:
        setattr(tokenizer, attribute, None)
    with pytest.raises(ValueError, match=message):
        PromptEncoder(tokenizer, max_length)


def test_a_tokenizer_with_neither_a_pad_nor_an_eos_token_is_refused(chat_tokenizer):
    """The chat format needs no EOS token (its template closes the turn), but padding needs one of them."""
    chat_tokenizer.pad_token = chat_tokenizer.eos_token = None
    with pytest.raises(ValueError, match=r"^the tokenizer has neither a pad token nor an EOS token to pad with$"):
        PromptEncoder(chat_tokenizer, 64)


# ChatML with its content trimmed, as Llama 3's and Gemma's templates trim it ("{{ message['content'] | trim }}")
TRIMMING_CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_a_cut_keeps_the_turns_of_a_template_that_trims_the_prompt(chat_tokenizer):
    """A template that trims the content writes "abcdefghij\n" as "abcdefghij": the opening no longer held the prompt
    verbatim, so nothing counted as the format's own and the cut took <|im_start|>system\nbe brief... from the left
    (the model saw "ystem\nbe brief<|im_end|>..." with its whole prompt text), as for a subclass's own format."""
    chat_tokenizer.chat_template = TRIMMING_CHATML
    system = [IM_START] + ids(chat_tokenizer, "system\nbe brief") + [IM_END] + ids(chat_tokenizer, "\n")
    user_header = [IM_START] + ids(chat_tokenizer, "user\n")
    end_of_turn = [IM_END] + ids(chat_tokenizer, "\n") + [IM_START] + ids(chat_tokenizer, "assistant\n")
    answer = ids(chat_tokenizer, "xy") + [IM_END]
    length = len(system + user_header + end_of_turn + answer) + 3
    for prompt in ("abcdefghij\n", "  abcdefghij "):
        encoder, (cut,), stats = encode(chat_tokenizer, [Example(prompt=prompt, target="xy", row=0)],
                                        max_length=length, system_prompt="be brief")
        assert cut.input_ids == system + user_header + ids(chat_tokenizer, "hij") + end_of_turn + answer
        assert cut.labels == [IGNORE_INDEX] * (length - len(answer)) + answer
        assert (stats.truncated, stats.tokens_dropped) == (1, 7)
        (predicted,), _ = encoder.encode_prompts([PredictPrompt(prompt=prompt, task="toy", target="xy", row=0)],
                                                 task_id=0)
        assert predicted.input_ids == cut.input_ids[:cut.prompt_length]


def test_a_predict_prompt_whose_format_alone_fills_max_length_is_an_error_that_blames_no_target(chat_tokenizer):
    """It said "the target takes 0 tokens" and offered long_targets='skip', which predict prompts ignore."""
    system = [IM_START] + ids(chat_tokenizer, "system\nbe brief") + [IM_END] + ids(chat_tokenizer, "\n")
    own = len(system) + len([IM_START] + ids(chat_tokenizer, "user\n")) + \
        len([IM_END] + ids(chat_tokenizer, "\n") + [IM_START] + ids(chat_tokenizer, "assistant\n"))
    encoder = PromptEncoder(chat_tokenizer, own, system_prompt="be brief")
    with pytest.raises(TaskDataError, match=rf"^predict file row 4: the prompt format's own tokens take {own} of "
                                            rf"max_length {own}, leaving no token for the prompt's text; raise "
                                            r"max_length or shorten the system prompt$"):
        encoder.encode_prompts([PredictPrompt(prompt="ab", row=4)], task_id=-1)
    (prompt,), _ = PromptEncoder(chat_tokenizer, own + 1, system_prompt="be brief").encode_prompts(
        [PredictPrompt(prompt="ab", row=4)], task_id=-1)
    assert len(prompt.input_ids) == own + 1  # one token of the prompt's text is kept


def test_a_target_longer_than_max_length_is_an_error_naming_the_row(tokenizer):
    examples = [Example(prompt="q", target="ok", row=0), Example(prompt="q", target="x" * 20, row=7)]
    with pytest.raises(TaskDataError, match=r"task 'toy', train row 7: the target takes 22 tokens but max_length is "
                                            r"16 and the prompt format's own tokens take 8; it, the format's own "
                                            r"tokens"):
        encode(tokenizer, examples, max_length=16)


def test_long_targets_skip_leaves_out_the_examples_that_do_not_fit_and_counts_them(tokenizer):
    """Instruction data with a few very long answers (code) stopped the whole setup at the first one."""
    fitting = [Example(prompt="q", target="ok", row=0), Example(prompt="a longer question", target="fine", row=2)]
    too_long = [Example(prompt="q", target="x" * 20, row=1), Example(prompt="q", target="y" * 30, row=3)]
    _, kept, stats = encode(tokenizer, [fitting[0], too_long[0], fitting[1], too_long[1]], max_length=16,
                            long_targets="skip")
    _, expected, expected_stats = encode(tokenizer, fitting, max_length=16)
    assert kept == expected  # the fitting examples encode exactly as on their own
    assert [example.row for example in kept] == [0, 2]
    assert (stats.examples, stats.skipped, stats.longest_skipped) == (4, 2, 32)  # " yyy..y</s>": 30 + 2 tokens
    assert (stats.truncated, stats.tokens_dropped) == (expected_stats.truncated, expected_stats.tokens_dropped)
    # an evaluation example whose longest choice does not fit is left out the same way
    choices = Example(prompt="abcdefghij", target="yes", choices=("yes", "a much longer choice"), gold=0, row=4)
    _, none, stats = encode(tokenizer, [choices], max_length=24, eval_fields=True, long_targets="skip")
    assert none == [] and (stats.skipped, stats.longest_skipped) == (1, 21)
    with pytest.raises(ValueError, match=r"long_targets='cut' is invalid: expected one of 'error', 'skip'"):
        PromptEncoder(tokenizer, 16, long_targets="cut")


def test_generation_prompts_are_left_padded_and_end_where_the_answer_starts(chat_tokenizer):
    examples = [Example(prompt="a", target="1", row=0), Example(prompt="abcd", target="22", row=1)]
    encoder, encoded, _ = encode(chat_tokenizer, examples, eval_fields=True)
    batch = MultiTaskCollator(encoder.pad_token_id, eval_fields=True)(encoded)
    header = ids(chat_tokenizer, "\n") + [IM_START] + ids(chat_tokenizer, "assistant\n")
    prompts, mask = batch.prompt_input_ids, batch.prompt_attention_mask
    assert prompts.shape == (2, 21 + 2)  # "user\nabcd" is 2 bytes longer than "user\na"
    assert prompts[0, :3].tolist() == [PAD] * 3 and mask[0].tolist() == [0] * 3 + [1] * 20
    assert prompts[0, -len(header):].tolist() == header and prompts[1, -len(header):].tolist() == header
    assert batch.targets == ["1", "22"]
    assert batch.choices is None


def test_multiple_choice_rows_label_only_each_choice(tokenizer):
    examples = [Example(prompt="pick", target="B", choices=("A", "B"), gold=1, row=0),
                Example(prompt="q", target="no", choices=("no", "yes", "x"), gold=0, row=1)]
    encoder, encoded, _ = encode(tokenizer, examples, eval_fields=True)
    batch = MultiTaskCollator(encoder.pad_token_id, eval_fields=True)(encoded)
    assert batch.choices.example_index.tolist() == [0, 0, 1, 1, 1]
    assert batch.choices.gold.tolist() == [1, 0] and batch.choices.num_choices.tolist() == [2, 3]
    rows, labels = batch.choices.input_ids, batch.choices.labels
    assert rows.shape == (5, len("pick\nAnswer: A"))  # the longest row; "q\nAnswer: yes" is one byte shorter
    for row, (prompt, choice) in enumerate([("pick", "A"), ("pick", "B"), ("q", "no"), ("q", "yes"), ("q", "x")]):
        length = len(f"{prompt}\nAnswer: {choice}")
        assert rows[row, :length].tolist() == ids(tokenizer, f"{prompt}\nAnswer: {choice}")
        choice_span = len(f" {choice}")
        assert labels[row].tolist() == [IGNORE_INDEX] * (length - choice_span) + ids(tokenizer, f" {choice}") + \
            [IGNORE_INDEX] * (rows.shape[1] - length)  # no end-of-turn token, padding masked
        assert batch.choices.attention_mask[row].sum().item() == length
    assert batch.targets == ["B", "no"]
    assert batch.labels[0].tolist()[-3:] == ids(tokenizer, " B") + [EOS]  # the gold answer still gives a loss


class DroppingEncoder(PromptEncoder):
    """A user format that renders the answer "-" as nothing (as a template that strips punctuation would)."""

    def render(self, prompt, target):
        opening, body, closing = super().render(prompt, target)
        return opening, body.replace(" -", ""), closing


def test_a_choice_without_tokens_is_an_error_naming_the_row_and_the_choice(tokenizer):
    """0 label tokens would score 0 / 1: the best possible score, so that choice would always be chosen."""
    example = Example(prompt="q", target="yes", choices=("yes", "-", "no"), gold=0, row=7)
    with pytest.raises(TaskDataError, match=r"task 'toy', train row 7: choice 1 \('-'\) has no tokens"):
        DroppingEncoder(tokenizer, 64).encode([example], task_id=0, task_name="toy", split="train",
                                              with_eval_fields=True)


def test_the_closing_token_is_the_trained_end_of_turn_when_decoding_drops_it(tokenizer, chat_tokenizer):
    """The token generation stops at besides EOS (`MALoRAModule.stop_token_ids`)."""
    assert PromptEncoder(tokenizer, 16).closing_token_id() == EOS  # the plain format closes with EOS
    chat_tokenizer.eos_token = "</s>"  # a ChatML base model (Qwen2.5): the closing "<|im_end|>\n" holds no EOS
    assert PromptEncoder(chat_tokenizer, 16).closing_token_id() == IM_END
    chat_tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
                                    "{% if add_generation_prompt %}assistant: {% endif %}")
    assert PromptEncoder(chat_tokenizer, 16).closing_token_id() is None  # "\n" also occurs inside answers


def test_chat_template_that_rewrites_the_answer_is_rejected(chat_tokenizer):
    chat_tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] | upper }}"
                                    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                                    "{% endif %}")
    with pytest.raises(ValueError, match="the target cannot be separated from the prompt"):
        encode(chat_tokenizer, [Example(prompt="ab", target="cd", row=0)])


def test_a_target_that_a_trimming_template_cannot_write_as_given_is_an_error_naming_its_row(chat_tokenizer):
    """The error named no task, split, row or choice, and blamed the template as a whole ("does not render ... as a
    plain continuation"), though only the rows with whitespace around their answer fail."""
    chat_tokenizer.chat_template = TRIMMING_CHATML
    examples = [Example(prompt="ab", target="cd", row=0), Example(prompt="ab", target="cd\n", row=7)]
    trims = r"the chat template trims the whitespace around the answer, so the target 'cd\\n' cannot be trained as " \
            r"written; strip it \(in the task's formatter or target template\) or pass use_chat_template=False$"
    with pytest.raises(TaskDataError, match=r"^task 'toy', train row 7: " + trims):
        encode(chat_tokenizer, examples)
    choices = Example(prompt="ab", target="x", choices=("x", "cd\n"), gold=0, row=3)
    with pytest.raises(TaskDataError, match=r"^task 'toy', train row 3, choice 1: " + trims):
        encode(chat_tokenizer, [choices], eval_fields=True)
    encoder = PromptEncoder(chat_tokenizer, 64)
    with pytest.raises(TaskDataError, match=r"^task 'toy', test row 7: " + trims):
        encoder.answer_lengths(examples, "task 'toy', test")
    with pytest.raises(TaskDataError, match=r"^predict file row 2: " + trims):
        encoder.encode_prompts([PredictPrompt(prompt="ab", task="toy", target="cd\n", row=2)], task_id=0)


def test_mixed_evaluation_batches_are_refused(tokenizer):
    encoder, encoded, _ = encode(tokenizer, [Example(prompt="a", target="b", row=0),
                                             Example(prompt="c", target="A", choices=("A", "B"), gold=0, row=1)],
                                 eval_fields=True)
    with pytest.raises(ValueError, match="mixes multiple-choice and generative examples"):
        MultiTaskCollator(encoder.pad_token_id, eval_fields=True)(encoded)


def test_eos_pads_when_the_tokenizer_has_no_pad_token(tokenizer):
    tokenizer.pad_token = None
    assert PromptEncoder(tokenizer, 16).pad_token_id == EOS


def test_a_choice_too_long_to_score_is_an_error_naming_the_choice_not_the_target(tokenizer):
    """The error blamed the target ("the target takes 21 tokens") for the longest choice's length."""
    example = Example(prompt="abcdefghij", target="yes", choices=("yes", "a much longer choice"), gold=0, row=4)
    encode(tokenizer, [example], max_length=24)  # " yes</s>" (5 tokens) fits with "\nAnswer:" (8) and the prompt
    with pytest.raises(TaskDataError, match=r"task 'toy', train row 4: choice 1 \('a much longer choice'\), the "
                                            r"longest, takes 21 tokens but max_length is 24 and the prompt format's "
                                            r"own tokens take 8; .* raise max_length, shorten it"):
        encode(tokenizer, [example], max_length=24, eval_fields=True)


def test_choice_rows_are_cut_like_the_training_prompt_when_the_gold_choice_is_longest(tokenizer):
    """The choice rows left room for the longest choice without the end-of-turn token, so they kept one prompt token
    more than the training example and the generation prompt."""
    example = Example(prompt="abcdefghij", target="yes", choices=("yes", "no"), gold=0, row=0)
    _, (encoded,), stats = encode(tokenizer, [example], max_length=16, eval_fields=True)
    # 16 - len(" yes</s>") leaves 11 prompt tokens: the format's "\nAnswer:" (8) and "hij"
    assert encoded.input_ids == ids(tokenizer, "hij\nAnswer: yes") + [EOS]
    assert encoded.choice_input_ids == (ids(tokenizer, "hij\nAnswer: yes"), ids(tokenizer, "hij\nAnswer: no"))
    assert encoded.choice_labels == ([IGNORE_INDEX] * 11 + ids(tokenizer, " yes"),
                                     [IGNORE_INDEX] * 11 + ids(tokenizer, " no"))
    assert stats.tokens_dropped == 7


def test_a_predict_prompt_given_more_answer_room_than_fits_keeps_the_format_and_one_token_of_its_text(tokenizer):
    """`most` leaves the format's tokens and one prompt token: a task's generation length as long as max_length (or
    longer) cuts the prompt to that one token, and never stops the run as a target too long would."""
    (prompt,), stats = PromptEncoder(tokenizer, 16).encode_prompts([PredictPrompt(prompt="abcdefghij", row=0)],
                                                                   task_id=0, answer_room=100)
    # 16 - "\nAnswer:" (8) - one prompt token leaves 7 tokens to generate; "abcdefghi" (9 tokens) are dropped
    assert prompt.input_ids == ids(tokenizer, "j\nAnswer:")
    assert (stats.examples, stats.truncated, stats.tokens_dropped) == (1, 1, 9)


def test_a_cut_that_only_the_choice_rows_need_is_counted(tokenizer):
    """The training row fits whole; the longest choice leaves room for 2 of the prompt's 10 text tokens."""
    example = Example(prompt="abcdefghij", target="yes", choices=("yes", "a much longer"), gold=0, row=0)
    _, (encoded,), stats = encode(tokenizer, [example], max_length=24, eval_fields=True)
    assert encoded.input_ids == ids(tokenizer, "abcdefghij\nAnswer: yes") + [EOS]  # 23 tokens: not cut
    # 24 - len(" a much longer") (14) leaves 10: the format's "\nAnswer:" (8) and "ij"
    assert encoded.choice_input_ids == (ids(tokenizer, "ij\nAnswer: yes"), ids(tokenizer, "ij\nAnswer: a much longer"))
    assert (stats.examples, stats.truncated, stats.tokens_dropped) == (1, 1, 8)


def test_truncation_stats_add_counts_and_keeps_the_longest_skipped_target():
    """A split is encoded in chunks (ENCODE_CHUNK examples), whose stats are added up."""
    total = TruncationStats(examples=3, truncated=1, tokens_dropped=5, skipped=1, longest_skipped=40)
    total.add(TruncationStats(examples=2, truncated=2, tokens_dropped=7, skipped=1, longest_skipped=30))
    assert total == TruncationStats(examples=5, truncated=3, tokens_dropped=12, skipped=2, longest_skipped=40)
    total.add(TruncationStats(examples=1, skipped=1, longest_skipped=50))
    assert (total.skipped, total.longest_skipped) == (3, 50)
