"""Who may connect to a public port: the relay operator's allow/deny lists and per-source caps.

Set by the operator in the relay's config, never by the agent. Checked when a client
connects, before any stream exists, so a refused client costs one accept and one close.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_TRACKED_SOURCES = 65536  # per port; beyond it idle sources are forgotten first


@dataclass(frozen=True)
class PortPolicy:
    allow: tuple[Network, ...] = ()  # empty: everyone not denied
    deny: tuple[Network, ...] = ()  # wins over allow
    max_conns_per_ip: int = 0  # concurrent connections from one address; 0 = no cap
    max_rate_per_ip: float = 0.0  # new connections per second from one address; 0 = no cap

    @property
    def is_open(self) -> bool:
        return not (self.allow or self.deny or self.max_conns_per_ip or self.max_rate_per_ip)


OPEN = PortPolicy()

_KEYS = {"allow", "deny", "max-conns-per-ip", "max-rate-per-ip"}


def parse_policies(table: Mapping[str, Any], where: str) -> dict[int | None, PortPolicy]:
    """`[ports.8080]` / `[ports.default]` tables of the relay config; None keys the default."""
    policies: dict[int | None, PortPolicy] = {}
    for key, body in table.items():
        if key == "default":
            port = None
        elif key.isdigit() and 1 <= int(key) <= 65535:
            port = int(key)
        else:
            raise ValueError(f"{where}: [ports.{key}] must name a port number or 'default'")
        if not isinstance(body, Mapping):
            raise ValueError(f"{where}: ports.{key} must be a table, e.g. [ports.{key}] allow = [\"10.0.0.0/8\"]")
        policies[port] = _parse_policy(body, f"{where}: ports.{key}")
    return policies


def _parse_policy(body: Mapping[str, Any], where: str) -> PortPolicy:
    unknown = set(k.replace("_", "-") for k in body) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key {sorted(unknown)[0]!r}; known keys: {', '.join(sorted(_KEYS))}")
    values = {k.replace("_", "-"): v for k, v in body.items()}
    conns = values.get("max-conns-per-ip", 0)
    rate = values.get("max-rate-per-ip", 0)
    if not isinstance(conns, int) or isinstance(conns, bool) or conns < 0:
        raise ValueError(f"{where}: max-conns-per-ip must be a whole number >= 0")
    if not isinstance(rate, int | float) or isinstance(rate, bool) or rate < 0:
        raise ValueError(f"{where}: max-rate-per-ip must be a number >= 0 (new connections per second)")
    return PortPolicy(
        allow=_networks(values.get("allow", []), f"{where}.allow"),
        deny=_networks(values.get("deny", []), f"{where}.deny"),
        max_conns_per_ip=conns,
        max_rate_per_ip=float(rate),
    )


def _networks(items: Any, where: str) -> tuple[Network, ...]:
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise ValueError(f"{where} must be a list of CIDR strings like \"192.0.2.0/24\"")
    try:
        return tuple(ipaddress.ip_network(i, strict=False) for i in items)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def client_address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address; IPv4-mapped IPv6 (a dual-stack listener) counts as the IPv4 address."""
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass
class _Source:
    connections: int = 0
    tokens: float = 0.0
    updated: float = 0.0


@dataclass
class Gate:
    """The live state of one public port's policy: counts per source, and what was refused."""

    policy: PortPolicy
    clock: Callable[[], float]
    sources: dict[Any, _Source] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=lambda: {"acl": 0, "concurrency": 0, "rate": 0})
    admitted: int = 0

    def admit(self, host: str) -> str | None:
        """None if this client may connect (and it is counted), else why not."""
        policy = self.policy
        if policy.is_open:
            self.admitted += 1
            return None
        address = client_address(host)
        if address is None or any(address in n for n in policy.deny) or (
            policy.allow and not any(address in n for n in policy.allow)
        ):
            self.refused["acl"] += 1
            return f"{host} is not allowed by the port's allow/deny lists"
        source = self._source(address)
        if policy.max_conns_per_ip and source.connections >= policy.max_conns_per_ip:
            self.refused["concurrency"] += 1
            return f"{host} already has {source.connections} connections, the maximum"
        if policy.max_rate_per_ip:
            now = self.clock()
            burst = max(1.0, policy.max_rate_per_ip)
            source.tokens = min(burst, source.tokens + (now - source.updated) * policy.max_rate_per_ip)
            source.updated = now
            if source.tokens < 1.0:
                self.refused["rate"] += 1
                return f"{host} opens connections faster than {policy.max_rate_per_ip:g} per second"
            source.tokens -= 1.0
        source.connections += 1
        self.admitted += 1
        return None

    def release(self, host: str) -> None:
        if self.policy.is_open:
            return
        source = self.sources.get(client_address(host))
        if source is not None and source.connections:
            source.connections -= 1

    def _source(self, address) -> _Source:
        source = self.sources.get(address)
        if source is None:
            if len(self.sources) >= MAX_TRACKED_SOURCES:
                self._forget_idle()
            burst = max(1.0, self.policy.max_rate_per_ip)
            source = self.sources[address] = _Source(tokens=burst, updated=self.clock())
        return source

    def _forget_idle(self) -> None:
        """Drop sources with no open connection, oldest first. Forgetting one resets its rate
        bucket, which only an attacker already holding that many addresses could exploit."""
        for address in [a for a, s in self.sources.items() if not s.connections][: MAX_TRACKED_SOURCES // 4]:
            del self.sources[address]
