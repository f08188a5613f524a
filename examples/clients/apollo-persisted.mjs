// Apollo Client with automatic persisted queries: PersistedQueryLink (hashes from
// node:crypto, GET for hashed queries) in front of HttpLink. Every operation is first sent
// by its hash alone; the service answers PERSISTED_QUERY_NOT_FOUND once, the link sends the
// document with its hash, and from then on the hash is enough. Prints what went over the
// wire, so the test can tell.
//
//   node apollo-persisted.mjs http://127.0.0.1:8000/graphql [API key]
import { createHash } from "node:crypto";
import { ApolloClient, HttpLink, InMemoryCache, gql } from "@apollo/client";
import { PersistedQueryLink } from "@apollo/client/link/persisted-queries";

const [url, apiKey] = process.argv.slice(2);
const sent = [];
async function recordingFetch(input, init = {}) {
  const method = init.method || "GET";
  const target = new URL(typeof input === "string" ? input : input.url);
  const body = method === "POST" ? JSON.parse(init.body) : Object.fromEntries(target.searchParams);
  const hashed = (body.extensions || "").toString().includes("sha256Hash") || !!body.extensions?.persistedQuery;
  sent.push(`${method}:${body.query ? "document" : "hash"}${hashed ? "+hash" : ""}`);
  return fetch(input, init);
}

const sha256 = (text) => createHash("sha256").update(text).digest("hex");
const client = new ApolloClient({
  link: new PersistedQueryLink({ sha256, useGETForHashedQueries: true }).concat(
    new HttpLink({ uri: url, fetch: recordingFetch, headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {} }),
  ),
  cache: new InMemoryCache(),
});

const SUBMIT = gql`mutation Submit($text: String!) { submitText(input: { text: $text }) { job { id status } } }`;
const JOB = gql`query Job($id: ID!) { job(id: $id) { id status } }`;
const FOLLOW = gql`subscription Follow($id: ID!) { jobUpdates(id: $id) { id stage } }`;

const { data } = await client.mutate({ mutation: SUBMIT, variables: { text: "Fast delivery from Acme Logistics." } });
const { id } = data.submitText.job;
console.log(`mutation: ${data.submitText.job.status}`);

const stages = await new Promise((resolve, reject) => {
  const seen = [];
  const subscription = client.subscribe({ query: FOLLOW, variables: { id } }).subscribe({
    next: ({ data, error }) => (error ? reject(error) : seen.push(data.jobUpdates.stage)),
    error: reject,
    complete: () => resolve(seen),
  });
  setTimeout(() => { subscription.unsubscribe(); reject(new Error(`no end after 30 s: ${seen}`)); }, 30_000).unref();
});
console.log(`subscription: ${stages.join(" ")}`);

for (const round of [1, 2]) {
  const job = await client.query({ query: JOB, variables: { id }, fetchPolicy: "network-only" });
  console.log(`query ${round}: ${job.data.job.status}`);
}
console.log(`sent: ${sent.join(" ")}`);
