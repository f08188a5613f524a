"""The settings reference, from `gql_service.settings.Settings`: each field's name as its
environment variable, its default, the processes that read it (its `read_by` marker) and
its description (the docstring written under it, read from the source here: the service
never parses them)."""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from gql_service import settings as settings_module
from gql_service.settings import Settings

READ_BY = {"api": "API", "worker": "worker", "both": "API, worker", "all": "all", "dev": "dev"}

# "see Webhooks" in a description links to that page (paths from reference/settings.md).
SEE = {
    "Job history": "../operations/history.md",
    "Outboxes": "../operations/history.md#outboxes-poison-entries-dead-letters-bounds",
    "Webhooks": "../operations/webhooks.md",
    "Redis with Sentinel": "../operations/sentinel.md",
    "Priorities": "../operations/workers.md#priorities",
    "Worker classes": "../operations/workers.md",
    "Fallbacks and the circuit breaker": "../operations/providers.md#fallbacks-and-the-circuit-breaker",
    "Persisted queries and trusted documents": "../api/persisted-queries.md",
    "Budgets, cost and usage": "../api/budgets.md",
}

INTRO = """\
# Settings

Read once at start-up from the environment and from `.env` in the working directory. A bad
value stops start-up with one line per problem (`gql-service: bad setting: JOB_TIMEOUT_S: …`).
Each setting takes effect in the process that reads it ("read by"): on a multi-host
deployment set the LLM and retry settings on the worker hosts, the API limits on the API
hosts (`dev` passes its environment to both). "all" is every process and command that
touches Redis, "dev" `gql-service dev` alone.

Tracing is configured by the OpenTelemetry SDK's own variables (`OTEL_EXPORTER_OTLP_ENDPOINT`
and the others), read by the API and the workers: see [Tracing](../operations/tracing.md).
The client commands read `GQLS_URL` and `GQLS_API_KEY` ([command line](cli.md)).

This table is generated from the `Settings` model in `gql_service/settings.py` at every build:
a field's docstring is its meaning, its marker (`Annotated[int, WORKER]`) says who reads it.
"""


@dataclass(frozen=True)
class Setting:
    variable: str
    default: str
    read_by: str
    meaning: str


def docstrings() -> dict[str, str]:
    """Each field's docstring, as written under it in gql_service/settings.py."""
    tree = ast.parse(Path(settings_module.__file__).read_text())
    model = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == Settings.__name__)
    found = {}
    for field, after in zip(model.body, model.body[1:], strict=False):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            found[field.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return found


def shown(value: object) -> str:
    """A default as the environment would spell it."""
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"`{value}`"


def linked(meaning: str) -> str:
    def link(match: re.Match[str]) -> str:
        title = match.group(1)
        if title not in SEE:
            raise KeyError(f"a setting's description says 'see {title}': add the page to docsgen/settings_ref.py SEE")
        return f"see [{title}]({SEE[title]})"

    return re.sub(r"\bsee ([A-Z][^;)]*)", link, meaning)


def settings() -> list[Setting]:
    """Every field of Settings, in the model's order; a field without a docstring or a
    `read_by` marker is an error, so none can be left out of the reference."""
    docs = docstrings()
    rows = []
    for name, field in Settings.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if name not in docs or "read_by" not in extra:
            raise ValueError(f"Settings.{name} needs a docstring and a read_by marker (gql_service/settings.py)")
        default = shown(field.default)
        if note := extra.get("default_note"):
            default += f" ({note})"
        rows.append(Setting(name.upper(), default, READ_BY[str(extra["read_by"])], docs[name]))
    return rows


def page() -> str:
    lines = [INTRO, "| variable | default | read by | meaning |", "| --- | --- | --- | --- |"]
    for s in settings():
        cells = (f"`{s.variable}`", s.default, s.read_by, linked(s.meaning))
        if any("|" in cell for cell in cells):
            raise ValueError(f"{s.variable}: a '|' would split its table row")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
