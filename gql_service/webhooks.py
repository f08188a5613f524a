"""Webhooks: which URLs may be called, what is sent, how it is signed, and the call itself.

Used by the API (a `webhookUrl` is checked when it is submitted) and by the workers (the
delivery, gql_service.worker.deliveries). Signed per the Standard Webhooks specification with
its maintained implementation (`standardwebhooks`).

A URL is refused when its host resolves to an address that is not public (loopback,
private, link-local, the cloud metadata address, …), unless WEBHOOK_ALLOW_PRIVATE. The
check is made again at every delivery, and the request goes to the very address that was
checked (DNS could answer differently a moment later): the URL's host stays in the `Host`
header and, for https, in the TLS server name, so certificates are verified as usual.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import socket
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache

import httpx
from standardwebhooks import Webhook

from gql_service.models import JobRecord, JobStatus
from gql_service.rendering import as_json, job_view

log = logging.getLogger(__name__)

MAX_URL_CHARS = 2048
MAX_PORT = 65535
MAX_RESPONSE_BYTES = 1024  # of a receiver's answer, read for the error message and no more
USER_AGENT = "gql-service-webhooks"

EVENT_TYPES = {
    JobStatus.FINISHED: "job.finished",
    JobStatus.FAILED: "job.failed",
    JobStatus.CANCELED: "job.canceled",
}


# What a caller is told of every URL that can't be a webhook, whatever the reason: telling
# "does not resolve" from "resolves to a non-public address" answered, for any name, whether
# it exists in the service's internal DNS. The reason is logged for operators instead.
REFUSED = (
    "webhookUrl can't be called: it must be an http:// or https:// URL of at most 2,048 characters, "
    "without credentials, with a port from 1 to 65535 and a host that resolves to public addresses only"
)


class WebhookRefused(ValueError):
    """This URL may not be called. Its message is REFUSED, the same for every URL; `reason`
    says why, for the log."""

    def __init__(self, reason: str) -> None:
        super().__init__(REFUSED)
        self.reason = reason


@dataclass(frozen=True)
class Target:
    url: httpx.URL  # parsed as the request will be: no differential between check and call
    host: str  # ASCII (IDNA), no brackets: what is resolved
    port: int
    netloc: str  # for the Host header, as the URL has it

    @property
    def https(self) -> bool:
        return self.url.scheme == "https"


def parse_url(url: str) -> Target:
    """The URL's parts, or WebhookRefused: http(s), a host, no credentials."""
    if len(url) > MAX_URL_CHARS:
        raise WebhookRefused(f"longer than {MAX_URL_CHARS} characters")
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, TypeError) as exc:
        raise WebhookRefused(f"not a URL: {exc}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise WebhookRefused("not an http:// or https:// URL with a host")
    if parsed.userinfo:
        # The URL is shown by the API (Job.webhook.url): no credentials in it.
        raise WebhookRefused("holds credentials (receivers verify the signature instead)")
    port = parsed.port if parsed.port is not None else (443 if parsed.scheme == "https" else 80)
    if not 1 <= port <= MAX_PORT:  # httpx takes any number, 0 and 99999 among them
        raise WebhookRefused(f"port {port} is not 1 to {MAX_PORT}")
    return Target(url=parsed, host=host.strip("[]"), port=port, netloc=parsed.netloc.decode("ascii"))


# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64, RFC 6052 / 8215):
# such an address reaches whatever that IPv4 address does.
_NAT64 = (
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("64:ff9b:1::/48"),
    ipaddress.ip_network("::ffff:0:0:0/96"),  # IPv4-translated (SIIT)
)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]  # the client's address
    if any(ip in net for net in _NAT64) or (ip in _IPV4_COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not part of it
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:
            return False
        inner = _embedded_v4(ip)
        if inner is not None and not _public(str(inner)):
            return False
    return ip.is_global and not ip.is_multicast


async def addresses(target: Target, *, allow_private: bool) -> list[str]:
    """The addresses the host resolves to, every one of them public (or WebhookRefused)."""
    try:
        found = [str(ipaddress.ip_address(target.host))]  # a literal address: nothing to resolve
    except ValueError:
        found = await _resolve(target)
    if not allow_private and not all(_public(address) for address in found):
        raise WebhookRefused(
            f"host {target.host!r} resolves to an address that is not public (loopback, private, link-local or "
            f"reserved): {', '.join(found)}"
        )
    return found


async def _resolve(target: Target) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRefused(f"host {target.host!r} does not resolve ({exc})") from None
    found = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not found:
        raise WebhookRefused(f"host {target.host!r} does not resolve")
    return found


async def check(url: str, *, allow_private: bool) -> None:
    """Whether `url` may be given as a webhook now; raises WebhookRefused."""
    await addresses(parse_url(url), allow_private=allow_private)


# -- the event ----------------------------------------------------------------------------
def event_body(record: JobRecord) -> str:
    """The body of the event of a job's end: the same bytes at every attempt."""
    ended = record.finished_at or record.updated_at
    event = {"type": EVENT_TYPES[record.status], "timestamp": as_json(ended), "data": as_json(job_view(record))}
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


def message_id(job_id: str) -> str:
    """`webhook-id`: one event per job, the same at every attempt (receivers de-duplicate on it)."""
    return f"msg_{job_id}"


def signed_headers(secret: str, msg_id: str, body: str, *, now: datetime | None = None) -> dict[str, str]:
    moment = now or datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": Webhook(secret).sign(msg_id, moment, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }


# -- the call -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    delivered: bool
    status_code: int | None = None
    error: str | None = None
    # What failed, in a word a trace may hold (no URL, no receiver's text): `refused`,
    # `timeout` or the exception's class; None for an answer (its status code says it).
    error_type: str | None = None


@cache
def _tls() -> ssl.SSLContext:
    # Made once per process: building one loads the CA bundle (milliseconds).
    return ssl.create_default_context()


async def post(url: str, body: str, headers: dict[str, str], *, timeout_s: float, allow_private: bool) -> Outcome:
    """One attempt: checked addresses (each in turn, until one connects), no redirects, at
    most MAX_RESPONSE_BYTES of the answer read, the whole of it within `timeout_s`."""
    try:
        async with asyncio.timeout(timeout_s):
            target = parse_url(url)
            unreachable: httpx.TransportError | None = None
            for address in await addresses(target, allow_private=allow_private):
                try:
                    return await _post_to(address, target, body, headers, timeout_s=timeout_s)
                except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                    unreachable = exc  # the next address, if any (IPv6 and IPv4, say)
            assert unreachable is not None
            raise unreachable
    except WebhookRefused as exc:
        # The delivery's lastError is shown to the client: the same message as at submission.
        log.info("webhook to %s refused at delivery: %s", url[:MAX_ERROR_SHOWN], exc.reason)
        return Outcome(False, error=str(exc), error_type="refused")
    except TimeoutError:
        return Outcome(False, error=f"no answer within WEBHOOK_TIMEOUT_S ({timeout_s:g} s)", error_type="timeout")
    except httpx.HTTPError as exc:
        said = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return Outcome(False, error=said, error_type=type(exc).__name__)
    except Exception as exc:  # whatever else a URL or a peer can cause: an attempt that failed
        return Outcome(False, error=f"{type(exc).__name__}: {exc}"[:MAX_ERROR_SHOWN], error_type=type(exc).__name__)


MAX_ERROR_SHOWN = 200
CONNECT_TIMEOUT_S = 5.0


async def _post_to(address: str, target: Target, body: str, headers: dict[str, str], *, timeout_s: float) -> Outcome:
    pinned = target.url.copy_with(host=address)
    extensions = {"sni_hostname": target.host} if target.https else {}
    # The attempt's own deadline (in `post`) bounds it all; httpx's default would cut every
    # read at 5 s, whatever WEBHOOK_TIMEOUT_S says. A connect is cut sooner, so an address
    # that does not answer leaves time for the next one.
    timeout = httpx.Timeout(None, connect=min(CONNECT_TIMEOUT_S, timeout_s))
    async with (
        httpx.AsyncClient(verify=_tls(), follow_redirects=False, trust_env=False, timeout=timeout) as client,
        client.stream(
            "POST", pinned, content=body.encode(), headers={**headers, "host": target.netloc}, extensions=extensions
        ) as response,
    ):
        answer = b""
        async for chunk in response.aiter_raw():
            answer += chunk
            if len(answer) >= MAX_RESPONSE_BYTES:
                break
    if 200 <= response.status_code < 300:
        return Outcome(True, response.status_code)
    said = answer[:MAX_RESPONSE_BYTES].decode(errors="replace").strip()
    where = f" to {response.headers.get('location', '')[:MAX_ERROR_SHOWN]}" if response.is_redirect else ""
    error = f"HTTP {response.status_code}{where}" + (f": {said[:MAX_ERROR_SHOWN]}" if said else "")
    return Outcome(False, response.status_code, error)
