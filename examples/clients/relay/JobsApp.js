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

// A batch's jobs, the same way: Relay's convention for connection arguments is nullable
// (`first: Int`), so a count may be declared with or without a default; `Int!` with a
// default is refused by relay-compiler ("Non-nullable variable has a default value").
graphql`
  fragment JobsApp_batch on Batch
  @refetchable(queryName: "JobsAppBatchPaginationQuery")
  @argumentDefinitions(
    count: { type: "Int", defaultValue: 2 }
    cursor: { type: "String" }
    endedCount: { type: "Int" }
  ) {
    jobs(first: $count, after: $cursor) @connection(key: "JobsApp_batch_jobs") {
      edges {
        node {
          id
          status
        }
      }
    }
    endedJobs(first: $endedCount) {
      pageInfo {
        endCursor
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
