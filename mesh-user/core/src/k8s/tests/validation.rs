//! Types and validation.

use super::*;

#[test]
fn wrong_types_name_the_object_and_field() {
    let text = deployment("web", 1, "        a: b").replace("replicas: 1", "replicas: three");
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.replicas: invalid type: string \"three\", expected i64"
    );
    let text = deployment("web", 1, "        a: b")
        .replace("containerPort: 9090", "containerPort: \"9090\"");
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.template.spec.containers[0].ports[0].containerPort: \
         invalid type: string \"9090\", expected i64"
    );
    // Annotation values must be strings (kubectl refuses an unquoted `true` too).
    let text = deployment(
        "web",
        1,
        "        consul.hashicorp.com/connect-inject: true",
    );
    let e = err(&text);
    assert!(
        e.starts_with("Deployment default/web: spec.template.metadata.annotations")
            && e.contains("invalid type: boolean `true`, expected a string"),
        "{e}"
    );
    let text = deployment("web", 1, "        a: b").replace("  replicas: 1\n", "  replicas: -2\n");
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.replicas: -2: must be greater than or equal to 0"
    );
    let text =
        deployment("web", 1, "        a: b").replace("  replicas: 1\n", "  replicas: 100000000\n");
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.replicas: 100000000: the local runner runs at most 256 replicas"
    );
    let e = err("apiVersion: v1\nkind: Service\nmetadata:\n  name: a\nspec:\n  ports:\n    - targetPort: 80\n");
    assert_eq!(e, "Service default/a: spec.ports[0]: missing field `port`");
}

#[test]
fn unknown_fields_and_nulls_are_accepted() {
    let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: null
  creationTimestamp: null
spec:
  replicas: 2
  strategy: {type: RollingUpdate}
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations: null
    spec:
      nodeSelector: {disk: ssd}
      containers:
        - name: web
          image: nicholasjackson/fake-service:v0.26.0
          imagePullPolicy: IfNotPresent
          resources: {limits: {cpu: 100m}}
          env: null
          readinessProbe:
            httpGet: {path: /health, port: 9090}
"#;
    let s = state(text);
    assert_eq!(s.workloads.len(), 2);
    assert!(s.workloads[0].mesh.is_none());
}

#[test]
fn ports_out_of_range_are_refused() {
    let text =
        deployment("web", 1, "        a: b").replace("containerPort: 9090", "containerPort: 70000");
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.template.spec.containers[0].ports[0].containerPort: \
         70000 is not a valid port number (1..=65535)"
    );
    let text = service("web", 9090).replace("port: 9090", "port: 0");
    assert_eq!(
        err(&text),
        "Service default/web: spec.ports[0].port: 0 is not a valid port number (1..=65535)"
    );
    let text = service("web", 9090).replace("targetPort: 9090", "targetPort: 65536");
    assert_eq!(
        err(&text),
        "Service default/web: spec.ports[0].targetPort: 65536 is not a valid port number (1..=65535)"
    );
    let text = service("web", 9090).replace("targetPort: 9090", "targetPort: \"8080\"");
    assert!(err(&text).contains("spec.ports[0].targetPort: invalid port name \"8080\""));
}

#[test]
fn bad_names_are_refused() {
    let e = err(&deployment("Web", 1, "        a: b"));
    assert!(
        e.starts_with("Deployment default/Web: metadata.name: invalid name \"Web\""),
        "{e}"
    );
    let e = err(&service("1api", 80));
    assert!(
        e.starts_with(
            "Service default/1api: metadata.name: invalid name \"1api\": an RFC 1035 label"
        ),
        "{e}"
    );
    let e = err("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: my_ns\n");
    assert!(
        e.starts_with("Namespace my_ns: metadata.name: invalid name"),
        "{e}"
    );
    let e = err("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n  namespace: Prod\n");
    assert!(
        e.starts_with("ServiceAccount Prod/a: metadata.namespace: invalid name"),
        "{e}"
    );
    let text = deployment("web", 1, "        a: b").replace("- name: web", "- name: web_app");
    let e = err(&text);
    assert!(
        e.contains("spec.template.spec.containers[0].name: invalid name \"web_app\""),
        "{e}"
    );
    let text = deployment("web", 1, "        a: b").replace("name: http", "name: http--x");
    assert!(err(&text).contains("ports[0].name: invalid port name \"http--x\""));
    let long = "a".repeat(64);
    assert!(err(&service(&long, 80)).contains("invalid name"));
    assert!(check_rfc1123_label(&"a".repeat(63)).is_ok());
    assert!(check_rfc1123_subdomain("web.v1").is_ok());
    assert!(check_rfc1123_subdomain("web..v1").is_err());
}

#[test]
fn duplicates_are_refused() {
    let text = format!("{}---{}", service("web", 80), service("web", 81));
    assert_eq!(
        err(&text),
        "duplicate Service default/web: document 1 and document 2"
    );
    // Same name in another namespace or of another kind is fine.
    let text = format!(
        "{}---{}",
        service("web", 80),
        service("web", 81).replace("  name: web\n", "  name: web\n  namespace: other\n")
    );
    assert!(parse(&text).is_ok());
    // Across manifests.
    let a = parse(&service("web", 80)).unwrap();
    let b = parse(&format!("{}---{}", service("api", 80), service("web", 81))).unwrap();
    assert_eq!(
        DesiredState::build(&[a, b]).unwrap_err().to_string(),
        "duplicate Service default/web: manifest 1 document 1 and manifest 2 document 2"
    );
    // A Pod whose name a Deployment replica also takes.
    let text = format!(
        "{}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web-1\nspec:\n  containers:\n    - name: c\n      image: busybox\n",
        deployment("web", 2, "        a: b")
    );
    assert_eq!(
        err(&text),
        "Pod default/web-1: pod name default/web-1 is also used by Deployment default/web"
    );
}

#[test]
fn pods_need_containers_and_images() {
    let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers: []
"#;
    assert_eq!(
        err(text),
        "Deployment default/web: spec.template.spec.containers: a pod needs at least one container"
    );
    let text = deployment("web", 1, "        a: b").replace(
        "          image: nicholasjackson/fake-service:v0.26.0\n",
        "",
    );
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.template.spec.containers[0].image: required"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n"),
        "Pod default/p: spec.containers: a pod needs at least one container"
    );
}

#[test]
fn deployment_selector_must_match_template() {
    let text = deployment("web", 1, "        a: b")
        .replace("      app: web\n  template", "      app: other\n  template");
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.template.metadata.labels: `selector` does not match template `labels`"
    );
    let text = deployment("web", 1, "        a: b").replace(
        "    matchLabels:\n      app: web\n",
        "    matchExpressions:\n      - {key: app, operator: In, values: [web, www]}\n",
    );
    assert_eq!(state(&text).workloads.len(), 1);
    let text = deployment("web", 1, "        a: b")
        .replace("  selector:\n    matchLabels:\n      app: web\n", "");
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.selector: required (apps/v1)"
    );
}
