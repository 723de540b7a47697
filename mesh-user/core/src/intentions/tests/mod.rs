//! Cross-cutting tests: rule set semantics, config entries, the two views, all-or-nothing
//! writes, and kernel compilation agreeing with `RuleSet::check`. One file per area; the
//! shared helpers are here.

use super::*;

fn sn(s: &str) -> ServiceName {
    ServiceName::parse(s).unwrap()
}

fn spec(src: &str, dst: &str, action: Action) -> IntentionSpec {
    IntentionSpec::new(&sn(src), &sn(dst), action)
}

fn create(rules: &mut RuleSet, src: &str, dst: &str, action: Action) -> String {
    rules
        .create(&spec(src, dst, action), false)
        .unwrap()
        .id
        .clone()
}

/// Everything observable about a rule set, to compare before/after a failed write.
fn snapshot(rules: &RuleSet) -> String {
    let list = serde_json::to_string(&rules.list()).unwrap();
    let entries = serde_json::to_string(&rules.entries()).unwrap();
    format!("{}|{}|{list}|{entries}", rules.index(), rules.len())
}

fn matched_id(d: &Decision) -> Option<&str> {
    match &d.matched {
        Matched::Intention { id, .. } => Some(id),
        Matched::Default => None,
    }
}

const ENTRY_HCL: &str = r#"
Kind      = "service-intentions"
Name      = "api"
Namespace = "default"
Meta = {
  owner = "team-a"
}
Sources = [
  {
    Name        = "*"
    Action      = "deny"
    Description = "deny everyone else"
  },
  {
    Name       = "web"
    Action     = "allow"
    Precedence = 1   # ignored, recomputed
  },
  {
    Name      = "*"
    Namespace = "ops"
    Action    = "allow"
    Type      = "consul"
  },
]
"#;

mod crud;
mod entries;
mod kernel;
mod l7;
mod precedence;
mod views;
