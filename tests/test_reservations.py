"""graphql-sse's single connection mode, its state in one process (gql_service/api/reservations.py):
bounds, the expiry of a reservation whose stream is never opened, and the end of every
operation with its reservation. In-process, no service: the live protocol is in
tests/test_http_subscriptions.py and, with graphql-sse's own client, tests/test_js_clients.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping

import orjson
import pytest

from gql_service.api.errors import RequestError
from gql_service.api.reservations import Reservation, Reservations


def _encode(data: object) -> str:
    return orjson.dumps(data).decode()


class Watched:
    """An operation that yields one result, then waits for ever, saying when its `finally`
    ran (where a subscription gives back its channels and its tenant's watch slots)."""

    def __init__(self) -> None:
        self.released = asyncio.Event()

    async def results(self) -> AsyncGenerator[Mapping[str, object], None]:
        try:
            yield {"data": {"n": 1}}
            await asyncio.Event().wait()
        finally:
            self.released.set()


def _start(reservation: Reservation, op_id: str, operation: Watched) -> None:
    assert reservation.start(reservation.claim(op_id, 10), operation.results(), _encode)


async def test_a_reservation_never_opened_expires_with_its_operations() -> None:
    reservations = Reservations(max_per_tenant=1, ttl_s=0.05, max_operations=10)
    reservation = reservations.reserve("acme")
    operation = Watched()
    _start(reservation, "a", operation)  # the protocol lets operations start before the stream opens
    async with asyncio.timeout(5):
        await reservation.closed.wait()
        await operation.released.wait()
    assert reservations.find(reservation.token, "acme") is None and len(reservations) == 0
    assert reservations.reserve("acme").token != reservation.token  # its slot is free again


async def test_a_reservation_expires_unless_its_stream_is_being_sent() -> None:
    reservations = Reservations(max_per_tenant=3, ttl_s=0.05, max_operations=10)
    sent, asked = reservations.reserve("acme"), reservations.reserve("acme")
    reservations.open(sent)
    reservations.streaming(sent)
    # Asked for, but its client went before the stream started: the stream's `finally` never
    # runs, so only the expiry gives it back.
    reservations.open(asked)
    later = reservations.reserve("acme")  # its time to live ends after the first two's
    async with asyncio.timeout(5):
        await later.closed.wait()
    assert asked.closed.is_set() and reservations.find(asked.token, "acme") is None
    assert reservations.find(sent.token, "acme") is sent and not sent.closed.is_set()


async def test_reservations_are_bounded_per_tenant_and_bound_to_it() -> None:
    reservations = Reservations(max_per_tenant=2, ttl_s=60, max_operations=10)
    first = reservations.reserve("acme")
    reservations.reserve("acme")
    with pytest.raises(RequestError) as refused:
        reservations.reserve("acme")
    assert refused.value.status_code == 429 and refused.value.code == "RATE_LIMITED"
    assert reservations.reserve("globex").tenant == "globex"  # each tenant's bound is its own
    assert reservations.find(first.token, "globex") is None  # another tenant's token is unknown
    reservations.close(first)
    assert reservations.reserve("acme").tenant == "acme"
    opened = reservations.reserve("globex")
    reservations.open(opened)
    with pytest.raises(RequestError) as again:
        reservations.open(opened)  # one stream per reservation, ever
    assert again.value.status_code == 409


async def test_operation_ids_are_checked_and_operations_bounded_per_reservation() -> None:
    reservation = Reservations(max_per_tenant=1, ttl_s=60, max_operations=2).reserve("acme")
    for bad in (None, 7, "", "x" * 129):
        with pytest.raises(RequestError) as refused:
            reservation.claim(bad, 2)
        assert refused.value.status_code == 400
    reservation.claim("a", 2)
    with pytest.raises(RequestError) as duplicate:
        reservation.claim("a", 2)
    reservation.claim("b", 2)
    with pytest.raises(RequestError) as full:
        reservation.claim("c", 2)
    assert (duplicate.value.status_code, full.value.status_code, full.value.code) == (409, 429, "RATE_LIMITED")
    reservation.release("b")  # never started: its room is given back
    reservation.claim("c", 2)


async def test_closing_ends_every_operation_and_a_stopped_one_sends_no_complete() -> None:
    reservations = Reservations(max_per_tenant=1, ttl_s=60, max_operations=10)
    reservation = reservations.reserve("acme")
    reservations.open(reservation)
    reservations.streaming(reservation)
    stopped, running = Watched(), Watched()
    _start(reservation, "stopped", stopped)
    _start(reservation, "running", running)
    async with asyncio.timeout(5):
        firsts = [await reservation.events.get(), await reservation.events.get()]
        reservation.stop("stopped")
        await stopped.released.wait()
        assert not running.released.is_set()
        reservations.close(reservation)
        await running.released.wait()
    assert sorted(firsts) == [
        'event: next\ndata: {"id":"running","payload":{"data":{"n":1}}}\n\n',
        'event: next\ndata: {"id":"stopped","payload":{"data":{"n":1}}}\n\n',
    ]
    assert reservation.events.empty() and reservation.operations == {}
    # An operation prepared while its stream went is never started.
    assert not reservation.start("late", Watched().results(), _encode)


async def test_an_operation_that_ends_sends_complete_with_its_id() -> None:
    reservation = Reservations(max_per_tenant=1, ttl_s=60, max_operations=10).reserve("acme")

    async def one() -> AsyncGenerator[Mapping[str, object], None]:
        yield {"data": {"job": None}}

    assert reservation.start(reservation.claim("q", 10), one(), _encode)
    relay = reservation.operations["q"]
    assert relay is not None
    async with asyncio.timeout(5):
        events = [await reservation.events.get(), await reservation.events.get()]
        await relay
    assert events == [
        'event: next\ndata: {"id":"q","payload":{"data":{"job":null}}}\n\n',
        'event: complete\ndata: {"id":"q"}\n\n',
    ]
    assert reservation.operations == {}
