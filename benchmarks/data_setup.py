"""What `MultiTaskDataModule.setup("fit")` costs at the paper's data sizes: it renders and tokenises every example up
front and holds their tokens in int32 buffers (`PackedExamples`) beside their texts, so time and memory grow with the
tokens.

Synthetic JSONL tasks (words that are one token each, so words ~ tokens) shaped like the two paper mixtures:

* ``commonsense``: 5 multiple-choice tasks of 60-150-word questions with 4 options, ``--rows`` train rows in all,
  validation and test files of ``--eval-rows`` rows each; max_length 512 (the commonsense recipe's cutoff);
* ``inter-domain``: 4 instruction tasks of ``--rows`` train rows each, without validation files (10 % held out,
  1,024 validated), one code-like with 540-860-word answers; max_length 1024 and ``long_targets="skip"`` (the
  inter-domain recipe's).

    python -m benchmarks.data_setup --shape commonsense --rows 34000      # the commonsense recipe's size
    python -m benchmarks.data_setup --shape inter-domain --rows 10000     # a third of the recipe's 30,000 a task

Prints and writes (benchmarks/results) rows, tokens, seconds, the growth of resident memory over the setup, and
bytes of resident memory per training token.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, machine_markdown, markdown_table, write_report

SHAPES = ("commonsense", "inter-domain")


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


class Words:
    """Text of lowercase words that the tokenizer writes as one token each (with their leading space)."""

    def __init__(self, tokenizer: Any, seed: int = 0) -> None:
        marker = "\u0120"  # byte-level BPE's leading space
        self.words = sorted(token[1:] for token in tokenizer.get_vocab() if token.startswith(marker)
                            and token[1:].isalpha() and token[1:].islower() and 3 <= len(token) <= 10)
        if not self.words:  # a tokenizer without such words (a byte-level one with no merges): letters
            self.words = list("abcdefghijklmnopqrstuvwxyz")
        self.random = random.Random(seed)

    def text(self, low: int, high: int) -> str:
        return " ".join(self.random.choice(self.words) for _ in range(self.random.randint(low, high)))


def write_tasks(shape: str, rows: int, eval_rows: int, words: Words, folder: Path) -> list[dict[str, Any]]:
    """The synthetic task files and their task specs."""
    def write(path: Path, make_row, count: int) -> str:
        path.write_text("".join(json.dumps(make_row()) + "\n" for _ in range(count)))
        return str(path)

    specs = []
    if shape == "commonsense":
        def choice_row() -> dict[str, Any]:
            return {"question": words.text(60, 150), "choices": [f"{words.text(1, 5)} ({letter})" for letter in "abcd"],
                    "gold": words.random.randrange(4)}

        for task in range(5):
            paths = {split: write(folder / f"cs{task}_{split}.jsonl", choice_row, count) for split, count in
                     (("train", rows // 5), ("validation", eval_rows), ("test", eval_rows))}
            specs.append({"name": f"cs{task}", "path": paths, "prompt": "{question}", "choices": "choices",
                          "gold": "gold"})
    else:
        for task in range(4):
            answer = (540, 860) if task == 0 else (40, 250)

            def instruction_row(answer=answer) -> dict[str, Any]:
                return {"instruction": words.text(20, 150), "response": words.text(*answer)}

            path = write(folder / f"id{task}_train.jsonl", instruction_row, rows)
            specs.append({"name": f"id{task}", "path": {"train": path}, "prompt": "{instruction}",
                          "target": "{response}"})
    return specs


def measure(shape: str, rows: int, eval_rows: int, tokenizer_path: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from malora_lightning.data import MultiTaskDataModule
    from malora_lightning.offline_models import resolve_model_path

    # explicit: left unset, transformers asks on stdin whether to run a folder's own tokenizer code, and a piped 'y'
    # ran it
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_path), trust_remote_code=False)
    settings = ({"max_length": 512, "sampling": "proportional"} if shape == "commonsense" else
                {"max_length": 1024, "long_targets": "skip", "max_val_examples_per_task": 1024,
                 "sampling": "uniform"})
    with tempfile.TemporaryDirectory() as folder:
        specs = write_tasks(shape, rows, eval_rows, Words(tokenizer), Path(folder))
        data = MultiTaskDataModule(tasks=[spec["name"] for spec in specs], task_specs=specs,
                                   tokenizer=tokenizer_path, **settings)
        data.tokenizer_object = tokenizer
        gc.collect()
        before = resident_bytes()
        start = time.perf_counter()
        data.setup("fit")
        seconds = time.perf_counter() - start
        gc.collect()
        grown = resident_bytes() - before
        train = data.train_dataloader().dataset  # every task's encoded training examples
    tokens = sum(len(example.input_ids) for example in train)
    return {"shape": shape, "train_rows": len(train), "train_tokens": tokens, "setup_s": round(seconds, 1),
            "resident_growth_gb": round(grown / 1e9, 3), "bytes_per_train_token": round(grown / tokens, 1)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="commonsense")
    parser.add_argument("--rows", type=int, default=10000, help="train rows: in all (commonsense), per task "
                        "(inter-domain)")
    parser.add_argument("--eval-rows", type=int, default=1000, help="validation and test rows per commonsense task")
    parser.add_argument("--tokenizer", default="offline:SmolLM2-135M-Instruct")
    parser.add_argument("--tag", default="", help="appended to the result file names")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    info = machine_info(os.getloadavg())
    result = measure(args.shape, args.rows, args.eval_rows, args.tokenizer)
    table = markdown_table(list(result), [list(result.values())])
    print(table)
    if not args.no_write:
        stem = f"data_setup_{args.shape}_{args.rows}{'_' + args.tag if args.tag else ''}"
        write_report(stem, {"machine": info, "result": result},
                     f"# Data module setup\n\n{machine_markdown(info)}\n\n{table}")
    return result


if __name__ == "__main__":
    main()
