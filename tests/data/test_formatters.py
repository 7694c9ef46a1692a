"""Each paper dataset's formatter on hand-written rows in that dataset's published Hub schema (no network: the
registered hub source is swapped for the fixture file, read with the same datasets JSON loader users get)."""

import dataclasses
import json
from pathlib import Path

import pytest

from malora_lightning.data import FileSource, GeneratorSource, TaskDataError, final_answer, get_task
from malora_lightning.data.formatters import lettered_question

FIXTURES = Path(__file__).parent.parent / "fixtures" / "data"
ABCD = ("A", "B", "C", "D")


def fixture_examples(name: str):
    task = dataclasses.replace(get_task(name), source=FileSource({"train": str(FIXTURES / f"{name}.jsonl")}))
    return task.examples("train")


def rows_examples(name: str, rows: list[dict]):
    task = dataclasses.replace(get_task(name), source=GeneratorSource(lambda split, seed: rows, splits=("train",)))
    return task.examples("train")


# (task, full prompt of row 0, [(target, choices, gold) for every fixture row])
CASES = [
    ("arc_challenge",
     "Question: George wants to warm his hands quickly by rubbing them. Which skin surface will produce the most heat?"
     "\nA. dry palms\nB. wet palms\nC. palms covered with oil\nD. palms covered with lotion\nAnswer with the letter.",
     [("A", ABCD, 0), ("B", ABCD, 1), ("B", ABCD, 1)]),  # row 1 uses the numeric keys "1".."4"
    ("arc_easy",
     "Question: Which two body systems are directly involved in movement?\nA. muscular and skeletal\n"
     "B. digestive and muscular\nC. skeletal and respiratory\nD. respiratory and digestive\nAnswer with the letter.",
     [("A", ABCD, 0), ("C", ABCD + ("E",), 2), ("B", ("A", "B", "C"), 1)]),  # 5 options; 3 options keyed "1".."3"
    ("piqa",
     "Goal: When boiling butter, when it's ready, you can\nA. Pour it onto a plate\nB. Pour it into a jar\n"
     "Answer with the letter.",
     [("B", ("A", "B"), 1), ("A", ("A", "B"), 0)]),
    ("openbookqa",
     "Question: The sun is responsible for\nA. puppies learning new tricks\nB. children growing up and getting old\n"
     "C. flowers wilting in a vase\nD. plants sprouting, blooming and wilting\nAnswer with the letter.",
     [("D", ABCD, 3), ("D", ABCD, 3), ("A", ABCD, 0)]),
    ("boolq",
     "Persian (/ˈpɜːrʒən, -ʃən/), also known by its endonym Farsi, is one of the Western Iranian languages within the "
     "Indo-Iranian branch of the Indo-European language family. It is primarily spoken in Iran, Afghanistan "
     "(officially known as Dari since 1958), and Tajikistan.\nQuestion: Do iran and afghanistan speak the same "
     "language?\nAnswer yes or no.",
     [("yes", ("yes", "no"), 0), ("no", ("yes", "no"), 1)]),
    ("hellaswag",
     "Context: Removing ice from car: Then, the man writes over the snow covering the window of a car, and a woman "
     "wearing winter clothes smiles. then\nWhich ending is the most likely?\n"
     "A. , the man adds wax to the windshield and cuts it.\n"
     "B. , a person board a ski lift, while two men supporting the head of the person wearing winter clothes snow "
     "as the we girls sled.\nC. , the man puts on a christmas coat, knitted with netting.\n"
     "D. , the man continues removing the snow on his car.\nAnswer with the letter.",
     [("D", ABCD, 3), ("A", ABCD, 0)]),
    ("winogrande",
     "Sentence: Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating "
     "intestine.\nWhat does the blank _ refer to?\nA. Ian\nB. Dennis\nAnswer with the letter.",
     [("B", ("A", "B"), 1), ("A", ("A", "B"), 0)]),
    ("social_iqa",
     "Question: Cameron decided to have a barbecue and gathered her friends together.\nHow would Others feel as a "
     "result?\nA. like attending\nB. like staying home\nC. a good friend to have\nAnswer with the letter.",
     [("A", ("A", "B", "C"), 0), ("C", ("A", "B", "C"), 2)]),
    ("medmcqa",
     "Question: Chronic urethral obstruction due to benign prismatic hyperplasia can lead to the following change in "
     "kidney parenchyma\nA. Hyperplasia\nB. Hyperophy\nC. Atrophy\nD. Dyplasia\nAnswer with the letter.",
     [("C", ABCD, 2), ("C", ABCD, 2), ("B", ABCD, 1)]),
    ("gsm8k",
     "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips "
     "did Natalia sell altogether in April and May?",
     [("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72",
       None, None),  # calculator annotations <<...>> removed
      ("It sells 1,200*2 = 2,400 pens.\n#### 2,400", None, None)]),
    ("metamathqa",
     "If Natalia sold 48 clips in April and half as many in May, how many clips did she sell in total?",
     [("In May she sold 48/2 = 24 clips.\nIn total she sold 48 + 24 = 72 clips.\n#### 72\nThe answer is: 72",
       None, None),
      ("We have $\\frac{1}{2} + \\frac{1}{4} = \\frac{2}{4} + \\frac{1}{4} = \\frac{3}{4}$.\n"
       "The answer is: \\frac{3}{4}", None, None)]),
]


@pytest.mark.parametrize(("name", "first_prompt", "expected"), CASES, ids=[case[0] for case in CASES])
def test_formatter_on_fixture_rows(name, first_prompt, expected):
    examples = fixture_examples(name)
    assert examples[0].prompt == first_prompt
    assert [(example.target, example.choices, example.gold) for example in examples] == expected
    assert [example.row for example in examples] == list(range(len(expected)))


def test_hellaswag_wikihow_markers_are_cleaned():
    example = fixture_examples("hellaswag")[1]
    assert example.prompt.startswith("Context: Home and Garden: How to clean a glass stovetop. Let the stovetop cool.")
    assert "\nA. Wipe it with a damp cloth once it is cool to the touch.\n" in example.prompt
    assert "[" not in example.prompt


@pytest.mark.parametrize(("name", "prediction", "row", "correct"), [
    ("gsm8k", "She sold 24 in May, so 72 in total.\n#### 72", 0, True),
    ("gsm8k", "The answer is 72.", 0, True),
    ("gsm8k", "#### 73", 0, False),
    ("gsm8k", "2400", 1, True),  # "#### 2,400" in the reference
    ("metamathqa", "The answer is: \\frac{3}{4}", 1, True),
    ("metamathqa", "The answer is: \\frac{1}{4}", 1, False),
])
def test_math_tasks_compare_final_answers(name, prediction, row, correct):
    target = fixture_examples(name)[row].target
    assert get_task(name).is_correct(prediction, target) is correct


@pytest.mark.parametrize("name", ["gsm8k", "metamathqa"])
def test_math_task_targets_score_like_their_marked_answer_alone(name):
    """Every built-in math target carries its marker (#### or The answer is:); scoring against it is scoring against
    its marked answer written alone, so a bare "\\frac{3}{4}" is right against "The answer is: \\frac{3}{4}" too (it
    was cut to its last number, 4, and scored wrong)."""
    targets = [example.target for example in fixture_examples(name)]
    predictions = targets + [final_answer(target) for target in targets] + ["The answer is 18", "72", "no idea"]
    task = get_task(name)
    for target in targets:
        for prediction in predictions:
            assert task.is_correct(prediction, target) is (prediction in (target, final_answer(target)))
            assert task.is_correct(prediction, target) is task.is_correct(prediction, final_answer(target))


@pytest.mark.parametrize(("name", "row", "message"), [
    ("arc_challenge", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "F"},
     r"answerKey 'F' is not one of \['A', 'B'\]"),
    ("hellaswag", {"activity_label": "x", "ctx": "y", "endings": ["a", "b", "c", "d"], "label": ""},
     r"label '' is not one of \['0', '1', '2', '3'\]"),  # the unlabelled test split
    ("medmcqa", {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": -1},
     r"cop -1 is not one of"),
    ("medmcqa", {"question": "q", "opa": "a", "opb": None, "opc": "c", "opd": "d", "cop": 0},
     r"option B is None, not text"),  # was a bare AttributeError naming no row
    ("medmcqa", {"question": None, "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 0},
     r"the question is None, not text"),  # was an AttributeError naming no row
    ("gsm8k", {"question": "q", "answer": "72"}, "no '#### <number>' final line"),
    ("metamathqa", {"query": None, "response": "The answer is: 1"}, "'NoneType' object has no attribute 'strip'"),
    ("boolq", {"question": "q", "passage": "p", "answer": "yes"}, "answer must be a bool"),
    ("piqa", {"goal": "g", "sol1": "a", "label": 0}, "missing field 'sol2'"),
])
def test_bad_rows_name_the_task_row_and_problem(name, row, message):
    good = json.loads((FIXTURES / f"{name}.jsonl").read_text().splitlines()[0])
    with pytest.raises(TaskDataError, match=rf"task '{name}', train row 1: .*{message}"):
        rows_examples(name, [good, row])


def test_lettered_questions_name_up_to_26_options_and_refuse_more():
    """Past the letters, zip dropped options without a word: the ninth of nine was never shown (A-H then)."""
    nine = lettered_question("q", [f"o{index}" for index in range(9)], 8)
    assert nine.choices == tuple("ABCDEFGHI") and nine.target == "I" and "\nI. o8\n" in nine.prompt
    all_letters = lettered_question("q", [f"o{index}" for index in range(26)], 25)  # the limit itself is named
    assert all_letters.choices == tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ") and all_letters.target == "Z"
    with pytest.raises(ValueError, match="27 options is more than the 26 letters A-Z can name"):
        lettered_question("q", [f"o{index}" for index in range(27)], 0)


def test_paper_tasks_are_registered_with_their_hub_splits_and_chance_rates():
    """PIQA and SocialIQA ship loading scripts, which the datasets versions we accept (4 and later) refuse with
    "Dataset scripts are no longer supported": they load from the Hub's Parquet conversion."""
    parquet = "refs/convert/parquet"
    expected = {
        "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", None, "test", 0.25),
        "arc_easy": ("allenai/ai2_arc", "ARC-Easy", None, "test", 0.25),
        "piqa": ("ybisk/piqa", None, parquet, "validation", 0.5),
        "openbookqa": ("allenai/openbookqa", "main", None, "test", 0.25),
        "boolq": ("google/boolq", None, None, "validation", 0.622),
        "hellaswag": ("Rowan/hellaswag", None, None, "validation", 0.25),
        "winogrande": ("allenai/winogrande", "winogrande_xl", None, "validation", 0.5),
        "social_iqa": ("allenai/social_i_qa", None, parquet, "validation", 1 / 3),
        "medmcqa": ("openlifescienceai/medmcqa", None, None, "validation", 0.25),
        "gsm8k": ("openai/gsm8k", "main", None, "test", 0.0),
    }
    for name, (path, config, revision, test_split, chance) in expected.items():
        task = get_task(name)
        assert (task.source.path, task.source.name, task.source.revision, task.source.split_map["test"]) == \
            (path, config, revision, test_split)
        assert task.chance_rate == pytest.approx(chance)
        assert task.kind == ("generative" if name == "gsm8k" else "multiple_choice")
    assert get_task("metamathqa").source.splits == ("train",)
