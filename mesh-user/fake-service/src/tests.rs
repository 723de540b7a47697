//! The twin's tests against fake-service's documented behaviour, one real server per test. One
//! file at about 700 lines: the tests share one harness and read best next to each other.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::*;

/// A running twin on 127.0.0.1 with an ephemeral port.
struct Running {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let result = tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops");
        result.expect("server task").expect("server result");
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn start(vars: &[(&str, &str)]) -> Running {
    let mut all = vec![("LISTEN_ADDR", "127.0.0.1:0")];
    all.extend_from_slice(vars);
    let config = Config::from_env(all).expect("config");
    let server = Server::bind(config).await.expect("bind");
    let addr = server.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Running {
        addr,
        stop: Some(stop),
        task,
    }
}

/// A raw HTTP/1.1 exchange: (status, headers lower-cased, body).
async fn http_get_with(
    addr: SocketAddr,
    path: &str,
    extra_headers: &str,
) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra_headers}Connection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let raw = String::from_utf8(raw).expect("utf-8");
    let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
    let mut lines = head.lines();
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status, headers, body.to_string())
}

async fn http_get(addr: SocketAddr, path: &str) -> (u16, Response) {
    let (status, _, body) = http_get_with(addr, path, "").await;
    let resp = Response::from_json(body.as_bytes())
        .unwrap_or_else(|e| panic!("JSON answer ({e}): {body}"));
    (status, resp)
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------------

#[test]
fn env_defaults() {
    let c = Config::from_env(Vec::<(String, String)>::new()).unwrap();
    assert_eq!(c.listen_addr, "0.0.0.0:9090".parse().unwrap());
    assert_eq!(c.name, "Service");
    assert_eq!(c.message, "Hello World");
    assert!(c.upstream_uris.is_empty());
    assert_eq!(c.upstream_workers, 1);
    assert!(c.client_append_request);
    assert!(!c.server_keep_alives);
    assert_eq!(c.client_request_timeout, Duration::from_secs(30));
    assert_eq!(c.error_rate, 0.0);
    assert_eq!(c.error_code, 500);
    assert_eq!(c.rate_limit_code, 503);
    assert_eq!(
        (c.health_code, c.ready_success_code, c.ready_failure_code),
        (200, 200, 503)
    );
    // Empty values mean "default", as in fake-service.
    let c = Config::from_env([("NAME", ""), ("LISTEN_ADDR", ""), ("ERROR_CODE", "")]).unwrap();
    assert_eq!(
        (c.name.as_str(), c.listen_addr.port(), c.error_code),
        ("Service", 9090, 500)
    );
}

#[test]
fn env_values() {
    let c = Config::from_env([
        ("LISTEN_ADDR", "127.0.0.1:9091"),
        ("NAME", "api"),
        ("MESSAGE", "Response from API"),
        (
            "UPSTREAM_URIS",
            " http://localhost:9091 ,, http://localhost:9092,",
        ),
        ("UPSTREAM_WORKERS", "2"),
        ("TIMING_50_PERCENTILE", "10ms"),
        ("TIMING_VARIANCE", "10"),
        ("ERROR_RATE", "0.2"),
        ("ERROR_TYPE", "delay"),
        ("ERROR_CODE", "503"),
        ("ERROR_DELAY", "1.5s"),
        ("HTTP_CLIENT_REQUEST_TIMEOUT", "1m30s"),
        ("HTTP_CLIENT_APPEND_REQUEST", "false"),
        ("RAND_SEED", "42"),
        ("PATH", "/usr/bin"),
        ("LOG_LEVEL", "debug"),
        ("TRACING_ZIPKIN", "http://zipkin:9411"),
    ])
    .unwrap();
    assert_eq!(c.listen_addr, "127.0.0.1:9091".parse().unwrap());
    assert_eq!(c.name, "api");
    assert_eq!(c.message, "Response from API");
    assert_eq!(
        c.upstream_uris,
        ["http://localhost:9091", "http://localhost:9092"]
    );
    assert_eq!(c.upstream_workers, 2);
    assert_eq!(c.timing_50, Duration::from_millis(10));
    assert_eq!(
        c.timing_90,
        Duration::from_millis(10),
        "90th defaults to 50th"
    );
    assert_eq!(
        c.timing_99,
        Duration::from_millis(10),
        "99th defaults to 90th"
    );
    assert_eq!(c.timing_variance, 10);
    assert_eq!(c.error_rate, 0.2);
    assert_eq!(c.error_type, ErrorType::Delay);
    assert_eq!(c.error_code, 503);
    assert_eq!(c.error_delay, Duration::from_millis(1500));
    assert_eq!(c.client_request_timeout, Duration::from_secs(90));
    assert!(!c.client_append_request);
    assert_eq!(c.seed, 42);
    assert_eq!(c.ignored, ["TRACING_ZIPKIN", "LOG_LEVEL"]);
    for (addr, want) in [
        (":9090", "[::]:9090"),
        ("localhost:8080", "127.0.0.1:8080"),
        ("[::1]:9090", "[::1]:9090"),
        ("0.0.0.0:0", "0.0.0.0:0"),
    ] {
        let c = Config::from_env([("LISTEN_ADDR", addr)]).unwrap();
        assert_eq!(c.listen_addr, want.parse().unwrap(), "{addr}");
    }
}

#[test]
fn bad_env_values_are_errors() {
    let cases: &[(&str, &str)] = &[
        ("LISTEN_ADDR", "9090"),
        ("LISTEN_ADDR", "0.0.0.0:http"),
        ("LISTEN_ADDR", "0.0.0.0:70000"),
        ("LISTEN_ADDR", "api.example:9090"),
        ("LISTEN_ADDR", "not an address"),
        ("UPSTREAM_WORKERS", "0"),
        ("UPSTREAM_WORKERS", "many"),
        ("ERROR_RATE", "2"),
        ("ERROR_RATE", "ten percent"),
        ("ERROR_CODE", "abc"),
        ("ERROR_CODE", "42"),
        ("ERROR_TYPE", "timeout"),
        ("TIMING_50_PERCENTILE", "10"),
        ("TIMING_50_PERCENTILE", "-1s"),
        ("TIMING_50_PERCENTILE", "1x"),
        ("TIMING_VARIANCE", "-5"),
        ("HTTP_SERVER_KEEP_ALIVES", "yes"),
        ("RATE_LIMIT", "-1"),
        ("RAND_SEED", "seed"),
    ];
    for (name, value) in cases {
        match Config::from_env([(*name, *value)]) {
            Ok(c) => panic!("{name}={value} accepted: {c:?}"),
            Err(e) => {
                let text = e.to_string();
                assert!(
                    text.starts_with(&format!("{name}: ")) && text.contains(&format!("{value:?}")),
                    "{text}"
                );
            }
        }
    }
}

#[test]
fn go_durations() {
    for (s, d) in [
        ("0", Duration::ZERO),
        ("0s", Duration::ZERO),
        ("300ms", Duration::from_millis(300)),
        ("1.5s", Duration::from_millis(1500)),
        ("1m30s", Duration::from_secs(90)),
        ("2h", Duration::from_secs(7200)),
        ("10us", Duration::from_micros(10)),
        ("10µs", Duration::from_micros(10)),
        ("7ns", Duration::from_nanos(7)),
        (".5s", Duration::from_millis(500)),
    ] {
        assert_eq!(parse_go_duration(s), Ok(d), "{s}");
    }
    for s in ["", "1", "s", "1.2.3s", "1 s", "-1s", "1d"] {
        assert!(parse_go_duration(s).is_err(), "{s}");
    }
    for (d, s) in [
        (Duration::ZERO, "0s"),
        (Duration::from_nanos(750), "750ns"),
        (Duration::from_nanos(202_008), "202.008µs"),
        (Duration::from_nanos(25_497_500), "25.4975ms"),
        (Duration::from_millis(1500), "1.5s"),
        (Duration::from_secs(60), "1m0s"),
        (Duration::from_millis(7_384_500), "2h3m4.5s"),
    ] {
        assert_eq!(format_go_duration(d), s);
    }
}

/// Found by the `go_duration` fuzz target: durations of a few thousand hours lost nanoseconds
/// (the parser summed in f64), and `2562047h47m16.854775808s` (one past Go's maximum) was
/// accepted.
#[test]
fn go_durations_count_in_integer_nanoseconds() {
    for nanos in [
        8_301_592_290_832_640_050,
        i64::MAX as u64,
        i64::MAX as u64 - 1,
        1,
        999_999_999,
        3_600_000_000_001,
    ] {
        let d = Duration::from_nanos(nanos);
        let s = format_go_duration(d);
        assert_eq!(parse_go_duration(&s), Ok(d), "{s}");
    }
    assert_eq!(
        parse_go_duration("2305997h51m30.83264005s"),
        Ok(Duration::from_nanos(8_301_592_290_832_640_050))
    );
    for s in [
        "2562047h47m16.854775808s",
        "2562048h",
        "9223372036854775808ns",
        "99999999999999999999s",
        ".s",
        "1.2.3s",
    ] {
        assert!(parse_go_duration(s).is_err(), "{s}");
    }
    // Go truncates a fraction to the nanosecond; digits past what fits are ignored.
    assert_eq!(parse_go_duration("1.9ns"), Ok(Duration::from_nanos(1)));
    assert_eq!(
        parse_go_duration("1.00000000000000000000000000001s"),
        Ok(Duration::from_secs(1))
    );
    assert_eq!(parse_go_duration("1.s"), Ok(Duration::from_secs(1)));
}

// ---------------------------------------------------------------------------------------------
// Serving
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn plain_call_returns_the_json_document() {
    let svc = start(&[("NAME", "web"), ("MESSAGE", "Hello from web")]).await;
    let (status, headers, body) = http_get_with(svc.addr, "/hello?x=1", "").await;
    assert_eq!(status, 200);
    assert!(headers
        .iter()
        .any(|(k, v)| k == "content-type" && v == "text/plain; charset=utf-8"));
    assert!(
        body.starts_with(
            "{\n  \"name\": \"web\",\n  \"uri\": \"/hello?x=1\",\n  \"type\": \"HTTP\",\n"
        ),
        "{body}"
    );
    assert!(body.ends_with("\n  \"code\": 200\n}\n"), "{body}");
    let resp = Response::from_json(body.as_bytes()).unwrap();
    assert_eq!(resp.name, "web");
    assert_eq!(resp.kind, "HTTP");
    assert_eq!(resp.body, Some(serde_json::json!("Hello from web")));
    assert_eq!(resp.code, 200);
    assert!(resp.upstream_calls.is_empty());
    assert!(resp.error.is_empty());
    assert_eq!(resp.start_time.len(), "2006-01-02T15:04:05.000000".len());
    assert!(resp.start_time <= resp.end_time);
    assert!(!resp.duration.is_empty());
    // No upstream_calls key at all when there are none (omitempty).
    assert!(!body.contains("upstream_calls"));
    svc.stop().await;
}

#[tokio::test]
async fn json_message_is_embedded() {
    let svc = start(&[("MESSAGE", r#"{"items": [1, 2], "ok": true}"#)]).await;
    let (_, resp) = http_get(svc.addr, "/").await;
    assert_eq!(
        resp.body,
        Some(serde_json::json!({"items": [1, 2], "ok": true}))
    );
    svc.stop().await;
    // Not JSON after all: sent as a string rather than failing.
    let svc = start(&[("MESSAGE", "{not json")]).await;
    let (status, resp) = http_get(svc.addr, "/").await;
    assert_eq!(
        (status, resp.body),
        (200, Some(serde_json::json!("{not json")))
    );
    svc.stop().await;
}

#[tokio::test]
async fn chain_web_to_api() {
    let api = start(&[("NAME", "api"), ("MESSAGE", "Response from API")]).await;
    let web = start(&[("NAME", "web"), ("UPSTREAM_URIS", &api.url())]).await;
    let (status, resp) = http_get(web.addr, "/").await;
    assert_eq!(status, 200);
    assert_eq!(resp.code, 200);
    assert_eq!(resp.name, "web");
    let call = &resp.upstream_calls[&api.url()];
    assert_eq!(call.name, "api");
    assert_eq!(call.uri, api.url());
    assert_eq!(call.kind, "HTTP");
    assert_eq!(call.body, Some(serde_json::json!("Response from API")));
    assert_eq!(call.code, 200);
    assert!(call.error.is_empty());
    assert_eq!(
        call.headers.get("Content-Type").map(String::as_str),
        Some("text/plain; charset=utf-8")
    );
    assert!(call.headers.contains_key("Content-Length"));
    web.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn upstream_down_gives_500_naming_it() {
    let port = closed_port().await;
    let upstream = format!("http://127.0.0.1:{port}");
    let web = start(&[("NAME", "web"), ("UPSTREAM_URIS", &upstream)]).await;
    let (status, resp) = http_get(web.addr, "/").await;
    assert_eq!(status, 500);
    assert_eq!(resp.code, 500);
    assert_eq!(resp.body, Some(serde_json::json!("Hello World")));
    let call = &resp.upstream_calls[&upstream];
    assert_eq!(call.code, -1);
    assert_eq!(call.uri, upstream);
    assert_eq!(
        call.error,
        format!(
            "Error communicating with upstream service: Get \"http://127.0.0.1:{port}/\": \
             dial tcp 127.0.0.1:{port}: connect: connection refused"
        )
    );
    web.stop().await;
}

#[tokio::test]
async fn failures_propagate_through_a_chain() {
    // web -> api -> db, with db down; and api also calling a healthy cache.
    let db_port = closed_port().await;
    let db = format!("http://127.0.0.1:{db_port}");
    let cache = start(&[("NAME", "cache"), ("MESSAGE", "Cache response")]).await;
    let api_uris = format!("{db},{}", cache.url());
    let api = start(&[("NAME", "api"), ("UPSTREAM_URIS", &api_uris)]).await;
    let web = start(&[("NAME", "web"), ("UPSTREAM_URIS", &api.url())]).await;
    let (status, resp) = http_get(web.addr, "/").await;
    assert_eq!((status, resp.code), (500, 500));
    let api_call = &resp.upstream_calls[&api.url()];
    assert_eq!(api_call.name, "api");
    assert_eq!(api_call.code, 500);
    assert_eq!(
        api_call.error,
        format!(
            "Error processing upstream request: {}/, expected code 200, got 500",
            api.url()
        )
    );
    assert_eq!(api_call.upstream_calls[&db].code, -1);
    assert!(api_call.upstream_calls[&db]
        .error
        .contains("connection refused"));
    let cache_call = &api_call.upstream_calls[&cache.url()];
    assert_eq!((cache_call.code, cache_call.name.as_str()), (200, "cache"));
    for s in [web, api, cache] {
        s.stop().await;
    }
}

#[tokio::test]
async fn upstream_error_codes_are_kept() {
    let api = start(&[("NAME", "api"), ("ERROR_RATE", "1"), ("ERROR_CODE", "503")]).await;
    let web = start(&[("UPSTREAM_URIS", &api.url())]).await;
    let (status, resp) = http_get(web.addr, "/").await;
    assert_eq!(status, 500);
    let call = &resp.upstream_calls[&api.url()];
    assert_eq!(call.code, 503);
    assert_eq!(call.name, "api");
    assert_eq!(
        call.error,
        format!(
            "Error processing upstream request: {}/, expected code 200, got 503",
            api.url()
        )
    );
    web.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn unsupported_upstream_schemes_fail_the_call() {
    let web = start(&[("UPSTREAM_URIS", "grpc://api:9090,https://api:9443")]).await;
    let (status, resp) = http_get(web.addr, "/").await;
    assert_eq!(status, 500);
    let grpc = &resp.upstream_calls["grpc://api:9090"];
    assert_eq!(grpc.code, -1);
    assert!(
        grpc.error.contains("gRPC upstreams are not supported"),
        "{}",
        grpc.error
    );
    assert!(resp.upstream_calls["https://api:9443"]
        .error
        .contains("https upstreams are not supported"));
    web.stop().await;
}

/// An upstream that records the raw request it gets and answers with `answer`.
async fn recording_upstream(answer: &'static str) -> (String, JoinHandle<String>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        s.write_all(answer.as_bytes()).await.unwrap();
        s.shutdown().await.ok();
        String::from_utf8_lossy(&buf).into_owned()
    });
    (url, task)
}

#[tokio::test]
async fn inbound_path_and_headers_are_appended() {
    let (url, seen) = recording_upstream(
        "HTTP/1.1 200 OK\r\nContent-Length: 28\r\nSet-Cookie: session=abc; Path=/\r\n\r\n{\"name\":\"raw\",\"code\":200}\n  ",
    )
    .await;
    let upstream = format!("{url}/base");
    let web = start(&[("UPSTREAM_URIS", &upstream)]).await;
    let (status, _, body) =
        http_get_with(web.addr, "/orders/7?verbose=1", "X-Request-Id: abc123\r\n").await;
    assert_eq!(status, 200, "{body}");
    let request = seen.await.unwrap();
    let mut lines = request.lines();
    assert_eq!(lines.next(), Some("GET /base/orders/7 HTTP/1.1"));
    let lower = request.to_ascii_lowercase();
    assert!(lower.contains("x-request-id: abc123"), "{request}");
    assert!(lower.contains("connection: close"), "{request}");
    assert!(
        lower.contains(&format!("host: {}", url.trim_start_matches("http://"))),
        "{request}"
    );
    let resp = Response::from_json(body.as_bytes()).unwrap();
    let call = &resp.upstream_calls[&upstream];
    assert_eq!((call.name.as_str(), call.code), ("raw", 200));
    assert_eq!(call.cookies.get("session").map(String::as_str), Some("abc"));
    web.stop().await;

    // Without HTTP_CLIENT_APPEND_REQUEST the upstream's own path is used as is.
    let (url, seen) =
        recording_upstream("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nnot json!").await;
    let web = start(&[
        ("UPSTREAM_URIS", &url),
        ("HTTP_CLIENT_APPEND_REQUEST", "false"),
    ])
    .await;
    let (status, resp) = http_get(web.addr, "/orders/7").await;
    assert_eq!(status, 200);
    assert!(seen.await.unwrap().starts_with("GET / HTTP/1.1\r\n"));
    // A body that is not fake-service JSON leaves an entry with just the call's facts.
    let call = &resp.upstream_calls[&url];
    assert_eq!(
        (call.name.as_str(), call.code, call.body.is_none()),
        ("", 200, true)
    );
    web.stop().await;
}

#[tokio::test]
async fn upstream_request_body_makes_a_post() {
    let (url, seen) = recording_upstream("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
    let web = start(&[("UPSTREAM_URIS", &url), ("UPSTREAM_REQUEST_BODY", "ping")]).await;
    let (status, _) = http_get(web.addr, "/").await;
    assert_eq!(status, 200);
    let request = seen.await.unwrap();
    assert!(request.starts_with("POST / HTTP/1.1\r\n"), "{request}");
    assert!(
        request.to_ascii_lowercase().contains("content-length: 4"),
        "{request}"
    );
    web.stop().await;
}

#[tokio::test]
async fn upstream_timeout() {
    // Accepts and never answers.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let web = start(&[
        ("UPSTREAM_URIS", &url),
        ("HTTP_CLIENT_REQUEST_TIMEOUT", "200ms"),
    ])
    .await;
    let (status, resp) = http_get(web.addr, "/").await;
    assert_eq!(status, 500);
    let call = &resp.upstream_calls[&url];
    assert_eq!(call.code, -1);
    assert!(
        call.error.contains("Client.Timeout exceeded"),
        "{}",
        call.error
    );
    drop(l);
    web.stop().await;
}

#[tokio::test]
async fn upstream_workers_run_calls_in_parallel() {
    let a = start(&[("NAME", "a"), ("TIMING_50_PERCENTILE", "400ms")]).await;
    let b = start(&[("NAME", "b"), ("TIMING_50_PERCENTILE", "400ms")]).await;
    let uris = format!("{},{}", a.url(), b.url());

    // fake-service's default: one worker, calls one after the other.
    let sequential = start(&[("UPSTREAM_URIS", &uris)]).await;
    let t = Instant::now();
    let (status, resp) = http_get(sequential.addr, "/").await;
    assert_eq!((status, resp.upstream_calls.len()), (200, 2));
    assert!(
        t.elapsed() >= Duration::from_millis(800),
        "{:?}",
        t.elapsed()
    );

    let parallel = start(&[("UPSTREAM_URIS", &uris), ("UPSTREAM_WORKERS", "2")]).await;
    let t = Instant::now();
    let (status, resp) = http_get(parallel.addr, "/").await;
    assert_eq!((status, resp.upstream_calls.len()), (200, 2));
    assert!(
        t.elapsed() < Duration::from_millis(790),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(resp.upstream_calls[&a.url()].name, "a");
    assert_eq!(resp.upstream_calls[&b.url()].name, "b");
    for s in [sequential, parallel, a, b] {
        s.stop().await;
    }
}

#[tokio::test]
async fn error_injection_and_rate_limit() {
    let svc = start(&[("ERROR_RATE", "0.5"), ("ERROR_CODE", "502")]).await;
    let (s1, r1) = http_get(svc.addr, "/").await;
    let (s2, r2) = http_get(svc.addr, "/").await;
    assert_eq!((s1, r1.code), (200, 200));
    assert_eq!((s2, r2.code), (502, 502));
    assert_eq!(r2.error, "Service error automatically injected");
    assert!(r2.body.is_none() && r2.start_time.is_empty());
    svc.stop().await;

    let svc = start(&[("RATE_LIMIT", "2"), ("RATE_LIMIT_CODE", "429")]).await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(http_get(svc.addr, "/").await.0);
    }
    assert_eq!(codes, [200, 200, 429]);
    let (_, limited) = http_get(svc.addr, "/").await;
    assert_eq!(limited.error, "Service exceeded rate limit");
    svc.stop().await;
}

#[tokio::test]
async fn health_and_ready() {
    let svc = start(&[
        ("READY_CHECK_RESPONSE_DELAY", "1h"),
        ("READY_CHECK_ROOT_PATH_WAIT_TILL_READY", "true"),
        ("HEALTH_CHECK_RESPONSE_CODE", "299"),
    ])
    .await;
    let (status, _, body) = http_get_with(svc.addr, "/health", "").await;
    assert_eq!((status, body.as_str()), (299, "OK"));
    let (status, _, body) = http_get_with(svc.addr, "/ready", "").await;
    assert_eq!((status, body.as_str()), (503, "Starting Process"));
    let (status, _, body) = http_get_with(svc.addr, "/", "").await;
    assert_eq!((status, body.as_str()), (503, ""));
    svc.stop().await;

    let svc = start(&[]).await;
    let (status, _, body) = http_get_with(svc.addr, "/ready", "").await;
    assert_eq!((status, body.as_str()), (200, "OK"));
    svc.stop().await;
}

#[tokio::test]
async fn keep_alives_are_off_by_default() {
    let svc = start(&[]).await;
    let mut s = TcpStream::connect(svc.addr).await.unwrap();
    // No `Connection: close` from the client: the server closes anyway.
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("server closes the connection")
        .unwrap();
    assert!(raw.starts_with(b"HTTP/1.1 200 OK\r\n"));
    svc.stop().await;
}

#[tokio::test]
async fn serve_stops_on_shutdown_and_frees_the_port() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    // The port is taken: binding fails with an error, not a panic.
    let config = Config::from_env([("LISTEN_ADDR", addr.to_string())]).unwrap();
    match Server::bind(config.clone()).await {
        Err(Error::Listen { addr: a, .. }) => assert_eq!(a, addr),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("bound a taken port"),
    }
    drop(l);
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(serve(config.clone(), async move {
        let _ = stopped.await;
    }));
    // Wait until it answers.
    let mut answered = false;
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(answered);
    let (status, _) = http_get(addr, "/").await;
    assert_eq!(status, 200);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("stops")
        .unwrap()
        .unwrap();
    // Bindable again.
    Server::bind(config).await.expect("port released");
}

#[tokio::test]
async fn upstream_with_a_trailing_slash() {
    // fake-service appends the inbound path to the raw upstream path: `/` + `/` = `//`.
    let api = start(&[("NAME", "api")]).await;
    let upstream = format!("{}/", api.url());
    let web = start(&[("UPSTREAM_URIS", &upstream)]).await;
    let (status, resp) = http_get(web.addr, "/").await;
    assert_eq!(status, 200, "{resp:?}");
    assert_eq!(resp.upstream_calls[&upstream].name, "api");
    web.stop().await;
    api.stop().await;
}

#[tokio::test]
async fn ui_page_is_served_at_ui_path_and_below() {
    let svc = start(&[]).await;
    for path in ["/ui", "/ui/", "/ui/index.html"] {
        let (status, headers, body) = http_get_with(svc.addr, path, "").await;
        assert_eq!(status, 200, "{path}");
        assert!(
            headers
                .iter()
                .any(|(k, v)| k.eq_ignore_ascii_case("content-type") && v.starts_with("text/html")),
            "{path}: {headers:?}"
        );
        // The page draws the tree from the document `/` answers with.
        assert!(body.contains("fetch(\"/\""), "{path}");
        assert!(body.contains("upstream_calls"), "{path}");
    }
    // A path that only starts with the UI path is the service's own.
    let (status, resp) = http_get(svc.addr, "/uix").await;
    assert_eq!((status, resp.name.as_str()), (200, "Service"));
    svc.stop().await;

    let svc = start(&[("UI_PATH", "/dashboard/")]).await;
    let (status, _, body) = http_get_with(svc.addr, "/dashboard", "").await;
    assert_eq!(status, 200);
    assert!(body.contains("<title>Fake Service</title>"));
    let (status, resp) = http_get(svc.addr, "/ui").await;
    assert_eq!((status, resp.uri.as_str()), (200, "/ui"));
    svc.stop().await;
}

#[test]
fn bad_ui_paths_are_errors() {
    for bad in ["ui", "/", "//", "/a b", "/ui?x"] {
        match Config::from_env([("UI_PATH", bad)]) {
            Err(Error::Env { name, .. }) => assert_eq!(name, "UI_PATH", "{bad}"),
            other => panic!("UI_PATH={bad:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn empty_host_listens_dual_stack() {
    // Port 0 on `[::]` (what `:0` means): reachable over IPv4 and IPv6 loopback.
    let config = Config::from_env([("LISTEN_ADDR", ":0")]).unwrap();
    assert_eq!(config.listen_addr, "[::]:0".parse().unwrap());
    let server = Server::bind(config).await.expect("bind");
    let port = server.local_addr().port();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    let v4: SocketAddr = ([127, 0, 0, 1], port).into();
    let (status, _) = http_get(v4, "/").await;
    assert_eq!(status, 200);
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        let v6: SocketAddr = (std::net::Ipv6Addr::LOCALHOST, port).into();
        let (status, _) = http_get(v6, "/").await;
        assert_eq!(status, 200);
    }
    stop.send(()).unwrap();
    task.await.unwrap().unwrap();
}
