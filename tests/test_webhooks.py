"""Webhooks: signed events of a job's end, retried until delivered, to a real receiver that
verifies every request with the `standardwebhooks` library; real uvicorn and RQ worker
processes, and the addresses a webhook may not reach."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest
from redis import Redis
from rq import Retry
from rq.exceptions import AbandonedJobError
from rq.job import Job as RQJob
from standardwebhooks import Webhook, WebhookVerificationError

from gql_service import delivery_store, keys, store, webhooks
from gql_service.api.schema import Context, schema
from gql_service.cli.embedded_redis import EmbeddedRedis
from gql_service.models import JobRecord, JobStage, JobStatus
from gql_service.settings import Settings
from gql_service.worker import deliveries

from .browser import Browser
from .clients import post
from .conftest import WEBHOOK_SECRET
from .service import Service, wait_until
from .test_schema import codes, run
from .webhook_receiver import HANG, HUGE, Receiver

SECRET = WEBHOOK_SECRET
ENV = {
    "WEBHOOK_SECRET": SECRET,
    "WEBHOOK_ALLOW_PRIVATE": "true",  # the receiver is on loopback
    "WEBHOOK_RETRY_BASE_S": "1",  # waits of about 1 s, then 5 s
    "WEBHOOK_MAX_ATTEMPTS": "3",
    "WEBHOOK_TIMEOUT_S": "2",
    "WEBHOOK_CONCURRENCY": "4",
    "WORKER_LOST_AFTER_S": "3",
    "ARCHIVE_CLAIM_AFTER_S": "2",  # the outbox's claim time, for the relay too
}
SUBMIT = """mutation($text: String!, $url: String) {
  submitText(input: {text: $text, webhookUrl: $url}) { job { id webhook { url status attempts } } }
}"""
JOB = """query($id: ID!) { job(id: $id) {
  id status stage version createdAt updatedAt startedAt finishedAt attempts model
  result { summary sentiment tags entities { type value confidence } language toxicityScore }
  error { code message retryable } usage { promptTokens completionTokens totalTokens } costUsd requestId traceId
  priority
  webhook { url status attempts lastStatusCode lastError nextAttemptAt deliveredAt }
} }"""
WEBHOOK_ONLY = "query($id: ID!) { job(id: $id) { status webhook { status attempts lastStatusCode lastError } } }"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    hooks = Receiver(SECRET).start()
    yield hooks
    hooks.stop()


@pytest.fixture(scope="module")
def svc() -> Iterator[Service]:
    with EmbeddedRedis() as redis, Service(redis.url, workers=1, env={**ENV, "RQ_QUEUE": "llm-hooks"}) as service:
        yield service


def submit(svc: Service, url: str, text: str = "The delivery came on time and the driver was friendly.") -> str:
    body = post(svc, SUBMIT, text=text, url=url).json()
    assert "errors" not in body, body
    job = body["data"]["submitText"]["job"]
    assert job["webhook"] == {"url": url, "status": "PENDING", "attempts": 0}
    return str(job["id"])


def job(svc: Service, job_id: str, query: str = JOB) -> dict[str, Any]:
    body = post(svc, query, id=job_id).json()
    assert "errors" not in body, body
    return dict(body["data"]["job"])


def webhook_ends(svc: Service, job_id: str, timeout_s: float = 30) -> dict[str, Any]:
    def ended() -> bool:
        return job(svc, job_id, WEBHOOK_ONLY)["webhook"]["status"] in ("DELIVERED", "FAILED")

    wait_until(ended, timeout_s=timeout_s, what="the webhook's delivery to end")
    return job(svc, job_id)


def test_a_finished_jobs_event_arrives_signed_with_the_job_as_graphql_renders_it(
    svc: Service, receiver: Receiver
) -> None:
    job_id = submit(svc, receiver.url("finished"))
    final = webhook_ends(svc, job_id)
    [got] = receiver.events("finished")
    assert got.error is None and got.event is not None  # verified with the secret
    assert got.event["type"] == "job.finished"
    assert got.event["timestamp"] == final["finishedAt"]
    expected = {k: v for k, v in final.items() if k != "webhook"}
    assert got.event["data"] == expected
    # Every field of the GraphQL Job type is in the event, but the delivery itself and
    # the interim frames' own fields (always null on a job read whole).
    job_type = schema._schema.type_map["Job"]
    assert set(got.event["data"]) == set(job_type.fields) - {"webhook", "partial", "partialSeq"}  # type: ignore[attr-defined]
    assert got.headers["webhook-id"] == f"msg_{job_id}"
    hook = final["webhook"]
    assert (hook["status"], hook["attempts"], hook["lastStatusCode"]) == ("DELIVERED", 1, 204)
    assert hook["deliveredAt"] is not None and hook["lastError"] is None and hook["nextAttemptAt"] is None


def test_a_tampered_body_fails_verification_at_the_receiver(svc: Service, receiver: Receiver) -> None:
    job_id = submit(svc, receiver.url("tamper"))
    webhook_ends(svc, job_id)
    [got] = receiver.events("tamper")
    tampered = got.body.replace(b'"job.finished"', b'"job.failed"')
    assert tampered != got.body
    Webhook(SECRET).verify(got.body, got.headers)  # the original still verifies
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, got.headers)
    with pytest.raises(WebhookVerificationError):  # and another secret never verifies it
        Webhook("whsec_" + base64.b64encode(b"another secret, not the service's").decode()).verify(
            got.body, got.headers
        )


def test_500_twice_then_200_is_delivered_at_the_third_attempt_under_one_webhook_id(
    svc: Service, receiver: Receiver
) -> None:
    receiver.script("flaky", 500, 500, 200)
    job_id = submit(svc, receiver.url("flaky"))
    # Between the second and third attempts (a wait of about 5 s) the API says so.
    wait_until(lambda: job(svc, job_id, WEBHOOK_ONLY)["webhook"]["attempts"] == 2, timeout_s=30, what="2 attempts")
    between = job(svc, job_id)["webhook"]
    assert (between["status"], between["lastStatusCode"]) == ("RETRYING", 500)
    assert between["lastError"].startswith("HTTP 500") and between["nextAttemptAt"] is not None
    final = webhook_ends(svc, job_id)["webhook"]
    assert (final["status"], final["attempts"], final["lastStatusCode"]) == ("DELIVERED", 3, 200)
    got = receiver.events("flaky")
    assert len(got) == 3 and all(g.error is None for g in got)
    assert {g.headers["webhook-id"] for g in got} == {f"msg_{job_id}"}
    assert len({g.body for g in got}) == 1  # the same event each time
    metrics = httpx.get(f"http://127.0.0.1:{svc.port}/metrics").text
    assert _sample(metrics, 'gqls_webhook_attempts_total{outcome="RETRYING"}') >= 2
    assert _sample(metrics, 'gqls_webhook_attempts_total{outcome="DELIVERED"}') >= 1
    assert _sample(metrics, "gqls_webhook_delivery_seconds_count") >= 1
    assert _sample(metrics, "gqls_webhook_outbox_depth") == 0  # every ended job's event was taken


def _sample(metrics: str, name: str) -> float:
    [line] = [line for line in metrics.splitlines() if line.startswith(name + " ")]
    return float(line.split()[-1])


def test_a_receiver_that_never_answers_fails_after_its_attempts_while_llm_jobs_keep_flowing(
    svc: Service, receiver: Receiver
) -> None:
    # Twelve deliveries that hang, over the worker's four delivery slots: every slot is
    # held for a while (3 attempts of 2 s each, per delivery).
    hung = [f"hang-{i}" for i in range(12)]
    for path in hung:
        receiver.script(path, HANG, HANG, HANG)
    hooked = [submit(svc, receiver.url(path)) for path in hung]
    wait_until(lambda: receiver.open_requests == 4, timeout_s=30, what="every delivery slot held")
    # Meanwhile, LLM jobs are taken and finish, beside the held slots.
    plain = [post(svc, SUBMIT, text=f"Plain job {i}, no webhook.").json() for i in range(20)]
    plain_ids = [p["data"]["submitText"]["job"]["id"] for p in plain]

    def all_finished() -> bool:
        return all(job(svc, i, WEBHOOK_ONLY)["status"] == "FINISHED" for i in plain_ids)

    try:
        wait_until(all_finished, timeout_s=30, what="the plain jobs to finish")
        # ... while the held deliveries had not ended (they take 3 attempts of 2 s, 4 at a time).
        states = [job(svc, job_id, WEBHOOK_ONLY)["webhook"]["status"] for job_id in hooked]
        assert "FAILED" not in states[-4:], states
        # Jobs dequeued from one queue alone (the other's slots full) left nothing in RQ's
        # intermediate list, which RQ's cleanup would otherwise fail and run again.
        redis = Redis.from_url(svc.env["REDIS_URL"])
        assert redis.llen("rq:queue:llm-hooks:intermediate") == 0
        redis.close()
        final = webhook_ends(svc, hooked[0], timeout_s=90)["webhook"]
        assert (final["status"], final["attempts"]) == ("FAILED", 3)
        assert final["lastStatusCode"] is None and "WEBHOOK_TIMEOUT_S" in final["lastError"]
        assert len(receiver.events(hung[0])) == 3
    finally:
        receiver.release()


def test_a_canceled_job_announces_itself_too(receiver: Receiver) -> None:
    # No worker yet: the job is still QUEUED when it is canceled (by the API, in the same
    # Lua step as any terminal transition); the worker started after delivers the event.
    with EmbeddedRedis() as redis_server, Service(redis_server.url, workers=0, env=ENV) as svc:
        # The webhook outbox, as a relay that ran against this Redis before left it: an
        # outbox is written only once something drains it (store.py).
        Redis.from_url(redis_server.url).xgroup_create(keys.WEBHOOK_OUTBOX, keys.WEBHOOKS.group, mkstream=True)
        job_id = submit(svc, receiver.url("canceled"))
        body = post(svc, "mutation($id: ID!) { cancelJob(id: $id) { status } }", id=job_id).json()
        assert body["data"]["cancelJob"]["status"] == "CANCELED"
        svc.start_worker(1)
        final = webhook_ends(svc, job_id)
    [got] = receiver.events("canceled")
    assert got.event is not None and got.event["type"] == "job.canceled"
    assert got.event["data"]["error"]["code"] == "CANCELED" and final["webhook"]["status"] == "DELIVERED"


async def test_the_transition_that_ends_a_job_queues_its_webhook_in_the_same_step(async_redis: Any) -> None:
    # As a relay starting makes it: transitions write only to an outbox that exists.
    await async_redis.xgroup_create(keys.WEBHOOK_OUTBOX, keys.WEBHOOKS.group, id="0", mkstream=True)
    record = JobRecord(id="hooked", webhook_url="https://example.com/hook")
    async with async_redis.pipeline(transaction=True) as pipe:
        store.create_job(pipe, record, text="t", ttl_s=60)
        await pipe.execute()

    def to(status: JobStatus, stage: JobStage) -> Any:
        return lambda job: job.model_copy(update={"status": status, "stage": stage})

    await store.update_job(async_redis, "hooked", to(JobStatus.STARTED, JobStage.CALLING_LLM), ttl_s=60)
    assert await async_redis.xlen(keys.WEBHOOK_OUTBOX) == 0  # not ended yet
    await store.update_job(async_redis, "hooked", to(JobStatus.FAILED, JobStage.FAILED), ttl_s=60)
    [(_, fields)] = await async_redis.xrange(keys.WEBHOOK_OUTBOX)
    assert store.decode(fields[b"d"]).status is JobStatus.FAILED
    plain = JobRecord(id="plain")
    async with async_redis.pipeline(transaction=True) as pipe:
        store.create_job(pipe, plain, text="t", ttl_s=60)
        await pipe.execute()
    await store.update_job(async_redis, "plain", to(JobStatus.FINISHED, JobStage.DONE), ttl_s=60)
    assert await async_redis.xlen(keys.WEBHOOK_OUTBOX) == 1  # a job without a webhook adds nothing


@pytest.mark.timeout(180)
def test_a_worker_sigkilled_right_after_the_terminal_transition_still_delivers(receiver: Receiver) -> None:
    # The receiver holds the first request, so nothing is delivered before the kill; the
    # worker is SIGKILLed the moment the job's FINISHED is published. Wherever the event
    # was then (outbox, relay, queue, mid-POST), the next worker delivers it. (Killed just
    # after the worker took the delivery off the queue and before it registered it, the
    # job waits in RQ's intermediate list, which RQ's cleanup requeues after a minute.)
    receiver.script("killed", HANG)
    with EmbeddedRedis() as redis_server, Service(redis_server.url, workers=0, env=ENV) as svc:
        doomed = svc.start_worker(1)
        wait_until(lambda: "started" in doomed.output().lower(), what="the worker")
        redis = Redis.from_url(redis_server.url)
        body = post(svc, SUBMIT, text="Killed right after it ended.", url=receiver.url("killed")).json()
        job_id = body["data"]["submitText"]["job"]["id"]
        events = redis.pubsub()
        events.subscribe(keys.job_events(job_id))
        while True:
            message = events.get_message(timeout=30)
            assert message is not None, "no FINISHED within 30 s"
            if message["type"] == "message" and store.decode(message["data"]).terminal:
                scheduler = psutil.Process(doomed.popen.pid).children()  # RQ's scheduler: kept (see below)
                os.kill(doomed.popen.pid, signal.SIGKILL)
                break
        doomed.popen.wait(10)
        held = len(receiver.events("killed"))
        svc.start_worker(1)
        final = webhook_ends(svc, job_id, timeout_s=120)["webhook"]
        got = receiver.events("killed")
        assert final["status"] == "DELIVERED" and got[-1].error is None and got[-1].event is not None
        assert got[-1].event["data"]["id"] == job_id
        print(f"\nkilled with {held} request(s) held at the receiver; delivered after {final['attempts']} attempt(s)")
        events.close()
        redis.close()
        # A worker's RQ scheduler is a child process that outlives a SIGKILLed worker (and
        # keeps scheduling retries, as it would in production); end it here.
        for child in scheduler:
            child.kill()


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/hook", "not public"),
        ("http://10.0.0.1/hook", "not public"),
        ("http://169.254.169.254/latest/meta-data/", "not public"),
        ("http://[::1]:8080/hook", "not public"),
        ("http://localhost/hook", "not public"),
        ("http://[::ffff:127.0.0.1]/hook", "not public"),
        ("http://0.0.0.0/hook", "not public"),
        ("http://does-not-exist.invalid/hook", "does not resolve"),
        ("ftp://example.com/hook", "not an http:// or https:// URL"),
        ("https:///nohost", "not an http:// or https:// URL"),
        ("not a url", "not an http:// or https:// URL"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https://example.com/" + "x" * 2100, "longer than"),
        # Ports httpx takes as they are: 99999 was accepted, then retried for hours.
        ("http://203.0.113.7:99999/hook", "port 99999 is not 1 to 65535"),
        ("http://203.0.113.7:65536/hook", "port 65536 is not 1 to 65535"),
        ("http://203.0.113.7:0/hook", "port 0 is not 1 to 65535"),
        ("http://203.0.113.7:-1/hook", "port -1 is not 1 to 65535"),
        ("http://203.0.113.7:http/hook", "Invalid port"),
    ],
)
async def test_an_unusable_webhook_url_gets_the_one_refusal_and_the_reason_is_logged(
    url: str, reason: str, context: Context, caplog: pytest.LogCaptureFixture
) -> None:
    """One message for every refusal: "does not resolve" beside "resolves to a non-public
    address" told a caller which names the service's internal DNS knows."""
    context.jobs.settings = _webhooks_on(context.jobs.settings, allow_private=False)
    with caplog.at_level("INFO", logger="gql_service.api.jobs"):
        result = await run(context, SUBMIT, text="hello", url=url)
    assert codes(result) == ["BAD_USER_INPUT"] and result.data is None
    assert result.errors[0].message == webhooks.REFUSED
    [logged] = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert reason in logged, logged


def test_a_port_in_range_is_taken() -> None:
    for port, url in ((1, "http://203.0.113.7:1/"), (65535, "https://203.0.113.7:65535/"), (443, "https://a.example/")):
        assert webhooks.parse_url(url).port == port


async def test_webhooks_are_refused_when_the_service_has_no_secret(context: Context, sync_redis: Redis) -> None:
    result = await run(context, SUBMIT, text="hello", url="https://example.com/hook")
    assert codes(result) == ["BAD_USER_INPUT"] and "WEBHOOK_SECRET" in result.errors[0].message
    assert sync_redis.dbsize() == 0  # nothing was queued


async def test_the_address_is_checked_again_at_delivery(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    # A URL accepted at submission (WEBHOOK_ALLOW_PRIVATE on the API, say, or a DNS answer
    # that changed since) is refused by the delivery itself: nothing reaches the receiver.
    # Its lastError, shown to the client, is the one refusal; the reason is in the log.
    with caplog.at_level("INFO", logger="gql_service.webhooks"):
        outcome = await webhooks.post(receiver.url("rechecked"), "{}", {}, timeout_s=2, allow_private=False)
    assert not outcome.delivered and outcome.error == webhooks.REFUSED
    assert any("not public" in r.getMessage() for r in caplog.records)
    assert receiver.events("rechecked") == []


async def test_the_request_goes_to_the_checked_address_with_the_urls_host(receiver: Receiver) -> None:
    # `localhost` resolves (to 127.0.0.1, perhaps ::1 first, where nothing listens: the next
    # address is tried); the Host header keeps the URL's own host and port.
    url = f"http://localhost:{receiver.port}/pinned?x=1"
    outcome = await webhooks.post(url, "{}", {"webhook-id": "msg_x"}, timeout_s=5, allow_private=True)
    assert outcome.delivered, outcome
    [got] = receiver.events("pinned")
    assert got.headers["host"] == f"localhost:{receiver.port}"


async def test_redirects_are_not_followed_and_answers_are_read_only_so_far(receiver: Receiver) -> None:
    receiver.script("moved", 302)
    moved = await webhooks.post(receiver.url("moved"), "{}", {}, timeout_s=5, allow_private=True)
    assert not moved.delivered and moved.status_code == 302
    assert moved.error == f"HTTP 302 to {receiver.url('redirected')}" and receiver.events("redirected") == []
    receiver.script("huge", HUGE)
    huge = await webhooks.post(receiver.url("huge"), "{}", {}, timeout_s=5, allow_private=True)
    assert not huge.delivered and huge.status_code == 500
    assert huge.error is not None and len(huge.error) < 250  # the first KiB read, 200 characters shown


def test_an_outbox_entry_that_cannot_be_read_does_not_stop_the_relay(svc: Service, receiver: Receiver) -> None:
    redis = Redis.from_url(svc.env["REDIS_URL"])
    redis.xadd(keys.WEBHOOK_OUTBOX, {"d": b"not a job record"})
    job_id = submit(svc, receiver.url("after-poison"))
    assert webhook_ends(svc, job_id)["webhook"]["status"] == "DELIVERED"
    wait_until(lambda: redis.xlen(keys.WEBHOOK_OUTBOX) == 0, what="the unreadable entry to be dead-lettered")
    [(_, letter)] = redis.xrange(keys.WEBHOOKS.dead)
    assert letter[b"d"] == b"not a job record" and letter[b"dead:reason"].startswith(b"not a job record")
    redis.close()


def test_the_secret_never_shows_in_settings_or_the_schema() -> None:
    settings = Settings(webhook_secret=SECRET, _env_file=None)  # type: ignore[call-arg]
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    assert "webhookSecret" not in schema.as_str()


def _webhooks_on(settings: Settings, *, allow_private: bool) -> Settings:
    return settings.model_copy(update={"webhook_secret": Settings(webhook_secret=SECRET).webhook_secret,
                                       "webhook_allow_private": allow_private})  # fmt: skip


async def test_the_console_submits_a_webhook_and_shows_its_delivery(svc: Service, receiver: Receiver) -> None:
    # Delivered at the third attempt: the wait before it (about 5 s) leaves RETRYING on show
    # for longer than the page's one-second reads.
    receiver.script("console", 503, 503)
    async with Browser() as browser:
        await browser.goto(f"http://127.0.0.1:{svc.port}/")
        await browser.evaluate(f"document.getElementById('webhook').value = {receiver.url('console')!r}")
        await browser.evaluate("document.getElementById('submit').click()")
        retrying = await browser.until(
            "document.querySelector('[data-testid=webhook]')?.textContent.includes('RETRYING') && "
            "document.querySelector('[data-testid=webhook]').textContent"
        )
        delivered = await browser.until(
            "document.querySelector('[data-testid=webhook]')?.textContent.includes('DELIVERED') && "
            "document.querySelector('[data-testid=webhook]').textContent"
        )
    assert "HTTP 503" in retrying and "next at" in retrying
    assert "after 3 attempts" in delivered and receiver.url("console") in delivered
    assert [r.error for r in receiver.events("console")] == [None, None, None]


def test_an_attempt_whose_worker_died_is_counted_and_the_last_one_fails(sync_redis: Redis) -> None:
    record = JobRecord(id="lost-hook", webhook_url="https://example.com/hook")
    pipe = sync_redis.pipeline()
    store.create_job(pipe, record, text="t", ttl_s=60)
    pipe.execute()
    rq_job = RQJob.create(keys.DELIVER_WEBHOOK, args=("lost-hook", "https://example.com/hook", "{}", 0.0),
                          connection=sync_redis, retry=Retry(max=1, interval=[30]))  # fmt: skip
    deliveries.on_failure(rq_job, sync_redis, AbandonedJobError, AbandonedJobError(), None)
    first = delivery_store.get_delivery_sync(sync_redis, "lost-hook")
    assert (first.status.value, first.attempts) == ("RETRYING", 1) and first.next_attempt_at is not None
    assert first.last_error == "the attempt did not finish (AbandonedJobError)"
    rq_job.retries_left = 0  # RQ's retry took the last one
    deliveries.on_failure(rq_job, sync_redis, AbandonedJobError, AbandonedJobError(), None)
    last = delivery_store.get_delivery_sync(sync_redis, "lost-hook")
    assert (last.status.value, last.attempts, last.next_attempt_at) == ("FAILED", 2, None)
    deliveries.on_failure(rq_job, sync_redis, deliveries.NotDeliveredYet, None, None)  # the attempt said it itself
    assert delivery_store.get_delivery_sync(sync_redis, "lost-hook") == last


@pytest.mark.parametrize("worker_class", ["fork", "simple"])
def test_rqs_own_worker_classes_deliver_too(worker_class: str, receiver: Receiver) -> None:
    env = {**ENV, "WORKER_CLASS": worker_class}
    with EmbeddedRedis() as redis_server, Service(redis_server.url, workers=1, env=env) as svc:
        job_id = submit(svc, receiver.url(f"by-{worker_class}"))
        final = webhook_ends(svc, job_id)["webhook"]
        redis = Redis.from_url(redis_server.url)
        intermediate = [key for key in redis.scan_iter("rq:queue:*:intermediate") if redis.llen(key)]
        redis.close()
    assert (final["status"], final["attempts"]) == ("DELIVERED", 1)
    [got] = receiver.events(f"by-{worker_class}")
    assert got.event is not None and got.event["data"]["id"] == job_id
    assert intermediate == []  # every dequeued job was taken out of RQ's intermediate list


async def test_a_receiver_slower_than_httpxs_default_timeout_is_delivered_within_webhook_timeout_s(
    receiver: Receiver,
) -> None:
    # WEBHOOK_TIMEOUT_S alone bounds an attempt: httpx's own default cut every read at 5 s.
    receiver.script("slow", HANG)
    asyncio.get_running_loop().call_later(5.5, receiver.release)  # the answer comes after 5.5 s
    outcome = await webhooks.post(receiver.url("slow"), "{}", {}, timeout_s=10, allow_private=True)
    assert outcome.delivered and outcome.status_code == 200, outcome


def test_no_retry_of_a_delivery_waits_longer_than_the_cap_and_they_span_about_17_hours() -> None:
    from gql_service.worker.deliveries import JITTER, MAX_WAIT_S, retry_waits

    settings = Settings(_env_file=None, webhook_secret=WEBHOOK_SECRET)  # type: ignore[call-arg]
    schedules = [retry_waits(settings) for _ in range(2000)]
    assert max(max(waits) for waits in schedules) <= MAX_WAIT_S
    spans_h = [sum(waits) / 3600 for waits in schedules]
    assert min(spans_h) > 16 and max(spans_h) < 19  # 7 waits from 5 s, ±20 %, the last at the cap: "about 17 hours"
    firsts = {waits[0] for waits in schedules}
    assert min(firsts) >= 5 * (1 - JITTER) - 1 and max(firsts) <= 5 * (1 + JITTER) + 1 and len(firsts) > 1
