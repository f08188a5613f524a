// The app's GraphQL, as a Relay app declares it: relay-compiler reads these tags and writes
// the artifacts in __generated__/ (`npm run relay`), which relay/run.mjs executes. (Without
// Babel's Relay plugin the tags can't run: this file is read by the compiler, never imported.)
import { graphql } from "relay-runtime";

// A page of the tenant's jobs through a pagination fragment, as usePaginationFragment uses
// it: @connection merges the pages in the store, @refetchable makes the query that loads
// the next one (JobsAppPaginationQuery).
graphql`
  fragment JobsApp_jobs on Query
  @refetchable(queryName: "JobsAppPaginationQuery")
  @argumentDefinitions(count: { type: "Int", defaultValue: 2 }, cursor: { type: "String" }) {
    jobs(first: $count, after: $cursor) @connection(key: "JobsApp_jobs") {
      edges {
        node {
          id
          status
        }
      }
    }
  }
`;

graphql`
  query JobsAppQuery {
    ...JobsApp_jobs
  }
`;

// Refetch any object by its id (Relay's Node interface).
graphql`
  query JobsAppNodeQuery($id: ID!) {
    node(id: $id) {
      id
      ... on Job {
        status
        stage
        result {
          sentiment
        }
      }
    }
  }
`;

graphql`
  mutation JobsAppSubmitMutation($text: String!) {
    submitText(input: { text: $text }) {
      job {
        id
        status
      }
    }
  }
`;

graphql`
  subscription JobsAppUpdatesSubscription($id: ID!) {
    jobUpdates(id: $id) {
      id
      status
      stage
      version
    }
  }
`;
