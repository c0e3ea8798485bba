// Drives stacktap's graph UI in real headless Chromium (Debian's, through playwright-core)
// against a running stacktap. Called by tests/ui.rs, which starts `stacktap demo` and
// passes what the sample's processes recorded:
//
//   node ui/test/ui.test.mjs BASE_URL EXPECTED_JSON ARTIFACT_DIR
//
// EXPECTED_JSON: {nodes: [ids], edges: [[source, target]], roots: [{service, error, node}]}.
// Exits non-zero with the failed checks listed; screenshots go to ARTIFACT_DIR.
import { chromium } from "playwright-core";
import { readFileSync, mkdirSync } from "node:fs";
import path from "node:path";

const [base, expectedPath, artifacts] = process.argv.slice(2);
const expected = JSON.parse(readFileSync(expectedPath, "utf8"));
mkdirSync(artifacts, { recursive: true });
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

const failures = [];

/// A /api/graph report for `projects` projects of `size` services each: a user calls each
/// project's API over REST, the API calls the project's queue, its other services consume
/// it, and service s of project p calls the API of project p + s.
function bigGraph(projects, size) {
  const nodes = [{ id: "client:external", kind: "client", name: "external" }];
  const edges = [];
  const q = { count: 10, mean: 0.01, p50: 0.008, p95: 0.02, p99: 0.03, max: 0.05 };
  const edge = (source, target, protocol, type, operation, errors) => edges.push({
    source, target, protocol, type, operation, requests: 10, errors, timeouts: 0,
    error_ratio: errors / 10, rate_per_s: 1, latency_s: q,
  });
  for (let p = 0; p < projects; p++) {
    nodes.push({ id: `queue:p${p}`, kind: "queue", name: `p${p}` });
    for (let s = 0; s < size; s++) nodes.push({ id: `service:p${p}-svc${s}`, kind: "service", name: `p${p}-svc${s}` });
    edge("client:external", `service:p${p}-svc0`, "http", "http", "GET /v1/things", p % 5 === 0 ? 2 : 0);
    edge(`service:p${p}-svc0`, `queue:p${p}`, "rpc", "call", `p${p}.work`, 0);
    for (let s = 1; s < size; s++) {
      edge(`queue:p${p}`, `service:p${p}-svc${s}`, "rpc", "deliver", `p${p}.work`, 0);
      edge(`service:p${p}-svc${s}`, `service:p${(p + s) % projects}-svc0`, "http", "http", "POST /v1/things", 0);
    }
  }
  return { window_s: 60, requested_window_s: 60, max_window_s: 900, slot_s: 10, latest: 1.8e9, nodes, edges };
}
/// What a newcomer sees at `width`×`height`: the graph fills the canvas, node labels are
/// readable at the initial zoom, no two edge labels overlap, failing edges keep a label.
async function legibility(browser, width, height, shot) {
  const page = await browser.newPage({ viewport: { width, height } });
  page.on("crash", () => console.log(`FAIL the ${width}×${height} page crashed`));
  await page.goto(base + "/", { waitUntil: "load" });
  await page.waitForSelector("body[data-ready='1']", { timeout: 20000 });
  await page.waitForFunction(() => window.stacktap.cy.nodes().length > 0, null, { timeout: 20000 });
  await page.waitForTimeout(500);
  const got = await page.evaluate(() => {
    const { cy, colours, MIN_LABEL_PX } = window.stacktap;
    const bb = cy.elements().renderedBoundingBox();
    const labels = cy.edges().filter((e) => e.data("label")).map((e) => ({
      id: e.id(),
      b: e.renderedBoundingBox({ includeNodes: false, includeEdges: false, includeLabels: true, includeOverlays: false }),
    }));
    const overlaps = [];
    for (let i = 0; i < labels.length; i++) {
      for (let j = i + 1; j < labels.length; j++) {
        const a = labels[i].b, b = labels[j].b;
        if (a.x1 < b.x2 && b.x1 < a.x2 && a.y1 < b.y2 && b.y1 < a.y2) overlaps.push(`${labels[i].id} × ${labels[j].id}`);
      }
    }
    const nodePx = cy.nodes().map((n) => n.pstyle("font-size").pfValue * cy.zoom());
    return {
      W: cy.width(), H: cy.height(), bb, overlaps, minNodePx: Math.min(...nodePx), MIN_LABEL_PX,
      shown: labels.length, edges: cy.edges().length,
      unlabelledFailing: cy.edges().filter((e) => e.data("color") === colours.RED && !e.data("label")).map((e) => e.id()),
    };
  });
  const at = `${width}×${height}`;
  check(got.bb.w / got.W >= 0.75 && got.bb.h / got.H >= 0.6,
    `${at}: the graph fills the canvas (${(got.bb.w / got.W * 100).toFixed(0)} % × ${(got.bb.h / got.H * 100).toFixed(0)} % of ${got.W}×${got.H})`);
  check(got.minNodePx >= got.MIN_LABEL_PX, `${at}: node labels ≥ ${got.MIN_LABEL_PX} px at the initial zoom (smallest ${got.minNodePx.toFixed(1)} px)`);
  check(got.overlaps.length === 0, `${at}: no two edge labels overlap (${got.overlaps.slice(0, 5).join(", ")})`);
  check(got.shown > 0 && got.unlabelledFailing.length === 0, `${at}: ${got.shown} of ${got.edges} edges labelled, every failing one among them (missing: ${got.unlabelledFailing.join(", ")})`);
  await page.screenshot({ path: path.join(artifacts, shot) });
  await page.close();
}

/// axe-core (from npm, injected into the page): no serious or critical violation.
async function accessibility(page, what) {
  await page.addScriptTag({ path: path.join(path.dirname(new URL(import.meta.url).pathname), "..", "node_modules", "axe-core", "axe.min.js") });
  const result = await page.evaluate(async () => {
    const r = await window.axe.run(document, { resultTypes: ["violations"] });
    return r.violations.map((v) => ({ id: v.id, impact: v.impact, nodes: v.nodes.length, help: v.help,
      where: v.nodes.slice(0, 3).map((n) => `${n.target.join(" ")}: ${n.failureSummary.split("\n").slice(1, 2).join("")}`) }));
  });
  const bad = result.filter((v) => v.impact === "serious" || v.impact === "critical");
  check(bad.length === 0, `${what}: axe-core finds no serious violation (${bad.map((v) => `${v.id} ×${v.nodes}: ${v.help} [${v.where.join(" | ")}]`).join("; ")})`);
  for (const v of result.filter((x) => !bad.includes(x))) console.log(`     note: axe ${v.impact} ${v.id}: ${v.help}`);
}

function check(ok, what) {
  console.log(`${ok ? "ok  " : "FAIL"} ${what}`);
  if (!ok) failures.push(what);
}

const browser = await chromium.launch({
  executablePath,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
  const consoleErrors = [];
  page.on("crash", () => console.log("FAIL the main page's renderer crashed"));
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
  // the page must work offline: every request it makes goes to stacktap itself
  const foreign = [];
  page.on("request", (r) => { if (!r.url().startsWith(base)) foreign.push(r.url()); });

  await page.goto(base + "/", { waitUntil: "load" });
  await page.waitForSelector("body[data-ready='1']", { timeout: 20000 });
  await page.waitForFunction(() => window.stacktap.cy.nodes().length > 0, null, { timeout: 20000 });
  await page.waitForTimeout(500);

  // 1. the graph: the nodes and edges the processes' own records imply
  const drawn = await page.evaluate(() => ({
    nodes: window.stacktap.cy.nodes().map((n) => n.id()),
    edges: window.stacktap.cy.edges().map((e) => [e.source().id(), e.target().id(), e.data("style")]),
    labels: window.stacktap.cy.edges().map((e) => e.data("full")),
  }));
  for (const id of expected.nodes) check(drawn.nodes.includes(id), `node ${id} is drawn`);
  for (const [s, t] of expected.edges) {
    check(drawn.edges.some(([a, b]) => (s === "*" || a === s) && b === t), `edge ${s} → ${t} is drawn`);
  }
  check(drawn.nodes.some((id) => id.startsWith("client:")), "a user/client node is drawn");
  check(drawn.edges.some((e) => e[2] === "rest") && drawn.edges.some((e) => e[2] === "call"),
    "REST and RPC-call edges are both drawn (as different styles)");
  check(drawn.labels.every((l) => /\/s/.test(l)), "every edge's full label (hover, panel) has its rate");
  check(drawn.labels.some((l) => /p99/.test(l)) && drawn.labels.some((l) => /%/.test(l)),
    "edge labels carry error % and p99");
  // health colours: the failing edges red or amber, some healthy ones green
  const colours = await page.evaluate(() => window.stacktap.cy.edges().map((e) => e.data("color")));
  const palette = await page.evaluate(() => window.stacktap.colours);
  check(colours.includes(palette.RED) && colours.includes(palette.GREEN), "edges are coloured by health");
  const patterns = await page.evaluate(() => window.stacktap.cy.nodes().map((n) => [n.data("color"), n.pstyle("border-style").value]));
  check(patterns.every(([c, b]) => (c === palette.RED) === (b === "double")), "failing nodes are told by a double border, not by colour alone");

  // 2. live refresh: numbers change (the demo loops), positions do not
  const before = await page.evaluate(() => ({
    pos: Object.fromEntries(window.stacktap.cy.nodes().map((n) => [n.id(), n.position()])),
    labels: window.stacktap.cy.elements().map((e) => e.data("full") ?? e.data("label")).join("|"),
  }));
  let changed = false;
  for (let i = 0; i < 20 && !changed; i++) {
    await page.waitForTimeout(1000);
    changed = await page.evaluate((l) => window.stacktap.cy.elements().map((e) => e.data("full") ?? e.data("label")).join("|") !== l, before.labels);
  }
  check(changed, "labels change as the demo replays");
  const moved = await page.evaluate((pos) => window.stacktap.cy.nodes().filter((n) => {
    const p = pos[n.id()];
    return !p || Math.abs(p.x - n.position().x) > 0.5 || Math.abs(p.y - n.position().y) > 0.5;
  }).map((n) => n.id()), before.pos);
  check(moved.length === 0, `no node moved on refresh (moved: ${moved.join(", ")})`);
  await page.screenshot({ path: path.join(artifacts, "graph.png") });

  // 3. the root causes: each one's path highlighted, its root marked, its tree shown
  const roots = await page.$$eval("#roots li[data-i]", (lis) => lis.map((li) => li.textContent.replace(/\s+/g, " ").trim()));
  for (const want of expected.roots) {
    check(roots.some((r) => r.includes(want.service) && r.includes(want.error)), `root cause ${want.service} ${want.error} is listed`);
  }
  for (const want of expected.roots) {
    const i = roots.findIndex((r) => r.includes(want.service) && r.includes(want.error));
    if (i < 0) continue;
    await page.click(`#roots li[data-i='${i}']`);
    await page.waitForSelector("#panel .tree", { timeout: 5000 });
    await page.waitForTimeout(300);
    const hl = await page.evaluate(() => ({
      path: window.stacktap.cy.elements(".path").map((e) => e.id()),
      root: window.stacktap.cy.nodes(".root-cause").map((n) => n.id()),
      faded: window.stacktap.cy.elements(".faded").length,
      panel: document.getElementById("panel").innerText,
    }));
    check(hl.root.includes(want.node), `${want.error}: the root-cause node is ${want.node} (got ${hl.root.join(", ")})`);
    for (const n of want.path) check(hl.path.includes(n), `${want.error}: ${n} is on the highlighted path`);
    check(hl.path.some((id) => id.includes("->")), `${want.error}: edges on the path are highlighted`);
    check(hl.faded > 0, `${want.error}: the rest of the graph is dimmed`);
    check(hl.panel.includes("root cause") && hl.panel.includes(want.error), `${want.error}: the request tree is shown with its root cause`);
    if (want.screenshot) await page.screenshot({ path: path.join(artifacts, want.screenshot) });
  }

  await page.keyboard.press("Escape");
  check(await page.evaluate(() => window.stacktap.cy.elements(".path, .faded").length) === 0, "Escape clears the highlighted path");

  // 4. a node's side panel: operations, reply-wait split, timeouts, recent errors
  // (in braces: returning the collection emit() gives would have playwright serialise the
  // whole cytoscape graph, gigabytes, and the page would run out of memory)
  await page.evaluate(() => { window.stacktap.cy.getElementById("queue:compute").emit("tap"); });
  await page.waitForTimeout(300);
  const qpanel = await page.innerText("#panel");
  check(/get_console_output/.test(qpanel), "queue panel lists its methods");
  check(/Recent errors/.test(qpanel) && /MessagingTimeout|timeout/.test(qpanel), "queue panel shows the timeouts among recent errors");
  await page.evaluate(() => { window.stacktap.cy.getElementById("queue:scheduler").emit("tap"); });
  await page.waitForTimeout(300);
  check(/reply wait p99 split: queue .* server .* transit/.test(await page.innerText("#panel")),
    "an RPC call's reply wait is split into queue / server / transit");
  await page.screenshot({ path: path.join(artifacts, "panel.png") });

  // 5. focus on a k-hop neighbourhood, then the whole graph again
  const all = await page.evaluate(() => window.stacktap.cy.nodes().length);
  await page.fill("#search", "placement-api");
  await page.dispatchEvent("#search", "change");
  await page.selectOption("#hops", "1");
  await page.waitForTimeout(300);
  const focused = await page.evaluate(() => window.stacktap.cy.nodes().map((n) => n.id()));
  check(focused.includes("service:placement-api") && focused.length < all, `1-hop focus shows fewer nodes (${focused.length} of ${all})`);
  check(!focused.includes("queue:compute"), "1-hop focus on placement-api leaves queue:compute out");
  await page.click("#unfocus");
  await page.waitForTimeout(300);
  check(await page.evaluate(() => window.stacktap.cy.nodes().length) === all, "show all restores the graph");

  // 6. grouping by project and the time window
  await page.check("#group");
  await page.waitForTimeout(300);
  const grouped = await page.evaluate(() => window.stacktap.cy.nodes().map((n) => n.id()));
  check(grouped.includes("project:nova") && !grouped.includes("service:nova-api"), "grouping folds nova's processes into one node");
  await page.uncheck("#group");
  const options = await page.$$eval("#window option", (os) => os.map((o) => o.value));
  check(options.includes("60") && options.includes("all"), `window choices offered (${options.join(", ")})`);
  const resp = page.waitForResponse((r) => r.url().includes("/api/graph?window=all"));
  await page.selectOption("#window", "all");
  check((await resp).ok(), "choosing a window asks the API for it");

  // 7. zoomed far out, labels are hidden (cytoscape skips text under min-zoomed-font-size)
  const minFont = await page.evaluate(() => window.stacktap.cy.edges()[0].pstyle("min-zoomed-font-size").value);
  check(minFont > 0, "edge labels hide when zoomed out (min-zoomed-font-size set)");

  // 7b. legible at first sight, at two window sizes; accessible, also at 200 % zoom
  await legibility(browser, 1280, 720, "first-screen-1280x720.png");
  await legibility(browser, 2560, 1440, "first-screen-2560x1440.png");
  await accessibility(page, "first screen");
  await page.keyboard.press("Tab");
  const focusable = [];
  for (let i = 0; i < 40; i++) {
    focusable.push(await page.evaluate(() => document.activeElement?.id || document.activeElement?.tagName));
    await page.keyboard.press("Tab");
  }
  check(["window", "group", "search", "graph"].every((id) => focusable.includes(id)), `controls reachable by Tab (${[...new Set(focusable)].join(", ")})`);
  await page.focus("#graph");
  await page.keyboard.press("ArrowRight");
  await page.waitForTimeout(200);
  check(/handled/.test(await page.innerText("#panel")), "arrow keys on the graph open a node's panel");
  check(/<svg class="spark"/.test(await page.innerHTML("#panel")), "a node's panel shows its trends");
  await page.focus("#roots li[data-i] button.pick");
  await page.keyboard.press("Enter");
  await page.waitForSelector("#panel .tree", { timeout: 5000 });
  const tree = await page.innerText("#panel");
  check(/stacktap rca --from \S+ --request-id \S+/.test(tree) && /copy/.test(tree), "a request shows its id to copy and the rca command");
  await accessibility(page, "request panel");
  // with [ui] links configured (as /api/source reports them), the evidence is one click away
  const source = await (await page.request.get(base + "/api/source")).json();
  check(/demo/.test(source.what) && typeof source.drops === "number", `/api/source names the source (${source.what})`);
  check(/demo/.test(await page.innerText("#source")), "the header names the source");
  source.links = { trace_url: "https://tempo.example/trace/{trace_id}?r={request_id}", grafana_url: "https://grafana.example/d/stacktap-queues?var-queue={queue}" };
  await page.route("**/api/source", (r) => r.fulfill({ contentType: "application/json", body: JSON.stringify(source) }));
  await page.waitForTimeout(2500);
  await page.click("#roots li[data-i] button.pick");
  await page.waitForSelector("#panel .tree", { timeout: 5000 });
  const traceHref = await page.getAttribute("#panel .evidence a", "href");
  check(/^https:\/\/tempo\.example\/trace\/[0-9a-f]{32}\?r=/.test(traceHref || ""), `a request links to its trace (${traceHref})`);
  await page.evaluate(() => { window.stacktap.cy.getElementById("queue:compute").emit("tap"); });
  await page.waitForTimeout(300);
  const grafanaHref = await page.getAttribute("#panel a[href*='grafana.example']", "href");
  check(grafanaHref === "https://grafana.example/d/stacktap-queues?var-queue=compute", `a queue links to its Grafana dashboard (${grafanaHref})`);
  const qtext = await page.innerText("#panel");
  check(/Reply wait, split/.test(qtext), "a queue's panel shows its reply-wait histogram");
  check(/in flight/.test(qtext), "a queue's panel shows its calls in flight over time");
  await page.screenshot({ path: path.join(artifacts, "queue-panel.png") });
  await page.unroute("**/api/source");
  const zoomed = await browser.newPage({ viewport: { width: 640, height: 540 }, deviceScaleFactor: 2 });
  await zoomed.goto(base + "/", { waitUntil: "load" });
  await zoomed.waitForSelector("body[data-ready='1']", { timeout: 20000 });
  const layout = await zoomed.evaluate(() => ({ graph: document.getElementById("graph").getBoundingClientRect().width, scroll: document.documentElement.scrollWidth }));
  check(layout.graph >= 600 && layout.scroll <= 640, `at 200 % zoom (640 CSS px wide) the graph keeps the width (${layout.graph} px) without sideways scrolling`);
  await zoomed.screenshot({ path: path.join(artifacts, "zoom-200.png") });
  await zoomed.close();

  // 8. a big cloud: 240 services in 24 projects, each with a queue; the graph served to
  // this page is generated here (the UI's input contract, /api/graph), to see that
  // focus and grouping make it workable
  const big = await browser.newPage({ viewport: { width: 1920, height: 1080 } });
  big.on("pageerror", (e) => consoleErrors.push(String(e)));
  const report = bigGraph(24, 10);
  await big.route("**/api/graph*", (r) => r.fulfill({ contentType: "application/json", body: JSON.stringify(report) }));
  await big.goto(base + "/", { waitUntil: "load" });
  await big.waitForSelector("body[data-ready='1']", { timeout: 30000 });
  const opened = await big.evaluate(() => ({ nodes: window.stacktap.cy.nodes().length, grouped: document.getElementById("group").checked }));
  check(opened.grouped && opened.nodes <= 24 + 1, `big graph: opens grouped by project (${opened.nodes} nodes)`);
  await big.screenshot({ path: path.join(artifacts, "big-grouped.png") });
  await big.uncheck("#group");
  await big.waitForTimeout(300);
  const bigCount = await big.evaluate(() => ({ nodes: window.stacktap.cy.nodes().length, zoom: window.stacktap.cy.zoom() }));
  check(bigCount.nodes === report.nodes.length, `big graph: all ${report.nodes.length} nodes drawn ungrouped (${bigCount.nodes})`);
  check(bigCount.zoom < 0.45, `big graph: fitted zoom ${bigCount.zoom.toFixed(2)} is below where labels show`);
  await big.screenshot({ path: path.join(artifacts, "big.png") });
  await big.fill("#search", "p7-svc3");
  await big.dispatchEvent("#search", "change");
  await big.selectOption("#hops", "1");
  await big.waitForTimeout(300);
  const near = await big.evaluate(() => window.stacktap.cy.nodes().map((n) => n.id()));
  check(near.includes("service:p7-svc3") && near.length < 20, `big graph: 1-hop focus on p7-svc3 shows ${near.length} nodes`);
  await big.screenshot({ path: path.join(artifacts, "big-focus.png") });
  await big.click("#unfocus");
  await big.waitForTimeout(300);
  // a refresh keeps the user's choice (ungrouped)
  await big.waitForTimeout(2500);
  const still = await big.evaluate(() => window.stacktap.cy.nodes().length);
  check(still === report.nodes.length, `big graph: stays ungrouped once the user chose (${still})`);
  await big.close();

  check(consoleErrors.length === 0, `no script errors (${consoleErrors.join("; ")})`);
  check(foreign.length === 0, `no request leaves stacktap (${foreign.join(", ")})`);
} finally {
  await browser.close();
}
if (failures.length) {
  console.error(`${failures.length} UI check(s) failed:\n  ${failures.join("\n  ")}`);
  process.exit(1);
}
console.log("all UI checks passed");
