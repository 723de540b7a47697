//! Intentions: `check` by precedence, the default policy, `authorize`.

use super::*;

#[tokio::test]
async fn check_answers_by_precedence() {
    let h = start().await;
    let rules = [
        ("web", "api", "deny"),     // 9
        ("*", "api", "allow"),      // 8: default/* → default/api
        ("*/*", "api", "deny"),     // 7
        ("web", "*", "allow"),      // 6: default/web → default/*
        ("ns1/*", "ns1/*", "deny"), // 5
        ("*/*", "ns2/*", "allow"),  // 4
        ("ns3/a", "*/*", "deny"),   // 3
        ("ns3/*", "*/*", "allow"),  // 2
        ("*/*", "*/*", "deny"),     // 1
    ];
    for (src, dst, action) in rules {
        let path = format!(
            "/v1/connect/intentions/exact?source={}&destination={}",
            enc(src),
            enc(dst)
        );
        h.ok("PUT", &path, Some(json!({ "Action": action }))).await;
    }
    // The list is in precedence order, 9 down to 1.
    let list = h.ok("GET", "/v1/connect/intentions", None).await;
    let precs: Vec<u64> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["Precedence"].as_u64().unwrap())
        .collect();
    assert_eq!(precs, [9, 8, 7, 6, 5, 4, 3, 2, 1]);
    let cases = [
        ("web", "api", false),     // 9 beats 8
        ("other", "api", true),    // 8
        ("ns9/x", "api", false),   // 7: default/* does not cover ns9
        ("web", "db", true),       // 6
        ("other", "db", false),    // nothing in default/db but */* → */* deny (1)
        ("ns1/a", "ns1/b", false), // 5
        ("ns1/a", "ns2/b", true),  // 4
        ("ns3/a", "ns4/b", false), // 3 beats 2
        ("ns3/b", "ns4/b", true),  // 2
        ("ns5/a", "ns4/b", false), // 1
    ];
    for (src, dst, allowed) in cases {
        let v = h
            .ok(
                "GET",
                &format!(
                    "/v1/connect/intentions/check?source={}&destination={}",
                    enc(src),
                    enc(dst)
                ),
                None,
            )
            .await;
        assert_eq!(v, json!({ "Allowed": allowed }), "{src} -> {dst}");
    }
    // ?ns= places bare names.
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/check?source=a&destination=b&ns=ns1",
            None,
        )
        .await;
    assert_eq!(v, json!({ "Allowed": false }));

    // Match by destination: the intentions that apply to default/api, in order.
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/match?by=destination&name=api&name=ns2/x",
            None,
        )
        .await;
    let names = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|i| {
                format!(
                    "{}/{}->{}/{}",
                    i["SourceNS"].as_str().unwrap(),
                    i["SourceName"].as_str().unwrap(),
                    i["DestinationNS"].as_str().unwrap(),
                    i["DestinationName"].as_str().unwrap()
                )
            })
            .collect()
    };
    assert_eq!(
        names("api"),
        [
            "default/web->default/api",
            "default/*->default/api",
            "*/*->default/api",
            "default/web->default/*",
            "ns3/a->*/*",
            "ns3/*->*/*",
            "*/*->*/*",
        ]
    );
    assert_eq!(
        names("ns2/x"),
        ["*/*->ns2/*", "ns3/a->*/*", "ns3/*->*/*", "*/*->*/*"]
    );
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/match?by=source&name=ns3/a",
            None,
        )
        .await;
    assert_eq!(v["ns3/a"].as_array().unwrap().len(), 5);

    // The sink saw the final rule set.
    let latest = h.sink.latest().unwrap();
    assert_eq!(latest.len(), 9);
    assert_eq!(latest.index(), h.server.rules().index());
}

fn enc(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn the_default_policy_decides_when_nothing_matches() {
    let h = start_in(tempfile::tempdir().unwrap(), Action::Allow).await;
    let v = h
        .ok(
            "GET",
            "/v1/connect/intentions/check?source=web&destination=api",
            None,
        )
        .await;
    assert_eq!(v, json!({ "Allowed": true }));
    let uri = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web";
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(json!({ "Target": "api", "ClientCertURI": uri })),
        )
        .await;
    assert_eq!(
        v,
        json!({ "Authorized": true, "Reason": "Default intention policy" })
    );
    let h = start().await;
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(json!({ "Target": "api", "ClientCertURI": uri })),
        )
        .await;
    assert_eq!(v["Authorized"], false);
}

#[tokio::test]
async fn authorize_answers_as_consul() {
    let h = start().await;
    h.ok(
        "PUT",
        &exact("web", "api"),
        Some(json!({ "Action": "allow" })),
    )
    .await;
    h.ok("PUT", &exact("*", "api"), Some(json!({ "Action": "deny" })))
        .await;
    let id = h.ok("GET", &exact("web", "api"), None).await["ID"]
        .as_str()
        .unwrap()
        .to_owned();
    let auth = |svc: &str, ns: &str| {
        json!({
            "Target": "api",
            "ClientCertURI": format!("spiffe://td.consul/ns/{ns}/dc/dc1/svc/{svc}"),
            "ClientCertSerial": "01:02",
        })
    };
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(auth("web", "default")),
        )
        .await;
    assert_eq!(v["Authorized"], true);
    assert_eq!(
        v["Reason"],
        format!("Matched L4 intention: ALLOW default/web => default/api (ID: {id}, Precedence: 9)")
    );
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(auth("db", "default")),
        )
        .await;
    assert_eq!(v["Authorized"], false);
    assert!(v["Reason"]
        .as_str()
        .unwrap()
        .starts_with("Matched L4 intention: DENY default/* => default/api"));
    // web in another namespace is not default/web.
    let v = h
        .ok(
            "POST",
            "/v1/agent/connect/authorize",
            Some(auth("web", "other")),
        )
        .await;
    assert_eq!(v["Authorized"], false);
    assert_eq!(v["Reason"], "Default intention policy");
}
