"""The server's seeded draws pick devices, not node ids: Flower draws node ids anew in every
run, so the same fleet under other node ids must give the same round (plain draw and the
device clock's over-selection alike)."""

from __future__ import annotations

from server.loop import NodeInfo, Registry, sample


def _registry(node_ids: list[int]) -> Registry:
    devices = [("phone", f"play-{i}") for i in range(9)] + [("tv", str(100 + i)) for i in range(6)]
    registry = Registry()
    for node, (device_class, client) in zip(node_ids, devices, strict=True):
        registry.nodes[node] = NodeInfo(device_class, device_class, client)
    return registry


def _clients(registry: Registry, nodes: list[int]) -> list[str]:
    return [registry.nodes[n].data_client for n in nodes]


def test_a_seed_draws_the_same_devices_under_any_node_ids() -> None:
    first = _registry(list(range(1, 16)))
    # the same devices, node ids in another order (as another run of Flower gives them)
    second = _registry([9_000_000_000 - 7 * i * i for i in range(15)])
    for server_round in range(1, 6):
        draws = [sample(r, {"phone": 3, "tv": 2}, 0, server_round) for r in (first, second)]
        picked = {tuple(sorted(_clients(r, d))) for r, d in zip((first, second), draws, strict=True)}
        assert len(picked) == 1
    assert _clients(first, first.ordered()) == _clients(second, second.ordered())
    assert _clients(second, second.of_class("tv")) == [str(100 + i) for i in range(6)]
