"""Pure retry rules: capped exponential backoff with jitter, and what a DIMSE status means for a delivery.

Imports: model, config (types only). No I/O, no clock: callers pass the attempt number and a random source.
"""

from __future__ import annotations

import enum
import random
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from gateway.config import RetryPolicy


class Outcome(enum.Enum):
    """What one C-STORE response (or failure) means for the delivery it answers."""

    DONE = "done"  # stored (success or a warning)
    TRANSIENT = "transient"  # try again later, without limit
    PERMANENT = "permanent"  # refused: retried up to max_attempts, then failed


# Warnings: the archive kept the object (coerced, elements discarded, data set does not match SOP class).
WARNING_STATUSES: Final = frozenset({0x0001, 0xB000, 0xB006, 0xB007})


def classify_status(status: int) -> Outcome:
    """Map a C-STORE-RSP status to a delivery outcome (PS3.4 B.2.3, PS3.7 C).

    0xA7xx (Out of Resources) is transient: the archive may have room later. 0xA9xx, 0xCxxx and every other
    failure are permanent refusals of this object.
    """
    if status == 0x0000 or status in WARNING_STATUSES:
        return Outcome.DONE
    if status & 0xFF00 == 0xA700:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def backoff_delay(policy: RetryPolicy, attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before attempt `attempt + 1` (attempt counts from 1).

    ``initial * factor**(attempt-1)`` capped at ``max_delay``, then spread by +-``jitter`` (a fraction) so
    that many gateways, or many deliveries, do not retry in lockstep.
    """
    try:
        grown = policy.initial_delay * policy.factor ** max(attempt - 1, 0)
    except OverflowError:  # a destination down for days: the exponent outgrows a float
        grown = policy.max_delay
    base = min(policy.max_delay, grown)
    if policy.jitter <= 0 or base <= 0:
        return base
    spread = (rng or random).uniform(-policy.jitter, policy.jitter)
    return max(0.0, min(policy.max_delay, base * (1.0 + spread)))
