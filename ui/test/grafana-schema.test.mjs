// Type-checks every dashboard in dashboards/ against Grafana's own dashboard schema, as
// Grafana publishes it in @grafana/schema (the TypeScript types generated from its CUE
// kinds). Each dashboard becomes an object literal typed `Dashboard`, so the compiler
// reports missing required fields, wrong types and unknown keys. A copy with one key
// misspelled must fail, or the check proves nothing. Called by tests/prometheus_rules.rs:
//
//   node ui/test/grafana-schema.test.mjs DASHBOARD_DIR
import { readFileSync, readdirSync, writeFileSync, mkdirSync } from "node:fs";
import { spawnSync } from "node:child_process";
import path from "node:path";
import { fileURLToPath } from "node:url";

const ui = path.dirname(path.dirname(fileURLToPath(import.meta.url)));
const dir = process.argv[2];
const boards = readdirSync(dir).filter((f) => f.endsWith(".json")).sort();
if (!boards.length) {
  console.error(`no dashboards in ${dir}`);
  process.exit(1);
}
// inside ui/ so that the compiler finds ui/node_modules
const work = path.join(ui, "test", ".generated");
mkdirSync(work, { recursive: true });

function compile(name, sources) {
  const lines = ["import type { Dashboard } from '@grafana/schema';"];
  sources.forEach(([file, text], i) => lines.push(`// ${file}\nexport const board${i}: Dashboard = ${text};`));
  const file = path.join(work, name);
  writeFileSync(file, lines.join("\n") + "\n");
  const tsc = path.join(ui, "node_modules", "typescript", "bin", "tsc");
  const r = spawnSync(process.execPath, [tsc, "--noEmit", "--strict", "--target", "es2022",
    "--module", "nodenext", "--moduleResolution", "nodenext", file], { encoding: "utf8" });
  if (r.error) throw r.error;
  return { ok: r.status === 0, out: (r.stdout || "") + (r.stderr || "") };
}

const sources = boards.map((f) => [f, readFileSync(path.join(dir, f), "utf8")]);
const good = compile("dashboards.ts", sources);
console.log(good.ok ? `ok   ${boards.length} dashboards match Grafana's schema` : good.out);

const [file, text] = sources[0];
const broken = text.replace('"gridPos"', '"gridpos"');
const bad = compile("broken.ts", [[file, broken]]);
const caught = broken !== text && !bad.ok && bad.out.includes("gridpos");
console.log(caught ? "ok   a misspelled key is caught" : `FAIL a misspelled key passed:\n${bad.out}`);
process.exit(good.ok && caught ? 0 : 1);
