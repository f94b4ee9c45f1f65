"""How long to wait before retrying a map whose storage failed."""

from __future__ import annotations

import math
import random


def backoff_s(retries: int, *, base_s: float = 1.0, cap_s: float = 60.0) -> float:
    """Exponential backoff with jitter: uniform in [c/2, c] for c = min(cap, base * 2**retries).

    The jitter spreads the retries of many workers that failed at the same moment (S3
    throttling hits them all at once); the floor of c/2 keeps the wait growing.
    """
    try:
        # ldexp(b, n) is b * 2**n without building 2**n: no huge int, and OverflowError past 2**1023.
        ceiling = min(cap_s, math.ldexp(base_s, max(retries, 0)))
    except OverflowError:
        ceiling = cap_s
    return random.uniform(ceiling / 2, ceiling)
