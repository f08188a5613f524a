// The graphql-http audit of the GraphQL over HTTP spec against a live server:
//   node audit.mjs http://127.0.0.1:8000/graphql
// Prints one JSON document: every result, with the failing response's status and body
// (read here, because a Response object does not survive JSON).
import { auditServer } from "graphql-http";

const url = process.argv[2];
if (!url) {
  console.error("usage: node audit.mjs <graphql url>");
  process.exit(2);
}

const results = await auditServer({ url });
const report = await Promise.all(
  results.map(async (result) => {
    if (result.status === "ok") return { id: result.id, name: result.name, status: "ok" };
    const { response } = result;
    return {
      id: result.id,
      name: result.name,
      status: result.status,
      reason: result.reason,
      response: {
        status: response.status,
        contentType: response.headers.get("content-type"),
        body: await response.text(),
      },
    };
  }),
);
console.log(JSON.stringify(report, null, 1));
