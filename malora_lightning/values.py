"""What a setting or a data field must be to count as an integer, a number or a switch, in one place.

A bool is neither (YAML's `true` and JSON's `true` arrive as Python bools, which are ints), and a number must be
finite: inf or NaN in a learning rate, a loss weight or a mixing weight would only surface steps later, as a
non-finite loss blamed on the data. A switch is a bool: the text "false" is truthy.
"""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_switch(setting: str, value: Any) -> None:
    """Refuse, naming `setting`, a switch that is not a bool: "false" turned it on, and a None trust_remote_code is
    passed on to transformers, which then asks on stdin (a piped "y" ran a folder's own code)."""
    if not isinstance(value, bool):
        raise ValueError(f"{setting}={value!r} is invalid: expected True or False")
