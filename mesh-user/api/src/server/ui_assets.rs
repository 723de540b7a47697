//! `/ui/`: the web UI, served from assets compiled into the binary (`mesh-user/api/ui/`:
//! plain HTML, CSS and ES modules, no build step). Every path under `/ui/` that is not an
//! asset answers the page itself, whose script routes on the path (`/ui/services`,
//! `/ui/services/<ns>/<name>`, `/ui/intentions`), as Consul's UI does; `/ui` redirects to
//! `/ui/`. The pages call the same `/v1/` API as every other client, with the token the user
//! logs in with (kept in the browser's session storage).

use axum::extract::Path as UrlPath;
use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, LOCATION};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;

/// The assets under `/ui/assets/`: name, content type, content.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/app.js"),
    ),
    (
        "api.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/api.js"),
    ),
    (
        "topology.js",
        "text/javascript; charset=utf-8",
        include_str!("../../ui/topology.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("../../ui/style.css"),
    ),
];

/// The page every UI route answers with.
const INDEX: &str = include_str!("../../ui/index.html");

/// Only this origin's scripts, styles and API; no framing (the UI holds a token).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

/// The routes of this module.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/ui", get(redirect))
        .route("/ui/", get(index))
        .route("/ui/assets/{name}", get(asset))
        .route("/ui/{*path}", get(index))
}

async fn redirect() -> Response {
    (StatusCode::MOVED_PERMANENTLY, [(LOCATION, "/ui/")]).into_response()
}

fn page(content_type: &'static str, body: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "X-Content-Type-Options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX)
}

async fn asset(UrlPath(name): UrlPath<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ty, body)) => page(ty, body),
        None => crate::Error::NotFound(format!("no such UI asset: {name}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_the_page_loads_is_served() {
        for (name, _, body) in ASSETS {
            assert!(!body.is_empty(), "{name}");
        }
        for name in ["app.js", "style.css"] {
            assert!(INDEX.contains(&format!("/ui/assets/{name}")), "{name}");
        }
        // Modules import each other by the paths served here.
        for (name, _, body) in ASSETS {
            for import in body.match_indices("from \"./").map(|(i, _)| &body[i + 8..]) {
                let file = &import[..import.find('"').unwrap_or(0)];
                assert!(
                    ASSETS.iter().any(|(n, _, _)| *n == file),
                    "{name} imports {file}, which is not served"
                );
            }
        }
    }

    /// `GET path` on `addr` with `Connection: close`: the status line and headers, the body.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        (head.to_ascii_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn the_page_and_its_assets_are_served_without_a_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::ServerConfig::new(dir.path());
        cfg.http_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
        cfg.unix_socket = None;
        let server = crate::Server::start(cfg, crate::Hooks::default())
            .await
            .unwrap();
        let addr = server.http_addr().unwrap();

        let (head, _) = get(addr, "/ui").await;
        assert!(head.starts_with("http/1.1 301"), "{head}");
        assert!(head.contains("location: /ui/"), "{head}");
        // The page, at /ui/ and at every route its script knows.
        for path in [
            "/ui/",
            "/ui/services",
            "/ui/services/default/web",
            "/ui/intentions/create",
        ] {
            let (head, body) = get(addr, path).await;
            assert!(head.starts_with("http/1.1 200"), "{path}: {head}");
            assert!(head.contains("content-type: text/html"), "{path}: {head}");
            assert!(
                head.contains("content-security-policy: default-src 'none'"),
                "{path}: {head}"
            );
            assert_eq!(body, INDEX, "{path}");
        }
        let (head, body) = get(addr, "/ui/assets/app.js").await;
        assert!(head.contains("content-type: text/javascript"), "{head}");
        assert!(body.contains("/v1/internal/ui/services"));
        let (head, _) = get(addr, "/ui/assets/style.css").await;
        assert!(head.contains("content-type: text/css"), "{head}");
        let (head, body) = get(addr, "/ui/assets/nope.js").await;
        assert!(head.starts_with("http/1.1 404"), "{head}");
        assert!(body.contains("no such UI asset: nope.js"), "{body}");
        // The API behind it still wants a token.
        let (head, _) = get(addr, "/v1/connect/intentions").await;
        assert!(head.starts_with("http/1.1 401"), "{head}");
        server.shutdown().await;
    }
}
