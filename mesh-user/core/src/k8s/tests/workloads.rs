//! Workloads: replicas, containers.

use super::*;

#[test]
fn replicas_become_workloads() {
    let s = state(&deployment("web", 3, "        a: b"));
    let names: Vec<&str> = s.workloads.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["web-0", "web-1", "web-2"]);
    assert_eq!(
        s.workloads[2].owner,
        Owner::Deployment {
            name: "web".into(),
            index: 2
        }
    );
    assert_eq!(
        s.workloads[0].labels.get("app").map(String::as_str),
        Some("web")
    );
    assert_eq!(s.workloads[0].service_account.as_deref(), Some("web"));
    assert_eq!(s.workloads[0].tcp_ports(), [9090]);
    assert!(state(&deployment("web", 0, "        a: b"))
        .workloads
        .is_empty());
    let text = deployment("web", 3, "        a: b").replace("  replicas: 3\n", "");
    assert_eq!(state(&text).workloads.len(), 1, "replicas defaults to 1");
}

#[test]
fn containers_keep_command_args_env_and_ports() {
    let text = r#"
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
  labels: {app: client}
  annotations: {note: x}
spec:
  serviceAccountName: client
  containers:
    - name: client
      image: curlimages/curl:8.5.0
      command: ["/bin/sh", "-c", "--"]
      args: ["while true; do sleep 30; done;"]
      env:
        - name: PLAIN
          value: "1"
        - name: EMPTY
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        - name: POD_NS
          valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        - name: TOKEN
          valueFrom: {secretKeyRef: {name: s, key: k}}
      ports:
        - {containerPort: 8080, name: http}
        - {containerPort: 53, protocol: UDP}
"#;
    let s = state(text);
    let w = s.workload("shop", "client").unwrap();
    assert_eq!(w.owner, Owner::Pod);
    assert_eq!(w.annotations.get("note").map(String::as_str), Some("x"));
    let c = &w.containers[0];
    assert_eq!(c.image, "curlimages/curl:8.5.0");
    assert_eq!(c.command, ["/bin/sh", "-c", "--"]);
    assert_eq!(c.args, ["while true; do sleep 30; done;"]);
    let env: Vec<(&str, &EnvValue)> = c.env.iter().map(|e| (e.name.as_str(), &e.value)).collect();
    assert_eq!(
        env,
        [
            ("PLAIN", &EnvValue::Value("1".into())),
            ("EMPTY", &EnvValue::Value(String::new())),
            ("POD_NAME", &EnvValue::Value("client".into())),
            ("POD_NS", &EnvValue::Value("shop".into())),
            ("POD_IP", &EnvValue::FieldRef("status.podIP".into())),
        ]
    );
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("TOKEN from secretKeyRef is not supported")));
    assert_eq!(c.ports[1].protocol, Protocol::Udp);
    assert_eq!(w.tcp_ports(), [8080]);
}

// ---------------------------------------------------------------------------------------------
// securityContext
// ---------------------------------------------------------------------------------------------

#[test]
fn run_as_user_and_group_come_from_the_container_else_the_pod() {
    let s = state(
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: p
spec:
  securityContext:
    runAsUser: 1000
    runAsGroup: 2000
  containers:
    - name: a
      image: x
      command: [sh]
    - name: b
      image: x
      command: [sh]
      securityContext:
        runAsUser: 0
    - name: c
      image: x
      command: [sh]
      securityContext:
        runAsGroup: 3000
"#,
    );
    let ids: Vec<(Option<u32>, Option<u32>)> = s.workloads[0]
        .containers
        .iter()
        .map(|c| (c.run_as_user, c.run_as_group))
        .collect();
    assert_eq!(
        ids,
        [
            (Some(1000), Some(2000)),
            (Some(0), Some(2000)),
            (Some(1000), Some(3000))
        ]
    );
    let none = state(&deployment("web", 1, "        a: b"));
    assert_eq!(none.workloads[0].containers[0].run_as_user, None);
    assert_eq!(none.workloads[0].containers[0].run_as_group, None);
}

#[test]
fn run_as_user_out_of_range_is_refused() {
    let e = err(r#"
apiVersion: v1
kind: Pod
metadata:
  name: p
spec:
  containers:
    - name: a
      image: x
      command: [sh]
      securityContext:
        runAsUser: -1
"#);
    assert!(
        e.contains("spec.containers[0].securityContext.runAsUser"),
        "{e}"
    );
}
