// The reference websocket clients against a live service, run by tests/test_ws_hostile.py:
// graphql-ws (graphql-transport-ws) and subscriptions-transport-ws (the legacy graphql-ws
// protocol). For each: follow a job to its end, then send a subscription with a syntax
// error and report what reached the client's error callback. Prints one JSON object.
import { createClient } from "graphql-ws";
import pkg from "subscriptions-transport-ws";
import WebSocket from "ws";

const { SubscriptionClient } = pkg;
const [url, jobId] = process.argv.slice(2);
const FOLLOW = `subscription { jobUpdates(id: "${jobId}") { status stage } }`;
const BROKEN = "subscription { jobUpdates(id: ";

function viaGraphqlWs(query) {
  return new Promise((resolve) => {
    const client = createClient({ url, webSocketImpl: WebSocket, retryAttempts: 0, lazy: true });
    const seen = [];
    client.subscribe(
      { query },
      {
        next: (r) => seen.push(r.data ? r.data.jobUpdates.status : { errors: r.errors }),
        error: (e) => { client.dispose(); resolve({ seen, error: e.code ? { code: e.code, reason: e.reason } : String(e) }); },
        complete: () => { client.dispose(); resolve({ seen, completed: true }); },
      },
    );
  });
}

function viaLegacy(query) {
  return new Promise((resolve) => {
    const client = new SubscriptionClient(url, { reconnect: false }, WebSocket);
    const seen = [];
    client.request({ query }).subscribe({
      next: (r) => seen.push(r.data ? r.data.jobUpdates.status : { errors: r.errors }),
      error: (e) => { client.close(); resolve({ seen, error: Array.isArray(e) ? e.map((x) => x.message) : String(e.message || e) }); },
      complete: () => { client.close(); resolve({ seen, completed: true }); },
    });
  });
}

const result = {
  graphqlWs: { follow: await viaGraphqlWs(FOLLOW), broken: await viaGraphqlWs(BROKEN) },
  legacy: { follow: await viaLegacy(FOLLOW), broken: await viaLegacy(BROKEN) },
};
console.log(JSON.stringify(result));
process.exit(0);
