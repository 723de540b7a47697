//! The tutorial manifests, end to end.

use super::*;

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

    assert!(s.ignored.is_empty(), "{:?}", s.ignored);
    // The tutorial's ServiceIntentions becomes the config entry consul-k8s writes.
    assert_eq!(s.service_intentions.len(), 1);
    let entry = &s.service_intentions[0].entry;
    assert_eq!(entry.destination.to_string(), "default/api-v1");
    assert_eq!(entry.meta["external-source"], "kubernetes");
    assert_eq!(entry.sources.len(), 1);
    assert_eq!(entry.sources[0].source.to_string(), "default/web");
    assert!(entry.sources[0].action.is_allow());
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
