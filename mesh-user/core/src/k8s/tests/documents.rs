//! Documents, kinds, namespaces.

use super::*;

#[test]
fn multi_document_with_separators_and_empty_documents() {
    let text = format!(
        "---\n# leading comment\n---\n{}\n---\n---\n# only a comment\n---\n{}\n...\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: web\n---\n",
        service("web", 9090),
        deployment("web", 1, "        a: b")
    );
    let m = parse(&text).unwrap();
    let kinds: Vec<&str> = m.objects().map(Object::kind).collect();
    assert_eq!(kinds, ["Service", "Deployment", "ServiceAccount"]);
    assert!(m.ignored().is_empty());
    assert!(parse("").unwrap().objects().next().is_none());
    assert!(parse("---\n---\n").unwrap().objects().next().is_none());
}

#[test]
fn other_kinds_are_ignored_with_a_warning() {
    let text = r#"
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: api
spec:
  destination:
    name: api
  sources:
    - name: web
      action: allow
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: shop
data:
  a: b
---
apiVersion: v1
kind: Namespace
metadata:
  name: shop
"#;
    let m = parse(text).unwrap();
    // consul-k8s's ServiceIntentions is modelled; the ConfigMap is not.
    assert_eq!(m.objects().count(), 2);
    let ignored: Vec<(&str, Option<&str>)> = m
        .ignored()
        .iter()
        .map(|o| (o.kind.as_str(), o.name.as_deref()))
        .collect();
    assert_eq!(ignored, [("ConfigMap", Some("settings"))]);
    assert_eq!(m.ignored()[0].namespace.as_deref(), Some("shop"));
    assert_eq!(m.warnings().len(), 1);
    assert!(m.warnings()[0].contains("ConfigMap"), "{:?}", m.warnings());
}

#[test]
fn list_kind_is_flattened() {
    let text = r#"
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: ServiceAccount
    metadata:
      name: a
  - apiVersion: v1
    kind: ServiceAccount
    metadata:
      name: b
"#;
    let names: Vec<String> = parse(text)
        .unwrap()
        .objects()
        .map(|o| o.name().to_string())
        .collect();
    assert_eq!(names, ["a", "b"]);
}

#[test]
fn documents_that_are_not_objects_are_refused() {
    assert_eq!(
        err("- a\n- b\n"),
        "document 1: not a Kubernetes object (expected a mapping with apiVersion and kind)"
    );
    assert_eq!(
        err("---\n---\nkind: Service\nmetadata:\n  name: a\n"),
        "document 2: apiVersion is required"
    );
    assert_eq!(
        err("apiVersion: v1\nkind: Service\nspec: {}\n"),
        "document 1: Service: metadata.name is required"
    );
    assert_eq!(
        err("apiVersion: extensions/v1beta1\nkind: Deployment\nmetadata:\n  name: web\n"),
        "Deployment default/web: apiVersion \"extensions/v1beta1\" is not supported (want \"apps/v1\")"
    );
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: a\n");
    assert!(e.starts_with("document 1: YAML: "), "{e}");
    let e =
        err("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n---\nkey: [unclosed\n");
    assert!(e.starts_with("document 2: YAML: "), "{e}");
}

#[test]
fn namespaces_from_metadata_and_override() {
    let text = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: a
  namespace: shop
---
apiVersion: v1
kind: ServiceAccount
metadata:
  name: b
"#;
    let m = parse(text).unwrap();
    let placed: Vec<(String, Option<String>)> = m
        .objects()
        .map(|o| (o.name().to_string(), o.namespace().map(str::to_string)))
        .collect();
    assert_eq!(
        placed,
        [
            ("shop".into(), None),
            ("a".into(), Some("shop".into())),
            ("b".into(), Some("default".into()))
        ]
    );
    let s = DesiredState::build(&[m]).unwrap();
    assert_eq!(
        s.namespaces.iter().map(String::as_str).collect::<Vec<_>>(),
        ["default", "shop"]
    );

    // -n shop: objects without a namespace go there; an object naming shop is fine.
    let opts = ParseOptions {
        namespace: Some("shop".into()),
        ..ParseOptions::default()
    };
    let m = Manifest::parse(text, &opts).unwrap();
    assert!(m
        .objects()
        .filter(|o| o.kind() == "ServiceAccount")
        .all(|o| o.namespace() == Some("shop")));

    // -n other: the object naming shop is refused as kubectl does.
    let opts = ParseOptions {
        namespace: Some("other".into()),
        ..ParseOptions::default()
    };
    let e = Manifest::parse(text, &opts).unwrap_err().to_string();
    assert_eq!(
        e,
        "ServiceAccount shop/a: the namespace from the provided object \"shop\" does not match \
         the namespace \"other\". You must pass '--namespace=shop' to perform this operation."
    );
    let opts = ParseOptions {
        namespace: Some("Bad_NS".into()),
        ..ParseOptions::default()
    };
    assert!(matches!(
        Manifest::parse(text, &opts),
        Err(Error::Options(_))
    ));
}

#[test]
fn undeclared_namespaces_are_kept_with_a_warning() {
    let s = state("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: a\n  namespace: dev\n");
    assert!(s.namespaces.contains("dev"));
    assert!(s
        .warnings
        .iter()
        .any(|w| w.contains("namespace dev is used but not declared")));
}
