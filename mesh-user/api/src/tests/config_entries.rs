//! `service-intentions` config entries and the intentions they make: two views of one
//! state.

use super::*;

#[tokio::test]
async fn entry_and_intention_views_agree() {
    let h = start().await;
    let entry = json!({
        "Kind": "service-intentions",
        "Name": "api",
        "Meta": { "team": "payments" },
        "Sources": [
            { "Name": "web", "Action": "allow", "Description": "frontend" },
            { "Name": "*", "Action": "deny" },
        ],
    });
    assert_eq!(h.ok("PUT", "/v1/config", Some(entry)).await, json!(true));
    // Each source is an intention.
    let web = h.ok("GET", &exact("web", "api"), None).await;
    assert_eq!(web["Action"], "allow");
    assert_eq!(web["Description"], "frontend");
    assert_eq!(web["Precedence"], 9);
    let star = h.ok("GET", &exact("*", "api"), None).await;
    assert_eq!(star["Action"], "deny");
    // An intention written alone shows in the entry, in precedence order.
    h.ok(
        "PUT",
        &exact("db", "api"),
        Some(json!({ "Action": "deny" })),
    )
    .await;
    let e = h.ok("GET", "/v1/config/service-intentions/api", None).await;
    assert_eq!(e["Kind"], "service-intentions");
    assert_eq!(e["Name"], "api");
    assert_eq!(e["Namespace"], "default");
    assert_eq!(e["Meta"], json!({ "team": "payments" }));
    let sources: Vec<(String, String)> = e["Sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["Name"].as_str().unwrap().to_owned(),
                s["Action"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        sources,
        [
            ("db".into(), "deny".into()),
            ("web".into(), "allow".into()),
            ("*".into(), "deny".into())
        ]
    );
    // Rewriting the entry keeps the IDs of sources that stay.
    let entry = json!({ "Kind": "service-intentions", "Name": "api",
                        "Sources": [{ "Name": "web", "Action": "deny" }] });
    h.ok("PUT", "/v1/config", Some(entry)).await;
    let web2 = h.ok("GET", &exact("web", "api"), None).await;
    assert_eq!(web2["ID"], web["ID"]);
    assert_eq!(web2["Action"], "deny");
    assert_eq!(
        h.call(Some(&h.root), "GET", &exact("db", "api"), None)
            .await
            .0,
        404
    );
    // Deleting the last intention removes the entry; deleting an entry removes its
    // intentions.
    h.ok("DELETE", &exact("web", "api"), None).await;
    let (status, v) = h
        .call(
            Some(&h.root),
            "GET",
            "/v1/config/service-intentions/api",
            None,
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        v["Error"],
        "Config entry not found for \"service-intentions\" / \"api\""
    );
    let entry = json!({ "Kind": "service-intentions", "Name": "db", "Namespace": "ns1",
                        "Sources": [{ "Name": "web", "Action": "allow" }] });
    h.ok("PUT", "/v1/config", Some(entry)).await;
    assert_eq!(
        h.ok("GET", "/v1/config/service-intentions/db?ns=ns1", None)
            .await["Sources"][0]["Namespace"],
        "ns1"
    );
    let list = h.ok("GET", "/v1/config/service-intentions", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(
        h.ok("GET", "/v1/config/service-intentions?ns=default", None)
            .await,
        json!([])
    );
    assert_eq!(
        h.ok("DELETE", "/v1/config/service-intentions/db?ns=ns1", None)
            .await,
        json!({})
    );
    assert!(h.server.rules().is_empty());

    // CAS: 0 creates only if absent; otherwise the ModifyIndex must match.
    let entry = json!({ "Kind": "service-intentions", "Name": "api",
                        "Sources": [{ "Name": "web", "Action": "allow" }] });
    assert_eq!(
        h.ok("PUT", "/v1/config?cas=0", Some(entry.clone())).await,
        json!(true)
    );
    assert_eq!(
        h.ok("PUT", "/v1/config?cas=0", Some(entry.clone())).await,
        json!(false)
    );
    let m = h.ok("GET", "/v1/config/service-intentions/api", None).await["ModifyIndex"]
        .as_u64()
        .unwrap();
    assert_eq!(
        h.ok(
            "PUT",
            &format!("/v1/config?cas={}", m + 1),
            Some(entry.clone())
        )
        .await,
        json!(false)
    );
    assert_eq!(
        h.ok("PUT", &format!("/v1/config?cas={m}"), Some(entry))
            .await,
        json!(true)
    );

    // Legacy endpoints by ID.
    let v = h
        .ok(
            "POST",
            "/v1/connect/intentions",
            Some(
                json!({ "SourceName": "db", "DestinationName": "api", "Action": "deny",
                         "SourceType": "consul" }),
            ),
        )
        .await;
    let id = v["ID"].as_str().unwrap().to_owned();
    let by_id = h
        .ok("GET", &format!("/v1/connect/intentions/{id}"), None)
        .await;
    assert_eq!(by_id["SourceName"], "db");
    h.ok(
        "PUT",
        &format!("/v1/connect/intentions/{id}"),
        Some(json!({ "SourceName": "db", "DestinationName": "api", "Action": "allow" })),
    )
    .await;
    assert_eq!(
        h.ok("GET", &exact("db", "api"), None).await["Action"],
        "allow"
    );
    h.ok("DELETE", &format!("/v1/connect/intentions/{id}"), None)
        .await;
    assert_eq!(h.server.rules().len(), 1);
}
