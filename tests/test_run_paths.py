"""`run_paths.refuse_on_any_rank` / `refuse_on_every_rank`: which rank's check runs, and which refusal every rank
raises."""

import json
from types import SimpleNamespace

import pytest

from malora_lightning.run_paths import refuse_on_every_rank
from tests.helpers import run_ranks
from tests.ranks import refusals


def test_refuse_on_every_rank_runs_the_check_on_rank_zero_only():
    """Rank zero writes the run's files: another rank's view of them (another node's disk) must not decide."""
    called = []

    def check() -> None:
        called.append(True)
        raise FileExistsError("taken")

    refuse_on_every_rank(SimpleNamespace(world_size=1, global_rank=1, is_global_zero=False), check)
    assert called == []
    with pytest.raises(FileExistsError, match="taken"):
        refuse_on_every_rank(SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True), check)


@pytest.mark.slow
def test_every_rank_raises_the_lowest_refusing_ranks_error(tmp_path):
    run_ranks(refusals.run, str(tmp_path))
    raised = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert raised[0] == raised[1] | {"checked": raised[0]["checked"]}
    assert raised[0]["both refuse"] == ["FileExistsError", "refused by rank 0"]
    assert raised[0]["rank one refuses"] == ["PermissionError", "refused by rank 1"]
    assert raised[0]["none refuses"] is None
    assert raised[0]["every rank, rank zero's check"] == ["FileExistsError", "refused by rank 0"]
    assert raised[0]["every rank, rank one would refuse"] is None
    assert raised[0]["checked"] == [0] * 5 and raised[1]["checked"] == [1] * 3  # refuse_on_every_rank: rank zero's
