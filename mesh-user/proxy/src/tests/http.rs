//! Inbound HTTP/1.1 for L7 intentions: per-request decisions, Envoy's 403, keep-alive on both
//! sides, and the app connection reused.

use super::*;

/// An HTTP/1.1 app that answers every request `200` with its path as the body, keeping
/// connections alive; counts the connections it accepted.
pub(super) async fn http_app() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                loop {
                    while let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end + 4);
                        let path = head.split(' ').nth(1).unwrap_or("").to_owned();
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{path}",
                            path.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            });
        }
    });
    (port, accepted)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Sends one GET on `conn` and reads one response: (status line, body).
pub(super) async fn get(conn: &mut TcpStream, path: &str) -> (String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: api\r\n\r\n");
    conn.write_all(req.as_bytes()).await.unwrap();
    read_response(conn).await
}

/// Reads one response with a `content-length`: its status line and body.
pub(super) async fn read_response(conn: &mut TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap();
            while buf.len() < end + 4 + len {
                let n = conn.read(&mut chunk).await.unwrap();
                assert!(n > 0, "closed mid-response");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            return (head.lines().next().unwrap().to_owned(), body);
        }
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before a response");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_requests_are_decided_one_by_one_on_one_connection() {
    within(30, async {
        let env = Env::new(test_config());
        let (port, accepted) = http_app().await;
        let (api, inbound) = env.server("api", &[port]);
        let mut web = env.client("web", None);
        let from_web = env.upstream(&mut web, "api", "api", port, vec![inbound]);
        env.authz
            .l7
            .lock()
            .unwrap()
            .insert(("web".into(), "api".into()));
        let mut conn = TcpStream::connect(from_web).await.unwrap();
        let (status, body) = get(&mut conn, "/ok").await;
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "/ok"));
        let (status, body) = get(&mut conn, "/admin/users").await;
        assert_eq!(status, "HTTP/1.1 403 Forbidden");
        assert_eq!(body, "RBAC: access denied");
        // The connection stays usable after a 403, and the app connection is reused.
        let (status, body) = get(&mut conn, "/ok/again?x=1").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "/ok/again?x=1")
        );
        assert_eq!(accepted.load(SeqCst), 1, "one kept-alive app connection");
        let stats = api.stats();
        assert_eq!(stats.http_requests, 3);
        assert_eq!(stats.http_requests_denied, 1);

        // Paths are matched and forwarded normalized, as Consul's Envoy does: these tricks
        // reached a denied /admin when the raw path was matched.
        for trick in [
            "/%61dmin/users",
            "/./admin",
            "/x/../admin",
            "/\\admin",
            "//admin",
        ] {
            let (status, body) = get(&mut conn, trick).await;
            assert_eq!(
                (status.as_str(), body.as_str()),
                ("HTTP/1.1 403 Forbidden", "RBAC: access denied"),
                "{trick}"
            );
        }
        let (status, body) = get(&mut conn, "/ok/./x/../%7euser%2fa?q=%61").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 200 OK", "/ok/~user%2Fa?q=%61"),
            "the app gets the normalized path, the query as sent"
        );
        let (status, body) = get(&mut conn, "/ok%G1").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 400 Bad Request", "Bad Request: malformed path")
        );
        // A header whose value is not ASCII still counts (x-debug denies here).
        conn.write_all(b"GET /ok HTTP/1.1\r\nhost: api\r\nx-debug: \x80\xff\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = conn.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pair_that_becomes_l7_is_closed_and_reconnects_into_the_http_path() {
    within(30, async {
        let env = Env::new(test_config());
        let (port, _accepted) = http_app().await;
        let (api, inbound) = env.server("api", &[port]);
        let mut web = env.client("web", None);
        let from_web = env.upstream(&mut web, "api", "api", port, vec![inbound]);
        // L4: copied byte for byte, /admin reaches the app.
        let mut conn = TcpStream::connect(from_web).await.unwrap();
        let (status, _) = get(&mut conn, "/admin").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        env.authz
            .l7
            .lock()
            .unwrap()
            .insert(("web".into(), "api".into()));
        assert_eq!(api.reauthorize(), 1);
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest).await;
        let mut conn = TcpStream::connect(from_web).await.unwrap();
        let (status, body) = get(&mut conn, "/admin").await;
        assert_eq!(
            (status.as_str(), body.as_str()),
            ("HTTP/1.1 403 Forbidden", "RBAC: access denied")
        );
    })
    .await;
}
