//! The two apps of the end-to-end benchmark, each a process inside its pod: the server (a 1 KiB
//! responder in the api pod, `mesh-bench server ...`) and the client workloads (in the web pod,
//! `mesh-bench client ... rr|stream|conns ...`).
//!
//! Both are tokio programs: every socket is non-blocking (set before `connect`, as mio does) and
//! waits in epoll, like the event-loop applications the mesh accelerates. The client is one event
//! loop (a current-thread runtime) whatever the number of connections; the server is a
//! multi-threaded runtime.
//!
//! Protocol: the first byte of a connection picks what the server does with it. [`SINK`]: read
//! to the end of the stream, then answer with the byte count (u64, little endian) and close.
//! [`ECHO`]: echo every byte back until the end of the stream, then close. Anything else is
//! HTTP/1.1 (for `wrk`): each request is answered with 200 and a 1 KiB body, keep-alive unless
//! the request says `Connection: close`. A request is
//! [`MSG`] bytes whose first byte is [`ECHO`] and whose next 8 bytes number it, so an answer that
//! is stale, misplaced or from another connection does not verify.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Request and response size.
pub const MSG: usize = 1024;
/// Bytes per write in the one-way throughput workload.
pub const STREAM_WRITE: usize = 64 * 1024;
/// First byte of an echoed connection.
pub const ECHO: u8 = b'E';
/// First byte of a connection whose bytes the server counts and discards.
pub const SINK: u8 = b'S';

// ---------------------------------------------------------------------------------------------
// Server (api pod)

/// Serves `addr` with `threads` runtime threads until killed. Prints `listening <addr>` once the
/// socket listens, which the benchmark waits for.
pub fn server_main(addr: SocketAddr, threads: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        println!("listening {}", listener.local_addr()?);
        use std::io::Write;
        std::io::stdout().flush()?;
        loop {
            match listener.accept().await {
                Ok((conn, _)) => {
                    // A connection's failure (a reset when a client process ends) is its own.
                    tokio::spawn(async move {
                        let _ = serve(conn).await;
                    });
                }
                Err(e) => {
                    eprintln!("mesh-bench server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    })
}

async fn serve(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    let n = conn.read(&mut buf).await?;
    if n == 0 {
        return Ok(());
    }
    if buf[0] != SINK && buf[0] != ECHO {
        return serve_http(conn, buf, n).await;
    }
    if buf[0] == SINK {
        let mut total = n as u64;
        loop {
            match conn.read(&mut buf).await? {
                0 => break,
                k => total += k as u64,
            }
        }
        conn.write_all(&total.to_le_bytes()).await?;
    } else {
        conn.write_all(&buf[..n]).await?;
        loop {
            match conn.read(&mut buf).await? {
                0 => break,
                k => conn.write_all(&buf[..k]).await?,
            }
        }
    }
    conn.shutdown().await
}

/// The HTTP response to every request: 200 with a 1 KiB body.
pub fn http_response(close: bool) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {MSG}\r\n{}\r\n",
        if close { "Connection: close\r\n" } else { "" }
    )
    .into_bytes();
    r.extend(std::iter::repeat_n(b'x', MSG));
    r
}

/// Where the head of the first complete HTTP request in `buf` ends (after its blank line), and
/// whether it asks to close the connection (`Connection: close`, or HTTP/1.0 without
/// keep-alive).
pub fn http_request_end(buf: &[u8]) -> Option<(usize, bool)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let http10 = head.lines().next().is_some_and(|l| l.ends_with("http/1.0"));
    let header = |v: &str| {
        head.lines()
            .any(|l| l.starts_with("connection:") && l.contains(v))
    };
    let close = header("close") || (http10 && !header("keep-alive"));
    Some((end, close))
}

/// HTTP/1.1 keep-alive (what `wrk` speaks): every request without a body (GET), answered with
/// [`http_response`]; pipelined requests are answered in order.
async fn serve_http(mut conn: TcpStream, mut buf: Vec<u8>, n: usize) -> std::io::Result<()> {
    let keep = http_response(false);
    let mut pending = buf[..n].to_vec();
    let mut out = Vec::new();
    loop {
        while let Some((end, close)) = http_request_end(&pending) {
            pending.drain(..end);
            if close {
                out.extend_from_slice(&http_response(true));
                conn.write_all(&out).await?;
                return conn.shutdown().await;
            }
            out.extend_from_slice(&keep);
        }
        if !out.is_empty() {
            conn.write_all(&out).await?;
            out.clear();
        }
        if pending.len() > 64 * 1024 {
            return Err(std::io::Error::other("an HTTP request head over 64 KiB"));
        }
        match conn.read(&mut buf).await? {
            0 => return Ok(()),
            k => pending.extend_from_slice(&buf[..k]),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client workloads (web pod)

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// CPU time (user + system) this process used so far, in seconds.
pub fn own_cpu_seconds() -> f64 {
    use nix::sys::resource::{getrusage, UsageWho};
    getrusage(UsageWho::RUSAGE_SELF).map_or(0.0, |u| {
        let t = |tv: nix::sys::time::TimeVal| tv.tv_sec() as f64 + tv.tv_usec() as f64 / 1e6;
        t(u.user_time()) + t(u.system_time())
    })
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[u32], p: f64) -> u32 {
    if v.is_empty() {
        return 0;
    }
    let rank = (p * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn latency_summary(mut ns: Vec<u32>) -> Value {
    ns.sort_unstable();
    let us = |x: u32| f64::from(x) / 1000.0;
    let mean = if ns.is_empty() {
        0.0
    } else {
        ns.iter().map(|&x| u64::from(x)).sum::<u64>() as f64 / ns.len() as f64 / 1000.0
    };
    json!({
        "p50_us": us(percentile(&ns, 0.50)),
        "p99_us": us(percentile(&ns, 0.99)),
        "mean_us": mean,
        "max_us": us(ns.last().copied().unwrap_or(0)),
    })
}

fn stamp(msg: &mut [u8], conn: u64, seq: u64) {
    msg[0] = ECHO;
    msg[1..9].copy_from_slice(&((conn << 40) | seq).to_le_bytes());
}

fn nanos(d: Duration) -> u32 {
    d.as_nanos().min(u128::from(u32::MAX)) as u32
}

/// What one keep-alive connection did.
struct ConnRun {
    /// Latencies of the exchanges started in the measured window, in ns.
    latencies: Vec<u32>,
    /// Every exchange, warm-up included.
    exchanges: u64,
    /// When its last measured exchange ended.
    last_end: Option<Instant>,
}

async fn keep_alive(
    id: u64,
    mut s: TcpStream,
    measure_from: Instant,
    deadline: Instant,
) -> Result<ConnRun> {
    let mut msg = vec![0x5au8; MSG];
    let mut back = vec![0u8; MSG];
    let mut run = ConnRun {
        latencies: Vec::new(),
        exchanges: 0,
        last_end: None,
    };
    loop {
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        stamp(&mut msg, id, run.exchanges);
        s.write_all(&msg).await?;
        s.read_exact(&mut back)
            .await
            .with_context(|| format!("connection {id}: answer {}", run.exchanges))?;
        let end = Instant::now();
        ensure!(
            back == msg,
            "connection {id}: answer {} differs from the request",
            run.exchanges
        );
        run.exchanges += 1;
        if start >= measure_from {
            run.latencies.push(nanos(end - start));
            run.last_end = Some(end);
        }
    }
    // A clean end: half-close, and the server closes after echoing everything.
    s.shutdown().await?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await?;
    ensure!(
        rest.is_empty(),
        "connection {id}: {} extra bytes",
        rest.len()
    );
    Ok(run)
}

/// `conns` keep-alive connections, each sending 1 KiB requests and waiting for the 1 KiB answer,
/// for `warmup` untimed then `secs` timed seconds, all in one event loop.
pub fn client_rr(addr: SocketAddr, conns: usize, secs: f64, warmup: f64) -> Result<Value> {
    ensure!(conns > 0 && secs > 0.0, "rr needs conns > 0 and secs > 0");
    let rt = runtime()?;
    let cpu0 = own_cpu_seconds();
    let (runs, measure_from) = rt.block_on(async move {
        let mut streams = Vec::with_capacity(conns);
        for i in 0..conns {
            let s = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connection {i} to {addr}"))?;
            s.set_nodelay(true)?;
            streams.push(s);
        }
        let measure_from = Instant::now() + Duration::from_secs_f64(warmup);
        let deadline = measure_from + Duration::from_secs_f64(secs);
        let tasks: Vec<_> = streams
            .into_iter()
            .enumerate()
            .map(|(i, s)| tokio::spawn(keep_alive(i as u64, s, measure_from, deadline)))
            .collect();
        let mut runs = Vec::with_capacity(conns);
        for t in tasks {
            runs.push(t.await.context("a connection task panicked")??);
        }
        anyhow::Ok((runs, measure_from))
    })?;
    let cpu = own_cpu_seconds() - cpu0;
    let exchanges: u64 = runs.iter().map(|r| r.exchanges).sum();
    let end = runs
        .iter()
        .filter_map(|r| r.last_end)
        .max()
        .context("no exchange finished in the measured window")?;
    let measured: Vec<u32> = runs.into_iter().flat_map(|r| r.latencies).collect();
    let window = (end - measure_from).as_secs_f64();
    let mut out = latency_summary(measured.clone());
    let o = out.as_object_mut().expect("an object");
    o.insert("connections".into(), json!(conns));
    o.insert("requests".into(), json!(exchanges));
    o.insert("measured_requests".into(), json!(measured.len()));
    o.insert("window_s".into(), json!(window));
    o.insert("req_per_s".into(), json!(measured.len() as f64 / window));
    o.insert("bytes_sent".into(), json!(exchanges * MSG as u64));
    o.insert("bytes_received".into(), json!(exchanges * MSG as u64));
    o.insert("cpu_s".into(), json!(cpu));
    Ok(out)
}

/// One connection, 64 KiB writes for `secs`, then a half-close; the server answers with the
/// count of bytes it read. The time runs from the first write to that answer, so it covers every
/// byte delivered, not only written.
pub fn client_stream(addr: SocketAddr, secs: f64) -> Result<Value> {
    let rt = runtime()?;
    let cpu0 = own_cpu_seconds();
    let (sent, writes, elapsed) = rt.block_on(async move {
        let mut s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        let buf = vec![SINK; STREAM_WRITE];
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(secs);
        let (mut sent, mut writes) = (0u64, 0u64);
        while Instant::now() < deadline {
            s.write_all(&buf).await?;
            sent += buf.len() as u64;
            writes += 1;
        }
        s.shutdown().await?;
        let mut count = [0u8; 8];
        s.read_exact(&mut count)
            .await
            .context("reading the server's byte count")?;
        let elapsed = start.elapsed().as_secs_f64();
        let received = u64::from_le_bytes(count);
        ensure!(
            received == sent,
            "the server read {received} bytes, the client wrote {sent}"
        );
        anyhow::Ok((sent, writes, elapsed))
    })?;
    Ok(json!({
        "connections": 1,
        "bytes_sent": sent,
        "bytes_received": 8,
        "writes": writes,
        "elapsed_s": elapsed,
        "gb_per_s": sent as f64 / elapsed / 1e9,
        "cpu_s": own_cpu_seconds() - cpu0,
    }))
}

/// Connect, one 1 KiB exchange, close; one connection at a time, `warmup` untimed then `secs`
/// timed seconds.
pub fn client_conns(addr: SocketAddr, secs: f64, warmup: f64) -> Result<Value> {
    let rt = runtime()?;
    let cpu0 = own_cpu_seconds();
    let (n, latencies, window) = rt.block_on(async move {
        let mut msg = vec![0x33u8; MSG];
        let mut back = vec![0u8; MSG];
        let measure_from = Instant::now() + Duration::from_secs_f64(warmup);
        let deadline = measure_from + Duration::from_secs_f64(secs);
        let mut latencies = Vec::new();
        let mut n = 0u64;
        let mut last_end = measure_from;
        loop {
            let start = Instant::now();
            if start >= deadline {
                break;
            }
            let mut s = TcpStream::connect(addr)
                .await
                .with_context(|| format!("connection {n} to {addr}"))?;
            s.set_nodelay(true)?;
            stamp(&mut msg, n, 0);
            s.write_all(&msg).await?;
            s.read_exact(&mut back)
                .await
                .with_context(|| format!("answer on connection {n}"))?;
            ensure!(back == msg, "connection {n}: wrong answer");
            drop(s);
            let end = Instant::now();
            n += 1;
            if start >= measure_from {
                latencies.push(nanos(end - start));
                last_end = end;
            }
        }
        anyhow::Ok((n, latencies, (last_end - measure_from).as_secs_f64()))
    })?;
    ensure!(
        !latencies.is_empty(),
        "no connection in the measured window"
    );
    let measured = latencies.len();
    let mut out = latency_summary(latencies);
    let o = out.as_object_mut().expect("an object");
    o.insert("connections".into(), json!(n));
    o.insert("requests".into(), json!(n));
    o.insert("measured_connections".into(), json!(measured));
    o.insert("window_s".into(), json!(window));
    o.insert("conns_per_s".into(), json!(measured as f64 / window));
    o.insert("bytes_sent".into(), json!(n * MSG as u64));
    o.insert("bytes_received".into(), json!(n * MSG as u64));
    o.insert("cpu_s".into(), json!(own_cpu_seconds() - cpu0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The three workloads against the server, over loopback, without a mesh.
    #[test]
    fn workloads_against_the_server() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        std::thread::spawn(move || server_main(addr, 1));
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the server did not come up");
            std::thread::sleep(Duration::from_millis(10));
        }
        let rr = client_rr(addr, 4, 0.2, 0.05).unwrap();
        assert!(rr["req_per_s"].as_f64().unwrap() > 0.0, "{rr}");
        assert!(rr["requests"].as_u64().unwrap() >= rr["measured_requests"].as_u64().unwrap());
        let st = client_stream(addr, 0.1).unwrap();
        assert!(st["gb_per_s"].as_f64().unwrap() > 0.0, "{st}");
        let c = client_conns(addr, 0.2, 0.05).unwrap();
        assert!(c["conns_per_s"].as_f64().unwrap() > 0.0, "{c}");

        // HTTP/1.1: two pipelined keep-alive requests, then one that closes.
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        let get = "GET / HTTP/1.1\r\nHost: api\r\n\r\n";
        s.write_all(format!("{get}{get}").as_bytes()).unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        let expected = [
            http_response(false),
            http_response(false),
            http_response(true),
        ]
        .concat();
        assert_eq!(all, expected);
    }

    #[test]
    fn http_request_heads() {
        assert_eq!(http_request_end(b"GET / HTTP/1.1\r\nHost: a"), None);
        assert_eq!(
            http_request_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET"),
            Some((27, false))
        );
        assert_eq!(
            http_request_end(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n"),
            Some((37, true))
        );
        assert_eq!(
            http_request_end(b"GET / HTTP/1.0\r\n\r\n"),
            Some((18, true))
        );
        let r = String::from_utf8(http_response(false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n") && r.contains("Content-Length: 1024\r\n"));
        assert!(r.ends_with(&"x".repeat(MSG)) && !r.contains("close"));
    }
}
