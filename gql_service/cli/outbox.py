"""`gql-service outbox`: each outbox's depth, pending entries and dead letters; `gql-service
outbox replay NAME` puts an outbox's dead letters back in it (once what killed them is fixed).

The outboxes and their consumer (gql_service.worker.outbox) are described there; this reads
and moves their streams, through a Redis client handed in.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gql_service import keys
from gql_service.settings import SettingsError, load_settings

if TYPE_CHECKING:
    from redis import Redis

EXIT_USAGE = 2
REPLAY_BATCH = 100
SHOWN_DEAD = 5  # the newest dead letters shown, with their reasons

# A batch of dead letters back into their outbox, in one step (two replays at once can't
# both move one): their own fields, without the `dead:` ones the drainer added.
_REPLAY_LUA = """
local entries = redis.call('XRANGE', KEYS[1], '-', ARGV[3], 'COUNT', ARGV[2])
local moved = 0
for _, entry in ipairs(entries) do
  local fields = {}
  for i = 1, #entry[2], 2 do
    if string.sub(entry[2][i], 1, 5) ~= 'dead:' then
      table.insert(fields, entry[2][i])
      table.insert(fields, entry[2][i + 1])
    end
  end
  if #fields > 0 then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', unpack(fields))
    moved = moved + 1
  end
  redis.call('XDEL', KEYS[1], entry[1])
end
return {#entries, moved}
"""


class NoConsumer(Exception):
    """The outbox has no consumer group: nothing would take what is put in it."""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _group(redis: Redis, outbox: keys.Outbox) -> dict[str, Any] | None:
    if not redis.exists(outbox.stream):
        return None
    groups: Any = redis.xinfo_groups(outbox.stream)
    return next((g for g in groups if _text(g["name"]) == outbox.group), None)


def status(redis: Redis) -> dict[str, dict[str, Any]]:
    """Every outbox: whether a drainer has started on it (else transitions write nothing to
    it), its depth, the entries taken and not yet done, its dead letters and the newest few."""
    report = {}
    for name, outbox in keys.OUTBOXES.items():
        group = _group(redis, outbox)
        newest: Any = redis.xrevrange(outbox.dead, count=SHOWN_DEAD)
        report[name] = {
            "stream": outbox.stream,
            "drained": group is not None,
            "depth": int(redis.xlen(outbox.stream)),
            "pending": int(group["pending"]) if group else 0,
            "consumers": int(group["consumers"]) if group else 0,
            "dead_letters": int(redis.xlen(outbox.dead)),
            "newest_dead": [
                {
                    "id": _text(dead_id),
                    "entry": _text(fields.get(b"dead:id", b"")),
                    "reason": _text(fields.get(b"dead:reason", b"")),
                }
                for dead_id, fields in newest
            ],
        }
    return report


def replay(redis: Redis, outbox: keys.Outbox, *, max_len: int) -> int:
    """Move every dead letter of `outbox` back into it; returns how many."""
    if _group(redis, outbox) is None:
        raise NoConsumer(f"no drainer has started on the {outbox.name} outbox: nothing would take its dead letters")
    script = redis.register_script(_REPLAY_LUA)
    # Only the dead letters there are now: an entry refused again while this runs (a
    # drainer is taking the replayed ones) waits for the next replay, never loops back in.
    newest: Any = redis.xrevrange(outbox.dead, count=1)
    if not newest:
        return 0
    last: bytes = newest[0][0]
    moved = 0
    while True:
        seen, done = script(keys=[outbox.dead, outbox.stream], args=[max_len, REPLAY_BATCH, last])
        moved += int(done)
        if not seen:
            return moved


def _print_table(report: dict[str, dict[str, Any]]) -> None:
    print(f"{'OUTBOX':<10} {'DEPTH':>8} {'PENDING':>8} {'DEAD':>8}  CONSUMERS")
    for name, box in report.items():
        consumers = str(box["consumers"]) if box["drained"] else "none (not drained: nothing is written to it)"
        print(f"{name:<10} {box['depth']:>8} {box['pending']:>8} {box['dead_letters']:>8}  {consumers}")
    for name, box in report.items():
        for dead in box["newest_dead"]:
            print(f"{name} dead letter {dead['id']} (entry {dead['entry']}): {dead['reason']}")


def run(args: argparse.Namespace) -> None:
    from redis.exceptions import RedisError

    from gql_service.redis_conn import sync_client

    try:
        settings = load_settings()
    except SettingsError as exc:
        raise _fail(f"bad setting: {str(exc).splitlines()[0]}") from None
    target = settings.redis_target
    try:
        with sync_client(target, timeout_s=settings.redis_timeout_s, max_connections=1) as redis:
            if args.action == "replay":
                moved = replay(redis, keys.OUTBOXES[args.name], max_len=settings.outbox_max_len)
                print(json.dumps({"replayed": moved}) if args.json else f"{args.name}: {moved} replayed")
            elif args.json:
                print(json.dumps(status(redis), indent=2))
            else:
                _print_table(status(redis))
    except NoConsumer as exc:
        raise _fail(str(exc)) from None
    except (RedisError, OSError) as exc:
        raise _fail(f"cannot reach Redis at {target} ({exc}); check REDIS_URL") from None


def _fail(message: str) -> SystemExit:
    print(f"gql-service: {message}", file=sys.stderr)
    return SystemExit(EXIT_USAGE)


def add_command(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """`gql-service outbox [--json]` and `gql-service outbox replay NAME`, on the main parser."""
    p = command("outbox", "show each outbox's depth, pending entries and dead letters (replay: put them back)")
    p.add_argument("--json", action="store_true", help="print as JSON")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    replaying = actions.add_parser("replay", help="move an outbox's dead letters back into it; prints how many")
    replaying.add_argument("name", choices=sorted(keys.OUTBOXES), metavar="NAME", help="archive or webhooks")
    replaying.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print as JSON")
    p.set_defaults(func=run)
    p.epilog = "exit codes: 0 ok, 2 bad input or settings, or Redis unreachable"
