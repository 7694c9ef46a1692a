"""Formatters for the datasets the MALoRA paper trains and tests on, in each dataset's published Hub schema.

Multiple-choice datasets are shown with lettered options and answered with the letter, so every choice is one short
string and log-likelihood scoring compares like with like; BoolQ is answered ``yes``/``no``. GSM8K and MetaMathQA
are generative: the target is the worked solution and answers are compared by their final number.

Importing this module registers the tasks (``arc_challenge``, ``arc_easy``, ``piqa``, ``openbookqa``, ``boolq``,
``hellaswag``, ``winogrande``, ``social_iqa``, ``gsm8k``, ``metamathqa``, ``medmcqa``); nothing is downloaded until a
task's data is loaded. Datasets whose test split is unlabelled are tested on their validation split, as the paper
and the usual harnesses do.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from malora_lightning.data.tasks import Example, HubSource, Task, final_answer, register_task

LETTERS = string.ascii_uppercase


def lettered_question(question: str, options: Sequence[str], gold: int, *, header: str = "Question") -> Example:
    """``Question: ...`` then ``A. option`` lines; the answer is the gold option's letter."""
    if len(options) > len(LETTERS):  # zip would drop the options past Z without a word
        raise ValueError(f"{len(options)} options is more than the {len(LETTERS)} letters A-Z can name")
    if not isinstance(question, str):  # a null question: .strip() failed naming no field
        raise ValueError(f"the question is {question!r}, not text")
    letters = LETTERS[: len(options)]
    for letter, option in zip(letters, options):
        if not isinstance(option, str):  # a null option: the text "None" would be trained and scored
            raise ValueError(f"option {letter} is {option!r}, not text")
    lines = [f"{header}: {question.strip()}"]
    lines += [f"{letter}. {option.strip()}" for letter, option in zip(letters, options)]
    lines.append("Answer with the letter.")
    return Example.multiple_choice("\n".join(lines), tuple(letters), gold)


def _label_index(value: Any, labels: Sequence[str], field: str) -> int:
    """Position of ``value`` in ``labels``; a clear error when the dataset's label is not among them."""
    text = str(value).strip()
    if text not in labels:
        raise ValueError(f"{field} {value!r} is not one of {list(labels)}")
    return list(labels).index(text)


def _answer_key_example(row: Mapping[str, Any], question: str) -> Example:
    """ARC/OpenBookQA layout: ``choices: {text, label}`` and ``answerKey``, one of the labels."""
    choices = row["choices"]
    gold = _label_index(row["answerKey"], [str(label) for label in choices["label"]], "answerKey")
    return lettered_question(question, choices["text"], gold)


def format_arc(row: Mapping[str, Any]) -> Example:
    """allenai/ai2_arc: ``question``, ``choices: {text, label}``, ``answerKey`` ("A".."E" or "1".."5")."""
    return _answer_key_example(row, row["question"])


def format_openbookqa(row: Mapping[str, Any]) -> Example:
    """allenai/openbookqa: ``question_stem``, ``choices: {text, label}``, ``answerKey`` ("A".."D")."""
    return _answer_key_example(row, row["question_stem"])


def format_piqa(row: Mapping[str, Any]) -> Example:
    """ybisk/piqa: ``goal``, ``sol1``, ``sol2``, ``label`` (0 or 1)."""
    gold = _label_index(row["label"], ["0", "1"], "label")
    return lettered_question(row["goal"], [row["sol1"], row["sol2"]], gold, header="Goal")


def format_boolq(row: Mapping[str, Any]) -> Example:
    """google/boolq: ``question`` (lower case, no question mark), ``passage``, ``answer`` (bool)."""
    answer = row["answer"]
    if not isinstance(answer, bool):
        raise ValueError(f"answer must be a bool (got {answer!r})")
    question = row["question"].strip().rstrip("?")
    prompt = f"{row['passage'].strip()}\nQuestion: {question[:1].upper()}{question[1:]}?\nAnswer yes or no."
    return Example.multiple_choice(prompt, ("yes", "no"), 0 if answer else 1)


def _clean_hellaswag(text: str) -> str:
    """HellaSwag's WikiHow rows carry ``[title]``/``[step]`` markers and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def format_hellaswag(row: Mapping[str, Any]) -> Example:
    """Rowan/hellaswag: ``activity_label``, ``ctx``, ``endings`` (4 strings), ``label`` (a digit string)."""
    endings = [_clean_hellaswag(ending) for ending in row["endings"]]
    gold = _label_index(row["label"], [str(index) for index in range(len(endings))], "label")
    context = f"{row['activity_label'].strip()}: {_clean_hellaswag(row['ctx'])}"
    return lettered_question(f"{context}\nWhich ending is the most likely?", endings, gold, header="Context")


def format_winogrande(row: Mapping[str, Any]) -> Example:
    """allenai/winogrande: ``sentence`` with a ``_`` blank, ``option1``, ``option2``, ``answer`` ("1" or "2")."""
    gold = _label_index(row["answer"], ["1", "2"], "answer")
    question = f"{row['sentence'].strip()}\nWhat does the blank _ refer to?"
    return lettered_question(question, [row["option1"], row["option2"]], gold, header="Sentence")


def format_social_iqa(row: Mapping[str, Any]) -> Example:
    """allenai/social_i_qa: ``context``, ``question``, ``answerA``..``answerC``, ``label`` ("1".."3")."""
    gold = _label_index(row["label"], ["1", "2", "3"], "label")
    question = f"{row['context'].strip()}\n{row['question'].strip()}"
    return lettered_question(question, [row["answerA"], row["answerB"], row["answerC"]], gold)


def format_medmcqa(row: Mapping[str, Any]) -> Example:
    """openlifescienceai/medmcqa: ``question``, ``opa``..``opd``, ``cop`` (0..3; -1 in the unlabelled test split)."""
    gold = _label_index(row["cop"], ["0", "1", "2", "3"], "cop")
    return lettered_question(row["question"], [row["opa"], row["opb"], row["opc"], row["opd"]], gold)


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def format_gsm8k(row: Mapping[str, Any]) -> Example:
    """openai/gsm8k: ``question``, ``answer`` (a worked solution ending ``#### N``, with ``<<a*b=c>>`` calculator
    annotations, which are removed)."""
    answer = row["answer"]
    if "####" not in answer:
        raise ValueError(f"answer has no '#### <number>' final line: {answer[-80:]!r}")
    return Example(prompt=row["question"].strip(), target=_CALCULATOR.sub("", answer).strip())


def format_metamathqa(row: Mapping[str, Any]) -> Example:
    """meta-math/MetaMathQA: ``query`` and ``response`` (a worked solution ending ``The answer is: N``)."""
    return Example(prompt=row["query"].strip(), target=row["response"].strip())


def _paper_tasks() -> list[Task]:
    tested_on_validation = {"train": "train", "validation": "validation", "test": "validation"}
    # PIQA and SocialIQA still ship loading scripts, which datasets 4 and later refuse ("Dataset scripts are no longer
    # supported"); the Hub's Parquet conversion of each holds the same rows
    parquet_conversion = "refs/convert/parquet"
    gsm8k_splits = {"train": "train", "validation": "test", "test": "test"}

    def choice_task(name: str, source: HubSource, formatter, chance: float, description: str) -> Task:
        return Task(name=name, source=source, formatter=formatter, kind="multiple_choice", chance_rate=chance,
                    description=description)

    return [
        choice_task("arc_challenge", HubSource("allenai/ai2_arc", "ARC-Challenge"), format_arc, 0.25,
                    "ARC-Challenge grade-school science questions (mostly 4 options)"),
        choice_task("arc_easy", HubSource("allenai/ai2_arc", "ARC-Easy"), format_arc, 0.25,
                    "ARC-Easy grade-school science questions (mostly 4 options)"),
        choice_task("piqa", HubSource("ybisk/piqa", split_map=tested_on_validation, revision=parquet_conversion),
                    format_piqa, 0.5, "PIQA physical commonsense, 2 solutions"),
        choice_task("openbookqa", HubSource("allenai/openbookqa", "main"), format_openbookqa, 0.25,
                    "OpenBookQA elementary science, 4 options"),
        choice_task("boolq", HubSource("google/boolq", split_map=tested_on_validation), format_boolq, 0.622,
                    "BoolQ yes/no reading comprehension; chance rate = majority ('yes') rate of its validation set"),
        choice_task("hellaswag", HubSource("Rowan/hellaswag", split_map=tested_on_validation), format_hellaswag,
                    0.25, "HellaSwag sentence completion, 4 endings"),
        choice_task("winogrande", HubSource("allenai/winogrande", "winogrande_xl", tested_on_validation),
                    format_winogrande, 0.5, "WinoGrande pronoun resolution, 2 options"),
        choice_task("social_iqa",
                    HubSource("allenai/social_i_qa", split_map=tested_on_validation, revision=parquet_conversion),
                    format_social_iqa, 1 / 3, "SocialIQA social commonsense, 3 options"),
        choice_task("medmcqa", HubSource("openlifescienceai/medmcqa", split_map=tested_on_validation),
                    format_medmcqa, 0.25, "MedMCQA medical entrance exams, 4 options (tested on the dev set)"),
        Task(name="gsm8k", source=HubSource("openai/gsm8k", "main", gsm8k_splits), formatter=format_gsm8k,
             chance_rate=0.0, answer=final_answer,
             description="GSM8K grade-school math word problems (no validation split: validated on test)"),
        Task(name="metamathqa", source=HubSource("meta-math/MetaMathQA", split_map={"train": "train"}),
             formatter=format_metamathqa, chance_rate=0.0, answer=final_answer,
             description="MetaMathQA augmented math solutions (train only; the paper tests it on gsm8k)"),
    ]


PAPER_TASKS = tuple(register_task(task).name for task in _paper_tasks())
