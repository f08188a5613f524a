import type { CodegenConfig } from "@graphql-codegen/cli";

// Types come from the service's committed SDL and the operations this client sends.
const config: CodegenConfig = {
  schema: "../../schema.graphql",
  documents: "src/operations.graphql",
  generates: {
    "src/generated/graphql.ts": {
      plugins: ["typescript", "typescript-operations", "typed-document-node"],
      config: { scalars: { DateTime: "string" }, enumsAsTypes: true, useTypeImports: true },
    },
  },
};

export default config;
