"""What FSDP1 (`FSDPStrategy`) will make of a model, checked before it wraps it.

FSDP1 flattens all parameters of a unit (each module its `auto_wrap_policy` names, and the root for the rest) into
one buffer of one dtype, frozen and trainable alike. An adapted decoder layer holds a bf16 base (or 4-bit weights
stored as bf16) beside float32 adapters and, on a 4-bit base, float32 norms: as one unit, torch refuses it with
"Must flatten tensors with uniform dtype" and names no module. Wrapping the base linears as units of their own
separates them (`recipes/llama2-7b/hardware/fsdp-qlora.yaml`); FSDP2 (`ModelParallelStrategy`) needs one dtype among
the trainable parameters only.

FSDP1's mixed precision casts each unit's parameters to `param_dtype` for compute. A 4-bit weight is packed bytes
in its storage dtype (`quant_storage`): cast to another dtype it would be silently corrupted, so the storage dtype
must be that `param_dtype`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


def unit_of(name: str, units: Iterable[str]) -> str:
    """The innermost unit (module path; "" for the root) holding the parameter `name`."""
    owners = [unit for unit in units if unit == "" or name.startswith(unit + ".")]
    return max(owners, key=len)


def wrapped_classes(auto_wrap_policy: object) -> tuple[type[nn.Module], ...] | None:
    """The module classes an FSDP1 policy makes units of: () without a policy (the root is the only unit), None for
    a policy that is not a set of classes (a callable: its units are unknown here)."""
    if auto_wrap_policy is None:
        return ()
    if isinstance(auto_wrap_policy, ModuleWrapPolicy):
        return tuple(auto_wrap_policy._module_classes)
    if isinstance(auto_wrap_policy, set):  # Lightning turns a set into a ModuleWrapPolicy
        return tuple(auto_wrap_policy)
    return None


def check_fsdp1_units(model: nn.Module, classes: tuple[type[nn.Module], ...] | None,
                      param_dtype: torch.dtype | None, ignored: Iterable[nn.Module] = ()) -> None:
    """Raise ValueError, naming the unit and its dtypes, when a unit that `ModuleWrapPolicy(classes)` would make
    holds parameters of more than one dtype (`classes` None: not checked), or when mixed precision would cast a
    packed 4-bit weight. Parameters of `ignored` modules (FSDP's `ignored_modules`) are in no unit."""
    skipped = {id(param) for module in ignored for param in module.parameters()}
    parameters = [(name, param) for name, param in model.named_parameters() if id(param) not in skipped]
    units = {""} | {name for name, module in model.named_modules() if classes and isinstance(module, classes)}
    dtypes: dict[str, dict[torch.dtype, str]] = {}
    for name, param in parameters:
        dtypes.setdefault(unit_of(name, units), {}).setdefault(param.dtype, name)
    for unit, seen in dtypes.items() if classes is not None else ():
        if len(seen) > 1:
            module = model.get_submodule(unit)
            examples = ", ".join(f"{dtype} ({name})" for dtype, name in seen.items())
            raise ValueError(
                f"FSDPStrategy (FSDP1) would flatten the parameters of {unit or 'the root module'} "
                f"({type(module).__name__}) into one buffer, but they have several dtypes: {examples}. Add the base "
                "layers' class to auto_wrap_policy so that they become units of their own (a 4-bit base: "
                "bitsandbytes.nn.Linear4bit, as recipes/llama2-7b/hardware/fsdp-qlora.yaml does), or shard with "
                "ModelParallelStrategy (FSDP2), which allows frozen parameters of another dtype")
    if param_dtype is None:
        return
    for name, param in parameters:
        if type(param).__name__ == "Params4bit" and param.dtype != param_dtype:
            raise ValueError(f"FSDPStrategy's mixed precision casts parameters to {param_dtype}, but the 4-bit "
                             f"weight {name} is packed in {param.dtype} storage, which a cast would corrupt: set "
                             f"model.quant_storage to {str(param_dtype).removeprefix('torch.')}")
