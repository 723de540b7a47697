//! `meshd kubernetes`: the node agent of a Kubernetes cluster.
//!
//! kube-runtime watchers and reflectors keep this node's Pods (field selector
//! `spec.nodeName=<node>`), the Services, EndpointSlices, Namespaces and ServiceAccounts of
//! every namespace, and consul-k8s's `ServiceIntentions` and `ServiceDefaults`. Each watcher
//! re-lists on `410 Gone`, asks for bookmarks, and backs off on errors (kube-runtime's default
//! back-off); while a watch fails, the last state stays enforced, the error is logged and
//! `mesh_kubernetes_watch_healthy{kind}` is 0 until the API server accepts the kind's watch
//! again.
//!
//! On every change (coalesced over [`SETTLE`]) the objects are translated
//! ([`mesh_core::k8s::cluster::translate`]) and applied: the catalog to the agent, the CRDs'
//! entries to the API's store (`Store::sync_kubernetes_entries`, as `meshd local` does), and
//! each CRD's `status` gets consul-k8s's `Synced` condition. Intention writes through the HTTP
//! API are refused (they would hold on this node only); reads work, and CRD intentions show
//! `Meta["external-source"] = "kubernetes"`.
//!
//! Pods are found on the node by [`locate`]: one call, the node's pod locator. With
//! `--cni-socket`, `mesh-cni`'s `ADD`s are answered once their pod is meshed
//! ([`crate::kube_cni`]). With `--ca-url`, leaves come from `meshd ca`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use mesh_agent::metrics::{KindLabel, Metrics};
use mesh_agent::{Agent, AgentConfig};
use mesh_core::catalog::Update;
use mesh_core::intentions::SyncOutcome;
use mesh_core::k8s::cluster::{self, ClusterObjects, CrRef, Located, PodRef, Translation};
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Notify;
use tracing::{error, info, warn};

/// How long changes are gathered before the catalog is recomputed.
pub const SETTLE: Duration = Duration::from_millis(100);

/// The CRDs' group and version.
const CONSUL_GROUP: &str = "consul.hashicorp.com";
const CONSUL_VERSION: &str = "v1alpha1";

/// What `meshd kubernetes` is told.
pub struct Options {
    /// This node's name (`spec.nodeName` of its pods).
    pub node_name: String,
    /// The API server's URL; `None`: kubeconfig or in-cluster config (`Config::infer`).
    pub kube_api_url: Option<String>,
    /// The agent's configuration (instance, state directory, redirect, policy, proxy).
    pub agent: AgentConfig,
    /// The `/metrics` listener.
    pub metrics_addr: crate::config::MetricsAddr,
    /// The cgroup v2 root where the kubelet's pod cgroups are (`/sys/fs/cgroup`).
    pub cgroup_root: PathBuf,
    /// The `/proc` of the node's PID namespace (`/host/proc` in the DaemonSet).
    pub proc_root: PathBuf,
    /// Where `mesh-cni` reaches the agent (mode 0600); `None`: no CNI socket.
    pub cni_socket: Option<PathBuf>,
    /// `meshd ca` to get each leaf from; `None`: the CA in the state directory.
    pub ca: Option<mesh_agent::ca::client::CaClient>,
    /// This agent's own pod's UID, for the hand-over ([`crate::handover`]); `None` outside a pod.
    pub pod_uid: Option<String>,
    /// Created once the agent serves, removed when it hands over or stops.
    pub ready_file: Option<PathBuf>,
}

/// Finds pod `pod` on this node with the node's pod locator
/// ([`mesh_dataplane::kubepods::Locator`]): its pod-level cgroup (by UID, in the kubelet's
/// systemd or cgroupfs layout) and the network namespace, among its processes', that holds its
/// IP. `None` while it is not there yet (the reason is logged at debug level).
pub fn locate(locator: &mesh_dataplane::kubepods::Locator, pod: &PodRef) -> Option<Located> {
    match locator.locate(&pod.uid, &[std::net::IpAddr::V4(pod.ip)]) {
        Ok(found) => Some(Located {
            netns: found.netns,
            cgroup: found.cgroup.path,
        }),
        Err(e) => {
            tracing::debug!(pod = %format!("{}/{}", pod.namespace, pod.name), error = %e, "pod not found on the node yet");
            None
        }
    }
}

/// The client: an explicit URL, else kubeconfig or the in-cluster service account. Its watch
/// requests report to `metrics` ([`WatchHealthLayer`]).
async fn client(url: Option<&str>, metrics: &Arc<Metrics>) -> Result<Client> {
    let mut config = match url {
        Some(url) => kube::Config::new(
            url.parse()
                .with_context(|| format!("--kube-api-url {url:?} is not a URL"))?,
        ),
        None => kube::Config::infer().await.context(
            "no Kubernetes API configuration (kubeconfig, in-cluster, or --kube-api-url)",
        )?,
    };
    // kube's client retries 429/503/504 on its own (15 times, exponential back-off from 5 ms):
    // a watcher would see an unavailable API server only minutes later, and the outage would
    // show in neither logs nor metrics. The watchers back off themselves
    // (`WatchStreamExt::default_backoff`) and report each failure; a failed status write is
    // retried on the next change.
    config.default_retry = false;
    Ok(kube::client::ClientBuilder::try_from(config)
        .context("the Kubernetes client")?
        .with_layer(&WatchHealthLayer(metrics.clone()))
        .build())
}

/// The kind (`mesh_kubernetes_watch_healthy`'s label) of each watched resource, by the plural
/// name that ends its collection's path (`/api/v1/pods`, `/apis/discovery.k8s.io/v1/endpointslices`).
const WATCHED: [(&str, &str); 7] = [
    ("pods", "Pod"),
    ("services", "Service"),
    ("endpointslices", "EndpointSlice"),
    ("namespaces", "Namespace"),
    ("serviceaccounts", "ServiceAccount"),
    ("serviceintentions", "ServiceIntentions"),
    ("servicedefaults", "ServiceDefaults"),
];

/// The watched kind a request is a watch of (`watch=true` or `watch=1` on a collection of
/// [`WATCHED`]), if it is one.
fn watched_kind(uri: &http::Uri) -> Option<&'static str> {
    let watch = uri
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "watch=true" || kv == "watch=1"));
    if !watch {
        return None;
    }
    let plural = uri.path().trim_end_matches('/').rsplit('/').next()?;
    WATCHED
        .iter()
        .find(|(p, _)| *p == plural)
        .map(|(_, kind)| *kind)
}

/// A client layer that sets `mesh_kubernetes_watch_healthy{kind}` from each watch request's
/// answer: 1 when the API server accepts the watch, 0 when it refuses it or cannot be reached.
/// kube-runtime's watcher emits no event when it resumes a watch from its last
/// `resourceVersion`, so after an outage of a kind that did not change meanwhile, the answer to
/// the watch request is the only sign that it streams again. (A watch that breaks later ends in
/// an error the watcher reports, see [`watch`].)
#[derive(Clone)]
struct WatchHealthLayer(Arc<Metrics>);

impl<S> tower::Layer<S> for WatchHealthLayer {
    type Service = WatchHealth<S>;

    fn layer(&self, inner: S) -> WatchHealth<S> {
        WatchHealth {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// See [`WatchHealthLayer`].
#[derive(Clone)]
struct WatchHealth<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for WatchHealth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let gauge = watched_kind(request.uri()).map(|kind| {
            self.metrics
                .kubernetes()
                .watch_healthy
                .get_or_create(&KindLabel { kind: kind.into() })
                .clone()
        });
        let answer = self.inner.call(request);
        Box::pin(async move {
            let answer = answer.await;
            if let Some(gauge) = gauge {
                let streams = matches!(&answer, Ok(r) if r.status().is_success());
                gauge.set(i64::from(streams));
            }
            answer
        })
    }
}

/// One watched kind: its reflector's store, and whether its watch is healthy.
struct Watched<K: kube::Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store: Store<K>,
}

/// Starts the reflector of `api` (filtered by `config`) and returns its store. Every event
/// wakes `changed`; the kind's health goes to `metrics`.
fn watch<K>(
    kind: &'static str,
    api: Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
) -> Watched<K>
where
    K: kube::Resource
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let healthy = metrics
        .kubernetes()
        .watch_healthy
        .get_or_create(&KindLabel { kind: kind.into() })
        .clone();
    healthy.set(0);
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        let was_healthy = AtomicBool::new(false);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    if !was_healthy.swap(true, Ordering::Relaxed) {
                        info!(kind, "watch healthy");
                    }
                    healthy.set(1);
                    changed.notify_one();
                }
                Err(e) => {
                    if was_healthy.swap(false, Ordering::Relaxed) {
                        warn!(kind, error = %e, "watch failed; the last state stays enforced, retrying with back-off");
                    } else {
                        warn!(kind, error = %e, "watch still failing; retrying with back-off");
                    }
                    healthy.set(0);
                }
            }
        }
    });
    Watched { store }
}

fn values(store: &Store<DynamicObject>) -> Vec<Value> {
    store
        .state()
        .iter()
        .filter_map(|o| serde_json::to_value(&**o).ok())
        .collect()
}

fn owned<K: kube::Resource + Clone>(store: &Store<K>) -> Vec<K>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store.state().iter().map(|o| (**o).clone()).collect()
}

/// The status consul-k8s's controllers write: one `Synced` condition (`True`, or `False` with a
/// reason and message) and, when synced, `lastSyncedTime` (consul-k8s `api/common`
/// `Status`/`Condition`).
pub fn synced_status(outcome: &SyncResult, now: &str) -> Value {
    match outcome {
        Ok(()) => json!({
            "conditions": [{"type": "Synced", "status": "True", "lastTransitionTime": now}],
            "lastSyncedTime": now,
        }),
        Err((reason, message)) => json!({
            "conditions": [{
                "type": "Synced", "status": "False", "lastTransitionTime": now,
                "reason": reason, "message": message,
            }],
        }),
    }
}

/// `meshd kubernetes`, until SIGINT/SIGTERM.
pub async fn run(opts: Options) -> Result<()> {
    let state_dir = opts.agent.state_dir.clone();
    if let Some(uid) = &opts.pod_uid {
        if crate::handover::is_retired(&state_dir, uid) {
            return idle_retired(&state_dir, uid).await;
        }
    }
    let metrics = Arc::new(Metrics::new());
    let client = client(opts.kube_api_url.as_deref(), &metrics).await?;
    let changed = Arc::new(Notify::new());
    let node_selector = format!("spec.nodeName={}", opts.node_name);
    let pods = watch(
        "Pod",
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().fields(&node_selector),
        (),
        changed.clone(),
        metrics.clone(),
    );
    let services = watch(
        "Service",
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
        (),
        changed.clone(),
        metrics.clone(),
    );
    let slices = watch(
        "EndpointSlice",
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default(),
        (),
        changed.clone(),
        metrics.clone(),
    );
    let namespaces = watch(
        "Namespace",
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
        (),
        changed.clone(),
        metrics.clone(),
    );
    let accounts = watch(
        "ServiceAccount",
        Api::<ServiceAccount>::all(client.clone()),
        watcher::Config::default(),
        (),
        changed.clone(),
        metrics.clone(),
    );
    let crd = |kind: &str, plural: &str| {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(CONSUL_GROUP, CONSUL_VERSION, kind),
            plural,
        )
    };
    let si_resource = crd("ServiceIntentions", "serviceintentions");
    let sd_resource = crd("ServiceDefaults", "servicedefaults");
    let intentions = watch_dynamic(
        "ServiceIntentions",
        &client,
        &si_resource,
        changed.clone(),
        metrics.clone(),
    );
    let defaults = watch_dynamic(
        "ServiceDefaults",
        &client,
        &sd_resource,
        changed.clone(),
        metrics.clone(),
    );

    // The first catalog waits for every kind's first list: a partial view would remove pods.
    info!(node = %opts.node_name, "listing the cluster's objects");
    wait("Pod", &pods.store).await?;
    wait("Service", &services.store).await?;
    wait("EndpointSlice", &slices.store).await?;
    wait("Namespace", &namespaces.store).await?;
    wait("ServiceAccount", &accounts.store).await?;
    wait("ServiceIntentions", &intentions.store).await?;
    wait("ServiceDefaults", &defaults.store).await?;

    // From here on SIGTERM is handled (a stop in the middle of the start still drops the
    // handed-over connections cleanly); until here it ended the process at once (a start stuck
    // in the first lists).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // An agent that cannot run on the node's pinned maps (another build's layout) stops
    // here, before the running agent hands the node over: that one goes on serving.
    if opts.agent.redirect != mesh_agent::Redirect::Iptables {
        mesh_dataplane::bpf::check_pinned_maps(&opts.agent.instance)
            .context("checking the node's pinned maps before taking the node over")?;
    }
    // A rolling update: the agent this one replaces (if one runs) hands its same-node
    // connections over and closes what it listens on (crate::handover). Asked only now, with
    // the cluster listed, so that an agent that cannot list never leaves the node without one.
    let mut taken = match crate::handover::take_over(&state_dir, opts.pod_uid.as_deref()).await {
        Ok(taken) => taken,
        Err(e) => {
            warn!(error = %format!("{e:#}"), "no hand-over from the running agent; its same-node connections end with it");
            crate::handover::Taken::default()
        }
    };
    let handed =
        mesh_agent::Handed::new(std::mem::take(&mut taken.pairs), mesh_agent::TAKE_UP_WITHIN);
    let (server, hooks, status, published, rules, changes) = crate::start_api(
        &opts.agent.state_dir,
        opts.agent.default_policy,
        None,
        &metrics,
    )
    .await?;
    let api = ApiParts {
        server,
        hooks,
        status,
        published,
        rules,
        changes,
    };
    let ApiParts {
        server,
        hooks,
        status,
        published,
        rules,
        mut changes,
    } = api;
    server
        .store()
        .set_kubernetes_only()
        .context("making the API's intentions read-only")?;
    let metrics_server = crate::start_metrics(opts.metrics_addr, &metrics).await?;

    let pod_locator = mesh_dataplane::kubepods::Locator::new(&opts.cgroup_root, &opts.proc_root);
    let mut cni = crate::kube_cni::KubeCni::new(crate::kube_cni::ADD_WAIT);
    let snapshot = || ClusterObjects {
        node_name: opts.node_name.clone(),
        pods: owned(&pods.store),
        services: owned(&services.store),
        endpoint_slices: owned(&slices.store),
        namespaces: owned(&namespaces.store),
        service_accounts: owned(&accounts.store),
        service_intentions: values(&intentions.store),
        service_defaults: values(&defaults.store),
    };
    let translation = translate(&mut cni, &pod_locator, snapshot());
    let mut crd_statuses = CrdStatuses {
        client: client.clone(),
        si_resource,
        sd_resource,
        written: BTreeMap::new(),
    };
    // The CRDs' intentions into the store now; their statuses (a request per object) once the
    // agent serves, so that a hand-over's gap does not grow with the cluster.
    store_crds(&server, &translation).await;
    report(&translation, &metrics);
    // The CRDs' entries reach the rules through `changes`; start with what the store holds now.
    let rules = changes.try_recv().unwrap_or(rules);
    let count = rules.len();
    let node = opts.node_name.clone();
    let identity = match opts.ca {
        Some(client) => mesh_agent::Identity::remote(client)?,
        None => {
            std::fs::create_dir_all(&opts.agent.state_dir)?;
            mesh_agent::Identity::load(&opts.agent.state_dir)?
        }
    };
    let mut agent = Agent::start_taking_over(
        opts.agent,
        translation.catalog.clone(),
        rules,
        metrics.clone(),
        identity,
        handed,
    )
    .await?;
    crate::publish_status(&agent, &status, count);
    published.publish(crate::catalog_snapshot(&agent, &node));
    metrics.kubernetes().last_sync.set(unix_now());
    info!(mode = %agent.mode(), pods = agent.catalog().workloads.len(), services = agent.catalog().services.len(), "meshd kubernetes ready");

    // Served once the agent is up: until then mesh-cni says meshd is not running.
    let (cni_server, mut cni_requests) = match &opts.cni_socket {
        Some(path) => {
            let (server, rx) = mesh_agent::cni::CniServer::bind(path).await?;
            info!(socket = %path.display(), "answering mesh-cni");
            (Some(server), Some(rx))
        }
        None => (None, None),
    };

    let (handover, mut successor) = crate::handover::Listener::bind(&state_dir)?;
    info!(socket = %handover.path().display(), "a starting agent on this node may ask for a hand-over here");
    let (mut asked, mut handing_over) = (false, None);
    let ready = Ready::create(opts.ready_file.clone());
    // Told to stop while starting (the pod deleted, a rollback): the previous agent must not
    // let go of the node for an agent that is about to stop; it hears no confirmation and
    // serves again.
    use futures_util::FutureExt as _;
    let stopping = term.recv().now_or_never().is_some() || int.recv().now_or_never().is_some();
    if stopping {
        info!("told to stop while starting; the hand-over is not confirmed");
    } else {
        // Serving: the previous agent (if any) may go now.
        taken.confirm();
        sync_crds(&server, &mut crd_statuses, &translation).await;
    }
    drop(taken);

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut cni_tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        if stopping {
            break;
        }
        // `full`: the watched objects changed (CRD statuses, the sync time); `recheck`: pods
        // may have appeared on the node, or a CNI ADD waits.
        let (mut full, mut recheck) = (false, false);
        tokio::select! {
            Some(rules) = changes.recv() => crate::apply_rules(&mut agent, &status, rules),
            _ = changed.notified() => {
                tokio::time::sleep(SETTLE).await;
                full = true;
            }
            Some(req) = crate::next_cni(&mut cni_requests) => recheck = cni.handle(&agent, req),
            _ = cni_tick.tick(), if cni.waiting() => recheck = true,
            _ = tick.tick() => {
                // Pods whose process appeared since (pending on the locator) are found here.
                recheck = true;
                crate::publish_counters(&agent, &hooks);
            }
            // Polled until it answers once (a finished receiver must not be polled again).
            next = &mut successor, if !asked => {
                asked = true;
                match next {
                    Ok(next) => {
                        handing_over = Some(next);
                        break;
                    }
                    Err(_) => warn!("the hand-over socket stopped; no hand-over possible"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        if !(full || recheck) {
            continue;
        }
        let translation = translate(&mut cni, &pod_locator, snapshot());
        if full {
            sync_crds(&server, &mut crd_statuses, &translation).await;
        }
        if full || translation.catalog != *agent.catalog() {
            report(&translation, &metrics);
        }
        if translation.catalog != *agent.catalog() {
            match agent.apply(Update::Full(translation.catalog.clone())).await {
                Ok(diff) => info!(?diff, "catalog applied"),
                Err(e) => error!(error = %e, "catalog refused; the last one stays enforced"),
            }
        }
        if full {
            metrics.kubernetes().last_sync.set(unix_now());
        }
        published.publish(crate::catalog_snapshot(&agent, &node));
        cni.answer(&translation, &agent);
    }
    let Some(next) = handing_over else {
        drop(ready);
        server.shutdown().await;
        if let Some(server) = metrics_server {
            server.shutdown().await;
        }
        info!("meshd stopping; kernel programs stay attached");
        return Ok(());
    };
    // Another agent starts on this node (a rolling update): it gets the same-node connections;
    // this one closes everything it listens on, so that the new one can open it, and waits
    // for the new one to serve. The ready file stays until then: a surge update deletes an
    // unready old pod at once.
    info!(successor_pod_uid = %next.uid, "another agent starts on this node; handing over");
    let pairs = agent.hand_over_splices(HAND_OVER_WAIT).await;
    agent.shutdown().await;
    drop(cni_server);
    server.shutdown().await;
    if let Some(server) = metrics_server {
        server.shutdown().await;
    }
    let count = pairs.len();
    // Recorded before the sockets go, so that this pod never serves again once they are gone
    // (taken back below if the hand-over fails).
    if let Some(uid) = &opts.pod_uid {
        crate::handover::retire(&state_dir, uid)?;
    }
    let given = tokio::task::spawn_blocking(move || crate::handover::give(next, &pairs))
        .await
        .map_err(|e| anyhow::anyhow!("the hand-over task failed: {e}"))
        .and_then(|given| given);
    if let Err(e) = given {
        // No agent serves the node now: exit, so that the kubelet starts this one again.
        if let Some(uid) = &opts.pod_uid {
            crate::handover::unretire(&state_dir, uid)?;
        }
        return Err(e.context("the hand-over failed; its connections ended"));
    }
    drop(ready);
    info!(
        connections = count,
        "handed over to the next agent, which serves now; idle until stopped"
    );
    // The kubelet restarts a container that exits: stay, doing nothing, until the rolling
    // update deletes this pod, or until no agent serves the node any more.
    idle_while_an_agent_serves(&state_dir, opts.pod_uid.as_deref(), &mut term, &mut int).await?;
    info!("meshd stopping after its hand-over");
    Ok(())
}

/// A pod that handed the node over, started again by the kubelet before the update deleted
/// it: idles (see [`idle_while_an_agent_serves`]).
async fn idle_retired(state_dir: &std::path::Path, uid: &str) -> Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!(pod_uid = %uid, "this pod handed the node over to a newer agent; idle until stopped");
    idle_while_an_agent_serves(state_dir, Some(uid), &mut term, &mut int).await
}

/// How long an agent that handed the node over waits, with no agent holding the state
/// directory's lock, before it takes the node back (longer than a new agent's first lists
/// after a node's reboot, so that it does not take the node from one that is starting).
const NOBODY_SERVES: Duration = Duration::from_secs(60);

/// Idles until SIGTERM/SIGINT while some agent runs with the state directory (holds its
/// lock). If none does for [`NOBODY_SERVES`] (the new agent failed or was deleted, or the
/// update was rolled back before the new pod served), takes pod `uid` off the retired list and
/// returns an error, so that the process exits and the kubelet starts it again to serve.
async fn idle_while_an_agent_serves(
    state_dir: &std::path::Path,
    uid: Option<&str>,
    term: &mut tokio::signal::unix::Signal,
    int: &mut tokio::signal::unix::Signal,
) -> Result<()> {
    const EVERY: Duration = Duration::from_secs(5);
    let mut check = tokio::time::interval_at(tokio::time::Instant::now() + EVERY, EVERY);
    let mut nobody_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = check.tick() => {
                if crate::handover::agent_runs(state_dir) {
                    nobody_since = None;
                    continue;
                }
                let since = *nobody_since.get_or_insert_with(tokio::time::Instant::now);
                if since.elapsed() >= NOBODY_SERVES {
                    if let Some(uid) = uid {
                        crate::handover::unretire(state_dir, uid)?;
                    }
                    anyhow::bail!("no agent has served this node for {NOBODY_SERVES:?}; this pod takes it back");
                }
            }
        }
    }
}

/// The ready file (`--ready-file`): there while the agent serves.
struct Ready(Option<PathBuf>);

impl Ready {
    fn create(path: Option<PathBuf>) -> Self {
        if let Some(path) = &path {
            if let Err(e) = std::fs::write(path, b"") {
                warn!(file = %path.display(), error = %e, "creating the ready file");
            }
        }
        Self(path)
    }
}

impl Drop for Ready {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How long a hand-over waits for the same-node relays to stop between two writes.
const HAND_OVER_WAIT: Duration = Duration::from_secs(2);

/// Translates `objects` with what `mesh-cni` told about its pods ([`crate::kube_cni`]); other
/// pods are found by the node's pod locator.
fn translate(
    cni: &mut crate::kube_cni::KubeCni,
    locator: &mesh_dataplane::kubepods::Locator,
    objects: ClusterObjects,
) -> Translation {
    let objects = cni.overlay(objects);
    let cni = &*cni;
    cluster::translate(&objects, &|p: &PodRef| {
        cni.locate(locator, p).or_else(|| locate(locator, p))
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or_default()
}

/// Waits for the first list of `kind`.
async fn wait<K: kube::Resource + Clone + 'static>(kind: &str, store: &Store<K>) -> Result<()>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store
        .wait_until_ready()
        .await
        .map_err(|e| anyhow::anyhow!("the first list of {kind}: {e}"))
}

/// [`watch`] of a custom resource (consul-k8s's CRDs), as dynamic objects.
fn watch_dynamic(
    kind: &'static str,
    client: &Client,
    resource: &ApiResource,
    changed: Arc<Notify>,
    metrics: Arc<Metrics>,
) -> Watched<DynamicObject> {
    watch(
        kind,
        Api::<DynamicObject>::all_with(client.clone(), resource),
        watcher::Config::default(),
        resource.clone(),
        changed,
        metrics,
    )
}

/// Logs the refused and pending pods and sets their gauges.
fn report(t: &Translation, metrics: &Metrics) {
    for r in &t.refused {
        error!(pod = %format!("{}/{}", r.namespace, r.name), reason = %r.reason, "pod cannot be meshed; it must not run");
    }
    for w in &t.warnings {
        warn!("{w}");
    }
    metrics
        .kubernetes()
        .pods_refused
        .set(t.refused.len() as i64);
    metrics
        .kubernetes()
        .pods_pending
        .set(t.pending.len() as i64);
}

/// A CRD's sync: `Ok`, or consul-k8s's reason and a message.
type SyncResult = Result<(), (String, String)>;

/// Stores the CRDs' intentions and service defaults (no status written); `None` (logged) if
/// the store refused them.
async fn store_crds(
    server: &mesh_api::Server,
    t: &Translation,
) -> Option<mesh_api::KubernetesSync> {
    let store = server.store().clone();
    let entries = t.intention_entries();
    let defaults = t.defaults_entries();
    match tokio::task::spawn_blocking(move || store.sync_kubernetes_entries(&entries, &defaults))
        .await
    {
        Ok(Ok(sync)) => Some(sync),
        Ok(Err(e)) => {
            error!(error = %e, "storing the CRDs' intentions");
            None
        }
        Err(e) => {
            error!(error = %e, "storing the CRDs' intentions");
            None
        }
    }
}

/// Where the CRDs' statuses go, and the status last written per object (without its
/// timestamps), so that a status is written only when its meaning changes.
struct CrdStatuses {
    client: Client,
    si_resource: ApiResource,
    sd_resource: ApiResource,
    written: BTreeMap<(&'static str, CrRef), Value>,
}

/// Writes the CRDs' entries to the store and their `Synced` conditions to the API server (a
/// status is written only when it changes).
async fn sync_crds(server: &mesh_api::Server, statuses: &mut CrdStatuses, t: &Translation) {
    let CrdStatuses {
        client,
        si_resource,
        sd_resource,
        written,
    } = statuses;
    let sync = store_crds(server, t).await;
    let outcome_of = |outcomes: &[(mesh_core::intentions::ServiceName, SyncOutcome)],
                      name: &mesh_core::intentions::ServiceName| {
        outcomes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, o)| match o {
                SyncOutcome::Synced => Ok(()),
                SyncOutcome::Failed { reason, message } => Err((reason.clone(), message.clone())),
            })
    };
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let mut outcomes: Vec<(&'static str, CrRef, SyncResult)> = Vec::new();
    for (cr, entry) in &t.intentions {
        let outcome = match entry {
            Err(message) => Err(("ConsulAgentError".to_string(), message.clone())),
            Ok(entry) => match &sync {
                Some(s) => outcome_of(&s.intentions, &entry.destination).unwrap_or(Ok(())),
                None => Err((
                    "ConsulAgentError".to_string(),
                    "the agent could not store the intentions".to_string(),
                )),
            },
        };
        outcomes.push(("ServiceIntentions", cr.clone(), outcome));
    }
    for (cr, entry) in &t.defaults {
        let outcome = match entry {
            Err(message) => Err(("ConsulAgentError".to_string(), message.clone())),
            Ok(entry) => match &sync {
                Some(s) => outcome_of(&s.service_defaults, &entry.service).unwrap_or(Ok(())),
                None => Err((
                    "ConsulAgentError".to_string(),
                    "the agent could not store the service defaults".to_string(),
                )),
            },
        };
        outcomes.push(("ServiceDefaults", cr.clone(), outcome));
    }
    let live: Vec<(&'static str, CrRef)> =
        outcomes.iter().map(|(k, c, _)| (*k, c.clone())).collect();
    written.retain(|k, _| live.contains(k));
    for (kind, cr, outcome) in outcomes {
        let key = (kind, cr.clone());
        // Compare without the timestamps: a status is rewritten when its meaning changes.
        let meaning = synced_status(&outcome, "");
        if written.get(&key) == Some(&meaning) {
            continue;
        }
        if let Err((reason, message)) = &outcome {
            error!(kind, object = %format!("{}/{}", cr.namespace, cr.name), %reason, %message, "not synced");
        }
        let resource = if kind == "ServiceIntentions" {
            &*si_resource
        } else {
            &*sd_resource
        };
        let api = Api::<DynamicObject>::namespaced_with(client.clone(), &cr.namespace, resource);
        let patch = json!({"status": synced_status(&outcome, &now)});
        match api
            .patch_status(&cr.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                written.insert(key, meaning);
            }
            Err(e) => {
                warn!(kind, object = %format!("{}/{}", cr.namespace, cr.name), error = %e, "writing the status; retried on the next change")
            }
        }
    }
}

/// The API server and its channels, as `meshd run` has them.
pub struct ApiParts {
    /// The running API.
    pub server: mesh_api::Server,
    /// Where counters are published.
    pub hooks: Arc<mesh_agent::hooks::ApiHooks>,
    /// The published mesh status.
    pub status: Arc<mesh_api::PublishedStatus>,
    /// The published catalog.
    pub published: Arc<mesh_api::PublishedCatalog>,
    /// The rules the store holds now.
    pub rules: mesh_core::intentions::RuleSet,
    /// Later rule sets.
    pub changes: tokio::sync::mpsc::UnboundedReceiver<mesh_core::intentions::RuleSet>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_kit::apiserver::ApiServer;

    #[test]
    fn watch_requests_name_their_kind() {
        let kind = |uri: &str| watched_kind(&uri.parse().expect("uri"));
        assert_eq!(
            kind("/api/v1/pods?fieldSelector=spec.nodeName%3Dn1&watch=true&resourceVersion=7"),
            Some("Pod")
        );
        assert_eq!(
            kind("/apis/discovery.k8s.io/v1/endpointslices?watch=1"),
            Some("EndpointSlice")
        );
        assert_eq!(
            kind("/apis/consul.hashicorp.com/v1alpha1/serviceintentions?&watch=true"),
            Some("ServiceIntentions")
        );
        // Lists, other resources and a watch parameter that is off are no watches of ours.
        assert_eq!(kind("/api/v1/pods?limit=500"), None);
        assert_eq!(kind("/api/v1/configmaps?watch=true"), None);
        assert_eq!(kind("/api/v1/pods?watch=false"), None);
        assert_eq!(kind("/api/v1/pods"), None);
    }

    /// After an outage of a kind that did not change meanwhile, kube-runtime resumes the watch
    /// without emitting an event: the gauge must come back from the watch request's answer.
    #[tokio::test]
    async fn a_watch_resumed_after_an_outage_is_healthy_again_without_any_change() -> Result<()> {
        let api = ApiServer::start()?;
        api.create(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "default"},
        }))?;
        let metrics = Arc::new(Metrics::new());
        let client = client(Some(&api.url()), &metrics).await?;
        let _watched = watch::<Namespace>(
            "Namespace",
            Api::all(client),
            watcher::Config::default(),
            (),
            Arc::new(Notify::new()),
            metrics.clone(),
        );
        let gauge = metrics
            .kubernetes()
            .watch_healthy
            .get_or_create(&KindLabel {
                kind: "Namespace".into(),
            })
            .clone();
        let becomes = |want: i64, limit: Duration| {
            let gauge = gauge.clone();
            async move {
                tokio::time::timeout(limit, async {
                    while gauge.get() != want {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                })
                .await
                .is_ok()
            }
        };
        assert!(becomes(1, Duration::from_secs(10)).await, "never healthy");
        api.pause(true);
        assert!(
            becomes(0, Duration::from_secs(10)).await,
            "the outage never showed"
        );
        api.pause(false);
        // kube-runtime's back-off after one or two failures: under 4 s with jitter.
        assert!(
            becomes(1, Duration::from_secs(15)).await,
            "the resumed watch never showed healthy"
        );
        Ok(())
    }

    #[test]
    fn statuses_are_consul_k8s_synced_conditions() {
        let ok = synced_status(&Ok(()), "2026-11-30T06:00:00Z");
        assert_eq!(ok["conditions"][0]["type"], "Synced");
        assert_eq!(ok["conditions"][0]["status"], "True");
        assert_eq!(ok["lastSyncedTime"], "2026-11-30T06:00:00Z");
        let refused = synced_status(
            &Err((
                "ConsulAgentError".into(),
                "spec.sources[0].action: bad".into(),
            )),
            "t",
        );
        assert_eq!(refused["conditions"][0]["status"], "False");
        assert_eq!(refused["conditions"][0]["reason"], "ConsulAgentError");
        assert!(refused.get("lastSyncedTime").is_none());
    }
}
