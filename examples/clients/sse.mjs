// The graphql-sse client (GraphQL over Server-Sent Events, distinct connections mode)
// against gql-service: a subscription to a job's end. A stream the server drops is opened
// again (retryAttempts) and starts with the job's current state.
//
//   node sse.mjs http://127.0.0.1:8000/graphql [API key] [job id]   (no id: submit one first)
import { createClient } from "graphql-sse";

const [url, apiKey, given] = process.argv.slice(2);
const client = createClient({
  url,
  headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {},
  // About a minute of tries, a quarter second apart at first: long enough for an API
  // process to be restarted on a busy machine (11 s once, on CI).
  retryAttempts: 60,
  retry: (retries) => new Promise((resolve) => setTimeout(resolve, Math.min(250 * 2 ** retries, 1000))),
  on: { connected: (reconnected) => console.log(reconnected ? "reconnected" : "connected") },
});

let id = given;
if (!id) {
  // Queries and mutations go over SSE too, with this client.
  const submitted = await client.iterate({
    query: "mutation($text: String!) { submitText(input: { text: $text }) { job { id } } }",
    variables: { text: "The hotel room was clean but the breakfast was cold." },
  }).next();
  id = submitted.value.data.submitText.job.id;
}
for await (const result of client.iterate({
  query: "subscription($id: ID!) { jobUpdates(id: $id) { id status stage version } }",
  variables: { id },
})) {
  if (result.errors) throw new Error(JSON.stringify(result.errors));
  const job = result.data.jobUpdates;
  console.log(`next ${job.status} ${job.stage} v${job.version}`);
}
console.log("complete");
