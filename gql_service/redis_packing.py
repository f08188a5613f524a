"""asyncio Redis connections that pack commands with hiredis, as redis-py's synchronous ones do.

redis-py's synchronous connections pack commands with `hiredis.pack_command` (C) when hiredis
is installed; its asyncio connections always use the pure-Python packer, which encodes each
argument on its own and joins the buffer once per argument. A submit's one MULTI carries
about 85 arguments (the job record, RQ's job hash, the indexes), and packing them was the
largest single cost in the API's profile. The bytes are the same (tests/test_redis_conn.py).
"""

from __future__ import annotations

import sys
from typing import Any

import hiredis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import DataError


class HiredisPacking(AbstractConnection):
    """Mixed in before a redis-py asyncio connection class (the Sentinel one: redis_conn)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # As redis-py's own packers: a command name may hold several words ("CONFIG GET").
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            pass
        # hiredis refuses a bytearray (redis-py packs it as bytes): only then is every
        # argument looked at, not on every command (a CAS call carries 40 of them).
        args = tuple(bytes(arg) if isinstance(arg, bytearray) else arg for arg in args)
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            # A bool or None: redis-py's own error for it, as its encoder raises.
            raise DataError(sys.exc_info()[1]).with_traceback(sys.exc_info()[2]) from None


class PackedConnection(HiredisPacking, Connection):
    pass


class PackedSSLConnection(HiredisPacking, SSLConnection):
    pass


class PackedUnixConnection(HiredisPacking, UnixDomainSocketConnection):
    pass


_PACKED: dict[type, type[AbstractConnection]] = {
    Connection: PackedConnection,
    SSLConnection: PackedSSLConnection,
    UnixDomainSocketConnection: PackedUnixConnection,
}


def url_options(url: str) -> dict[str, Any]:
    """redis-py's options for `url` (redis://, rediss://, unix://) with the packed twin of the
    connection class it picks: its `from_url` lets the URL's class override one passed in."""
    options: dict[str, Any] = dict(parse_url(url))
    options["connection_class"] = _PACKED[options.get("connection_class", Connection)]
    return options
