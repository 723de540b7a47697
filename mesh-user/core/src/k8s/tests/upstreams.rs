//! The upstream annotation grammar.

use super::*;

const OSS: UpstreamSyntax = UpstreamSyntax {
    consul_namespaces: false,
    consul_partitions: false,
};
const ENT: UpstreamSyntax = UpstreamSyntax {
    consul_namespaces: true,
    consul_partitions: true,
};

fn up(raw: &str, syntax: UpstreamSyntax) -> Upstream {
    parse_upstream(raw, &[], syntax).unwrap_or_else(|e| panic!("{raw}: {e}"))
}

#[test]
fn upstream_forms() {
    let d = UpstreamSyntax::default();
    assert_eq!(sndp(&up("api:9091", d)), ("api", None, None, 9091));
    assert_eq!(
        sndp(&up("api:9091:dc2", d)),
        ("api", None, Some("dc2"), 9091)
    );
    assert_eq!(
        sndp(&up("api.payments:9091", d)),
        ("api", Some("payments"), None, 9091)
    );
    assert_eq!(
        sndp(&up("api.payments:9091:dc2", d)),
        ("api", Some("payments"), Some("dc2"), 9091)
    );
    let u = up("api.payments.part1:9091", ENT);
    assert_eq!(sndp(&u), ("api", Some("payments"), None, 9091));
    assert_eq!(u.partition.as_deref(), Some("part1"));
    // Labelled forms.
    assert_eq!(sndp(&up("api.svc:9091", d)), ("api", None, None, 9091));
    assert_eq!(
        sndp(&up("api.svc.payments.ns:9091", d)),
        ("api", Some("payments"), None, 9091)
    );
    assert_eq!(
        sndp(&up("api.svc.payments.ns.dc2.dc:9091", d)),
        ("api", Some("payments"), Some("dc2"), 9091)
    );
    let u = up("api.svc.payments.ns.peer1.peer:9091", d);
    assert_eq!(
        (u.peer.as_deref(), u.namespace.as_deref()),
        (Some("peer1"), Some("payments"))
    );
    let u = up("api.svc.payments.ns.part1.ap:9091", ENT);
    assert_eq!(u.partition.as_deref(), Some("part1"));
    // Without Consul namespaces: dots are part of the name, labelled forms take dc/peer only.
    assert_eq!(sndp(&up("api.v1:9091", OSS)), ("api.v1", None, None, 9091));
    assert_eq!(
        sndp(&up("api.svc.dc2.dc:9091", OSS)),
        ("api", None, Some("dc2"), 9091)
    );
    assert_eq!(
        up("api.svc.peer1.peer:9091", OSS).peer.as_deref(),
        Some("peer1")
    );
    // Options (newer consul-k8s).
    let u = up(
        "api:9091:dc2?destination_port=grpc&mesh_gateway_mode=local",
        d,
    );
    assert_eq!(u.datacenter.as_deref(), Some("dc2"));
    assert_eq!(u.destination_port.as_deref(), Some("grpc"));
    assert_eq!(u.mesh_gateway_mode, Some(MeshGatewayMode::Local));
    let u = up("api:9091:local_bind_address=127.0.0.2;dc=dc3", d);
    assert_eq!(u.local_bind_address.as_deref(), Some("127.0.0.2"));
    assert_eq!(u.datacenter.as_deref(), Some("dc3"));
    assert_eq!(
        up("api.svc:9091:grpc", d).destination_port.as_deref(),
        Some("grpc")
    );
    // Prepared queries, port syntax.
    let u = up("prepared_query:nearest-api:9093", d);
    assert_eq!(
        (u.destination_type, u.service.as_str(), u.bind_port),
        (DestinationType::PreparedQuery, "nearest-api", 9093)
    );
    assert_eq!(up("api:0x2383", d).bind_port, 9091);
    assert_eq!(up(" api : 9091 ", d).service, "api");
}

#[test]
fn upstream_lists() {
    let list = parse_upstreams(
        "api:9091, db.data:5432:dc2 ,cache.svc.infra.ns:6379",
        &[],
        UpstreamSyntax::default(),
    )
    .unwrap();
    let got: Vec<_> = list.iter().map(sndp).collect();
    assert_eq!(
        got,
        [
            ("api", None, None, 9091),
            ("db", Some("data"), Some("dc2"), 5432),
            ("cache", Some("infra"), None, 6379)
        ]
    );
    assert!(parse_upstreams("", &[], UpstreamSyntax::default())
        .unwrap()
        .is_empty());
}

#[test]
fn upstream_port_may_name_a_container_port() {
    let containers = vec![Container {
        name: "app".into(),
        image: "x".into(),
        command: vec![],
        args: vec![],
        env: vec![],
        ports: vec![ContainerPort {
            name: Some("api-port".into()),
            container_port: 9191,
            protocol: Protocol::Tcp,
        }],
        run_as_user: None,
        run_as_group: None,
    }];
    let u = parse_upstream("api:api-port", &containers, UpstreamSyntax::default()).unwrap();
    assert_eq!(u.bind_port, 9191);
}

#[test]
fn malformed_upstreams_are_refused() {
    let d = UpstreamSyntax::default();
    let cases: &[(&str, UpstreamSyntax, &str)] = &[
        ("api", d, "upstream structured incorrectly: api"),
        (
            "api:abc",
            d,
            "invalid upstream local bind port \"abc\" in \"api:abc\"",
        ),
        (
            "api:",
            d,
            "invalid upstream local bind port \"\" in \"api:\"",
        ),
        (
            "api:0",
            d,
            "invalid upstream local bind port \"0\" in \"api:0\"",
        ),
        (
            "api:-1",
            d,
            "invalid upstream local bind port \"-1\" in \"api:-1\"",
        ),
        (
            "api:70000",
            d,
            "invalid upstream local bind port \"70000\" in \"api:70000\"",
        ),
        (
            "api:09091",
            d,
            "invalid upstream local bind port \"09091\" in \"api:09091\"",
        ),
        (":9091", d, "upstream structured incorrectly: :9091"),
        (
            "api:9091:dc1:extra",
            d,
            "upstream structured incorrectly: api:9091:dc1:extra",
        ),
        (
            "api..x:9091",
            ENT,
            "upstream structured incorrectly: api..x:9091",
        ),
        // Labelled forms with a wrong or missing label.
        (
            "api.svc.payments.namespace:9091",
            d,
            "upstream structured incorrectly: api.svc.payments.namespace:9091",
        ),
        (
            "api.svc.payments:9091",
            d,
            "upstream structured incorrectly: api.svc.payments:9091",
        ),
        (
            "api.svc.payments.ns.dc2.datacenter:9091",
            d,
            "upstream structured incorrectly: api.svc.payments.ns.dc2.datacenter:9091",
        ),
        (
            "api.svc.peer1.peer:9091",
            d,
            "upstream structured incorrectly: api.svc.peer1.peer:9091",
        ),
        (
            "api.svc.payments.ns:9091",
            OSS,
            "upstream structured incorrectly: api.svc.payments.ns:9091",
        ),
        (
            "api.svc.part1.ap:9091",
            OSS,
            "upstream structured incorrectly: api.svc.part1.ap:9091",
        ),
        (".svc:9091", d, "upstream structured incorrectly: .svc:9091"),
        (
            "api.svc.ns1.ns.dc2.dc:9091:dc=dc3",
            d,
            "upstream structured incorrectly: api.svc.ns1.ns.dc2.dc:9091:dc=dc3",
        ),
        ("api", d, "upstream structured incorrectly: api"),
        (
            "prepared_query:q",
            d,
            "upstream structured incorrectly: prepared_query:q",
        ),
        (
            "prepared_query::9091",
            d,
            "upstream structured incorrectly: prepared_query::9091",
        ),
        (
            "api:9091:mesh_gateway_mode=far",
            d,
            "invalid upstream mesh gateway mode \"far\" in \"api:9091:mesh_gateway_mode=far\"",
        ),
        (
            "api:9091:colour=blue",
            d,
            "unsupported upstream option \"colour\" in \"api:9091:colour=blue\"",
        ),
        (
            "api:9091:dc=%zz",
            d,
            "upstream structured incorrectly: api:9091:dc=%zz",
        ),
    ];
    for (raw, syntax, want) in cases {
        match parse_upstream(raw, &[], *syntax) {
            Ok(u) => panic!("{raw}: accepted as {u:?}"),
            Err(e) => assert_eq!(e.to_string(), *want, "{raw}"),
        }
    }
    // Empty entries, in the middle or trailing.
    for raw in ["api:9091,,web:9090", "api:9091,", ",api:9091", " "] {
        assert_eq!(
            parse_upstreams(raw, &[], d).unwrap_err().to_string(),
            "upstream structured incorrectly: ",
            "{raw:?}"
        );
    }
    assert_eq!(
        parse_upstreams("api:9091, web", &[], d)
            .unwrap_err()
            .to_string(),
        "upstream structured incorrectly: web"
    );
}

#[test]
fn a_malformed_upstream_refuses_the_whole_manifest() {
    let text = format!(
        "{}---{}---{}",
        service("api", 9091),
        deployment("api", 1, INJECT),
        deployment(
            "web",
            1,
            &format!("{INJECT}\n        consul.hashicorp.com/connect-service-upstreams: \"api:9091, api:abc\"")
        )
    );
    assert_eq!(
        parse(&text).unwrap_err().to_string(),
        "Deployment default/web: spec.template.metadata.annotations.consul.hashicorp.com/connect-service-upstreams: \
         invalid upstream local bind port \"abc\" in \"api:abc\""
    );
}

#[test]
fn upstreams_convert_to_the_catalog_form() {
    let u = up("api:9091", UpstreamSyntax::default());
    let c = u.to_catalog("shop", "dc1").unwrap();
    assert_eq!(
        (
            c.service.as_str(),
            c.namespace.as_str(),
            c.datacenter.as_str(),
            c.bind_port
        ),
        ("api", "shop", "dc1", 9091)
    );
    let c = up("api.payments:9091:dc2", UpstreamSyntax::default())
        .to_catalog("shop", "dc1")
        .unwrap();
    assert_eq!(
        (c.namespace.as_str(), c.datacenter.as_str()),
        ("payments", "dc2")
    );
    assert!(up("prepared_query:q:1", UpstreamSyntax::default())
        .to_catalog("shop", "dc1")
        .is_none());
}
