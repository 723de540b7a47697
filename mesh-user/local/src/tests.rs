//! In-process tests of the runner's pure parts: apply/delete diffing, persistence, plans,
//! hosts files and kubectl's tables.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::applied::{Applied, Outcome, Source};
use super::plan::{self, Pool};
use super::runner::parse_listening;
use super::view::*;

const API: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: api-v1
spec:
  selector:
    app: api-v1
  ports:
    - port: 9091
      targetPort: 9091
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: api-v1
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api-v1
spec:
  replicas: 1
  selector:
    matchLabels:
      app: api-v1
  template:
    metadata:
      labels:
        app: api-v1
      annotations:
        consul.hashicorp.com/connect-inject: 'true'
    spec:
      serviceAccountName: api-v1
      containers:
        - name: api
          image: nicholasjackson/fake-service:v0.26.0
          ports:
            - containerPort: 9091
          env:
            - name: LISTEN_ADDR
              value: 127.0.0.1:9091
            - name: NAME
              value: api-v1
"#;

fn web(upstreams: &str, message: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector:
    app: web
  ports:
    - port: 9090
      targetPort: 9090
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 1
  selector:
    matchLabels:
      app: web
  template:
    metadata:
      labels:
        app: web
      annotations:
        consul.hashicorp.com/connect-inject: 'true'
        consul.hashicorp.com/connect-service-upstreams: '{upstreams}'
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: docker.io/nicholasjackson/fake-service:v0.26.0
          ports:
            - containerPort: 9090
          env:
            - name: MESSAGE
              value: '{message}'
            - name: POD_IP
              valueFrom:
                fieldRef:
                  fieldPath: status.podIP
"#
    )
}

fn src(name: &str, text: &str) -> Source {
    Source {
        name: name.into(),
        text: text.into(),
    }
}

fn lines(results: &[super::ObjectResult]) -> Vec<String> {
    results.iter().map(|r| r.line()).collect()
}

#[test]
fn apply_reports_created_unchanged_configured_like_kubectl() {
    let applied = Applied::in_memory();
    let change = applied
        .apply(
            &[
                src("api.yaml", API),
                src("web.yaml", &web("api-v1:9091", "hi")),
            ],
            None,
        )
        .unwrap();
    assert_eq!(
        lines(&change.results),
        [
            "service/api-v1 created",
            "serviceaccount/api-v1 created",
            "deployment.apps/api-v1 created",
            "service/web created",
            "deployment.apps/web created",
        ]
    );
    assert_eq!(change.desired.workloads.len(), 2);
    let mut applied = applied;
    applied.commit(change.next).unwrap();

    let again = applied
        .apply(&[src("web.yaml", &web("api-v1:9091", "hi"))], None)
        .unwrap();
    assert_eq!(
        lines(&again.results),
        ["service/web unchanged", "deployment.apps/web unchanged"]
    );
    assert_eq!(again.next, applied, "an unchanged apply changes nothing");

    let changed = applied
        .apply(&[src("web.yaml", &web("api-v1:9091", "hello"))], None)
        .unwrap();
    assert_eq!(
        lines(&changed.results),
        ["service/web unchanged", "deployment.apps/web configured"]
    );
    let w = changed
        .desired
        .workloads
        .iter()
        .find(|w| w.name == "web-0")
        .unwrap();
    assert!(format!("{:?}", w.containers[0].env).contains("hello"));
}

#[test]
fn a_malformed_upstream_changes_nothing_and_keeps_consuls_message() {
    let mut applied = Applied::in_memory();
    let change = applied.apply(&[src("api.yaml", API)], None).unwrap();
    applied.commit(change.next).unwrap();
    let before = applied.clone();
    let err = applied
        .apply(&[src("web.yaml", &web("api-v1:9091,api-v1", "hi"))], None)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("web.yaml: "), "{err}");
    assert!(
        err.contains("upstream structured incorrectly: api-v1"),
        "{err}"
    );
    assert_eq!(applied, before);
    // A bad document anywhere refuses the good ones with it.
    let err = applied
        .apply(
            &[
                src("web.yaml", &web("api-v1:9091", "hi")),
                src("bad.yaml", "kind: ["),
            ],
            None,
        )
        .unwrap_err();
    assert!(err.to_string().starts_with("bad.yaml: "), "{err}");
}

#[test]
fn delete_removes_objects_and_namespaces_only_they_used() {
    let mut applied = Applied::in_memory();
    let change = applied
        .apply(&[src("api.yaml", API)], Some("backend"))
        .unwrap();
    assert!(change.desired.namespaces.contains("backend"));
    applied.commit(change.next).unwrap();
    let change = applied
        .apply(&[src("web.yaml", &web("api-v1.backend:9091", "hi"))], None)
        .unwrap();
    applied.commit(change.next).unwrap();

    let del = applied
        .delete(&[src("api.yaml", API)], Some("backend"))
        .unwrap();
    assert_eq!(
        lines(&del.results),
        [
            "service \"api-v1\" deleted",
            "serviceaccount \"api-v1\" deleted",
            "deployment.apps \"api-v1\" deleted",
        ]
    );
    assert!(!del.desired.namespaces.contains("backend"));
    assert_eq!(del.desired.workloads.len(), 1);
    applied.commit(del.next).unwrap();

    let again = applied
        .delete(&[src("api.yaml", API)], Some("backend"))
        .unwrap();
    assert_eq!(
        lines(&again.results)[2],
        "Error from server (NotFound): deployments.apps \"api-v1\" not found"
    );
    assert!(again.results.iter().all(|r| r.outcome == Outcome::NotFound));
}

#[test]
fn deleting_a_namespace_deletes_what_is_in_it() {
    let mut applied = Applied::in_memory();
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: backend\n";
    let change = applied
        .apply(&[src("ns.yaml", ns), src("api.yaml", API)], Some("backend"))
        .unwrap();
    applied.commit(change.next).unwrap();
    let del = applied.delete(&[src("ns.yaml", ns)], None).unwrap();
    assert_eq!(lines(&del.results), ["namespace \"backend\" deleted"]);
    assert!(del.next.is_empty());
    assert!(del.desired.workloads.is_empty());
    // Listed before its objects, a Namespace does not turn them into "not found".
    let del = applied
        .delete(&[src("ns.yaml", ns), src("api.yaml", API)], Some("backend"))
        .unwrap();
    assert!(del.results.iter().all(|r| r.outcome == Outcome::Deleted));
    assert_eq!(del.results.len(), 4);
    assert!(del.next.is_empty());
}

#[test]
fn applied_objects_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut applied = Applied::load(dir.path()).unwrap();
    assert!(applied.is_empty());
    let change = applied
        .apply(
            &[
                src("api.yaml", API),
                src("web.yaml", &web("api-v1:9091", "hi")),
            ],
            None,
        )
        .unwrap();
    let desired = change.desired.clone();
    applied.commit(change.next).unwrap();

    let loaded = Applied::load(dir.path()).unwrap();
    assert_eq!(loaded, applied);
    assert_eq!(loaded.desired().unwrap(), desired);
    let again = loaded
        .apply(&[src("web.yaml", &web("api-v1:9091", "hi"))], None)
        .unwrap();
    assert!(again
        .results
        .iter()
        .all(|r| r.outcome == Outcome::Unchanged));

    // A damaged file is an error naming it, never a silent reset.
    std::fs::write(dir.path().join(super::applied::APPLIED_FILE), "{").unwrap();
    let err = Applied::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("applied.json: damaged"), "{err}");

    Applied::remove_file(dir.path()).unwrap();
    assert!(Applied::load(dir.path()).unwrap().is_empty());
}

#[test]
fn pools_hand_out_the_lowest_free_address() {
    let mut p = Pool::new([10, 96, 0], 253);
    assert_eq!(p.take(), Some(Ipv4Addr::new(10, 96, 0, 253)));
    assert_eq!(p.take(), Some(Ipv4Addr::new(10, 96, 0, 254)));
    assert_eq!(p.take(), None);
    p.give(Ipv4Addr::new(10, 96, 0, 253));
    assert_eq!(p.take(), Some(Ipv4Addr::new(10, 96, 0, 253)));
}

#[test]
fn hosts_files_name_every_service_and_the_bare_name_in_the_own_namespace() {
    let mut vips = BTreeMap::new();
    vips.insert(
        ("default".into(), "web".into()),
        Ipv4Addr::new(10, 96, 0, 10),
    );
    vips.insert(
        ("backend".into(), "api-v1".into()),
        Ipv4Addr::new(10, 96, 0, 11),
    );
    let text = plan::hosts_file("default", "web-0", Ipv4Addr::new(10, 88, 0, 2), &vips);
    assert!(text.contains("127.0.0.1\tlocalhost\n"));
    assert!(text.contains("10.88.0.2\tweb-0\n"));
    assert!(text.contains(
        "10.96.0.11\tapi-v1.backend api-v1.backend.svc api-v1.backend.svc.cluster.local\n"
    ));
    assert!(text
        .contains("10.96.0.10\tweb web.default web.default.svc web.default.svc.cluster.local\n"));
}

fn places(
    desired: &mesh_core::k8s::DesiredState,
) -> BTreeMap<String, (Ipv4Addr, PathBuf, PathBuf)> {
    desired
        .workloads
        .iter()
        .enumerate()
        .map(|(i, w)| {
            (
                w.id(),
                (
                    Ipv4Addr::new(10, 88, 0, 2 + i as u8),
                    PathBuf::from(format!("/run/netns/{}", w.name)),
                    PathBuf::from(format!("/sys/fs/cgroup/x/{}", w.name)),
                ),
            )
        })
        .collect()
}

#[test]
fn the_catalog_has_meshed_pods_their_services_and_upstreams() {
    let change = Applied::in_memory()
        .apply(&[src("api.yaml", API)], Some("backend"))
        .unwrap();
    let mut applied = Applied::in_memory();
    applied.commit(change.next).unwrap();
    let plain = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: plain\nspec:\n  containers:\n    - name: c\n      image: busybox\n      command: [sleep, '1000']\n";
    let change = applied
        .apply(
            &[
                src("web.yaml", &web("api-v1.backend:9091", "hi")),
                src("plain.yaml", plain),
            ],
            None,
        )
        .unwrap();
    let desired = change.desired;
    let mut vips = BTreeMap::new();
    vips.insert(
        ("backend".into(), "api-v1".into()),
        Ipv4Addr::new(10, 96, 0, 10),
    );
    vips.insert(
        ("default".into(), "web".into()),
        Ipv4Addr::new(10, 96, 0, 11),
    );
    let catalog = plan::catalog(&desired, &places(&desired), &vips);
    catalog.validate().unwrap();
    // The plain pod runs but is not in the mesh.
    assert_eq!(desired.workloads.len(), 3);
    assert_eq!(catalog.workloads.len(), 2);
    let web = catalog.workload("default.web-0").unwrap();
    assert_eq!(web.service, "web");
    assert_eq!(web.app_ports, [9090]);
    assert_eq!(web.upstreams.len(), 1);
    assert_eq!(web.upstreams[0].namespace, "backend");
    assert_eq!(web.upstreams[0].bind_port, 9091);
    let api = catalog
        .services
        .iter()
        .find(|s| s.name == "api-v1")
        .unwrap();
    assert_eq!(api.namespace, "backend");
    assert_eq!(api.vip, Some(Ipv4Addr::new(10, 96, 0, 10)));
    assert_eq!(api.ports, [9091]);
    let api_pod = catalog.workload("backend.api-v1-0").unwrap();
    assert_eq!(api.endpoints.len(), 1);
    assert_eq!(api.endpoints[0].ip, api_pod.ip);
    assert_eq!(api.endpoints[0].port, mesh_common::INBOUND_PORT);
}

#[test]
fn tags_meta_service_port_and_service_defaults_protocol_land_in_the_catalog() {
    let annotated = API.replace(
        "        consul.hashicorp.com/connect-inject: 'true'\n",
        "        consul.hashicorp.com/connect-inject: 'true'\n        consul.hashicorp.com/service-tags: 'v1,blue'\n        consul.hashicorp.com/service-meta-owner: 'team-a'\n",
    );
    assert_ne!(annotated, API);
    let defaults = "apiVersion: consul.hashicorp.com/v1alpha1\nkind: ServiceDefaults\nmetadata:\n  name: api-v1\nspec:\n  protocol: http\n";
    let change = Applied::in_memory()
        .apply(
            &[src("api.yaml", &annotated), src("defaults.yaml", defaults)],
            None,
        )
        .unwrap();
    let desired = change.desired;
    let mut vips = BTreeMap::new();
    vips.insert(
        ("default".into(), "api-v1".into()),
        Ipv4Addr::new(10, 96, 0, 10),
    );
    let catalog = plan::catalog(&desired, &places(&desired), &vips);
    catalog.validate().unwrap();
    let api = &catalog.services[0];
    assert_eq!(api.tags, ["v1", "blue"]);
    assert_eq!(api.meta["owner"], "team-a");
    assert_eq!(api.service_port, Some(9091));
    assert_eq!(api.protocol, mesh_core::catalog::Protocol::Http);

    // Without the ServiceDefaults, the protocol is TCP again.
    let change = Applied::in_memory()
        .apply(&[src("api.yaml", &annotated)], None)
        .unwrap();
    let catalog = plan::catalog(&change.desired, &places(&change.desired), &vips);
    assert_eq!(
        catalog.services[0].protocol,
        mesh_core::catalog::Protocol::Tcp
    );
}

#[test]
fn a_service_port_maps_to_its_target_port_in_the_catalog() {
    // `port: 80` reaching the container port named `http` (9091).
    let api = API
        .replace(
            "    - port: 9091\n      targetPort: 9091",
            "    - port: 80\n      targetPort: http",
        )
        .replace(
            "            - containerPort: 9091",
            "            - containerPort: 9091\n              name: http",
        );
    assert_ne!(api, API);
    let change = Applied::in_memory()
        .apply(&[src("api.yaml", &api)], None)
        .unwrap();
    let desired = change.desired;
    let catalog = plan::catalog(&desired, &places(&desired), &BTreeMap::new());
    catalog.validate().unwrap();
    let s = &catalog.services[0];
    assert_eq!(s.ports, [80]);
    assert_eq!(s.target_port(80), 9091);
    assert_eq!(
        catalog.workload("default.api-v1-0").unwrap().app_ports,
        [9091]
    );
}

#[test]
fn containers_become_host_processes() {
    let meshd = Path::new("/usr/bin/meshd");
    for image in [
        "nicholasjackson/fake-service:v0.26.0",
        "docker.io/nicholasjackson/fake-service",
        "ghcr.io/nicholasjackson/fake-service:v1@sha256:abc",
        "localhost:5000/nicholasjackson/fake-service:x",
    ] {
        assert!(plan::is_fake_service(image), "{image}");
    }
    for image in ["nicholasjackson/fake-service-x", "fake-service", "busybox"] {
        assert!(!plan::is_fake_service(image), "{image}");
    }
    let desired = Applied::in_memory()
        .apply(&[src("web.yaml", &web("api-v1:9091", "hi"))], None)
        .unwrap()
        .desired;
    let c = &desired.workloads[0].containers[0];
    let spec = plan::process_spec(meshd, c).unwrap();
    assert_eq!(spec.program, meshd);
    assert_eq!(spec.args, ["fake-service"]);
    let env = plan::environment(c, Ipv4Addr::new(10, 88, 0, 7), "local");
    assert!(env.contains(&("MESSAGE".into(), "hi".into())));
    assert!(env.contains(&("POD_IP".into(), "10.88.0.7".into())));

    let mut other = c.clone();
    other.image = "busybox".into();
    let err = plan::process_spec(meshd, &other).unwrap_err();
    assert!(err.contains("give the container a command"), "{err}");
    other.command = vec!["sleep".into()];
    other.args = vec!["100".into()];
    let spec = plan::process_spec(meshd, &other).unwrap();
    assert_eq!(spec.program, PathBuf::from("sleep"));
    assert_eq!(spec.args, ["100"]);
}

#[test]
fn listening_sockets_are_read_from_proc_net_tcp() {
    let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2383 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 00000000:2382 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:9C40 0100007F:2383 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 20 4 30 10 -1
";
    let ports: Vec<u16> = parse_listening(text).into_iter().collect();
    assert_eq!(ports, [9090, 9091]);
}

#[test]
fn ages_follow_kubectl() {
    let d = |s| human_duration(Duration::from_secs(s));
    assert_eq!(d(5), "5s");
    assert_eq!(d(119), "119s");
    assert_eq!(d(125), "2m5s");
    assert_eq!(d(600), "10m");
    assert_eq!(d(3 * 3600 + 60), "3h1m");
    assert_eq!(d(30 * 3600), "30h");
    assert_eq!(d(3 * 86400 + 3600), "3d1h");
    assert_eq!(d(40 * 86400), "40d");
}

fn pod(name: &str, ns: &str, ready: bool, restarts: u32, created: SystemTime) -> PodView {
    PodView {
        api_version: "v1".into(),
        kind: "Pod".into(),
        metadata: Metadata {
            name: name.into(),
            namespace: Some(ns.into()),
            creation_timestamp: timestamp(created),
            ..Metadata::default()
        },
        spec: PodSpecView {
            node_name: "local".into(),
            ..PodSpecView::default()
        },
        status: PodStatusView {
            phase: "Running".into(),
            pod_ip: "10.88.0.2".into(),
            pod_ips: vec![],
            host_ip: "10.88.0.2".into(),
            start_time: timestamp(created),
            conditions: vec![Condition::new("Ready", ready)],
            container_statuses: vec![ContainerStatus {
                name: "c".into(),
                image: "i".into(),
                ready,
                started: true,
                restart_count: restarts,
                state: if ready {
                    ContainerState {
                        running: Some(Running {
                            started_at: timestamp(created),
                        }),
                        ..ContainerState::default()
                    }
                } else {
                    ContainerState {
                        waiting: Some(Waiting {
                            reason: "CrashLoopBackOff".into(),
                            message: None,
                        }),
                        ..ContainerState::default()
                    }
                },
                pid: None,
            }],
            mesh: None,
        },
    }
}

#[test]
fn pod_tables_have_kubectls_columns() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let pods = [
        pod("web-0", "default", true, 0, now - Duration::from_secs(42)),
        pod(
            "api-v1-0",
            "backend",
            false,
            3,
            now - Duration::from_secs(300),
        ),
    ];
    assert_eq!(
        pods_table(&pods, now, false, false),
        "NAME       READY   STATUS             RESTARTS   AGE\n\
         web-0      1/1     Running            0          42s\n\
         api-v1-0   0/1     CrashLoopBackOff   3          5m\n"
    );
    let wide = pods_table(&pods, now, true, true);
    let header = wide.lines().next().unwrap();
    assert_eq!(
        header,
        "NAMESPACE   NAME       READY   STATUS             RESTARTS   AGE   IP          NODE    NOMINATED NODE   READINESS GATES"
    );
    assert!(wide
        .lines()
        .nth(1)
        .unwrap()
        .starts_with("default     web-0"));
    assert!(wide.contains("10.88.0.2   local   <none>           <none>"));
}

#[test]
fn service_tables_have_kubectls_columns() {
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let svc = ServiceView {
        api_version: "v1".into(),
        kind: "Service".into(),
        metadata: Metadata {
            name: "web".into(),
            namespace: Some("default".into()),
            creation_timestamp: timestamp(now - Duration::from_secs(3600)),
            ..Metadata::default()
        },
        spec: ServiceSpecView {
            kind: "ClusterIP".into(),
            cluster_ip: "10.96.0.10".into(),
            cluster_ips: vec!["10.96.0.10".into()],
            ports: vec![ServicePortView {
                name: None,
                port: 9090,
                target_port: 9090.into(),
                protocol: "TCP".into(),
            }],
            selector: [("app".to_string(), "web".to_string())].into(),
        },
    };
    assert_eq!(
        services_table(std::slice::from_ref(&svc), now, true, false),
        "NAME   TYPE        CLUSTER-IP   EXTERNAL-IP   PORT(S)    AGE   SELECTOR\n\
         web    ClusterIP   10.96.0.10   <none>        9090/TCP   60m   app=web\n"
    );
    // The JSON is kubectl's shape.
    let json = serde_json::to_value(List::new(vec![svc])).unwrap();
    assert_eq!(json["kind"], "List");
    assert_eq!(json["items"][0]["spec"]["clusterIP"], "10.96.0.10");
    assert_eq!(json["items"][0]["spec"]["type"], "ClusterIP");
}

#[test]
fn pod_json_has_kubectls_shape() {
    let now = SystemTime::now();
    let json =
        serde_json::to_value(List::new(vec![pod("web-0", "default", true, 0, now)])).unwrap();
    let item = &json["items"][0];
    assert_eq!(item["metadata"]["name"], "web-0");
    assert_eq!(item["metadata"]["namespace"], "default");
    assert_eq!(item["status"]["podIP"], "10.88.0.2");
    assert_eq!(item["status"]["phase"], "Running");
    assert_eq!(item["status"]["conditions"][0]["type"], "Ready");
    assert_eq!(item["status"]["conditions"][0]["status"], "True");
    assert_eq!(item["status"]["containerStatuses"][0]["restartCount"], 0);
    let back: List<PodView> = serde_json::from_value(json).unwrap();
    assert!(back.items[0].ready());
}
