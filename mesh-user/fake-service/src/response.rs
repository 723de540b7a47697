//! fake-service's response document.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The JSON fake-service answers with, field for field (same names, order and omissions:
/// everything but `code` is left out when empty).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The service's `NAME`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The request URI as received, or for an upstream entry the configured upstream URI.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uri: String,
    #[serde(default, rename = "type", skip_serializing_if = "String::is_empty")]
    /// The protocol of the answering service, `"HTTP"` here (JSON `type`).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    /// The answering service's non-loopback IPv4 addresses, dotted quads.
    pub ip_addresses: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    /// Part of fake-service's document; this twin never fills it (so it is always omitted),
    /// but keeps it when parsing an upstream's answer.
    pub path: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// When the request arrived, UTC, `YYYY-MM-DDTHH:MM:SS.ffffff` (microseconds, no zone).
    pub start_time: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// When the answer was ready, in the form of `start_time`.
    pub end_time: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// How long the request took, as a Go duration string (`1.5ms`, `2.000001s`).
    pub duration: String,
    /// For an upstream entry: the upstream's response headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// For an upstream entry: the cookies the upstream set, name → value.
    pub cookies: BTreeMap<String, String>,
    /// `MESSAGE`: a JSON string, or the JSON document when the message starts with `{`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    /// The answers of the `UPSTREAM_URIS` calls, by upstream URI; each a document of this
    /// shape (with `error` when the call failed).
    pub upstream_calls: BTreeMap<String, Response>,
    /// The HTTP status (for an upstream entry: the status received, -1 when none was).
    #[serde(default)]
    pub code: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    /// Why the request failed: an injected error, or for an upstream entry what went wrong
    /// with the call.
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
    ///
    /// # Errors
    ///
    /// `data` is not JSON, or a known field has the wrong type.
    pub fn from_json(data: &[u8]) -> Result<Response, serde_json::Error> {
        serde_json::from_slice(data)
    }
}
