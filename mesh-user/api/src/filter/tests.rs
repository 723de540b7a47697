//! The filter language, operator by operator, and its error messages.

use serde_json::json;

use super::*;

fn items() -> Vec<Value> {
    vec![
        json!({"SourceName": "web", "SourceNS": "default", "Action": "allow",
               "Precedence": 9, "Meta": {"env": "prod", "a key": "x"}, "Tags": ["a", "b"],
               "Description": ""}),
        json!({"SourceName": "admin", "SourceNS": "ops", "Action": "deny",
               "Precedence": 5, "Meta": {}, "Tags": [], "Description": "no"}),
    ]
}

fn names(expr: &str) -> Vec<String> {
    Filter::parse(expr)
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
        .apply(items())
        .unwrap_or_else(|e| panic!("{expr}: {e}"))
        .iter()
        .map(|v| v["SourceName"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn operators() {
    let cases: &[(&str, &[&str])] = &[
        ("SourceName == web", &["web"]),
        ("SourceName == \"web\"", &["web"]),
        ("SourceName==`web`", &["web"]),
        ("SourceName != web", &["admin"]),
        ("Precedence == 5", &["admin"]),
        ("a in Tags", &["web"]),
        ("\"a\" not in Tags", &["admin"]),
        ("env in Meta", &["web"]),
        ("Tags contains b", &["web"]),
        ("SourceName contains dm", &["admin"]),
        ("SourceName not contains dm", &["web"]),
        ("SourceName matches \"^w.b$\"", &["web"]),
        ("SourceName not matches \"^w\"", &["admin"]),
        ("Meta is empty", &["admin"]),
        ("Meta is not empty", &["web"]),
        ("Description is empty", &["web"]),
        ("Meta.env == prod", &["web"]),
        ("Meta[\"a key\"] == x", &["web"]),
        ("Meta.missing is empty", &["web", "admin"]),
        ("Meta.env != prod", &["admin"]),
    ];
    for (expr, want) in cases {
        assert_eq!(names(expr), *want, "{expr}");
    }
}

#[test]
fn boolean_logic_and_precedence() {
    assert_eq!(
        names("SourceName == web or SourceName == admin and Action == allow"),
        ["web"]
    );
    assert_eq!(
        names("(SourceName == web or SourceName == admin) and Action == deny"),
        ["admin"]
    );
    assert_eq!(names("not SourceName == web"), ["admin"]);
    assert_eq!(
        names("not (Action == allow or Action == deny)"),
        Vec::<String>::new()
    );
    assert_eq!(names("SourceNS == ops AND Action == deny"), ["admin"]);
}

#[test]
fn errors_name_the_problem() {
    let syntax = |expr: &str, want: &str| {
        let e = Filter::parse(expr).unwrap_err().to_string();
        assert!(e.contains(want), "{expr}: {e}");
        assert!(
            e.starts_with("Failed to create boolean expression evaluator"),
            "{expr}: {e}"
        );
    };
    syntax("SourceName", "expected a match operator");
    syntax("SourceName ==", "expected a value");
    syntax("SourceName == \"web", "unterminated");
    syntax("(SourceName == web", "expected \")\"");
    syntax("SourceName == web and", "found end of input");
    syntax("SourceName == web extra", "unexpected \"extra\"");
    syntax("SourceName matches \"(\"", "invalid regular expression");
    syntax("\"web\" == SourceName", "expected a selector");
    syntax("SourceName is full", "expected \"empty\"");
    let fields = ["SourceName", "Meta", "Tags", "Description"];
    assert_eq!(
        Filter::parse_for("SourceName == a or (Nope == x)", &fields)
            .unwrap_err()
            .to_string(),
        "Selector \"Nope\" is not valid"
    );
    // A field of the type that an object leaves out is absent, not an error.
    let f = Filter::parse_for("Description is empty and not Meta.x == y", &fields).unwrap();
    assert!(f.matches(&json!({"SourceName": "web"})).unwrap());
    let f = Filter::parse("Tags == a").unwrap();
    assert!(f.apply(items()).unwrap_err().to_string().contains("\"==\""));
    let f = Filter::parse("SourceName.x == a").unwrap();
    assert!(matches!(f.apply(items()), Err(Error::Selector(_))));
}

/// A filter of a thousand `(` overflowed a tokio worker's stack and aborted the agent (any
/// token with read access could send it). Nesting and size are bounded, with an error that
/// names the limit; expressions within them still work.
#[test]
fn deep_or_long_expressions_are_refused_not_overflowed() {
    for expr in [
        format!("{}Name==x{}", "(".repeat(1000), ")".repeat(1000)),
        format!("{}Name==x", "not ".repeat(1000)),
        format!("{}Name==x", "(not ".repeat(20)),
    ] {
        let e = Filter::parse(&expr).unwrap_err().to_string();
        assert!(e.contains("nest more than 32 levels deep"), "{e}");
    }
    let long = vec!["SourceName == web"; 300].join(" and ");
    let e = Filter::parse(&long).unwrap_err().to_string();
    assert!(e.contains("more than 256 matchers and operators"), "{e}");
    // Within the limits.
    let deep = format!("{}SourceName == web{}", "(".repeat(32), ")".repeat(32));
    assert_eq!(names(&deep), ["web"]);
    let chain = vec!["SourceName == web"; 100].join(" or ");
    assert_eq!(names(&chain), ["web"]);
}
