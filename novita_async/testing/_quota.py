"""Novita's images-per-minute quota: a sliding 60 s window weighted by ``image_num``."""

from __future__ import annotations

import math
from collections import deque

__all__ = ["Quota"]

_WINDOW = 60.0


class Quota:
    """``admit(weight, now)``: None (and record it) or the seconds until it fits."""

    def __init__(self, images_per_minute: float | None = None) -> None:
        if images_per_minute is not None and not 0 < images_per_minute < math.inf:
            raise ValueError("images_per_minute must be finite and > 0, or None")
        self.images_per_minute = images_per_minute
        self._window: deque[tuple[float, int]] = deque()
        self._weight = 0

    def admit(self, weight: int, now: float) -> float | None:
        """Seconds until ``weight`` images fit the window, or None (and record them).

        A request heavier than the whole quota is let through once the window is empty.
        """
        if self.images_per_minute is None:
            return None
        window = self._window
        while window and window[0][0] <= now - _WINDOW:
            self._weight -= window.popleft()[1]
        if window and self._weight + weight > self.images_per_minute:
            excess = self._weight + weight - self.images_per_minute
            for stamp, used in window:
                excess -= used
                if excess <= 0:
                    return stamp + _WINDOW - now
            return window[-1][0] + _WINDOW - now  # heavier than the quota: when empty
        window.append((now, weight))
        self._weight += weight
        return None
