//! What Consul's web UI calls besides the catalog: `/v1/internal/ui/services` (the services
//! page), `/v1/internal/ui/service-topology/<svc>` (a service's upstreams and downstreams
//! with the intention decision of each edge) and `/v1/internal/acl/authorize` (which write
//! buttons to show). Shapes as Consul's `agent/ui_endpoint.go` and `agent/acl_endpoint.go`.

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;

use axum::extract::{Path as UrlPath, State as AxState};
use axum::routing::{get, post};
use axum::Router;
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::blocking::{block, mesh_index};
use super::catalog::{
    in_scope, protocol_name, registrations, scope, Registration, EXTERNAL_SOURCE,
};
use super::{filtered, indexed, text_body, ApiResult, AppState, Caller, Params};
use crate::acl::{decode_json, Need, Policy};
use crate::catalog::CatalogSnapshot;
use crate::Error;
use mesh_core::catalog::Protocol;
use mesh_core::intentions::{
    Decision, Matched, RuleSet, ServiceName, DEFAULT_NAMESPACE, DEFAULT_PARTITION, WILDCARD,
};

/// The routes of this module.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/internal/ui/services", get(services))
        .route("/v1/internal/ui/service-topology/", get(topology_unnamed))
        .route("/v1/internal/ui/service-topology/{service}", get(topology))
        .route("/v1/internal/acl/authorize", post(authorize))
        .route("/v1/namespaces", get(namespaces))
}

/// The fields of Consul Enterprise's `Namespace` a `?filter=` may select.
const NAMESPACE_FIELDS: &[&str] = &[
    "Name",
    "Description",
    "ACLs",
    "Meta",
    "Partition",
    "CreateIndex",
    "ModifyIndex",
];

/// `GET /v1/namespaces` (Consul Enterprise's, which Consul's UI reads for its namespace
/// menu): `default`, and every namespace a service or an intention names, by name.
/// Namespaces are not objects of their own here: they exist by being used, as Kubernetes
/// namespaces mirrored by consul-k8s do.
async fn namespaces(AxState(st): AxState<AppState>, caller: Caller, params: Params) -> ApiResult {
    caller.need(Need::Read)?;
    let filter = params.filter(NAMESPACE_FIELDS)?;
    block(&st, params.blocking()?, mesh_index).await;
    let index = mesh_index(&st);
    let (_, snap) = st.catalog.current();
    let state = st.store.state();
    let mut names: std::collections::BTreeSet<String> = [DEFAULT_NAMESPACE.to_owned()].into();
    names.extend(snap.instances.iter().map(|i| i.namespace.clone()));
    names.extend(snap.services.iter().map(|s| s.namespace.clone()));
    for it in state.rules.iter() {
        for n in [&it.source, &it.destination] {
            if n.namespace() != WILDCARD {
                names.insert(n.namespace().to_owned());
            }
        }
    }
    let items: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let description = if name == DEFAULT_NAMESPACE {
                "Builtin Default Namespace"
            } else {
                ""
            };
            json!({
                "Name": name,
                "Description": description,
                "ACLs": { "PolicyDefaults": [], "RoleDefaults": [] },
                "Partition": DEFAULT_PARTITION,
                "CreateIndex": index,
                "ModifyIndex": index,
            })
        })
        .collect();
    Ok(indexed(index, filtered(filter.as_ref(), &items)?))
}

/// The fields of Consul's `ServiceListingSummary` a `?filter=` may select (this agent
/// filters the summaries; Consul filters the registrations they are made from).
const SUMMARY_FIELDS: &[&str] = &[
    "Kind",
    "Name",
    "Datacenter",
    "Tags",
    "Nodes",
    "ExternalSources",
    "InstanceCount",
    "ChecksPassing",
    "ChecksWarning",
    "ChecksCritical",
    "InstancesPassing",
    "InstancesWarning",
    "InstancesCritical",
    "GatewayConfig",
    "TransparentProxy",
    "ConnectNative",
    "PeerName",
    "Namespace",
    "Partition",
    "ConnectedWithProxy",
    "ConnectedWithGateway",
];

/// Consul's `TopologySource*`: why an edge is in a topology.
const SOURCE_REGISTRATION: &str = "proxy-registration";
const SOURCE_SPECIFIC_INTENTION: &str = "specific-intention";
const SOURCE_WILDCARD_INTENTION: &str = "wildcard-intention";
const SOURCE_DEFAULT_ALLOW: &str = "default-allow";

/// Consul's `ServiceSummary` of the registrations of one service (namespace and name), and
/// whether a sidecar proxy serves it (`ConnectedWithProxy`).
fn summary(regs: &[&Registration<'_>], connected: bool) -> Value {
    let first = regs[0];
    let mut tags: Vec<String> = Vec::new();
    let mut nodes: Vec<String> = Vec::new();
    for r in regs {
        for t in &r.inst.tags {
            if !tags.contains(t) {
                tags.push(t.clone());
            }
        }
        let n = r.node();
        if !nodes.contains(&n) {
            nodes.push(n);
        }
    }
    nodes.sort();
    let passing = regs.iter().filter(|r| r.inst.ready).count();
    let mut v = json!({
        "Name": first.name(),
        "Datacenter": first.inst.datacenter,
        "Tags": tags,
        "Nodes": nodes,
        "ExternalSources": [EXTERNAL_SOURCE],
        "InstanceCount": regs.len(),
        "ChecksPassing": passing,
        "ChecksWarning": 0,
        "ChecksCritical": regs.len() - passing,
        // Instances by their worst check (one check each here); Consul's UI computes a
        // service's health from these.
        "InstancesPassing": passing,
        "InstancesWarning": 0,
        "InstancesCritical": regs.len() - passing,
        "GatewayConfig": {},
        // Every pod's proxy is transparent (the kernel steers its traffic).
        "TransparentProxy": true,
        "ConnectNative": false,
        "Namespace": first.inst.namespace,
        "Partition": DEFAULT_PARTITION,
        "ConnectedWithProxy": connected,
        "ConnectedWithGateway": false,
    });
    if first.proxy {
        v["Kind"] = first.kind().into();
    }
    v
}

/// The registrations of `snap`, grouped by (namespace, name), in Consul's order.
fn groups<'a>(
    regs: &'a [Registration<'a>],
) -> BTreeMap<(String, String), Vec<&'a Registration<'a>>> {
    let mut g: BTreeMap<(String, String), Vec<&Registration<'_>>> = BTreeMap::new();
    for r in regs {
        g.entry((r.inst.namespace.clone(), r.name()))
            .or_default()
            .push(r);
    }
    g
}

/// `GET /v1/internal/ui/services`: one `ServiceListingSummary` per service and per sidecar
/// proxy service (`Kind` `connect-proxy`; Consul's UI leaves those out of its list).
async fn services(AxState(st): AxState<AppState>, caller: Caller, params: Params) -> ApiResult {
    caller.need(Need::Read)?;
    let scope = scope(&params)?;
    let filter = params.filter(SUMMARY_FIELDS)?;
    block(&st, params.blocking()?, mesh_index).await;
    let index = mesh_index(&st);
    let (_, snap) = st.catalog.current();
    let regs: Vec<Registration<'_>> = registrations(&snap)
        .into_iter()
        .filter(|r| in_scope(&scope, &r.inst.namespace))
        .collect();
    let items: Vec<Value> = groups(&regs)
        .values()
        .map(|g| summary(g, !g[0].proxy))
        .collect();
    Ok(indexed(index, filtered(filter.as_ref(), &items)?))
}

/// One edge's decision: Consul's `IntentionDecisionSummary`, its topology source (when the
/// edge exists because of it) and `DecidedBy`, which intention (or the default policy)
/// decided.
struct Edge {
    decision: Decision,
    summary: Value,
    decided_by: Value,
}

fn edge(rules: &RuleSet, src: &ServiceName, dst: &ServiceName) -> Edge {
    let decision = rules.check(src, dst);
    let default_allow = rules.default_policy().is_allow();
    let matched = match &decision.matched {
        Matched::Intention { id, .. } => rules.get(id),
        Matched::Default => None,
    };
    let summary = json!({
        "Allowed": decision.allowed,
        // As Consul's IntentionDecision: an L7 intention is not an L4 allow (its requests are
        // decided one by one), so `Allowed` is false and `HasPermissions` true.
        "HasPermissions": decision.has_permissions,
        "ExternalSource": matched
            .and_then(|it| it.meta.get("external-source"))
            .cloned()
            .unwrap_or_default(),
        "HasExact": rules.get_exact(src, dst).is_some(),
        "DefaultAllow": default_allow,
    });
    let decided_by = match matched {
        Some(it) => json!({
            "Kind": "intention",
            "IntentionID": it.id,
            "SourceNS": it.source.namespace(),
            "SourceName": it.source.name(),
            "DestinationNS": it.destination.namespace(),
            "DestinationName": it.destination.name(),
            "Action": it.action.to_string(),
            "Precedence": it.precedence,
            "Text": format!("{} => {}", it.source, it.destination),
        }),
        None => json!({
            "Kind": "default-policy",
            "Action": rules.default_policy().to_string(),
            "Text": format!("default policy ({})", rules.default_policy()),
        }),
    };
    Edge {
        decision,
        summary,
        decided_by,
    }
}

/// The topology source of an edge that exists because the rules allow it.
fn intention_source(rules: &RuleSet, d: &Decision) -> &'static str {
    match &d.matched {
        Matched::Intention { id, .. } => match rules.get(id) {
            Some(it)
                if [&it.source, &it.destination]
                    .iter()
                    .all(|n| n.name() != WILDCARD && n.namespace() != WILDCARD) =>
            {
                SOURCE_SPECIFIC_INTENTION
            }
            _ => SOURCE_WILDCARD_INTENTION,
        },
        Matched::Default => SOURCE_DEFAULT_ALLOW,
    }
}

fn service_name(ns: &str, name: &str) -> Option<ServiceName> {
    ServiceName::new(ns, name).ok()
}

/// The upstreams and downstreams of `me` as Consul's `ServiceTopology` computes them in
/// transparent mode: an upstream is a service an instance of `me` names as an explicit
/// upstream (`proxy-registration`, allowed or not) or one the rules let `me` reach (by a
/// specific or wildcard intention, or the default policy); a downstream likewise the other
/// way. Each is a summary of that service with `Source`, `Intention` and `DecidedBy`.
fn topology_json(snap: &CatalogSnapshot, rules: &RuleSet, me: &ServiceName) -> Value {
    let regs = registrations(snap);
    let services: BTreeMap<(String, String), Vec<&Registration<'_>>> = groups(&regs)
        .into_iter()
        .filter(|(_, g)| !g[0].proxy)
        .collect();
    let key = |n: &ServiceName| (n.namespace().to_owned(), n.name().to_owned());
    let mine: Vec<&Registration<'_>> = services.get(&key(me)).cloned().unwrap_or_default();
    let mut up: BTreeMap<(String, String), &'static str> = BTreeMap::new();
    for r in &mine {
        for u in &r.inst.upstreams {
            up.insert(
                (u.namespace.clone(), u.service.clone()),
                SOURCE_REGISTRATION,
            );
        }
    }
    let mut down: BTreeMap<(String, String), &'static str> = BTreeMap::new();
    for ((ns, name), g) in &services {
        if (ns.as_str(), name.as_str()) == (me.namespace(), me.name()) {
            continue;
        }
        if g.iter().any(|r| {
            r.inst
                .upstreams
                .iter()
                .any(|u| u.namespace == me.namespace() && u.service == me.name())
        }) {
            down.insert((ns.clone(), name.clone()), SOURCE_REGISTRATION);
        }
        let Some(other) = service_name(ns, name) else {
            continue;
        };
        if let Entry::Vacant(e) = up.entry((ns.clone(), name.clone())) {
            let d = rules.check(me, &other);
            if d.allowed {
                e.insert(intention_source(rules, &d));
            }
        }
        if let Entry::Vacant(e) = down.entry((ns.clone(), name.clone())) {
            let d = rules.check(&other, me);
            if d.allowed {
                e.insert(intention_source(rules, &d));
            }
        }
    }
    let side = |edges: BTreeMap<(String, String), &'static str>, upstream: bool| -> Vec<Value> {
        edges
            .into_iter()
            .filter_map(|((ns, name), source)| {
                let g = services.get(&(ns.clone(), name.clone()))?;
                let other = service_name(&ns, &name)?;
                let e = if upstream {
                    edge(rules, me, &other)
                } else {
                    edge(rules, &other, me)
                };
                let mut v = summary(g, false);
                let o = v.as_object_mut()?;
                o.remove("ConnectedWithProxy");
                o.remove("ConnectedWithGateway");
                o.insert("Source".into(), source.into());
                o.insert("Intention".into(), e.summary);
                o.insert("DecidedBy".into(), e.decided_by);
                debug_assert!(source == SOURCE_REGISTRATION || e.decision.allowed);
                Some(v)
            })
            .collect()
    };
    let protocol = snap
        .services
        .iter()
        .find(|s| s.namespace == me.namespace() && s.name == me.name())
        .map_or(Protocol::Tcp, |s| s.protocol);
    json!({
        "Protocol": protocol_name(protocol),
        "TransparentProxy": !mine.is_empty(),
        "Upstreams": side(up, true),
        "Downstreams": side(down, false),
        "FilteredByACLs": false,
    })
}

async fn topology_unnamed() -> ApiResult {
    Err(Error::bad("service", "Missing service name"))
}

/// `GET /v1/internal/ui/service-topology/<svc>?kind=`: `kind` is required, as in Consul, and
/// is `""` (a typical service) or `ingress-gateway` (this agent has no gateways: nothing is
/// upstream or downstream of one).
async fn topology(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    caller.need(Need::Read)?;
    let kind = params
        .optional("kind")?
        .ok_or_else(|| Error::bad("kind", "Missing service kind"))?
        .to_owned();
    if !matches!(kind.as_str(), "" | "ingress-gateway") {
        return Err(Error::bad(
            "kind",
            format!("Unsupported service kind {kind:?}"),
        ));
    }
    let ns = params
        .namespace(false)?
        .unwrap_or(DEFAULT_NAMESPACE)
        .to_owned();
    let me = ServiceName::new(ns, name.clone())
        .map_err(|e| Error::bad("service", format!("service {name:?} is invalid: {e}")))?;
    block(&st, params.blocking()?, mesh_index).await;
    let index = mesh_index(&st);
    let (_, snap) = st.catalog.current();
    let state = st.store.state();
    let body = if kind.is_empty() {
        topology_json(&snap, &state.rules, &me)
    } else {
        json!({
            "Protocol": "tcp",
            "TransparentProxy": false,
            "Upstreams": [],
            "Downstreams": [],
            "FilteredByACLs": false,
        })
    };
    Ok(indexed(index, body))
}

/// Consul's limit on one `authorize` request.
const MAX_AUTHORIZATIONS: usize = 64;

/// One question of `POST /v1/internal/acl/authorize` (Consul's `ACLAuthorizationRequest`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizationRequest {
    #[serde(rename = "Resource")]
    resource: String,
    #[serde(rename = "Segment", default)]
    segment: String,
    #[serde(rename = "Access")]
    access: String,
    #[serde(rename = "Namespace", default)]
    namespace: String,
    #[serde(rename = "Partition", default)]
    partition: String,
}

/// Consul's ACL resources.
const RESOURCES: &[&str] = &[
    "acl",
    "agent",
    "event",
    "intention",
    "key",
    "keyring",
    "mesh",
    "node",
    "operator",
    "peering",
    "query",
    "service",
    "session",
];

/// Whether `policies` grant `access` to `resource`/`segment` in namespace `ns`: operators
/// everything; `read-only` reading everything; `intention-write:<pattern>` reading the
/// catalog and the intentions whose destination the pattern covers, and writing those (an
/// empty segment asks about every service of the namespace, as Consul's UI asks);
/// `service-write:<pattern>` reading the catalog and writing the services it covers.
fn allowed(policies: &[Policy], resource: &str, segment: &str, access: &str, ns: &str) -> bool {
    let write = access == "write";
    policies.iter().any(|p| match p {
        Policy::Operator => true,
        Policy::ReadOnly => !write,
        Policy::IntentionWrite(pattern) => match resource {
            "intention" => {
                if segment.is_empty() {
                    pattern.name() == WILDCARD
                        && (pattern.namespace() == WILDCARD || pattern.namespace() == ns)
                } else {
                    ServiceName::new(ns, segment).is_ok_and(|dst| pattern.matches(&dst))
                }
            }
            "service" | "node" => !write,
            _ => false,
        },
        // Consul's `service:write` on the services the pattern covers (their
        // `service-defaults`), which includes reading them; the catalog is readable.
        Policy::ServiceWrite(pattern) => match resource {
            "service" => {
                if !write {
                    true
                } else if segment.is_empty() {
                    pattern.name() == WILDCARD
                        && (pattern.namespace() == WILDCARD || pattern.namespace() == ns)
                } else {
                    ServiceName::new(ns, segment).is_ok_and(|svc| pattern.matches(&svc))
                }
            }
            "node" => !write,
            _ => false,
        },
    })
}

/// `POST /v1/internal/acl/authorize`: for each `{Resource, Segment, Access}` the same with
/// `Allow`, as Consul's (at most 64 per request; an unknown resource or access is a 400).
async fn authorize(caller: Caller, params: Params, body: Bytes) -> ApiResult {
    let req_ns = params.namespace(false)?.map(str::to_owned);
    let reqs: Vec<AuthorizationRequest> = decode_json(text_body(&body)?)?;
    if reqs.len() > MAX_AUTHORIZATIONS {
        return Err(Error::BadRequest {
            field: None,
            message: format!(
                "Refusing to authorize more than {MAX_AUTHORIZATIONS} requests at once"
            ),
        });
    }
    let mut out = Vec::with_capacity(reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        if !RESOURCES.contains(&r.resource.as_str()) {
            return Err(Error::bad(
                format!("[{i}].Resource"),
                format!(
                    "Invalid request[{i}]: Unknown resource type: {:?}",
                    r.resource
                ),
            ));
        }
        if !matches!(r.access.as_str(), "read" | "list" | "write") {
            return Err(Error::bad(
                format!("[{i}].Access"),
                format!(
                    "Invalid request[{i}]: Invalid access level for resource {}: {:?}",
                    r.resource, r.access
                ),
            ));
        }
        if !r.partition.is_empty() && r.partition != DEFAULT_PARTITION {
            return Err(Error::bad(
                format!("[{i}].Partition"),
                format!(
                    "Invalid request[{i}]: partition {:?} does not exist; this agent serves only partition {DEFAULT_PARTITION:?}",
                    r.partition
                ),
            ));
        }
        let ns = if r.namespace.is_empty() {
            req_ns
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned())
        } else {
            r.namespace.clone()
        };
        let allow = allowed(&caller.0.policies, &r.resource, &r.segment, &r.access, &ns);
        let mut v = json!({
            "Resource": r.resource,
            "Access": r.access,
            "Allow": allow,
        });
        if !r.segment.is_empty() {
            v["Segment"] = r.segment.clone().into();
        }
        if !r.namespace.is_empty() {
            v["Namespace"] = r.namespace.clone().into();
        }
        if !r.partition.is_empty() {
            v["Partition"] = r.partition.clone().into();
        }
        out.push(v);
    }
    Ok(axum::response::IntoResponse::into_response(axum::Json(out)))
}
