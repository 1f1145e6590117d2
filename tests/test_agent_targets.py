"""How the agent dials its inside targets: addresses directly, names through the resolver."""

from __future__ import annotations

import pytest
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock

from relay.agent import AgentService, AgentSettings, Target


class CountingResolver:
    def __init__(self):
        self.names: list[str] = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.names.append(hostName)
        return receiver


def agent(reactor) -> AgentService:
    settings = AgentSettings(token="t", expose={}, connect_timeout=7.0)
    return AgentService(reactor, endpoint=None, settings=settings, relay_name="relay.test:7835")


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "10.1.2.3", "fe80::1"])
def test_address_targets_connect_at_once_without_the_resolver(host):
    reactor = MemoryReactorClock()
    resolver = CountingResolver()
    reactor.nameResolver = resolver
    agent(reactor).target_endpoint(Target(host, 80)).connect(Factory.forProtocol(Protocol))
    assert resolver.names == []
    assert [(h, p, t) for h, p, _f, t, _b in reactor.tcpClients] == [(host, 80, 7.0)]


def test_name_targets_are_resolved_for_every_stream():
    reactor = MemoryReactorClock()
    resolver = CountingResolver()
    reactor.nameResolver = resolver
    service = agent(reactor)
    for _ in range(2):
        service.target_endpoint(Target("db.internal", 5432)).connect(Factory.forProtocol(Protocol))
    assert resolver.names == ["db.internal", "db.internal"]
    assert reactor.tcpClients == []  # nothing dialled before the name resolves
