"""The worker side: RQ worker classes, the extraction task and pipeline, providers, outbox consumers."""
