"""Benchmarks for gql-service: `./scripts/bench` (or `python -m bench`) writes BENCHMARKS.md."""
