//! Upstream calls: one plain HTTP/1.1 request per connection, as fake-service's client with
//! keep-alives off.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::response::Response;

/// Upstream answers larger than this are refused.
const MAX_BODY: usize = 16 << 20;

/// What the upstream call takes from the inbound request.
pub(super) struct Inbound {
    /// The inbound path (without query).
    pub path: String,
    pub headers: HeaderMap,
}

pub(super) struct CallOptions {
    pub append_request: bool,
    /// Zero: no timeout.
    pub timeout: Duration,
    /// `Some`: POST this body.
    pub body: Option<String>,
}

/// `http://authority[path][?query]`, split without normalising (fake-service appends the
/// inbound path to the raw upstream path).
struct HttpUri<'a> {
    authority: &'a str,
    path: &'a str,
    query: Option<&'a str>,
}

fn split_http_uri(uri: &str) -> Option<HttpUri<'_>> {
    let rest = uri.strip_prefix("http://")?;
    let rest = rest.split('#').next().unwrap_or_default();
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let (path, query) = match tail.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (tail, None),
    };
    Some(HttpUri {
        authority,
        path,
        query,
    })
}

/// Host and port of an authority (`host`, `host:port`, `[v6]:port`).
fn host_port(authority: &str) -> Option<(&str, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 80,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host, port.parse().ok()?)),
        None => Some((authority, 80)),
    }
}

/// Go's wording for common socket errors.
fn os_error_text(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".into(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".into(),
        io::ErrorKind::TimedOut => "i/o timeout".into(),
        io::ErrorKind::HostUnreachable => "no route to host".into(),
        io::ErrorKind::NetworkUnreachable => "network is unreachable".into(),
        io::ErrorKind::UnexpectedEof => "EOF".into(),
        _ => e.to_string(),
    }
}

/// Go's canonical header key: `content-type` → `Content-Type`.
fn canonical_header(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut upper = true;
    for c in name.chars() {
        out.push(if upper {
            c.to_ascii_uppercase()
        } else {
            c.to_ascii_lowercase()
        });
        upper = c == '-';
    }
    out
}

/// Headers that describe the inbound connection or body, never copied upstream.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "host"
            | "content-length"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "upgrade"
    )
}

fn failed(uri: &str, code: i64, error: String) -> (Response, bool) {
    (
        Response {
            uri: uri.to_string(),
            code,
            error,
            ..Response::default()
        },
        true,
    )
}

/// Calls one upstream; returns its entry for `upstream_calls` and whether the call failed.
pub(super) async fn call(uri: &str, inbound: &Inbound, opts: &CallOptions) -> (Response, bool) {
    if uri.starts_with("https://") {
        return failed(
            uri,
            -1,
            "Error communicating with upstream service: https upstreams are not supported by \
             the built-in fake-service twin (the mesh provides mTLS)"
                .into(),
        );
    }
    if !uri.starts_with("http://") {
        return failed(
            uri,
            -1,
            format!(
                "Error communicating with upstream service: {uri}: gRPC upstreams are not \
                 supported by the built-in fake-service twin"
            ),
        );
    }
    let Some(parsed) = split_http_uri(uri) else {
        return failed(
            uri,
            -1,
            format!("Error communicating with upstream service: parse {uri:?}: invalid URL"),
        );
    };
    let path = if opts.append_request {
        format!("{}{}", parsed.path, inbound.path)
    } else {
        parsed.path.to_string()
    };
    let query = parsed.query.map(|q| format!("?{q}")).unwrap_or_default();
    let url = format!("http://{}{path}{query}", parsed.authority);
    let target = format!("{}{query}", if path.is_empty() { "/" } else { &path });
    let method = if opts.body.is_some() {
        Method::POST
    } else {
        Method::GET
    };
    let op = if opts.body.is_some() { "Post" } else { "Get" };

    let exchange = exchange(&parsed, &target, method, inbound, opts);
    let outcome = if opts.timeout.is_zero() {
        exchange.await
    } else {
        match tokio::time::timeout(opts.timeout, exchange).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::Transport(
                "context deadline exceeded (Client.Timeout exceeded while awaiting headers)".into(),
            )),
        }
    };
    match outcome {
        Err(Failure::Transport(message)) => failed(
            uri,
            -1,
            format!("Error communicating with upstream service: {op} {url:?}: {message}"),
        ),
        Err(Failure::Body { status, message }) => failed(
            uri,
            i64::from(status),
            format!("Error reading response body: {message}"),
        ),
        Ok((status, headers, body)) => {
            let mut entry = match Response::from_json(&body) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(upstream = %uri, error = %e, "fake-service twin: unable to read response JSON");
                    Response::default()
                }
            };
            entry.uri = uri.to_string();
            entry.code = i64::from(status);
            entry.cookies = cookies(&headers);
            entry.headers = header_map(&headers);
            let failed = status != 200;
            if failed {
                entry.error = format!(
                    "Error processing upstream request: {url}, expected code 200, got {status}"
                );
            }
            (entry, failed)
        }
    }
}

enum Failure {
    /// No usable answer (connection, protocol, timeout).
    Transport(String),
    /// An answer whose body could not be read.
    Body { status: u16, message: String },
}

async fn connect(authority: &str) -> Result<TcpStream, Failure> {
    let Some((host, port)) = host_port(authority) else {
        return Err(Failure::Transport(format!(
            "dial tcp: address {authority}: invalid port"
        )));
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| Failure::Transport(format!("dial tcp: lookup {host}: {e}")))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some((addr, e)),
        }
    }
    Err(Failure::Transport(match last {
        Some((addr, e)) => format!("dial tcp {addr}: connect: {}", os_error_text(&e)),
        None => format!("dial tcp: lookup {host}: no such host"),
    }))
}

type Answer = (u16, HeaderMap, Bytes);

async fn exchange(
    uri: &HttpUri<'_>,
    target: &str,
    method: Method,
    inbound: &Inbound,
    opts: &CallOptions,
) -> Result<Answer, Failure> {
    let transport = |e: String| Failure::Transport(e);
    let body = Bytes::from(opts.body.clone().unwrap_or_default());
    let mut builder = Request::builder().method(method).uri(target);
    if let Some(headers) = builder.headers_mut() {
        if opts.append_request {
            for (name, value) in &inbound.headers {
                if !hop_by_hop(name) && !headers.contains_key(name) {
                    headers.append(name.clone(), value.clone());
                }
            }
        }
        let host = HeaderValue::from_str(uri.authority)
            .map_err(|e| transport(format!("invalid host: {e}")))?;
        headers.insert(HOST, host);
        headers.insert(CONNECTION, HeaderValue::from_static("close"));
        if opts.body.is_some() {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
    }
    let request = builder
        .body(Full::new(body))
        .map_err(|e| transport(format!("invalid request: {e}")))?;

    let stream = connect(uri.authority).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| transport(hyper_error_text(&e)))?;
    // The connection task ends when the server closes (Connection: close) or when dropped here.
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let _abort = AbortOnDrop(driver);

    let response = sender
        .send_request(request)
        .await
        .map_err(|e| transport(hyper_error_text(&e)))?;
    let status = response.status().as_u16();
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, MAX_BODY)
        .collect()
        .await
        .map_err(|e| Failure::Body {
            status,
            message: e.to_string(),
        })?
        .to_bytes();
    Ok((status, parts.headers, body))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn hyper_error_text(e: &hyper::Error) -> String {
    if e.is_incomplete_message() {
        return "EOF".into();
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return format!("read: {}", os_error_text(io));
        }
        source = s.source();
    }
    e.to_string()
}

fn header_map(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in headers {
        out.entry(canonical_header(name.as_str()))
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    out.into_iter().map(|(k, v)| (k, v.join(","))).collect()
}

fn cookies(headers: &HeaderMap) -> BTreeMap<String, String> {
    headers
        .get_all(hyper::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let pair = v.split(';').next()?.trim();
            let (name, value) = pair.split_once('=')?;
            let name = name.trim();
            (!name.is_empty())
                .then(|| (name.to_string(), value.trim().trim_matches('"').to_string()))
        })
        .collect()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn uri_splitting_keeps_the_raw_path() {
        let u = split_http_uri("http://api:9091").unwrap();
        assert_eq!((u.authority, u.path, u.query), ("api:9091", "", None));
        let u = split_http_uri("http://127.0.0.1:9091/v1/x?a=b#frag").unwrap();
        assert_eq!(
            (u.authority, u.path, u.query),
            ("127.0.0.1:9091", "/v1/x", Some("a=b"))
        );
        assert!(split_http_uri("http://").is_none());
        assert!(split_http_uri("http://user@host/").is_none());
        assert_eq!(host_port("[::1]:80"), Some(("::1", 80)));
        assert_eq!(host_port("api"), Some(("api", 80)));
        assert_eq!(host_port("api:x"), None);
        assert_eq!(canonical_header("x-request-id"), "X-Request-Id");
    }
}
