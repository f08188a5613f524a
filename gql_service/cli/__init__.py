"""The `gql-service` command: running the service, a small client, embedded Redis, child processes."""
