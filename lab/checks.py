"""Checks of the numbers and names users give (configs, the plan, the panels): one place, one message shape,
`<field> must be <what is allowed>, got <value>`."""
import math
import numbers

__all__ = ["InputError", "integer", "real", "choice", "parse_number", "show"]


class InputError(ValueError):
    """Bad input from the user: an argument, a file, a config, a prompt. The message says what was wrong and what is
    allowed, so `python -m lab` prints it as one line; any other exception is a bug and keeps its traceback. A
    ValueError, so code that catches ValueError for bad input keeps working."""


def show(value, limit=60):
    """repr(value), cut short: a message quoting a megabyte of pasted text helps nobody."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _range(low, high, low_open=False):
    def num(v):
        return f"{v:,}" if isinstance(v, int) else f"{v:g}"
    lo = f"> {num(low)}" if low_open else f">= {num(low)}" if low is not None else ""
    hi = f"<= {num(high)}" if high is not None else ""
    return " and ".join(s for s in (lo, hi) if s)


def integer(name, value, low=None, high=None):
    """`value` as an int in [low, high]. A float with an integral value (3.0) is that integer; 2.9, NaN, inf,
    bools and non-numbers are refused."""
    allowed = "an integer" + (f" {_range(low, high)}" if low is not None or high is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be {allowed}, got {show(value)}")
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise InputError(f"{name} must be {allowed}, got {show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name} must be {allowed}, got {show(value)}")
    return int(value)


def real(name, value, low=None, high=None, low_open=False):
    """`value` as a finite float in the range (low excluded with low_open); NaN, inf, bools and non-numbers are
    refused."""
    allowed = "a finite number" + (f" {_range(low, high, low_open)}" if low is not None or high is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be {allowed}, got {show(value)}")
    try:
        f = float(value)
    except OverflowError:  # an int too large for a float
        f = math.inf
    if (not math.isfinite(f) or (low is not None and (f <= low if low_open else f < low))
            or (high is not None and f > high)):
        raise InputError(f"{name} must be {allowed}, got {show(value)}")
    return f


def choice(name, value, allowed):
    """`value` if it is one of `allowed` (compared as given: no case folding)."""
    try:
        ok = value in allowed
    except TypeError:  # an unhashable value against a set or dict
        ok = False
    if not ok:
        raise InputError(f"{name} must be one of {sorted(allowed)}, got {show(value)}")
    return value


def parse_number(name, value):
    """A number typed in a form arrives as text ("12", "1e-3", ""): the number it spells (an int where it is one),
    for integer() or real() to judge. Anything that is not text passes unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise InputError(f"{name} must be a number, got {show(value)}") from None
