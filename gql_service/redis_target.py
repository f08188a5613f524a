"""Where Redis is, and what a write waits for: the two values the settings give every client."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class RedisTarget:
    """Where Redis is: a server's URL, or sentinels and the name of the primary they watch.

    With sentinels, `url` gives only the primary's username, password and database.
    """

    url: str = field(default=DEFAULT_REDIS_URL, repr=False)  # it may hold a password
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = "mymaster"
    sentinel_password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        # For logs and messages: never a password.
        if self.sentinels:
            where = ",".join(f"{host}:{port}" for host, port in self.sentinels)
            return f"sentinel {where}, primary {self.master!r}"
        parts = urlsplit(self.url)
        if parts.password is None:
            return self.url
        return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


@dataclass(frozen=True)
class ReplicaAck:
    """A write counts once this many replicas have it (Redis WAIT), within `timeout_ms`."""

    replicas: int
    timeout_ms: int


def sentinel_addresses(value: str) -> tuple[tuple[str, int], ...]:
    """REDIS_SENTINELS, `host:port,host:port`, as pairs (ValueError when it is not that)."""
    addresses = []
    for item in value.split(","):
        host, _, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"must be host:port pairs separated by commas, got {item.strip()!r}")
        addresses.append((host, int(port)))
    return tuple(addresses)
