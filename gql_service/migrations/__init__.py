"""The PostgreSQL history's schema, as Alembic migrations (`gql-service migrate`)."""
