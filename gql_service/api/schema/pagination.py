"""Paging: the opaque cursors the API gives out, and the bounds of a page."""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from typing import Protocol

from strawberry.relay import PageInfo

from gql_service.api.errors import BadUserInput

MAX_PAGE = 100


def _position_cursor(position: int) -> str:
    return base64.urlsafe_b64encode(f"p|{position}".encode()).decode()


def _page(first: int, after: str | None, *, most: int = MAX_PAGE) -> int:
    """The position a page of `first` starts at, from its `after` cursor."""
    if not 1 <= first <= most:
        raise BadUserInput(f"first must be 1 to {most}")
    if after is None:
        return 0
    try:
        kind, _, position = base64.urlsafe_b64decode(after.encode()).decode().partition("|")
        if kind == "p" and int(position) >= 0:
            return int(position)
    except (ValueError, UnicodeError):
        pass
    raise BadUserInput("after is not a cursor this API gave out")


def encode_cursor(created_ms: float, job_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_ms!r}|{job_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[float, str]:
    try:
        created, _, job_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
        position = float(created), job_id
    except (ValueError, UnicodeError):
        position = math.nan, ""
    if not math.isfinite(position[0]) or not position[1]:
        raise BadUserInput("after is not a cursor this API gave out")
    return position


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
