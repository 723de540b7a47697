//! fake-service's response document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The JSON fake-service answers with, field for field (same names, order and omissions:
/// everything but `code` is left out when empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The request URI as received, or for an upstream entry the configured upstream URI.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uri: String,
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub start_time: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub end_time: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub duration: String,
    /// For an upstream entry: the upstream's response headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub cookies: BTreeMap<String, String>,
    /// `MESSAGE`: a JSON string, or the JSON document when the message starts with `{`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub upstream_calls: BTreeMap<String, Response>,
    /// The HTTP status (for an upstream entry: the status received, -1 when none was).
    #[serde(default)]
    pub code: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl Response {
    /// Pretty JSON with a two-space indent and a final newline, as Go's `json.Encoder` with
    /// `SetIndent("", "  ")` writes it.
    pub fn to_json(&self) -> String {
        // Serializing this struct cannot fail (string keys only); keep a valid document anyway.
        let mut s = serde_json::to_string_pretty(self)
            .unwrap_or_else(|_| "{\n  \"code\": 500\n}".to_string());
        s.push('\n');
        s
    }

    /// Parses a response document (unknown fields ignored).
    pub fn from_json(data: &[u8]) -> Result<Response, serde_json::Error> {
        serde_json::from_slice(data)
    }
}
