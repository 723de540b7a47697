//! `consul.hashicorp.com/connect-service-upstreams`: every entry form, with named ports.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::k8s::{parse_upstreams, Container, ContainerPort, Protocol, UpstreamSyntax};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Ok(annotation) = std::str::from_utf8(rest) else {
        return;
    };
    let containers = vec![Container {
        name: "app".into(),
        image: "nicholasjackson/fake-service:v0.26.2".into(),
        command: Vec::new(),
        args: Vec::new(),
        env: Vec::new(),
        ports: vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: 9091,
                protocol: Protocol::Tcp,
            },
            ContainerPort {
                name: Some("grpc".into()),
                container_port: 9092,
                protocol: Protocol::Tcp,
            },
        ],
        run_as_user: None,
        run_as_group: None,
    }];
    let syntax = UpstreamSyntax {
        consul_namespaces: mode & 1 == 1,
        consul_partitions: mode & 2 == 2,
    };
    if let Ok(upstreams) = parse_upstreams(annotation, &containers, syntax) {
        // What the parser accepts is usable: a port in 1-65535, names without ':' or blanks.
        assert!(upstreams.len() <= annotation.split(',').count());
        for u in &upstreams {
            assert_ne!(u.bind_port, 0, "{annotation:?}");
            assert!(!u.service.is_empty(), "{annotation:?}");
            for part in [&u.namespace, &u.partition, &u.peer, &u.datacenter]
                .into_iter()
                .flatten()
            {
                assert!(
                    !part.is_empty() && !part.contains(':') && !part.contains(char::is_whitespace),
                    "{annotation:?} gave {u:?}"
                );
            }
            // What is routable stays in this datacenter, partition and loopback, reaches a
            // service (never a prepared query) and names no other port.
            if u.check_routable("dc1").is_ok() {
                assert!(u.peer.is_none(), "{annotation:?} gave {u:?}");
                assert!(u.destination_port.is_none(), "{annotation:?} gave {u:?}");
                assert!(
                    u.partition.as_deref().is_none_or(|p| p == "default"),
                    "{annotation:?} gave {u:?}"
                );
                let c = u.to_catalog("default", "dc1").expect("a routable upstream");
                assert_eq!(c.datacenter, "dc1", "{annotation:?} gave {u:?}");
            }
            let _ = u.to_catalog("default", "dc1");
        }
    }
});
