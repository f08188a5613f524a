// Relay against gql-service: relay-runtime with a network layer of fetch (queries and
// mutations) and graphql-ws (subscriptions), running what relay-compiler compiled from
// JobsApp.js against schema.graphql.
//
//   node relay/run.mjs http://127.0.0.1:8000/graphql [API key] [--ids]
import { createClient } from "graphql-ws";
import {
  Environment, Network, Observable, RecordSource, Store, ConnectionHandler, commitMutation, fetchQuery, requestSubscription,
} from "relay-runtime";
import WebSocket from "ws";

import JobsAppQuery from "./__generated__/JobsAppQuery.graphql.js";
import JobsAppPaginationQuery from "./__generated__/JobsAppPaginationQuery.graphql.js";
import JobsAppNodeQuery from "./__generated__/JobsAppNodeQuery.graphql.js";
import JobsAppSubmitMutation from "./__generated__/JobsAppSubmitMutation.graphql.js";
import JobsAppUpdatesSubscription from "./__generated__/JobsAppUpdatesSubscription.graphql.js";

const [url, apiKey] = process.argv.slice(2).filter((arg) => arg !== "--ids");
const auth = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
const ws = createClient({ url: url.replace(/^http/, "ws"), webSocketImpl: WebSocket, connectionParams: auth });

// relay-compiler persists every operation (relay.config.json's persistConfig): each artifact
// carries its document's id beside its text. With --ids, only the id is sent (`doc_id`), as a
// service with TRUSTED_DOCUMENTS set to relay/persisted-documents.json and
// TRUSTED_DOCUMENTS_REQUIRE_ID needs; without it, the text.
const byId = process.argv.includes("--ids");
const operationOf = (operation, variables) =>
  // graphql-ws insists on a string `query`: an empty one, with the id beside it.
  byId ? { query: "", doc_id: operation.id, variables } : { query: operation.text, variables };
const network = Network.create(
  async (operation, variables) => {
    const response = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json", ...auth },
      body: JSON.stringify(operationOf(operation, variables)),
    });
    return response.json();
  },
  (operation, variables) => Observable.create((sink) => ws.subscribe(operationOf(operation, variables), sink)),
);
const environment = new Environment({ network, store: new Store(new RecordSource()) });

const submit = (text) =>
  new Promise((resolve, reject) =>
    commitMutation(environment, {
      mutation: JobsAppSubmitMutation,
      variables: { text },
      onCompleted: (data, errors) => (errors ? reject(errors) : resolve(data.submitText.job)),
      onError: reject,
    }),
  );

// A job followed to its end over the subscription.
const job = await submit("The clinic was excellent and the staff were kind.");
const stages = await new Promise((resolve, reject) => {
  const seen = [];
  requestSubscription(environment, {
    subscription: JobsAppUpdatesSubscription,
    variables: { id: job.id },
    onNext: (data) => seen.push(data.jobUpdates.stage),
    onCompleted: () => resolve(seen),
    onError: reject,
  });
});
console.log(`subscription: ${stages.join(" ")}`);

// Refetched through node(id:): the store's record is the same object, now DONE.
const node = (await fetchQuery(environment, JobsAppNodeQuery, { id: job.id }).toPromise()).node;
console.log(`node: ${node.id === job.id} ${node.status} ${node.stage} ${node.result.sentiment}`);
const record = environment.getStore().getSource().get(job.id);
console.log(`store record: ${record.__typename} ${record.status}`);

// The list, two at a time, as usePaginationFragment loads it: the first page with the
// query, the next ones with the refetch query after the last cursor, merged by @connection.
for (let n = 0; n < 3; n++) await submit(`Text number ${n}: the delivery was late again.`);
await fetchQuery(environment, JobsAppQuery, {}).toPromise();
const connectionId = ConnectionHandler.getConnectionID("client:root", "JobsApp_jobs");
const edges = () => environment.getStore().getSource().get(connectionId).edges.__refs;
const pageInfo = () => environment.getStore().getSource().get(environment.getStore().getSource().get(connectionId).pageInfo.__ref);
const pages = [edges().length];
while (pageInfo().hasNextPage && pages.length < 10) {
  await fetchQuery(environment, JobsAppPaginationQuery, { count: 2, cursor: pageInfo().endCursor }).toPromise();
  pages.push(edges().length);
}
const ids = edges().map((ref) => environment.getStore().getSource().get(environment.getStore().getSource().get(ref).node.__ref).id);
console.log(`pages: ${pages.join(" ")}; ${new Set(ids).size} distinct jobs`);
await ws.dispose();
