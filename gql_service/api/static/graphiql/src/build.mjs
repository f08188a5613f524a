// npm ci && npm run build: bundles playground.js with GraphiQL, React and graphql-ws into
// ../graphiql.js and ../graphiql.css (minified), and writes ../THIRD_PARTY_LICENSES.txt
// from the packages that ended up in the bundle. `node build.mjs <dir>` writes them there
// instead (the tests rebuild into a temporary folder and compare).
import { build } from "esbuild";
import { existsSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = resolve(process.argv[2] ?? join(here, ".."));

const result = await build({
  absWorkingDir: here, // metafile paths, read below, are relative to it
  entryPoints: { graphiql: join(here, "playground.js") },
  outdir: out,
  bundle: true,
  minify: true,
  format: "iife",
  target: ["es2020", "chrome100", "firefox100", "safari15"],
  define: { "process.env.NODE_ENV": '"production"' },
  // The page inlines the script and the stylesheet: fonts and icons come inside them.
  loader: { ".woff": "dataurl", ".woff2": "dataurl", ".ttf": "dataurl", ".png": "dataurl", ".svg": "dataurl" },
  legalComments: "none", // gathered, whole, in THIRD_PARTY_LICENSES.txt instead
  metafile: true,
  logLevel: "warning",
});

const packages = new Map();
for (const input of Object.keys(result.metafile.inputs)) {
  const match = input.match(/node_modules\/((?:@[^/]+\/)?[^/]+)\//);
  if (match) packages.set(match[1], join(here, input.slice(0, match.index + match[0].length)));
}
const notices = [...packages.entries()]
  .sort(([a], [b]) => a.localeCompare(b))
  .map(([name, dir]) => {
    const meta = JSON.parse(readFileSync(join(dir, "package.json"), "utf8"));
    const licenceFile = readdirSync(dir).find((f) => /^(licen[cs]e|copying)/i.test(f));
    const text = licenceFile && existsSync(join(dir, licenceFile)) ? readFileSync(join(dir, licenceFile), "utf8").trim() : "";
    return `${name}@${meta.version} (${meta.license})\n${"-".repeat(60)}\n${text || `Licence: ${meta.license}`}\n`;
  });
writeFileSync(
  join(out, "THIRD_PARTY_LICENSES.txt"),
  `Packages bundled into graphiql.js and graphiql.css (${packages.size}), with their licences.\n\n${notices.join("\n")}`,
);

// GraphiQL's stylesheet embeds its fonts for every script (Cyrillic, Greek, Vietnamese...):
// keep the Latin subsets, other characters fall back to the system's fonts (-250 KB).
const cssPath = join(out, "graphiql.css");
const css = readFileSync(cssPath, "utf8");
const latinOnly = css.replace(/@font-face\{[^}]*\}/g, (face) => (/unicode-range:U\+0000-00FF[,;}]/.test(face) ? face : ""));
if (!/@font-face/.test(latinOnly)) throw new Error("no @font-face left: GraphiQL's stylesheet has changed");
writeFileSync(cssPath, latinOnly);

// Inlined into the page: a closing tag inside the bundle would end the element early.
for (const [file, tag] of [["graphiql.js", "</script"], ["graphiql.css", "</style"]]) {
  if (readFileSync(join(out, file), "utf8").toLowerCase().includes(tag)) throw new Error(`${file} holds ${tag}`);
}
console.log([...packages.keys()].sort().join(" "));
