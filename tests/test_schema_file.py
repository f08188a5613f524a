"""schema.graphql is generated from the code; this fails when the two drift apart."""

from pathlib import Path

from gql_service.api.schema import schema

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schema.graphql"


def test_schema_graphql_matches_the_code() -> None:
    assert SCHEMA_FILE.read_text() == schema.as_str() + "\n", (
        "schema.graphql is stale: run `gql-service export-schema > schema.graphql` and commit the result"
    )


def test_contract_core_is_present() -> None:
    sdl = SCHEMA_FILE.read_text()
    for line in (
        "submitText(input: SubmitTextInput!): SubmitTextPayload!",
        "job(id: ID!): Job",
        "jobUpdates(id: ID!, partial: Boolean! = false): Job!",
        "partial: PartialExtraction",
        "enum JobStatus {",
        "enum JobErrorCode {",
        "toxicityScore: Float!",
    ):
        assert line in sdl
