// The topology of one service as SVG: its downstreams on the left, itself in the middle, its
// upstreams on the right; one edge per pair, green when the intentions allow the connection,
// red and dashed with an "x" when they deny it. Every edge is a link: an allowed one to the
// intention that allows it, a denied one to the offer to create the allow.

const NS = "http://www.w3.org/2000/svg";
const BOX_W = 210, BOX_H = 52, GAP = 22, COL = [20, 345, 670], WIDTH = 900;

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const c of children) e.append(c);
  return e;
}

function box(x, y, label, sub, href, current) {
  const g = svg("a", { href, class: current ? "node current" : "node", "aria-label": `Service ${label}` });
  g.append(
    svg("rect", { x, y, width: BOX_W, height: BOX_H, rx: 6 }),
    svg("text", { x: x + 12, y: y + 22, class: "name" }, label),
    svg("text", { x: x + 12, y: y + 41, class: "sub" }, sub),
  );
  return g;
}

// Draws the topology. `center` is {label, href, sub}; `downstreams` and `upstreams` lists of
// {label, href, sub, edge}, where `edge` is {allowed, text, href, onDenied}: `text` the
// accessible description ("web → api-v1: denied by */* => */*"), `href` where an allowed edge
// leads, `onDenied` what choosing a denied edge does.
export function drawTopology({ center, downstreams, upstreams }) {
  const rows = Math.max(downstreams.length, upstreams.length, 1);
  const height = rows * (BOX_H + GAP) + GAP;
  const root = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${height}`, class: "topology", role: "group",
    "aria-label": `Topology of ${center.label}`,
  });
  const defs = svg("defs", {},
    svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
      svg("path", { d: "M0,0 L10,5 L0,10 z", class: "arrowhead" })));
  root.append(defs);
  const cy = height / 2 - BOX_H / 2;
  const edges = svg("g", { class: "edges" });
  const nodes = svg("g", { class: "nodes" });
  root.append(edges, nodes);
  const rowY = (i, n) => {
    const top = (height - n * (BOX_H + GAP) + GAP) / 2;
    return top + i * (BOX_H + GAP);
  };
  const edge = (x1, y1, x2, y2, e) => {
    const mx = (x1 + x2) / 2, my = (y1 + y2) / 2;
    const d = `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`;
    const a = svg("a", {
      href: e.allowed ? (e.href || "#") : "#",
      class: e.allowed ? "edge allowed" : "edge denied",
      "aria-label": e.text,
      "data-allowed": e.allowed ? "true" : "false",
    });
    a.append(svg("title", {}, e.text));
    a.append(svg("path", { d, class: "hit" }));
    a.append(svg("path", { d, class: "line", "marker-end": "url(#arrow)" }));
    // The badge in the middle: an "x" on a denied edge, a check mark on an allowed one (also
    // what a pointer or a WebDriver click lands on: a straight edge has no height).
    a.append(svg("circle", { cx: mx, cy: my, r: 11, class: "badge-bg" }));
    if (!e.allowed) {
      a.append(svg("path", { d: `M${mx - 5},${my - 5} L${mx + 5},${my + 5} M${mx + 5},${my - 5} L${mx - 5},${my + 5}`, class: "x" }));
      a.addEventListener("click", (ev) => { ev.preventDefault(); e.onDenied(); });
    } else {
      a.append(svg("path", { d: `M${mx - 5},${my} L${mx - 1},${my + 4} L${mx + 5},${my - 4}`, class: "check" }));
      if (!e.href) a.addEventListener("click", (ev) => ev.preventDefault());
    }
    edges.append(a);
  };
  downstreams.forEach((s, i) => {
    const y = rowY(i, downstreams.length);
    nodes.append(box(COL[0], y, s.label, s.sub, s.href, false));
    edge(COL[0] + BOX_W, y + BOX_H / 2, COL[1], cy + BOX_H / 2, s.edge);
  });
  nodes.append(box(COL[1], cy, center.label, center.sub, center.href, true));
  upstreams.forEach((s, i) => {
    const y = rowY(i, upstreams.length);
    nodes.append(box(COL[2], y, s.label, s.sub, s.href, false));
    edge(COL[1] + BOX_W, cy + BOX_H / 2, COL[2], y + BOX_H / 2, s.edge);
  });
  return root;
}
