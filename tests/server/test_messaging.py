"""The server's reply polling: how long a reply can wait for the server's next pull."""

from __future__ import annotations

import itertools

from server.messaging import POLL_FIRST_S, POLL_MAX_S, next_poll_delay


def test_the_pull_interval_grows_from_the_first_to_the_cap_and_stays() -> None:
    delays = [POLL_FIRST_S]
    for _ in range(20):
        delays.append(next_poll_delay(delays[-1]))
    assert delays[0] == POLL_FIRST_S == 0.05
    assert all(b >= a for a, b in itertools.pairwise(delays))
    # a deployed exchange waits seconds for the SuperNodes' polls: by then the server pulls
    # every 0.25 s, so a reply waits ~0.13 s for it on average (it was up to 1 s)
    assert max(delays) == POLL_MAX_S == 0.25
    assert delays[-1] == POLL_MAX_S
    assert sum(delays[:6]) < 1.5  # within the first second and a half: 6 pulls, not 3
