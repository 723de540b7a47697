//! Tests of the Kubernetes object model, one file per area; the shared helpers are here.

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

const INJECT: &str = "        consul.hashicorp.com/connect-inject: \"true\"";

/// (service, namespace, datacenter, port)
fn sndp(u: &Upstream) -> (&str, Option<&str>, Option<&str>, u16) {
    (
        u.service.as_str(),
        u.namespace.as_deref(),
        u.datacenter.as_deref(),
        u.bind_port,
    )
}

mod documents;
mod injection;
mod parity;
mod tutorials;
mod upstreams;
mod validation;
mod workloads;
