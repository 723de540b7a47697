//! The manifests in `examples/` (what `cargo xtask run` applies and the docs walk through) parse
//! and build into the mesh the walkthrough describes. No privileges needed.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use mesh_core::k8s::{DesiredState, Manifest, ParseOptions};

/// The `examples/` of the source tree (this crate is `tests/`, one level below the root).
fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn build(dir: &Path) -> Result<DesiredState> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.retain(|p| p.extension().is_some_and(|e| e == "yaml"));
    files.sort();
    let manifests = files
        .iter()
        .map(|p| {
            let text = std::fs::read_to_string(p)?;
            Manifest::parse(&text, &ParseOptions::default())
                .with_context(|| format!("parsing {}", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(DesiredState::build(&manifests)?)
}

fn upstream_of(state: &DesiredState, namespace: &str, name: &str) -> Vec<(String, String, u16)> {
    let w = state
        .workload(namespace, name)
        .unwrap_or_else(|| panic!("no workload {namespace}/{name}"));
    let mesh = w.mesh.as_ref().expect("the workload joins the mesh");
    mesh.upstreams
        .iter()
        .map(|u| {
            let c = u.to_catalog(namespace, "dc1").expect("a local upstream");
            (c.service, c.namespace, c.bind_port)
        })
        .collect()
}

#[test]
fn the_demo_is_web_calling_api_v1_in_one_namespace() -> Result<()> {
    let state = build(&examples())?;
    let names: Vec<_> = state.workloads.iter().map(|w| w.id()).collect();
    assert_eq!(names, ["default/api-v1-0", "default/web-0"]);
    for w in &state.workloads {
        let mesh = w.mesh.as_ref().expect("every demo pod joins the mesh");
        assert_eq!(format!("{}-0", mesh.service), w.name);
        assert!(w.containers[0]
            .image
            .starts_with("nicholasjackson/fake-service:"));
    }
    assert_eq!(
        upstream_of(&state, "default", "web-0"),
        [("api-v1".to_string(), "default".to_string(), 9091)]
    );
    assert!(upstream_of(&state, "default", "api-v1-0").is_empty());
    Ok(())
}

#[test]
fn the_namespaced_demo_puts_api_v1_in_backend() -> Result<()> {
    let state = build(&examples().join("namespaces"))?;
    assert!(state.namespaces.contains("backend"));
    assert!(state.workload("backend", "api-v1-0").is_some());
    assert_eq!(
        upstream_of(&state, "default", "web-0"),
        [("api-v1".to_string(), "backend".to_string(), 9091)]
    );
    Ok(())
}
