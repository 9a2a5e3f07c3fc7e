"""Checks shared by the model configurations: each raises a ValueError that names the field.

Copied into saved model folders with the configurations that import it (remote code), so it
imports only the standard library.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional


def check_number(
    field: str,
    value,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    exclusive_minimum: bool = False,
    integer: bool = False,
    optional: bool = False,
) -> None:
    """Raise a ValueError naming ``field`` unless ``value`` is a finite real number (an integer
    when ``integer``) within ``[minimum, maximum]`` (``(minimum, maximum]`` when
    ``exclusive_minimum``), or ``None`` when ``optional``. Booleans are not numbers here."""
    if value is None and optional:
        return
    kind = "an integer" if integer else "a finite number"
    bounds = []
    if minimum is not None:
        bounds.append(f"{'>' if exclusive_minimum else '>='} {minimum}")
    if maximum is not None:
        bounds.append(f"<= {maximum}")
    expected = kind + (" " + " and ".join(bounds) if bounds else "") + (" (or None)" if optional else "")
    valid = (
        isinstance(value, numbers.Integral if integer else numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (minimum is None or (value > minimum if exclusive_minimum else value >= minimum))
        and (maximum is None or value <= maximum)
    )
    if not valid:
        raise ValueError(f"{field} must be {expected}, got {value!r}")
