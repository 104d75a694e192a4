"""Grid plumbing: push messages, then stream replies back as they arrive.

`Grid.send_and_receive` returns a list of every reply at the end (and polls every 3 s);
streaming lets the server fold each update into the running sum and drop it, so memory does
not grow with the number of devices in a round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid


def send_and_stream(grid: Grid, messages: Iterable[Message], timeout: float) -> Iterator[Message]:
    """Yield replies as they arrive until all came back or `timeout` seconds passed."""
    pending = {mid for mid in grid.push_messages(messages) if mid}
    deadline = time.monotonic() + timeout
    delay = 0.05
    while pending and time.monotonic() < deadline:
        replies = list(grid.pull_messages(pending))
        for reply in replies:
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        if pending and not replies:
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
        elif replies:
            delay = 0.05
