"""The mailboxes between callbacks and workers: newest wins, per key for the keyed one."""

import threading

from gaga_ros.mailbox import KeyedMailbox, Mailbox


def test_mailbox_keeps_the_newest_and_counts_the_dropped():
    box: Mailbox[int] = Mailbox()
    box.put(1)
    box.put(2)
    assert box.get() == 2 and box.dropped == 1
    assert box.get(timeout=0.01) is None


def test_keyed_mailbox_replaces_per_key_and_keeps_keys_a_newer_batch_lacks():
    box: KeyedMailbox[str, int] = KeyedMailbox()
    box.put({"a": 1, "b": 1})
    box.put({"a": 2})
    assert box.get() == {"a": 2, "b": 1}
    assert box.dropped == 1
    assert box.get(timeout=0.01) == {}


def test_keyed_mailbox_close_wakes_a_waiting_reader_and_reopen_clears():
    box: KeyedMailbox[str, int] = KeyedMailbox()
    got: list[dict] = []
    reader = threading.Thread(target=lambda: got.append(box.get(timeout=60)))
    reader.start()
    box.close()
    reader.join(timeout=30)
    assert not reader.is_alive() and got == [{}] and box.closed
    box.put({"a": 1})
    box.reopen()
    assert not box.closed and box.get(timeout=0.01) == {}
