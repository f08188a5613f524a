"""The API side: the ASGI app, GraphQL schema and transports, and the API's job and batch services."""
