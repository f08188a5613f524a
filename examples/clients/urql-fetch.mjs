// urql with nothing but its fetchExchange: queries, mutations and, with
// `fetchSubscriptions: true`, subscriptions over HTTP too. Every request carries urql's own
// Accept header; a subscription's is `text/event-stream, multipart/mixed`, answered with
// Server-Sent Events.
//
//   node urql-fetch.mjs http://127.0.0.1:8000/graphql [API key]
import { Client, cacheExchange, fetchExchange, gql } from "@urql/core";

const [url, apiKey] = process.argv.slice(2);
const client = new Client({
  url,
  fetchSubscriptions: true,
  fetchOptions: { headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {} },
  exchanges: [cacheExchange, fetchExchange],
});

const submitted = await client
  .mutation(gql`mutation Submit($text: String!) { submitText(input: { text: $text }) { job { id status } } }`, {
    text: "The museum guide in Lisbon was wonderful.",
  })
  .toPromise();
if (submitted.error) throw submitted.error;
const { id } = submitted.data.submitText.job;
console.log(`mutation: ${submitted.data.submitText.job.status}`);

const stages = await new Promise((resolve, reject) => {
  const seen = [];
  // Not unsubscribed at DONE: the server ends the stream (urql's abort of a fetch still
  // reading rejects a promise nobody handles, in Node).
  client
    .subscription(gql`subscription Follow($id: ID!) { jobUpdates(id: $id) { id stage } }`, { id })
    .subscribe((result) => {
      if (result.error) return reject(result.error); // "[Network] No Content" when no event was parsed
      seen.push(result.data.jobUpdates.stage);
      if (seen.at(-1) === "DONE") resolve(seen);
    });
  setTimeout(() => reject(new Error(`no DONE after 30 s: ${seen}`)), 30_000).unref();
});
console.log(`subscription over fetch: ${stages.join(" ")}`);
