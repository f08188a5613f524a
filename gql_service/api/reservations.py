"""graphql-sse's single connection mode, its state: the event streams reserved in this API
process, and the operations whose results each one carries.

A reservation is a token bound to the tenant that asked for it. Its one event stream
carries, in order, every result of every operation started with the token, each tagged
with the client's operation id, until the client stops one or goes. Everything is
bounded: reservations per tenant (open or not), operations at once per reservation,
events waiting for a slow (or not yet opened) stream; and a reservation whose stream is
not opened within its time to live is dropped with its operations.

Reservations live in the memory of the process that made them, so every request that
carries a token must reach the API replica that issued it (affinity at the load
balancer); a restarted replica has forgotten its tokens, and graphql-sse's client reserves
again (it does on every reconnect).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Mapping

from gql_service.api.errors import RequestError
from gql_service.api.streams import HTTP_STREAMS, sse_event

log = logging.getLogger(__name__)

# Events waiting for the stream to take them; an operation that finds the buffer full waits
# (its job's updates meanwhile coalesce, latest first, in its broadcast mailbox).
EVENTS_BUFFERED = 64
MAX_OPERATION_ID_CHARS = 128

Results = AsyncGenerator[Mapping[str, object], None]


class Reservation:
    def __init__(self, token: str, tenant: str) -> None:
        self.token = token
        self.tenant = tenant
        self.events: asyncio.Queue[str] = asyncio.Queue(EVENTS_BUFFERED)
        # An id maps to None between its claim and its start (the operation is being prepared).
        self.operations: dict[str, asyncio.Task[None] | None] = {}
        self.opened = False
        self.closed = asyncio.Event()
        self.expiry: asyncio.TimerHandle | None = None

    def claim(self, op_id: object, max_operations: int) -> str:
        """Room for a new operation, taken before anything of it runs (two requests with one id
        can't both pass); `release` gives it back if it never starts."""
        if not isinstance(op_id, str) or not 0 < len(op_id) <= MAX_OPERATION_ID_CHARS:
            raise RequestError(
                400, f"extensions.operationId must be a string of 1 to {MAX_OPERATION_ID_CHARS} characters"
            )
        if op_id in self.operations:
            raise RequestError(409, f"operation {op_id!r} is running already on this stream")
        if len(self.operations) >= max_operations:
            raise RequestError(
                429, f"at most {max_operations} operations run at once on one event stream", code="RATE_LIMITED"
            )
        self.operations[op_id] = None
        return op_id

    def release(self, op_id: str) -> None:
        if self.operations.get(op_id) is None:
            self.operations.pop(op_id, None)

    def start(self, op_id: str, results: Results, encode: Callable[[object], str]) -> bool:
        """Relays the operation's results onto the stream; False when it was stopped while it
        was being prepared (a DELETE, the stream gone), and nothing starts."""
        if op_id not in self.operations or self.closed.is_set():
            return False
        self.operations[op_id] = asyncio.create_task(self._relay(op_id, results, encode), name=f"sse:{op_id}")
        return True

    def stop(self, op_id: str) -> None:
        """The client is done with an operation: it ends at once, without a `complete`."""
        task = self.operations.pop(op_id, None)
        if task is not None:
            task.cancel()

    async def _relay(self, op_id: str, results: Results, encode: Callable[[object], str]) -> None:
        HTTP_STREAMS.labels("sse").inc()
        try:
            # Closed however it ends (a stop, the stream gone): the subscription's `finally`
            # blocks release its channels and its tenant's watch slots at once.
            async with contextlib.aclosing(results):
                async for result in results:
                    await self.events.put(sse_event("next", encode({"id": op_id, "payload": result})))
            await self.events.put(sse_event("complete", encode({"id": op_id})))
        except Exception:
            # Nobody awaits this task: say it, and end the operation for the client.
            log.exception("operation %s of an event stream failed", op_id)
            with contextlib.suppress(asyncio.QueueFull):
                self.events.put_nowait(sse_event("complete", encode({"id": op_id})))
        finally:
            HTTP_STREAMS.labels("sse").dec()
            if self.operations.get(op_id) is asyncio.current_task():
                del self.operations[op_id]


class Reservations:
    """The reservations of one API process, by token."""

    def __init__(self, *, max_per_tenant: int, ttl_s: float, max_operations: int) -> None:
        self.max_per_tenant = max_per_tenant
        self.ttl_s = ttl_s
        self.max_operations = max_operations
        self._by_token: dict[str, Reservation] = {}
        self._per_tenant: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._by_token)

    def reserve(self, tenant: str) -> Reservation:
        if self._per_tenant[tenant] >= self.max_per_tenant:
            raise RequestError(
                429, f"at most {self.max_per_tenant} event streams can be reserved at once", code="RATE_LIMITED"
            )
        reservation = Reservation(secrets.token_urlsafe(24), tenant)
        reservation.expiry = asyncio.get_running_loop().call_later(self.ttl_s, self._expire, reservation)
        self._by_token[reservation.token] = reservation
        self._per_tenant[tenant] += 1
        return reservation

    def find(self, token: str, tenant: str) -> Reservation | None:
        """The tenant's reservation with this token; another tenant's is as good as unknown."""
        reservation = self._by_token.get(token)
        return reservation if reservation is not None and reservation.tenant == tenant else None

    def open(self, reservation: Reservation) -> None:
        """A request to open its stream: one, ever (the protocol's rule)."""
        if reservation.opened:
            raise RequestError(409, "the stream of this reservation is open already")
        reservation.opened = True

    @staticmethod
    def streaming(reservation: Reservation) -> None:
        """Its stream is being sent: from now on it ends with the stream, not at its expiry.
        (Not at `open`: a client gone before its stream starts never runs the stream's
        `finally`, and its reservation would be held for good.)"""
        if reservation.expiry is not None:
            reservation.expiry.cancel()

    def close(self, reservation: Reservation) -> None:
        """Its stream ended, or was never opened in time: the token is forgotten and every
        operation on it stops."""
        if reservation.closed.is_set():
            return
        reservation.closed.set()
        if reservation.expiry is not None:
            reservation.expiry.cancel()
        del self._by_token[reservation.token]
        self._per_tenant[reservation.tenant] -= 1
        for op_id in list(reservation.operations):
            reservation.stop(op_id)

    def _expire(self, reservation: Reservation) -> None:
        log.info("an event stream reserved %.0f s ago was never opened: dropped", self.ttl_s)
        self.close(reservation)
