"""What a setting or a data field must be to count as an integer, a number or a switch, in one place.

A bool is neither (YAML's `true` and JSON's `true` arrive as Python bools, which are ints), and a number must be
finite: inf or NaN in a learning rate, a loss weight or a mixing weight would only surface steps later, as a
non-finite loss blamed on the data. A switch is a bool: the text "false" is truthy. A path the user types is read
as the shell would read it (`user_path`). And how a fraction reads as a percentage (`percent`), in the run report and
in an adapter folder's model card alike.
"""

from __future__ import annotations

import math
import os
from typing import Any


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def user_path(path: str | os.PathLike[str]) -> str:
    """A path the user typed, with a leading `~` (or `~user`) as that home folder, as the shell expands it and as
    Lightning expands `default_root_dir` and ModelCheckpoint's `dirpath`: a quoted `~`, one in a YAML recipe or after
    `=` (`--flag=~/x`) reaches us as typed, and named a folder `~` in the current directory (a file "not found" there,
    a run's output written there). Anything else is returned as given: a relative path is read from the current
    directory, and a hub id or an `offline:` name never starts with `~`. Every path setting goes through this."""
    return os.path.expanduser(os.fspath(path))


def check_switch(setting: str, value: Any) -> None:
    """Refuse, naming `setting`, a switch that is not a bool: "false" turned it on, and a None trust_remote_code is
    passed on to transformers, which then asks on stdin (a piped "y" ran a folder's own code)."""
    if not isinstance(value, bool):
        raise ValueError(f"{setting}={value!r} is invalid: expected True or False")


# the most decimals `percent` shows: closer than that to 0 or 100 %, a value is float rounding (1e-6 of a fraction)
PERCENT_DECIMALS = 4


def percent(value: float | None, signed: bool = False) -> str:
    """A fraction as a percentage with one decimal ("+" on gains when `signed`), "-" for a missing value. One that
    would round to 0 or (-)100 without being it gets the decimals that tell it apart (up to `PERCENT_DECIMALS`):
    99.96 % of the items right is no "100.0", and 0.04 % no "0.0"."""
    if value is None:
        return "-"
    number = 100 * value
    decimals = 1
    while abs(round(number, decimals)) in (0.0, 100.0) and round(number, decimals) != round(number, PERCENT_DECIMALS):
        decimals += 1
    return f"{number:+.{decimals}f}" if signed else f"{number:.{decimals}f}"
