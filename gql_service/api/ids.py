"""What an id a client sends may look like, before it reaches Redis or PostgreSQL.

The service makes its ids itself (a job's is uuid hex, a batch's `batch_` and uuid hex);
an id is a name to look up, so anything of the same alphabet and a bounded length is
simply unknown (null, NOT_FOUND). Anything else is refused as BAD_USER_INPUT before a
read: PostgreSQL's text can't hold a NUL (the history read failed, and the client was told
SERVICE_UNAVAILABLE), and a 100 KB id would be echoed back in NOT_FOUND's message.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from gql_service.api.errors import BadUserInput

MAX_ID_CHARS = 128
# Printable ASCII without spaces: every id the service makes, and every test's made-up one.
_ID = re.compile(r"[!-~]{1,%d}" % MAX_ID_CHARS)
ID_RULE = f"ids are 1 to {MAX_ID_CHARS} printable ASCII characters without spaces"


def is_id(value: str) -> bool:
    return _ID.fullmatch(value) is not None


def check_ids(values: Iterable[str]) -> None:
    """BadUserInput unless every value could be an id the service made."""
    for value in values:
        if not is_id(value):
            raise BadUserInput(f"{value[:MAX_ID_CHARS]!r} is not an id this API gives out: {ID_RULE}")
