"""Logging: readable lines, or one JSON object a line (LOG_FORMAT=json), each with the
request id of the job or request it is about, and, while tracing is on, the ids of the
current span (JSON's `trace_id` and `span_id`), which lead from a log line to its trace."""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

from gql_service import tracing

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get() or "-"
        ids = tracing.log_ids()
        if ids is not None:
            # Extra attributes: the JSON formatter writes them as fields, the text one not.
            record.trace_id, record.span_id = ids
        return True


def configure(log_format: str = "text", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter(JSON_FIELDS, rename_fields={"levelname": "level", "asctime": "time"}))
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # RQ and uvicorn add handlers of their own to loggers that have none; give them ours.
    # (Not uvicorn.access: uvicorn silences it unless --access-log, and a handler here
    # would switch per-request logging back on.)
    for name in ("rq.worker", "rq.scheduler", "rq.worker_pool", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.propagate = False
    # The HTTP clients' line for every request they send (the LLM SDK's transport: one a
    # job, beside the job's own lines), unless DEBUG asks for everything.
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING if root.getEffectiveLevel() > logging.DEBUG else logging.DEBUG)
