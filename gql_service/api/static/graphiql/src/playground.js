// The GraphiQL playground served at /graphql, bundled with everything it needs (no CDN):
// HTTP for queries and mutations, graphql-transport-ws for subscriptions, and the
// Headers tab honoured by both (for a websocket, the headers go in connectionParams,
// where the service looks for `Authorization`).
import { createGraphiQLFetcher } from "@graphiql/toolkit";
import { GraphiQL } from "graphiql";
import "graphiql/graphiql.css";
import { createElement, useEffect, useState } from "react";
import { createRoot } from "react-dom/client";

const config = JSON.parse(document.getElementById("gqls-config")?.textContent || "{}");
const url = window.location.href.split(/[?#]/)[0];
const subscriptionUrl = url.replace(/^http/, "ws");

const DEFAULT_QUERY = `# gql-service playground. Run an operation with the ▶ button (or Ctrl-Enter in it).
#
# 1. Run "Submit": it queues a job and answers at once with the job's id,
#    which lands in the Variables tab below.
# 2. Run "Follow": the subscription streams every stage of that job until DONE.
#${config.apiKeys ? `
# This service needs an API key: set it in the Headers tab below,
#   {"Authorization": "Bearer <your key>"}
# Subscriptions send the same headers as the websocket's connectionParams.
#` : ""}
mutation Submit {
  submitText(input: {text: "Dr. Rao at Springfield General Hospital was wonderful: kind, quick and clear."}) {
    job { id status }
    deduplicated
  }
}

subscription Follow($id: ID!) {
  jobUpdates(id: $id) {
    version
    status
    stage
    result { summary sentiment tags language toxicityScore entities { type value confidence } }
    error { code message retryable }
  }
}
`;

const DEFAULT_HEADERS = config.apiKeys ? JSON.stringify({ Authorization: "Bearer " }, null, 2) : "";

// The id of a job just submitted goes into the Variables tab, ready for "Follow".
let onSubmitted = () => {};

const http = createGraphiQLFetcher({ url, subscriptionUrl, enableIncrementalDelivery: false });

async function fetcher(params, options) {
  const result = await http(params, options);
  const id = result?.data?.submitText?.job?.id;
  if (id) onSubmitted(id);
  return result;
}

function Playground() {
  const [variables, setVariables] = useState(JSON.stringify({ id: "" }, null, 2));
  useEffect(() => {
    onSubmitted = (id) => setVariables(JSON.stringify({ id }, null, 2));
  }, []);
  return createElement(GraphiQL, {
    fetcher,
    defaultQuery: DEFAULT_QUERY,
    defaultHeaders: DEFAULT_HEADERS,
    variables,
    onEditVariables: setVariables,
    defaultEditorToolsVisibility: config.apiKeys ? "headers" : "variables",
    isHeadersEditorEnabled: true,
    // An API key is a secret: it is not kept in the browser's storage.
    shouldPersistHeaders: false,
    inputValueDeprecation: true,
  });
}

createRoot(document.getElementById("graphiql")).render(createElement(Playground));
