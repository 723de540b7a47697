//! The serde form of the modelled kinds: lenient about unknown fields and `null`s, strict about
//! types.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, IgnoredAny, Visitor};
use serde::{Deserialize, Deserializer};

/// `null` reads as the default, as Kubernetes treats it.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawMeta {
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
pub(in crate::k8s) struct RawNamespace {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
}

/// Nothing of a ServiceAccount but its name (read before) matters locally.
#[derive(Deserialize)]
pub(in crate::k8s) struct RawServiceAccount {}

#[derive(Deserialize)]
pub(in crate::k8s) struct RawService {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: RawServiceSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawServiceSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<RawServicePort>,
    #[serde(default, deserialize_with = "nullable")]
    pub selector: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: i64,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    #[serde(default)]
    pub protocol: Option<String>,
}

/// Kubernetes' IntOrString.
pub(in crate::k8s) enum IntOrString {
    Int(i64),
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
pub(in crate::k8s) struct RawDeployment {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
    pub spec: RawDeploymentSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawDeploymentSpec {
    #[serde(default)]
    pub replicas: Option<i64>,
    #[serde(default)]
    pub selector: Option<RawLabelSelector>,
    pub template: RawPodTemplate,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawLabelSelector {
    #[serde(default, deserialize_with = "nullable")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub match_expressions: Vec<RawSelectorRequirement>,
}

#[derive(Deserialize)]
pub(in crate::k8s) struct RawSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default, deserialize_with = "nullable")]
    pub values: Vec<String>,
}

#[derive(Deserialize)]
pub(in crate::k8s) struct RawPodTemplate {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: RawPodSpec,
}

#[derive(Deserialize)]
pub(in crate::k8s) struct RawPod {
    #[serde(default, deserialize_with = "nullable")]
    pub metadata: RawMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: RawPodSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawPodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub containers: Vec<RawContainer>,
    #[serde(default, deserialize_with = "nullable")]
    pub init_containers: Vec<IgnoredAny>,
    #[serde(default, deserialize_with = "nullable")]
    pub security_context: RawSecurityContext,
}

/// The parts of a pod's or container's `securityContext` the local runner honours.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawSecurityContext {
    #[serde(default)]
    pub run_as_user: Option<i64>,
    #[serde(default)]
    pub run_as_group: Option<i64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawContainer {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub command: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub args: Vec<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub env: Vec<RawEnvVar>,
    #[serde(default, deserialize_with = "nullable")]
    pub ports: Vec<RawContainerPort>,
    #[serde(default, deserialize_with = "nullable")]
    pub security_context: RawSecurityContext,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawEnvVar {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub value_from: Option<RawEnvVarSource>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawEnvVarSource {
    #[serde(default)]
    pub field_ref: Option<RawFieldRef>,
    #[serde(default)]
    pub secret_key_ref: Option<IgnoredAny>,
    #[serde(default)]
    pub config_map_key_ref: Option<IgnoredAny>,
    #[serde(default)]
    pub resource_field_ref: Option<IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawFieldRef {
    pub field_path: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(in crate::k8s) struct RawContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: i64,
    #[serde(default)]
    pub protocol: Option<String>,
}
