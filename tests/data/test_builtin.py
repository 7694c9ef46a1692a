"""The offline suite: every answer re-derived from its prompt, splits disjoint, deterministic for a seed."""

import re
from collections import Counter

import pytest

from malora_lightning.data import BUILTIN_TASKS, CONFLICT_TASKS, NEUTRAL_TASKS, SPLITS, build_builtin_tasks, get_task
from malora_lightning.data.builtin import (CATEGORIES, CONFLICT_GENERATORS, NEUTRAL_GENERATORS, WORDS, _distinct_items,
                                          split_of)

STRING_TASKS = {"reverse_words", "sort_words", "first_letters"}
ARITHMETIC_TASKS = {"add_2digit", "subtract_2digit", "next_term"}
CHOICE_TASKS = {"compare_numbers", "parity", "odd_one_out", "compare_numbers_smaller", "longest_word"}
ALL_TASKS = BUILTIN_TASKS + CONFLICT_TASKS + NEUTRAL_TASKS
SMALL = {"train": 300, "validation": 40, "test": 60}


def numbers(text: str) -> list[int]:
    return [int(number) for number in re.findall(r"\d+", text)]


def options(prompt: str) -> list[str]:
    return re.findall(r"^[A-D]\. (.+)$", prompt, flags=re.MULTILINE)


def solve(task: str, prompt: str) -> str:
    """The right answer, worked out from the prompt text alone."""
    words = prompt.split(": ", 1)[-1].split()
    if task == "reverse_words":
        return " ".join(words[::-1])
    if task == "reverse_words_commas":
        return ", ".join(words[::-1])
    if task == "sort_words":
        return " ".join(sorted(words))
    if task == "sort_words_descending":
        return " ".join(sorted(words)[::-1])
    if task == "first_letters":
        return " ".join(word[0] for word in words)
    if task == "first_letters_upper":
        return " ".join(word[0].upper() for word in words)
    if task == "add_2digit":
        return str(sum(numbers(prompt)))
    if task == "subtract_2digit":
        a, b = numbers(prompt)
        return str(a - b)
    if task == "next_term":
        terms = numbers(prompt)
        return str(terms[-1] + terms[1] - terms[0])
    if task == "compare_numbers":
        a, b = (int(option) for option in options(prompt))
        return "A" if a > b else "B"
    if task == "compare_numbers_smaller":
        a, b = (int(option) for option in options(prompt))
        return "A" if a < b else "B"
    if task == "parity":
        return "odd" if numbers(prompt)[0] % 2 else "even"
    if task == "last_word":
        return words[-1]
    if task == "word_after":
        anchor = re.search(r"after (\w+) in:", prompt).group(1)
        return words[words.index(anchor) + 1]
    if task == "double_number":
        return str(2 * numbers(prompt)[0])
    if task == "longest_word":
        lengths = [len(word) for word in options(prompt)]
        assert sorted(lengths)[-1] > sorted(lengths)[-2]  # exactly one right answer
        return "ABCD"[lengths.index(max(lengths))]
    if task == "odd_one_out":
        words = options(prompt)
        categories = [next(name for name, members in CATEGORIES.items() if word in members) for word in words]
        (odd,) = [position for position, category in enumerate(categories) if categories.count(category) == 1]
        return "ABCD"[odd]
    raise AssertionError(task)


@pytest.fixture(scope="module")
def small_suite():
    tasks = build_builtin_tasks(SMALL) + build_builtin_tasks(SMALL, generators=CONFLICT_GENERATORS) \
        + build_builtin_tasks(SMALL, generators=NEUTRAL_GENERATORS)
    return {task.name: task for task in tasks}


def test_suite_has_at_least_eight_tasks_of_three_kinds():
    assert set(BUILTIN_TASKS) == (STRING_TASKS | ARITHMETIC_TASKS | CHOICE_TASKS) - set(CONFLICT_TASKS) \
        - set(NEUTRAL_TASKS)
    assert {get_task(name).kind for name in CHOICE_TASKS} == {"multiple_choice"}
    assert {get_task(name).kind for name in STRING_TASKS | ARITHMETIC_TASKS} == {"generative"}
    assert {get_task(name).metric for name in BUILTIN_TASKS} == {"accuracy", "exact_match"}


def test_conflict_group_is_opt_in_and_contradicts_the_suite_on_the_same_inputs(small_suite):
    """Each conflict task is registered but not in the default suite, and for the same input its answer differs
    from its suite partner's (the reason the group exists)."""
    assert set(CONFLICT_TASKS).isdisjoint(BUILTIN_TASKS)
    partners = {"reverse_words_commas": "reverse_words", "sort_words_descending": "sort_words",
                "first_letters_upper": "first_letters", "compare_numbers_smaller": "compare_numbers"}
    assert set(partners) == set(CONFLICT_TASKS)
    for name, partner in partners.items():
        for example in small_suite[name].examples("validation"):
            if name == "compare_numbers_smaller":
                same_input = example.prompt.replace("smaller", "larger")
            else:
                same_input = f"{small_suite[partner].examples('train')[0].prompt.split(': ')[0]}: " \
                             f"{example.prompt.split(': ', 1)[1]}"
            assert solve(name, example.prompt) != solve(partner, same_input), example.prompt


def test_neutral_group_is_opt_in_and_mirrors_the_conflict_group_without_asking_the_same(small_suite):
    """The control group: registered but not in the default suite, as many tasks of each kind as the conflict
    group, and none of its instructions is a suite or conflict task's (so nothing it asks can contradict them)."""
    assert set(NEUTRAL_TASKS).isdisjoint(BUILTIN_TASKS + CONFLICT_TASKS)
    kinds = [sorted(get_task(name).kind for name in group) for group in (NEUTRAL_TASKS, CONFLICT_TASKS)]
    assert kinds[0] == kinds[1]

    def instruction(name: str) -> str:  # the prompt's first line without its input words and numbers
        line = small_suite[name].examples("validation")[0].prompt.splitlines()[0].removeprefix("Question: ")
        line = " ".join("W" if word in WORDS else word for word in line.split(": ")[0].split())
        return re.sub(r"\d+", "N", line)

    neutral = {instruction(name) for name in NEUTRAL_TASKS}
    others = {instruction(name) for name in BUILTIN_TASKS + CONFLICT_TASKS}
    assert len(neutral) == len(NEUTRAL_TASKS) and neutral.isdisjoint(others)


@pytest.mark.parametrize("name", ALL_TASKS)
def test_every_target_is_the_right_answer_to_its_prompt(small_suite, name):
    examples = small_suite[name].examples("train", seed=3)
    assert len(examples) == SMALL["train"]
    for example in examples:
        assert example.target == solve(name, example.prompt), example.prompt


@pytest.mark.parametrize("name", ALL_TASKS)
def test_splits_are_disjoint_whatever_the_seed(small_suite, name):
    prompts = {split: {example.prompt for seed in (0, 1)
                       for example in small_suite[name].examples(split, seed=seed)} for split in SPLITS}
    assert prompts["train"].isdisjoint(prompts["validation"])
    assert prompts["train"].isdisjoint(prompts["test"])
    assert prompts["validation"].isdisjoint(prompts["test"])
    assert all(len(small_suite[name].examples(split)) == SMALL[split] for split in SPLITS)


@pytest.mark.parametrize("name", BUILTIN_TASKS)
def test_generation_is_deterministic_for_a_seed(small_suite, name):
    task = small_suite[name]
    first = task.examples("validation", seed=5)
    _distinct_items.cache_clear()  # drawn again, not the kept draw
    assert first == build_builtin_tasks(SMALL)[BUILTIN_TASKS.index(name)].examples("validation", seed=5)
    assert first != task.examples("validation", seed=6)
    assert len({example.prompt for example in first}) == len(first)  # no duplicates within a split


def test_a_split_drawn_again_is_new_rows_a_caller_may_change():
    """The drawn items are kept for the process; a caller changing its rows must not change the next caller's."""
    task = build_builtin_tasks(SMALL)[BUILTIN_TASKS.index("parity")]
    rows = task.source.load("test", 3)
    expected = [dict(row) for row in rows]
    rows[0]["prompt"] = "changed"
    rows.pop()
    hits = _distinct_items.cache_info().hits
    assert task.source.load("test", 3) == expected and len(expected) == SMALL["test"]
    assert _distinct_items.cache_info().hits == hits + 1  # the kept draw, not drawn again
    for row in rows:  # its values immutable (hashable; a choice row's choices a tuple): nothing changed in place
        hash(tuple(row.values()))  # reaches the kept draw through the new dicts


@pytest.mark.parametrize("name", ALL_TASKS)
def test_chance_rate_is_the_majority_answer_rate_of_the_test_split(name):
    task = get_task(name)
    targets = [example.target for example in task.examples("test", seed=0)]
    assert len(targets) == 200
    assert task.chance_rate == max(Counter(targets).values()) / 200
    if name in CHOICE_TASKS:  # gold answers are balanced: the majority rate is near 1/#choices
        choices = len(task.examples("test")[0].choices)
        assert task.chance_rate == pytest.approx(1 / choices, abs=0.07)
    else:
        assert task.chance_rate < 0.06


def test_a_generator_with_too_few_distinct_items_for_a_split_names_the_task_and_the_counts():
    """Fifty possible prompts cannot fill a test split of 1000: the error says how many of that split exist."""
    def small_space(rng):
        number = rng.randrange(50)
        return {"prompt": f"Say {number}.", "target": str(number)}

    in_test = sum(split_of("say_number", f"Say {number}.") == "test" for number in range(50))
    assert 0 < in_test < 50
    with pytest.raises(RuntimeError, match=rf"^task 'say_number': found only {in_test} distinct test items of the "
                                           rf"1000 asked for$"):
        build_builtin_tasks({"train": 1, "validation": 1, "test": 1000},
                            generators={"say_number": ("generative", small_space, "say a number")})
