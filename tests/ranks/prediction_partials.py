"""`PredictionWriter` starting each rank's partial file on 2 ranks, where rank one's disk is full: each rank writes
what it raised (then, as Lightning does, tells the writer in `on_exception`)."""

import json
from pathlib import Path
from types import SimpleNamespace

from malora_lightning.callbacks import PredictionWriter
from malora_lightning.callbacks import predictions


def run(rank: int, out: str) -> None:
    trainer = SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0)
    if rank == 1:  # this process's module only: rank zero writes as usual
        def full_disk(path, text: str) -> None:
            raise OSError(28, "No space left on device", str(path))

        predictions.atomic_write_text = full_disk
    writer = PredictionWriter(path=str(Path(out) / "out.jsonl"))
    raised = None
    try:
        writer.on_predict_start(trainer, None)
    except OSError as error:
        writer.on_exception(trainer, None, error)
        raised = [type(error).__name__, str(error)]
    Path(out, f"rank{rank}.json").write_text(json.dumps(raised))
