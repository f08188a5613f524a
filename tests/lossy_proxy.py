"""A TCP proxy in front of Redis that loses replies: the network fault a write must survive.

Every `every`-th EXEC, or EVAL or EVALSHA outside a MULTI (the commands whose reply says
whether a write happened), that any client sends through it is forwarded to Redis; the
proxy waits for Redis's reply to it (so the command has run), then closes the client's
connection without passing that reply on. The client sees a dropped connection and cannot
know whether its write was applied: exactly the case where redis-py sends the same
command again.

It counts RESP (2 or 3) commands and replies on each connection to know which reply is
which; a connection that never sends those commands (pub/sub) is passed through untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter

TARGETS = (b"EXEC", b"EVAL", b"EVALSHA")


def resp_end(buf: bytes | bytearray, pos: int) -> int:
    """Where the RESP (2 or 3) value that starts at `pos` ends, or -1 if it is not all there yet."""
    nl = buf.find(b"\r\n", pos)
    if nl < 0:
        return -1
    kind, after = buf[pos : pos + 1], nl + 2
    if kind in (b"+", b"-", b":", b"_", b",", b"#", b"("):
        return after
    count = int(buf[pos + 1 : nl])
    if kind in (b"$", b"!", b"="):
        end = after + count + 2
        return end if count < 0 or len(buf) >= end else -1
    if kind in (b"*", b"~", b">", b"%", b"|"):
        items = count * 2 if kind in (b"%", b"|") else count
        for _ in range(max(items, 0)):
            after = resp_end(buf, after)
            if after < 0:
                return -1
        # An attribute map comes before the value it describes: the two are one reply.
        return resp_end(buf, after) if kind == b"|" else after
    raise ValueError(f"not RESP: {bytes(buf[pos : pos + 20])!r}")


def command_name(buf: bytes | bytearray, pos: int) -> bytes:
    """The name of the command (an array of bulk strings) that starts at `pos`."""
    first = buf.find(b"\r\n", pos) + 2  # past "*N\r\n", at "$len\r\n<name>\r\n"
    nl = buf.find(b"\r\n", first)
    length = int(buf[first + 1 : nl])
    return bytes(buf[nl + 2 : nl + 2 + length]).upper()


class LossyProxy:
    def __init__(self, redis_port: int, *, every: int = 7, first: int | None = None) -> None:
        self.redis_port = redis_port
        self.every = every
        self.first = every if first is None else first  # the number of the first one lost
        self.port = 0
        self.seen: Counter[str] = Counter()  # target commands passed on, by name
        self.dropped: Counter[str] = Counter()  # replies lost on purpose, by command
        self._count = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lossy-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> LossyProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def _lose_this_one(self, name: bytes) -> bool:
        with self._lock:
            self.seen[name.decode()] += 1
            self._count += 1
            return self._count >= self.first and (self._count - self.first) % self.every == 0

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        except OSError:
            client_w.close()
            return
        sent = 0  # commands forwarded on this connection
        lose_reply: list[int] = []  # the index of the reply to lose, once one is chosen
        chosen = asyncio.Event()

        async def upstream() -> None:
            nonlocal sent
            buf = bytearray()
            in_multi = False  # a script inside MULTI is only QUEUED: its reply says nothing
            while not lose_reply and (chunk := await client_r.read(65536)):
                buf += chunk
                pos = 0
                while (end := resp_end(buf, pos)) > 0:
                    name = command_name(buf, pos)
                    sent += 1
                    committing = name == b"EXEC" or (name in TARGETS and not in_multi)
                    in_multi = (in_multi or name == b"MULTI") and name not in (b"EXEC", b"DISCARD")
                    if committing and self._lose_this_one(name):
                        lose_reply.append(sent)
                        self.dropped[name.decode()] += 1
                        redis_w.write(bytes(buf[:end]))  # this one runs; what follows never does
                        await redis_w.drain()
                        chosen.set()
                        return
                    pos = end
                if pos:
                    redis_w.write(bytes(buf[:pos]))
                    await redis_w.drain()
                    del buf[:pos]
            chosen.set()

        async def downstream() -> None:
            buf = bytearray()
            replied = 0
            while chunk := await redis_r.read(65536):
                buf += chunk
                pos = 0
                while (end := resp_end(buf, pos)) > 0:
                    replied += 1
                    if lose_reply and replied == lose_reply[0]:
                        client_w.write(bytes(buf[:pos]))  # the replies before it still arrive
                        await client_w.drain()
                        return
                    pos = end
                if pos:
                    client_w.write(bytes(buf[:pos]))
                    await client_w.drain()
                    del buf[:pos]

        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if lose_reply:  # wait for Redis's reply to the chosen command, then cut
                await chosen.wait()
                await tasks[1]
        for task in tasks:
            task.cancel()
        for writer in (client_w, redis_w):
            writer.close()
