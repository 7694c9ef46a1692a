"""What a Lightning object records as its hyperparameters: the arguments of its own class's `__init__`."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from types import FrameType
from typing import Any


def constructor_arguments(obj: object, own: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments the `__init__` of `type(obj)` was called with, found in the outermost `__init__` frame running
    for `obj` (Lightning's own collection merges every class's, so that a subclass which fixes one of ours got it a
    second time from `load_from_checkpoint`). `**kwargs` count as named arguments. Values a subclass passed on
    through `*args` have no name there: then `own`, the arguments the asking `__init__` received by name, stand for
    them (a pass-through subclass takes them back by name)."""
    def runs_init_of(frame: FrameType | None) -> bool:
        code = None if frame is None else frame.f_code
        return code is not None and code.co_name == "__init__" and code.co_argcount > 0 \
            and frame.f_locals.get(code.co_varnames[0]) is obj

    frame = inspect.currentframe().f_back  # the __init__ that asked
    while runs_init_of(frame.f_back):
        frame = frame.f_back
    local = frame.f_locals
    arguments: dict[str, Any] = {}
    for name, parameter in list(inspect.signature(type(obj).__init__).parameters.items())[1:]:
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            arguments.update(local.get(name) or {})
        elif parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            if local.get(name):
                arguments = {**own, **arguments}
        elif name in local:
            arguments[name] = local[name]
    return arguments
