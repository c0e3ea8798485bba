// stacktap's graph UI: the call graph from /api/graph, the ranked root causes from
// /api/chains and one request's tree from /api/requests/{id}. Plain browser JS: the only
// third-party code is cytoscape.js and its dagre layout, served by the binary.
"use strict";

const REFRESH_MS = 2000;
// more nodes than this on the first load: start grouped by project
const GROUP_ABOVE = 80;
const WINDOWS = [[60, "1 min"], [300, "5 min"], [900, "15 min"], [3600, "1 h"]];
// Okabe-Ito colours, which people with the common colour-vision deficiencies tell apart;
// health is also carried by shape (a failing node's border is doubled, a degraded one's
// dashed; a failing edge is thick and its label starts with a mark), never by hue alone
const RED = "#d55e00", AMBER = "#e69f00", GREEN = "#009e73", GREY = "#8a93a6";
// node labels are never drawn smaller than this many pixels at the initial zoom
const MIN_LABEL_PX = 11;
const NODE_FONT = 15;
// edge labels shown in full: the failing ones and this many of the busiest
const FULL_LABELS = 12;

const state = {
  window: null,        // seconds, "all", or null: the server's default
  graph: null,         // the latest /api/graph report
  chains: null,        // the latest /api/chains answer
  group: false,        // collapse services into projects
  groupChosen: false,  // the user set grouping (then it is never changed for them)
  focus: null,         // node id shown with its k-hop neighbourhood
  hops: 2,
  selected: null,      // {kind: "node"|"edge", id}
  chain: null,         // {key, requestId, tree}
  structure: "",       // ids of the drawn elements: a change means a new layout
  lastOk: 0,
  source: null,        // the latest /api/source: where the data comes from, the links
};

// ---------- formatting (every string from the wire goes through esc) ----------

function esc(s) {
  return String(s ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}
function secs(v) {
  if (v == null || !isFinite(v) || v <= 0) return "–";
  if (v < 1e-3) return (v * 1e6).toFixed(0) + " µs";
  if (v < 1) return (v * 1e3).toFixed(v < 0.01 ? 1 : 0) + " ms";
  return v.toFixed(v < 10 ? 2 : 1) + " s";
}
function rate(v) {
  if (!v) return "0/s";
  if (v >= 100) return v.toFixed(0) + "/s";
  if (v >= 1) return v.toFixed(1) + "/s";
  return v.toFixed(2) + "/s";
}
function pct(errors, requests) {
  if (!requests) return "–";
  const p = (100 * errors) / requests;
  return (p === 0 ? "0" : p < 1 ? p.toFixed(1) : p.toFixed(0)) + " %";
}
function when(t) {
  return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 23) + "Z";
}
function health(s) {
  if (!s || !s.requests) return GREY;
  if (s.timeouts > 0 || s.errors / s.requests >= 0.05) return RED;
  if (s.errors > 0) return AMBER;
  return GREEN;
}
function cls(s) {
  const h = health(s);
  return h === RED ? "bad" : h === AMBER ? "warn" : "";
}
/// The border pattern that says what the colour says.
function borderStyle(s) {
  const h = health(s);
  return h === RED ? "double" : h === AMBER ? "dashed" : "solid";
}

// ---------- the model: report edges folded into what is drawn ----------

// A client library or "external" is a user; services and queues keep their kind.
function project(node) {
  if (node.kind === "client") return "client:users";
  if (node.kind !== "service") return null; // queues follow their consumers, below
  return "project:" + node.name.split("-")[0];
}

/// Maps every report node to the node drawn for it (itself, or its project when grouped).
function drawnIds(report) {
  const map = new Map();
  for (const n of report.nodes) map.set(n.id, n.id);
  if (!state.group) return map;
  const byId = new Map(report.nodes.map((n) => [n.id, n]));
  for (const n of report.nodes) {
    const p = project(n);
    if (p) map.set(n.id, p);
  }
  // a queue or exchange joins its consumers' project when they all share one
  for (const n of report.nodes) {
    if (n.kind !== "queue" && n.kind !== "exchange") continue;
    const owners = new Set(report.edges
      .filter((e) => e.source === n.id && e.type === "deliver")
      .map((e) => project(byId.get(e.target))));
    if (owners.size === 1) {
      const [p] = owners;
      if (p) map.set(n.id, p);
    }
  }
  return map;
}

function sum(ops) {
  const s = { requests: 0, errors: 0, timeouts: 0, rate: 0, p99: 0 };
  for (const e of ops) {
    s.requests += e.requests;
    s.errors += e.errors;
    s.timeouts += e.timeouts;
    s.rate += e.rate_per_s;
    if (e.latency_s && e.latency_s.count) s.p99 = Math.max(s.p99, e.latency_s.p99);
  }
  return s;
}

/// The drawn nodes and edges: report edges grouped by (drawn source, drawn target,
/// protocol); each drawn edge keeps its operations for the side panel.
function model(report) {
  const drawn = drawnIds(report);
  const nodes = new Map();
  for (const n of report.nodes) {
    const id = drawn.get(n.id);
    if (!nodes.has(id)) {
      const grouped = id !== n.id;
      nodes.set(id, {
        id,
        kind: grouped ? (id.startsWith("client:") ? "client" : "service") : n.kind,
        name: grouped ? (id.startsWith("client:") ? "users" : id.slice(8) + " (all)") : n.name,
        members: [],
      });
    }
    nodes.get(id).members.push(n);
  }
  const edges = new Map();
  for (const e of report.edges) {
    const s = drawn.get(e.source), t = drawn.get(e.target);
    if (s === t) continue; // inside a group
    const style = e.protocol === "http" ? "rest" : e.type === "call" ? "call"
      : e.type === "deliver" ? "deliver" : "cast";
    const id = `${s}->${t}|${style}`;
    if (!edges.has(id)) edges.set(id, { id, source: s, target: t, style, ops: [] });
    edges.get(id).ops.push(e);
  }
  // a node's health: what it was asked to do (a service fed by queues: the calls on them)
  const inbound = new Map();
  for (const e of edges.values()) {
    if (!inbound.has(e.target)) inbound.set(e.target, []);
    for (const op of e.ops) inbound.get(e.target).push(...(op.type === "deliver" ? callsFor(report, op) : [op]));
  }
  for (const n of nodes.values()) n.stats = sum(inbound.get(n.id) || []);
  return { nodes, edges, drawn };
}

/// The caller → queue edges that carry the calls a queue → server edge delivered
/// (indexed once per report: big graphs have thousands of edges).
const callIndex = new WeakMap();
function callsFor(report, deliver) {
  let index = callIndex.get(report);
  if (!index) {
    index = new Map();
    for (const e of report.edges) {
      if (e.type === "deliver") continue;
      const k = `${e.target}|${e.operation}`;
      if (!index.has(k)) index.set(k, []);
      index.get(k).push(e);
    }
    callIndex.set(report, index);
  }
  return index.get(`${deliver.source}|${deliver.operation}`) || [];
}

// ---------- focus: a k-hop neighbourhood ----------

function neighbourhood(m, center, k) {
  const keep = new Set([center]);
  let frontier = new Set([center]);
  for (let i = 0; i < k && frontier.size; i++) {
    const next = new Set();
    for (const e of m.edges.values()) {
      for (const [a, b] of [[e.source, e.target], [e.target, e.source]]) {
        if (frontier.has(a) && !keep.has(b)) { keep.add(b); next.add(b); }
      }
    }
    frontier = next;
  }
  return keep;
}

// ---------- drawing ----------

const cy = cytoscape({
  container: document.getElementById("graph"),
  wheelSensitivity: 0.3,
  minZoom: 0.05,
  maxZoom: 4,
  style: [
    { selector: "node", style: {
      "label": "data(label)", "text-valign": "center", "text-halign": "center",
      "font-size": NODE_FONT, "min-zoomed-font-size": 5, "text-wrap": "wrap", "text-max-width": 170,
      "background-color": "#fff", "border-width": "data(border)", "border-color": "data(color)", "border-style": "data(pattern)",
      "width": "label", "height": "label", "padding": 7, "shape": "round-rectangle", "color": "#1d2330" } },
    { selector: "node[kind = 'client']", style: { "shape": "ellipse", "background-color": "#f3f5fa", "padding": 14 } },
    { selector: "node[kind = 'queue']", style: { "shape": "barrel", "background-color": "#eef1f6", "font-size": 14 } },
    { selector: "node[kind = 'exchange']", style: { "shape": "diamond", "background-color": "#eef1f6", "font-size": 13, "padding": 20 } },
    { selector: "edge", style: {
      "curve-style": "bezier", "target-arrow-shape": "triangle", "arrow-scale": 1.1,
      "width": "data(width)", "line-color": "data(color)", "target-arrow-color": "data(color)",
      "label": "data(label)", "font-size": 13, "min-zoomed-font-size": 6, "color": "#333c50",
      "text-background-color": "#fff", "text-background-opacity": 0.85, "text-background-padding": 2,
      "text-rotation": "none", "edge-text-rotation": "none" } },
    { selector: "edge[style = 'call']", style: { "line-style": "dashed", "line-dash-pattern": [7, 4] } },
    { selector: "edge[style = 'cast']", style: { "line-style": "dotted" } },
    { selector: "edge[style = 'deliver']", style: { "line-style": "dashed", "line-dash-pattern": [3, 3], "target-arrow-shape": "vee" } },
    { selector: ":selected", style: { "overlay-color": "#2456b8", "overlay-opacity": 0.15, "overlay-padding": 6 } },
    { selector: ".faded", style: { "opacity": 0.18 } },
    { selector: "edge.path", style: { "width": 6, "line-color": RED, "target-arrow-color": RED, "opacity": 1, "z-index": 10 } },
    { selector: "node.path", style: { "border-width": 5, "border-color": RED, "opacity": 1, "background-color": "#fff0ed" } },
    { selector: "node.root-cause", style: { "background-color": RED, "color": "#fff", "border-color": "#7f0f0f", "border-width": 6 } },
  ],
  layout: { name: "preset" },
});

function nodeLabel(n) {
  const s = n.stats;
  if (n.kind === "client" || !s.requests) return n.name;
  const parts = [rate(s.rate)];
  if (s.errors) parts.push(pct(s.errors, s.requests) + " err");
  return `${n.name}\n${parts.join(" · ")}`;
}
function edgeLabel(e, s) {
  const parts = [rate(s.rate)];
  if (e.style !== "deliver") parts.push(pct(s.errors, s.requests));
  if (s.p99) parts.push("p99 " + secs(s.p99));
  if (s.timeouts) parts.push(`${s.timeouts} timeout${s.timeouts > 1 ? "s" : ""}`);
  return (health(s) === RED ? "✖ " : health(s) === AMBER ? "▲ " : "") + parts.join(" · ");
}
/// What a crowded edge still says: its errors, or nothing.
function shortLabel(e, s) {
  if (health(s) === RED) return `✖ ${pct(s.errors, s.requests)}${s.timeouts ? ` · ${s.timeouts} t/o` : ""}`;
  if (health(s) === AMBER) return `▲ ${pct(s.errors, s.requests)}`;
  return "";
}
function nodeData(n) {
  const h = health(n.stats);
  return { label: nodeLabel(n), color: h, border: h === RED ? 6 : 3, pattern: borderStyle(n.stats) };
}

function draw() {
  const report = state.graph;
  if (!report) return;
  const m = model(report);
  state.model = m;
  let visible = null;
  if (state.focus && m.nodes.has(state.focus)) visible = neighbourhood(m, state.focus, state.hops);
  const nodes = [...m.nodes.values()].filter((n) => !visible || visible.has(n.id));
  const edges = [...m.edges.values()].filter((e) => !visible || (visible.has(e.source) && visible.has(e.target)));
  const structure = nodes.map((n) => n.id).sort().join(",") + "|" + edges.map((e) => e.id).sort().join(",");
  const sums = new Map(edges.map((e) => [e.id, sum(e.ops)]));
  const maxRate = Math.max(1e-9, ...[...sums.values()].map((s) => s.rate));
  // the edges that matter get their whole label: failing ones first, then the busiest
  const ranked = edges.slice().sort((a, b) => priority(sums.get(b.id)) - priority(sums.get(a.id)));
  const rank = new Map(ranked.map((e, i) => [e.id, i]));
  const data = (e) => {
    const s = sums.get(e.id);
    const bad = health(s) === RED;
    return {
      color: health(s), full: edgeLabel(e, s), short: shortLabel(e, s), rank: rank.get(e.id),
      width: (bad ? 3 : 1.5) + 4 * Math.sqrt(s.rate / maxRate),
    };
  };
  if (structure === state.structure) {
    // numbers only: update in place, nothing moves
    for (const n of nodes) cy.getElementById(n.id).data(nodeData(n));
    for (const e of edges) cy.getElementById(e.id).data(data(e));
    placeLabels();
  } else {
    state.structure = structure;
    cy.batch(() => {
      cy.elements().remove();
      cy.add(nodes.map((n) => ({ group: "nodes", data: { id: n.id, kind: n.kind, ...nodeData(n) } })));
      cy.add(edges.map((e) => ({ group: "edges", data: { id: e.id, source: e.source, target: e.target, style: e.style, label: "", ...data(e) } })));
    });
    layout();
    placeLabels();
    const names = document.getElementById("names");
    names.replaceChildren(...nodes.map((n) => Object.assign(document.createElement("option"), { value: n.name })));
  }
  if (state.chain) highlight(state.chain.tree);
  if (state.selected) {
    const el = cy.getElementById(state.selected.id);
    if (el.nonempty()) showElement(state.selected);
  }
}

/// Failing edges first (timeouts, then error share), then by traffic.
function priority(s) {
  const h = health(s);
  return (h === RED ? 2e9 : h === AMBER ? 1e9 : 0) + (s.timeouts ? 1e8 : 0) + s.rate;
}

/// Lays the graph out to use the canvas it has: dagre left-to-right or top-to-bottom,
/// whichever lets it be drawn larger, then the positions spread along the short side
/// until the drawing has the canvas's proportions, then fitted.
function layout() {
  const W = Math.max(1, cy.width()), H = Math.max(1, cy.height());
  // compact first (the drawing's size sets the zoom, so the labels' size), then the
  // gaps grow to the canvas's proportions
  const opts = (rankDir) => ({ name: "dagre", rankDir, animate: false, fit: false, nodeSep: 22, rankSep: 48, edgeSep: 8 });
  const fitted = () => {
    const bb = cy.nodes().boundingBox();
    return Math.min(W / Math.max(1, bb.w), H / Math.max(1, bb.h));
  };
  cy.layout(opts("LR")).run();
  const lr = fitted();
  cy.layout(opts("TB")).run();
  if (fitted() < lr) cy.layout(opts("LR")).run();
  stretch(W / H);
  cy.fit(cy.elements(), 24);
  // a handful of nodes would be blown up to fill the screen; a graph meant to be read
  // whole keeps its labels readable (what does not fit is a pan away); a big one is
  // shown whole, its labels appearing as one zooms in
  const smallest = Math.min(...cy.nodes().map((n) => n.pstyle("font-size").pfValue));
  const readable = cy.nodes().length <= GROUP_ABOVE ? MIN_LABEL_PX / smallest : 0;
  if (cy.zoom() > 1.6 || cy.zoom() < readable) {
    cy.zoom(Math.min(1.6, Math.max(readable, cy.zoom())));
    cy.center();
  }
}

/// Spreads node positions along the short side of their bounding box until it has the
/// canvas's aspect ratio (node sizes stay: only the gaps grow).
function stretch(aspect) {
  const nodes = cy.nodes();
  if (nodes.length < 2) return;
  const bb = nodes.boundingBox();
  const ratio = bb.w / Math.max(1, bb.h);
  const sx = ratio < aspect ? Math.min(4, aspect / ratio) : 1;
  const sy = ratio > aspect ? Math.min(4, ratio / aspect) : 1;
  const cx = (bb.x1 + bb.x2) / 2, cyy = (bb.y1 + bb.y2) / 2;
  nodes.positions((node) => {
    const p = node.position();
    return { x: cx + (p.x - cx) * sx, y: cyy + (p.y - cyy) * sy };
  });
}

/// Edge labels that never overlap each other: in rank order, each edge shows its full
/// label if it fits where no label is yet, else its short one, else none. The full text
/// is in the hover tip and the side panel. Boxes are in model coordinates, so the
/// answer holds at any zoom.
function placeLabels() {
  const placed = [];
  const fits = (b) => !placed.some((o) => b.x1 < o.x2 && o.x1 < b.x2 && b.y1 < o.y2 && o.y1 < b.y2);
  const edges = cy.edges().sort((a, b) => a.data("rank") - b.data("rank"));
  {
    edges.forEach((e, i) => {
      const tries = i < FULL_LABELS || e.data("short") ? [e.data("full"), e.data("short")] : [e.data("short")];
      let chosen = "";
      for (const text of tries.filter(Boolean)) {
        e.data("label", text);
        const b = e.boundingBox({ includeNodes: false, includeEdges: false, includeLabels: true, includeOverlays: false });
        if (b.w > 0 && fits(b)) {
          placed.push(b);
          chosen = text;
          break;
        }
      }
      e.data("label", chosen);
    });
  }
}

// ---------- trends: the graph's slots as small time series ----------

/// Edge series summed slot by slot: [{t, requests, errors, timeouts, p99_s}], oldest first.
function seriesOf(ops) {
  const by = new Map();
  for (const op of ops) {
    for (const p of op.series || []) {
      const q = by.get(p.t) || { t: p.t, requests: 0, errors: 0, timeouts: 0, p99_s: 0 };
      q.requests += p.requests;
      q.errors += p.errors;
      q.timeouts += p.timeouts;
      q.p99_s = Math.max(q.p99_s, p.p99_s);
      by.set(p.t, q);
    }
  }
  return [...by.values()].sort((a, b) => a.t - b.t);
}

/// An inline SVG sparkline of values at times `ts` over the report's window.
function spark(points, value, colour, label) {
  const w = 150, h = 26, report = state.graph;
  const end = report.latest ?? 0, slot = report.slot_s || 1;
  const start = end - Math.max(report.window_s, slot);
  const max = Math.max(1e-12, ...points.map(value));
  const x = (t) => ((t + slot / 2 - start) / Math.max(slot, end - start)) * w;
  const y = (v) => h - 2 - (v / max) * (h - 4);
  const path = points.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(value(p)).toFixed(1)}`).join("");
  const dots = points.length === 1 ? `<circle cx="${x(points[0].t)}" cy="${y(value(points[0]))}" r="2" fill="${colour}"/>` : "";
  return `<svg class="spark" width="${w}" height="${h}" role="img" aria-label="${esc(label)}"><title>${esc(label)}</title><line x1="0" y1="${h - 1}" x2="${w}" y2="${h - 1}" stroke="#d9dde5"/><path d="${path}" fill="none" stroke="${colour}" stroke-width="1.6"/>${dots}</svg>`;
}

function trends(ops, withLatency, load) {
  const pts = seriesOf(ops);
  if (!pts.length) return `<p class="hint">no traffic in this window</p>`;
  const slot = state.graph.slot_s || 1;
  const last = pts[pts.length - 1];
  const rows = [
    ["rate", spark(pts, (p) => p.requests / slot, "#0072b2", "requests per second, slot by slot"), rate(last.requests / slot)],
    ["errors", spark(pts, (p) => p.errors + p.timeouts, RED, "errors and timeouts per slot"), `${last.errors + last.timeouts}`],
  ];
  if (withLatency) rows.push(["p99", spark(pts, (p) => p.p99_s, "#cc79a7", "p99 latency per slot"), secs(last.p99_s)]);
  if (load && load.length) rows.push(["in flight", spark(load, (p) => p.peak, "#56b4e9", "calls waiting for a reply: the most in each slot"), `${load[load.length - 1].peak}`]);
  return `<div class="sparks">${rows.map(([k, svg, v]) => `<span>${k}</span>${svg}<span class="v">${v}</span>`).join("")}</div>
    <p class="hint">over the window, one point per ${slot} s; the value is the newest slot's</p>`;
}

/// A queue's reply wait as a histogram per part (queue wait, server, reply transit).
function splitHistogram(ops) {
  const hs = ops.map((op) => op.reply_wait_split?.histogram).filter(Boolean);
  if (!hs.length) return "";
  const bounds = hs[0].bounds_s;
  const add = (k) => bounds.concat([Infinity]).map((_, i) => hs.reduce((a, h) => a + (h[k][i] || 0), 0));
  const parts = [["queue wait", add("queue_wait"), "#e69f00"], ["server", add("server"), "#0072b2"], ["reply transit", add("reply_transit"), "#009e73"]];
  const max = Math.max(1, ...parts.flatMap(([, c]) => c));
  const labels = bounds.map((b) => "≤" + secs(b)).concat([">" + secs(bounds[bounds.length - 1])]);
  const bw = 8, gap = 6, group = parts.length * bw + gap, h = 60;
  const bars = labels.map((_, i) => parts.map(([name, c, colour], j) => {
    const bh = (c[i] / max) * h;
    return `<rect x="${i * group + j * bw}" y="${h - bh}" width="${bw - 1}" height="${bh}" fill="${colour}"><title>${name} ${labels[i]}: ${c[i]}</title></rect>`;
  }).join("")).join("");
  const ticks = labels.map((l, i) => i % 2 ? "" : `<text x="${i * group}" y="${h + 11}" font-size="9" fill="#4a536a">${esc(l)}</text>`).join("");
  const legend = parts.map(([n, , c]) => `<span><span class="sw" style="background:${c}"></span>${n}</span>`).join(" ");
  return `<h3>Reply wait, split</h3><svg class="hist" viewBox="0 0 ${labels.length * group} ${h + 14}" role="img" aria-label="reply wait histogram: queue wait, server time, reply transit">${bars}${ticks}</svg><div class="meta">${legend}</div>`;
}

// ---------- links to the evidence ----------

function fill(template, vars) {
  return template.replace(/\{(\w+)\}/g, (m, k) => (k in vars ? encodeURIComponent(vars[k] ?? "") : m));
}
/// Links for a service/queue/edge: the Grafana dashboard, when configured.
function grafanaLink(vars) {
  const t = state.source?.links?.grafana_url;
  if (!t) return "";
  return `<a href="${esc(fill(t, vars))}" target="_blank" rel="noopener">Grafana dashboard ↗</a>`;
}
function copyButton(text, what) {
  return `<button class="copy" data-copy="${esc(text)}" aria-label="copy ${esc(what)}">copy</button>`;
}
/// The request id to copy, its trace, and the rca command that prints the same tree.
function requestEvidence(tree) {
  const links = [];
  const t = state.source?.links?.trace_url;
  if (t && tree.trace_id) links.push(`<a href="${esc(fill(t, { trace_id: tree.trace_id, request_id: tree.request_id }))}" target="_blank" rel="noopener">trace ↗</a>`);
  const cmd = `stacktap rca --from ${location.origin}/ --request-id ${tree.request_id}`;
  return `<div class="evidence"><span>request id <code>${esc(tree.request_id)}</code>${copyButton(tree.request_id, "request id")}</span>${links.join("")}</div>
    <div class="meta">the same tree in a terminal:</div><code class="cmd">${esc(cmd)}</code>${copyButton(cmd, "command")}`;
}

// ---------- the side panel ----------

function panel(html) {
  document.getElementById("panel-body").innerHTML = html;
}

function opsTable(ops, report, showCaller) {
  const rows = ops.slice().sort((a, b) => b.requests - a.requests).slice(0, 15).map((op) => {
    const calls = op.type === "deliver" ? callsFor(report, op) : [op];
    const s = sum(calls);
    const lat = op.latency_s && op.latency_s.count ? op.latency_s : null;
    const split = calls.find((c) => c.reply_wait_split)?.reply_wait_split;
    const caller = showCaller ? `<div class="meta">from ${esc(calls.map((c) => c.source.replace(/^\w+:/, "")).join(", "))}</div>` : "";
    const splitRow = split ? `<tr><td colspan="6" class="meta">reply wait p99 split: queue ${secs(split.queue_wait_s.p99)} · server ${secs(split.server_s.p99)} · transit ${secs(split.reply_transit_s.p99)} <span class="meta">(p50: ${secs(split.queue_wait_s.p50)} · ${secs(split.server_s.p50)} · ${secs(split.reply_transit_s.p50)})</span></td></tr>` : "";
    return `<tr><td class="op">${esc(op.operation)} <span class="meta">${esc(op.type)}</span>${caller}</td>
      <td class="num">${rate(s.rate)}</td><td class="num ${cls(s)}">${pct(s.errors, s.requests)}</td>
      <td class="num ${s.timeouts ? "bad" : ""}">${s.timeouts}</td>
      <td class="num">${lat ? secs(lat.p50) : "–"}</td><td class="num">${lat ? secs(lat.p99) : "–"}</td></tr>${splitRow}`;
  });
  if (!rows.length) return `<p class="hint">none in this window</p>`;
  return `<table><thead><tr><th>operation</th><th class="num">rate</th><th class="num">err</th><th class="num">t/o</th><th class="num">p50</th><th class="num">p99</th></tr></thead><tbody>${rows.join("")}</tbody></table>`;
}

function errorsList(ops) {
  const errs = ops.flatMap((op) => (op.recent_errors || []).map((r) => ({ ...r, op: op.operation })));
  errs.sort((a, b) => b.t - a.t);
  if (!errs.length) return `<p class="hint">no failures in this window</p>`;
  return `<ul class="errors">${errs.slice(0, 10).map((r) => `<li><span class="bad">${esc(r.error)}</span> on ${esc(r.op)}
    ${r.message ? `<div>${esc(r.message)}</div>` : ""}
    <div class="when">${when(r.t)}${r.request_id ? ` · <button class="link req" data-req="${esc(r.request_id)}">${esc(r.request_id)}</button>${copyButton(r.request_id, "request id")}` : ""}${r.msg_id ? ` · msg_id <code>${esc(r.msg_id)}</code>${copyButton(r.msg_id, "msg_id")}` : ""}</div></li>`).join("")}</ul>`;
}

function showElement(sel) {
  const m = state.model, report = state.graph;
  if (sel.kind === "node") {
    const n = m.nodes.get(sel.id);
    if (!n) return;
    const inbound = [...m.edges.values()].filter((e) => e.target === n.id).flatMap((e) => e.ops);
    const outbound = [...m.edges.values()].filter((e) => e.source === n.id).flatMap((e) => e.ops);
    const failing = inbound.flatMap((op) => op.type === "deliver" ? callsFor(report, op) : [op]);
    const members = n.members.length > 1 ? `<p class="meta">${esc(n.members.map((x) => x.name).join(", "))}</p>` : "";
    const kinds = { service: "service", queue: "RPC queue (topic)", exchange: "fanout exchange", client: "user / client" };
    const waits = n.kind === "queue" || n.kind === "exchange";
    const titles = waits
      ? ["Calls and casts sent here (by method)", "Delivered to"]
      : ["What it is asked to do (top routes and methods)", "What it calls"];
    panel(`<h2>${esc(n.name)} <small>${kinds[n.kind] || esc(n.kind)}</small></h2>${members}
      <dl class="kv"><dt>handled</dt><dd>${rate(n.stats.rate)} · ${n.stats.requests} requests</dd>
      <dt>errors</dt><dd class="${cls(n.stats)}">${n.stats.errors} (${pct(n.stats.errors, n.stats.requests)})</dd>
      <dt>timeouts</dt><dd class="${n.stats.timeouts ? "bad" : ""}">${n.stats.timeouts}</dd></dl>
      <p><button id="focus-here">focus on its neighbourhood</button> ${grafanaLink({ service: n.kind === "service" ? n.name : "", queue: waits ? n.name : "", operation: "" })}</p>
      <h3>Trend</h3>${trends(failing.length ? failing : inbound, true, (report.in_flight || {})[n.id])}
      ${n.kind === "queue" ? splitHistogram(failing) : ""}
      <h3>${titles[0]}</h3>${opsTable(inbound, report, true)}
      <h3>${titles[1]}</h3>${opsTable(outbound, report, false)}
      <h3>Recent errors</h3>${errorsList(failing)}`);
    document.getElementById("focus-here").onclick = () => setFocus(n.id);
  } else {
    const e = m.edges.get(sel.id);
    if (!e) return;
    const name = (id) => m.nodes.get(id)?.name ?? id;
    const kinds = { rest: "REST", call: "RPC calls", cast: "RPC casts / fanouts", deliver: "RPC deliveries" };
    const calls = e.ops.flatMap((op) => op.type === "deliver" ? callsFor(report, op) : [op]);
    const s = sum(calls), carried = sum(e.ops);
    panel(`<h2>${esc(name(e.source))} → ${esc(name(e.target))} <small>${kinds[e.style]}</small></h2>
      <dl class="kv"><dt>rate</dt><dd>${rate(carried.rate)} · ${carried.requests} requests</dd>
      <dt>errors</dt><dd class="${cls(s)}">${s.errors} (${pct(s.errors, s.requests)})</dd>
      <dt>timeouts</dt><dd class="${s.timeouts ? "bad" : ""}">${s.timeouts}</dd></dl>
      <p>${grafanaLink({ service: name(e.target), queue: m.nodes.get(e.target)?.kind === "queue" ? name(e.target) : "", operation: e.ops[0]?.operation ?? "" })}</p>
      <div class="meta">${esc(edgeLabel(e, s))}</div>
      <h3>Trend</h3>${trends(calls, e.style !== "deliver")}
      ${e.style === "call" ? splitHistogram(e.ops) : ""}
      <h3>Operations</h3>${opsTable(e.ops, report, false)}
      <h3>Recent errors</h3>${errorsList(calls)}`);
  }
}

cy.on("tap", "node, edge", (ev) => {
  state.selected = { kind: ev.target.isNode() ? "node" : "edge", id: ev.target.id() };
  showElement(state.selected);
});
cy.on("dbltap", "node", (ev) => setFocus(ev.target.id()));
cy.on("tap", (ev) => {
  if (ev.target === cy) clearChain();
});
document.addEventListener("keydown", (ev) => {
  if (ev.key !== "Escape") return;
  clearChain();
  if (state.focus) document.getElementById("unfocus").click();
});
document.getElementById("panel").addEventListener("click", (ev) => {
  const a = ev.target.closest(".req");
  if (a) openRequest(a.dataset.req, null);
  const c = ev.target.closest("button[data-copy]");
  if (c) {
    navigator.clipboard?.writeText(c.dataset.copy).then(() => { c.textContent = "copied"; }, () => { c.textContent = "select it"; });
  }
});

// the full label of an edge whose label was shortened or hidden, on hover
const tip = document.getElementById("tip");
cy.on("mouseover", "edge", (ev) => {
  const p = ev.renderedPosition || ev.target.renderedMidpoint();
  tip.textContent = ev.target.data("full");
  tip.style.left = `${p.x + 12}px`;
  tip.style.top = `${p.y + 12}px`;
  tip.hidden = false;
});
cy.on("mouseout", "edge", () => { tip.hidden = true; });

// the graph by keyboard: arrows walk the nodes (failing first), Enter focuses on one
const graphEl = document.getElementById("graph");
graphEl.addEventListener("keydown", (ev) => {
  const order = cy.nodes().sort((a, b) => (a.data("color") === RED ? 0 : 1) - (b.data("color") === RED ? 0 : 1) || a.position().x - b.position().x);
  if (!order.length) return;
  const at = state.selected?.kind === "node" ? order.toArray().findIndex((n) => n.id() === state.selected.id) : -1;
  let next = null;
  if (ev.key === "ArrowRight" || ev.key === "ArrowDown") next = order[(at + 1) % order.length];
  else if (ev.key === "ArrowLeft" || ev.key === "ArrowUp") next = order[(at - 1 + order.length) % order.length];
  else if (ev.key === "Enter" && at >= 0) { setFocus(order[at].id()); ev.preventDefault(); return; }
  if (!next) return;
  ev.preventDefault();
  cy.elements().unselect();
  next.select();
  state.selected = { kind: "node", id: next.id() };
  showElement(state.selected);
});

// ---------- chains: root causes ranked, one request's path ----------

function rootKey(r) {
  return `${r.service}|${r.operation}|${r.error}`;
}

function renderRoots() {
  const ol = document.getElementById("roots");
  const rca = state.chains?.rca;
  const roots = rca?.roots || [];
  document.getElementById("chains-count").textContent = rca
    ? `${rca.failed_requests} failing request${rca.failed_requests === 1 ? "" : "s"}${rca.masked_failures ? `, ${rca.masked_failures} masked by retries` : ""}`
    : "";
  if (!roots.length) {
    ol.innerHTML = `<li class="empty" style="border-left-color:${GREEN}">No failing user requests in this window.</li>`;
    return;
  }
  ol.innerHTML = roots.map((r, i) => {
    const seen = Object.entries(r.seen_as || {}).map(([k, v]) => `${v}× ${k}`).join("; ");
    const key = rootKey(r);
    return `<li data-i="${i}" class="${state.chain?.key === key ? "selected" : ""}"><button class="pick" aria-label="root cause ${esc(r.service)} ${esc(r.operation)} ${esc(r.error)}, ${r.requests} requests: show its path">show</button>
      <span class="count">${r.requests}×</span> <span class="what">${esc(r.service)}</span> ${esc(r.operation)}
      <div class="bad">${esc(r.error)}</div>
      ${r.message ? `<div class="msg">${esc(r.message)}</div>` : ""}
      <div class="seen">seen as ${esc(seen)} · path ${esc((r.path || []).join(" → "))}</div></li>`;
  }).join("");
  for (const li of ol.querySelectorAll("li[data-i]")) {
    li.onclick = () => {
      const r = roots[Number(li.dataset.i)];
      openRequest(r.example_request_id, rootKey(r));
    };

  }
}

async function openRequest(id, key) {
  const res = await fetch(`/api/requests/${encodeURIComponent(id)}`);
  if (!res.ok) {
    panel(`<h2>Request ${esc(id)}</h2><p class="hint">Not kept any more (the request store is bounded).</p>`);
    return;
  }
  const tree = await res.json();
  state.chain = { key, requestId: id, tree };
  state.selected = null;
  renderRoots();
  highlight(tree);
  showTree(tree);
}

function clearChain() {
  state.chain = null;
  cy.elements().removeClass("faded path root-cause");
  renderRoots();
}

/// The spans from the request's first one down to the one blamed.
function pathOf(tree) {
  const path = [];
  let i = tree.root_cause ?? (tree.failed || [])[0];
  while (i != null && path.length <= tree.spans.length) {
    path.unshift(i);
    i = tree.spans[i].parent;
  }
  return path;
}

/// The drawn node for a name in a span (a process, a client library, a queue).
function nodeFor(name, drawn) {
  if (!name) return drawn.get("client:external");
  for (const id of [name, `service:${name}`, `client:${name}`, `queue:${name}`, `exchange:${name}`]) {
    if (drawn.has(id)) return drawn.get(id);
  }
  return null;
}

/// The graph elements one span crossed: caller → server (REST), caller → queue → server (RPC).
function elementsOf(span, report, drawn) {
  const out = { nodes: [], edges: [] };
  const from = nodeFor(span.caller || "external", drawn);
  if (span.kind === "http") {
    const to = nodeFor(span.handler, drawn);
    for (const e of report.edges) {
      if (e.protocol === "http" && e.operation === span.operation && drawn.get(e.target) === to && (!from || drawn.get(e.source) === from)) {
        out.edges.push(e);
      }
    }
    out.nodes.push(from, to);
  } else {
    // RPC: topic.method; the queue is named by the topic (the server's own queue folds in)
    const calls = report.edges.filter((e) => e.protocol === "rpc" && e.type !== "deliver" && e.operation === span.operation && (!from || drawn.get(e.source) === from));
    for (const c of calls) {
      out.edges.push(c);
      out.nodes.push(drawn.get(c.source), drawn.get(c.target));
      const to = span.handler && !span.handler.startsWith("queue:") ? nodeFor(span.handler, drawn) : null;
      for (const d of report.edges) {
        if (d.type === "deliver" && d.source === c.target && d.operation === span.operation && (!to || drawn.get(d.target) === to)) {
          out.edges.push(d);
          out.nodes.push(drawn.get(d.target));
        }
      }
    }
    if (!calls.length) out.nodes.push(from);
  }
  out.nodes = out.nodes.filter(Boolean);
  return out;
}

function highlight(tree) {
  const report = state.graph, m = state.model;
  if (!report || !m) return;
  cy.elements().removeClass("faded path root-cause");
  const pathNodes = new Set(), pathEdges = new Set();
  let rootNodes = [];
  for (const i of pathOf(tree)) {
    const got = elementsOf(tree.spans[i], report, m.drawn);
    for (const e of got.edges) {
      const s = m.drawn.get(e.source), t = m.drawn.get(e.target);
      for (const de of m.edges.values()) {
        if (de.source === s && de.target === t && de.ops.includes(e)) pathEdges.add(de.id);
      }
      pathNodes.add(s);
      pathNodes.add(t);
    }
    for (const n of got.nodes) pathNodes.add(n);
    if (i === tree.root_cause) {
      // the blamed hop's far end: the server, or the queue nobody answered on
      rootNodes = got.edges.length ? [m.drawn.get(got.edges[got.edges.length - 1].target)] : got.nodes.slice(-1);
    }
  }
  const found = cy.collection();
  for (const id of [...pathNodes, ...pathEdges]) found.merge(cy.getElementById(id));
  if (found.empty()) return;
  // once, when it is picked (not on every refresh): zoom to the path if part of it is off
  // screen or too small to read
  if (state.chain && !state.chain.zoomed) {
    state.chain.zoomed = true;
    const bb = found.renderedBoundingBox();
    const off = bb.x1 < 0 || bb.y1 < 0 || bb.x2 > cy.width() || bb.y2 > cy.height();
    if (off || cy.zoom() < 0.6) cy.animate({ fit: { eles: found, padding: 40 }, duration: 250 });
  }
  cy.elements().not(found).addClass("faded");
  found.addClass("path");
  for (const id of rootNodes) cy.getElementById(id).addClass("root-cause");
  state.highlighted = { nodes: [...pathNodes], edges: [...pathEdges], root: rootNodes };
}

function showTree(tree) {
  const onPath = new Set(pathOf(tree));
  const failed = new Set(tree.failed || []), masked = new Set(tree.masked || []);
  const children = new Map();
  tree.spans.forEach((s, i) => {
    const p = s.parent ?? -1;
    if (!children.has(p)) children.set(p, []);
    children.get(p).push(i);
  });
  const item = (i) => {
    const s = tree.spans[i];
    const dur = s.t_end != null ? secs(s.t_end - s.t_start) : "no end seen";
    const f = s.failure ? `<div class="fail">${esc(s.failure.error)}${s.failure.message ? ": " + esc(s.failure.message) : ""} <span class="meta">(${esc(s.failure.propagation)})</span></div>` : "";
    const c = ["span", onPath.has(i) ? "onpath" : "", failed.has(i) ? "failed" : "", masked.has(i) ? "masked" : ""].join(" ");
    const kids = children.get(i) || [];
    return `<li><div class="${c}"><span class="op">${esc(s.operation)}</span>${i === tree.root_cause ? `<span class="root-cause">root cause</span>` : ""}${masked.has(i) ? ` <span class="meta">masked by a retry</span>` : ""}
      <div class="meta">${esc(s.caller || "?")} → ${esc(s.handler || "?")} · ${esc(s.kind)}${s.status ? " · " + s.status : ""} · ${dur}${s.inferred ? " · parent by time" : ""}</div>${f}</div>
      ${kids.length ? `<ul>${kids.map(item).join("")}</ul>` : ""}</li>`;
  };
  const tops = children.get(-1) || [];
  const outside = state.highlighted && state.highlighted.nodes.length ? "" : `<p class="hint">Its path is not on the graph in this window; widen the window.</p>`;
  panel(`<h2>Request <small>${esc(tree.request_id)}</small></h2>
    <dl class="kv"><dt>symptom</dt><dd class="bad">${esc(tree.symptom || "none")}</dd>
    <dt>started</dt><dd>${when(tree.t_first)}</dd><dt>spans</dt><dd>${tree.spans.length}</dd></dl>${outside}
    ${requestEvidence(tree)}
    <p class="hint">The failing path is marked; the root cause is the deepest failure nothing retried away.</p>
    <ul class="tree">${tops.map(item).join("")}</ul>`);
}

// ---------- controls ----------

function setFocus(id) {
  state.focus = id;
  const n = state.model?.nodes.get(id);
  document.getElementById("focus-name").textContent = n ? n.name : id;
  document.getElementById("focus-banner").hidden = false;
  draw();
}
document.getElementById("unfocus").onclick = () => {
  state.focus = null;
  document.getElementById("focus-banner").hidden = true;
  draw();
};
document.getElementById("hops").onchange = (ev) => {
  state.hops = Number(ev.target.value);
  draw();
};
document.getElementById("group").onchange = (ev) => {
  state.group = ev.target.checked;
  state.groupChosen = true;
  state.focus = null;
  document.getElementById("focus-banner").hidden = true;
  draw();
};
document.getElementById("search").onchange = (ev) => {
  const q = ev.target.value.trim().toLowerCase();
  const n = [...(state.model?.nodes.values() || [])].find((x) => x.name.toLowerCase() === q)
    || [...(state.model?.nodes.values() || [])].find((x) => x.name.toLowerCase().includes(q));
  if (n) setFocus(n.id);
};
const windowSelect = document.getElementById("window");
windowSelect.onchange = () => {
  state.window = windowSelect.value;
  refresh();
};

function fillWindows(report) {
  if (windowSelect.options.length) return;
  const opts = WINDOWS.filter(([s]) => s <= report.max_window_s + 1e-9).map(([s, l]) => [String(s), "last " + l]);
  opts.push(["all", "since start"]);
  const current = report.requested_window_s == null ? "all" : String(Math.round(report.requested_window_s));
  if (!opts.some(([v]) => v === current)) opts.unshift([current, `last ${current} s`]);
  windowSelect.replaceChildren(...opts.map(([v, l]) => Object.assign(document.createElement("option"), { value: v, textContent: l })));
  windowSelect.value = current;
  state.window = current;
}

// ---------- refresh ----------

let refreshing = false;
async function refresh() {
  // on a slow link or a busy host a refresh can outlast the interval: never two at once
  if (refreshing) return;
  refreshing = true;
  try {
    await refreshOnce();
  } finally {
    refreshing = false;
  }
}

async function refreshOnce() {
  const w = state.window;
  const q = w == null ? "" : `?window=${encodeURIComponent(w)}`;
  const since = w == null || w === "all" ? "" : `?since=${encodeURIComponent(w)}`;
  const status = document.getElementById("status");
  try {
    const [g, c, src] = await Promise.all([fetch("/api/graph" + q), fetch("/api/chains" + since), fetch("/api/source")]);
    if (!g.ok || !c.ok) throw new Error(`HTTP ${g.status}/${c.status}`);
    state.graph = await g.json();
    state.chains = await c.json();
    if (src.ok) state.source = await src.json();
    renderSource();
    renderTrend();
    fillWindows(state.graph);
    if (!state.groupChosen && !state.group && state.graph.nodes.length > GROUP_ABOVE) {
      // a big cloud opens folded into projects; unticking the box shows every process
      state.group = true;
      state.groupChosen = true;
      document.getElementById("group").checked = true;
    }
    draw();
    renderRoots();
    state.lastOk = Date.now();
    const r = state.graph;
    status.className = "status";
    status.textContent = `${r.nodes.length} nodes · ${r.edges.length} edges · ${r.window_s.toFixed(0)} s of traffic` +
      (r.latest ? ` · newest packet ${when(r.latest)}` : "");
    document.body.dataset.ready = "1";
  } catch (e) {
    status.className = "status stale";
    status.textContent = `cannot reach stacktap (${e.message}); showing data from ${state.lastOk ? new Date(state.lastOk).toLocaleTimeString() : "never"}`;
  }
}

/// The header's second line: where the data comes from, and a warning when it is partial
/// or lossy (a quiet graph must not pass for a healthy one).
function renderSource() {
  const el = document.getElementById("source");
  const s = state.source;
  if (!s) return;
  const parts = [`<b>${esc(s.what || "stacktap")}</b>`];
  const warn = [];
  if (s.drops) warn.push(`${s.drops} packets dropped by the capture`);
  if (s.partial_view) warn.push("this probe sees only part of the broker's traffic: timeouts and chains are judged where every node is seen");
  const now = Date.now() / 1000;
  for (const p of s.probes || []) {
    const age = Math.max(0, now - p.last_seen);
    const state_ = p.ended ? "ended" : p.silent ? "SILENT" : "live";
    parts.push(`${esc(p.name)}${p.host ? "@" + esc(p.host) : ""}: ${state_}, seen ${age < 2 ? "now" : age.toFixed(0) + " s ago"}${p.drops ? `, ${p.drops} dropped` : ""}`);
    if (p.silent) warn.push(`probe ${esc(p.name)} is silent`);
    if (p.drops || p.unsent) warn.push(`probe ${esc(p.name)} lost ${p.drops + p.unsent} packets or observations`);
  }
  el.innerHTML = parts.join(" · ") + (warn.length ? ` <span class="warn-box" role="alert">⚠ ${warn.join("; ")}</span>` : "");
}

/// In the header: failing requests over the last minutes (user-facing edges' errors).
function renderTrend() {
  const el = document.getElementById("trend");
  const r = state.graph;
  if (!r) return;
  const users = r.edges.filter((e) => e.source.startsWith("client:") || e.protocol === "http");
  const pts = seriesOf(users);
  if (!pts.length) { el.hidden = true; return; }
  const failing = pts.reduce((a, p) => a + p.errors + p.timeouts, 0);
  el.innerHTML = `failing requests ${spark(pts, (p) => p.errors + p.timeouts, "#ffb07a", "failing REST requests per slot over the window")} <b>${failing}</b>`;
  el.hidden = false;
}

refresh();
setInterval(refresh, REFRESH_MS);
window.stacktap = { cy, state, colours: { RED, AMBER, GREEN, GREY }, MIN_LABEL_PX };
