"""The edge (gql_service/api/edge.py): a connection that never sends a whole request head is
closed, and connections per API process are bounded, so idle sockets can't starve requests.
Real API processes, real sockets."""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import re
import resource
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from gql_service.api.edge import EdgeProtocol, allowed_connections, edge_limits

from .service import Service, wait_until

MAX_CONNECTIONS = 8


@pytest.fixture(scope="module")
def svc(e2e_redis: str) -> Iterator[Service]:
    """HEADER_TIMEOUT_S=1, and room for MAX_CONNECTIONS connections."""
    env = {"HEADER_TIMEOUT_S": "1", "MAX_CONNECTIONS": str(MAX_CONNECTIONS)}
    with Service(e2e_redis, workers=0, env=env) as service:
        yield service


def metric(service: Service, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{service.port}/metrics", timeout=30).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} is not in /metrics"
    return float(found.group(1))


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends, up to its close. The timeout only ends a hung test."""
    sock.settimeout(60)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:  # closed with our partial request unread: a reset, not a FIN
        pass
    return received


@pytest.mark.parametrize(
    "sent",
    [
        b"",  # nothing at all
        b"GET /healthz HTTP/1.1\r\n",  # the request line alone
        b"POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\n",  # one header line more, never the blank line
        b"GET /graphql HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n",  # half a websocket upgrade
    ],
    ids=["nothing", "request-line", "one-header-line", "half-an-upgrade"],
)
def test_a_connection_without_a_whole_head_is_closed_after_the_header_timeout(svc: Service, sent: bytes) -> None:
    before = metric(svc, 'gqls_connections_closed_total{reason="header_timeout"}')
    with socket.create_connection(("127.0.0.1", svc.port)) as sock:
        sock.sendall(sent)
        assert read_until_closed(sock) == b""
    assert metric(svc, 'gqls_connections_closed_total{reason="header_timeout"}') > before


def test_a_kept_alive_connection_has_the_header_timeout_for_its_next_request(svc: Service) -> None:
    with socket.create_connection(("127.0.0.1", svc.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answered = b""
        while b'{"status":"ok"}' not in answered:
            answered += sock.recv(65536)
        assert answered.startswith(b"HTTP/1.1 200 ")
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # uvicorn's keep-alive timer stops at the first byte
        assert read_until_closed(sock) == b""


def graphql_ws(service: Service, stack: contextlib.ExitStack) -> ClientConnection:
    """A graphql-transport-ws connection, initialised: busy, not waiting for a request head."""
    url, protocols = service.ws_url, ["graphql-transport-ws"]
    ws = stack.enter_context(connect(url, subprotocols=protocols, open_timeout=30))  # type: ignore[arg-type]
    ws.send(json.dumps({"type": "connection_init"}))
    assert json.loads(ws.recv(timeout=30))["type"] == "connection_ack"
    return ws


def healthz(service: Service) -> int:
    try:
        return httpx.get(f"http://127.0.0.1:{service.port}/healthz", timeout=30).status_code
    except httpx.HTTPError:
        return 0


def test_past_the_bound_with_every_connection_busy_a_new_one_is_answered_503(svc: Service) -> None:
    def settled() -> bool:  # the other tests' connections gone: only the scrape itself is open
        return metric(svc, 'gqls_connections{state="active"}') + metric(svc, 'gqls_connections{state="waiting"}') == 1

    wait_until(settled, timeout_s=30, what="the API's other connections to close")
    refused = metric(svc, "gqls_connections_refused_total")
    with contextlib.ExitStack() as stack:
        sockets = [graphql_ws(svc, stack) for _ in range(MAX_CONNECTIONS)]
        answer = httpx.get(f"http://127.0.0.1:{svc.port}/healthz", timeout=30)
        assert (answer.status_code, answer.text) == (503, "too many connections")
        # A subscription on a socket already open still works.
        sockets[0].send(json.dumps({"id": "1", "type": "subscribe", "payload": {"query": "{ __typename }"}}))
        assert json.loads(sockets[0].recv(timeout=30))["payload"] == {"data": {"__typename": "Query"}}
        sockets[-1].close()
        # One closed: room again, once the API has seen it go.
        wait_until(lambda: healthz(svc) == 200, timeout_s=30, what="/healthz to answer 200 again")
    assert metric(svc, "gqls_connections_refused_total") > refused
    assert metric(svc, "gqls_connections_max") == MAX_CONNECTIONS


# -- 20,000 idle or half-sent connections against an API with `ulimit -n 1024` -------------------
FLOOD = 20_000
FLOOD_FD_LIMIT = 1024  # the API process's: the old API stopped answering at about this many
FLOOD_MAX_CONNECTIONS = 200
HELD = 4000  # the attacker's sockets open at once (most of them closed by the API), the oldest closed beyond
WAVE = 100  # connections opened at a time
ROUNDS = 10  # the normal client's rounds (POST /graphql, GET /healthz, GET /metrics) during the flood, at least
GONE = select.POLLIN | select.POLLRDHUP | select.POLLHUP | select.POLLERR  # EOF or reset: the API closed it


class Attacker:
    """Opens FLOOD connections in waves from this process, holding the newest HELD: half of
    them send nothing, half the request line of a POST and never the rest.

    A wave goes once the API has closed all but MAX_CONNECTIONS of the earlier ones: the flood
    goes as fast as the API takes connections in, rather than piling up unaccepted in the
    kernel's listen queue, where a normal client's connection would wait behind it (or its
    request be dropped until resent) whatever the API does."""

    def __init__(self, port: int) -> None:
        self.address = ("127.0.0.1", port)
        self.held: deque[socket.socket] = deque()
        self.alive: dict[int, socket.socket] = {}  # not yet closed by the API, by descriptor
        self.poller = select.poll()
        self.opened = 0

    def wave(self) -> None:
        deadline = time.monotonic() + 60
        while len(self.alive) > FLOOD_MAX_CONNECTIONS:
            assert time.monotonic() < deadline, f"the API holds {len(self.alive)} of our connections, past its bound"
            self._watch(timeout_ms=1000)
        for n in range(WAVE):
            sock = socket.socket()
            sock.setblocking(False)
            code = sock.connect_ex(self.address)
            if code not in (0, errno.EINPROGRESS):
                sock.close()
                raise OSError(code, f"connect: {errno.errorcode.get(code)}")
            self.held.append(sock)
            self.alive[sock.fileno()] = sock
            self.opened += 1
            self.poller.register(sock, GONE | select.POLLOUT if n % 2 else GONE)  # POLLOUT: once connected
        self._watch(timeout_ms=0)
        while len(self.held) > HELD:
            self._close(self.held.popleft())

    def _watch(self, timeout_ms: int) -> None:
        for fd, events in self.poller.poll(timeout_ms):
            if events & GONE:
                self.poller.unregister(fd)
                del self.alive[fd]
            elif events & select.POLLOUT:  # connected: send the line, and nothing more ever
                self.poller.modify(fd, GONE)
                with contextlib.suppress(OSError):  # closed to make room meanwhile: what attackers see
                    self.alive[fd].send(b"POST /graphql HTTP/1.1\r\n")

    def _close(self, sock: socket.socket) -> None:
        if self.alive.pop(sock.fileno(), None) is not None:
            self.poller.unregister(sock)
        sock.close()

    def close(self) -> None:
        while self.held:
            self._close(self.held.popleft())


@pytest.fixture
def own_fd_limit() -> Iterator[None]:
    """This process holds HELD sockets at once: more than its usual 1024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = HELD + 1000
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors (ulimit -Hn is {hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_20000_idle_or_half_sent_connections_and_a_normal_clients_requests_keep_being_answered(
    e2e_redis: str, own_fd_limit: None
) -> None:
    env = {"MAX_CONNECTIONS": str(FLOOD_MAX_CONNECTIONS)}
    with Service(e2e_redis, workers=0, env=env, api_fd_limit=FLOOD_FD_LIMIT) as api:
        answers: list[tuple[str, int]] = []
        failures: list[BaseException] = []
        most_open = 0.0
        flooding = threading.Event()
        flooding.set()

        def normal_client() -> None:
            nonlocal most_open
            base = f"http://127.0.0.1:{api.port}"
            submit = {"query": "mutation($t: String!) { submitText(input: {text: $t}) { job { id } } }"}
            # A new connection for every request: each must be accepted through the flood.
            with httpx.Client(timeout=60, limits=httpx.Limits(max_keepalive_connections=0)) as client:
                while flooding.is_set():
                    answer = client.post(api.http_url, json=submit | {"variables": {"t": f"Request {len(answers)}."}})
                    answers.append(("POST /graphql", answer.status_code))
                    answers.append(("GET /healthz", client.get(f"{base}/healthz").status_code))
                    metrics = client.get(f"{base}/metrics")
                    answers.append(("GET /metrics", metrics.status_code))
                    states = re.findall(r'^gqls_connections\{state="\w+"\} (\S+)$', metrics.text, re.MULTILINE)
                    most_open = max(most_open, sum(float(n) for n in states))

        def run_client() -> None:
            try:
                normal_client()
            except BaseException as exc:  # reported by the test, not lost in the thread
                failures.append(exc)

        attacker = Attacker(api.port)
        client = threading.Thread(target=run_client, name="normal-client")
        client.start()
        try:
            # At least FLOOD connections, and at least ROUNDS of the normal client's requests meanwhile.
            while (attacker.opened < FLOOD or len(answers) < 3 * ROUNDS) and client.is_alive():
                attacker.wave()
        finally:
            flooding.clear()
            client.join(120)
            attacker.close()
        assert not failures, f"the normal client failed: {failures[0]!r}; answers before: {answers[-3:]}"
        assert attacker.opened >= FLOOD and len(answers) >= 3 * ROUNDS
        assert all(status == 200 for _, status in answers), answers
        # The API never held more than its bound, and counted what it closed.
        assert 0 < most_open <= FLOOD_MAX_CONNECTIONS
        closed = metric(api, 'gqls_connections_closed_total{reason="evicted"}') + metric(
            api, 'gqls_connections_closed_total{reason="header_timeout"}'
        )
        assert closed >= FLOOD - HELD
        assert metric(api, "gqls_connections_refused_total") >= 0  # shown, whatever its value
        assert metric(api, "gqls_connections_max") == FLOOD_MAX_CONNECTIONS


# -- what the module relies on ------------------------------------------------------------------
def test_uvicorn_would_pick_the_same_protocol_and_edge_protocol_keeps_its_hooks() -> None:
    from uvicorn.protocols.http.auto import AutoHTTPProtocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    assert AutoHTTPProtocol is HttpToolsProtocol  # httptools installed: what `http="auto"` runs
    assert issubclass(EdgeProtocol, HttpToolsProtocol)
    for hook in ("connection_made", "connection_lost", "on_headers_complete", "on_response_complete"):
        assert callable(getattr(HttpToolsProtocol, hook))
    # on_response_complete arms this attribute when the connection goes idle for the next request.
    armed = "self.timeout_keep_alive_task = self.loop.call_later("
    assert armed in inspect.getsource(HttpToolsProtocol.on_response_complete)


def test_the_default_bound_leaves_room_under_the_file_limit() -> None:
    assert allowed_connections(1024) == 768
    assert allowed_connections(65536) == 57216
    assert allowed_connections(100) == 50
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert edge_limits(10, None).max_connections == allowed_connections(soft)
    assert edge_limits(10, 5).max_connections == 5
    assert edge_limits(10, 10**9).max_connections == allowed_connections(soft)  # lowered to what fits
