"""Logging that an outsider cannot turn into a flood: one line per kind of event per interval."""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

MAX_KEYS = 1024
# Lines that the keys of one group (one address each, say) may log together per interval:
# a stranger with many addresses (an IPv6 /64 is 2**64 of them) gets no more than this.
GROUP_LINES = 10


class ThrottledLog:
    """Logs the first event of a key, then at most one per `interval` with how many were held
    back; the keys of a group (one per source address, say) log at most GROUP_LINES lines
    together per interval (a fixed window from the group's first line), the next line
    saying how many of the group's were not logged."""

    def __init__(self, log: Logger, clock: Callable[[], float], interval: float = 10.0) -> None:
        self._log = log
        self._clock = clock
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}
        # group -> (start of its interval, lines logged in it, events held back since the last line)
        self._groups: dict[str, tuple[float, int, int]] = {}

    def warn(self, key: str, format: str, *, group: str | None = None, **fields) -> None:
        """Log unless `key` logged within the interval, or `group` (a name from our own
        code, never from a peer) already logged GROUP_LINES lines in its interval."""
        self._emit(self._log.warn, key, format, fields, group)

    def info(self, key: str, format: str, *, group: str | None = None, **fields) -> None:
        self._emit(self._log.info, key, format, fields, group)

    def _emit(self, emit, key: str, format: str, fields: dict, group: str | None = None) -> None:
        now = self._clock()
        last, held = self._last.get(key, (None, 0))
        if last is not None and now - last < self._interval:
            self._last[key] = (last, held + 1)
            return
        if group is not None:
            start, lines, group_held = self._groups.get(group, (now, 0, 0))
            if now - start >= self._interval:
                start, lines = now, 0
            if lines >= GROUP_LINES:
                self._groups[group] = (start, lines, group_held + 1)
                return
            self._groups[group] = (start, lines + 1, 0)
            if group_held:
                format += " ({group_held} more of this kind were not logged)"
                fields.update(group_held=group_held)
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
