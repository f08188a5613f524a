from collections.abc import AsyncIterator
from typing import Any, Optional, Union

from .async_base_client import AsyncBaseClient
from .base_model import UNSET, UnsetType
from .get_job import GetJob
from .job_updates import JobUpdates
from .submit_text import SubmitText


def gql(q: str) -> str:
    return q


class Client(AsyncBaseClient):
    async def submit_text(
        self,
        text: str,
        idempotency_key: Union[Optional[str], UnsetType] = UNSET,
        **kwargs: Any,
    ) -> SubmitText:
        query = gql("""
            mutation SubmitText($text: String!, $idempotencyKey: String) {
              submitText(input: {text: $text, idempotencyKey: $idempotencyKey}) {
                deduplicated
                job {
                  id
                  status
                  stage
                  version
                  createdAt
                }
              }
            }
            """)
        variables: dict[str, object] = {"text": text, "idempotencyKey": idempotency_key}
        response = await self.execute(
            query=query, operation_name="SubmitText", variables=variables, **kwargs
        )
        data = self.get_data(response)
        return SubmitText.model_validate(data)

    async def get_job(self, id: str, **kwargs: Any) -> GetJob:
        query = gql("""
            query GetJob($id: ID!) {
              job(id: $id) {
                id
                status
                stage
                version
              }
            }
            """)
        variables: dict[str, object] = {"id": id}
        response = await self.execute(
            query=query, operation_name="GetJob", variables=variables, **kwargs
        )
        data = self.get_data(response)
        return GetJob.model_validate(data)

    async def job_updates(
        self, id: str, partial: Union[Optional[bool], UnsetType] = UNSET, **kwargs: Any
    ) -> AsyncIterator[JobUpdates]:
        query = gql("""
            subscription JobUpdates($id: ID!, $partial: Boolean = true) {
              jobUpdates(id: $id, partial: $partial) {
                id
                status
                stage
                version
                result {
                  summary
                  sentiment
                  tags
                  entities {
                    type
                    value
                    confidence
                  }
                  language
                  toxicityScore
                }
                error {
                  code
                  message
                  retryable
                }
                partial {
                  summary
                  tags
                }
                partialSeq
              }
            }
            """)
        variables: dict[str, object] = {"id": id, "partial": partial}
        async for data in self.execute_ws(
            query=query, operation_name="JobUpdates", variables=variables, **kwargs
        ):
            yield JobUpdates.model_validate(data)
