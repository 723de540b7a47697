//! Two nodes on one machine (`mesh_kit::cluster`): pods on either node reach each other across
//! the link between the nodes.

use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_kit::cluster::Cluster;
use mesh_kit::{reach, spawn_probe, v4};

#[test]
fn cluster_pods_reach_each_other_across_the_node_link_and_everything_goes_with_it() -> Result<()> {
    let (names, cgroups) = {
        let mut cluster = Cluster::new()?;
        let a = cluster.add_pod(1, "a")?;
        let b = cluster.add_pod(2, "b")?;
        let a2 = cluster.add_pod(1, "a2")?;
        ensure!(a.ip.to_string() == "10.91.1.2" && a2.ip.to_string() == "10.91.1.3");
        ensure!(b.ip.to_string() == "10.91.2.2");
        for (pod, reply) in [(&b, "from-b"), (&a2, "from-a2")] {
            let mut server = spawn_probe(
                &pod.netns_path,
                &pod.cgroup,
                &["--blocking", "serve", &format!("{}:8080", pod.ip), reply],
            )?;
            let mut line = String::new();
            std::io::BufRead::read_line(
                &mut std::io::BufReader::new(server.stdout.take().unwrap()),
                &mut line,
            )?;
            ensure!(line.trim() == "listening", "server said {line:?}");
            cluster.keep(server);
        }
        // Across the link, and on the same bridge.
        ensure!(reach(&a, v4(b.ip, 8080))?.map_err(|e| anyhow::anyhow!("{e}"))? == "from-b");
        ensure!(reach(&a, v4(a2.ip, 8080))?.map_err(|e| anyhow::anyhow!("{e}"))? == "from-a2");
        // The nodes' gateways answer from the pods' side.
        let gw = cluster.node(2).gateway();
        let refused = reach(&a, v4(gw, 9))?;
        ensure!(
            refused
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
            "node 2's gateway should refuse port 9, got {refused:?}"
        );
        let names: Vec<_> = cluster
            .nodes
            .iter()
            .flat_map(|n| {
                std::iter::once(n.netns_name.clone())
                    .chain(n.pods.iter().map(|p| p.netns_name.clone()))
            })
            .collect();
        let cgroups: Vec<_> = cluster
            .nodes
            .iter()
            .map(|n| n.mesh_cgroup.clone())
            .collect();
        (names, cgroups)
    };
    std::thread::sleep(Duration::from_millis(100));
    for name in names {
        ensure!(
            !std::path::Path::new("/run/netns").join(&name).exists(),
            "{name} is left"
        );
    }
    for cg in cgroups {
        ensure!(!cg.exists(), "{} is left", cg.display());
    }
    Ok(())
}
