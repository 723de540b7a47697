//! A small HTTP/1.1 client for the API, over TCP or the Unix socket: what `meshctl` uses.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use super::Error;

/// Where the API listens on TCP unless told otherwise (Consul's `127.0.0.1:8500`).
pub const DEFAULT_HTTP_ADDR: &str = "127.0.0.1:8500";
/// The environment variable that moves the API (`host:port`, `http://host:port`, or
/// `unix:///path` for a socket only), read by `meshd` and `meshctl` (Consul's
/// `CONSUL_HTTP_ADDR`).
pub const HTTP_ADDR_ENV: &str = "MESH_HTTP_ADDR";
/// The environment variable with the ACL token `meshctl` sends (Consul's `CONSUL_HTTP_TOKEN`).
pub const HTTP_TOKEN_ENV: &str = "MESH_HTTP_TOKEN";
/// The environment variable naming a file with that token (Consul's `CONSUL_HTTP_TOKEN_FILE`).
pub const HTTP_TOKEN_FILE_ENV: &str = "MESH_HTTP_TOKEN_FILE";

/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where the API is: `127.0.0.1:8500`, `http://127.0.0.1:8500` or `unix:///path/api.sock`
/// (Consul's `-http-addr` forms; `https://` is not served).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `host:port`.
    Tcp(String),
    /// A Unix socket.
    Unix(PathBuf),
}

impl FromStr for Address {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |why: &str| Error::Client(format!("invalid HTTP address {s:?}: {why}"));
        if let Some(path) = s.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(bad("no socket path after unix://"));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        if s.starts_with("https://") {
            return Err(bad("https is not served; use http:// or unix://"));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') {
            return Err(bad("expected host:port, http://host:port or unix:///path"));
        }
        match hostport.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                Ok(Address::Tcp(hostport.to_owned()))
            }
            _ => Err(bad("expected host:port, http://host:port or unix:///path")),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp(hp) => write!(f, "http://{hp}"),
            Address::Unix(p) => write!(f, "unix://{}", p.display()),
        }
    }
}

/// A response: status and body.
#[derive(Clone, Debug)]
pub struct Response {
    /// The HTTP status.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The error message of a failed request: the `Error` of the API's JSON error body, or
    /// the whole body.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("Error")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| self.text().trim().to_owned())
    }

    /// `Unexpected response code: 403 (message)`, as Consul's client words a failure.
    pub fn unexpected(&self) -> String {
        format!(
            "Unexpected response code: {} ({})",
            self.status,
            self.error_message()
        )
    }
}

/// An API client: one connection per request, token sent as `X-Consul-Token`.
#[derive(Clone)]
pub struct Client {
    address: Address,
    token: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl Client {
    /// A client for `address`, sending `token` when given.
    pub fn new(address: Address, token: Option<String>) -> Self {
        Client { address, token }
    }

    /// Where it sends requests.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Sends one request. `path` includes the query string. Any status is a response; only
    /// failing to connect or to exchange is an error.
    ///
    /// # Errors
    /// [`Error::Client`] when the agent cannot be reached or the HTTP exchange fails.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, Error> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(method, path, body))
            .await
            .map_err(|_| {
                Error::Client(format!(
                    "no answer from {} within {}s",
                    self.address,
                    REQUEST_TIMEOUT.as_secs()
                ))
            })?
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, Error> {
        let connect_err = |e: std::io::Error| {
            Error::Client(format!(
                "Error connecting to the agent at {}: {e}",
                self.address
            ))
        };
        match &self.address {
            Address::Tcp(hp) => {
                let stream = TcpStream::connect(hp.as_str()).await.map_err(connect_err)?;
                self.send(stream, hp, method, path, body).await
            }
            Address::Unix(p) => {
                let stream = UnixStream::connect(p).await.map_err(connect_err)?;
                self.send(stream, "localhost", method, path, body).await
            }
        }
    }

    async fn send<S>(
        &self,
        stream: S,
        host: &str,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let http = |e: &dyn fmt::Display| {
            Error::Client(format!("HTTP error talking to {}: {e}", self.address))
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http(&e))?;
        let driver = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, host);
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http(&e))?;
        let resp = sender.send_request(req).await.map_err(|e| http(&e))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http(&e))?
            .to_bytes()
            .to_vec();
        drop(sender);
        driver.abort();
        Ok(Response { status, body })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let p = |s: &str| s.parse::<Address>();
        assert_eq!(
            p("127.0.0.1:8500").unwrap(),
            Address::Tcp("127.0.0.1:8500".into())
        );
        assert_eq!(
            p("http://localhost:8500/").unwrap(),
            Address::Tcp("localhost:8500".into())
        );
        assert_eq!(p("[::1]:8500").unwrap(), Address::Tcp("[::1]:8500".into()));
        assert_eq!(
            p("unix:///run/mesh/api.sock").unwrap(),
            Address::Unix("/run/mesh/api.sock".into())
        );
        for bad in [
            "",
            "unix://",
            "https://x:1",
            "localhost",
            "x:port",
            "http://x:1/v1",
        ] {
            assert!(p(bad).is_err(), "{bad}");
        }
    }
}
