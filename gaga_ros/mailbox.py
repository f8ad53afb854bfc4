"""One-slot mailboxes between a callback and a worker: the newest item wins, nothing queues."""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")
K = TypeVar("K")


class _Slots:
    """What both mailboxes share: a condition, closing and reopening, the count of dropped items."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._closed = False
        self.dropped = 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        with self._cond:
            self._closed = False
            self._clear()

    @property
    def closed(self) -> bool:
        return self._closed

    def _clear(self) -> None:
        raise NotImplementedError

    def _wait(self, empty: bool, timeout: float) -> None:
        """Under the condition: wait up to `timeout` while `empty` and open."""
        if empty and not self._closed:
            self._cond.wait(timeout)


class Mailbox(_Slots, Generic[T]):
    """put() replaces any unread item (counted in `dropped`); get() waits for the next one."""

    def __init__(self) -> None:
        super().__init__()
        self._item: T | None = None

    def put(self, item: T) -> None:
        with self._cond:
            if self._item is not None:
                self.dropped += 1
            self._item = item
            self._cond.notify()

    def get(self, timeout: float = 0.5) -> T | None:
        """The newest item, or None after `timeout` or once closed."""
        with self._cond:
            self._wait(self._item is None, timeout)
            item, self._item = self._item, None
            return item

    def _clear(self) -> None:
        self._item = None


class KeyedMailbox(_Slots, Generic[K, T]):
    """One slot per key: put() replaces only the unread items of the keys it brings, so a key that a
    newer batch lacks keeps its unread item; get() takes every unread item at once. The fleet node
    hands each round's frames (one per avatar) from its render worker to its publisher this way: a
    slow publisher drops superseded frames (counted), never an avatar's newest one."""

    def __init__(self) -> None:
        super().__init__()
        self._items: dict[K, T] = {}

    def put(self, items: dict[K, T]) -> None:
        with self._cond:
            self.dropped += sum(k in self._items for k in items)
            self._items.update(items)
            self._cond.notify()

    def get(self, timeout: float = 0.5) -> dict[K, T]:
        """Every unread item by key ({} after `timeout` or once closed)."""
        with self._cond:
            self._wait(not self._items, timeout)
            items, self._items = self._items, {}
            return items

    def _clear(self) -> None:
        self._items = {}
