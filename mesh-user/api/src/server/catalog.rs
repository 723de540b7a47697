//! `/v1/catalog/*` and `/v1/health/*`: the mesh's services and instances in Consul's JSON,
//! as consul-k8s registers them.
//!
//! Each pod in the mesh is two registrations, as consul-k8s makes them: the service
//! (`ID` `<pod>-<service>`) and its sidecar proxy (`Kind` `connect-proxy`, service
//! `<service>-sidecar-proxy`, `ID` `<pod>-<service>-sidecar-proxy`, port 20000, `Proxy.Mode`
//! `transparent` with the pod's upstreams), both on the node `<node>-virtual` (consul-k8s'
//! synthetic node), each with one check: `Kubernetes Readiness Check`, passing when the pod
//! is Ready. The service's own `Proxy.Upstreams` lists the pod's explicit upstreams too (in
//! Consul only its proxy's does), so a client reading one registration sees them.
//!
//! `?ns=` (or `X-Consul-Namespace`) selects the namespace (`default` when absent, `*` for
//! every one), `?filter=` selects entries, `?index=`/`?wait=` block.

use std::collections::{BTreeMap, BTreeSet};

use axum::extract::{Path as UrlPath, State as AxState};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Map, Value};

use super::blocking::{block, mesh_index};
use super::{filtered, indexed, ApiResult, AppState, Caller, Params};
use crate::acl::Need;
use crate::catalog::{CatalogSnapshot, Instance};
use crate::Error;
use mesh_core::catalog::Protocol;
use mesh_core::intentions::{DEFAULT_NAMESPACE, DEFAULT_PARTITION, WILDCARD};

/// The routes of this module.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/catalog/datacenters", get(datacenters))
        .route("/v1/catalog/services", get(services))
        .route("/v1/catalog/service/{service}", get(service))
        .route("/v1/catalog/connect/{service}", get(connect))
        .route("/v1/health/service/{service}", get(health_service))
        .route("/v1/health/connect/{service}", get(health_connect))
}

/// The suffix consul-k8s gives a sidecar proxy's service name and ID.
pub(super) const SIDECAR_SUFFIX: &str = "-sidecar-proxy";
/// The suffix consul-k8s gives the synthetic node of a Kubernetes node.
pub(super) const VIRTUAL_NODE_SUFFIX: &str = "-virtual";
/// Consul's `Kind` of a sidecar proxy.
pub(super) const KIND_CONNECT_PROXY: &str = "connect-proxy";
/// The name of the one check of each registration (consul-k8s').
pub(super) const READINESS_CHECK_NAME: &str = "Kubernetes Readiness Check";
/// Its type (consul-k8s').
pub(super) const READINESS_CHECK_TYPE: &str = "kubernetes-readiness";
/// The external source consul-k8s marks its registrations with (`Meta["external-source"]`).
pub(super) const EXTERNAL_SOURCE: &str = "kubernetes";

/// The fields of Consul's `ServiceNode` (`/v1/catalog/service/<svc>`) a `?filter=` may select.
const SERVICE_NODE_FIELDS: &[&str] = &[
    "ID",
    "Node",
    "Address",
    "Datacenter",
    "TaggedAddresses",
    "NodeMeta",
    "ServiceKind",
    "ServiceID",
    "ServiceName",
    "ServiceTags",
    "ServiceAddress",
    "ServiceTaggedAddresses",
    "ServiceWeights",
    "ServiceMeta",
    "ServicePort",
    "ServiceSocketPath",
    "ServiceEnableTagOverride",
    "ServiceProxy",
    "ServiceConnect",
    "ServiceLocality",
    "PeerName",
    "Namespace",
    "Partition",
    "CreateIndex",
    "ModifyIndex",
];

/// The fields of Consul's `CheckServiceNode` (`/v1/health/service/<svc>`).
const CHECK_SERVICE_NODE_FIELDS: &[&str] = &["Node", "Service", "Checks"];

/// One registration: a pod's service, or its sidecar proxy.
#[derive(Clone, Copy)]
pub(super) struct Registration<'a> {
    /// The pod.
    pub inst: &'a Instance,
    /// Whether this is the pod's sidecar proxy.
    pub proxy: bool,
}

impl<'a> Registration<'a> {
    /// Consul's `Service`: `api-v1` or `api-v1-sidecar-proxy`.
    pub fn name(&self) -> String {
        if self.proxy {
            format!("{}{SIDECAR_SUFFIX}", self.inst.service)
        } else {
            self.inst.service.clone()
        }
    }

    /// Consul's service `ID`: `<pod>-<service>` (and `-sidecar-proxy`).
    pub fn id(&self) -> String {
        let base = format!("{}-{}", self.inst.pod, self.inst.service);
        if self.proxy {
            base + SIDECAR_SUFFIX
        } else {
            base
        }
    }

    /// The synthetic node's name.
    pub fn node(&self) -> String {
        format!("{}{VIRTUAL_NODE_SUFFIX}", self.inst.node)
    }

    /// `""` or `connect-proxy`.
    pub fn kind(&self) -> &'static str {
        if self.proxy {
            KIND_CONNECT_PROXY
        } else {
            ""
        }
    }

    fn port(&self) -> u16 {
        if self.proxy {
            self.inst.inbound_port
        } else {
            self.inst.port
        }
    }

    fn meta(&self) -> Value {
        let mut m: Map<String, Value> = self
            .inst
            .meta
            .iter()
            .map(|(k, v)| (k.clone(), v.clone().into()))
            .collect();
        m.insert("external-source".into(), EXTERNAL_SOURCE.into());
        m.insert("k8s-namespace".into(), self.inst.namespace.clone().into());
        m.insert("k8s-service-name".into(), self.inst.service.clone().into());
        m.insert(
            "managed-by".into(),
            "consul-k8s-endpoints-controller".into(),
        );
        m.insert("pod-name".into(), self.inst.pod.clone().into());
        m.insert("synthetic-node".into(), "true".into());
        Value::Object(m)
    }

    fn upstreams(&self) -> Value {
        self.inst
            .upstreams
            .iter()
            .map(|u| {
                json!({
                    "DestinationType": "service",
                    "DestinationNamespace": u.namespace,
                    "DestinationPartition": DEFAULT_PARTITION,
                    "DestinationName": u.service,
                    "Datacenter": u.datacenter,
                    "LocalBindPort": u.bind_port,
                    "MeshGateway": {},
                })
            })
            .collect()
    }

    /// Consul's `ConnectProxyConfig`: the sidecar's (destination, local app, transparent
    /// mode, upstreams); for the service itself, Consul's empty one plus the pod's upstreams.
    fn proxy_config(&self) -> Value {
        if self.proxy {
            json!({
                "DestinationServiceName": self.inst.service,
                "DestinationServiceID": Registration { proxy: false, ..*self }.id(),
                "LocalServiceAddress": "127.0.0.1",
                "LocalServicePort": self.inst.port,
                "Mode": "transparent",
                "TransparentProxy": { "OutboundListenerPort": mesh_common::OUTBOUND_PORT },
                "Upstreams": self.upstreams(),
                "MeshGateway": {},
                "Expose": {},
            })
        } else {
            json!({ "Upstreams": self.upstreams(), "MeshGateway": {}, "Expose": {} })
        }
    }

    /// Consul's `Node`.
    pub fn node_json(&self, index: u64) -> Value {
        json!({
            "ID": "",
            "Node": self.node(),
            "Address": self.inst.node_address.to_string(),
            "Datacenter": self.inst.datacenter,
            "TaggedAddresses": {},
            "Meta": { "synthetic-node": "true" },
            "Partition": DEFAULT_PARTITION,
            "CreateIndex": index,
            "ModifyIndex": index,
        })
    }

    /// Consul's `NodeService` (the `Service` of `/v1/health/service`).
    pub fn service_json(&self, index: u64) -> Value {
        let mut v = json!({
            "ID": self.id(),
            "Service": self.name(),
            "Tags": self.inst.tags,
            "Address": self.inst.address.to_string(),
            "TaggedAddresses": {},
            "Meta": self.meta(),
            "Port": self.port(),
            "Weights": { "Passing": 1, "Warning": 1 },
            "EnableTagOverride": false,
            "Proxy": self.proxy_config(),
            "Connect": {},
            "PeerName": "",
            "Datacenter": self.inst.datacenter,
            "Namespace": self.inst.namespace,
            "Partition": DEFAULT_PARTITION,
            "CreateIndex": index,
            "ModifyIndex": index,
        });
        if self.proxy {
            v["Kind"] = KIND_CONNECT_PROXY.into();
        }
        v
    }

    /// `passing` when the pod is Ready, else `critical`.
    pub fn status(&self) -> &'static str {
        if self.inst.ready {
            "passing"
        } else {
            "critical"
        }
    }

    /// Consul's `HealthCheck`: the readiness check consul-k8s registers.
    pub fn check_json(&self, index: u64) -> Value {
        let output = if self.inst.ready {
            "Kubernetes health checks passing".to_owned()
        } else {
            format!(
                "Pod \"{}/{}\" is not ready",
                self.inst.namespace, self.inst.pod
            )
        };
        json!({
            "Node": self.node(),
            "CheckID": format!("{}/{}", self.inst.namespace, self.id()),
            "Name": READINESS_CHECK_NAME,
            "Status": self.status(),
            "Notes": "",
            "Output": output,
            "ServiceID": self.id(),
            "ServiceName": self.name(),
            "ServiceTags": self.inst.tags,
            "Type": READINESS_CHECK_TYPE,
            "Interval": "",
            "Timeout": "",
            "ExposedPort": 0,
            "Definition": {},
            "Namespace": self.inst.namespace,
            "Partition": DEFAULT_PARTITION,
            "CreateIndex": index,
            "ModifyIndex": index,
        })
    }

    /// Consul's flat `ServiceNode` (`/v1/catalog/service/<svc>`).
    fn service_node_json(&self, index: u64) -> Value {
        json!({
            "ID": "",
            "Node": self.node(),
            "Address": self.inst.node_address.to_string(),
            "Datacenter": self.inst.datacenter,
            "TaggedAddresses": {},
            "NodeMeta": { "synthetic-node": "true" },
            "ServiceKind": self.kind(),
            "ServiceID": self.id(),
            "ServiceName": self.name(),
            "ServiceTags": self.inst.tags,
            "ServiceAddress": self.inst.address.to_string(),
            "ServiceTaggedAddresses": {},
            "ServiceWeights": { "Passing": 1, "Warning": 1 },
            "ServiceMeta": self.meta(),
            "ServicePort": self.port(),
            "ServiceSocketPath": "",
            "ServiceEnableTagOverride": false,
            "ServiceProxy": self.proxy_config(),
            "ServiceConnect": {},
            "PeerName": "",
            "Namespace": self.inst.namespace,
            "Partition": DEFAULT_PARTITION,
            "CreateIndex": index,
            "ModifyIndex": index,
        })
    }

    /// Consul's `CheckServiceNode` (`/v1/health/service/<svc>`).
    fn check_service_node_json(&self, index: u64) -> Value {
        json!({
            "Node": self.node_json(index),
            "Service": self.service_json(index),
            "Checks": [self.check_json(index)],
        })
    }
}

/// Every registration of the snapshot, by namespace, name, node and ID.
pub(super) fn registrations(snap: &CatalogSnapshot) -> Vec<Registration<'_>> {
    let mut all: Vec<Registration<'_>> = snap
        .instances
        .iter()
        .flat_map(|inst| {
            [false, true]
                .into_iter()
                .map(move |proxy| Registration { inst, proxy })
        })
        .collect();
    all.sort_by_key(|r| (r.inst.namespace.clone(), r.name(), r.node(), r.id()));
    all
}

/// The namespace a read covers: `?ns=` or `X-Consul-Namespace`, `default` when absent,
/// `None` (every one) for `*`.
pub(super) fn scope(params: &Params) -> Result<Option<String>, Error> {
    Ok(match params.namespace(true)? {
        Some(WILDCARD) => None,
        Some(ns) => Some(ns.to_owned()),
        None => Some(DEFAULT_NAMESPACE.to_owned()),
    })
}

/// Whether `ns` is in the read's scope.
pub(super) fn in_scope(scope: &Option<String>, ns: &str) -> bool {
    scope.as_deref().is_none_or(|s| s == ns)
}

/// Consul's name for a protocol (`tcp`, `http`).
pub(super) fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Http => "http",
    }
}

/// The datacenters: this agent's (Consul's `["dc1"]` shape).
async fn datacenters(AxState(st): AxState<AppState>, caller: Caller) -> ApiResult {
    caller.need(Need::Read)?;
    let (_, snap) = st.catalog.current();
    let dc = if snap.datacenter.is_empty() {
        mesh_core::catalog::DEFAULT_DATACENTER.to_owned()
    } else {
        snap.datacenter.clone()
    };
    Ok(axum::response::IntoResponse::into_response(axum::Json(
        json!([dc]),
    )))
}

/// The registrations `pick` keeps in scope, with `?tag=` (every one given must be among the
/// tags) and `?filter=` over `fields` applied to `to_json`'s output.
async fn select(
    st: &AppState,
    caller: &Caller,
    params: &Params,
    fields: &[&str],
    to_json: impl Fn(&Registration<'_>, u64) -> Value,
    pick: impl Fn(&Registration<'_>) -> bool,
) -> ApiResult {
    caller.need(Need::Read)?;
    let scope = scope(params)?;
    let filter = params.filter(fields)?;
    let tags: Vec<String> = params.all("tag").into_iter().map(str::to_owned).collect();
    block(st, params.blocking()?, mesh_index).await;
    let index = mesh_index(st);
    let (_, snap) = st.catalog.current();
    let items: Vec<Value> = registrations(&snap)
        .iter()
        .filter(|r| in_scope(&scope, &r.inst.namespace))
        .filter(|r| pick(r))
        .filter(|r| tags.iter().all(|t| r.inst.tags.contains(t)))
        .map(|r| to_json(r, index))
        .collect();
    Ok(indexed(index, filtered(filter.as_ref(), &items)?))
}

async fn service(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    select(
        &st,
        &caller,
        &params,
        SERVICE_NODE_FIELDS,
        |r, i| r.service_node_json(i),
        |r| r.name() == name,
    )
    .await
}

async fn connect(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    select(
        &st,
        &caller,
        &params,
        SERVICE_NODE_FIELDS,
        |r, i| r.service_node_json(i),
        |r| is_proxy_of(r, &name),
    )
    .await
}

/// Whether `r` is a sidecar proxy of service `name`.
fn is_proxy_of(r: &Registration<'_>, name: &str) -> bool {
    r.proxy && r.inst.service == name
}

/// `?passing`: only registrations whose checks all pass (Consul reads the parameter's
/// presence; `passing=false` turns it off).
fn passing_only(params: &Params) -> Result<bool, Error> {
    Ok(match params.optional("passing")? {
        None => false,
        Some(v) => !matches!(v, "false" | "0"),
    })
}

async fn health_service(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    let passing = passing_only(&params)?;
    let connect = matches!(params.optional("connect")?, Some(v) if v != "false" && v != "0");
    select(
        &st,
        &caller,
        &params,
        CHECK_SERVICE_NODE_FIELDS,
        |r, i| r.check_service_node_json(i),
        |r| {
            let named = if connect {
                is_proxy_of(r, &name)
            } else {
                r.name() == name
            };
            named && (!passing || r.inst.ready)
        },
    )
    .await
}

async fn health_connect(
    AxState(st): AxState<AppState>,
    caller: Caller,
    params: Params,
    UrlPath(name): UrlPath<String>,
) -> ApiResult {
    let passing = passing_only(&params)?;
    select(
        &st,
        &caller,
        &params,
        CHECK_SERVICE_NODE_FIELDS,
        |r, i| r.check_service_node_json(i),
        |r| is_proxy_of(r, &name) && (!passing || r.inst.ready),
    )
    .await
}

/// `{"<service>": [tags]}` for every service (and sidecar proxy) in scope; `?filter=`
/// selects over the `ServiceNode` fields, as Consul's.
async fn services(AxState(st): AxState<AppState>, caller: Caller, params: Params) -> ApiResult {
    caller.need(Need::Read)?;
    let scope = scope(&params)?;
    let filter = params.filter(SERVICE_NODE_FIELDS)?;
    block(&st, params.blocking()?, mesh_index).await;
    let index = mesh_index(&st);
    let (_, snap) = st.catalog.current();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in registrations(&snap) {
        if !in_scope(&scope, &r.inst.namespace) {
            continue;
        }
        if let Some(f) = &filter {
            let v = r.service_node_json(index);
            if !f
                .matches(&v)
                .map_err(|e| Error::bad("filter", e.to_string()))?
            {
                continue;
            }
        }
        out.entry(r.name())
            .or_default()
            .extend(r.inst.tags.iter().cloned());
    }
    Ok(indexed(index, out))
}
