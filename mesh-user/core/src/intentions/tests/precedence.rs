//! Precedence and ordering: check, match, list.

use super::*;

#[test]
fn precedence_rows_through_the_rule_set() {
    let rows = [
        ("ns1/web", "ns2/api", 9),
        ("ns1/*", "ns2/api", 8),
        ("*/*", "ns2/api", 7),
        ("ns1/web", "ns2/*", 6),
        ("ns1/*", "ns2/*", 5),
        ("*/*", "ns2/*", 4),
        ("ns1/web", "*/*", 3),
        ("ns1/*", "*/*", 2),
        ("*/*", "*/*", 1),
    ];
    let mut rules = RuleSet::new();
    // Insert lowest first so that the order of `list` cannot come from insertion order.
    for (src, dst, want) in rows.iter().rev() {
        let it = rules.create(&spec(src, dst, Action::Allow), false).unwrap();
        assert_eq!(it.precedence, *want, "{src} -> {dst}");
    }
    let listed: Vec<u8> = rules.list().iter().map(|i| i.precedence).collect();
    assert_eq!(listed, [9, 8, 7, 6, 5, 4, 3, 2, 1]);

    // Each row decides the connection ns1/web -> ns2/api once every row above it is gone.
    for (src, dst, want) in rows {
        let d = rules.check(&sn("ns1/web"), &sn("ns2/api"));
        assert_eq!(
            d.matched,
            Matched::Intention {
                id: rules.get_exact(&sn(src), &sn(dst)).unwrap().id.clone(),
                precedence: want,
            }
        );
        let id = rules.get_exact(&sn(src), &sn(dst)).unwrap().id.clone();
        rules.delete(&id).unwrap();
    }
    assert_eq!(
        rules.check(&sn("ns1/web"), &sn("ns2/api")).matched,
        Matched::Default
    );
}

#[test]
fn ties_sort_by_source_then_destination() {
    let mut rules = RuleSet::new();
    // All precedence 9; inserted in scrambled order.
    for (s, d) in [
        ("b/web", "a/api"),
        ("a/zeta", "a/api"),
        ("a/alpha", "b/api"),
        ("a/alpha", "a/db"),
        ("a/alpha", "a/api"),
    ] {
        create(&mut rules, s, d, Action::Deny);
    }
    // And a lower precedence one whose names would sort first.
    create(&mut rules, "a/*", "a/api", Action::Allow);
    let order: Vec<String> = rules
        .list()
        .iter()
        .map(|i| format!("{} {}", i.source, i.destination))
        .collect();
    assert_eq!(
        order,
        [
            "a/alpha a/api",
            "a/alpha a/db",
            "a/alpha b/api",
            "a/zeta a/api",
            "b/web a/api",
            "a/* a/api",
        ]
    );
}

#[test]
fn default_policy_both_ways() {
    let mut rules = RuleSet::new();
    assert_eq!(rules.default_policy(), Action::Deny);
    create(&mut rules, "web", "api", Action::Allow);
    let d = rules.check(&sn("db"), &sn("api"));
    assert_eq!(
        d,
        Decision {
            allowed: false,
            matched: Matched::Default,
            has_permissions: false,
        }
    );
    rules.set_default_policy(Action::Allow);
    let d = rules.check(&sn("db"), &sn("api"));
    assert_eq!(
        d,
        Decision {
            allowed: true,
            matched: Matched::Default,
            has_permissions: false,
        }
    );
    // A matching intention overrides the default either way.
    create(&mut rules, "db", "api", Action::Deny);
    assert!(!rules.check(&sn("db"), &sn("api")).allowed);
    let mut allow_all = RuleSet::with_default_policy(Action::Allow);
    create(&mut allow_all, "*", "api", Action::Deny);
    assert!(!allow_all.check(&sn("web"), &sn("api")).allowed);
    assert!(allow_all.check(&sn("web"), &sn("db")).allowed);
}

#[test]
fn highest_precedence_match_decides() {
    let mut rules = RuleSet::new();
    let all = create(&mut rules, "*/*", "*/*", Action::Allow);
    let deny_api = create(&mut rules, "*/*", "api", Action::Deny);
    let web_api = create(&mut rules, "web", "api", Action::Allow);
    let d = rules.check(&sn("web"), &sn("api"));
    assert!(d.allowed);
    assert_eq!(matched_id(&d), Some(web_api.as_str()));
    let d = rules.check(&sn("db"), &sn("api"));
    assert!(!d.allowed);
    assert_eq!(matched_id(&d), Some(deny_api.as_str()));
    let d = rules.check(&sn("db"), &sn("cache"));
    assert!(d.allowed);
    assert_eq!(matched_id(&d), Some(all.as_str()));
    // Other namespaces: `api` means default/api, so ns1/api only meets */*.
    let d = rules.check(&sn("ns1/web"), &sn("ns1/api"));
    assert_eq!(matched_id(&d), Some(all.as_str()));
    // web in ns1 is not web in default.
    let d = rules.check(&sn("ns1/web"), &sn("api"));
    assert_eq!(matched_id(&d), Some(deny_api.as_str()));
}

#[test]
fn match_by_like_consul() {
    let mut rules = RuleSet::new();
    for (s, d) in [
        ("web", "api"),
        ("web", "db"),
        ("*", "api"),
        ("ns1/web", "api"),
        ("*/*", "*/*"),
        ("web", "*/*"),
        ("ns1/*", "ns1/*"),
    ] {
        create(&mut rules, s, d, Action::Allow);
    }
    let show = |v: Vec<&Intention>| -> Vec<String> {
        v.iter()
            .map(|i| format!("{} {} {}", i.source, i.destination, i.precedence))
            .collect()
    };
    assert_eq!(
        show(rules.match_by(MatchType::Destination, &sn("api"))),
        [
            "default/web default/api 9",
            "ns1/web default/api 9",
            "default/* default/api 8",
            "default/web */* 3",
            "*/* */* 1",
        ]
    );
    assert_eq!(
        show(rules.match_by(MatchType::Source, &sn("web"))),
        [
            "default/web default/api 9",
            "default/web default/db 9",
            "default/* default/api 8",
            "default/web */* 3",
            "*/* */* 1",
        ]
    );
    assert_eq!(
        show(rules.match_by(MatchType::Destination, &sn("ns1/*"))),
        ["ns1/* ns1/* 5", "default/web */* 3", "*/* */* 1"]
    );
    assert_eq!(
        show(rules.match_by(MatchType::Source, &sn("*/*"))),
        ["*/* */* 1"]
    );
    assert_eq!(
        show(rules.match_by(MatchType::Destination, &sn("ns2/x"))),
        ["default/web */* 3", "*/* */* 1"]
    );
}
