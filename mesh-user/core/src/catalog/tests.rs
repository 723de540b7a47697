use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use super::*;

#[test]
fn pin_names_fit_every_valid_namespace_and_pod_name() {
    // Short names keep their readable form (and the pins of earlier versions).
    assert_eq!(pin_name("default", "web-0"), "default_web-0");
    // The longest namespace (63) and pod name (253, dots included) still make a valid,
    // distinct pin name.
    let ns = "n".repeat(63);
    let long = format!("{}.{}", "a".repeat(126), "b".repeat(126));
    let other = format!("{}-{}", "a".repeat(126), "b".repeat(126));
    let (p1, p2) = (pin_name(&ns, &long), pin_name(&ns, &other));
    for p in [&p1, &p2] {
        assert!(p.len() <= MAX_PIN_NAME, "{p}");
        assert!(p
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b)));
    }
    assert_ne!(p1, p2);
    // A dotted short name is hashed too: '.' cannot be in a pin name.
    let dotted = pin_name("default", "web.v1");
    assert!(dotted.starts_with("default_web-v1-"), "{dotted}");
    assert_ne!(dotted, pin_name("default", "web-v1"));
}

fn api() -> Service {
    Service {
        name: "api".into(),
        namespace: "default".into(),
        datacenter: "dc1".into(),
        vip: Some(Ipv4Addr::new(10, 96, 0, 10)),
        ports: vec![9091],
        protocol: Protocol::Tcp,
        target_ports: Default::default(),
        endpoints: vec![Endpoint {
            ip: Ipv4Addr::new(10, 0, 0, 3),
            port: 20000,
        }],
        ..Default::default()
    }
}

fn web() -> Workload {
    Workload {
        name: "web-0".into(),
        namespace: "default".into(),
        service: "web".into(),
        datacenter: "dc1".into(),
        netns: "/run/netns/web".into(),
        cgroup: "/sys/fs/cgroup/mesh/web".into(),
        ip: Ipv4Addr::new(10, 0, 0, 2),
        app_ports: vec![9090],
        exclude_inbound_ports: vec![],
        upstreams: vec![Upstream {
            service: "api".into(),
            namespace: "default".into(),
            datacenter: "dc1".into(),
            bind_port: 9091,
        }],
    }
}

#[test]
fn json_with_defaults_round_trips() {
    let text = r#"{"services":[{"name":"api","vip":"10.96.0.10","ports":[9091],
        "endpoints":[{"ip":"10.0.0.3"}]}],
        "workloads":[{"name":"web-0","service":"web","netns":"/run/netns/web",
        "cgroup":"/sys/fs/cgroup/mesh/web","ip":"10.0.0.2","app_ports":[9090],
        "upstreams":[{"service":"api","bind_port":9091}]}]}"#;
    let c = Catalog::from_json(text).unwrap();
    assert_eq!(c.services, vec![api()]);
    assert_eq!(c.workloads, vec![web()]);
    let again = Catalog::from_json(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(again, c);
}

#[test]
fn unknown_fields_and_bad_values_are_refused_with_a_reason() {
    let e = Catalog::from_json(r#"{"services":[{"name":"api","colour":"red"}]}"#).unwrap_err();
    assert!(e.to_string().contains("colour"), "{e}");
    let mut c = Catalog {
        services: vec![api(), api()],
        workloads: vec![],
    };
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("defined twice"));
    c.services.pop();
    let mut w = web();
    w.app_ports = vec![15001];
    c.workloads = vec![w];
    assert!(c.validate().unwrap_err().to_string().contains("reserved"));
    let mut w = web();
    w.upstreams[0].bind_port = 9090;
    c.workloads = vec![w];
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("already an app port"));
    let mut w = web();
    w.name = "Web".into();
    c.workloads = vec![w];
    assert!(c.validate().unwrap_err().to_string().contains("lowercase"));
    let mut s = api();
    s.name = "db".into();
    c.workloads = vec![];
    c.services = vec![api(), s];
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("already the virtual IP"));
}

#[test]
fn delta_updates_report_what_changed_and_bad_ones_change_nothing() {
    let mut c = Catalog::default();
    let d = c
        .apply(Update::Full(Catalog {
            services: vec![api()],
            workloads: vec![web()],
        }))
        .unwrap();
    assert_eq!(d.services_changed.len(), 1);
    assert_eq!(
        d.workloads_changed,
        BTreeSet::from(["default.web-0".to_string()])
    );

    let mut moved = api();
    moved.endpoints.push(Endpoint {
        ip: Ipv4Addr::new(10, 0, 0, 4),
        port: 20000,
    });
    let d = c
        .apply(Update::Delta {
            upsert_services: vec![moved.clone()],
            remove_services: vec![],
            upsert_workloads: vec![],
            remove_workloads: vec![],
        })
        .unwrap();
    assert_eq!(d.services_changed, BTreeSet::from([moved.service_ref()]));
    assert!(d.workloads_changed.is_empty());

    let before = c.clone();
    let mut clash = web();
    clash.name = "web-1".into(); // same IP as web-0
    let e = c
        .apply(Update::Delta {
            upsert_services: vec![],
            remove_services: vec![],
            upsert_workloads: vec![clash],
            remove_workloads: vec![],
        })
        .unwrap_err();
    assert!(e.to_string().contains("already the IP"), "{e}");
    assert_eq!(c, before, "a refused update changes nothing");

    let d = c
        .apply(Update::Delta {
            upsert_services: vec![],
            remove_services: vec![],
            upsert_workloads: vec![],
            remove_workloads: vec!["default.web-0".into()],
        })
        .unwrap();
    assert_eq!(
        d.workloads_removed,
        BTreeSet::from(["default.web-0".to_string()])
    );
    assert!(c.workloads.is_empty());
}

#[test]
fn addresses_map_to_their_service() {
    let c = Catalog {
        services: vec![api()],
        workloads: vec![],
    };
    assert_eq!(
        c.service_at("10.96.0.10:9091".parse().unwrap())
            .map(|s| s.name.as_str()),
        Some("api")
    );
    assert_eq!(
        c.service_at("10.0.0.3:9091".parse().unwrap())
            .map(|s| s.name.as_str()),
        Some("api")
    );
    assert!(c.service_at("10.96.0.10:80".parse().unwrap()).is_none());
    assert!(c.service_at("10.9.9.9:9091".parse().unwrap()).is_none());
}

#[test]
fn a_service_port_can_land_on_another_app_port() {
    let mut api = api();
    api.ports = vec![80, 9091];
    api.target_ports = BTreeMap::from([(80, 8080)]);
    assert_eq!(api.target_port(80), 8080);
    assert_eq!(api.target_port(9091), 9091);
    assert_eq!(api.target_ports().collect::<Vec<_>>(), [8080, 9091]);
    let c = Catalog {
        services: vec![api.clone()],
        workloads: vec![],
    };
    c.validate().unwrap();
    // The virtual IP answers on the service port, a pod on the app port.
    assert!(c.service_at("10.96.0.10:80".parse().unwrap()).is_some());
    assert!(c.service_at("10.96.0.10:8080".parse().unwrap()).is_none());
    assert!(c.service_at("10.0.0.3:8080".parse().unwrap()).is_some());
    assert!(c.service_at("10.0.0.3:80".parse().unwrap()).is_none());
    // Catalog files may carry the mapping; without it a port is its own target.
    let json = serde_json::to_string(&c).unwrap();
    assert!(json.contains(r#""target_ports":{"80":8080}"#), "{json}");
    assert_eq!(Catalog::from_json(&json).unwrap(), c);

    for (bad, why) in [
        (
            BTreeMap::from([(81, 8080)]),
            "81 is not one of the service's ports",
        ),
        (BTreeMap::from([(80, 0)]), "port 80 targets port 0"),
    ] {
        let mut s = api.clone();
        s.target_ports = bad;
        let e = Catalog {
            services: vec![s],
            workloads: vec![],
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains(why), "{e}");
    }
}

#[test]
fn pod_names_are_dns_subdomains_up_to_253_characters() {
    let with_name = |name: &str| {
        let mut w = web();
        w.name = name.into();
        Catalog {
            services: vec![api()],
            workloads: vec![w],
        }
        .validate()
    };
    // The longest Kubernetes pod name: four labels, 253 characters.
    let longest = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    assert_eq!(longest.len(), 253);
    with_name(&longest).unwrap();
    with_name(&"a".repeat(64)).unwrap();
    with_name("web-0.v1").unwrap();
    let e = with_name(&format!("{longest}e")).unwrap_err().to_string();
    assert!(
        e.contains("workload name") && e.contains("at most 253"),
        "{e}"
    );
    let e = with_name("web..0").unwrap_err().to_string();
    assert!(
        e.contains("workload name") && e.contains("\"web..0\""),
        "{e}"
    );
    // Namespaces stay DNS labels.
    let mut w = web();
    w.namespace = "a".repeat(64);
    let e = Catalog {
        services: vec![],
        workloads: vec![w],
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(e.contains("namespace") && e.contains("1-63"), "{e}");
}
