// Bundles src/ into dist/: index.html and content-hashed files under dist/assets/. The hearth
// binary embeds dist/ (crates/hearth-server/src/ui.rs), so nothing is fetched from other hosts.
import * as esbuild from "esbuild";
import { rmSync, mkdirSync, writeFileSync } from "node:fs";
import { basename } from "node:path";

rmSync("dist", { recursive: true, force: true });
mkdirSync("dist/assets", { recursive: true });
const result = await esbuild.build({
  entryPoints: { app: "src/main.tsx" },
  bundle: true,
  minify: true,
  sourcemap: false,
  format: "esm",
  target: "es2022",
  outdir: "dist/assets",
  entryNames: "[name]-[hash]",
  assetNames: "[name]-[hash]",
  jsx: "automatic",
  jsxImportSource: "preact",
  metafile: true,
  logLevel: "warning",
});
const outputs = Object.keys(result.metafile.outputs).map((p) => basename(p));
const js = outputs.find((f) => f.endsWith(".js"));
const css = outputs.find((f) => f.endsWith(".css"));
writeFileSync(
  "dist/index.html",
  `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Hearth</title>
<link rel="stylesheet" href="/assets/${css}">
</head>
<body>
<div id="app"></div>
<script type="module" src="/assets/${js}"></script>
</body>
</html>
`,
);
console.log(`built dist/index.html, ${js}, ${css}`);
