// The API client of the UI: the token (session storage only), requests, errors, and what the
// token may do.

const TOKEN_KEY = "meshd.token";

/** The token the user logged in with, or null. */
export function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

/** Remembers (or, with null, forgets) the token for this tab. */
export function setToken(secret) {
  if (secret) sessionStorage.setItem(TOKEN_KEY, secret);
  else sessionStorage.removeItem(TOKEN_KEY);
}

/** An error the API answered with: `status`, `message` (its `Error`), `field` (its `Field`). */
export class ApiError extends Error {
  constructor(status, message, field) {
    super(message);
    this.status = status;
    this.field = field || null;
  }
}

/**
 * Calls the API: `GET path` or `method path` with a JSON `body`; the token of `as` (default:
 * the logged-in one) as `X-Consul-Token`. Resolves to the parsed JSON; rejects with ApiError.
 */
export async function api(path, { method = "GET", body, as } = {}) {
  const headers = {};
  const t = as === undefined ? token() : as;
  if (t) headers["X-Consul-Token"] = t;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let r;
  try {
    r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body), cache: "no-store" });
  } catch (e) {
    throw new ApiError(0, `The agent could not be reached: ${e.message}`);
  }
  const text = await r.text();
  let json = null;
  try { json = text ? JSON.parse(text) : null; } catch { json = null; }
  if (!r.ok) {
    const msg = (json && json.Error) || text.trim() || `${r.status} ${r.statusText}`;
    throw new ApiError(r.status, msg, json && json.Field);
  }
  return json;
}

/** `ns/name`, the form intentions and their endpoints use. */
export function qualified(ns, name) {
  return `${ns || "default"}/${name}`;
}

/** A service for display: `name` in namespace default, `ns/name` elsewhere. */
export function display(ns, name) {
  return !ns || ns === "default" ? name : `${ns}/${name}`;
}

/**
 * Whether the logged-in token may write intentions to each destination in `destinations`
 * (`ns/name` strings): a Map destination → true/false, asked of
 * `POST /v1/internal/acl/authorize` (Consul's UI does the same). Without a token every answer
 * is false.
 */
export async function mayWriteIntentions(destinations) {
  const out = new Map();
  const list = [...new Set(destinations)];
  if (!token() || list.length === 0) {
    for (const d of list) out.set(d, false);
    return out;
  }
  const answers = await api("/v1/internal/acl/authorize", {
    method: "POST",
    body: list.map((d) => {
      const [ns, name] = d.split("/");
      return { Resource: "intention", Access: "write", Segment: name, Namespace: ns };
    }),
  });
  list.forEach((d, i) => out.set(d, !!(answers[i] && answers[i].Allow)));
  return out;
}

/** Why a write control for intentions to `destination` is disabled, for its tooltip. */
export function whyNoWrite(destination) {
  return token()
    ? `Your token may not write intentions to ${destination} (that needs intentions:write on it)`
    : `Log in with an ACL token that may write intentions to ${destination}`;
}
