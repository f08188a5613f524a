// urql against gql-service: queries and mutations over HTTP (fetch), subscriptions through
// urql's subscriptionExchange over graphql-ws.
//
//   node urql.mjs http://127.0.0.1:8000/graphql [API key]
import { Client, cacheExchange, fetchExchange, gql, subscriptionExchange } from "@urql/core";
import { createClient as createWSClient } from "graphql-ws";
import WebSocket from "ws";

const [url, apiKey] = process.argv.slice(2);
const auth = apiKey ? { Authorization: `Bearer ${apiKey}` } : {};
const ws = createWSClient({ url: url.replace(/^http/, "ws"), webSocketImpl: WebSocket, connectionParams: auth });

const client = new Client({
  url,
  fetchOptions: { headers: auth },
  exchanges: [
    cacheExchange,
    fetchExchange,
    subscriptionExchange({
      forwardSubscription: (request) => ({
        subscribe: (sink) => ({ unsubscribe: ws.subscribe({ ...request, query: request.query ?? "" }, sink) }),
      }),
    }),
  ],
});

const submitted = await client
  .mutation(gql`mutation Submit($text: String!) { submitText(input: { text: $text }) { job { id status } } }`, {
    text: "Terrible support: nobody answered for a week.",
  })
  .toPromise();
if (submitted.error) throw submitted.error;
const { id } = submitted.data.submitText.job;
console.log(`mutation: ${submitted.data.submitText.job.status}`);

const stages = await new Promise((resolve, reject) => {
  const seen = [];
  client
    .subscription(gql`subscription Follow($id: ID!) { jobUpdates(id: $id) { id stage } }`, { id })
    .subscribe((result) => {
      if (result.error) reject(result.error);
      else seen.push(result.data.jobUpdates.stage);
      if (seen.at(-1) === "DONE") resolve(seen);
    });
});
console.log(`subscription: ${stages.join(" ")}`);

const job = await client
  .query(gql`query Job($id: ID!) { job(id: $id) { id status result { sentiment } } }`, { id })
  .toPromise();
console.log(`query: ${job.data.job.status} ${job.data.job.result.sentiment}`);
await ws.dispose();
