"""Which LLM queue a worker looks at first: HIGH before NORMAL before LOW, with a share of
its takes kept for the lower ones so that they are never starved.

Every worker class (async, fork, simple) listens to the three priority queues and the
webhook queue, and RQ's dequeue looks at them in the worker's order (`_ordered_queues`).
After each job it takes, the worker reorders them with `order`: take number n (counted per
worker process) looks at LOW's queue first when n is a multiple of PRIORITY_SHARE_EVERY
(10), at NORMAL's first (then LOW's) when it is half-way between, and at HIGH's first
otherwise. So while HIGH jobs keep coming, one take in ten still goes to NORMAL and one to
LOW (two to whichever waits alone beside HIGH); with nothing waiting in the favoured queue,
the take goes on down the order as usual. A share of takes, not aging: a backlog of 10,000
old LOW jobs can never crowd HIGH out, and a LOW job's wait is bounded by its queue's
length over a tenth of the cluster's throughput. Deliveries come after every LLM queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from gql_service import keys

Q = TypeVar("Q")


def order(queues: Sequence[Q], names: Sequence[str], *, rq_queue: str, take: int, every: int) -> list[Q]:
    """`queues` (named `names`, as the worker was given them) in the order take number
    `take` looks at them. Queues other than RQ_QUEUE's three LLM queues keep their place
    after them; a worker without all three (a test's own queue) keeps its order."""
    tiers = keys.llm_queues(rq_queue)  # HIGH, NORMAL, LOW
    if not set(tiers) <= set(names):
        return list(queues)
    high, normal, low = tiers
    if take % every == 0:
        first = [low, normal, high]
    elif take % every == every // 2:
        first = [normal, low, high]
    else:
        first = [high, normal, low]
    by_name = dict(zip(names, queues, strict=True))
    return [by_name[name] for name in first] + [q for name, q in by_name.items() if name not in tiers]
