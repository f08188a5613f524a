"""Per-tenant bounds inside one API process."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, defaultdict
from collections.abc import Iterator

from gql_service.api.errors import RateLimited


class TenantSlots:
    """Per-tenant bounds inside one API process: live watched jobs, and snapshot reads at once.

    The read bound keeps one client's burst of snapshot reads (a reconnect resyncing
    thousands of subscriptions, hundreds of jobsUpdates at once) from holding every
    connection of the small command pool while others wait.
    """

    def __init__(self, *, max_watched: int, max_reads: int) -> None:
        self.max_watched = max_watched
        self.watched: Counter[str] = Counter()
        # Tenants are the API_KEYS' (or "public"): a fixed set, so these are never pruned.
        self._reads: defaultdict[str, asyncio.Semaphore] = defaultdict(lambda: asyncio.Semaphore(max_reads))

    @contextlib.contextmanager
    def watching(self, tenant: str, count: int) -> Iterator[None]:
        if self.watched[tenant] + count > self.max_watched:
            raise RateLimited(
                f"at most {self.max_watched} jobs can be watched at once; {self.watched[tenant]} are already"
            )
        self.watched[tenant] += count
        try:
            yield
        finally:
            self.watched[tenant] -= count

    def reading(self, tenant: str) -> asyncio.Semaphore:
        return self._reads[tenant]
