"""Logging that an outsider cannot turn into a flood: one line per kind of event per interval."""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

MAX_KEYS = 1024


class ThrottledLog:
    """Logs the first event of a key, then at most one per `interval` with how many were held back."""

    def __init__(self, log: Logger, clock: Callable[[], float], interval: float = 10.0) -> None:
        self._log = log
        self._clock = clock
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, key: str, format: str, **fields) -> None:
        self._emit(self._log.warn, key, format, fields)

    def info(self, key: str, format: str, **fields) -> None:
        self._emit(self._log.info, key, format, fields)

    def _emit(self, emit, key: str, format: str, fields: dict) -> None:
        now = self._clock()
        last, held = self._last.get(key, (None, 0))
        if last is not None and now - last < self._interval:
            self._last[key] = (last, held + 1)
            return
        if key not in self._last and len(self._last) >= MAX_KEYS:
            self._make_room(now)
        self._last[key] = (now, 0)
        if held:
            format += " ({held} more like this in the last {interval:.0f} s)"
            fields.update(held=held, interval=self._interval)
        emit(format, **fields)

    def _make_room(self, now: float) -> None:
        # Forget keys whose interval is over (their next event logs anyway), else the
        # oldest one: never all at once, which would lift every limit together.
        expired = [k for k, (last, _) in self._last.items() if now - last >= self._interval]
        for k in expired or [next(iter(self._last))]:
            del self._last[k]
