// graphql-sse in single connection mode: one reserved event stream carries every
// operation. The client reserves it (PUT, answered with a token), opens it (GET with the
// token), sends each operation by POST with the token and an operation id (202; its results
// arrive on the stream, tagged with the id), and stops one by DELETE.
//
//   node sse-single.mjs http://127.0.0.1:8000/graphql [API key]
import { createClient } from "graphql-sse";

const [url, apiKey] = process.argv.slice(2);
const requests = [];
let deleted;
const stopConfirmed = new Promise((resolve) => (deleted = resolve));
const client = createClient({
  url,
  headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {},
  singleConnection: true,
  lazy: false, // the stream stays open between operations: every one of them shares it
  retryAttempts: 0,
  onNonLazyError: (error) => {
    console.error(error);
    process.exit(1);
  },
  // Every request the client makes, and its answer's status.
  fetchFn: async (input, init) => {
    const response = await fetch(input, init);
    requests.push(`${init.method} ${response.status}`);
    if (init.method === "DELETE") deleted();
    return response;
  },
});

const submitted = await client
  .iterate({
    query: "mutation($text: String!) { submitText(input: { text: $text }) { job { id } } }",
    variables: { text: "The night train was quiet and the staff were helpful." },
  })
  .next();
const { id } = submitted.value.data.submitText.job;
const follow = { query: "subscription($id: ID!) { jobUpdates(id: $id) { stage } }", variables: { id } };

// Two subscriptions at once on the one stream: one left after its first event (the client
// sends a DELETE), the other followed to the job's end.
const stopped = (async () => {
  for await (const result of client.iterate(follow)) return result.data.jobUpdates.stage;
})();
const stages = [];
for await (const result of client.iterate(follow)) {
  if (result.errors) throw new Error(JSON.stringify(result.errors));
  stages.push(result.data.jobUpdates.stage);
}
console.log(`subscription: ${stages.join(" ")}`);
console.log(`stopped after: ${await stopped}`);
await stopConfirmed;
client.dispose();
const counts = {};
for (const request of requests) counts[request] = (counts[request] ?? 0) + 1;
console.log(`requests: ${Object.keys(counts).sort().map((r) => (counts[r] > 1 ? `${r} x${counts[r]}` : r)).join(", ")}`);
