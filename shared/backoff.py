"""The one backoff formula: how long a failed piece of work waits before its next attempt.

Used wherever work is retried (a consumer group's failed handler, a forward to a target that is
down), so every retry in dicomflow grows and caps the same way.
"""

from __future__ import annotations


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Seconds before retry ``attempt`` (1-based): initial, 2x, 4x, ... capped at ``maximum``."""
    return min(maximum, initial * 2 ** max(0, attempt - 1))
