"""OpenTelemetry tracing (gql_service/tracing.py), off unless the standard variables configure it."""

from __future__ import annotations

from gql_service import tracing


def test_off_unless_configured() -> None:
    assert not tracing.configured({})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"})
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert not tracing.configured({**on, "OTEL_SDK_DISABLED": "true"})
    assert not tracing.configured({**on, "OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.setup(tracing.API_SERVICE, environ={}) and not tracing.active()
    assert tracing.current_job_trace(link=False) is None and tracing.log_ids() is None
