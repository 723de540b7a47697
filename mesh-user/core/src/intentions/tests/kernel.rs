//! The kernel form: the compiled maps agree with the reference check.

use std::collections::{BTreeMap, HashMap, HashSet};
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

/// A kernel form as names: what each entry means, whatever ids two interners gave it.
fn by_names(c: &CompiledRules) -> BTreeMap<[String; 4], (KernelValue, Option<String>)> {
    let name = |id: u32| c.interner().resolve(id).unwrap().to_owned();
    c.entries()
        .iter()
        .map(|(k, v)| {
            (
                [
                    name(k.src_ns),
                    name(k.src_name),
                    name(k.dst_ns),
                    name(k.dst_name),
                ],
                (*v, c.intention_id(v.counter_index).map(str::to_owned)),
            )
        })
        .collect()
}

/// One random write of any kind the API, the CLI or a config entry makes; errors (invalid or
/// duplicate pairs, unknown ids) are part of the mix and must leave the rules unchanged.
fn random_write(rng: &mut Rng, rules: &mut RuleSet) {
    let ids: Vec<String> = rules.list().iter().map(|i| i.id.clone()).collect();
    let pick_id = |rng: &mut Rng| ids.get(rng.below(ids.len().max(1))).cloned();
    let action = |rng: &mut Rng| {
        if rng.below(2) == 0 {
            Action::Allow
        } else {
            Action::Deny
        }
    };
    let spec = |rng: &mut Rng| {
        let (src_ns, src) = random_side(rng);
        let (dst_ns, dst) = random_side(rng);
        IntentionSpec {
            source_namespace: src_ns,
            source_name: src,
            source_partition: None,
            destination_namespace: dst_ns,
            destination_name: dst,
            action: action(rng),
            permissions: Vec::new(),
            description: String::new(),
            meta: Default::default(),
        }
    };
    match rng.below(8) {
        0 | 1 => {
            let s = spec(rng);
            let _ = rules.create(&s, rng.below(2) == 0);
        }
        2 => {
            if let Some(id) = pick_id(rng) {
                rules.delete(&id).unwrap();
            }
        }
        3 => {
            // Update: action only, or a move to another pair.
            if let Some(id) = pick_id(rng) {
                let s = if rng.below(2) == 0 {
                    let it = rules.get(&id).unwrap();
                    IntentionSpec::new(&it.source, &it.destination, action(rng))
                } else {
                    spec(rng)
                };
                let _ = rules.update(&id, &s);
            }
        }
        4 => {
            // A config entry replacing every intention to one destination.
            let dst = ServiceName::new(rng.pick(NAMESPACES), rng.pick(NAMES)).unwrap();
            let sources = (0..rng.below(4))
                .map(|_| SourceIntention {
                    source: ServiceName::new(rng.pick(NAMESPACES), rng.pick(NAMES)).unwrap(),
                    action: action(rng),
                    permissions: Vec::new(),
                    description: String::new(),
                    precedence: 0,
                })
                .collect();
            let _ = rules.apply_entry(&ServiceIntentionsEntry::new(dst, sources));
        }
        5 => {
            let dst = ServiceName::new(rng.pick(NAMESPACES), rng.pick(NAMES)).unwrap();
            rules.delete_entry(&dst);
        }
        6 => {
            let a = action(rng);
            rules.set_default_policy(a);
        }
        _ => {
            // L7 permissions make an intention's kernel action allow.
            let (src_ns, src) = random_side(rng);
            let dst = rng.pick(NAMES);
            let mut s = IntentionSpec {
                source_namespace: src_ns,
                source_name: src,
                source_partition: None,
                destination_namespace: Some("default".into()),
                destination_name: dst.into(),
                action: Action::Deny,
                permissions: Vec::new(),
                description: String::new(),
                meta: Default::default(),
            };
            s.action = Action::Deny;
            let _ = rules.create(&s, true);
        }
    }
}

/// Delta compilation (compiling only the pairs a change touched) gives, after any sequence of
/// changes, the kernel form a full compile of the same rules gives, and the kernel's lookup in
/// it agrees with `RuleSet::check`; the changes it reports, applied to the old entries, give
/// the new ones (what the kernel receives is exactly the difference).
#[test]
fn delta_compiled_kernel_form_equals_a_full_compile_after_random_changes() {
    let conns = all_connections();
    let mut deltas = 0usize;
    let mut fulls = 0usize;
    for seed in 2000..2100u64 {
        let mut rng = Rng(seed);
        let mut rules = random_rules(&mut rng);
        let mut compiled = CompiledRules::new(Interner::new());
        let mut kernel: HashMap<KernelKey, KernelValue> = HashMap::new();
        for step in 0..25 {
            let ctx = format!("seed {seed} step {step}");
            for _ in 0..1 + rng.below(3) {
                random_write(&mut rng, &mut rules);
            }
            // Now and then the agent is handed a rule set of another history (a restore): the
            // journal cannot say what changed, and the compile must be full.
            if rng.below(10) == 0 {
                let fresh = RuleSet::with_default_policy(rules.default_policy());
                let mut copy = fresh;
                for it in rules.list() {
                    let _ = copy.create(
                        &IntentionSpec::new(&it.source, &it.destination, it.action),
                        false,
                    );
                }
                rules = copy;
            }
            let before = compiled.version();
            let delta = rules.changes_since(before).is_some() && before != 0;
            if delta {
                deltas += 1;
            } else {
                fulls += 1;
            }
            let changes = compiled.update(&rules).unwrap();
            assert_eq!(compiled.version(), rules.version(), "{ctx}");
            let mut keys = HashSet::new();
            for (k, v) in &changes {
                assert!(keys.insert(*k), "{ctx}: key {k:?} reported twice");
                match v {
                    Some(v) => kernel.insert(*k, *v),
                    None => kernel.remove(k),
                };
            }
            assert_eq!(&kernel, compiled.entries(), "{ctx}: applied changes");
            let full = compile(&rules).unwrap();
            assert_eq!(by_names(&compiled), by_names(&full), "{ctx}");
            for src in &conns {
                for dst in &conns {
                    assert_agree(&rules, &compiled, src, dst, &ctx);
                }
            }
        }
    }
    // Full compiles: the first of each seed, and the restores (one step in ten).
    assert!(deltas > 5 * fulls, "{deltas} delta, {fulls} full compiles");
}

/// A change among 100,000 intentions compiles one entry, in well under a millisecond.
#[test]
fn one_change_among_a_hundred_thousand_compiles_one_entry() {
    let mut rules = RuleSet::with_default_policy(Action::Allow);
    for i in 0..100_000u32 {
        let spec = IntentionSpec::new(
            &ServiceName::new("default", format!("s{i}")).unwrap(),
            &ServiceName::new("default", format!("d{i}")).unwrap(),
            Action::Allow,
        );
        rules.create(&spec, false).unwrap();
    }
    let mut compiled = CompiledRules::new(Interner::new());
    assert_eq!(compiled.update(&rules).unwrap().len(), 100_000);
    let (web, api) = (
        ServiceName::new("default", "web").unwrap(),
        ServiceName::new("default", "api").unwrap(),
    );
    for action in [Action::Deny, Action::Allow, Action::Deny] {
        rules
            .create(&IntentionSpec::new(&web, &api, action), true)
            .unwrap();
        let started = Instant::now();
        let changes = compiled.update(&rules).unwrap();
        let took = started.elapsed();
        assert_eq!(changes.len(), 1, "{changes:?}");
        assert_eq!(changes[0].1.map(|v| v.action), Some(action));
        assert!(
            simulate_kernel_check(&compiled, &web, &api, Action::Allow).allowed
                == action.is_allow()
        );
        println!("one change among 100,000 compiled in {took:?}");
    }
    let id = rules.get_exact(&web, &api).unwrap().id.clone();
    rules.delete(&id).unwrap();
    let changes = compiled.update(&rules).unwrap();
    assert_eq!(changes.len(), 1);
    assert_eq!(changes[0].1, None);
    assert_eq!(compiled.len(), 100_000);
}
