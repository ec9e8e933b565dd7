"""The ServerApp's wait for replies: pull every 0.1 s, and stop at once when asked.

Flower's deployed Grid (flwr 1.41's `HttpGrid`, over the SuperLink's Runtime API) sleeps 3 s between pulls in
`send_and_receive`, so each exchange of a deployed round waited up to 3 s after its last reply; its
in-memory Grid (the simulation) pulls every 0.1 s. One pull is one small call to the SuperLink, so both
backends pull as the simulation does.
"""
from __future__ import annotations

import threading
import time


class PullingGrid:
    """A Flower Grid whose `send_and_receive` pulls every `PULL_INTERVAL` seconds. Once `stop` is set, a wait
    for replies raises KeyboardInterrupt instead of waiting out flower.round_timeout for an engine that is
    gone (and instead of dropping the clients whose replies it then gets as errors)."""

    PULL_INTERVAL = 0.1  # seconds, as Flower's InMemoryGrid

    def __init__(self, grid, stop: threading.Event | None = None):
        self.grid, self.stop = grid, stop or threading.Event()

    def get_node_ids(self):
        self._check()
        return self.grid.get_node_ids()

    def send_and_receive(self, messages, timeout: float | None = None) -> list:
        """Flower's Grid.send_and_receive: push the messages, then pull until every reply is in or `timeout`
        seconds have passed."""
        self._check()
        pending = set(self.grid.push_messages(messages))
        replies, deadline = [], time.monotonic() + (timeout or 0.0)
        while pending and (timeout is None or time.monotonic() < deadline):
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {m.metadata.reply_to_message_id for m in got}
            self._check()
            if pending:
                time.sleep(self.PULL_INTERVAL)
        self._check()
        return replies

    def _check(self) -> None:
        if self.stop.is_set():
            raise KeyboardInterrupt
