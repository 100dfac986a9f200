"""Argument checks shared by every optimizer: one clear ValueError naming the bad option."""
from __future__ import annotations

import difflib
import math
import re
from typing import Any, Iterable, Mapping


class UnknownOptionError(ValueError):
    """An option name the optimizer does not know; ``option`` and ``hint`` let a caller that knows where
    the options came from (a DeepSpeed config's ``optimizer.params``) say so in its own words."""

    def __init__(self, owner: str, option: Any, hint: str = ""):
        super().__init__(f"{owner}: unknown option {option!r}{hint}")
        self.owner, self.option, self.hint = owner, option, hint

    def __reduce__(self):  # picklable (it may cross a process boundary)
        return type(self), (self.owner, self.option, self.hint)


def reject_unknown(owner: str, given: Mapping[str, Any], known: Iterable[str]) -> None:
    """Raise UnknownOptionError (a ValueError) for the first option name `owner` does not know, with a suggestion."""
    known = sorted(known)
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UnknownOptionError(owner, name, hint)


def check_nonneg(owner: str, name: str, value: Any) -> None:
    if not _is_number(value) or value < 0 or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


def check_positive(owner: str, name: str, value: Any) -> None:
    if not _is_number(value) or value <= 0 or not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")


def check_beta(owner: str, name: str, value: Any) -> None:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}: {name} must be in [0, 1), got {value!r}")


def check_betas(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{owner}: {name} must be a pair (beta1, beta2), got {value!r}")
    for i, b in enumerate(value):
        check_beta(owner, f"{name}[{i}]", b)


def check_int_at_least(owner: str, name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}, got {value!r}")


def check_choice(owner: str, name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: {name} must be one of {list(choices)}, got {value!r}")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name} must be true or false, got {value!r}")


def check_patterns(owner: str, name: str, value: Any) -> None:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise ValueError(f"{owner}: {name} must be a list of regular expressions, got {value!r}")
    for p in value:
        try:
            re.compile(p)
        except re.error as exc:
            raise ValueError(f"{owner}: {name} has an invalid regular expression {p!r}: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_ahead_steps(name: str, value: Any, update_freq: Any) -> None:
    """refresh_ahead_steps: 1 <= k < update_freq, or 1 (one decomposition in flight per matrix)."""
    check_int_at_least(name, "refresh_ahead_steps", value, 1)
    if isinstance(update_freq, int) and not isinstance(update_freq, bool) and value > 1 and value >= update_freq:
        raise ValueError(f"{name}: refresh_ahead_steps must be below update_freq ({update_freq}), got {value}")


def check_first_refresh_window(name: str, value: Any) -> None:
    """first_refresh_window: None (the default, min(update_freq, 8)) or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: first_refresh_window must be an integer >= 1 or None, got {value!r}")


def check_refresh_options(name: str, group: Mapping[str, Any]) -> None:
    """The refresh schedule options that AdaDiag and ASGO share (period, staggering, ahead, failures)."""
    check_int_at_least(name, "update_freq", group["update_freq"], 1)
    check_int_at_least(name, "max_decomp_failures", group["max_decomp_failures"], 1)
    check_bool(name, "stagger_refresh", group["stagger_refresh"])
    check_first_refresh_window(name, group.get("first_refresh_window"))
    check_choice(name, "refresh_from", group["refresh_from"], ("current", "previous"))
    check_ahead_steps(name, group["refresh_ahead_steps"], group["update_freq"])
