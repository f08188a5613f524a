// Submit a text, then follow the job live until it ends; every value is typed from
// schema.graphql by GraphQL Code Generator.
//   node dist/client.js http://127.0.0.1:8000/graphql "Some text" [--ids]
// With --ids, every operation is sent by its id alone (`documentId: "sha256:<hash>"`, from
// the generated persisted-documents.json), as a service with TRUSTED_DOCUMENTS_ONLY needs.
import { print, type DocumentNode } from "graphql";
import { createClient, type SubscribePayload } from "graphql-ws";
import WebSocket from "ws";

import {
  JobUpdatesDocument,
  SubmitTextDocument,
  type JobUpdatesSubscription,
  type SubmitTextMutation,
  type SubmitTextMutationVariables,
} from "./generated/graphql.js";

type Job = JobUpdatesSubscription["jobUpdates"];

const byId = process.argv.includes("--ids");

/** The request's document: in full, or by the id GraphQL Code Generator gave it. */
function operation(document: DocumentNode, variables: Record<string, unknown>): SubscribePayload {
  if (!byId) return { query: print(document), variables };
  const { hash } = (document as DocumentNode & { __meta__: { hash: string } }).__meta__;
  // An empty `query` (graphql-ws requires a string there): the service looks the document
  // up by its id.
  return { query: "", documentId: `sha256:${hash}`, variables } as SubscribePayload;
}

async function submit(url: string, variables: SubmitTextMutationVariables): Promise<SubmitTextMutation> {
  const response = await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(operation(SubmitTextDocument, variables)),
  });
  const body = (await response.json()) as { data?: SubmitTextMutation; errors?: { message: string }[] };
  if (!body.data) throw new Error(body.errors?.map((e) => e.message).join("; ") ?? "no data");
  return body.data;
}

function follow(url: string, id: string): Promise<Job> {
  const client = createClient({ url: url.replace(/^http/, "ws"), webSocketImpl: WebSocket });
  return new Promise((resolve, reject) => {
    let last: Job | undefined;
    client.subscribe<JobUpdatesSubscription>(
      operation(JobUpdatesDocument, { id }),
      {
        next: ({ data }) => {
          if (!data) return;
          const job = data.jobUpdates;
          if (job.partial) {
            // An interim frame: the answer as far as the model has written it.
            console.log(`${job.id} v${job.version}.${job.partialSeq} writing: ${job.partial.summary ?? ""}`);
            return;
          }
          last = job;
          console.log(`${last.id} v${last.version} ${last.status} ${last.stage}`);
        },
        error: (error) => {
          void client.dispose();
          reject(error);
        },
        complete: () => {
          void client.dispose();
          if (last) resolve(last);
          else reject(new Error("completed without an update"));
        },
      },
    );
  });
}

const [url = "http://127.0.0.1:8000/graphql", text = "I loved the clinic. Dr. Rao was kind."] = process.argv
  .slice(2)
  .filter((arg) => arg !== "--ids");
const { submitText } = await submit(url, { text });
const job = await follow(url, submitText.job.id);
if (job.result) {
  const sentiment: "POSITIVE" | "NEUTRAL" | "NEGATIVE" = job.result.sentiment; // a typed enum
  console.log(JSON.stringify({ summary: job.result.summary, sentiment, tags: job.result.tags }));
}
process.exit(job.status === "FINISHED" ? 0 : 1);
