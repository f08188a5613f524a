// meros, a strict multipart/mixed parser (RFC 2046), reading gql-service's multipart
// answers with nothing but `Accept: multipart/mixed;subscriptionSpec=1.0`: a mutation (one
// part) and a subscription to the job's end. Every part must be JSON: a missing opening
// delimiter loses the first part, an empty part before the close is not JSON.
//
//   node meros.mjs http://127.0.0.1:8000/graphql [API key]
import { request } from "node:http";
import { meros } from "meros/node";

const [url, apiKey] = process.argv.slice(2);
let parts = 0;

async function* payloads(query, variables) {
  const response = await new Promise((resolve, reject) => {
    const req = request(url, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        accept: "multipart/mixed;subscriptionSpec=1.0",
        ...(apiKey ? { authorization: `Bearer ${apiKey}` } : {}),
      },
    });
    req.on("response", resolve).on("error", reject);
    req.end(JSON.stringify({ query, variables }));
  });
  const read = await meros(response);
  if (read === response) throw new Error(`not multipart: ${response.headers["content-type"]}`);
  for await (const part of read) {
    parts += 1;
    if (!part.json) throw new Error(`part ${parts} is not JSON: ${JSON.stringify(String(part.body))}`);
    if ("payload" in part.body) yield part.body.payload; // {} is a heartbeat
  }
}

let id;
for await (const { data, errors } of payloads(
  "mutation($text: String!) { submitText(input: { text: $text }) { job { id } } }",
  { text: "The ferry to the island left on time and the crew were cheerful." },
)) {
  if (errors) throw new Error(JSON.stringify(errors));
  id = data.submitText.job.id;
}
const stages = [];
for await (const { data, errors } of payloads("subscription($id: ID!) { jobUpdates(id: $id) { stage } }", { id })) {
  if (errors) throw new Error(JSON.stringify(errors));
  stages.push(data.jobUpdates.stage);
}
console.log(`subscription: ${stages.join(" ")}`);
console.log(`every part JSON: ${parts}`);
