"""How the agent dials its inside targets by name: through the resolver, for every stream.
(Addresses are dialled as they are: tests/test_dial.py.)"""

from __future__ import annotations

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


def test_name_targets_are_resolved_for_every_stream():
    reactor = MemoryReactorClock()
    resolver = CountingResolver()
    reactor.nameResolver = resolver
    service = agent(reactor)
    for _ in range(2):
        service.target_endpoint(Target("db.internal", 5432)).connect(Factory.forProtocol(Protocol))
    assert resolver.names == ["db.internal", "db.internal"]
    assert reactor.tcpClients == []  # nothing dialled before the name resolves
