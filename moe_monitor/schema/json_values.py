"""What the schema's checked readers accept as a JSON integer and a JSON number (bool is neither)."""
from __future__ import annotations

import math
from numbers import Integral, Real
from typing import TypeGuard


def is_int(x: object) -> TypeGuard[int]:
    return isinstance(x, Integral) and not isinstance(x, bool)


def is_number(x: object) -> TypeGuard[float]:
    """A finite number: no bool, NaN or infinity."""
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)
