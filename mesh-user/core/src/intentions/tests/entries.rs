//! `service-intentions` config entries: HCL and JSON forms, rejections.

use super::*;

#[test]
fn entry_from_hcl_list_form() {
    let e = ServiceIntentionsEntry::from_hcl(ENTRY_HCL).unwrap();
    assert_eq!(e.destination, sn("default/api"));
    assert_eq!(e.meta.get("owner").map(String::as_str), Some("team-a"));
    let got: Vec<(String, Action, u8)> = e
        .sources
        .iter()
        .map(|s| (s.source.to_string(), s.action, s.precedence))
        .collect();
    // Sorted by precedence, stable among equals (input order).
    assert_eq!(
        got,
        [
            ("default/web".to_string(), Action::Allow, 9),
            ("default/*".to_string(), Action::Deny, 8),
            ("ops/*".to_string(), Action::Allow, 8),
        ]
    );
    assert_eq!(e.sources[1].description, "deny everyone else");
}

#[test]
fn entry_from_hcl_block_form_and_snake_case() {
    let one = ServiceIntentionsEntry::from_hcl(
        r#"
kind = "service-intentions"
name = "db"
sources {
  name   = "api"
  action = "allow"
  description = <<EOT
multi
line
EOT
}
"#,
    )
    .unwrap();
    assert_eq!(one.sources.len(), 1);
    assert_eq!(one.sources[0].source, sn("api"));
    assert_eq!(one.sources[0].description, "multi\nline\n");
    let two = ServiceIntentionsEntry::from_hcl(
        r#"
Kind = "service-intentions"
Name = "db"
Sources {
  Name   = "api"
  Action = "allow"
}
Sources {
  Name   = "web"
  Action = "deny"
}
"#,
    )
    .unwrap();
    assert_eq!(two.sources.len(), 2);
    assert_eq!(two.sources[1].source, sn("web"));
    assert_eq!(two.sources[1].action, Action::Deny);
}

#[test]
fn entry_from_json_and_back() {
    let json = r#"{
        "Kind": "service-intentions",
        "Name": "api",
        "Namespace": "ns1",
        "Partition": "default",
        "Sources": [
            {"Name": "web", "Action": "allow", "Precedence": 3},
            {"Name": "db", "Namespace": "ns2", "Action": "deny", "Description": "no"},
            {"Name": "*", "Namespace": "*", "Action": "deny"}
        ],
        "CreateIndex": 5,
        "ModifyIndex": 7
    }"#;
    let e = ServiceIntentionsEntry::from_json(json).unwrap();
    // The source without a namespace inherited ns1; Precedence was recomputed.
    assert_eq!(e.sources[0].source, sn("ns1/web"));
    assert_eq!(e.sources[0].precedence, 9);
    assert_eq!(e.sources[1].source, sn("ns2/db"));
    assert_eq!(e.sources[2].precedence, 7);

    let out: serde_json::Value = serde_json::from_str(&e.to_json()).unwrap();
    let want = serde_json::json!({
        "Kind": "service-intentions",
        "Name": "api",
        "Partition": "default",
        "Namespace": "ns1",
        "Sources": [
            {"Name": "web", "Partition": "default", "Namespace": "ns1", "Action": "allow",
             "Precedence": 9, "Type": "consul"},
            {"Name": "db", "Partition": "default", "Namespace": "ns2", "Action": "deny",
             "Precedence": 9, "Type": "consul", "Description": "no"},
            {"Name": "*", "Partition": "default", "Namespace": "*", "Action": "deny",
             "Precedence": 7, "Type": "consul"}
        ],
        "CreateIndex": 0,
        "ModifyIndex": 0
    });
    assert_eq!(out, want);
    // Field order is Consul's.
    let text = e.to_json();
    let pos = |k: &str| text.find(&format!("\"{k}\"")).unwrap();
    assert!(pos("Kind") < pos("Name") && pos("Partition") < pos("Namespace"));
    assert!(pos("Namespace") < pos("Sources") && pos("Sources") < pos("CreateIndex"));
    // And what we write reads back the same.
    assert_eq!(ServiceIntentionsEntry::from_json(&text).unwrap(), e);
}

/// Every rejection names its field: (input, format, expected field, text the message has).
#[test]
fn entry_rejections_name_the_field() {
    let hdr = r#""Kind": "service-intentions", "Name": "api""#;
    let json_cases: Vec<(String, &str, &str)> = vec![
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "we*", "Action": "allow"}}]}}"#),
            "Sources[0].Name",
            "Sources[0].Name: wildcard character '*' cannot be used with partial values",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Namespace": "*", "Action": "allow"}}]}}"#),
            "Sources[0].Name",
            "Sources[0].Name: exact value cannot follow wildcard namespace",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Namespace": "o*s", "Action": "allow"}}]}}"#),
            "Sources[0].Namespace",
            "Sources[0].Namespace: wildcard character '*' cannot be used with partial values",
        ),
        (
            r#"{"Kind": "service-intentions", "Name": "ap*", "Sources": [{"Name": "web", "Action": "allow"}]}"#.into(),
            "Name",
            "Name: wildcard character '*' cannot be used with partial values",
        ),
        (
            r#"{"Kind": "service-intentions", "Name": "api", "Namespace": "*", "Sources": [{"Name": "web", "Action": "allow"}]}"#.into(),
            "Name",
            "Name: exact value cannot follow wildcard namespace",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Action": "allow"}}, {{"Name": "db", "Action": "permit"}}]}}"#),
            "Sources[1].Action",
            "Sources[1].Action must be set to 'allow' or 'deny'",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web"}}]}}"#),
            "Sources[0].Action",
            "Sources[0].Action must be set to 'allow' or 'deny'",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Action": "allow", "Type": "external"}}]}}"#),
            "Sources[0].Type",
            "Sources[0].Type must be set to 'consul'",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Action": "allow"}}, {{"Name": "db", "Action": "allow", "Bogus": 1}}]}}"#),
            "Sources[1].Bogus",
            "unknown field `Bogus`",
        ),
        (
            format!(r#"{{{hdr}, "Permissions": [], "Sources": []}}"#),
            "Permissions",
            "unknown field `Permissions`",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Action": "allow"}}, {{"Name": "db", "Action": "deny"}}, {{"Name": "web", "Namespace": "default", "Action": "deny"}}]}}"#),
            "Sources[2]",
            r#"Sources[2] defines "default/web" more than once"#,
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "", "Action": "allow"}}]}}"#),
            "Sources[0].Name",
            "Sources[0].Name is required",
        ),
        (
            r#"{"Kind": "service-intentions", "Sources": [{"Name": "web", "Action": "allow"}]}"#.into(),
            "Name",
            "Name is required",
        ),
        (
            r#"{"Kind": "service-intentions", "Name": "", "Sources": [{"Name": "web", "Action": "allow"}]}"#.into(),
            "Name",
            "Name is required",
        ),
        (format!(r#"{{{hdr}, "Sources": []}}"#), "Sources", "Sources: at least one source is required"),
        (format!(r#"{{{hdr}}}"#), "Sources", "Sources: at least one source is required"),
        (
            r#"{"Kind": "service-defaults", "Name": "api", "Sources": [{"Name": "web", "Action": "allow"}]}"#.into(),
            "Kind",
            "Kind: expected \"service-intentions\", got \"service-defaults\"",
        ),
        (
            r#"{"Name": "api", "Sources": [{"Name": "web", "Action": "allow"}]}"#.into(),
            "Kind",
            "Kind is required",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Action": 1}}]}}"#),
            "Sources[0].Action",
            "invalid type",
        ),
        (
            format!(r#"{{{hdr}, "Name": "x", "Sources": [{{"Name": "web", "Action": "allow"}}]}}"#),
            "Name",
            "duplicate field `Name`",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Action": "allow", "Action": "deny"}}]}}"#),
            "Sources[0].Action",
            "duplicate field `Action`",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Action": "allow", "Partition": "eu"}}]}}"#),
            "Sources[0].Partition",
            "Sources[0].Partition: partition \"eu\" does not exist",
        ),
        (
            format!(r#"{{{hdr}, "Sources": [{{"Name": "web", "Action": "allow", "Description": "{}"}}]}}"#, "d".repeat(513)),
            "Sources[0].Description",
            "Sources[0].Description exceeds maximum length 512",
        ),
        (
            format!(r#"{{{hdr}, "Meta": {{"{}": "v"}}, "Sources": [{{"Name": "web", "Action": "allow"}}]}}"#, "k".repeat(129)),
            "Meta",
            "exceeds maximum length 128",
        ),
    ];
    for (input, field, text) in &json_cases {
        let err = ServiceIntentionsEntry::from_json(input).unwrap_err();
        assert_eq!(err.field(), Some(*field), "{input}\n=> {err}");
        let msg = err.to_string();
        assert!(msg.contains(text), "{input}\n=> {msg}\nwanted {text}");
        assert!(
            msg.contains(field.trim_end_matches(']')),
            "{msg} does not name {field}"
        );
    }
}

#[test]
fn hcl_rejections_name_the_field() {
    let cases = [
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"web\", Action = \"allow\" }, { Name = \"db\", Action = \"allow\", Bogus = 1 }]\n",
            Some("Sources[1].Bogus"),
            "unknown field `Bogus`",
        ),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nColour = \"red\"\nSources = [{ Name = \"web\", Action = \"allow\" }]\n",
            Some("Colour"),
            "unknown field `Colour`",
        ),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"we*\", Action = \"allow\" }]\n",
            Some("Sources[0].Name"),
            "Sources[0].Name: wildcard character '*' cannot be used with partial values",
        ),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"web\", Action = \"maybe\" }]\n",
            Some("Sources[0].Action"),
            "Sources[0].Action must be set to 'allow' or 'deny'",
        ),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nSources { \n Name = \"web\"\n Action = \"allow\"\n}\nSources {\n Name = \"web\"\n Action = \"deny\"\n}\n",
            Some("Sources[1]"),
            "Sources[1] defines \"default/web\" more than once",
        ),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nName = \"db\"\nSources = [{ Name = \"web\", Action = \"allow\" }]\n",
            None,
            "3 | Name = \"db\"",
        ),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"web\", Action = \"allow\" }]\nSources {\n Name = \"db\"\n Action = \"allow\"\n}\n",
            Some("Sources"),
            "Sources is defined both as an attribute and as a block",
        ),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nSources {\n Name = \"web\"\n Action = \"allow\"\n Action = \"deny\"\n}\n",
            None,
            "found redefined attribute",
        ),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"web\", Name = \"db\", Action = \"allow\" }]\n",
            None,
            "redefined object key",
        ),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"web\" Action = \"allow\" }\n",
            None,
            "malformed HCL",
        ),
        (
            "Kind = \"service-intentions\"\nName = var.name\nSources = [{ Name = \"web\", Action = \"allow\" }]\n",
            Some("Name"),
            "references and index expressions are not supported",
        ),
    ];
    for (input, field, text) in cases {
        let err = ServiceIntentionsEntry::from_hcl(input).unwrap_err();
        assert_eq!(err.field(), field, "{input}\n=> {err}");
        let msg = err.to_string();
        assert!(msg.contains(text), "{input}\n=> {msg}\nwanted {text}");
        if let Some(f) = field {
            assert!(msg.contains(f), "{msg} does not name {f}");
        }
        if field.is_none() {
            assert!(
                matches!(
                    err,
                    Error::Malformed {
                        format: Format::Hcl,
                        ..
                    }
                ),
                "{err}"
            );
        }
    }
}

#[test]
fn malformed_json_is_refused() {
    for input in [
        "",
        "{",
        "[]",
        r#"{"Kind": "service-intentions",}"#,
        "{} {}",
        "null",
    ] {
        let err = ServiceIntentionsEntry::from_json(input).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Malformed {
                    format: Format::Json,
                    ..
                }
            ),
            "{input}: {err}"
        );
        assert!(err.to_string().starts_with("malformed JSON"), "{err}");
    }
}

/// Found by the `config_entry_hcl` fuzz target: `k = 2/0` reached hcl-rs's evaluator, which
/// asserts on a non-finite number (a panic in debug builds). Expressions other than literals
/// are refused by field before evaluation.
#[test]
fn entry_hcl_refuses_expressions_before_evaluating_them() {
    for (input, field) in [
        ("k=2/0", "k"),
        (
            "Kind = \"service-intentions\"\nName = \"api\"\nMeta = { a = 1 % 0 }\n",
            "Meta",
        ),
        ("Name = (0/0)\n", "Name"),
        ("Name = true ? \"a\" : \"b\"\n", "Name"),
        ("Name = [for x in [1] : x]\n", "Name"),
        ("Name = \"${2/0}\"\n", "Name"),
        ("Sources { Name = -1/0 }\n", "Sources.Name"),
        (
            "s = 0[5555555555555*5555555555555555555555555555555565]\n",
            "s",
        ),
        ("Name = api\n", "Name"),
        ("Name = upper(\"api\")\n", "Name"),
    ] {
        let err = ServiceIntentionsEntry::from_hcl(input).unwrap_err();
        assert_eq!(err.field(), Some(field), "{input}\n=> {err}");
        assert!(
            err.to_string().contains("not supported"),
            "{input}\n=> {err}"
        );
    }
    // Escaped interpolation is a literal.
    let e = ServiceIntentionsEntry::from_hcl(
        "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"web\", Action = \"allow\", Description = \"$${x}\" }]\n",
    )
    .unwrap();
    assert_eq!(e.sources[0].description, "${x}");
}

/// Found by the `config_entry_hcl` fuzz target: hcl-rs's parser backtracks exponentially on
/// unclosed groups holding operations (these 600 bytes of `%{504-e2222 ...`, a modulo and an
/// object outside a string, took over 20 s; `K= (3-3- ` 22 times over 10 s). Documents nesting
/// deeper than a config entry can are refused before parsing, with the place.
#[test]
fn entry_hcl_refuses_deep_nesting_before_parsing() {
    let parens = format!("K= {}", "(3-3- ".repeat(40));
    let objects = format!("K= {}", "{a=3-3- ".repeat(40));
    let fuzzed =
        "kiKinkiinkind = 2222222222*79%{504-e79%{504-e2222   %{504-    -00000 = 222222>22222   %{\
         504-    -51615 =22222<222279%{504-e2222   %{504-    -000200 = 222222>22222%{500000010622\
         79%{504-e22222<222279%2   %{504-  00001062%{50000001062279%{504-2   %{504-    -00000 = 2\
         22222<222279%2   %{504-   - 00000 = 222222<222279%{504-e2222   %{504-    -00000000001062\
         %{50000001062279%{504-e22222<222279%2   %{504-  00001062%{50000001062279%{504-e22222<222\
         279%2   %{504-  0000 = 222222<222279%{504-e22224-e2222   %{504-    -000200 = 222222>2222\
         2   %{504-    -00000 = 222222<222279%2   %{504-   - 00000 = 222222<22227";
    for input in [fuzzed, parens.as_str(), objects.as_str()] {
        let started = std::time::Instant::now();
        let err = ServiceIntentionsEntry::from_hcl(input).unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
        assert!(
            err.to_string()
                .contains("nest more than 10 levels deep (line 1, column"),
            "{err}"
        );
    }
    // Interpolations nest too; brackets in strings, heredocs and comments do not count.
    let err =
        ServiceIntentionsEntry::from_hcl(&format!("Name = \"{}\"", "${[".repeat(6))).unwrap_err();
    assert!(err.to_string().contains("line 1, column 25"), "{err}");
    let text = "((((((((((([[[[[[[[[[[{{{{{{{{{{{";
    let e = ServiceIntentionsEntry::from_hcl(&format!(
        "Kind = \"service-intentions\"\nName = \"api\" # {text}\n/* {text} */\n\
         Sources = [{{ Name = \"web\", Action = \"allow\", Description = \"{text}\\\"{text}\" }}]\n\
         Meta = {{ note = <<EOT\n{text}\nEOT\n}}\n"
    ))
    .unwrap();
    assert_eq!(e.sources[0].description, format!("{text}\"{text}"));
    assert_eq!(e.meta["note"], format!("{text}\n"));
}
