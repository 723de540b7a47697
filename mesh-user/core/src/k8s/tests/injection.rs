//! Injection and identity.

use super::*;

#[test]
fn inject_annotation_on_and_off() {
    let on = state(&format!(
        "{}---{}",
        service("web", 9090),
        deployment("web", 1, INJECT)
    ));
    assert!(on.workloads[0].mesh.is_some());
    for off in ["\"false\"", "\"0\"", "\"F\""] {
        let text = format!(
            "{}---{}",
            service("web", 9090),
            deployment(
                "web",
                1,
                &format!("        consul.hashicorp.com/connect-inject: {off}")
            )
        );
        assert!(state(&text).workloads[0].mesh.is_none(), "{off}");
    }
    assert!(
        state(&deployment("web", 1, "        other: x")).workloads[0]
            .mesh
            .is_none()
    );
    for yes in ["\"1\"", "\"True\"", "\"t\""] {
        let text = format!(
            "{}---{}",
            service("web", 9090),
            deployment(
                "web",
                1,
                &format!("        consul.hashicorp.com/connect-inject: {yes}")
            )
        );
        assert!(state(&text).workloads[0].mesh.is_some(), "{yes}");
    }
    let text = deployment(
        "web",
        1,
        "        consul.hashicorp.com/connect-inject: \"yes\"",
    );
    assert_eq!(
        err(&text),
        "Deployment default/web: spec.template.metadata.annotations.consul.hashicorp.com/connect-inject: \
         strconv.ParseBool: parsing \"yes\": invalid syntax"
    );
    // The Deployment's own annotations do not inject; the template's do.
    let text = deployment("web", 1, "        a: b").replace(
        "metadata:\n  name: web\n",
        "metadata:\n  name: web\n  annotations:\n    consul.hashicorp.com/connect-inject: \"true\"\n",
    );
    assert!(state(&text).workloads[0].mesh.is_none());
    // Never in kube-system.
    let text = format!(
        "{}---{}",
        service("web", 9090),
        deployment("web", 1, INJECT)
    )
    .replace("  name: web\n", "  name: web\n  namespace: kube-system\n");
    let s = state(&text);
    assert!(s.workloads[0].mesh.is_none());
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("ignored in namespace kube-system")));
}

#[test]
fn upstreams_are_not_parsed_without_injection() {
    let text = deployment(
        "web",
        1,
        "        consul.hashicorp.com/connect-service-upstreams: \"garbage\"",
    );
    assert!(state(&text).workloads[0].mesh.is_none());
}

#[test]
fn identity_is_the_selecting_service() {
    // The Service is named differently from the service account: consul-k8s registers the
    // Service's name, and warns about the account.
    let text = format!(
        "{}---{}",
        service("web", 9090).replace("name: web", "name: frontend"),
        deployment("web", 1, INJECT)
    );
    let s = state(&text);
    let mesh = s.workloads[0].mesh.as_ref().unwrap();
    assert_eq!(mesh.service, "frontend");
    assert_eq!(mesh.identity_source, IdentitySource::Service);
    assert!(
        s.warnings
            .iter()
            .any(|w| w
                .contains("service account name web doesn't match Consul service name frontend"))
    );
}

#[test]
fn identity_from_the_connect_service_annotation_wins() {
    let text = format!(
        "{}---{}",
        service("web", 9090),
        deployment(
            "web",
            1,
            &format!("{INJECT}\n        consul.hashicorp.com/connect-service: \" , web-v2 \"")
        )
    );
    let s = state(&text);
    let mesh = s.workloads[0].mesh.as_ref().unwrap();
    assert_eq!(mesh.service, "web-v2");
    assert_eq!(mesh.identity_source, IdentitySource::Annotation);
    let text = deployment(
        "web",
        1,
        &format!("{INJECT}\n        consul.hashicorp.com/connect-service: \"a,b\""),
    );
    assert!(err(&text).contains("multi-port pods"));
}

#[test]
fn identity_falls_back_to_the_service_account() {
    let s = state(&deployment("web", 1, INJECT));
    let mesh = s.workloads[0].mesh.as_ref().unwrap();
    assert_eq!(mesh.service, "web");
    assert_eq!(mesh.identity_source, IdentitySource::ServiceAccount);
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("no Service selects this pod")));
    // No Service and only the default account: nothing names the identity.
    let text = deployment("web", 1, INJECT).replace("      serviceAccountName: web\n", "");
    assert!(err(&text).contains("no Service selects the pod"));
}

#[test]
fn identity_needs_exactly_one_selecting_service() {
    let two = format!(
        "{}---{}---{}",
        service("web", 9090),
        service("web-admin", 9090).replace("app: web-admin", "app: web"),
        deployment("web", 1, INJECT)
    );
    assert!(err(&two).contains("selected by more than one Service (web, web-admin)"));
    // consul-k8s skips Services labelled service-ignore.
    let ignored = two.replace(
        "  name: web-admin\n",
        "  name: web-admin\n  labels:\n    consul.hashicorp.com/service-ignore: \"true\"\n",
    );
    let s = state(&ignored);
    assert_eq!(s.workloads[0].mesh.as_ref().unwrap().service, "web");
    // A Service in another namespace does not select the pod.
    let other = format!(
        "{}---{}",
        service("web", 9090).replace("  name: web\n", "  name: web\n  namespace: other\n"),
        deployment("web", 1, INJECT)
    );
    assert_eq!(
        state(&other).workloads[0]
            .mesh
            .as_ref()
            .unwrap()
            .identity_source,
        IdentitySource::ServiceAccount
    );
}

#[test]
fn excluded_inbound_ports_are_parsed_and_bad_ones_refused() {
    let text = format!(
        "{}---{}",
        service("web", 9090),
        deployment(
            "web",
            1,
            &format!(
                "{INJECT}\n        consul.hashicorp.com/transparent-proxy-exclude-inbound-ports: \"9102, 8080,,9102\""
            )
        )
    );
    let s = state(&text);
    let mesh = s.workloads[0].mesh.as_ref().expect("meshed");
    assert_eq!(mesh.exclude_inbound_ports, [8080, 9102]);
    assert!(state(&format!(
        "{}---{}",
        service("web", 9090),
        deployment("web", 1, INJECT)
    ))
    .workloads[0]
        .mesh
        .as_ref()
        .expect("meshed")
        .exclude_inbound_ports
        .is_empty());
    for bad in ["http", "0", "70000"] {
        let text = deployment(
            "web",
            1,
            &format!(
                "{INJECT}\n        consul.hashicorp.com/transparent-proxy-exclude-inbound-ports: \"{bad}\""
            ),
        );
        let e = err(&text);
        assert!(
            e.contains("consul.hashicorp.com/transparent-proxy-exclude-inbound-ports")
                && e.contains("is not a port number"),
            "{bad}: {e}"
        );
    }
}

#[test]
fn transparent_proxy_false_is_refused_naming_the_annotation() {
    // Every meshed pod's traffic is steered; the consul-k8s switch that would turn that off
    // cannot be honoured, so it is refused at apply time rather than ignored.
    let e = err(&deployment(
        "web",
        1,
        &format!("{INJECT}\n        consul.hashicorp.com/transparent-proxy: \"false\""),
    ));
    assert!(
        e.contains("consul.hashicorp.com/transparent-proxy") && e.contains("not supported"),
        "{e}"
    );
    // "true" is what the mesh does anyway.
    let s = state(&format!(
        "{}---{}",
        service("web", 9090),
        deployment(
            "web",
            1,
            &format!("{INJECT}\n        consul.hashicorp.com/transparent-proxy: \"true\"")
        )
    ));
    assert_eq!(
        s.workloads[0]
            .mesh
            .as_ref()
            .expect("meshed")
            .transparent_proxy,
        Some(true)
    );
}
