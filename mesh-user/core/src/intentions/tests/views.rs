//! The two views (entries and single intentions) of one rule set.

use super::*;

#[test]
fn entry_and_single_intentions_are_one_rule_set() {
    let mut rules = RuleSet::new();
    // Unrelated destination: must survive every entry write below.
    let other = create(&mut rules, "web", "db", Action::Allow);
    // A single intention to api, then an entry for api that keeps web and adds *.
    let single = create(&mut rules, "web", "api", Action::Deny);
    let old_counter = rules.get(&single).unwrap().counter_index;
    create(&mut rules, "cache", "api", Action::Allow);
    assert_eq!(rules.entry(&sn("api")).unwrap().sources.len(), 2);

    let e = ServiceIntentionsEntry::from_hcl(ENTRY_HCL).unwrap();
    rules.apply_entry(&e).unwrap();
    // cache -> api is gone (replaced), web -> api kept its identity but took the entry's action.
    assert!(rules.get_exact(&sn("cache"), &sn("api")).is_none());
    let web = rules.get_exact(&sn("web"), &sn("api")).unwrap();
    assert_eq!(web.id, single);
    assert_eq!(web.counter_index, old_counter);
    assert_eq!(web.action, Action::Allow);
    assert_eq!(web.meta.get("owner").map(String::as_str), Some("team-a"));
    assert_eq!(rules.len(), 4);
    assert!(rules.get(&other).is_some());

    // Reading the entry back lists exactly its sources, precedence computed.
    let read = rules.entry(&sn("api")).unwrap();
    assert_eq!(read.sources, e.sources);
    assert_eq!(read.meta, e.meta);
    assert_eq!(read.modify_index, rules.index());

    // A single intention created afterwards shows up inside the entry.
    let mut s = spec("ops/web", "api", Action::Deny);
    s.description = "ops web".into();
    rules.create(&s, false).unwrap();
    let read = rules.entry(&sn("api")).unwrap();
    assert_eq!(read.sources.len(), 4);
    assert_eq!(read.sources[0].source, sn("default/web"));
    assert_eq!(read.sources[1].source, sn("ops/web"));
    assert_eq!(read.sources[1].description, "ops web");
    // Checks see both kinds.
    assert!(!rules.check(&sn("ops/web"), &sn("api")).allowed);
    assert!(rules.check(&sn("ops/other"), &sn("api")).allowed);
    assert!(!rules.check(&sn("other"), &sn("api")).allowed);

    // The entry list has one entry per destination.
    let names: Vec<String> = rules
        .entries()
        .iter()
        .map(|e| e.destination.to_string())
        .collect();
    assert_eq!(names, ["default/api", "default/db"]);

    // Deleting the entry removes all intentions to api and nothing else.
    assert_eq!(rules.delete_entry(&sn("api")), 4);
    assert!(rules.entry(&sn("api")).is_none());
    assert_eq!(rules.len(), 1);
    assert!(rules.get(&other).is_some());
    assert_eq!(rules.delete_entry(&sn("api")), 0);
    // Deleting the last single intention for db removes its entry view too.
    rules.delete(&other).unwrap();
    assert!(rules.entries().is_empty());
}

#[test]
fn failed_entry_writes_change_nothing() {
    let mut rules = RuleSet::new();
    create(&mut rules, "web", "api", Action::Allow);
    create(&mut rules, "cache", "api", Action::Deny);
    rules
        .apply_entry(&ServiceIntentionsEntry::from_hcl(ENTRY_HCL).unwrap())
        .unwrap();
    let before = snapshot(&rules);

    // Entries built in code are checked again when applied.
    let dup = ServiceIntentionsEntry::new(
        sn("api"),
        vec![
            SourceIntention {
                source: sn("x"),
                action: Action::Allow,
                permissions: Vec::new(),
                description: String::new(),
                precedence: 0,
            },
            SourceIntention {
                source: sn("x"),
                action: Action::Deny,
                permissions: Vec::new(),
                description: String::new(),
                precedence: 0,
            },
        ],
    );
    let err = rules.apply_entry(&dup).unwrap_err();
    assert_eq!(err.field(), Some("Sources[1]"));
    let empty = ServiceIntentionsEntry::new(sn("api"), vec![]);
    assert_eq!(
        rules.apply_entry(&empty).unwrap_err().field(),
        Some("Sources")
    );
    let mut long = ServiceIntentionsEntry::new(
        sn("api"),
        vec![SourceIntention {
            source: sn("x"),
            action: Action::Allow,
            permissions: Vec::new(),
            description: "d".repeat(600),
            precedence: 0,
        }],
    );
    assert_eq!(
        rules.apply_entry(&long).unwrap_err().field(),
        Some("Sources[0].Description")
    );
    long.sources[0].description.clear();
    long.meta = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
    assert_eq!(rules.apply_entry(&long).unwrap_err().field(), Some("Meta"));
    assert_eq!(snapshot(&rules), before);

    // Documents that fail to parse never reach the rule set; the valid one still applies.
    for bad in [
        "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"web\", Action = \"allow\" }, { Name = \"we*\", Action = \"allow\" }]",
        "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"web\", Action = \"allow\", Oops = true }]",
    ] {
        if let Ok(e) = ServiceIntentionsEntry::from_hcl(bad) {
            rules.apply_entry(&e).unwrap();
        }
    }
    assert_eq!(snapshot(&rules), before);
}

#[test]
fn entry_precedence_is_recomputed_not_trusted() {
    let mut e = ServiceIntentionsEntry::from_json(
        r#"{"Kind":"service-intentions","Name":"*","Namespace":"*",
            "Sources":[{"Name":"*","Action":"deny","Precedence":9},{"Name":"web","Action":"allow","Precedence":1}]}"#,
    )
    .unwrap();
    // Source namespace is not inherited from a wildcard destination namespace.
    assert_eq!(e.sources[0].source, sn("default/web"));
    assert_eq!(e.sources[0].precedence, 3);
    assert_eq!(e.sources[1].source, sn("default/*"));
    assert_eq!(e.sources[1].precedence, 2);
    e.sources[0].precedence = 200;
    let mut rules = RuleSet::new();
    rules.apply_entry(&e).unwrap();
    assert_eq!(rules.entry(&sn("*/*")).unwrap().sources[0].precedence, 3);
}
