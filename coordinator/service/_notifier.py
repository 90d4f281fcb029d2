"""In-process wake-ups for long-polls and watches (no database polling while idle).

Keys are ``task:<type>`` (a task of that type became READY) and ``exec:<id>`` (an
execution appended events). Listeners register *before* they look at the store, so
a notification between the look and the wait is never lost.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

WAKE_ALL = "*"


def task_key(task_type: str) -> str:
    return f"task:{task_type}"


def execution_key(execution_id: str) -> str:
    return f"exec:{execution_id}"


class Notifier:
    def __init__(self) -> None:
        self._listeners: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._closed = False

    @contextmanager
    def listen(self, keys: Iterable[str]) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        keys = list(keys)
        if self._closed:
            event.set()
        for key in keys:
            self._listeners[key].add(event)
        try:
            yield event
        finally:
            for key in keys:
                listeners = self._listeners.get(key)
                if listeners is not None:
                    listeners.discard(event)
                    if not listeners:
                        del self._listeners[key]

    def notify(self, keys: Iterable[str]) -> None:
        """Wake the listeners of ``keys``; the key ``"*"`` wakes every listener."""
        for key in keys:
            if key == WAKE_ALL:
                for listeners in self._listeners.values():
                    for event in listeners:
                        event.set()
                return
            for event in self._listeners.get(key, ()):
                event.set()

    def close(self) -> None:
        """Wake every listener now and every future one at once (shutdown)."""
        self._closed = True
        for listeners in self._listeners.values():
            for event in listeners:
                event.set()

    @property
    def waiting(self) -> int:
        """Listeners waiting for tasks (long-polls); background loops are not counted."""
        return len(
            {id(e) for key, ls in self._listeners.items() if key.startswith("task:") for e in ls}
        )
