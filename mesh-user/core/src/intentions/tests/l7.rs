//! L7 intentions: permissions in both views, the protocol rule, per-request decisions and
//! their precedence, and the kernel's verdict for them.

use super::*;
use crate::catalog::Protocol;
use crate::intentions::permission::permissions_from_json;

fn http(rules: &mut RuleSet, svc: &str) {
    rules
        .apply_service_defaults(&ServiceDefaultsEntry::new(sn(svc), Protocol::Http))
        .unwrap();
}

fn l7(rules: &mut RuleSet, src: &str, dst: &str, perms: &str) -> String {
    let spec =
        IntentionSpec::with_permissions(&sn(src), &sn(dst), permissions_from_json(perms).unwrap());
    rules.create(&spec, false).unwrap().id.clone()
}

fn get<'a>(method: &'a str, path: &'a str) -> HttpRequest<'a> {
    HttpRequest {
        method,
        path,
        headers: &[],
    }
}

const ADMIN_DENIED: &str = r#"[{"Action":"deny","HTTP":{"PathPrefix":"/admin"}},
                               {"Action":"allow","HTTP":{"PathPrefix":"/"}}]"#;

#[test]
fn permissions_need_an_http_destination_and_keep_it_http() {
    let mut rules = RuleSet::new();
    let spec = IntentionSpec::with_permissions(
        &sn("web"),
        &sn("api"),
        permissions_from_json(ADMIN_DENIED).unwrap(),
    );
    let before = snapshot(&rules);
    let err = rules.create(&spec, false).unwrap_err();
    assert_eq!(err.field(), Some("Permissions"));
    assert_eq!(
        err.to_string(),
        "Permissions: service \"default/api\" has protocol \"tcp\", which is incompatible with L7 intentions permissions"
    );
    assert_eq!(snapshot(&rules), before);
    let entry = ServiceIntentionsEntry::from_json(
        r#"{"Kind":"service-intentions","Name":"api","Sources":[
            {"Name":"db","Action":"deny"},
            {"Name":"web","Permissions":[{"Action":"allow","HTTP":{"PathExact":"/"}}]}]}"#,
    )
    .unwrap();
    let err = rules.apply_entry(&entry).unwrap_err();
    assert_eq!(err.field(), Some("Sources[1].Permissions"), "{err}");

    http(&mut rules, "api");
    rules.create(&spec, false).unwrap();
    rules.apply_entry(&entry).unwrap();
    // Taking http away, by a tcp entry or by deleting the entry, is refused.
    let before = snapshot(&rules);
    let err = rules
        .apply_service_defaults(&ServiceDefaultsEntry::new(sn("api"), Protocol::Tcp))
        .unwrap_err();
    assert_eq!(err.field(), Some("Protocol"));
    assert!(rules.delete_service_defaults(&sn("api")).is_err());
    assert_eq!(snapshot(&rules), before);
    assert_eq!(rules.protocol(&sn("api")), Some(Protocol::Http));
    // Without L7 intentions left, it may go.
    rules.delete_entry(&sn("api"));
    assert!(rules.delete_service_defaults(&sn("api")).unwrap());
    assert_eq!(
        rules.effective_protocol(&sn("api"), Some(Protocol::Http)),
        Protocol::Http
    );
    assert_eq!(rules.effective_protocol(&sn("api"), None), Protocol::Tcp);
}

#[test]
fn first_matching_permission_decides_and_no_match_is_the_default_policy() {
    let mut rules = RuleSet::new();
    http(&mut rules, "api");
    let id = l7(&mut rules, "web", "api", ADMIN_DENIED);
    let d = rules.check_request(&sn("web"), &sn("api"), &get("GET", "/admin/x"));
    assert!(!d.allowed);
    assert_eq!(d.permission, Some(0));
    assert_eq!(
        d.matched,
        Matched::Intention {
            id: id.clone(),
            precedence: 9
        }
    );
    let d = rules.check_request(&sn("web"), &sn("api"), &get("GET", "/x"));
    assert!(d.allowed);
    assert_eq!(d.permission, Some(1));

    let mut rules = RuleSet::with_default_policy(Action::Allow);
    http(&mut rules, "api");
    l7(
        &mut rules,
        "web",
        "api",
        r#"[{"Action":"deny","HTTP":{"Methods":["DELETE"]}}]"#,
    );
    assert!(
        !rules
            .check_request(&sn("web"), &sn("api"), &get("DELETE", "/"))
            .allowed
    );
    let d = rules.check_request(&sn("web"), &sn("api"), &get("GET", "/"));
    assert!(
        d.allowed,
        "no permission matched: the default policy (allow) decides"
    );
    assert_eq!(d.matched, Matched::Default);
}

#[test]
fn precedence_across_intentions() {
    let mut rules = RuleSet::new();
    http(&mut rules, "api");
    // `*` may do anything; `web` has an L7 intention of higher precedence.
    create(&mut rules, "*", "api", Action::Allow);
    l7(
        &mut rules,
        "web",
        "api",
        r#"[{"Action":"allow","HTTP":{"PathPrefix":"/public"}}]"#,
    );
    assert!(
        rules
            .check_request(&sn("web"), &sn("api"), &get("GET", "/public/a"))
            .allowed
    );
    // A request web's permissions do not match is not allowed by the lower `*` intention:
    // Consul's RBAC removes web from it (default deny decides).
    let d = rules.check_request(&sn("web"), &sn("api"), &get("GET", "/private"));
    assert!(!d.allowed);
    assert_eq!(d.matched, Matched::Default);
    // Another source is decided by the `*` intention, whatever the request.
    assert!(
        rules
            .check_request(&sn("db"), &sn("api"), &get("POST", "/private"))
            .allowed
    );
    // An exact L4 deny beats a wildcard L7 intention.
    let mut rules = RuleSet::with_default_policy(Action::Allow);
    http(&mut rules, "api");
    l7(
        &mut rules,
        "ops/*",
        "api",
        r#"[{"Action":"allow","HTTP":{"PathExact":"/"}}]"#,
    );
    create(&mut rules, "ops/batch", "api", Action::Deny);
    assert!(
        !rules
            .check_request(&sn("ops/batch"), &sn("api"), &get("GET", "/"))
            .allowed
    );
    assert!(
        rules
            .check_request(&sn("ops/x"), &sn("api"), &get("GET", "/"))
            .allowed
    );
}

#[test]
fn check_is_l4_and_the_kernel_hands_l7_to_the_proxy() {
    let mut rules = RuleSet::new();
    http(&mut rules, "api");
    l7(&mut rules, "web", "api", ADMIN_DENIED);
    // Consul's check only looks at source and destination: an L7 intention denies there.
    let d = rules.check(&sn("web"), &sn("api"));
    assert!(!d.allowed);
    assert!(d.has_permissions);
    assert!(rules.has_permissions(&sn("web"), &sn("api")));
    assert!(!rules.has_permissions(&sn("db"), &sn("api")));
    let compiled = compile(&rules).unwrap();
    let v = simulate_kernel_check(&compiled, &sn("web"), &sn("api"), Action::Deny);
    assert!(v.allowed, "the kernel must send an L7 pair to the proxy");
    assert!(v.matched.is_some());
}

#[test]
fn permissions_round_trip_in_both_views_json_and_hcl() {
    let mut rules = RuleSet::new();
    http(&mut rules, "api");
    let hcl = r#"
Kind = "service-intentions"
Name = "api"
Sources = [
  {
    Name = "web"
    Permissions = [
      {
        Action = "deny"
        HTTP = {
          PathRegex = "/admin/.*"
          Header = [{ Name = "x-debug", Present = true }]
        }
      },
      {
        Action = "allow"
        HTTP = { PathPrefix = "/", Methods = ["GET", "post"] }
      },
    ]
  },
  { Name = "db", Action = "deny" },
]
"#;
    let entry = ServiceIntentionsEntry::from_hcl(hcl).unwrap();
    assert_eq!(entry.sources[0].permissions.len(), 2);
    assert_eq!(
        entry.sources[0].permissions[1].http.methods,
        ["GET", "POST"]
    );
    // Block syntax for Sources and Permissions reads the same.
    let blocks = r#"
Kind = "service-intentions"
Name = "api"
Sources {
  Name = "web"
  Permissions {
    Action = "deny"
    HTTP {
      PathRegex = "/admin/.*"
      Header { 
        Name = "x-debug"
        Present = true
      }
    }
  }
  Permissions {
    Action = "allow"
    HTTP {
      PathPrefix = "/"
      Methods = ["GET", "POST"]
    }
  }
}
Sources {
  Name = "db"
  Action = "deny"
}
"#;
    assert_eq!(ServiceIntentionsEntry::from_hcl(blocks).unwrap(), entry);
    let json = entry.to_json();
    assert_eq!(ServiceIntentionsEntry::from_json(&json).unwrap(), entry);
    rules.apply_entry(&entry).unwrap();
    let mut stored = rules.entry(&sn("api")).unwrap().sources;
    let mut given = entry.sources.clone();
    stored.sort_by(|a, b| a.source.cmp(&b.source));
    given.sort_by(|a, b| a.source.cmp(&b.source));
    assert_eq!(stored, given);
    let it = rules.get_exact(&sn("web"), &sn("api")).unwrap();
    let v: serde_json::Value = serde_json::to_value(it).unwrap();
    assert_eq!(v["Action"], "");
    assert_eq!(v["Permissions"][0]["HTTP"]["PathRegex"], "/admin/.*");
    // The single intention's JSON reads back to the same permissions.
    let spec = IntentionSpec::from_json(&serde_json::to_string(it).unwrap()).unwrap();
    assert_eq!(spec.permissions, it.permissions);
}

#[test]
fn single_intention_refusals_name_the_field() {
    let cases = [
        (
            r#"{"SourceName":"web","DestinationName":"api","Action":"allow","Permissions":[{"Action":"allow","HTTP":{"PathExact":"/"}}]}"#,
            "Action",
            "Action must be omitted if Permissions are specified",
        ),
        (
            r#"{"SourceName":"web","DestinationName":"api","Permissions":[{"Action":"allow","HTTP":{"PathExact":"/","PathPrefix":"/a"}}]}"#,
            "Permissions[0].HTTP",
            "at most one of PathExact, PathPrefix, or PathRegex",
        ),
    ];
    for (json, field, msg) in cases {
        let err = IntentionSpec::from_json(json).unwrap_err();
        assert_eq!(err.field(), Some(field), "{err}");
        assert!(err.to_string().contains(msg), "{err}");
    }
    let spec = IntentionSpec::from_json(
        r#"{"SourceName":"web","DestinationName":"*","Permissions":[{"Action":"allow","HTTP":{"PathExact":"/"}}]}"#,
    )
    .unwrap();
    let err = RuleSet::new().create(&spec, false).unwrap_err();
    assert_eq!(err.field(), Some("Permissions"));
    assert!(err.to_string().contains("wildcarded destinations"), "{err}");
    let err = ServiceIntentionsEntry::from_json(
        r#"{"Kind":"service-intentions","Name":"*","Sources":[{"Name":"web","Permissions":[{"Action":"allow","HTTP":{"PathExact":"/"}}]}]}"#,
    )
    .unwrap_err();
    assert_eq!(err.field(), Some("Sources[0].Permissions"));
    let err = ServiceIntentionsEntry::from_json(
        r#"{"Kind":"service-intentions","Name":"api","Sources":[{"Name":"web","Action":"allow","Permissions":[{"Action":"allow","HTTP":{"PathExact":"/"}}]}]}"#,
    )
    .unwrap_err();
    assert_eq!(err.field(), Some("Sources[0].Action"));
    assert!(
        err.to_string().contains("must be omitted if Permissions"),
        "{err}"
    );
}
