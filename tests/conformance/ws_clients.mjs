// The reference websocket clients against a live service, run by tests/test_ws_hostile.py:
// graphql-ws (graphql-transport-ws) and subscriptions-transport-ws (the legacy graphql-ws
// protocol). For each, on one socket: a subscription with a syntax error beside one that
// follows a job to its end; reports what reached each one's callbacks (the broken one's
// error must not take the healthy one down). Prints one JSON object.
import { createClient } from "graphql-ws";
import pkg from "subscriptions-transport-ws";
import WebSocket from "ws";

const { SubscriptionClient } = pkg;
const [url, jobId] = process.argv.slice(2);
const FOLLOW = `subscription { jobUpdates(id: "${jobId}") { status stage } }`;
const BROKEN = "subscription { jobUpdates(id: ";

function subscribe(start, query, jobField = "jobUpdates") {
  return new Promise((resolve) => {
    const seen = [];
    start(query, {
      next: (r) => seen.push(r.data ? r.data[jobField].status : { errors: r.errors }),
      error: (e) => resolve({ seen, error: errorOf(e) }),
      complete: () => resolve({ seen, completed: true }),
    });
  });
}

function errorOf(e) {
  if (Array.isArray(e)) return e.map((x) => x.message);
  return e.code ? { code: e.code, reason: e.reason } : String(e.message || e);
}

async function viaGraphqlWs() {
  const client = createClient({ url, webSocketImpl: WebSocket, retryAttempts: 0, lazy: true });
  const start = (query, sink) => client.subscribe({ query }, sink);
  const [broken, follow] = await Promise.all([subscribe(start, BROKEN), subscribe(start, FOLLOW)]);
  await client.dispose();
  return { broken, follow };
}

async function viaLegacy() {
  const client = new SubscriptionClient(url, { reconnect: false }, WebSocket);
  const start = (query, sink) => client.request({ query }).subscribe(sink);
  const [broken, follow] = await Promise.all([subscribe(start, BROKEN), subscribe(start, FOLLOW)]);
  client.close();
  return { broken, follow };
}

const result = { graphqlWs: await viaGraphqlWs(), legacy: await viaLegacy() };
console.log(JSON.stringify(result));
process.exit(0);
