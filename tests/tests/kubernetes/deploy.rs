//! `deploy/`, the manifests users install with `kubectl apply -k deploy/`: every object is its
//! Kubernetes kind (deserialised with `k8s-openapi`, nothing dropped), the kustomization lists
//! every file, the DaemonSet mounts what the agent opens, and RBAC grants what the agent
//! watches and what `meshd ca` asks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, PodSpec, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of `deploy/<file>`.
fn documents(file: &str) -> Vec<Value> {
    let path = deploy_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

fn kustomization() -> Value {
    documents("kustomization.yaml").remove(0)
}

fn resources() -> Vec<String> {
    kustomization()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect()
}

/// Every object of the kustomization's resources, with the file it is in.
fn objects() -> Vec<(String, Value)> {
    resources()
        .into_iter()
        .flat_map(|f| documents(&f).into_iter().map(move |d| (f.clone(), d)))
        .collect()
}

/// Drops what serialising a typed object leaves out on its own (empty maps and lists are kept
/// by both sides, so nothing else).
fn typed<T: DeserializeOwned + serde::Serialize>(file: &str, doc: &Value) -> T {
    let t: T = serde_json::from_value(doc.clone())
        .unwrap_or_else(|e| panic!("{file}: {} {}: {e}", doc["kind"], doc["metadata"]["name"]));
    // Nothing was dropped: an unknown or misspelt field would vanish in the round trip.
    let back = serde_json::to_value(&t).unwrap();
    assert_eq!(
        &back, doc,
        "{file}: {} does not round-trip through its type",
        doc["kind"]
    );
    t
}

fn find<'a>(objects: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    &objects
        .iter()
        .find(|(_, o)| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/"))
        .1
}

#[test]
fn every_object_is_its_kubernetes_kind() {
    let objects = objects();
    assert!(!objects.is_empty());
    for (file, doc) in &objects {
        match doc["kind"].as_str().unwrap_or_default() {
            "Namespace" => drop(typed::<Namespace>(file, doc)),
            "CustomResourceDefinition" => drop(typed::<CustomResourceDefinition>(file, doc)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(file, doc)),
            "ClusterRole" => drop(typed::<ClusterRole>(file, doc)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(file, doc)),
            "Deployment" => drop(typed::<Deployment>(file, doc)),
            "Service" => drop(typed::<Service>(file, doc)),
            "DaemonSet" => drop(typed::<DaemonSet>(file, doc)),
            other => panic!("{file}: kind {other:?} is not checked by this test"),
        }
        // Namespaced objects say where they go (kustomize sets no namespace here).
        let cluster_scoped = [
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ];
        if !cluster_scoped.contains(&doc["kind"].as_str().unwrap()) {
            assert_eq!(
                doc["metadata"]["namespace"], "mesh-system",
                "{file}: {}",
                doc["metadata"]["name"]
            );
        }
    }
}

#[test]
fn the_kustomization_lists_every_file_and_only_files_that_exist() {
    let listed: BTreeSet<String> = resources().into_iter().collect();
    let mut on_disk = BTreeSet::new();
    let mut stack = vec![deploy_dir()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                let rel = path
                    .strip_prefix(deploy_dir())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned();
                if rel != "kustomization.yaml" {
                    on_disk.insert(rel);
                }
            }
        }
    }
    assert_eq!(
        listed, on_disk,
        "kustomization.yaml resources vs the YAML files in deploy/"
    );
    // The generated root lives in deploy/ca, which git ignores (a key must never be committed).
    let k = kustomization();
    for gen in ["secretGenerator", "configMapGenerator"] {
        for g in k[gen].as_array().unwrap() {
            for f in g["files"].as_array().unwrap() {
                let f = f.as_str().unwrap();
                assert!(f.starts_with("ca/") && f.ends_with(".pem"), "{gen}: {f}");
            }
        }
    }
    let ignore = std::fs::read_to_string(deploy_dir().join("ca/.gitignore")).unwrap();
    assert!(ignore.lines().any(|l| l == "*.pem"), "{ignore}");
    // The generated names are the ones the workloads mount.
    let objects = objects();
    let ca = pod_spec(find(&objects, "Deployment", "meshd-ca"));
    let secret = ca
        .volumes
        .unwrap()
        .into_iter()
        .find_map(|v| v.secret)
        .unwrap();
    assert_eq!(
        secret.secret_name.as_deref(),
        Some(k["secretGenerator"][0]["name"].as_str().unwrap())
    );
    assert_eq!(
        secret.default_mode,
        Some(0o400),
        "the CA refuses a key readable by others"
    );
    let ds = pod_spec(find(&objects, "DaemonSet", "meshd"));
    let cm = ds
        .volumes
        .unwrap()
        .into_iter()
        .find_map(|v| v.config_map)
        .unwrap();
    assert_eq!(
        cm.name,
        k["configMapGenerator"][0]["name"].as_str().unwrap()
    );
}

fn pod_spec(workload: &Value) -> PodSpec {
    serde_json::from_value(workload["spec"]["template"]["spec"].clone()).unwrap()
}

#[test]
fn the_daemonset_mounts_every_host_path_the_agent_opens() {
    let objects = objects();
    let spec = pod_spec(find(&objects, "DaemonSet", "meshd"));
    let volumes = spec.volumes.clone().unwrap();
    let containers: Vec<_> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .collect();
    for m in mesh_agent::host::DAEMONSET_MOUNTS {
        let c = containers
            .iter()
            .find(|c| c.name == m.container_name)
            .unwrap_or_else(|| panic!("no container {}", m.container_name));
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|vm| vm.mount_path == m.container)
            .unwrap_or_else(|| panic!("{} mounts nothing at {} ({})", c.name, m.container, m.why));
        let volume = volumes.iter().find(|v| v.name == mount.name).unwrap();
        let host = volume
            .host_path
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not a hostPath", mount.name));
        assert_eq!(host.path, m.host, "{}: {}", m.container, m.why);
        if m.writable {
            assert_ne!(
                mount.read_only,
                Some(true),
                "{} must be writable: {}",
                m.container,
                m.why
            );
        }
    }
    // The pod locator reads pod cgroups' `cgroup.procs`, where processes of another pid
    // namespace show as 0: the agent must share the node's.
    assert_eq!(
        spec.host_pid,
        Some(true),
        "hostPID: the pod locator needs the node's pids"
    );
    // The CA client's defaults are where the DaemonSet puts the token and the root.
    let meshd = spec.containers.iter().find(|c| c.name == "meshd").unwrap();
    let mounted_at = |file: &str| {
        let dir = Path::new(file)
            .parent()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        let vm = meshd
            .volume_mounts
            .iter()
            .flatten()
            .find(|vm| vm.mount_path == dir);
        let vm = vm.unwrap_or_else(|| panic!("nothing mounted at {dir}"));
        volumes.iter().find(|v| v.name == vm.name).unwrap().clone()
    };
    let token = mounted_at(mesh_agent::ca::client::DEFAULT_TOKEN_FILE)
        .projected
        .unwrap();
    let sat = token.sources.unwrap()[0]
        .service_account_token
        .clone()
        .unwrap();
    assert_eq!(
        sat.audience.as_deref(),
        Some(mesh_agent::ca::DEFAULT_AUDIENCE)
    );
    assert_eq!(
        Path::new(mesh_agent::ca::client::DEFAULT_TOKEN_FILE)
            .file_name()
            .unwrap(),
        sat.path.as_str()
    );
    let root = mounted_at(mesh_agent::ca::client::DEFAULT_ROOT_FILE)
        .config_map
        .unwrap();
    assert_eq!(root.name, "meshd-ca-root");
    // The CA's URL is its Service.
    let env = |name: &str| {
        meshd
            .env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    };
    let svc = find(&objects, "Service", "meshd-ca");
    let url = format!(
        "https://{}.{}.svc:{}",
        svc["metadata"]["name"].as_str().unwrap(),
        svc["metadata"]["namespace"].as_str().unwrap(),
        svc["spec"]["ports"][0]["port"]
    );
    assert_eq!(env("MESH_CA_URL").as_deref(), Some(url.as_str()));
    assert_eq!(
        env("MESH_CNI_SOCKET").as_deref(),
        Some(mesh_cni::wire::DEFAULT_SOCKET)
    );
    // A node agent everywhere, before everything else, with capabilities instead of privileged.
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    assert_eq!(spec.host_network, Some(true));
    assert!(spec
        .tolerations
        .iter()
        .flatten()
        .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none() && t.effect.is_none()));
    let sc = meshd.security_context.clone().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    for cap in ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"] {
        assert!(caps.add.iter().flatten().any(|c| c == cap), "{cap}");
    }
}

/// Whether `role` grants `verb` on `resource` of `group`.
fn grants(role: &ClusterRole, group: &str, resource: &str, verb: &str) -> bool {
    role.rules.iter().flatten().any(|r| {
        r.api_groups.iter().flatten().any(|g| g == group)
            && r.resources.iter().flatten().any(|x| x == resource)
            && r.verbs.iter().any(|v| v == verb)
    })
}

#[test]
fn rbac_grants_what_the_agent_watches_and_the_ca_asks_and_no_more() {
    let objects = objects();
    let role = |name: &str| -> ClusterRole {
        serde_json::from_value(find(&objects, "ClusterRole", name).clone()).unwrap()
    };
    let agent = role("meshd");
    // Every kind the agent's watchers list (the API server stand-in serves exactly those).
    for r in mesh_kit::apiserver::RESOURCES {
        for verb in ["get", "list", "watch"] {
            assert!(
                grants(&agent, r.group, r.plural, verb),
                "meshd: {verb} {}/{}",
                r.group,
                r.plural
            );
        }
        if r.group == "consul.hashicorp.com" {
            for verb in ["update", "patch"] {
                let status = format!("{}/status", r.plural);
                assert!(
                    grants(&agent, r.group, &status, verb),
                    "meshd: {verb} {status}"
                );
            }
            // The objects themselves are the users': the agent only writes their status.
            assert!(!grants(&agent, r.group, r.plural, "update"));
        }
    }
    for r in agent.rules.iter().flatten() {
        assert!(
            !r.resources
                .iter()
                .flatten()
                .any(|x| x == "secrets" || x == "*"),
            "{r:?}"
        );
        assert!(
            !r.verbs
                .iter()
                .any(|v| v == "*" || v == "create" || v == "delete"),
            "{r:?}"
        );
    }
    let ca = role("meshd-ca");
    assert!(grants(
        &ca,
        "authentication.k8s.io",
        "tokenreviews",
        "create"
    ));
    assert!(grants(&ca, "", "pods", "list") && grants(&ca, "", "pods", "get"));
    assert!(grants(&ca, "", "services", "list"));
    assert!(!ca.rules.iter().flatten().any(|r| r
        .resources
        .iter()
        .flatten()
        .any(|x| x == "secrets")));
    // Each role is bound to its own ServiceAccount, the one meshd ca expects for agents.
    for name in ["meshd", "meshd-ca"] {
        let b: ClusterRoleBinding =
            serde_json::from_value(find(&objects, "ClusterRoleBinding", name).clone()).unwrap();
        assert_eq!(b.role_ref.name, name);
        let s = &b.subjects.unwrap()[0];
        assert_eq!(
            (s.kind.as_str(), s.name.as_str(), s.namespace.as_deref()),
            ("ServiceAccount", name, Some("mesh-system"))
        );
    }
    let agents = mesh_agent::ca::server::CaConfig::new("mesh-system").agents;
    assert_eq!(agents, ["system:serviceaccount:mesh-system:meshd"]);
    assert_eq!(
        find(&objects, "DaemonSet", "meshd")["spec"]["template"]["spec"]["serviceAccountName"],
        "meshd"
    );
}

/// Whether `value` fits `schema` structurally: every field is declared (or kept by
/// `x-kubernetes-preserve-unknown-fields`) with its type, as the API server's pruning and
/// validation would see it.
fn fits(schema: &JSONSchemaProps, value: &Value, at: &str) -> Result<(), String> {
    let ty = schema.type_.as_deref();
    match value {
        Value::Object(map) => {
            if ty != Some("object") {
                return Err(format!("{at}: an object where the schema has {ty:?}"));
            }
            if schema.x_kubernetes_preserve_unknown_fields == Some(true) {
                return Ok(());
            }
            let props = schema.properties.clone().unwrap_or_default();
            for (k, v) in map {
                if k == "metadata" && !at.contains('.') {
                    // The object's ObjectMeta: the API server's own schema, not the CRD's.
                    continue;
                }
                let p = props
                    .get(k)
                    .ok_or_else(|| format!("{at}.{k}: not in the schema (pruned)"))?;
                fits(p, v, &format!("{at}.{k}"))?;
            }
            Ok(())
        }
        Value::Array(items) => {
            if ty != Some("array") {
                return Err(format!("{at}: a list where the schema has {ty:?}"));
            }
            let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(item)) = &schema.items else {
                return Err(format!("{at}: no item schema"));
            };
            items
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| fits(item, v, &format!("{at}[{i}]")))
        }
        Value::String(_) if ty == Some("string") => Ok(()),
        Value::Bool(_) if ty == Some("boolean") => Ok(()),
        Value::Number(n) if ty == Some("integer") && n.is_i64() => Ok(()),
        other => Err(format!("{at}: {other} where the schema has {ty:?}")),
    }
}

#[test]
fn consul_k8s_objects_apply_to_the_crds() {
    let objects = objects();
    let crd = |name: &str| -> CustomResourceDefinition {
        serde_json::from_value(find(&objects, "CustomResourceDefinition", name).clone()).unwrap()
    };
    let (group, version) = mesh_core::k8s::crd::CONSUL_API_VERSION
        .split_once('/')
        .unwrap();
    // Objects as consul-k8s's documentation writes them (L4, L7 with headers, JWT, Envoy's
    // service defaults), with a status as its controller writes it.
    let cases = [
        (
            "serviceintentions.consul.hashicorp.com",
            "ServiceIntentions",
            json!({
                "apiVersion": "consul.hashicorp.com/v1alpha1", "kind": "ServiceIntentions",
                "metadata": {"name": "api", "namespace": "default"},
                "spec": {
                    "destination": {"name": "api", "namespace": "default"},
                    "jwt": {"providers": [{"name": "okta", "verifyClaims": [{"path": ["perms", "role"], "value": "admin"}]}]},
                    "sources": [
                        {"name": "web", "namespace": "default", "action": "allow", "description": "the tutorial's allow"},
                        {"name": "admin", "peer": "dc2", "samenessGroup": "", "partition": "default",
                         "permissions": [{"action": "allow", "http": {"pathPrefix": "/admin", "methods": ["GET", "POST"],
                            "header": [{"name": "x-debug", "present": true, "invert": true}, {"name": "host", "exact": "api", "ignoreCase": true}]}},
                            {"action": "deny", "http": {"pathRegex": "/.*"}, "jwt": {"providers": [{"name": "okta"}]}}]},
                        {"name": "*", "action": "deny"}
                    ]
                },
                "status": {"conditions": [{"type": "Synced", "status": "True", "lastTransitionTime": "2026-11-30T05:00:00Z"}],
                           "lastSyncedTime": "2026-11-30T05:00:00Z"}
            }),
        ),
        (
            "servicedefaults.consul.hashicorp.com",
            "ServiceDefaults",
            json!({
                "apiVersion": "consul.hashicorp.com/v1alpha1", "kind": "ServiceDefaults",
                "metadata": {"name": "api", "namespace": "default"},
                "spec": {
                    "protocol": "http", "mode": "transparent", "mutualTLSMode": "strict",
                    "maxInboundConnections": 100, "localConnectTimeoutMs": 5000, "localRequestTimeoutMs": 15000,
                    "balanceInboundConnections": "exact_balance", "externalSNI": "",
                    "meshGateway": {"mode": "local"}, "expose": {"checks": true, "paths": [{"path": "/health", "listenerPort": 21500, "localPathPort": 8080, "protocol": "http"}]},
                    "transparentProxy": {"outboundListenerPort": 15001, "dialedDirectly": false},
                    "upstreamConfig": {"defaults": {"connectTimeoutMs": 5000, "limits": {"maxConnections": 10}}, "overrides": [{"name": "db", "protocol": "tcp"}]},
                    "destination": {"addresses": ["example.com"], "port": 443},
                    "rateLimits": {"instanceLevel": {"requestsPerSecond": 100, "requestsMaxBurst": 200}},
                    "envoyExtensions": [{"name": "builtin/lua", "required": false, "arguments": {"Script": "x"}}]
                }
            }),
        ),
    ];
    for (name, kind, object) in cases {
        let c = crd(name);
        assert_eq!(c.spec.group, group);
        assert_eq!(c.spec.names.kind, kind);
        assert_eq!(c.spec.scope, "Namespaced");
        assert_eq!(c.spec.names.short_names.as_deref().unwrap().len(), 1);
        let v = c.spec.versions.iter().find(|v| v.name == version).unwrap();
        assert!(v.served && v.storage);
        assert!(
            v.subresources.as_ref().unwrap().status.is_some(),
            "{name}: status subresource"
        );
        let schema = v
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap();
        fits(schema, &object, kind).unwrap_or_else(|e| panic!("{name}: {e}"));
        // A misspelt field is pruned: the schema is not a blanket preserve-unknown-fields.
        let mut typo = object.clone();
        typo["spec"]["destinaton"] = json!({"name": "api"});
        assert!(
            fits(schema, &typo, kind).is_err(),
            "{name} accepts anything"
        );
    }
}

#[test]
fn the_k3s_overlay_patches_volumes_the_daemonset_has() {
    let path = deploy_dir().join("../vagrant/k3s/kustomization.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let k: Value = serde_norway::from_str(&text).unwrap();
    assert_eq!(k["resources"], json!(["../deploy"]));
    let objects = objects();
    let ds = pod_spec(find(&objects, "DaemonSet", "meshd"));
    for p in k["patches"].as_array().unwrap() {
        let patch: Value = serde_norway::from_str(p["patch"].as_str().unwrap()).unwrap();
        assert_eq!(patch["kind"], "DaemonSet");
        assert_eq!(patch["metadata"]["name"], "meshd");
        for v in patch["spec"]["template"]["spec"]["volumes"]
            .as_array()
            .unwrap()
        {
            let name = v["name"].as_str().unwrap();
            let base = ds.volumes.iter().flatten().find(|b| b.name == name);
            let base = base.unwrap_or_else(|| {
                panic!("the overlay patches volume {name}, which deploy/ lacks")
            });
            assert!(
                base.host_path.is_some() && v["hostPath"]["path"].is_string(),
                "{name}"
            );
        }
    }
}

#[test]
fn the_cni_installer_is_a_native_sidecar_that_gates_meshd() {
    let objects = objects();
    let spec = pod_spec(find(&objects, "DaemonSet", "meshd"));
    let init = spec.init_containers.clone().unwrap_or_default();
    let installer = init
        .iter()
        .find(|c| c.name == "install-cni")
        .expect("an install-cni init container");
    // Runs for the pod's life (re-chaining mesh-cni), and meshd starts only after its startup
    // probe passed: the file the script touches once mesh-cni is chained.
    assert_eq!(installer.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        installer.command.clone().unwrap(),
        ["/usr/local/bin/install-cni", "--watch"]
    );
    let probe = installer
        .startup_probe
        .as_ref()
        .and_then(|p| p.exec.as_ref())
        .and_then(|e| e.command.clone())
        .expect("a startup probe");
    let script = std::fs::read_to_string(deploy_dir().join("image/install-cni.sh")).unwrap();
    let ready = probe.last().unwrap();
    assert!(
        script.contains(&format!("CNI_READY_FILE:-{ready}}}")),
        "the probe checks {ready}, which the script does not touch by default"
    );
}

#[test]
fn a_rolling_update_starts_the_new_agent_beside_the_old_one() {
    // The hand-over of same-node connections (meshd's `handover`) needs both agents on the
    // node at once: surge first; the old pod goes once the new one is ready.
    let objects = objects();
    let ds: k8s_openapi::api::apps::v1::DaemonSet =
        typed("daemonset.yaml", find(&objects, "DaemonSet", "meshd"));
    let strategy = ds.spec.unwrap().update_strategy.unwrap();
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.unwrap();
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    // A surge pod cannot start beside a pod that holds a host port.
    let spec = pod_spec(find(&objects, "DaemonSet", "meshd"));
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for p in c.ports.iter().flatten() {
            assert_eq!(p.host_port, None, "{} declares host port {:?}", c.name, p);
        }
    }
    // The two agents meet on the state directory's hand-over socket: a hostPath both see.
    let meshd = spec.containers.iter().find(|c| c.name == "meshd").unwrap();
    let state = meshd
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "MESH_STATE_DIR")
        .and_then(|e| e.value.clone())
        .unwrap();
    let mount = meshd
        .volume_mounts
        .iter()
        .flatten()
        .find(|vm| vm.mount_path == state)
        .unwrap();
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert!(
        volume.host_path.is_some(),
        "the state directory is the node's"
    );
    // Ready means serving (the agent's ready file), so the old pod is deleted only after the
    // hand-over; each agent knows its pod, so a pod that handed over never takes back.
    let env = |name: &str| meshd.env.iter().flatten().find(|e| e.name == name).cloned();
    let ready_file = env("MESH_READY_FILE").and_then(|e| e.value).unwrap();
    let probe = meshd.readiness_probe.as_ref().expect("a readiness probe");
    assert_eq!(
        probe.exec.as_ref().and_then(|e| e.command.clone()),
        Some(vec!["test".to_owned(), "-f".to_owned(), ready_file])
    );
    let uid = env("MESH_POD_UID")
        .and_then(|e| e.value_from)
        .and_then(|v| v.field_ref)
        .map(|f| f.field_path);
    assert_eq!(uid.as_deref(), Some("metadata.uid"));
}
