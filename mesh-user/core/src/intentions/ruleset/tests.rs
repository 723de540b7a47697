//! Rule-set internals: counter exhaustion and the durable restore.

use super::*;
use crate::intentions::{ServiceIntentionsEntry, SourceIntention};

fn sn(s: &str) -> ServiceName {
    ServiceName::parse(s).unwrap()
}

fn source(s: &str) -> SourceIntention {
    SourceIntention {
        source: sn(s),
        action: Action::Allow,
        permissions: Vec::new(),
        description: String::new(),
        precedence: 0,
    }
}

#[test]
fn counter_exhaustion_changes_nothing() {
    let mut rules = RuleSet::new();
    rules
        .create(
            &IntentionSpec::new(&sn("web"), &sn("api"), Action::Deny),
            false,
        )
        .unwrap();
    rules.next_counter = u32::MAX - 1;
    let before: Vec<Intention> = rules.list().into_iter().cloned().collect();
    let index = rules.index();

    // Two new sources need two indexes; only one is left. `web` reuses its own.
    let entry =
        ServiceIntentionsEntry::new(sn("api"), vec![source("web"), source("a"), source("b")]);
    let err = rules.apply_entry(&entry).unwrap_err();
    assert!(matches!(err, Error::Exhausted { .. }), "{err}");
    let after: Vec<Intention> = rules.list().into_iter().cloned().collect();
    assert_eq!(after, before);
    assert_eq!(rules.index(), index);
    assert_eq!(rules.next_counter, u32::MAX - 1);

    // One new source fits, and takes the last index.
    let entry = ServiceIntentionsEntry::new(sn("api"), vec![source("web"), source("a")]);
    rules.apply_entry(&entry).unwrap();
    assert_eq!(
        rules.get_exact(&sn("a"), &sn("api")).unwrap().counter_index,
        u32::MAX - 1
    );
    let err = rules
        .create(
            &IntentionSpec::new(&sn("c"), &sn("api"), Action::Deny),
            false,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Exhausted { .. }), "{err}");
    assert_eq!(rules.len(), 2);
}

fn saved(rules: &RuleSet) -> (Vec<Intention>, Vec<EntryIndexes>) {
    (
        rules.list().into_iter().cloned().collect(),
        rules.entries().iter().map(EntryIndexes::from).collect(),
    )
}

#[test]
fn restore_gives_back_the_same_rules() {
    let mut rules = RuleSet::new();
    rules
        .create(
            &IntentionSpec::new(&sn("web"), &sn("api"), Action::Deny),
            false,
        )
        .unwrap();
    let gone = rules
        .create(
            &IntentionSpec::new(&sn("old"), &sn("api"), Action::Deny),
            false,
        )
        .unwrap()
        .id
        .clone();
    rules.delete(&gone).unwrap();
    let mut entry = ServiceIntentionsEntry::new(sn("ns1/db"), vec![source("ns1/*")]);
    entry.meta.insert("team".into(), "a".into());
    rules.apply_entry(&entry).unwrap();
    let (intentions, entries) = saved(&rules);
    let back = RuleSet::restore(
        Action::Allow,
        rules.index(),
        rules.counter_watermark(),
        intentions,
        entries,
    )
    .unwrap();
    assert_eq!(saved(&back), saved(&rules));
    assert_eq!(back.index(), rules.index());
    assert_eq!(back.counter_watermark(), 3);
    assert_eq!(back.default_policy(), Action::Allow);
    assert_eq!(back.len(), 2);
    assert!(!back.check(&sn("web"), &sn("api")).allowed);
    // The restored set goes on where the saved one stopped.
    let mut back = back;
    let it = back
        .create(
            &IntentionSpec::new(&sn("x"), &sn("api"), Action::Deny),
            false,
        )
        .unwrap();
    assert_eq!(it.counter_index, 3);
    assert_eq!(it.create_index, rules.index() + 1);
}

#[test]
fn restore_refuses_damaged_state_naming_the_element() {
    let mut rules = RuleSet::new();
    for src in ["a", "b"] {
        rules
            .create(
                &IntentionSpec::new(&sn(src), &sn("api"), Action::Deny),
                false,
            )
            .unwrap();
    }
    let (intentions, entries) = saved(&rules);
    let try_restore = |its: Vec<Intention>, ents: Vec<EntryIndexes>| {
        RuleSet::restore(Action::Deny, rules.index(), 2, its, ents).unwrap_err()
    };
    let mut its = intentions.clone();
    its[1].id = its[0].id.clone();
    assert_eq!(
        try_restore(its, entries.clone()).field(),
        Some("Intentions[1].ID")
    );
    let mut its = intentions.clone();
    its[0].precedence = 3;
    assert_eq!(
        try_restore(its, entries.clone()).field(),
        Some("Intentions[0].Precedence")
    );
    let mut its = intentions.clone();
    its[1].counter_index = its[0].counter_index;
    assert_eq!(
        try_restore(its, entries.clone()).field(),
        Some("Intentions[1].CounterIndex")
    );
    let mut its = intentions.clone();
    its[0].modify_index = rules.index() + 1;
    assert_eq!(
        try_restore(its, entries.clone()).field(),
        Some("Intentions[0].ModifyIndex")
    );
    let mut its = intentions.clone();
    its[1].source = its[0].source.clone();
    assert_eq!(
        try_restore(its, entries.clone()).field(),
        Some("Intentions[1].SourceName")
    );
    assert_eq!(
        try_restore(intentions.clone(), vec![]).field(),
        Some("Entries")
    );
    let twice = vec![entries[0].clone(), entries[0].clone()];
    assert_eq!(
        try_restore(intentions.clone(), twice).field(),
        Some("Entries[1]")
    );
    let mut stray = entries.clone();
    stray[0].destination = sn("other");
    assert_eq!(try_restore(intentions, stray).field(), Some("Entries[0]"));
}

/// The pairs of a change's put and removed intentions, as "source→destination".
fn pairs(c: &RuleSetChanges<'_>) -> (Vec<String>, Vec<String>) {
    (
        c.intentions_put
            .iter()
            .map(|it| format!("{}→{}", it.source, it.destination))
            .collect(),
        c.intentions_removed
            .iter()
            .map(|(s, d)| format!("{s}→{d}"))
            .collect(),
    )
}

#[test]
fn changes_from_a_copy_name_exactly_what_each_write_changed() {
    let mut rules = RuleSet::new();
    for i in 0..2000 {
        let spec = IntentionSpec::new(
            &sn(&format!("s{i}")),
            &sn(&format!("d{}", i % 50)),
            Action::Allow,
        );
        rules.create(&spec, false).unwrap();
    }
    let base = rules.clone();
    assert!(rules.changes_from(&base).is_empty());

    // A new intention, a changed one (its description only), a deleted one.
    let mut next = base.clone();
    next.create(
        &IntentionSpec::new(&sn("web"), &sn("api"), Action::Deny),
        false,
    )
    .unwrap();
    let id = next.get_exact(&sn("s7"), &sn("d7")).unwrap().id.clone();
    let mut spec = IntentionSpec::new(&sn("s7"), &sn("d7"), Action::Allow);
    spec.description = "now described".into();
    next.update(&id, &spec).unwrap();
    let gone = next.get_exact(&sn("s8"), &sn("d8")).unwrap().id.clone();
    next.delete(&gone).unwrap();
    let c = next.changes_from(&base);
    let (mut put, removed) = pairs(&c);
    put.sort();
    assert_eq!(put, ["default/s7→default/d7", "default/web→default/api"]);
    assert_eq!(
        c.intentions_put
            .iter()
            .find(|it| it.source == sn("s7"))
            .unwrap()
            .description,
        "now described"
    );
    assert_eq!(removed, ["default/s8→default/d8"]);
    // Every touched destination's entry moved its modify index; api's entry is new.
    let entries: Vec<String> = c
        .entries_put
        .iter()
        .map(|e| e.destination.to_string())
        .collect();
    assert_eq!(entries, ["default/api", "default/d7", "default/d8"]);
    assert!(c.entries_removed.is_empty());

    // The whole entry of a destination deleted: its intentions and entry are gone.
    let mut next = base.clone();
    assert_eq!(next.delete_entry(&sn("d3")), 40);
    let c = next.changes_from(&base);
    assert!(c.intentions_put.is_empty());
    assert_eq!(c.intentions_removed.len(), 40);
    assert!(c.intentions_removed.iter().all(|(_, d)| **d == sn("d3")));
    assert_eq!(c.entries_removed, [&sn("d3")]);

    // service-defaults: added, then removed.
    let mut next = base.clone();
    let http =
        crate::intentions::ServiceDefaultsEntry::new(sn("api"), crate::catalog::Protocol::Http);
    next.apply_service_defaults(&http).unwrap();
    let c = next.changes_from(&base);
    assert_eq!(c.service_defaults_put.len(), 1);
    assert_eq!(c.service_defaults_put[0].service, sn("api"));
    let mut after = next.clone();
    after.delete_service_defaults(&sn("api")).unwrap();
    let c = after.changes_from(&next);
    assert!(c.service_defaults_put.is_empty());
    assert_eq!(c.service_defaults_removed, [&sn("api")]);
}

#[test]
fn a_rule_set_descends_from_its_remembered_states_only() {
    let mut rules = RuleSet::new();
    let start = rules.version();
    assert!(rules.descends_from(start));
    let clone = rules.clone();
    rules
        .create(
            &IntentionSpec::new(&sn("web"), &sn("api"), Action::Deny),
            false,
        )
        .unwrap();
    let after_one = rules.version();
    assert!(rules.descends_from(start) && rules.descends_from(after_one));
    // Another history: a fresh set, and a clone that went its own way.
    assert!(!rules.descends_from(RuleSet::new().version()));
    let mut other = clone;
    other.set_default_policy(Action::Deny);
    assert!(!rules.descends_from(other.version()));
    assert!(!other.descends_from(after_one));
    // Too far back to remember.
    for i in 0..journal::CAPACITY {
        rules.set_default_policy(if i % 2 == 0 {
            Action::Allow
        } else {
            Action::Deny
        });
    }
    assert!(!rules.descends_from(start));
    for v in [start, after_one, other.version(), rules.version()] {
        assert_eq!(
            rules.descends_from(v),
            rules.changes_since(v).is_some(),
            "version {v}"
        );
    }
}
