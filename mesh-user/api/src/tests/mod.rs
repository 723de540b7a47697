//! In-process tests of the API: a real server on 127.0.0.1 (ephemeral port) and its Unix
//! socket, in a temporary state directory. This module is the harness; the tests live in one
//! module per area.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};

use super::*;
use mesh_core::intentions::Action;

mod acl;
mod config_entries;
mod hardening;
mod intentions;
mod l7;
mod local;
mod metrics;
mod parity;
mod serving;
mod ui;

struct Harness {
    dir: tempfile::TempDir,
    server: Server,
    root: String,
    sink: Arc<MemorySink>,
    counters: Arc<MemoryCounters>,
    status: Arc<PublishedStatus>,
    catalog: Arc<PublishedCatalog>,
}

fn config(dir: &Path, policy: Action) -> ServerConfig {
    let mut cfg = ServerConfig::new(dir);
    cfg.http_addr = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    cfg.default_intention_policy = policy;
    cfg
}

async fn start_in(dir: tempfile::TempDir, policy: Action) -> Harness {
    start_with(dir, policy, |_| {}).await
}

/// A server on `dir` whose configuration `tweak` changes first.
async fn start_with(
    dir: tempfile::TempDir,
    policy: Action,
    tweak: impl FnOnce(&mut ServerConfig),
) -> Harness {
    start_full(dir, policy, None, tweak).await
}

/// A deny-by-default server that serves `/v1/local/*` from `runner`.
async fn start_local(runner: crate::local::Handle) -> Harness {
    start_full(
        tempfile::tempdir().unwrap(),
        Action::Deny,
        Some(runner),
        |_| {},
    )
    .await
}

async fn start_full(
    dir: tempfile::TempDir,
    policy: Action,
    local: Option<crate::local::Handle>,
    tweak: impl FnOnce(&mut ServerConfig),
) -> Harness {
    let sink = Arc::new(MemorySink::default());
    let counters = Arc::new(MemoryCounters::default());
    let status = Arc::new(PublishedStatus::default());
    let catalog = Arc::new(PublishedCatalog::default());
    let hooks = Hooks {
        rules: sink.clone(),
        counters: counters.clone(),
        status: status.clone(),
        local,
        catalog: catalog.clone(),
        metrics: Some(Arc::new(metrics::Fixed)),
    };
    let mut cfg = config(dir.path(), policy);
    tweak(&mut cfg);
    let server = Server::start(cfg, hooks).await.unwrap();
    let root = server
        .bootstrap_token()
        .map(str::to_owned)
        .unwrap_or_else(|| {
            std::fs::read_to_string(dir.path().join(BOOTSTRAP_TOKEN_FILE))
                .unwrap()
                .trim()
                .to_owned()
        });
    Harness {
        dir,
        server,
        root,
        sink,
        counters,
        status,
        catalog,
    }
}

async fn start() -> Harness {
    start_in(tempfile::tempdir().unwrap(), Action::Deny).await
}

impl Harness {
    fn client(&self, token: Option<&str>) -> Client {
        let addr = self.server.http_addr().unwrap();
        Client::new(Address::Tcp(addr.to_string()), token.map(str::to_owned))
    }

    /// A request with `token`: (status, JSON body or Null).
    async fn call(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.call_raw(token, method, path, body.map(|b| b.to_string()))
            .await
    }

    async fn call_raw(
        &self,
        token: Option<&str>,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> (u16, Value) {
        let resp = self
            .client(token)
            .request(method, path, body.map(String::into_bytes))
            .await
            .unwrap();
        let v = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
        (resp.status, v)
    }

    /// A request with the bootstrap (operator) token that must succeed.
    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(Some(&self.root), method, path, body).await;
        assert_eq!(status, 200, "{method} {path}: {v}");
        v
    }

    async fn token(&self, policies: &[&str]) -> String {
        let links: Vec<Value> = policies.iter().map(|p| json!({ "Name": p })).collect();
        let v = self
            .ok(
                "PUT",
                "/v1/acl/token",
                Some(json!({ "Description": "test", "Policies": links })),
            )
            .await;
        v["SecretID"].as_str().unwrap().to_owned()
    }

    /// Everything observable: intentions, entries, tokens, the state file and its journal.
    async fn snapshot(&self) -> (Value, Value, Value, Vec<u8>) {
        let mut files = std::fs::read(self.dir.path().join(STATE_FILE)).unwrap();
        files.extend(std::fs::read(self.dir.path().join(crate::JOURNAL_FILE)).unwrap());
        (
            self.ok("GET", "/v1/connect/intentions", None).await,
            self.ok("GET", "/v1/config/service-intentions", None).await,
            self.ok("GET", "/v1/acl/tokens", None).await,
            files,
        )
    }
}

fn exact(src: &str, dst: &str) -> String {
    format!("/v1/connect/intentions/exact?source={src}&destination={dst}")
}
