import pickle

import pytest

from malora_lightning.data import IGNORE_INDEX, EncodedExample
from malora_lightning.data import datamodule as datamodule_module
from malora_lightning.data.packed import PackedExamples
from tests.data.test_datamodule import make

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def examples() -> list[EncodedExample]:
    """A training example, a multiple-choice evaluation example, a predict-file prompt without task or target, and
    one without tokens; the int32 bounds among the ids."""
    return [
        EncodedExample(task_id=0, task_name="a", input_ids=[5, 6, INT32_MAX, 8], labels=[IGNORE_INDEX, 6, 7, 8],
                       prompt_length=1, target="x y", prompt="p", row=3),
        EncodedExample(task_id=1, task_name="b", input_ids=[9, 10, 11], labels=[IGNORE_INDEX, IGNORE_INDEX, 11],
                       prompt_length=2, target="yes", prompt="q", choice_input_ids=([9, 10, 11], [9, 10, INT32_MIN, 4]),
                       choice_labels=([IGNORE_INDEX, IGNORE_INDEX, 11], [IGNORE_INDEX] * 2 + [INT32_MIN, 4]), gold=0,
                       row=0),
        EncodedExample(task_id=-1, task_name=None, input_ids=[1, 2], labels=[IGNORE_INDEX] * 2, prompt_length=2,
                       target=None, prompt="r", row=7, counted=False),
        EncodedExample(task_id=0, task_name="a", input_ids=[], labels=[], prompt_length=0, target="", prompt="",
                       choice_input_ids=(), choice_labels=()),
    ]


def test_packed_examples_give_back_every_example_as_it_was_appended():
    given = examples()
    packed = PackedExamples(given)
    assert len(packed) == 4 and list(packed) == given
    assert packed[-1] == given[-1] and packed[-4] == given[0]
    for index in (4, -5):
        with pytest.raises(IndexError):
            packed[index]
    # the lists handed out are the example's own: a collator that edits them changes nothing stored
    first = packed[1]
    assert type(first.input_ids) is list and type(first.choice_input_ids) is tuple
    first.input_ids.append(0)
    first.choice_input_ids[1].append(0)
    assert packed[1] == given[1]
    # spawned DataLoader workers and DDP ranks get the store pickled
    assert list(pickle.loads(pickle.dumps(packed))) == given


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("input_ids", [1, INT32_MAX + 1], "greater than maximum"),
    ("labels", [IGNORE_INDEX, INT32_MIN - 1], "less than minimum"),
    ("choice_input_ids", ([1, 2], [1, None]), "NoneType"),
    ("choice_labels", ([1, 2.5],), "float"),
    ("labels", None, "NoneType"),
])
def test_a_value_that_is_not_a_token_id_is_named_and_leaves_the_store_as_it_was(field, value, reason):
    packed = PackedExamples(examples()[:2])
    bad = EncodedExample(task_id=0, task_name="mine", input_ids=[1, 2], labels=[IGNORE_INDEX, 2], prompt_length=1,
                         target="t", prompt="p", choice_input_ids=([1, 2],), choice_labels=([IGNORE_INDEX, 2],),
                         row=12)
    with pytest.raises(ValueError, match=rf"task 'mine', row 12: EncodedExample\.{field} must hold token ids .*"
                                         rf"ints from {INT32_MIN} to {INT32_MAX} .*{reason}"):
        packed.append(EncodedExample(**{**bad.__dict__, field: value}))
    packed.append(examples()[2])
    assert list(packed) == examples()[:3]


def test_a_split_encoded_in_chunks_is_the_split_encoded_at_once(monkeypatch):
    """`setup` encodes a split `ENCODE_CHUNK` examples at a time: the examples and the truncation counts (prompts cut,
    targets too long to keep) are those of one `encode` over the whole split."""
    whole = make(max_length=30, long_targets="skip")
    whole.setup("fit")
    monkeypatch.setattr(datamodule_module, "ENCODE_CHUNK", 5)
    chunked = make(max_length=30, long_targets="skip")
    chunked.setup("fit")
    assert whole.truncation == chunked.truncation
    counts = [stats for split in whole.truncation.values() for stats in split.values()]
    assert any(stats.skipped for stats in counts) and any(stats.truncated for stats in counts)
    assert max(stats.examples for stats in counts) > 5  # more than one chunk
    for split, per_task in whole._encoded.items():
        assert {name: list(packed) for name, packed in per_task.items()} == \
            {name: list(packed) for name, packed in chunked._encoded[split].items()}, split
