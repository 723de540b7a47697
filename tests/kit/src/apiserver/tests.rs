//! The stand-in against kube-rs's own client and watcher.

use std::time::Duration;

use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::runtime::watcher;
use kube::{Api, Client, Config};
use serde_json::json;

use super::{ApiServer, TokenUser};

fn client(api: &ApiServer) -> Client {
    let config = Config::new(api.url().parse().expect("url"));
    Client::try_from(config).expect("client")
}

fn pod(name: &str, node: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": "10.91.1.5"},
    })
}

#[tokio::test]
async fn lists_with_field_and_label_selectors_and_a_resource_version() {
    let api = ApiServer::start().unwrap();
    api.create(pod("web", "node-1")).unwrap();
    api.create(pod("api", "node-2")).unwrap();
    let pods: Api<Pod> = Api::all(client(&api));
    let on_node1 = pods
        .list(&ListParams::default().fields("spec.nodeName=node-1"))
        .await
        .unwrap();
    let names: Vec<_> = on_node1
        .items
        .iter()
        .map(|p| p.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["web"]);
    assert_eq!(on_node1.metadata.resource_version.as_deref(), Some("2"));
    let by_label = pods
        .list(&ListParams::default().labels("app=api"))
        .await
        .unwrap();
    assert_eq!(by_label.items.len(), 1);
    assert_eq!(
        by_label.items[0]
            .spec
            .as_ref()
            .unwrap()
            .node_name
            .as_deref(),
        Some("node-2")
    );
    let by_name = Api::<Pod>::namespaced(client(&api), "default")
        .list(&ListParams::default().fields("metadata.name=api"))
        .await
        .unwrap();
    assert_eq!(by_name.items.len(), 1);
    let err = pods
        .list(&ListParams::default().fields("spec.bogus=1"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("field label not supported"),
        "{err}"
    );
    let elsewhere = Api::<Pod>::namespaced(client(&api), "other")
        .list(&ListParams::default())
        .await
        .unwrap();
    assert!(elsewhere.items.is_empty());
}

#[tokio::test]
async fn creates_replaces_patches_status_and_deletes() {
    let api = ApiServer::start().unwrap();
    let pods: Api<Pod> = Api::namespaced(client(&api), "default");
    let created = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("web", "n1")).unwrap(),
        )
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    let again = pods
        .create(
            &PostParams::default(),
            &serde_json::from_value(pod("web", "n1")).unwrap(),
        )
        .await;
    assert!(matches!(again, Err(kube::Error::Api(e)) if e.code == 409));

    // A merge patch of /status changes the status only.
    let patched = pods
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"podIP": "10.91.1.9"}, "spec": {"nodeName": "other"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        patched.status.as_ref().unwrap().pod_ip.as_deref(),
        Some("10.91.1.9")
    );
    assert_eq!(
        patched.spec.as_ref().unwrap().node_name.as_deref(),
        Some("n1")
    );
    // A JSON patch and an apply patch.
    let json_patched = pods
        .patch_status(
            "web",
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(
                    json!([{"op": "replace", "path": "/status/phase", "value": "Failed"}]),
                )
                .unwrap(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        json_patched.status.as_ref().unwrap().phase.as_deref(),
        Some("Failed")
    );
    let applied = pods
        .patch_status(
            "web",
            &PatchParams::apply("meshd").force(),
            &Patch::Apply(
                json!({"apiVersion": "v1", "kind": "Pod", "status": {"phase": "Running"}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        applied.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    // A patch of the object keeps the status.
    let labelled = pods
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"v": "2"}}, "status": {"phase": "X"}})),
        )
        .await
        .unwrap();
    assert_eq!(
        labelled.status.as_ref().unwrap().phase.as_deref(),
        Some("Running")
    );
    assert_eq!(labelled.metadata.labels.as_ref().unwrap()["v"], "2");

    // A replace from a stale resourceVersion conflicts.
    let stale = pods.replace("web", &PostParams::default(), &created).await;
    assert!(matches!(stale, Err(kube::Error::Api(e)) if e.code == 409));

    pods.delete("web", &Default::default()).await.unwrap();
    assert!(matches!(pods.get("web").await, Err(kube::Error::Api(e)) if e.code == 404));
    assert!(api.get("Pod", "default", "web").is_none());

    // Cluster-scoped objects.
    let namespaces: Api<Namespace> = Api::all(client(&api));
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "apps"}})).unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        namespaces
            .get("apps")
            .await
            .unwrap()
            .metadata
            .name
            .as_deref(),
        Some("apps")
    );
}

#[tokio::test]
async fn watches_send_changes_bookmarks_and_410_for_an_old_version() {
    let api = ApiServer::start().unwrap();
    api.create(pod("web", "node-1")).unwrap();
    let pods: Api<Pod> = Api::all(client(&api));
    let list = pods.list(&ListParams::default()).await.unwrap();
    let rv = list.metadata.resource_version.unwrap();
    let params = WatchParams::default().fields("spec.nodeName=node-1");
    let mut events = pods.watch(&params, &rv).await.unwrap().boxed();

    api.create(pod("api", "node-2")).unwrap(); // another node: not seen
    api.create(pod("db", "node-1")).unwrap();
    let mut moved = pod("web", "node-2"); // leaves the selection: DELETED
    moved["metadata"]["resourceVersion"] = json!(null);
    api.apply(moved).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match tokio::time::timeout(Duration::from_secs(5), events.try_next())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
        {
            WatchEvent::Added(p) => seen.push(format!("added {}", p.metadata.name.unwrap())),
            WatchEvent::Modified(p) => seen.push(format!("modified {}", p.metadata.name.unwrap())),
            WatchEvent::Deleted(p) => seen.push(format!("deleted {}", p.metadata.name.unwrap())),
            WatchEvent::Bookmark(b) => {
                seen.push(format!("bookmark {}", b.metadata.resource_version))
            }
            WatchEvent::Error(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(seen[0], "added db");
    assert_eq!(seen[1], "deleted web");
    assert!(seen[2].starts_with("bookmark "), "{seen:?}");

    // After a compaction the old version is gone.
    api.compact();
    let mut old = pods
        .watch(&WatchParams::default(), &rv)
        .await
        .unwrap()
        .boxed();
    match old.try_next().await.unwrap().unwrap() {
        WatchEvent::Error(e) => assert_eq!(e.code, 410),
        other => panic!("expected 410, got {other:?}"),
    }
}

async fn next<S: futures_util::Stream + Unpin>(stream: &mut S) -> S::Item {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("a watcher event")
        .expect("open stream")
}

#[tokio::test]
async fn kube_watcher_recovers_from_410_kills_and_pauses() {
    let api = ApiServer::start().unwrap();
    api.create(pod("web", "node-1")).unwrap();
    let pods: Api<Pod> = Api::all(client(&api));
    let config = watcher::Config::default()
        .fields("spec.nodeName=node-1")
        .timeout(5);
    let mut stream = watcher(pods, config).boxed();
    // The initial list.
    loop {
        if let Ok(watcher::Event::InitDone) = next(&mut stream).await {
            break;
        }
    }
    // A forced 410: the watcher lists again.
    api.force_gone(1);
    api.create(pod("db", "node-1")).unwrap();
    let mut relisted = false;
    let mut saw_db = false;
    while !(relisted && saw_db) {
        match next(&mut stream).await {
            Ok(watcher::Event::Init) => relisted = true,
            Ok(watcher::Event::InitApply(p)) | Ok(watcher::Event::Apply(p))
                if p.metadata.name.as_deref() == Some("db") =>
            {
                saw_db = true
            }
            _ => {}
        }
    }
    // Killed watches: the watcher watches again from where it was.
    api.kill_watches();
    api.create(pod("late", "node-1")).unwrap();
    loop {
        match next(&mut stream).await {
            Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p))
                if p.metadata.name.as_deref() == Some("late") =>
            {
                break
            }
            _ => {}
        }
    }
    // A pause answers 503 (kube's client retries those); after it, the watcher carries on.
    api.pause(true);
    let before = api.requests().len();
    let paused_until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::timeout_at(paused_until, stream.next())
        .await
        .is_ok()
    {}
    assert!(
        api.requests().len() > before,
        "the watcher asked again during the pause"
    );
    api.pause(false);
    api.create(pod("cache", "node-1")).unwrap();
    loop {
        match next(&mut stream).await {
            Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p))
                if p.metadata.name.as_deref() == Some("cache") =>
            {
                break
            }
            _ => {}
        }
    }
    let asked = api.requests();
    assert!(
        asked
            .iter()
            .any(|r| r.contains("watch=true") && r.contains("allowWatchBookmarks=true")),
        "{asked:?}"
    );
}

#[tokio::test]
async fn token_reviews_answer_from_the_table() {
    let api = ApiServer::start().unwrap();
    let mut user = TokenUser {
        username: "system:serviceaccount:mesh-system:meshd".into(),
        uid: "sa-uid".into(),
        groups: vec!["system:serviceaccounts".into()],
        ..TokenUser::default()
    };
    user.extra.insert(
        "authentication.kubernetes.io/node-name".into(),
        vec!["node-1".into()],
    );
    api.add_token("good", user);
    let reviews: Api<TokenReview> = Api::all(client(&api));
    let review = |token: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.into()),
            audiences: None,
        },
        ..TokenReview::default()
    };
    let ok = reviews
        .create(&PostParams::default(), &review("good"))
        .await
        .unwrap();
    let status = ok.status.unwrap();
    assert_eq!(status.authenticated, Some(true));
    let user = status.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:mesh-system:meshd")
    );
    assert_eq!(
        user.extra.unwrap()["authentication.kubernetes.io/node-name"],
        ["node-1"]
    );
    let bad = reviews
        .create(&PostParams::default(), &review("bad"))
        .await
        .unwrap();
    assert_eq!(bad.status.unwrap().authenticated, Some(false));
}
