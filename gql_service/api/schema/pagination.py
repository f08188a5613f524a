"""Paging: the opaque cursors the API gives out, and the bounds of a page."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Protocol

from strawberry.relay import PageInfo

from gql_service.api.errors import BadUserInput
from gql_service.api.ids import is_id

MAX_PAGE = 100
# A cursor is only ever sent back, but anything may be: what one holds is checked against
# what the API can have given out, so that no client's made-up cursor reaches Redis or
# PostgreSQL as a value they refuse (a position past int64, a time past year 9999, a NUL).
# A position within a batch: the largest integer a JSON client keeps exactly is far more
# than any batch holds, and far within what Redis's ranges take.
MAX_POSITION = 2**53 - 1
# A creation time in ms since the epoch: what PostgreSQL and Python's datetime can hold
# (with a margin, so that the float's rounding never crosses it).
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MAX_CREATED_MS = (datetime(9999, 1, 1, tzinfo=UTC) - _EPOCH) / timedelta(milliseconds=1)
NOT_A_CURSOR = "after is not a cursor this API gave out"


def page_size(first: int | None, *, default: int, most: int = MAX_PAGE) -> int:
    """`first` as asked (null: the default, as if it were left out), within 1 to `most`."""
    size = default if first is None else first
    if not 1 <= size <= most:
        raise BadUserInput(f"first must be 1 to {most}")
    return size


def _position_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"p|{position}".encode()).decode()


def _page(after: str | None) -> int:
    """The position a page starts at, from its `after` cursor."""
    if after is None:
        return 0
    kind, _, position = _decoded(after).partition("|")
    # ASCII digits only: int() would also take "+5", " 5", "1_0" and other scripts' digits.
    if kind == "p" and position.isascii() and position.isdigit() and int(position) <= MAX_POSITION:
        return int(position)
    raise BadUserInput(NOT_A_CURSOR)


def _decoded(cursor: str) -> str:
    try:
        return base64.urlsafe_b64decode(cursor.encode()).decode()
    except (ValueError, UnicodeError):  # binascii.Error is a ValueError
        raise BadUserInput(NOT_A_CURSOR) from None


def encode_cursor(created_ms: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_ms!r}|{job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    """(created ms, id) of a keyset cursor (`jobs`, `batches`)."""
    created, _, item_id = _decoded(cursor).partition("|")
    try:
        created_ms = float(created)
    except ValueError:
        created_ms = math.nan
    # NaN fails both comparisons.
    if not (0 <= created_ms <= MAX_CREATED_MS and is_id(item_id)):
        raise BadUserInput(NOT_A_CURSOR)
    return created_ms, item_id


class Edge(Protocol):
    cursor: str


def page_info(edges: Sequence[Edge], *, has_next: bool, has_previous: bool, end_cursor: str | None = None) -> PageInfo:
    """Relay's PageInfo of a forward page (first/after). `end_cursor` where the next page
    starts when that is not the last edge (a filtered page that ended early, a list read
    on as it grows)."""
    return PageInfo(
        has_next_page=has_next,
        has_previous_page=has_previous,
        start_cursor=edges[0].cursor if edges else None,
        end_cursor=end_cursor if end_cursor is not None else (edges[-1].cursor if edges else None),
    )
