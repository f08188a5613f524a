import type { CodegenConfig } from "@graphql-codegen/cli";

// Types come from the service's committed SDL and the operations this client sends.
// GraphQL Code Generator's client preset: typed documents in src/generated/graphql.ts, and
// src/generated/persisted-documents.json, the manifest of every operation by its SHA-256
// (the service's TRUSTED_DOCUMENTS), so the client can send ids instead of documents.
const config: CodegenConfig = {
  schema: "../../schema.graphql",
  documents: "src/operations.graphql",
  emitLegacyCommonJSImports: false, // ES modules: imports name their .js files
  generates: {
    "src/generated/": {
      preset: "client",
      presetConfig: { fragmentMasking: false, persistedDocuments: { hashAlgorithm: "sha256" } },
      config: { scalars: { DateTime: "string", Date: "string" }, enumsAsTypes: true, useTypeImports: true },
    },
  },
};

export default config;
