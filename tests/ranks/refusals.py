"""`refuse_on_any_rank` and `refuse_on_every_rank` on 2 ranks: each rank writes, per case, the refusal it raised."""

import json
from pathlib import Path
from types import SimpleNamespace

from malora_lightning.run_paths import refuse_on_any_rank, refuse_on_every_rank


def run(rank: int, out: str) -> None:
    trainer = SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0)
    called = []

    def refusing(on_ranks: tuple[int, ...], error: type[OSError]):
        def check() -> None:
            called.append(rank)
            if rank in on_ranks:
                raise error(f"refused by rank {rank}")
        return check

    cases = {
        "both refuse": (refuse_on_any_rank, refusing((0, 1), FileExistsError)),
        "rank one refuses": (refuse_on_any_rank, refusing((1,), PermissionError)),
        "none refuses": (refuse_on_any_rank, refusing((), FileExistsError)),
        "every rank, rank zero's check": (refuse_on_every_rank, refusing((0, 1), FileExistsError)),
        "every rank, rank one would refuse": (refuse_on_every_rank, refusing((1,), FileExistsError)),
    }
    raised = {}
    for name, (refuse, check) in cases.items():
        try:
            refuse(trainer, check)
            raised[name] = None
        except OSError as error:
            raised[name] = [type(error).__name__, str(error)]
    raised["checked"] = called
    Path(out, f"rank{rank}.json").write_text(json.dumps(raised))
