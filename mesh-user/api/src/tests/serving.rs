//! The server as a whole: refused input changes nothing, state survives a restart (and the
//! lock keeps a second server off), the Unix socket serves, counters are reported.

use super::*;

#[tokio::test]
async fn bad_input_is_refused_naming_the_field_and_changes_nothing() {
    let h = start().await;
    h.ok(
        "PUT",
        &exact("web", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
    let long = "x".repeat(600);
    let uri = "spiffe://td.consul/ns/default/dc/dc1/svc/web";
    let cases: Vec<(&str, String, Option<String>, u16, &str)> = vec![
        ("PUT", "/v1/connect/intentions/exact?destination=api".into(),
            Some(r#"{"Action":"deny"}"#.into()), 400, "source"),
        ("PUT", exact("we*", "api"), Some(r#"{"Action":"deny"}"#.into()), 400, "source"),
        ("PUT", exact("*/web", "api"), Some(r#"{"Action":"deny"}"#.into()), 400, "source"),
        ("PUT", exact("web", "a/b/c"), Some(r#"{"Action":"deny"}"#.into()), 400, "destination"),
        ("PUT", exact("web", "api"), Some(r#"{"Action":"permit"}"#.into()), 400, "Action"),
        ("PUT", exact("web", "api"), Some(r#"{"Action":"deny","Bogus":1}"#.into()), 400, "Bogus"),
        ("PUT", exact("web", "api"), Some(r#"{"Action":"deny"#.into()), 400, "JSON"),
        ("PUT", exact("web", "api"), None, 400, "JSON"),
        ("PUT", exact("web", "api"),
            Some(json!({ "Action": "deny", "Description": long }).to_string()), 400, "Description"),
        ("PUT", format!("{}&ns=n*s", exact("web", "api")), Some(r#"{"Action":"deny"}"#.into()), 400, "ns"),
        ("POST", "/v1/connect/intentions".into(),
            Some(r#"{"SourceName":"web","DestinationName":"api","Action":"deny"}"#.into()), 409, "duplicate"),
        ("POST", "/v1/connect/intentions".into(),
            Some(r#"{"DestinationName":"api","Action":"deny"}"#.into()), 400, "SourceName"),
        ("DELETE", "/v1/connect/intentions/not-an-id".into(), None, 404, "non-existent"),
        ("GET", "/v1/connect/intentions/check?source=web".into(), None, 400, "destination"),
        ("GET", "/v1/connect/intentions/check?source=web&destination=api&source-type=x".into(),
            None, 400, "source-type"),
        ("GET", "/v1/connect/intentions/match?by=foo&name=web".into(), None, 400, "by"),
        ("GET", "/v1/connect/intentions/match?by=source".into(), None, 400, "name"),
        ("PUT", "/v1/config".into(),
            Some(r#"{"Kind":"proxy-defaults","Name":"global"}"#.into()), 400, "Kind"),
        ("PUT", "/v1/config".into(),
            Some(r#"{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"a","Action":"allow"},{"Name":"b","Action":"maybe"}]}"#.into()),
            400, "Sources[1].Action"),
        ("PUT", "/v1/config".into(),
            Some(r#"{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"a","Action":"allow","Foo":1}]}"#.into()),
            400, "Sources[0].Foo"),
        ("PUT", "/v1/config".into(),
            Some(r#"{"Kind":"service-intentions","Name":"api","Sources":[]}"#.into()), 400, "Sources"),
        ("PUT", "/v1/config?cas=x".into(),
            Some(r#"{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"a","Action":"allow"}]}"#.into()),
            400, "cas"),
        ("GET", "/v1/config/proxy-defaults".into(), None, 400, "kind"),
        ("DELETE", "/v1/config/proxy-defaults/global".into(), None, 400, "kind"),
        ("POST", "/v1/agent/connect/authorize".into(),
            Some(json!({ "ClientCertURI": uri }).to_string()), 400, "Target"),
        ("POST", "/v1/agent/connect/authorize".into(),
            Some(json!({ "Target": "api", "ClientCertURI": "http://x" }).to_string()), 400, "ClientCertURI"),
        ("POST", "/v1/agent/connect/authorize".into(),
            Some(json!({ "Target": "a*", "ClientCertURI": uri }).to_string()), 400, "Target"),
        ("PUT", "/v1/acl/token".into(),
            Some(json!({ "Policies": [{ "Name": "root" }] }).to_string()), 400, "Policies[0].Name"),
        ("PUT", "/v1/acl/token".into(),
            Some(json!({ "Policies": [{ "Name": "intention-write:we*" }] }).to_string()), 400, "Policies[0].Name"),
        ("PUT", "/v1/acl/token".into(), Some(json!({ "Description": "x" }).to_string()), 400, "Policies"),
        ("DELETE", "/v1/acl/token/nope".into(), None, 404, "not found"),
        ("GET", "/v1/nothing".into(), None, 404, "no such endpoint"),
    ];
    let before = h.snapshot().await;
    let index = h.server.rules().index();
    let calls = h.sink.calls();
    for (method, path, body, status, needle) in cases {
        let (got, v) = h.call_raw(Some(&h.root), method, &path, body.clone()).await;
        assert_eq!(got, status, "{method} {path} {body:?}: {v}");
        let msg = v["Error"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{method} {path}: {needle:?} not in {v}"
        );
        if status == 400
            && needle.chars().next().is_some_and(char::is_alphabetic)
            && needle != "JSON"
        {
            assert!(
                v["Field"]
                    .as_str()
                    .is_some_and(|f| f.contains(needle) || needle.contains(f)),
                "{method} {path}: no Field {needle:?} in {v}"
            );
        }
    }
    assert_eq!(
        h.snapshot().await,
        before,
        "a refused request changed something"
    );
    assert_eq!(h.server.rules().index(), index);
    assert_eq!(
        h.sink.calls(),
        calls,
        "the sink heard of a change that did not happen"
    );
}

#[tokio::test]
async fn state_survives_a_restart() {
    let h = start().await;
    assert!(h.server.bootstrap_token().is_some());
    h.ok(
        "PUT",
        &exact("web", "api"),
        Some(json!({ "Action": "deny", "Description": "d",
                                                  "Meta": { "k": "v" } })),
    )
    .await;
    let entry = json!({ "Kind": "service-intentions", "Name": "db", "Namespace": "ns1",
                        "Meta": { "owner": "x" },
                        "Sources": [{ "Name": "*", "Namespace": "*", "Action": "allow" }] });
    h.ok("PUT", "/v1/config", Some(entry)).await;
    h.ok(
        "PUT",
        &exact("gone", "api"),
        Some(json!({ "Action": "deny" })),
    )
    .await;
    h.ok("DELETE", &exact("gone", "api"), None).await;
    let ro = h.token(&["read-only"]).await;
    let before = h.snapshot().await;
    let counter_before = h.server.rules().counter_watermark();
    let Harness { dir, server, .. } = h;
    server.shutdown().await;
    assert!(!dir.path().join(SOCKET_FILE).exists());

    let h = start_in(dir, Action::Deny).await;
    assert!(h.server.bootstrap_token().is_none(), "no second bootstrap");
    let after = h.snapshot().await;
    assert_eq!(after.0, before.0, "intentions");
    assert_eq!(after.1, before.1, "entries");
    assert_eq!(after.2, before.2, "tokens");
    assert_eq!(h.server.rules().counter_watermark(), counter_before);
    // The old tokens still work; the sink was told the loaded rules.
    assert_eq!(
        h.call(Some(&ro), "GET", "/v1/connect/intentions", None)
            .await
            .0,
        200
    );
    assert_eq!(h.sink.calls(), 1);
    assert_eq!(h.sink.latest().unwrap().len(), 2);
    // A second server on the same state directory is refused.
    let err = Server::start(config(h.dir.path(), Action::Deny), Hooks::default())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
}

#[tokio::test]
async fn serves_on_the_unix_socket_and_reports_counters() {
    let h = start().await;
    let sock = h.server.socket_path().unwrap().to_owned();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);
    let c = Client::new(Address::Unix(sock), Some(h.root.clone()));
    let body = json!({ "Action": "allow" }).to_string().into_bytes();
    let r = c
        .request("PUT", &exact("web", "api"), Some(body))
        .await
        .unwrap();
    assert_eq!((r.status, r.text()), (200, "true".to_owned()));
    let id = h.server.rules().list()[0].id.clone();
    h.counters.record(&id, true);
    h.counters.record(&id, true);
    h.counters.record(&id, false);
    h.counters.record("stale-id", false);
    let v = h.ok("GET", "/v1/connect/intentions/counters", None).await;
    assert_eq!(
        v,
        json!([{ "ID": id, "SourceNS": "default", "SourceName": "web",
                 "DestinationNS": "default", "DestinationName": "api", "Action": "allow",
                 "Precedence": 9, "Allowed": 2, "Denied": 1 }])
    );
}
