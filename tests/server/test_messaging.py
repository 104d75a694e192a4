"""The server's reply polling: how long a reply can wait for the server's next pull."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest

from server import messaging
from server.messaging import POLL_FIRST_S, POLL_MAX_S, next_poll_delay, send_and_stream


def test_the_pull_interval_grows_from_the_first_to_the_cap_and_stays() -> None:
    delays = [POLL_FIRST_S]
    for _ in range(20):
        delays.append(next_poll_delay(delays[-1]))
    assert all(b >= a for a, b in itertools.pairwise(delays))
    assert delays[-1] == POLL_MAX_S == 0.25


class _SlowNodes:
    """A Grid stand-in whose one node answers `answer_at` (fake) seconds after the push."""

    def __init__(self, clock: list[float], answer_at: float) -> None:
        self.clock, self.answer_at, self.pulls = clock, answer_at, []

    def push_messages(self, messages: list[Any]) -> list[str]:
        for i, msg in enumerate(messages):
            msg.metadata.message_id = f"m{i}"
        return [msg.metadata.message_id for msg in messages]

    def pull_messages(self, ids: set[str]) -> list[Any]:
        self.pulls.append(self.clock[0])
        if self.clock[0] < self.answer_at:
            return []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i, src_node_id=7)) for i in ids]


def test_a_reply_that_takes_seconds_is_pulled_within_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(messaging.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(messaging.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    grid = _SlowNodes(clock, answer_at=3.0)  # a deployed exchange: the nodes' ~3 s idle polls
    sent = [SimpleNamespace(metadata=SimpleNamespace(message_id="", dst_node_id=7))]
    replies = list(send_and_stream(grid, sent, timeout=60.0))  # type: ignore[arg-type]
    assert [node for node, _ in replies] == [7]
    gaps = [b - a for a, b in itertools.pairwise(grid.pulls)]
    assert max(gaps) <= POLL_MAX_S + 1e-9, gaps
    assert grid.pulls[-1] - 3.0 <= POLL_MAX_S + 1e-9  # the reply waited at most one capped interval
