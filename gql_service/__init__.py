"""gql-service: asynchronous, validated LLM extraction behind a live GraphQL API."""

__version__ = "0.1.0"
