// The UI's pages: Services, a service (instances and topology), Intentions (list, create,
// edit, delete), and logging in and out. Routes are paths under /ui/, as in Consul's UI;
// every page follows the agent's state by asking again every second.

import { api, ApiError, token, setToken, qualified, display, mayWriteIntentions, whyNoWrite } from "./api.js";
import { drawTopology } from "./topology.js";

const REFRESH_MS = 1000;
const view = document.getElementById("view");

// ---- small DOM helpers ----

function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c);
  return e;
}

/** A write control: disabled with a tooltip saying why when `allowed` is false. */
function writeButton(label, allowed, why, attrs) {
  const b = h("button", { type: "button", ...attrs }, label);
  if (!allowed) {
    b.disabled = true;
    b.title = why;
    // A disabled button gets no pointer events: the wrapper carries the tooltip too.
    return h("span", { class: "disabled-wrap", title: why, tabindex: 0, "aria-label": `${label} (disabled): ${why}` }, b);
  }
  return b;
}

function message(kind, text, ...extra) {
  return h("div", { class: `message ${kind}`, role: kind === "error" ? "alert" : "status" }, text, ...extra);
}

/** What a failed read shows: a prompt to log in, or the API's message. */
function readError(err, what) {
  if (err instanceof ApiError && err.status === 401) {
    return message("info", `This agent needs an ACL token to read ${what}. `,
      h("button", { type: "button", onclick: openLogin }, "Log in"));
  }
  if (err instanceof ApiError && err.status === 403) {
    return message("error", `Your token may not read ${what}: ${err.message}`);
  }
  return message("error", err.message);
}

// ---- navigation and refresh ----

let generation = 0;
let timer = null;

/** Shows `path` (and its query) without reloading the page. */
export function navigate(url, replace = false) {
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  route();
}

document.addEventListener("click", (ev) => {
  const a = ev.target.closest && ev.target.closest("a");
  if (!a || ev.defaultPrevented || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey) return;
  const href = a.getAttribute("href");
  if (!href || !href.startsWith("/ui/")) return;
  ev.preventDefault();
  navigate(href);
});
window.addEventListener("popstate", route);

/**
 * Runs `load` now and every second while the page stays; `load` gets a function telling
 * whether the page is still current.
 */
function live(load) {
  const mine = ++generation;
  clearTimeout(timer);
  const current = () => mine === generation;
  const tick = async () => {
    try { await load(current); } catch (e) { console.error(e); }
    if (current()) timer = setTimeout(tick, REFRESH_MS);
  };
  tick();
}

/** Replaces `target`'s content only when `key` changed since the last call (keeps focus). */
function replaceIfChanged(target, key, render) {
  if (target.dataset.key === key) return;
  target.dataset.key = key;
  target.replaceChildren(...[render()].flat());
  for (const table of target.querySelectorAll("table.list")) labelCells(table);
}

/** Gives every cell its column's name (`data-label`), which narrow screens show beside it. */
function labelCells(table) {
  const names = [...table.querySelectorAll("thead th")].map((th) => th.textContent);
  for (const row of table.querySelectorAll("tbody tr")) {
    [...row.children].forEach((cell, i) => cell.setAttribute("data-label", names[i] || ""));
  }
}

function route() {
  const path = location.pathname.replace(/^\/ui\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.nav === (path[0] || "services")) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  generation++;
  clearTimeout(timer);
  view.replaceChildren();
  if (path.length === 0 || (path[0] === "services" && path.length === 1)) return servicesPage();
  if (path[0] === "services" && path.length === 3) return servicePage(path[1], path[2]);
  if (path[0] === "intentions" && path.length === 1) return intentionsPage();
  if (path[0] === "intentions" && path[1] === "create") return intentionForm(null);
  if (path[0] === "intentions" && path.length === 2) return intentionForm(path[1]);
  document.title = "Not found · meshd";
  view.append(h("h1", {}, "Not found"), message("error", `There is no page at ${location.pathname}.`));
}

// ---- log in / log out ----

const loginDialog = document.getElementById("login");
const loginForm = document.getElementById("login-form");
const loginToken = document.getElementById("login-token");
const loginError = document.getElementById("login-error");

function openLogin() {
  loginError.textContent = "";
  loginToken.value = "";
  loginDialog.showModal();
  loginToken.focus();
}

document.getElementById("login-open").addEventListener("click", openLogin);
document.getElementById("login-cancel").addEventListener("click", () => loginDialog.close());
document.getElementById("logout").addEventListener("click", () => {
  setToken(null);
  showWho(null);
  route();
});

loginForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const secret = loginToken.value.trim();
  if (!secret) {
    loginError.textContent = "Enter a token.";
    return;
  }
  try {
    const self = await api("/v1/acl/token/self", { as: secret });
    setToken(secret);
    loginDialog.close();
    showWho(self);
    route();
  } catch (e) {
    loginError.textContent = e instanceof ApiError && (e.status === 403 || e.status === 401)
      ? `The token was refused: ${e.message}`
      : e.message;
  }
});

/** The top right: who is logged in, and the button that fits. */
function showWho(self) {
  const who = document.getElementById("who");
  const logged = !!self;
  document.getElementById("login-open").hidden = logged;
  document.getElementById("logout").hidden = !logged;
  if (!logged) {
    who.textContent = "Not logged in";
    return;
  }
  const policies = (self.Policies || []).map((p) => p.Name).join(", ");
  who.textContent = `Token ${self.Description || self.AccessorID.slice(0, 8)}${policies ? ` (${policies})` : ""}`;
}

async function restoreLogin() {
  if (!token()) return showWho(null);
  try {
    showWho(await api("/v1/acl/token/self"));
  } catch (e) {
    if (e instanceof ApiError && (e.status === 403 || e.status === 401)) setToken(null);
    showWho(null);
  }
}

// ---- Services ----

function healthText(s) {
  const parts = [`${s.ChecksPassing || 0} passing`];
  if (s.ChecksWarning) parts.push(`${s.ChecksWarning} warning`);
  parts.push(`${s.ChecksCritical || 0} critical`);
  return parts.join(", ");
}

function healthClass(s) {
  if (s.ChecksCritical) return "critical";
  if (s.ChecksWarning) return "warning";
  return "passing";
}

function servicesPage() {
  document.title = "Services · meshd";
  const params = new URLSearchParams(location.search);
  let ns = params.get("ns") || "";
  let search = params.get("q") || "";
  const nsSelect = h("select", { id: "ns-select" }, h("option", { value: "" }, "All namespaces"));
  const searchInput = h("input", { id: "service-search", type: "search", value: search, placeholder: "Search by name" });
  const body = h("div", { id: "services" });
  view.append(
    h("h1", {}, "Services"),
    h("div", { class: "toolbar" },
      h("label", { for: "ns-select" }, "Namespace"), nsSelect,
      h("label", { for: "service-search" }, "Search"), searchInput),
    body,
  );
  let last = null;
  const keep = () => {
    const q = new URLSearchParams();
    if (ns) q.set("ns", ns);
    if (search) q.set("q", search);
    history.replaceState(null, "", `/ui/services${q.toString() ? `?${q}` : ""}`);
    if (last) render(last);
  };
  nsSelect.addEventListener("change", () => { ns = nsSelect.value; keep(); });
  for (const event of ["input", "change", "search"]) {
    searchInput.addEventListener(event, () => { search = searchInput.value.trim(); keep(); });
  }
  const render = (services) => {
    const namespaces = [...new Set(services.map((s) => s.Namespace || "default"))].sort();
    const have = [...nsSelect.options].slice(1).map((o) => o.value);
    if (have.join() !== namespaces.join()) {
      nsSelect.replaceChildren(h("option", { value: "" }, "All namespaces"), ...namespaces.map((n) => h("option", { value: n }, n)));
    }
    nsSelect.value = ns;
    const shown = services
      .filter((s) => !ns || (s.Namespace || "default") === ns)
      .filter((s) => !search || s.Name.toLowerCase().includes(search.toLowerCase()));
    replaceIfChanged(body, JSON.stringify([shown, ns, search]), () => shown.length === 0
      ? message("info", services.length ? "No service matches." : "No services are registered.")
      : h("div", { class: "scroll" }, h("table", { class: "list" },
        h("caption", { class: "sr-only" }, "Services"),
        h("thead", {}, h("tr", {}, ["Service", "Namespace", "Instances", "Health", "Mesh"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, shown.map((s) => {
          const sns = s.Namespace || "default";
          return h("tr", { "data-service": s.Name, "data-namespace": sns },
            h("th", { scope: "row" }, h("a", { href: `/ui/services/${encodeURIComponent(sns)}/${encodeURIComponent(s.Name)}` }, s.Name)),
            h("td", {}, sns),
            h("td", { class: "instances" }, `${s.InstanceCount} ${s.InstanceCount === 1 ? "instance" : "instances"}`),
            h("td", { class: `health ${healthClass(s)}` }, healthText(s)),
            h("td", { class: "mesh" }, s.ConnectedWithProxy ? "in mesh" : "not in mesh"));
        })))));
  };
  live(async (current) => {
    try {
      const services = await api("/v1/internal/ui/services?ns=*");
      if (!current()) return;
      // Consul's UI leaves the sidecar proxies (Kind connect-proxy) out of this page.
      last = (services || []).filter((s) => !s.Kind);
      render(last);
    } catch (e) {
      if (current()) replaceIfChanged(body, `err:${e.message}`, () => readError(e, "the services"));
    }
  });
}

// ---- one service ----

function intentionName(it) {
  return `${it.SourceNS || "default"}/${it.SourceName} => ${it.DestinationNS || "default"}/${it.DestinationName}`;
}

function byPrecedence(list) {
  return [...(list || [])].sort((a, b) => (b.Precedence || 0) - (a.Precedence || 0));
}

function servicePage(ns, name) {
  document.title = `${display(ns, name)} · meshd`;
  const instances = h("div", { id: "instances" });
  const topo = h("div", { id: "topology" });
  const offer = h("div", { id: "offer" });
  view.append(
    h("p", { class: "crumbs" }, h("a", { href: "/ui/services" }, "All services")),
    h("h1", {}, display(ns, name)),
    h("h2", {}, "Instances"), instances,
    h("h2", {}, "Topology"),
    h("p", { class: "hint" }, "Each edge shows what the intentions decide for that connection. Choose a denied edge (marked with an x) to allow it; an allowed edge leads to the intention that allows it."),
    topo, offer,
  );
  const q = `ns=${encodeURIComponent(ns)}`;
  const me = { ns, name };
  live(async (current) => {
    const [health, topology] = await Promise.allSettled([
      api(`/v1/health/service/${encodeURIComponent(name)}?${q}`),
      api(`/v1/internal/ui/service-topology/${encodeURIComponent(name)}?kind=&${q}`),
    ]);
    if (!current()) return;
    if (health.status === "rejected") {
      replaceIfChanged(instances, `err:${health.reason.message}`, () => readError(health.reason, "this service's instances"));
    } else {
      const list = health.value || [];
      replaceIfChanged(instances, JSON.stringify(list), () => list.length === 0
        ? message("info", "No instances are registered.")
        : h("div", { class: "scroll" }, h("table", { class: "list" },
          h("caption", { class: "sr-only" }, "Instances"),
          h("thead", {}, h("tr", {}, ["Instance", "Pod", "Node", "Address", "Health"].map((c) => h("th", { scope: "col" }, c)))),
          h("tbody", {}, list.map((i) => {
            const checks = i.Checks || [];
            const critical = checks.filter((c) => c.Status === "critical").length;
            const passing = checks.filter((c) => c.Status === "passing").length;
            const addr = i.Service.Address || (i.Node && i.Node.Address) || "";
            const pod = (i.Service.Meta && i.Service.Meta["pod-name"]) || "";
            return h("tr", { "data-instance": i.Service.ID, "data-pod": pod },
              h("th", { scope: "row" }, i.Service.ID),
              h("td", {}, pod),
              h("td", {}, i.Node ? i.Node.Node : ""),
              h("td", {}, i.Service.Port ? `${addr}:${i.Service.Port}` : addr),
              h("td", { class: `health ${critical ? "critical" : "passing"}` }, `${passing} passing, ${critical} critical`));
          })))));
    }
    if (topology.status === "rejected") {
      replaceIfChanged(topo, `err:${topology.reason.message}`, () => readError(topology.reason, "this service's topology"));
      return;
    }
    const t = topology.value || {};
    // Each edge's decision and what made it (`DecidedBy`: an intention, or the default
    // policy), as the agent computes them from the rules the proxies enforce.
    const decide = (src, dst, peer) => {
      const allowed = !!(peer.Intention && peer.Intention.Allowed);
      const d = peer.DecidedBy || {};
      const it = d.Kind === "intention" ? d : null;
      const by = it ? it.Text || intentionName(it) : "the default policy";
      const text = `${display(src.ns, src.name)} → ${display(dst.ns, dst.name)}: ${allowed ? "allowed" : "denied"} by ${by}`;
      return {
        allowed, text,
        href: it && it.IntentionID ? `/ui/intentions/${encodeURIComponent(it.IntentionID)}` : null,
        onDenied: () => offerAllow(offer, src, dst, text),
      };
    };
    const peer = (s, edge) => ({
      label: display(s.Namespace, s.Name),
      sub: `${s.InstanceCount ?? 0} instance${s.InstanceCount === 1 ? "" : "s"}`,
      href: `/ui/services/${encodeURIComponent(s.Namespace || "default")}/${encodeURIComponent(s.Name)}`,
      edge,
    });
    const downs = (t.Downstreams || []).map((d) => {
      const src = { ns: d.Namespace || "default", name: d.Name };
      return peer(d, decide(src, me, d));
    });
    const ups = (t.Upstreams || []).map((u) => {
      const dst = { ns: u.Namespace || "default", name: u.Name };
      return peer(u, decide(me, dst, u));
    });
    const key = JSON.stringify([downs, ups].map((l) => l.map((p) => [p.label, p.sub, p.edge.allowed, p.edge.text, p.edge.href])));
    replaceIfChanged(topo, key, () => [
      drawTopology({
        center: { label: display(ns, name), sub: "this service", href: location.pathname },
        downstreams: downs, upstreams: ups,
      }),
      downs.length + ups.length === 0
        ? message("info", "This service has no upstreams or downstreams.")
        : h("ul", { class: "decisions", "aria-label": "Decisions" },
          [...downs, ...ups].map((p) => h("li", { class: p.edge.allowed ? "allowed" : "denied" }, p.edge.text))),
    ].filter(Boolean));
  });
}

/** The offer a denied edge makes: create the intention that allows it. */
async function offerAllow(target, src, dst, text) {
  const dstName = qualified(dst.ns, dst.name);
  let allowed = false;
  let why = whyNoWrite(dstName);
  try {
    allowed = (await mayWriteIntentions([dstName])).get(dstName);
  } catch (e) {
    why = `Whether your token may write intentions could not be checked: ${e.message}`;
  }
  const status = h("div", { class: "status", "aria-live": "polite" });
  const create = writeButton("Create allow intention", allowed, why, { class: "primary", id: "create-allow" });
  if (allowed) {
    create.addEventListener("click", async () => {
      create.disabled = true;
      try {
        await api(`/v1/connect/intentions/exact?source=${encodeURIComponent(qualified(src.ns, src.name))}&destination=${encodeURIComponent(dstName)}`, {
          method: "PUT",
          body: { Action: "allow", Description: `Allowed from the topology of ${display(src.ns, src.name)}` },
        });
        target.replaceChildren(message("success", `Intention created: ${qualified(src.ns, src.name)} => ${dstName} allow.`));
      } catch (e) {
        create.disabled = false;
        status.replaceChildren(message("error", e.message));
      }
    });
  }
  target.replaceChildren(h("section", { class: "offer", "aria-labelledby": "offer-title" },
    h("h3", { id: "offer-title" }, "This connection is denied"),
    h("p", {}, text),
    h("p", {}, `Create an intention that allows ${display(src.ns, src.name)} to connect to ${display(dst.ns, dst.name)}?`),
    h("div", { class: "buttons" }, create,
      h("button", { type: "button", onclick: () => target.replaceChildren() }, "Cancel")),
    status));
  const focusable = target.querySelector("button:not([disabled]), [tabindex]");
  if (focusable) focusable.focus();
}

// ---- Intentions ----

function managedByCrd(it) {
  return !!(it.Meta && it.Meta["external-source"] === "kubernetes");
}

function intentionsPage() {
  document.title = "Intentions · meshd";
  const toolbar = h("div", { class: "toolbar" });
  const body = h("div", { id: "intentions" });
  const status = h("div", { "aria-live": "polite" });
  view.append(h("h1", {}, "Intentions"),
    h("p", { class: "hint" }, "In precedence order: the first intention that matches a connection decides it."),
    toolbar, status, body);
  live(async (current) => {
    let list;
    try {
      list = byPrecedence(await api("/v1/connect/intentions?ns=*"));
    } catch (e) {
      if (!current()) return;
      replaceIfChanged(toolbar, "none", () => writeButton("Create", false, whyNoWrite("any destination"), { id: "create-intention" }));
      replaceIfChanged(body, `err:${e.message}`, () => readError(e, "the intentions"));
      return;
    }
    const dsts = list.map((it) => qualified(it.DestinationNS, it.DestinationName));
    let may = new Map();
    let checkError = null;
    try {
      may = await mayWriteIntentions([...dsts, "*/*"]);
    } catch (e) {
      checkError = e.message;
    }
    if (!current()) return;
    const whyFor = (d) => checkError ? `Whether your token may write could not be checked: ${checkError}` : whyNoWrite(d);
    const canCreate = [...may.values()].some(Boolean);
    replaceIfChanged(toolbar, String(canCreate) + checkError, () => {
      if (!canCreate) return writeButton("Create", false, whyFor("any destination"), { id: "create-intention" });
      return h("a", { class: "button primary", id: "create-intention", href: "/ui/intentions/create" }, "Create");
    });
    const rows = list.map((it, i) => ({ it, dst: dsts[i], may: !!may.get(dsts[i]), crd: managedByCrd(it) }));
    replaceIfChanged(body, JSON.stringify(rows.map((r) => [r.it, r.may, r.crd])), () => list.length === 0
      ? message("info", "There are no intentions: every connection gets the default policy.")
      : h("div", { class: "scroll" }, h("table", { class: "list" },
        h("caption", { class: "sr-only" }, "Intentions"),
        h("thead", {}, h("tr", {}, ["Source", "Destination", "Action", "Precedence", "Description", "Managed by", "Actions"].map((c) => h("th", { scope: "col" }, c)))),
        h("tbody", {}, rows.map(({ it, dst, may: ok, crd }) => {
          const src = qualified(it.SourceNS, it.SourceName);
          const label = `${src} => ${dst}`;
          const why = crd
            ? "Managed by a Kubernetes ServiceIntentions resource: change it there"
            : whyFor(dst);
          const edit = ok && !crd
            ? h("a", { class: "button", href: `/ui/intentions/${encodeURIComponent(it.ID)}`, "aria-label": `Edit ${label}` }, "Edit")
            : writeButton("Edit", false, why, { "aria-label": `Edit ${label}` });
          const del = writeButton("Delete", ok && !crd, why, { "aria-label": `Delete ${label}` });
          if (ok && !crd) del.addEventListener("click", () => confirmDelete(status, it, label));
          const action = it.Action || (it.Permissions && it.Permissions.length ? "app aware" : "");
          return h("tr", { "data-intention": label },
            h("td", {}, src), h("td", {}, dst),
            h("td", {}, h("span", { class: `badge ${action}` }, action)),
            h("td", {}, String(it.Precedence ?? "")),
            h("td", {}, it.Description || ""),
            h("td", {}, crd ? "CRD" : "API"),
            h("td", { class: "actions" }, edit, " ", del));
        })))));
  });
}

function confirmDelete(status, it, label) {
  const yes = h("button", { type: "button", class: "danger", id: "confirm-delete" }, "Delete");
  const no = h("button", { type: "button" }, "Cancel");
  status.replaceChildren(h("div", { class: "message warning", role: "alertdialog", "aria-label": `Delete ${label}?` },
    `Delete the intention ${label}? `, yes, " ", no));
  no.addEventListener("click", () => status.replaceChildren());
  yes.addEventListener("click", async () => {
    try {
      await api(`/v1/connect/intentions/exact?source=${encodeURIComponent(qualified(it.SourceNS, it.SourceName))}&destination=${encodeURIComponent(qualified(it.DestinationNS, it.DestinationName))}`, { method: "DELETE" });
      status.replaceChildren(message("success", `Deleted ${label}.`));
    } catch (e) {
      status.replaceChildren(message("error", e.message));
    }
  });
  yes.focus();
}

/** The API's error fields, by the form input that holds them. */
const FIELD_OF = {
  source: "SourceName", destination: "DestinationName", ns: "SourceNS",
  SourceName: "SourceName", SourceNS: "SourceNS", DestinationName: "DestinationName",
  DestinationNS: "DestinationNS", Action: "Action", Description: "Description",
};

async function intentionForm(id) {
  const editing = id !== null;
  document.title = `${editing ? "Edit" : "Create"} intention · meshd`;
  view.append(h("p", { class: "crumbs" }, h("a", { href: "/ui/intentions" }, "All intentions")),
    h("h1", {}, editing ? "Edit intention" : "Create intention"));
  let it = { SourceNS: "default", SourceName: "", DestinationNS: "default", DestinationName: "", Action: "deny", Description: "" };
  if (editing) {
    try {
      it = await api(`/v1/connect/intentions/${encodeURIComponent(id)}`);
    } catch (e) {
      view.append(readError(e, "this intention"));
      return;
    }
  }
  const field = (name, label, hint, value, readonly) => h("div", { class: "field" },
    h("label", { for: `f-${name}` }, label),
    h("input", { id: `f-${name}`, name, value: value || "", readonly: readonly || false, "aria-describedby": `e-${name} h-${name}`, autocomplete: "off" }),
    h("small", { id: `h-${name}` }, hint),
    h("p", { id: `e-${name}`, class: "field-error" }));
  const dstName = editing ? qualified(it.DestinationNS, it.DestinationName) : "*/*";
  let may = false;
  let why = whyNoWrite(editing ? dstName : "any destination");
  try {
    may = editing ? (await mayWriteIntentions([dstName])).get(dstName) : !!token();
  } catch (e) {
    why = `Whether your token may write could not be checked: ${e.message}`;
  }
  const save = writeButton(editing ? "Save" : "Create", may, why, { type: "submit", class: "primary", id: "save-intention" });
  if (may) save.setAttribute("type", "submit");
  const formError = h("div", { id: "form-error", role: "alert" });
  const form = h("form", { class: "intention", novalidate: true },
    h("fieldset", {}, h("legend", {}, "Source"),
      field("SourceNS", "Source namespace", "A namespace, or * for every namespace", it.SourceNS || "default", editing),
      field("SourceName", "Source service", "A service name, or * for every service", it.SourceName, editing)),
    h("fieldset", {}, h("legend", {}, "Destination"),
      field("DestinationNS", "Destination namespace", "A namespace, or * for every namespace", it.DestinationNS || "default", editing),
      field("DestinationName", "Destination service", "A service name, or * for every service", it.DestinationName, editing)),
    h("fieldset", { id: "f-Action", "aria-describedby": "e-Action" }, h("legend", {}, "Action"),
      ["allow", "deny"].map((a) => h("label", { class: "radio" },
        h("input", { type: "radio", name: "Action", value: a, checked: (it.Action || "deny") === a }), ` ${a}`)),
      h("p", { id: "e-Action", class: "field-error" })),
    h("div", { class: "field" },
      h("label", { for: "f-Description" }, "Description"),
      h("textarea", { id: "f-Description", name: "Description", rows: 2, "aria-describedby": "e-Description" }, it.Description || ""),
      h("p", { id: "e-Description", class: "field-error" })),
    formError,
    h("div", { class: "buttons" }, save, h("a", { class: "button", href: "/ui/intentions" }, "Cancel")));
  view.append(form);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!may) return;
    for (const e of form.querySelectorAll(".field-error")) e.textContent = "";
    for (const e of form.querySelectorAll("[aria-invalid]")) e.removeAttribute("aria-invalid");
    formError.replaceChildren();
    const data = new FormData(form);
    const body = {
      SourceNS: data.get("SourceNS").trim(), SourceName: data.get("SourceName").trim(),
      DestinationNS: data.get("DestinationNS").trim(), DestinationName: data.get("DestinationName").trim(),
      Action: data.get("Action") || "", Description: data.get("Description"),
    };
    try {
      if (editing) {
        await api(`/v1/connect/intentions/exact?source=${encodeURIComponent(qualified(it.SourceNS, it.SourceName))}&destination=${encodeURIComponent(dstName)}`, { method: "PUT", body });
      } else {
        await api("/v1/connect/intentions", { method: "POST", body });
      }
      navigate("/ui/intentions");
    } catch (e) {
      const f = e instanceof ApiError && e.field ? FIELD_OF[e.field] || null : null;
      if (f) {
        const slot = document.getElementById(`e-${f}`);
        slot.textContent = e.message;
        const input = document.getElementById(`f-${f}`);
        input.setAttribute("aria-invalid", "true");
        if (input.focus) input.focus();
      }
      formError.replaceChildren(message("error", f ? `${f}: ${e.message}` : e.message));
    }
  });
}

restoreLogin().then(route);
