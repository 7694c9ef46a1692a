"""benchmarks/data_setup.py: the synthetic mixtures it encodes, and one small run through MultiTaskDataModule."""

import json

from benchmarks.data_setup import Words, main, write_tasks
from tests.helpers import tiny_tokenizer
from tests.test_checkpoint_safety import MARKER, tokenizer_code_folder  # noqa: F401 (a fixture)


def test_the_inter_domain_shape_has_one_long_answer_task_and_no_validation_files(tmp_path):
    specs = write_tasks("inter-domain", rows=3, eval_rows=0, words=Words(tiny_tokenizer()), folder=tmp_path)
    assert [spec["name"] for spec in specs] == ["id0", "id1", "id2", "id3"]
    assert all(list(spec["path"]) == ["train"] for spec in specs)
    rows = [[json.loads(line) for line in open(spec["path"]["train"])] for spec in specs]
    assert [len(task) for task in rows] == [3, 3, 3, 3]
    answer_words = [[len(row["response"].split()) for row in task] for task in rows]
    assert all(540 <= words <= 860 for words in answer_words[0])
    assert all(40 <= words <= 250 for task in answer_words[1:] for words in task)


def test_a_small_commonsense_setup_counts_its_rows_and_tokens(tmp_path):
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    result = main(["--shape", "commonsense", "--rows", "50", "--eval-rows", "5", "--tokenizer",
                   str(tmp_path / "tokenizer"), "--no-write"])
    assert result["train_rows"] == 50  # 5 tasks x 10
    # a byte-level tokenizer without merges: each letter and each space is a token, 60-150 words a question
    assert 50 * 120 < result["train_tokens"] < 50 * 330
    assert result["setup_s"] >= 0 and isinstance(result["bytes_per_train_token"], float)


def test_a_tokenizers_own_code_never_runs(tokenizer_code_folder, tmp_path, monkeypatch):
    """The tokenizer was loaded without trust_remote_code: transformers asked on stdin whether to run the folder's own
    code, and a 'y' there (piped input) ran it."""
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    main(["--shape", "commonsense", "--rows", "10", "--eval-rows", "1", "--tokenizer", str(tokenizer_code_folder),
          "--no-write"])
    assert not (tmp_path / MARKER).exists()
