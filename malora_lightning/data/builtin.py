"""The built-in offline task suite: procedurally generated tasks that need no download, so the default job and the
benchmarks run anywhere.

Three kinds, chosen so a 135M instruction model starts low but can learn them in a few hundred steps, and so that
tasks pull the adapters in different directions (the seesaw effect): the same word lists must be reversed, sorted or
abbreviated; the same pairs of numbers added or subtracted.

* strings: ``reverse_words``, ``sort_words``, ``first_letters``
* arithmetic: ``add_2digit``, ``subtract_2digit``, ``next_term`` (arithmetic sequences)
* multiple choice: ``compare_numbers`` (which is larger, A/B), ``parity`` (even/odd), ``odd_one_out`` (A-D)

An opt-in conflict group (`CONFLICT_TASKS`, not in the default suite) asks the suite's own inputs for incompatible
answers, so a shared adapter trained on both is pulled two ways: ``reverse_words_commas`` (the reversal, comma
separated), ``sort_words_descending`` (reverse alphabetical order), ``first_letters_upper`` (the letters in capitals)
and ``compare_numbers_smaller`` (which is smaller: the opposite letter for the same pair of numbers).

An opt-in neutral group (`NEUTRAL_TASKS`) is its control: as many tasks of the same kinds that ask nothing that
contradicts the suite (``last_word``, ``word_after``, ``double_number``, ``longest_word``, A-D), so that what adding
a group costs the suite can be split into the share of examples it takes and the conflict itself.

Splits are disjoint by construction: every item's prompt is hashed to train (80% of the item space), validation
(10%) or test (10%), and a split only keeps items hashed to it. A seed picks which items of its part are drawn.
The words of `WORDS` are ones SmolLM2's tokenizer keeps as single tokens (with and without a leading space), and its
digits are single tokens, so targets stay a few tokens long (odd_one_out's category words need not be: its targets
are letters).
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable, Mapping
from functools import lru_cache, partial
from typing import Any

from malora_lightning.data.formatters import lettered_question
from malora_lightning.data.tasks import Example, GeneratorSource, Task, register_task

SPLIT_SIZES = {"train": 2000, "validation": 100, "test": 200}
_SPLIT_BOUNDS = (("train", 0.8), ("validation", 0.9), ("test", 1.0))

WORDS = (
    "apple", "orange", "lime", "berry", "cat", "dog", "horse", "lion", "mouse", "bear", "wolf", "fox", "pig", "red",
    "blue", "green", "yellow", "black", "white", "brown", "purple", "gray", "car", "bus", "train", "boat", "plane",
    "ship", "shirt", "hat", "coat", "sock", "hand", "foot", "head", "nose", "ear", "eye", "arm", "leg", "river",
    "stone", "house", "table", "chair", "window", "door", "bread", "water", "music", "paper", "money", "forest",
    "cloud", "city", "road", "book", "clock", "ocean",
)
CATEGORIES = {
    "fruit": ("apple", "orange", "lime", "berry", "pear", "plum", "grape", "lemon"),
    "animal": ("cat", "dog", "horse", "lion", "mouse", "bear", "wolf", "fox"),
    "color": ("red", "blue", "green", "yellow", "black", "white", "brown", "purple"),
    "vehicle": ("car", "bus", "train", "boat", "plane", "ship", "truck", "bike"),
    "clothing": ("shirt", "hat", "coat", "sock", "shoe", "dress", "glove", "scarf"),
    "body": ("hand", "foot", "head", "nose", "ear", "eye", "arm", "leg"),
}

Row = dict[str, Any]


def _word_list(rng: random.Random) -> list[str]:
    return rng.sample(WORDS, rng.randint(3, 5))


def reverse_words(rng: random.Random) -> Row:
    words = _word_list(rng)
    return {"prompt": f"Reverse the order of the words: {' '.join(words)}", "target": " ".join(reversed(words))}


def sort_words(rng: random.Random) -> Row:
    words = _word_list(rng)
    return {"prompt": f"Sort the words alphabetically: {' '.join(words)}", "target": " ".join(sorted(words))}


def first_letters(rng: random.Random) -> Row:
    words = _word_list(rng)
    return {"prompt": f"Write the first letter of each word: {' '.join(words)}",
            "target": " ".join(word[0] for word in words)}


def add_2digit(rng: random.Random) -> Row:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return {"prompt": f"What is {a} + {b}?", "target": str(a + b)}


def subtract_2digit(rng: random.Random) -> Row:
    a, b = sorted(rng.sample(range(10, 100), 2), reverse=True)
    return {"prompt": f"What is {a} - {b}?", "target": str(a - b)}


def next_term(rng: random.Random) -> Row:
    start, step, shown = rng.randint(1, 99), rng.randint(2, 19), rng.randint(3, 4)
    terms = ", ".join(str(start + index * step) for index in range(shown))
    return {"prompt": f"Continue the sequence: {terms},", "target": str(start + shown * step)}


def _choice_row(example: Example) -> Row:
    return {"prompt": example.prompt, "target": example.target, "choices": example.choices, "gold": example.gold}


def compare_numbers(rng: random.Random) -> Row:
    a, b = rng.sample(range(10, 100), 2)
    return _choice_row(lettered_question("Which number is larger?", [str(a), str(b)], 0 if a > b else 1))


def parity(rng: random.Random) -> Row:
    number = rng.randint(100, 9999)
    return _choice_row(Example.multiple_choice(f"Is {number} even or odd?", ("even", "odd"), number % 2))


def odd_one_out(rng: random.Random) -> Row:
    common, other = rng.sample(sorted(CATEGORIES), 2)
    words = rng.sample(CATEGORIES[common], 3)
    gold = rng.randrange(4)
    words.insert(gold, rng.choice(CATEGORIES[other]))
    return _choice_row(lettered_question("Which word does not belong?", words, gold))


def reverse_words_commas(rng: random.Random) -> Row:
    words = _word_list(rng)
    return {"prompt": f"Reverse the order of the words, separated by commas: {' '.join(words)}",
            "target": ", ".join(reversed(words))}


def sort_words_descending(rng: random.Random) -> Row:
    words = _word_list(rng)
    return {"prompt": f"Sort the words in reverse alphabetical order: {' '.join(words)}",
            "target": " ".join(sorted(words, reverse=True))}


def first_letters_upper(rng: random.Random) -> Row:
    words = _word_list(rng)
    return {"prompt": f"Write the first letter of each word in capitals: {' '.join(words)}",
            "target": " ".join(word[0].upper() for word in words)}


def compare_numbers_smaller(rng: random.Random) -> Row:
    a, b = rng.sample(range(10, 100), 2)
    return _choice_row(lettered_question("Which number is smaller?", [str(a), str(b)], 0 if a < b else 1))


def last_word(rng: random.Random) -> Row:
    words = _word_list(rng)
    return {"prompt": f"Write the last word: {' '.join(words)}", "target": words[-1]}


def word_after(rng: random.Random) -> Row:
    words = _word_list(rng)
    index = rng.randrange(len(words) - 1)
    return {"prompt": f"Which word comes after {words[index]} in: {' '.join(words)}", "target": words[index + 1]}


def double_number(rng: random.Random) -> Row:
    number = rng.randint(1000, 4999)
    return {"prompt": f"Double the number: {number}", "target": str(2 * number)}


def longest_word(rng: random.Random) -> Row:
    while True:
        words = rng.sample(WORDS, 4)
        lengths = sorted((len(word) for word in words), reverse=True)
        if lengths[0] > lengths[1]:  # one longest word
            break
    gold = max(range(4), key=lambda index: len(words[index]))
    return _choice_row(lettered_question("Which word is the longest?", words, gold))


Generator = tuple[str, Callable[[random.Random], Row], str]  # (kind, one item from a random.Random, description)

# each built-in task of the default suite by name
TASK_GENERATORS: dict[str, Generator] = {
    "reverse_words": ("generative", reverse_words, "reverse a list of 3-5 words"),
    "sort_words": ("generative", sort_words, "sort a list of 3-5 words alphabetically"),
    "first_letters": ("generative", first_letters, "first letter of each of 3-5 words"),
    "add_2digit": ("generative", add_2digit, "sum of two 2-digit numbers"),
    "subtract_2digit": ("generative", subtract_2digit, "difference of two 2-digit numbers (non-negative)"),
    "next_term": ("generative", next_term, "next term of an arithmetic sequence shown by 3-4 terms"),
    "compare_numbers": ("multiple_choice", compare_numbers, "which of two 2-digit numbers is larger (A/B)"),
    "parity": ("multiple_choice", parity, "whether a 3-4 digit number is even or odd"),
    "odd_one_out": ("multiple_choice", odd_one_out, "which of four words is from another category (A-D)"),
}
# the opt-in conflict group: each task asks a suite task's inputs for an answer that contradicts the suite task's
CONFLICT_GENERATORS: dict[str, Generator] = {
    "reverse_words_commas": ("generative", reverse_words_commas, "reverse_words, answered comma separated"),
    "sort_words_descending": ("generative", sort_words_descending, "sort_words, in reverse alphabetical order"),
    "first_letters_upper": ("generative", first_letters_upper, "first_letters, answered in capitals"),
    "compare_numbers_smaller": ("multiple_choice", compare_numbers_smaller,
                                "compare_numbers asking for the smaller number (A/B)"),
}
# the opt-in neutral group, the conflict group's control: the same kinds of task, contradicting nothing in the suite
NEUTRAL_GENERATORS: dict[str, Generator] = {
    "last_word": ("generative", last_word, "the last of 3-5 words"),
    "word_after": ("generative", word_after, "the word that follows a given one in a list of 3-5 words"),
    "double_number": ("generative", double_number, "twice a 4-digit number"),
    "longest_word": ("multiple_choice", longest_word, "which of four words is the longest (A-D)"),
}

def split_of(task: str, prompt: str) -> str:
    """The split an item belongs to, fixed by a hash of its prompt so that no seed can leak it into another."""
    digest = hashlib.blake2b(f"{task}\0{prompt}".encode(), digest_size=8).digest()
    fraction = int.from_bytes(digest, "little") / 2**64
    return next(split for split, bound in _SPLIT_BOUNDS if fraction < bound)


def generate_split(task: str, make: Callable[[random.Random], Row], sizes: Mapping[str, int], split: str,
                   seed: int) -> list[Row]:
    """``sizes[split]`` distinct items of ``split``, drawn with a generator fixed by (task, split, seed). The rows
    are new dicts on each call (their values are immutable), so a caller may change them."""
    return [dict(row) for row in _distinct_items(task, make, sizes[split], split, seed)]


@lru_cache(maxsize=256)
def _distinct_items(task: str, make: Callable[[random.Random], Row], size: int, split: str,
                    seed: int) -> tuple[Row, ...]:
    """The items of `generate_split`, kept because drawing them is deterministic but slow (thousands of draws and
    hashes a split): a process that sets data up again (a fit then a test, a sweep, a notebook) reuses them."""
    rng = random.Random(f"{task}:{split}:{seed}")
    rows: list[Row] = []
    seen: set[str] = set()
    for _ in range(200 * size):
        row = make(rng)
        if row["prompt"] in seen or split_of(task, row["prompt"]) != split:
            continue
        seen.add(row["prompt"])
        rows.append(row)
        if len(rows) == size:
            return tuple(rows)
    raise RuntimeError(f"task {task!r}: found only {len(rows)} distinct {split} items of the {size} asked for")


def format_row(row: Mapping[str, Any]) -> Example:
    return Example(prompt=row["prompt"], target=row["target"], choices=row.get("choices"), gold=row.get("gold"))


def majority_rate(targets: list[str]) -> float:
    """Exact-match score of always answering the most common target."""
    return Counter(targets).most_common(1)[0][1] / len(targets)


def build_builtin_tasks(sizes: Mapping[str, int] = SPLIT_SIZES,
                        generators: Mapping[str, Generator] = TASK_GENERATORS) -> list[Task]:
    """The suite (or another group of generators) with the given split sizes; ``chance_rate`` is the majority-answer
    rate of the seed-0 test split. A generator's item is a function of the ``random.Random`` it is given alone (the
    drawn items are kept for the process)."""
    tasks = []
    for name, (kind, make, description) in generators.items():
        generate = partial(generate_split, name, make, dict(sizes))
        targets = [row["target"] for row in generate("test", 0)]
        tasks.append(Task(name=name, source=GeneratorSource(generate), formatter=format_row, kind=kind,
                          chance_rate=majority_rate(targets), description=description))
    return tasks


BUILTIN_TASKS = tuple(register_task(task).name for task in build_builtin_tasks())
CONFLICT_TASKS = tuple(register_task(task).name for task in build_builtin_tasks(generators=CONFLICT_GENERATORS))
NEUTRAL_TASKS = tuple(register_task(task).name for task in build_builtin_tasks(generators=NEUTRAL_GENERATORS))
