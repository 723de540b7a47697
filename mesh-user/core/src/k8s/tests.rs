use super::*;

fn parse(text: &str) -> Result<Manifest, Error> {
    Manifest::parse(text, &ParseOptions::default())
}

fn state(text: &str) -> DesiredState {
    let m = parse(text).expect("manifest parses");
    DesiredState::build(&[m]).expect("state builds")
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(m) => match DesiredState::build(&[m]) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        },
        Err(e) => e.to_string(),
    }
}

/// A Deployment of fake-service with the given pod annotations (YAML lines, 8 spaces in).
fn deployment(name: &str, replicas: u32, annotations: &str) -> String {
    format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {name}
spec:
  replicas: {replicas}
  selector:
    matchLabels:
      app: {name}
  template:
    metadata:
      labels:
        app: {name}
      annotations:
{annotations}
    spec:
      serviceAccountName: {name}
      containers:
        - name: {name}
          image: nicholasjackson/fake-service:v0.26.0
          ports:
            - containerPort: 9090
              name: http
"#
    )
}

fn service(name: &str, port: u16) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  selector:
    app: {name}
  ports:
    - port: {port}
      targetPort: 9090
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Documents, kinds, namespaces
// ---------------------------------------------------------------------------------------------

#[test]
fn multi_document_with_separators_and_empty_documents() {
    let text = format!(
        "---\n# leading comment\n---\n{}\n---\n---\n# only a comment\n---\n{}\n...\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: web\n---\n",
        service("web", 9090),
        deployment("web", 1, "        a: b")
    );
    let m = parse(&text).unwrap();
    let kinds: Vec<&str> = m.objects().map(Object::kind).collect();
    assert_eq!(kinds, ["Service", "Deployment", "ServiceAccount"]);
    assert!(m.ignored().is_empty());
    assert!(parse("").unwrap().objects().next().is_none());
    assert!(parse("---\n---\n").unwrap().objects().next().is_none());
}

#[test]
fn other_kinds_are_ignored_with_a_warning() {
    let text = r#"
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: api
spec:
  destination:
    name: api
  sources:
    - name: web
      action: allow
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
data:
  a: b
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
"#;
    let m = parse(text).unwrap();
    assert_eq!(m.objects().count(), 1);
    let ignored: Vec<(&str, Option<&str>)> = m
        .ignored()
        .iter()
        .map(|o| (o.kind.as_str(), o.name.as_deref()))
        .collect();
    assert_eq!(
        ignored,
        [
            ("ServiceIntentions", Some("api")),
            ("ConfigMap", Some("settings"))
        ]
    );
    assert_eq!(m.ignored()[1].namespace.as_deref(), Some("shop"));
    assert_eq!(m.warnings().len(), 2);
    assert!(
        m.warnings()[0].contains("ServiceIntentions"),
        "{:?}",
        m.warnings()
    );
}

#[test]
fn list_kind_is_flattened() {
    let text = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: ServiceAccount
    metadata:
      name: a
  - apiVersion: v1
    kind: ServiceAccount
    metadata:
      name: b
"#;
    let names: Vec<String> = parse(text)
        .unwrap()
        .objects()
        .map(|o| o.name().to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn documents_that_are_not_objects_are_refused() {
    assert_eq!(
        err("- a\n- b\n"),
        "document 1: not a Kubernetes object (expected a mapping with apiVersion and kind)"
    );
    assert_eq!(
        err("---\n---\nkind: Service\nmetadata:\n  name: a\n"),
        "document 2: apiVersion is required"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Service\nspec: {}\n"),
        "document 1: Service: metadata.name is required"
    );
    assert_eq!(
        err("apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata:\n  name: web\n"),
        "Deployment default/web: apiVersion \"extensions/v1beta1\" is not supported (want \"apps/v1\")"
    );
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: a\n");
    assert!(e.starts_with("document 1: YAML: "), "{e}");
    let e =
        err("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n---\nkey: [unclosed\n");
    assert!(e.starts_with("document 2: YAML: "), "{e}");
}

#[test]
fn namespaces_from_metadata_and_override() {
    let text = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: a
  namespace: shop
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: b
"#;
    let m = parse(text).unwrap();
    let placed: Vec<(String, Option<String>)> = m
        .objects()
        .map(|o| (o.name().to_string(), o.namespace().map(str::to_string)))
        .collect();
    assert_eq!(
        placed,
        [
            ("shop".into(), None),
            ("a".into(), Some("shop".into())),
            ("b".into(), Some("default".into()))
        ]
    );
    let s = DesiredState::build(&[m]).unwrap();
    assert_eq!(
        s.namespaces.iter().map(String::as_str).collect::<Vec<_>>(),
        ["default", "shop"]
    );

    // -n shop: objects without a namespace go there; an object naming shop is fine.
    let opts = ParseOptions {
        namespace: Some("shop".into()),
        ..ParseOptions::default()
    };
    let m = Manifest::parse(text, &opts).unwrap();
    assert!(m
        .objects()
        .filter(|o| o.kind() == "ServiceAccount")
        .all(|o| o.namespace() == Some("shop")));

    // -n other: the object naming shop is refused as kubectl does.
    let opts = ParseOptions {
        namespace: Some("other".into()),
        ..ParseOptions::default()
    };
    let e = Manifest::parse(text, &opts).unwrap_err().to_string();
    assert_eq!(
        e,
        "ServiceAccount shop/a: the namespace from the provided object \"shop\" does not match \
         the namespace \"other\". You must pass '--namespace=shop' to perform this operation."
    );
    let opts = ParseOptions {
        namespace: Some("Bad_NS".into()),
        ..ParseOptions::default()
    };
    assert!(matches!(
        Manifest::parse(text, &opts),
        Err(Error::Options(_))
    ));
}

#[test]
fn undeclared_namespaces_are_kept_with_a_warning() {
    let s = state("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n  namespace: dev\n");
    assert!(s.namespaces.contains("dev"));
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("namespace dev is used but not declared")));
}

// ---------------------------------------------------------------------------------------------
// Types and validation
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

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
// Injection and identity
// ---------------------------------------------------------------------------------------------

const INJECT: &str = "        consul.hashicorp.com/connect-inject: \"true\"";

#[test]
fn inject_annotation_on_and_off() {
    let on = state(&format!(
        "{}---{}",
        service("web", 9090),
        deployment("web", 1, INJECT)
    ));
    assert!(on.workloads[0].mesh.is_some());
    for off in ["\"false\"", "\"0\"", "\"F\""] {
        let text = format!(
            "{}---{}",
            service("web", 9090),
            deployment(
                "web",
                1,
                &format!("        consul.hashicorp.com/connect-inject: {off}")
            )
        );
        assert!(state(&text).workloads[0].mesh.is_none(), "{off}");
    }
    assert!(
        state(&deployment("web", 1, "        other: x")).workloads[0]
            .mesh
            .is_none()
    );
    for yes in ["\"1\"", "\"True\"", "\"t\""] {
        let text = format!(
            "{}---{}",
            service("web", 9090),
            deployment(
                "web",
                1,
                &format!("        consul.hashicorp.com/connect-inject: {yes}")
            )
        );
        assert!(state(&text).workloads[0].mesh.is_some(), "{yes}");
    }
    let text = deployment(
        "web",
        1,
        "        consul.hashicorp.com/connect-inject: \"yes\"",
    );
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.template.metadata.annotations.consul.hashicorp.com/connect-inject: \
         strconv.ParseBool: parsing \"yes\": invalid syntax"
    );
    // The Deployment's own annotations do not inject; the template's do.
    let text = deployment("web", 1, "        a: b").replace(
        "metadata:\n  name: web\n",
        "metadata:\n  name: web\n  annotations:\n    consul.hashicorp.com/connect-inject: \"true\"\n",
    );
    assert!(state(&text).workloads[0].mesh.is_none());
    // Never in kube-system.
    let text = format!(
        "{}---{}",
        service("web", 9090),
        deployment("web", 1, INJECT)
    )
    .replace("  name: web\n", "  name: web\n  namespace: kube-system\n");
    let s = state(&text);
    assert!(s.workloads[0].mesh.is_none());
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("ignored in namespace kube-system")));
}

#[test]
fn upstreams_are_not_parsed_without_injection() {
    let text = deployment(
        "web",
        1,
        "        consul.hashicorp.com/connect-service-upstreams: \"garbage\"",
    );
    assert!(state(&text).workloads[0].mesh.is_none());
}

#[test]
fn identity_is_the_selecting_service() {
    // The Service is named differently from the service account: consul-k8s registers the
    // Service's name, and warns about the account.
    let text = format!(
        "{}---{}",
        service("web", 9090).replace("name: web", "name: frontend"),
        deployment("web", 1, INJECT)
    );
    let s = state(&text);
    let mesh = s.workloads[0].mesh.as_ref().unwrap();
    assert_eq!(mesh.service, "frontend");
    assert_eq!(mesh.identity_source, IdentitySource::Service);
    assert!(
        s.warnings
            .iter()
            .any(|w| w
                .contains("service account name web doesn't match Consul service name frontend"))
    );
}

#[test]
fn identity_from_the_connect_service_annotation_wins() {
    let text = format!(
        "{}---{}",
        service("web", 9090),
        deployment(
            "web",
            1,
            &format!("{INJECT}\n        consul.hashicorp.com/connect-service: \" , web-v2 \"")
        )
    );
    let s = state(&text);
    let mesh = s.workloads[0].mesh.as_ref().unwrap();
    assert_eq!(mesh.service, "web-v2");
    assert_eq!(mesh.identity_source, IdentitySource::Annotation);
    let text = deployment(
        "web",
        1,
        &format!("{INJECT}\n        consul.hashicorp.com/connect-service: \"a,b\""),
    );
    assert!(err(&text).contains("multi-port pods"));
}

#[test]
fn identity_falls_back_to_the_service_account() {
    let s = state(&deployment("web", 1, INJECT));
    let mesh = s.workloads[0].mesh.as_ref().unwrap();
    assert_eq!(mesh.service, "web");
    assert_eq!(mesh.identity_source, IdentitySource::ServiceAccount);
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("no Service selects this pod")));
    // No Service and only the default account: nothing names the identity.
    let text = deployment("web", 1, INJECT).replace("      serviceAccountName: web\n", "");
    assert!(err(&text).contains("no Service selects the pod"));
}

#[test]
fn identity_needs_exactly_one_selecting_service() {
    let two = format!(
        "{}---{}---{}",
        service("web", 9090),
        service("web-admin", 9090).replace("app: web-admin", "app: web"),
        deployment("web", 1, INJECT)
    );
    assert!(err(&two).contains("selected by more than one Service (web, web-admin)"));
    // consul-k8s skips Services labelled service-ignore.
    let ignored = two.replace(
        "  name: web-admin\n",
        "  name: web-admin\n  labels:\n    consul.hashicorp.com/service-ignore: \"true\"\n",
    );
    let s = state(&ignored);
    assert_eq!(s.workloads[0].mesh.as_ref().unwrap().service, "web");
    // A Service in another namespace does not select the pod.
    let other = format!(
        "{}---{}",
        service("web", 9090).replace("  name: web\n", "  name: web\n  namespace: other\n"),
        deployment("web", 1, INJECT)
    );
    assert_eq!(
        state(&other).workloads[0]
            .mesh
            .as_ref()
            .unwrap()
            .identity_source,
        IdentitySource::ServiceAccount
    );
}

// ---------------------------------------------------------------------------------------------
// Upstream annotation grammar
// ---------------------------------------------------------------------------------------------

const OSS: UpstreamSyntax = UpstreamSyntax {
    consul_namespaces: false,
    consul_partitions: false,
};
const ENT: UpstreamSyntax = UpstreamSyntax {
    consul_namespaces: true,
    consul_partitions: true,
};

fn up(raw: &str, syntax: UpstreamSyntax) -> Upstream {
    parse_upstream(raw, &[], syntax).unwrap_or_else(|e| panic!("{raw}: {e}"))
}

/// (service, namespace, datacenter, port)
fn sndp(u: &Upstream) -> (&str, Option<&str>, Option<&str>, u16) {
    (
        u.service.as_str(),
        u.namespace.as_deref(),
        u.datacenter.as_deref(),
        u.bind_port,
    )
}

#[test]
fn upstream_forms() {
    let d = UpstreamSyntax::default();
    assert_eq!(sndp(&up("api:9091", d)), ("api", None, None, 9091));
    assert_eq!(
        sndp(&up("api:9091:dc2", d)),
        ("api", None, Some("dc2"), 9091)
    );
    assert_eq!(
        sndp(&up("api.payments:9091", d)),
        ("api", Some("payments"), None, 9091)
    );
    assert_eq!(
        sndp(&up("api.payments:9091:dc2", d)),
        ("api", Some("payments"), Some("dc2"), 9091)
    );
    let u = up("api.payments.part1:9091", ENT);
    assert_eq!(sndp(&u), ("api", Some("payments"), None, 9091));
    assert_eq!(u.partition.as_deref(), Some("part1"));
    // Labelled forms.
    assert_eq!(sndp(&up("api.svc:9091", d)), ("api", None, None, 9091));
    assert_eq!(
        sndp(&up("api.svc.payments.ns:9091", d)),
        ("api", Some("payments"), None, 9091)
    );
    assert_eq!(
        sndp(&up("api.svc.payments.ns.dc2.dc:9091", d)),
        ("api", Some("payments"), Some("dc2"), 9091)
    );
    let u = up("api.svc.payments.ns.peer1.peer:9091", d);
    assert_eq!(
        (u.peer.as_deref(), u.namespace.as_deref()),
        (Some("peer1"), Some("payments"))
    );
    let u = up("api.svc.payments.ns.part1.ap:9091", ENT);
    assert_eq!(u.partition.as_deref(), Some("part1"));
    // Without Consul namespaces: dots are part of the name, labelled forms take dc/peer only.
    assert_eq!(sndp(&up("api.v1:9091", OSS)), ("api.v1", None, None, 9091));
    assert_eq!(
        sndp(&up("api.svc.dc2.dc:9091", OSS)),
        ("api", None, Some("dc2"), 9091)
    );
    assert_eq!(
        up("api.svc.peer1.peer:9091", OSS).peer.as_deref(),
        Some("peer1")
    );
    // Options (newer consul-k8s).
    let u = up(
        "api:9091:dc2?destination_port=grpc&mesh_gateway_mode=local",
        d,
    );
    assert_eq!(u.datacenter.as_deref(), Some("dc2"));
    assert_eq!(u.destination_port.as_deref(), Some("grpc"));
    assert_eq!(u.mesh_gateway_mode, Some(MeshGatewayMode::Local));
    let u = up("api:9091:local_bind_address=127.0.0.2;dc=dc3", d);
    assert_eq!(u.local_bind_address.as_deref(), Some("127.0.0.2"));
    assert_eq!(u.datacenter.as_deref(), Some("dc3"));
    assert_eq!(
        up("api.svc:9091:grpc", d).destination_port.as_deref(),
        Some("grpc")
    );
    // Prepared queries, port syntax.
    let u = up("prepared_query:nearest-api:9093", d);
    assert_eq!(
        (u.destination_type, u.service.as_str(), u.bind_port),
        (DestinationType::PreparedQuery, "nearest-api", 9093)
    );
    assert_eq!(up("api:0x2383", d).bind_port, 9091);
    assert_eq!(up(" api : 9091 ", d).service, "api");
}

#[test]
fn upstream_lists() {
    let list = parse_upstreams(
        "api:9091, db.data:5432:dc2 ,cache.svc.infra.ns:6379",
        &[],
        UpstreamSyntax::default(),
    )
    .unwrap();
    let got: Vec<_> = list.iter().map(sndp).collect();
    assert_eq!(
        got,
        [
            ("api", None, None, 9091),
            ("db", Some("data"), Some("dc2"), 5432),
            ("cache", Some("infra"), None, 6379)
        ]
    );
    assert!(parse_upstreams("", &[], UpstreamSyntax::default())
        .unwrap()
        .is_empty());
}

#[test]
fn upstream_port_may_name_a_container_port() {
    let containers = vec![Container {
        name: "app".into(),
        image: "x".into(),
        command: vec![],
        args: vec![],
        env: vec![],
        ports: vec![ContainerPort {
            name: Some("api-port".into()),
            container_port: 9191,
            protocol: Protocol::Tcp,
        }],
        run_as_user: None,
        run_as_group: None,
    }];
    let u = parse_upstream("api:api-port", &containers, UpstreamSyntax::default()).unwrap();
    assert_eq!(u.bind_port, 9191);
}

#[test]
fn malformed_upstreams_are_refused() {
    let d = UpstreamSyntax::default();
    let cases: &[(&str, UpstreamSyntax, &str)] = &[
        ("api", d, "upstream structured incorrectly: api"),
        (
            "api:abc",
            d,
            "invalid upstream local bind port \"abc\" in \"api:abc\"",
        ),
        (
            "api:",
            d,
            "invalid upstream local bind port \"\" in \"api:\"",
        ),
        (
            "api:0",
            d,
            "invalid upstream local bind port \"0\" in \"api:0\"",
        ),
        (
            "api:-1",
            d,
            "invalid upstream local bind port \"-1\" in \"api:-1\"",
        ),
        (
            "api:70000",
            d,
            "invalid upstream local bind port \"70000\" in \"api:70000\"",
        ),
        (
            "api:09091",
            d,
            "invalid upstream local bind port \"09091\" in \"api:09091\"",
        ),
        (":9091", d, "upstream structured incorrectly: :9091"),
        (
            "api:9091:dc1:extra",
            d,
            "upstream structured incorrectly: api:9091:dc1:extra",
        ),
        (
            "api..x:9091",
            ENT,
            "upstream structured incorrectly: api..x:9091",
        ),
        // Labelled forms with a wrong or missing label.
        (
            "api.svc.payments.namespace:9091",
            d,
            "upstream structured incorrectly: api.svc.payments.namespace:9091",
        ),
        (
            "api.svc.payments:9091",
            d,
            "upstream structured incorrectly: api.svc.payments:9091",
        ),
        (
            "api.svc.payments.ns.dc2.datacenter:9091",
            d,
            "upstream structured incorrectly: api.svc.payments.ns.dc2.datacenter:9091",
        ),
        (
            "api.svc.peer1.peer:9091",
            d,
            "upstream structured incorrectly: api.svc.peer1.peer:9091",
        ),
        (
            "api.svc.payments.ns:9091",
            OSS,
            "upstream structured incorrectly: api.svc.payments.ns:9091",
        ),
        (
            "api.svc.part1.ap:9091",
            OSS,
            "upstream structured incorrectly: api.svc.part1.ap:9091",
        ),
        (".svc:9091", d, "upstream structured incorrectly: .svc:9091"),
        (
            "api.svc.ns1.ns.dc2.dc:9091:dc=dc3",
            d,
            "upstream structured incorrectly: api.svc.ns1.ns.dc2.dc:9091:dc=dc3",
        ),
        ("api", d, "upstream structured incorrectly: api"),
        (
            "prepared_query:q",
            d,
            "upstream structured incorrectly: prepared_query:q",
        ),
        (
            "prepared_query::9091",
            d,
            "upstream structured incorrectly: prepared_query::9091",
        ),
        (
            "api:9091:mesh_gateway_mode=far",
            d,
            "invalid upstream mesh gateway mode \"far\" in \"api:9091:mesh_gateway_mode=far\"",
        ),
        (
            "api:9091:colour=blue",
            d,
            "unsupported upstream option \"colour\" in \"api:9091:colour=blue\"",
        ),
        (
            "api:9091:dc=%zz",
            d,
            "upstream structured incorrectly: api:9091:dc=%zz",
        ),
    ];
    for (raw, syntax, want) in cases {
        match parse_upstream(raw, &[], *syntax) {
            Ok(u) => panic!("{raw}: accepted as {u:?}"),
            Err(e) => assert_eq!(e.to_string(), *want, "{raw}"),
        }
    }
    // Empty entries, in the middle or trailing.
    for raw in ["api:9091,,web:9090", "api:9091,", ",api:9091", " "] {
        assert_eq!(
            parse_upstreams(raw, &[], d).unwrap_err().to_string(),
            "upstream structured incorrectly: ",
            "{raw:?}"
        );
    }
    assert_eq!(
        parse_upstreams("api:9091, web", &[], d)
            .unwrap_err()
            .to_string(),
        "upstream structured incorrectly: web"
    );
}

#[test]
fn a_malformed_upstream_refuses_the_whole_manifest() {
    let text = format!(
        "{}---{}---{}",
        service("api", 9091),
        deployment("api", 1, INJECT),
        deployment(
            "web",
            1,
            &format!("{INJECT}\n        consul.hashicorp.com/connect-service-upstreams: \"api:9091, api:abc\"")
        )
    );
    assert_eq!(
        parse(&text).unwrap_err().to_string(),
        "Deployment default/web: spec.template.metadata.annotations.consul.hashicorp.com/connect-service-upstreams: \
         invalid upstream local bind port \"abc\" in \"api:abc\""
    );
}

#[test]
fn upstreams_convert_to_the_catalog_form() {
    let u = up("api:9091", UpstreamSyntax::default());
    let c = u.to_catalog("shop", "dc1").unwrap();
    assert_eq!(
        (
            c.service.as_str(),
            c.namespace.as_str(),
            c.datacenter.as_str(),
            c.bind_port
        ),
        ("api", "shop", "dc1", 9091)
    );
    let c = up("api.payments:9091:dc2", UpstreamSyntax::default())
        .to_catalog("shop", "dc1")
        .unwrap();
    assert_eq!(
        (c.namespace.as_str(), c.datacenter.as_str()),
        ("payments", "dc2")
    );
    assert!(up("prepared_query:q:1", UpstreamSyntax::default())
        .to_catalog("shop", "dc1")
        .is_none());
}

// ---------------------------------------------------------------------------------------------
// Tutorial manifests
// ---------------------------------------------------------------------------------------------

/// The "web → api" example of Consul's Kubernetes service mesh tutorials, with fake-service.
const WEB_API: &str = r#"
# api: the upstream
apiVersion: v1
kind: ServiceAccount
metadata:
  name: api-v1
---
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
apiVersion: apps/v1
kind: Deployment
metadata:
  name: api-v1
  labels:
    app: api-v1
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
            - name: 'LISTEN_ADDR'
              value: '127.0.0.1:9091'
            - name: 'NAME'
              value: 'api-v1'
            - name: 'MESSAGE'
              value: 'Response from API v1'
---
# web: the frontend, calling api-v1 through its explicit upstream on localhost:9091
apiVersion: v1
kind: ServiceAccount
metadata:
  name: web
---
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
  labels:
    app: web
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
        consul.hashicorp.com/connect-service-upstreams: 'api-v1:9091'
    spec:
      serviceAccountName: web
      containers:
        - name: web
          image: nicholasjackson/fake-service:v0.26.0
          ports:
            - containerPort: 9090
          env:
            - name: 'LISTEN_ADDR'
              value: '0.0.0.0:9090'
            - name: 'UPSTREAM_URIS'
              value: 'http://localhost:9091'
            - name: 'NAME'
              value: 'web'
            - name: 'MESSAGE'
              value: 'Hello World'
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: api-v1
spec:
  destination:
    name: api-v1
  sources:
    - name: web
      action: allow
"#;

#[test]
fn web_api_tutorial() {
    let s = state(WEB_API);
    assert_eq!(s.services.len(), 2);
    let api = s.service("default", "api-v1").unwrap();
    assert_eq!(api.ports[0].port, 9091);
    assert_eq!(api.ports[0].target_port, TargetPort::Number(9091));
    assert_eq!(api.ports[0].protocol, Protocol::Tcp);
    assert_eq!(s.workloads.len(), 2);

    let web = s.workload("default", "web-0").unwrap();
    let mesh = web.mesh.as_ref().unwrap();
    assert_eq!(mesh.service, "web");
    assert_eq!(mesh.identity_source, IdentitySource::Service);
    assert_eq!(mesh.upstreams.len(), 1);
    assert_eq!(sndp(&mesh.upstreams[0]), ("api-v1", None, None, 9091));
    let c = &web.containers[0];
    assert_eq!(c.image, "nicholasjackson/fake-service:v0.26.0");
    let env: Vec<(&str, &str)> = c
        .env
        .iter()
        .map(|e| match &e.value {
            EnvValue::Value(v) => (e.name.as_str(), v.as_str()),
            EnvValue::FieldRef(f) => panic!("unexpected field ref {f}"),
        })
        .collect();
    assert_eq!(
        env,
        [
            ("LISTEN_ADDR", "0.0.0.0:9090"),
            ("UPSTREAM_URIS", "http://localhost:9091"),
            ("NAME", "web"),
            ("MESSAGE", "Hello World")
        ]
    );

    let api = s.workload("default", "api-v1-0").unwrap();
    assert_eq!(api.mesh.as_ref().unwrap().service, "api-v1");
    assert!(api.mesh.as_ref().unwrap().upstreams.is_empty());
    assert_eq!(api.tcp_ports(), [9091]);

    assert_eq!(s.ignored.len(), 1);
    assert_eq!(s.ignored[0].kind, "ServiceIntentions");
    // Service accounts match the Services: no identity warnings.
    assert!(
        s.warnings.iter().all(|w| !w.contains("doesn't match")),
        "{:?}",
        s.warnings
    );
    assert_eq!(s.service_accounts.len(), 2);
}

/// Consul's "static-server / static-client" example, in a namespace given with `-n`.
const STATIC: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: static-server
spec:
  selector:
    app: static-server
  ports:
    - protocol: TCP
      port: 80
      targetPort: http
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: static-server
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: static-server
spec:
  replicas: 2
  selector:
    matchLabels:
      app: static-server
  template:
    metadata:
      name: static-server
      labels:
        app: static-server
      annotations:
        'consul.hashicorp.com/connect-inject': 'true'
    spec:
      containers:
        - name: static-server
          image: nicholasjackson/fake-service:v0.26.0
          env:
            - {name: LISTEN_ADDR, value: "0.0.0.0:8080"}
            - {name: NAME, value: static-server}
            - {name: MESSAGE, value: hello world}
          ports:
            - containerPort: 8080
              name: http
      serviceAccountName: static-server
---
apiVersion: v1
kind: Service
metadata:
  name: static-client
spec:
  selector:
    app: static-client
  ports:
    - port: 80
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: static-client
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: static-client
spec:
  replicas: 1
  selector:
    matchLabels:
      app: static-client
  template:
    metadata:
      name: static-client
      labels:
        app: static-client
      annotations:
        'consul.hashicorp.com/connect-inject': 'true'
        'consul.hashicorp.com/connect-service-upstreams': 'static-server:1234'
    spec:
      containers:
        - name: static-client
          image: curlimages/curl:latest
          command: ['/bin/sh', '-c', '--']
          args: ['while true; do sleep 30; done;']
      serviceAccountName: static-client
"#;

#[test]
fn static_server_client_tutorial() {
    let opts = ParseOptions {
        namespace: Some("demo".into()),
        ..ParseOptions::default()
    };
    let m = Manifest::parse(STATIC, &opts).unwrap();
    let s = DesiredState::build(&[m]).unwrap();
    let names: Vec<String> = s.workloads.iter().map(Workload::id).collect();
    assert_eq!(
        names,
        [
            "demo/static-client-0",
            "demo/static-server-0",
            "demo/static-server-1"
        ]
    );
    let server = s.service("demo", "static-server").unwrap();
    assert_eq!(server.ports[0].target_port, TargetPort::Name("http".into()));
    let client = s.workload("demo", "static-client-0").unwrap();
    let mesh = client.mesh.as_ref().unwrap();
    assert_eq!(mesh.service, "static-client");
    let catalog = mesh.upstreams[0]
        .to_catalog(&client.namespace, "dc1")
        .unwrap();
    assert_eq!(
        (
            catalog.service.as_str(),
            catalog.namespace.as_str(),
            catalog.bind_port
        ),
        ("static-server", "demo", 1234)
    );
    assert!(client.tcp_ports().is_empty());
    for w in ["static-server-0", "static-server-1"] {
        let m = s.workload("demo", w).unwrap().mesh.as_ref().unwrap();
        assert_eq!(
            (m.service.as_str(), m.identity_source),
            ("static-server", IdentitySource::Service)
        );
    }
    assert!(s.namespaces.contains("demo"));
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
