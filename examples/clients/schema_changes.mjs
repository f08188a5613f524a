// What changed between two versions of schema.graphql, as graphql-js judges it for the
// clients built against the first: breaking changes (a query that worked fails now) and
// dangerous ones (it works, but may behave differently).
//
//   node schema_changes.mjs old.graphql new.graphql
import { readFileSync } from "node:fs";
import { buildSchema, findBreakingChanges, findDangerousChanges } from "graphql";

const [before, after] = process.argv.slice(2, 4).map((path) => buildSchema(readFileSync(path, "utf8")));
console.log(
  JSON.stringify({ breaking: findBreakingChanges(before, after), dangerous: findDangerousChanges(before, after) }),
);
