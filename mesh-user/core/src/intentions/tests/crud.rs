//! Consul's single-intention CRUD and its JSON.

use super::*;

#[test]
fn create_update_delete() {
    let mut rules = RuleSet::new();
    let id = create(&mut rules, "web", "api", Action::Allow);
    assert_eq!(
        uuid::Uuid::parse_str(&id).map(|u| u.get_version_num()),
        Ok(4)
    );
    let first = rules.get(&id).unwrap().clone();
    assert_eq!(first.create_index, 1);

    // Duplicate pair refused, naming the existing one; nothing changes.
    let before = snapshot(&rules);
    let err = rules
        .create(&spec("web", "api", Action::Deny), false)
        .unwrap_err();
    assert!(matches!(err, Error::Duplicate { .. }));
    assert!(err
        .to_string()
        .starts_with("duplicate intention found: ALLOW default/web => default/api"));
    assert!(err.to_string().contains(&id));
    assert_eq!(snapshot(&rules), before);

    // Replace keeps the ID, creation and counter index.
    let mut s = spec("web", "api", Action::Deny);
    s.description = "no".into();
    let it = rules.create(&s, true).unwrap().clone();
    assert_eq!(it.id, id);
    assert_eq!(it.action, Action::Deny);
    assert_eq!(it.description, "no");
    assert_eq!(it.created_at, first.created_at);
    assert_eq!(it.create_index, 1);
    assert_eq!(it.modify_index, 2);
    assert_eq!(it.counter_index, first.counter_index);
    assert_eq!(rules.len(), 1);

    // Update may move the intention; the old pair is free again.
    let other = create(&mut rules, "db", "api", Action::Allow);
    let err = rules
        .update(&id, &spec("db", "api", Action::Allow))
        .unwrap_err();
    assert!(matches!(err, Error::Duplicate { .. }), "{err}");
    let moved = rules
        .update(&id, &spec("web", "*", Action::Allow))
        .unwrap()
        .clone();
    assert_eq!(moved.id, id);
    assert_eq!(moved.precedence, 6);
    assert!(rules.get_exact(&sn("web"), &sn("api")).is_none());
    assert_eq!(rules.get_exact(&sn("web"), &sn("*")).unwrap().id, id);
    assert_eq!(rules.get(&id).unwrap().counter_index, first.counter_index);

    // Unknown IDs, with Consul's messages.
    let err = rules
        .update("nope", &spec("a", "b", Action::Allow))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Cannot modify non-existent intention: 'nope'"
    );
    let err = rules.delete("nope").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Cannot delete non-existent intention: 'nope'"
    );

    let gone = rules.delete(&other).unwrap();
    assert_eq!(gone.source, sn("db"));
    assert!(rules.get(&other).is_none());
    assert_eq!(rules.len(), 1);
}

#[test]
fn failed_single_writes_change_nothing() {
    let mut rules = RuleSet::new();
    let id = create(&mut rules, "web", "api", Action::Allow);
    create(&mut rules, "db", "api", Action::Allow);
    let before = snapshot(&rules);
    let bad = [
        spec("web", "api", Action::Allow), // with partial wildcard below
    ];
    let mut partial = bad[0].clone();
    partial.source_name = "we*".into();
    assert!(rules.create(&partial, true).is_err());
    assert!(rules.update(&id, &partial).is_err());
    let mut slash = bad[0].clone();
    slash.destination_name = "a/b".into();
    assert!(rules.create(&slash, false).is_err());
    assert!(rules.update(&id, &spec("db", "api", Action::Deny)).is_err());
    assert_eq!(snapshot(&rules), before);
}

#[test]
fn intention_json_shape() {
    let mut rules = RuleSet::new();
    let mut s = spec("web", "api", Action::Allow);
    s.description = "front to back".into();
    s.meta.insert("team".into(), "edge".into());
    let it = rules.create(&s, false).unwrap();
    let v = serde_json::to_value(it).unwrap();
    assert_eq!(v["ID"], it.id.as_str());
    assert_eq!(v["SourceNS"], "default");
    assert_eq!(v["SourceName"], "web");
    assert_eq!(v["DestinationNS"], "default");
    assert_eq!(v["DestinationName"], "api");
    assert_eq!(v["SourcePartition"], "default");
    assert_eq!(v["SourceType"], "consul");
    assert_eq!(v["Action"], "allow");
    assert_eq!(v["Precedence"], 9);
    assert_eq!(v["Description"], "front to back");
    assert_eq!(v["Meta"]["team"], "edge");
    assert_eq!(v["CreateIndex"], 1);
    let created = v["CreatedAt"].as_str().unwrap();
    assert!(humantime::parse_rfc3339(created).is_ok(), "{created}");
    // What the API returns can be written back.
    let back = IntentionSpec::from_json(&v.to_string()).unwrap();
    assert_eq!(back.normalize().unwrap().source, sn("web"));
    assert_eq!(back.meta, s.meta);
}

#[test]
fn kubernetes_only_refuses_every_api_write_and_keeps_reads() {
    let mut rules = RuleSet::new();
    let id = create(&mut rules, "web", "db", Action::Allow);
    rules.set_kubernetes_only(true);
    let before = snapshot(&rules);
    let err = rules
        .create(&spec("web", "api", Action::Allow), false)
        .unwrap_err();
    assert!(matches!(err, Error::ReadOnly { .. }));
    let message = err.to_string();
    assert!(
        message.contains("ServiceIntentions") && message.contains("consul.hashicorp.com/v1alpha1"),
        "{message}"
    );
    assert!(rules.delete(&id).is_err());
    assert_eq!(snapshot(&rules), before);
    // Reads still work.
    assert_eq!(rules.get(&id).map(|i| i.action), Some(Action::Allow));
}
