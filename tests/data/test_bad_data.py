"""User data files: values keep the text the user wrote, and a missing, null or mistyped value is an error that names
the file, the row and the field; never the text "None", never a silent conversion."""

import codecs
import csv
import json

import pytest

from malora_lightning.data import task_from_spec
from malora_lightning.data import tasks as tasks_module
from malora_lightning.data.tasks import TaskDataError

DEFAULT_CSV_FIELD_LIMIT = csv.field_size_limit()

GENERATIVE = {"prompt": "{q}", "target": "{a}"}
CHOICE = {"prompt": "{q}", "choices": "options", "gold": "answer"}


def jsonl(*rows) -> str:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


CASES = {  # name: (file name, content, spec fields, message fragments)
    "jsonl missing target field": ("d.jsonl", jsonl({"q": "2+2", "a": "4"}, {"q": "3+3"}), GENERATIVE,
                                   ["train row 1", "missing field 'a'", "d.jsonl"]),
    "jsonl null target": ("d.jsonl", jsonl({"q": "2+2", "a": None}), GENERATIVE,
                          ["train row 0", "field 'a' is empty (null)", "d.jsonl"]),
    # the predict file and a CSV cell refused it; a JSON line trained the answer after an empty user turn
    "jsonl empty prompt": ("d.jsonl", jsonl({"q": "2+2", "a": "4"}, {"q": " ", "a": "6"}), GENERATIVE,
                           ["train row 1", "the prompt is empty", "d.jsonl"]),
    "csv empty cell": ("d.csv", "q,a\n2+2,4\n3+3,\n", GENERATIVE, ["train row 1", "field 'a' is empty", "d.csv"]),
    "csv short row": ("d.csv", "q,a\n2+2\n", GENERATIVE, ["train row 0", "field 'a' is empty"]),
    # a header name holding an invisible character (a no-break space, as spreadsheets export) read "the row has: q, a"
    "csv header with a no-break space": ("d.csv", "q\xa0,a\n2+2,4\n", GENERATIVE,
                                         ["train row 0", "missing field 'q' (the row has: 'q\\xa0', 'a')"]),
    "csv long row": ("d.csv", "q,a\n2+2,4,extra\n", GENERATIVE, ["d.csv, line 2", "more cells than the 2 columns"]),
    "choices given as a string": ("d.jsonl", jsonl({"q": "ok?", "options": "yes", "answer": 0}), CHOICE,
                                  ["choices field 'options' must hold a list", "'yes'"]),
    "repeated choice": ("d.jsonl", jsonl({"q": "ok?", "options": ["yes", "no"], "answer": 0},
                                         {"q": "Pick", "options": ["yes", "no", "yes"], "answer": 2}), CHOICE,
                        ["train row 1", "choices 'yes' appear more than once", "d.jsonl"]),
    "empty choice": ("d.jsonl", jsonl({"q": "ok?", "options": ["yes", "no"], "answer": 0},
                                      {"q": "Pick", "options": ["yes", "", "no"], "answer": 2}), CHOICE,
                     ["train row 1", "choice 1 is '' in ['yes', '', 'no']", "must be non-empty text", "d.jsonl"]),
    "gold outside the choices": ("d.jsonl", jsonl({"q": "ok?", "options": ["no", "yes"], "answer": 2}), CHOICE,
                                 ["train row 0", "gold index 2 is not in 0..1", "d.jsonl"]),
    "csv choices cell that is not JSON": ("d.csv", 'q,options,answer\nok?,"[no, yes]",0\n', CHOICE,
                                          ["train row 0", "choices field 'options' is not a JSON list", "d.csv"]),
    "json that is one number": ("d.json", "5\n", GENERATIVE,
                                ["d.json: expected an array of objects (or one object per line), got int"]),
    "gold given as a boolean": ("d.jsonl", jsonl({"q": "ok?", "options": ["no", "yes"], "answer": True}), CHOICE,
                                ["gold field 'answer' must hold an integer index", "True"]),
    "empty jsonl": ("d.jsonl", "", GENERATIVE, ["the 'train' split is empty"]),
    "jsonl of blank lines": ("d.jsonl", "\n  \n\n", GENERATIVE, ["the 'train' split is empty"]),
    "cut-off jsonl line": ("d.jsonl", jsonl({"q": "a", "a": "b"}, '{"q": "c", "a'), GENERATIVE,
                           ["d.jsonl, line 2: not a JSON object"]),
    "jsonl line that is a list": ("d.jsonl", jsonl(["q", "a"]), GENERATIVE,
                                  ["d.jsonl, line 1: expected an object of fields, got list"]),
    "json that is not a list of objects": ("d.json", "[1, 2]", GENERATIVE, ["d.json, item 1: expected an object"]),
    "jsonl boolean in a template": ("d.jsonl", jsonl({"q": "Is it?", "a": True}), GENERATIVE,
                                    ["train row 0", "field 'a' holds a boolean (true)", "d.jsonl"]),
    "jsonl list in a template": ("d.jsonl", jsonl({"q": "List?", "a": ["x", None]}), GENERATIVE,
                                 ["train row 0", "field 'a' holds a list ([\"x\", null])", "must hold a string"]),
    "jsonl object in a template": ("d.jsonl", jsonl({"q": {"text": "nested", "hint": None}, "a": "ok"}), GENERATIVE,
                                   ["train row 0", "field 'q' holds an object"]),
    "jsonl lone surrogate": ("d.jsonl", jsonl({"q": "ok", "a": "b"}, '{"q": "smile \\ud83d", "a": "ok"}'), GENERATIVE,
                             ["d.jsonl, line 2: field 'q' holds a lone surrogate escape", "not text"]),
    "jsonl repeated key": ("d.jsonl", jsonl('{"q": "2+2", "a": "4", "a": "four"}'), GENERATIVE,
                           ["d.jsonl, line 1: an object names 'a' more than once"]),
    "json repeated key": ("d.json", '[{"q": "2+2", "a": "4", "a": "four"}]', GENERATIVE,
                          ["d.json: an object names 'a' more than once"]),
    "csv repeated header name": ("d.csv", "q,a,a\n2+2,4,four-ish\n", GENERATIVE,
                                 ["d.csv, line 1: the header names 'a' more than once"]),
    # json.dumps writes a missing float as NaN; the target was the text "NaN"
    "jsonl NaN target": ("d.jsonl", jsonl({"q": "Population of Atlantis?", "a": float("nan")}), GENERATIVE,
                         ["train row 0", "field 'a' holds NaN, not a value", "NaN and Infinity are not JSON values",
                          "d.jsonl"]),
    "json -Infinity prompt": ("d.json", '[{"q": -Infinity, "a": "4"}]', GENERATIVE,
                              ["train row 0", "field 'q' holds -Infinity, not a value", "d.json"]),
    "jsonl NaN gold": ("d.jsonl", jsonl('{"q": "ok?", "options": ["no", "yes"], "answer": NaN}'), CHOICE,
                       ["train row 0", "field 'answer' holds NaN"]),
    "jsonl NaN choice": ("d.jsonl", jsonl('{"q": "ok?", "options": ["no", NaN], "answer": 0}'), CHOICE,
                         ["train row 0", "choices field 'options': choice 1 is NaN, not a value", "d.jsonl"]),
    "csv NaN in a choices cell": ("d.csv", 'q,options,answer\nok?,"[""no"", Infinity]",0\n', CHOICE,
                                  ["train row 0", "choice 1 is Infinity, not a value", "d.csv"]),
    # "²" passed str.isdigit() and failed in int(), naming nothing
    "gold a superscript digit": ("d.jsonl", jsonl({"q": "ok?", "options": ["no", "yes"], "answer": "²"}), CHOICE,
                                 ["train row 0", "gold field 'answer' must hold an integer index", "'²'"]),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_bad_user_data_is_named(tmp_path, case):
    file_name, content, fields, fragments = CASES[case]
    path = tmp_path / file_name
    path.write_text(content)
    task = task_from_spec({"name": "mine", "path": str(path), **fields})
    with pytest.raises(TaskDataError) as error:
        task.examples("train")
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


SPEC = {"name": "mine", "path": "d.jsonl", **GENERATIVE}
SPEC_CASES = {  # name: (spec, message fragments); each was a TypeError or AttributeError, or was accepted
    "name a number": (SPEC | {"name": 123}, ["name=123 is invalid: expected a task name", "quote a number"]),
    "name null": (SPEC | {"name": None}, ["name=None is invalid"]),
    "name of two dots": (SPEC | {"name": ".."}, ["name='..' is invalid: expected a task name", "not only dots"]),
    "name of one dot": (SPEC | {"name": "."}, ["name='.' is invalid: expected a task name", "not only dots"]),
    "name of three dots": (SPEC | {"name": "..."}, ["name='...' is invalid", "not only dots"]),
    "name ending in a newline": (SPEC | {"name": "ok\n"}, ["name='ok\\n' is invalid: expected a task name"]),
    "name with a path separator": (SPEC | {"name": "a/b"}, ["name='a/b' is invalid: expected a task name"]),
    # "expected ... letters, digits" refused 'café' and '数学', which are letters
    "name not ASCII": (SPEC | {"name": "café"}, ["name='café' is invalid", "ASCII letters and digits (A-Z, a-z, 0-9)"]),
    "chance_rate text": (SPEC | {"chance_rate": "half"},
                         ["task 'mine': chance_rate='half' is invalid: expected a number in [0, 1]"]),
    "max_new_tokens text": (SPEC | {"max_new_tokens": "5"},
                            ["task 'mine': max_new_tokens='5' is invalid: expected an integer >= 1, or null"]),
    "max_new_tokens fractional": (SPEC | {"max_new_tokens": 2.5}, ["task 'mine': max_new_tokens=2.5 is invalid"]),
    "max_new_tokens boolean": (SPEC | {"max_new_tokens": True}, ["task 'mine': max_new_tokens=True is invalid"]),
    "prompt null": (SPEC | {"prompt": None}, ["task spec 'mine': prompt=None is invalid: expected a template"]),
    "target a number": (SPEC | {"target": 7}, ["task spec 'mine': target=7 is invalid", "quote a fixed text"]),
    "choices a list": ({**SPEC, "target": None, "choices": ["a", "b"], "gold": "answer"},
                       ["task spec 'mine': choices=['a', 'b'] is invalid: expected the name of a column"]),
    # the target template was ignored without a word: the target is the choice gold names
    "target with choices": (SPEC | {"choices": "options", "gold": "answer"},
                            ["task spec 'mine': target='{a}' is invalid with choices", "remove target, or choices"]),
    "fields a list": (SPEC | {"fields": ["q"]}, ["task spec 'mine': fields=['q'] is invalid: expected a mapping"]),
    "answer a list": (SPEC | {"answer": ["first_line"]},
                      ["task spec 'mine': answer=['first_line'] is invalid: expected one of first_line, final_answer"]),
    "path a number": (SPEC | {"path": 5}, ["task spec 'mine': path=5 is invalid: expected a file path"]),
    "path a list": (SPEC | {"path": ["a.jsonl", "b.jsonl"]}, ["path=['a.jsonl', 'b.jsonl'] is invalid",
                                                              "or a mapping of split to file path"]),
    "path of a split a number": (SPEC | {"path": {"train": 5}},
                                 ["task spec 'mine': path of split 'train'=5 is invalid: expected a file path"]),
    "hub splits a list": ({"name": "mine", "hub": "org/data", "splits": ["train"], **GENERATIVE},
                          ["task spec 'mine': splits=['train'] is invalid: expected a mapping of split"]),
    "kind unknown": (SPEC | {"kind": "mc"}, ["task 'mine': kind='mc' is invalid: expected one of generative"]),
    # every row was refused in setup, "a multiple_choice task's formatter returned no choices", naming no spec key
    "kind multiple choice with a target": (
        SPEC | {"kind": "multiple_choice"},
        ["task spec 'mine': kind='multiple_choice' is invalid with a target template",
         "the kind follows from them, so remove kind"]),
    "kind generative with choices": ({**SPEC, "target": None, "choices": "options", "gold": "answer",
                                      "kind": "generative"},
                                     ["task spec 'mine': kind='generative' is invalid with choices and gold"]),
    "description a number": (SPEC | {"description": 3}, ["task 'mine': description=3 is invalid: expected text"]),
    "prompt with a lone brace": (SPEC | {"prompt": "Q: {q"}, ["task spec 'mine': prompt='Q: {q' is invalid",
                                                              "literal braces are doubled"]),
    "target with a lone brace": (SPEC | {"target": "{a}}"}, ["task spec 'mine': target='{a}}' is invalid"]),
    # each inserted Python's rendering: <built-in method upper of str object at 0x...>, 'a' with quotes, a character
    "template attribute": (SPEC | {"prompt": "Q: {q.upper}"},
                           ["task spec 'mine': prompt='Q: {q.upper}' is invalid: field {q.upper}: '.' and '[' read",
                            "for a column named 'q.upper', give it a plain name: fields: {x: 'q.upper'}"]),
    "template index": (SPEC | {"target": "{a[0]}"}, ["task spec 'mine': target='{a[0]}' is invalid: field {a[0]}",
                                                     "fields: {x: 'a[0]'} and {x} in the template"]),
    "template repr conversion": (SPEC | {"target": "{a!r}"},
                                 ["target='{a!r}' is invalid: field {a!r}: a conversion", "write {a}"]),
    "template field in a format spec": (SPEC | {"prompt": "{q:>{a}}"},
                                        ["prompt='{q:>{a}}' is invalid: field {q:>{a}}: a format spec must be fixed"]),
    "template positional field": (SPEC | {"prompt": "Q: {}"}, ["prompt='Q: {}' is invalid: field {}: an empty field"]),
    # each was caught only at the first row read, after the model had loaded
    "prompt empty": (SPEC | {"prompt": ""}, ["task spec 'mine': prompt='' is invalid: expected a template with text"]),
    "target blank": (SPEC | {"target": "  "}, ["task spec 'mine': target='  ' is invalid: expected a template with"]),
    "hub empty": ({"name": "mine", "hub": "", **GENERATIVE},
                  ["task spec 'mine': hub='' is invalid: expected a hub dataset id"]),
    # a 2 GB string per row
    "template width huge": (SPEC | {"prompt": "{q:>2000000000}"},
                            ["prompt='{q:>2000000000}' is invalid: field {q:>2000000000}: a width or precision over "
                             "1000"]),
    "template precision huge": (SPEC | {"target": "{a:.5000f}"}, ["field {a:.5000f}: a width or precision over 1000"]),
    "template precision after a width": (SPEC | {"target": "{a:8.5000f}"},
                                         ["field {a:8.5000f}: a width or precision over 1000"]),
    "template numeric field": (SPEC | {"prompt": "Q: {0}"},
                               ["prompt='Q: {0}' is invalid: field {0}: a number is a positional argument",
                                "fields: {x: '0'}"]),
}


@pytest.mark.parametrize("case", SPEC_CASES, ids=list(SPEC_CASES))
def test_mistyped_spec_values_are_named(case):
    spec, fragments = SPEC_CASES[case]
    with pytest.raises(ValueError) as error:
        task_from_spec(spec)
    for fragment in fragments:
        assert fragment in str(error.value), (fragment, str(error.value))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_float_in_parquet_is_refused_by_name(tmp_path, value):
    """A Parquet float column written without pandas keeps NaN and inf as floats: the target was the text "nan"."""
    pyarrow, parquet = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    parquet.write_table(pyarrow.table({"q": ["x", "y"], "a": pyarrow.array([1.5, value], from_pandas=False)}), path)
    task = task_from_spec({"name": "mine", "path": str(path), **GENERATIVE})
    shown = json.dumps(value)  # NaN, Infinity
    with pytest.raises(TaskDataError, match=rf"train row 1: field 'a' holds {shown}, not a value .*d.parquet"):
        task.examples("train")


def test_a_nan_in_a_column_no_template_reads_is_left_alone(tmp_path):
    """As a null or an empty CSV cell there: only a value the task reads must be one."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"q": "2+2", "a": 4, "score": NaN}\n')
    task = task_from_spec({"name": "mine", "path": str(path), **GENERATIVE})
    assert [(example.prompt, example.target) for example in task.examples("train")] == [("2+2", "4")]


def test_a_column_named_with_dots_brackets_or_a_number_is_read_through_fields(tmp_path):
    """What the template error about such a field advises: a plain template name mapped to the column."""
    path = tmp_path / "d.jsonl"
    path.write_text(jsonl({"q.text": "2+2", "a[0]": "4", "0": "sum", "n": 2.5}))
    task = task_from_spec({"name": "mine", "path": str(path), "prompt": "{kind}: {q} ({n:>5})", "target": "{a}",
                           "fields": {"q": "q.text", "a": "a[0]", "kind": "0"}})
    assert [(example.prompt, example.target) for example in task.examples("train")] == [("sum: 2+2 (  2.5)", "4")]


def test_non_utf8_bytes_are_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"q": "caf\xe9", "a": "x"}\n'.encode("latin-1"))
    task = task_from_spec({"name": "mine", "path": str(path), **GENERATIVE})
    with pytest.raises(TaskDataError, match=r"latin1.jsonl: not UTF-8 text \(byte 10"):
        task.examples("train")


UTF16_CSV = "q,a\r\n2+2,4\r\n"


@pytest.mark.parametrize(("file_name", "content", "message"), [
    # Excel's "Unicode Text", Notepad's "UTF-16 LE": "not UTF-8 text (byte 0: invalid start byte)", naming no encoding
    ("d.csv", UTF16_CSV.encode("utf-16"), r"d.csv: UTF-16 text \(it starts with a UTF-16 byte-order mark"),
    ("d.jsonl", jsonl({"q": "2+2", "a": "4"}).encode("utf-32"), r"d.jsonl: UTF-32 text"),
    # big-endian, with its mark (Python's utf-16-be and utf-32-be codecs write none)
    ("d.csv", codecs.BOM_UTF16_BE + UTF16_CSV.encode("utf-16-be"), r"d.csv: UTF-16 text \(it starts with a UTF-16 "),
    ("d.csv", codecs.BOM_UTF32_BE + UTF16_CSV.encode("utf-32-be"), r"d.csv: UTF-32 text \(it starts with a UTF-32 "),
    # decoded as UTF-8 with a NUL after every character: "missing field 'q' (the row has: q ,  a )"
    ("d.csv", UTF16_CSV.encode("utf-16-le"), r"d.csv, line 1: holds a NUL character"),
    ("d.csv", "q,a\n2+2,4\n3\x00+3,6\n".encode(), r"d.csv, line 3: holds a NUL character"),
], ids=["utf-16", "utf-32", "utf-16 big-endian", "utf-32 big-endian", "utf-16 without its mark",
        "a NUL in utf-8"])
def test_text_that_is_not_utf8_is_named_as_such(tmp_path, file_name, content, message):
    path = tmp_path / file_name
    path.write_bytes(content)
    task = task_from_spec({"name": "mine", "path": str(path), **GENERATIVE})
    with pytest.raises(TaskDataError, match=message) as error:
        task.examples("train")
    assert "read as UTF-8: save it as UTF-8" in str(error.value)


def test_a_json_file_that_is_not_one_json_value_is_read_as_json_lines(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(jsonl({"q": "2+2", "a": "4"}, {"q": "3+3", "a": "6"}))
    task = task_from_spec({"name": "mine", "path": str(path), **GENERATIVE})
    assert [(example.prompt, example.target) for example in task.examples("train")] == [("2+2", "4"), ("3+3", "6")]


def test_csv_values_keep_their_text(tmp_path):
    """An empty cell elsewhere in the column made pandas read every number as a float ("2" became "2.0")."""
    path = tmp_path / "numbers.csv"
    path.write_text("q,a,note\n1+1,2,\n5+5,10,checked\n007?,007,\n")
    task = task_from_spec({"name": "mine", "path": str(path), **GENERATIVE})
    assert [example.target for example in task.examples("train")] == ["2", "10", "007"]


def test_json_numbers_keep_their_text(tmp_path):
    """json.loads turned 1e3 into 1000.0 and 2.50 into 2.5, and the template wrote Python's float, not the file's."""
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"q": 1, "a": 1e3}\n{"q": 2, "a": 2.50}\n{"q": 3, "a": 42}\n{"q": 4, "a": -0.5}\n')
    task = task_from_spec({"name": "mine", "path": str(path), "prompt": "{q} {a:.1f}", "target": "{a}"})
    examples = task.examples("train")
    assert [example.target for example in examples] == ["1e3", "2.50", "42", "-0.5"]
    assert [example.prompt for example in examples] == ["1 1000.0", "2 2.5", "3 42.0", "4 -0.5"]  # specs still apply


@pytest.mark.parametrize("file_name", ["d.csv", "d.jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_field(tmp_path, file_name):
    """Excel's "CSV UTF-8" starts with a BOM, which made the first column '\\ufeffq': "missing field 'q'"."""
    path = tmp_path / file_name
    content = "q,a\n2+2,4\n" if file_name.endswith(".csv") else jsonl({"q": "2+2", "a": "4"})
    path.write_bytes(("\ufeff" + content).encode("utf-8"))
    task = task_from_spec({"name": "mine", "path": str(path), **GENERATIVE})
    assert [(example.prompt, example.target) for example in task.examples("train")] == [("2+2", "4")]


def test_csv_cells_longer_than_the_csv_module_default_are_read(tmp_path):
    """A 150,000-character document made csv raise "field larger than field limit (131072)", with a traceback."""
    path = tmp_path / "long.csv"
    path.write_text('document,summary\n"' + "word " * 30000 + '",short\n')
    task = task_from_spec({"name": "mine", "path": str(path), "prompt": "{document}", "target": "{summary}"})
    assert len(task.examples("train")[0].prompt) == 150000


def test_csv_errors_name_the_file_and_line(tmp_path, monkeypatch):
    path = tmp_path / "d.csv"
    path.write_text("q,a\n2+2,4\n3+3,a cell longer than the limit\n")
    monkeypatch.setattr(tasks_module, "_CSV_FIELD_LIMIT", 10)  # the one csv.Error the default dialect still raises
    task = task_from_spec({"name": "mine", "path": str(path), **GENERATIVE})
    try:
        with pytest.raises(TaskDataError, match=r"d.csv, line 3: not readable as CSV \(field larger than field limit"):
            task.examples("train")
    finally:
        csv.field_size_limit(DEFAULT_CSV_FIELD_LIMIT)


def test_csv_choices_as_a_json_list_in_the_cell(tmp_path):
    path = tmp_path / "mc.csv"
    path.write_text('q,options,answer\nSky?,"[""green"", ""blue""]",1\n')
    task = task_from_spec({"name": "mine", "path": str(path), **CHOICE})
    example = task.examples("train")[0]
    assert example.choices == ("green", "blue") and example.target == "blue"


def test_tasks_yaml_errors_name_the_file(tmp_path):
    from malora_lightning.data.tasks import tasks_from_yaml

    bad = tmp_path / "tasks.yaml"
    bad.write_text("- name: a\n  prompt: '{q}'\n   target: '{a}'\n")  # bad indentation
    with pytest.raises(ValueError, match=r"tasks.yaml: not a readable YAML file of task specs"):
        tasks_from_yaml(bad)
    bad.write_text("- [name, a]\n")
    with pytest.raises(ValueError, match=r"tasks.yaml: task spec #0 is a list, not a mapping"):
        tasks_from_yaml(bad)
    for content in ("name: a\nprompt: '{q}'\n", "tasks: a\n", ""):  # one spec unlisted, a text, an empty file
        bad.write_text(content)
        with pytest.raises(ValueError, match=r"tasks.yaml: expected a list of task specs \(or a 'tasks:' list\)"):
            tasks_from_yaml(bad)
    # registered one by one, the second 'a' replaced the first (overwrite=True) or was refused without the file
    bad.write_text("- {name: a, path: x.jsonl, prompt: '{q}', target: '{a}'}\n"
                   "- {name: b, path: y.jsonl, prompt: '{q}', target: '{a}'}\n"
                   "- {name: a, path: z.jsonl, prompt: '{q}', target: '{a}'}\n")
    with pytest.raises(ValueError, match=r"tasks.yaml: more than one task spec is named 'a'; give each task its own"):
        tasks_from_yaml(bad)


def test_a_task_spec_given_as_a_list_is_named():
    from malora_lightning.data import MultiTaskDataModule

    with pytest.raises(ValueError, match=r"task_specs\[0\] is a list: each task spec is a mapping"):
        MultiTaskDataModule(tasks=["parity"], task_specs=[["name", "x"]])


def test_a_missing_tokenizer_path_is_named(tmp_path):
    from malora_lightning.data import MultiTaskDataModule

    data = MultiTaskDataModule(tasks=["parity"], tokenizer=str(tmp_path / "no-such-tokenizer"))
    with pytest.raises(OSError, match=r"could not load the tokenizer .*no-such-tokenizer.*must be a local folder"):
        data.load_tokenizer()


@pytest.mark.parametrize("name", ["v1.2", ".hidden", "a..b", "gsm8k_2024-01"])
def test_task_names_with_dots_among_other_characters_stay_valid(name):
    assert task_from_spec(SPEC | {"name": name}).name == name


def test_a_local_parquet_file_is_read_without_the_network_or_a_cache(tmp_path, monkeypatch):
    """datasets' load_dataset pinged the hub (a download count) and wrote an Arrow copy into its cache for each read
    of a local Parquet file; a cut-off file is named."""
    import datasets

    pyarrow, parquet = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")

    def refuse(*args, **kwargs):  # the tests run offline, so the ping itself cannot show here
        raise AssertionError("a local file went through datasets.load_dataset")

    monkeypatch.setattr(datasets, "load_dataset", refuse)
    path = tmp_path / "d.parquet"
    parquet.write_table(pyarrow.table({"q": ["2+2", "3+3"], "a": ["4", "6"]}), path)
    task = task_from_spec({"name": "mine", "path": str(path), **GENERATIVE})
    assert [(example.prompt, example.target) for example in task.examples("train")] == [("2+2", "4"), ("3+3", "6")]
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(TaskDataError, match=r"d\.parquet: not a readable Parquet file"):
        task_from_spec({"name": "cut", "path": str(path), **GENERATIVE}).examples("train")


def test_a_hub_dataset_with_a_loading_script_is_named_with_the_parquet_revision_to_use(monkeypatch):
    """datasets 4 and later raise a bare RuntimeError for a dataset that ships a loading script (as PIQA and
    SocialIQA's default revisions do); a task spec's revision reaches load_dataset."""
    import datasets

    calls = []

    def load_dataset(path, name=None, split=None, revision=None):
        calls.append((path, name, split, revision))
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found piqa.py")
        return [{"q": "a", "a": "b"}]

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = {"name": "scripted", "hub": "someone/piqa", "splits": {"train": "train"}, "prompt": "{q}", "target": "{a}"}
    with pytest.raises(TaskDataError, match=r"hub dataset someone/piqa, split 'train' could not be loaded: Dataset "
                                            r"scripts are no longer supported, but found piqa.py\. .*give the task "
                                            r"spec revision: refs/convert/parquet"):
        task_from_spec(spec).examples("train")
    examples = task_from_spec({**spec, "revision": "refs/convert/parquet"}).examples("train")
    assert [example.target for example in examples] == ["b"]
    assert calls[-1] == ("someone/piqa", None, "train", "refs/convert/parquet")
    with pytest.raises(ValueError, match=r"task spec 'scripted': revision=3 is invalid: expected a branch, tag or "
                                         r"commit"):
        task_from_spec({**spec, "revision": 3})


def test_another_runtime_error_of_a_hub_load_is_raised_as_it_is(monkeypatch):
    """Only the loading-script error gets the Parquet advice: any other is datasets' own, unchanged."""
    import datasets

    def load_dataset(path, name=None, split=None, revision=None):
        raise RuntimeError("disk full")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = {"name": "full", "hub": "someone/data", "splits": {"train": "train"}, "prompt": "{q}", "target": "{a}"}
    with pytest.raises(RuntimeError, match=r"^disk full$"):
        task_from_spec(spec).examples("train")


def test_a_hub_dataset_that_is_not_cached_offline_is_named_with_what_to_do(monkeypatch):
    """The datasets library's own message ('Couldn't reach ... (OfflineModeIsEnabled)') named no split or remedy."""
    from malora_lightning.data.tasks import HubSource

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    source = HubSource("nobody-has/this-dataset", name="main")
    with pytest.raises(TaskDataError, match=r"hub dataset nobody-has/this-dataset \(main\), split 'train' could not "
                                            r"be loaded: .*run once online to cache it, or give the task local files"):
        source.load("train", seed=0)
