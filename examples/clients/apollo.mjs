// Apollo Client with nothing but HttpLink (no websocket link): queries and mutations as
// usual, and a subscription over multipart HTTP, as Apollo Client speaks it out of the box.
//
//   node apollo.mjs http://127.0.0.1:8000/graphql [API key]
import { ApolloClient, HttpLink, InMemoryCache, gql } from "@apollo/client";

const [url, apiKey] = process.argv.slice(2);
const client = new ApolloClient({
  link: new HttpLink({ uri: url, headers: apiKey ? { Authorization: `Bearer ${apiKey}` } : {} }),
  cache: new InMemoryCache(),
});

const { data } = await client.mutate({
  mutation: gql`mutation Submit($text: String!) { submitText(input: { text: $text }) { job { id status } } }`,
  variables: { text: "Fast delivery and a friendly courier from Acme Logistics." },
});
const { id } = data.submitText.job;

const stages = await new Promise((resolve, reject) => {
  const seen = [];
  const subscription = client
    .subscribe({ query: gql`subscription Follow($id: ID!) { jobUpdates(id: $id) { id stage } }`, variables: { id } })
    .subscribe({
      next: ({ data, error }) => {
        if (error) return reject(error);
        seen.push(data.jobUpdates.stage);
      },
      error: reject,
      complete: () => resolve(seen),
    });
  setTimeout(() => { subscription.unsubscribe(); reject(new Error(`no end after 30 s: ${seen}`)); }, 30_000).unref();
});
console.log(`subscription over multipart HTTP: ${stages.join(" ")}`);

const job = await client.query({ query: gql`query Job($id: ID!) { job(id: $id) { id status } }`, variables: { id } });
console.log(`query: ${job.data.job.status}`);
