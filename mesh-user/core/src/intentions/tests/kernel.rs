//! The kernel form: the compiled maps agree with the reference check.

use std::time::Instant;

use super::*;

/// A small deterministic PRNG (SplitMix64) so failures reproduce from the printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len())]
    }
}

const NAMESPACES: &[&str] = &["default", "ns1", "ns2"];
const NAMES: &[&str] = &["web", "api", "db", "cache"];

/// A random side of an intention: `ns/name`, `ns/*` or `*/*`.
fn random_side(rng: &mut Rng) -> (Option<String>, String) {
    match rng.below(5) {
        0 => (Some("*".into()), "*".into()),
        1 => (Some(rng.pick(NAMESPACES).into()), "*".into()),
        // Sometimes leave the namespace out, to exercise inheritance.
        2 => (None, rng.pick(NAMES).into()),
        _ => (Some(rng.pick(NAMESPACES).into()), rng.pick(NAMES).into()),
    }
}

fn random_rules(rng: &mut Rng) -> RuleSet {
    let default = if rng.below(2) == 0 {
        Action::Allow
    } else {
        Action::Deny
    };
    let mut rules = RuleSet::with_default_policy(default);
    let n = rng.below(40);
    for _ in 0..n {
        let (src_ns, src) = random_side(rng);
        let (dst_ns, dst) = random_side(rng);
        let spec = IntentionSpec {
            source_namespace: src_ns,
            source_name: src,
            source_partition: None,
            destination_namespace: dst_ns,
            destination_name: dst,
            action: if rng.below(2) == 0 {
                Action::Allow
            } else {
                Action::Deny
            },
            permissions: Vec::new(),
            description: String::new(),
            meta: Default::default(),
        };
        // Some random pairs are invalid (`*/web` after inheritance cannot happen, but `web`
        // under a `*` destination namespace with an explicit `*` source namespace can);
        // duplicates are replaced or refused at random.
        let _ = rules.create(&spec, rng.below(2) == 0);
    }
    // Churn: delete and move some, so the maps see removals too.
    let ids: Vec<String> = rules.list().iter().map(|i| i.id.clone()).collect();
    for id in ids {
        match rng.below(6) {
            0 => {
                rules.delete(&id).unwrap();
            }
            1 => {
                let s = IntentionSpec::new(
                    &ServiceName::new(rng.pick(NAMESPACES), rng.pick(NAMES)).unwrap(),
                    &ServiceName::new(rng.pick(NAMESPACES), "*").unwrap(),
                    Action::Deny,
                );
                let _ = rules.update(&id, &s);
            }
            _ => {}
        }
    }
    rules
}

fn all_connections() -> Vec<ServiceName> {
    // Every concrete service, plus names and namespaces no rule mentions, plus literal
    // wildcards (which must only meet wildcard intentions, in both implementations).
    let mut out = Vec::new();
    for ns in NAMESPACES.iter().chain(&["nsX"]) {
        for name in NAMES.iter().chain(&["ghost", "*"]) {
            out.push(ServiceName::new(*ns, *name).unwrap());
        }
    }
    out.push(ServiceName::wildcard());
    out
}

fn assert_agree(
    rules: &RuleSet,
    compiled: &CompiledRules,
    src: &ServiceName,
    dst: &ServiceName,
    ctx: &str,
) {
    let want = rules.check(src, dst);
    let got = simulate_kernel_check(compiled, src, dst, rules.default_policy());
    assert!(got.probes <= 9);
    assert_eq!(got.allowed, want.allowed, "{ctx}: {src} -> {dst}");
    let got_id = got
        .matched
        .and_then(|v| compiled.intention_id(v.counter_index));
    assert_eq!(got_id, matched_id(&want), "{ctx}: {src} -> {dst}");
    if let (Some(v), Matched::Intention { precedence, .. }) = (got.matched, &want.matched) {
        assert_eq!(v.precedence, *precedence);
    }
}

#[test]
fn kernel_simulation_agrees_with_check_on_random_rule_sets() {
    let conns = all_connections();
    let mut checked = 0usize;
    let mut decided_by_rule = 0usize;
    for seed in 0..400u64 {
        let mut rng = Rng(seed);
        let rules = random_rules(&mut rng);
        let compiled = compile(&rules).unwrap();
        assert_eq!(compiled.len(), rules.len());
        for src in &conns {
            for dst in &conns {
                assert_agree(&rules, &compiled, src, dst, &format!("seed {seed}"));
                checked += 1;
                if rules.check(src, dst).matched != Matched::Default {
                    decided_by_rule += 1;
                }
            }
        }
    }
    // The generator must exercise intentions, not just the default policy.
    assert!(
        decided_by_rule > checked / 4,
        "{decided_by_rule} of {checked}"
    );
}

#[test]
fn kernel_simulation_agrees_after_entry_writes_and_recompiles() {
    let conns = all_connections();
    for seed in 1000..1100u64 {
        let mut rng = Rng(seed);
        let mut rules = random_rules(&mut rng);
        let mut interner = Interner::new();
        for round in 0..3 {
            let dst = ServiceName::new(rng.pick(NAMESPACES), rng.pick(NAMES)).unwrap();
            let sources = (0..1 + rng.below(4))
                .map(|i| SourceIntention {
                    source: ServiceName::new(
                        rng.pick(NAMESPACES),
                        if i == 0 { "*" } else { rng.pick(NAMES) },
                    )
                    .unwrap(),
                    action: if rng.below(2) == 0 {
                        Action::Allow
                    } else {
                        Action::Deny
                    },
                    permissions: Vec::new(),
                    description: String::new(),
                    precedence: 0,
                })
                .collect();
            let _ = rules.apply_entry(&ServiceIntentionsEntry::new(dst, sources));
            let compiled = compile_with(&rules, interner).unwrap();
            for src in &conns {
                for dst in &conns {
                    assert_agree(
                        &rules,
                        &compiled,
                        src,
                        dst,
                        &format!("seed {seed} round {round}"),
                    );
                }
            }
            interner = compiled.into_interner();
        }
    }
}

#[test]
fn hundred_thousand_intentions_compile() {
    let mut rules = RuleSet::new();
    let start = Instant::now();
    for i in 0..100_000u32 {
        let src = ServiceName::new(format!("ns{}", i % 50), format!("svc{i}")).unwrap();
        let dst = match i % 4 {
            0 => ServiceName::new(format!("ns{}", i % 7), format!("svc{}", i / 3)).unwrap(),
            1 => ServiceName::new(format!("ns{}", i % 7), "*").unwrap(),
            2 => ServiceName::new("default", format!("api{}", i % 1000)).unwrap(),
            _ => ServiceName::wildcard(),
        };
        let action = if i % 3 == 0 {
            Action::Deny
        } else {
            Action::Allow
        };
        rules
            .create(&IntentionSpec::new(&src, &dst, action), false)
            .unwrap();
    }
    let built = start.elapsed();
    let start = Instant::now();
    let compiled = compile(&rules).unwrap();
    let took = start.elapsed();
    println!("100000 intentions: built rule set in {built:?}, compiled in {took:?}");
    assert_eq!(rules.len(), 100_000);
    assert_eq!(compiled.len(), 100_000);
    let mut counters: Vec<u32> = compiled
        .entries()
        .values()
        .map(|v| v.counter_index)
        .collect();
    counters.sort_unstable();
    counters.dedup();
    assert_eq!(counters.len(), 100_000);
    // Spot-check agreement on connections that hit every precedence band.
    for i in (0..100_000u32).step_by(997) {
        let src = ServiceName::new(format!("ns{}", i % 50), format!("svc{i}")).unwrap();
        for dst in [
            ServiceName::new(format!("ns{}", i % 7), format!("svc{}", i / 3)).unwrap(),
            ServiceName::new("default", format!("api{}", i % 1000)).unwrap(),
            ServiceName::new("ns3", "other").unwrap(),
        ] {
            assert_agree(&rules, &compiled, &src, &dst, "100k");
        }
    }
}
