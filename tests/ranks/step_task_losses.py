"""`MALoRAModule._step_sums` and `_step_task_losses` on 2 CPU processes (gloo), without a trainer: each rank's
per-task parts and non-finite losses of one optimizer step, summed over the ranks by one all_reduce when the data
module lists every task, and by the object gather it falls back to when it lists none or a rank has a task it does not
list. Both give what the old object gather gave, as Lightning logs it (float32)."""

from types import MethodType, SimpleNamespace

import torch

from malora_lightning.module import MALoRAModule, _StepEnd
from tests.helpers import counting_collectives

# each rank's (loss, target tokens) per task and batch of the step; "c" has no target token, "z" no row on rank 1
PARTS = [{"a": [(1.0, 2), (3.0, 1)], "b": [(2.0, 4)]}, {"b": [(4.5, 4)], "c": [(5.0, 0)]}]
UNLISTED = {"z": [(7.0, 3)]}
EXPECTED = {"a": (1.0 * 2 + 3.0) / 3, "b": (2.0 * 4 + 4.5 * 4) / 8, "c": 0.0}
KEYS = ["train/loss", "train/lm_loss"]


def as_logged(value: float | torch.Tensor) -> float:
    """A logged value as Lightning keeps it: a float32 tensor."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def step_task_losses(rank: int, tasks: list[str] | None, parts: dict[str, list[tuple[float, int]]],
                     losses: list[float]):
    """The rank's (step losses, per-task losses, whether any rank's loss is not finite) from its batches' `losses`,
    and the collectives they took, all_reduce apart: (all_reduces, others)."""
    datamodule = None if tasks is None else SimpleNamespace(tasks=[SimpleNamespace(name=name) for name in tasks])
    tensors = {name: [(torch.tensor(loss), torch.tensor(tokens)) for loss, tokens in values]
               for name, values in parts.items()}
    unchecked = [(batch, torch.tensor(loss), torch.tensor(loss), torch.tensor(0.0))
                 for batch, loss in enumerate(losses)]
    module = SimpleNamespace(trainer=SimpleNamespace(world_size=2, datamodule=datamodule), _step_task_parts=tensors,
                             _unchecked_losses=unchecked)
    module._gathered_task_losses = MethodType(MALoRAModule._gathered_task_losses, module)
    with counting_collectives() as counts:
        names, sums = MALoRAModule._step_sums(module, torch.tensor([1.0, 2.0]) + 2 * rank)
        started = dict(counts)
        step, per_task, non_finite = MALoRAModule._step_task_losses(module, _StepEnd(KEYS, 4, names, sums))
    assert started == {"all_reduce": 1}  # the step's last batch starts the one all_reduce, which the check reads
    logged = {name: as_logged(value) for name, value in per_task.items()}
    return step, logged, non_finite, (counts["all_reduce"], sum(counts.values()) - counts["all_reduce"])


def run(rank: int) -> None:
    step, listed, non_finite, collectives = step_task_losses(rank, ["a", "b", "c", "d"], PARTS[rank], [1.0, 2.0])
    assert step.tolist() == [2.0, 3.0] and step.dtype == torch.float32
    # in name order; "d", in no batch of the step, is not logged
    assert listed == {name: as_logged(value) for name, value in EXPECTED.items()} and list(listed) == sorted(listed)
    assert not non_finite and collectives == (1, 0)
    # a non-finite loss of either batch of rank one's step is every rank's, in the same all_reduce
    poisoned = [float("nan"), 2.0] if rank else [1.0, 2.0]
    step, same, non_finite, collectives = step_task_losses(rank, ["a", "b", "c", "d"], PARTS[rank], poisoned)
    assert non_finite and same == listed and collectives == (1, 0)
    for tasks, parts in ((None, PARTS[rank]), (["a", "b", "c"], PARTS[rank] | (UNLISTED if rank else {}))):
        step, gathered, non_finite, collectives = step_task_losses(rank, tasks, parts, [1.0, 2.0])
        assert step.tolist() == [2.0, 3.0] and not non_finite
        assert gathered == listed | ({"z": 7.0} if tasks else {})
        assert collectives == (1, 2)  # the all_reduce, then the object gather's two all_gathers
