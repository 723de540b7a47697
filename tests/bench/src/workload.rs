//! The workloads of the redirect benchmark, both ends of each: the app side runs in a client
//! process inside a pod (`mesh-bench client ...`), the listener side on a thread of the benchmark
//! process, which sits in the node's agent cgroup like the proxy.
//!
//! Both ends use non-blocking sockets that wait in `poll` ([`NbStream`]), as event-loop
//! applications and the proxy do (only such app sockets are redirected by sk_msg).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, SocketAddrV4, TcpListener};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use mesh_kit::NbStream;
use serde_json::{json, Value};

/// Bytes per write in the one-way throughput workload.
pub const BULK_WRITE: usize = 64 * 1024;
/// What the listener reads at a time in the throughput workload.
const BULK_READ: usize = 256 * 1024;
/// Bytes each way in the connection-rate workload.
pub const CONNECT_MSG: usize = 64;

/// What one measurement runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Round trips of `size`-byte messages, echoed by the listener.
    PingPong { size: usize },
    /// 64 KiB writes from the app, read as fast as possible by the listener.
    Bulk,
    /// Connect, one 64 B exchange, close; as many times as possible.
    Connect,
}

impl Workload {
    pub const ALL: [Workload; 4] = [
        Workload::PingPong { size: 64 },
        Workload::PingPong { size: 1024 },
        Workload::Bulk,
        Workload::Connect,
    ];

    pub fn name(self) -> String {
        match self {
            Workload::PingPong { size } => format!("ping-pong-{size}"),
            Workload::Bulk => "bulk-64k".to_string(),
            Workload::Connect => "connect".to_string(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// App side (client process)

/// `count` timed round trips of `size` bytes after `warmup` untimed ones. Returns the latency
/// summary in microseconds.
pub fn client_ping_pong(
    addr: SocketAddr,
    size: usize,
    count: usize,
    warmup: usize,
) -> Result<Value> {
    ensure!(
        size > CPU_BYTE && count > 0,
        "ping-pong needs size > {CPU_BYTE} and count > 0"
    );
    let mut s = NbStream::connect(addr, None).with_context(|| format!("connecting to {addr}"))?;
    s.0.set_nodelay(true)?;
    let mut msg = vec![0x5au8; size];
    let mut back = vec![0u8; size];
    let mut rtts = Vec::with_capacity(count);
    let mut same_cpu = 0u64;
    for i in 0..(warmup + count) as u64 {
        // Every message differs, so a stale or misplaced echo does not verify.
        msg[..8].copy_from_slice(&i.to_le_bytes());
        let start = Instant::now();
        s.write_all(&msg)?;
        s.read_exact(&mut back)
            .with_context(|| format!("reading echo {i}"))?;
        let ns = start.elapsed().as_nanos() as u64;
        // The listener put the CPU it answered on at CPU_BYTE; everything else is echoed.
        ensure!(
            back[..CPU_BYTE] == msg[..CPU_BYTE] && back[CPU_BYTE + 1..] == msg[CPU_BYTE + 1..],
            "echo {i} differs from what was sent"
        );
        if i >= warmup as u64 {
            rtts.push(ns);
            if usize::from(back[CPU_BYTE]) == current_cpu() % 256 {
                same_cpu += 1;
            }
        }
    }
    s.0.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    ensure!(
        rest.is_empty(),
        "the listener sent {} extra bytes",
        rest.len()
    );
    rtts.sort_unstable();
    let us = |ns: u64| ns as f64 / 1000.0;
    let mean = rtts.iter().sum::<u64>() as f64 / rtts.len() as f64 / 1000.0;
    Ok(json!({
        "round_trips": rtts.len(),
        "warmup": warmup,
        "bytes": ((warmup + count) * size * 2) as u64,
        "p50_us": us(percentile(&rtts, 0.50)),
        "p99_us": us(percentile(&rtts, 0.99)),
        "mean_us": mean,
        "min_us": us(rtts[0]),
        "max_us": us(rtts[rtts.len() - 1]),
        "same_cpu_share": same_cpu as f64 / count as f64,
    }))
}

/// Where, in a ping-pong message, the listener writes the CPU it answered on (mod 256), so that
/// the app can tell how often both ends shared a CPU (unpinned runs depend on it).
const CPU_BYTE: usize = 8;

fn current_cpu() -> usize {
    nix::sched::sched_getcpu().unwrap_or(usize::MAX)
}

/// Nearest-rank percentile of sorted `v`.
fn percentile(v: &[u64], p: f64) -> u64 {
    let rank = (p * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// 64 KiB writes for `secs`, then a half-close; the listener answers with the count of bytes
/// it read. The time runs from the first write to that answer, so it covers every byte
/// delivered, not only written.
pub fn client_bulk(addr: SocketAddr, secs: f64) -> Result<Value> {
    let mut s = NbStream::connect(addr, None).with_context(|| format!("connecting to {addr}"))?;
    let buf: Vec<u8> = (0..BULK_WRITE).map(|i| (i % 251) as u8).collect();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut sent = 0u64;
    let mut writes = 0u64;
    while Instant::now() < deadline {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
        writes += 1;
    }
    s.0.shutdown(Shutdown::Write)?;
    let mut count = [0u8; 8];
    s.read_exact(&mut count)
        .context("reading the listener's byte count")?;
    let elapsed = start.elapsed().as_secs_f64();
    let received = u64::from_le_bytes(count);
    ensure!(
        received == sent,
        "the listener read {received} bytes, the app wrote {sent}"
    );
    Ok(json!({
        "bytes": sent,
        "writes": writes,
        "elapsed_s": elapsed,
        "gb_per_s": sent as f64 / elapsed / 1e9,
    }))
}

/// Connect, write 64 B, read the 64 B answer, close; repeated for `secs`.
pub fn client_connect(addr: SocketAddr, secs: f64) -> Result<Value> {
    let msg = [0x33u8; CONNECT_MSG];
    let mut back = [0u8; CONNECT_MSG];
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut n = 0u64;
    while Instant::now() < deadline {
        let mut s =
            NbStream::connect(addr, None).with_context(|| format!("connection {n} to {addr}"))?;
        s.write_all(&msg)?;
        s.read_exact(&mut back)
            .with_context(|| format!("answer on connection {n}"))?;
        ensure!(back == msg, "connection {n}: wrong answer");
        n += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    Ok(json!({
        "connections": n,
        "bytes": n * 2 * CONNECT_MSG as u64,
        "elapsed_s": elapsed,
        "conns_per_s": n as f64 / elapsed,
    }))
}

// ---------------------------------------------------------------------------------------------
// Listener side (a thread of the benchmark process)

/// What the listener side saw.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerStats {
    /// Messages echoed (ping-pong), bytes read (bulk) or connections served (connect).
    pub count: u64,
}

/// Serves one measurement on `listener` until the client is done (and, for connections, until
/// `stop`). With `orig_dst`, every accepted connection must report that original destination
/// (`SO_ORIGINAL_DST`), as the proxy asks for each one.
pub fn serve(
    listener: &TcpListener,
    workload: Workload,
    orig_dst: Option<SocketAddrV4>,
    stop: &AtomicBool,
) -> Result<ServerStats> {
    match workload {
        Workload::PingPong { size } => {
            let conn = accept(listener, orig_dst, stop)?;
            conn.0.set_nodelay(true)?;
            echo(conn, size)
        }
        Workload::Bulk => {
            let conn = accept(listener, orig_dst, stop)?;
            sink(conn)
        }
        Workload::Connect => {
            let mut n = 0u64;
            loop {
                let mut conn = match try_accept(listener, orig_dst, stop)? {
                    Some(c) => c,
                    None => return Ok(ServerStats { count: n }),
                };
                let mut msg = [0u8; CONNECT_MSG];
                conn.read_exact(&mut msg)
                    .with_context(|| format!("connection {n}: request"))?;
                conn.write_all(&msg)?;
                let mut rest = [0u8; 1];
                let extra = conn.read(&mut rest)?;
                ensure!(extra == 0, "connection {n}: more than one request");
                n += 1;
            }
        }
    }
}

fn accept(
    listener: &TcpListener,
    orig_dst: Option<SocketAddrV4>,
    stop: &AtomicBool,
) -> Result<NbStream> {
    try_accept(listener, orig_dst, stop)?.context("the client never connected")
}

/// The next connection, or `None` once `stop` is set and nothing is waiting.
fn try_accept(
    listener: &TcpListener,
    orig_dst: Option<SocketAddrV4>,
    stop: &AtomicBool,
) -> Result<Option<NbStream>> {
    loop {
        match listener.accept() {
            Ok((conn, _)) => {
                if let Some(want) = orig_dst {
                    let got = mesh_dataplane::socket::original_dst(&conn)
                        .context("SO_ORIGINAL_DST of an accepted connection")?;
                    ensure!(
                        got == want,
                        "original destination {got}, the app dialled {want}"
                    );
                }
                return Ok(Some(NbStream::new(conn)?));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if stop.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                wait_readable(listener, 50)?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("accept"),
        }
    }
}

fn wait_readable(fd: &impl AsFd, millis: u16) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(millis)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Echoes `size`-byte messages until the client half-closes.
fn echo(mut conn: NbStream, size: usize) -> Result<ServerStats> {
    let mut buf = vec![0u8; size];
    let mut n = 0u64;
    while read_message(&mut conn, &mut buf).with_context(|| format!("message {n}"))? {
        buf[CPU_BYTE] = (current_cpu() % 256) as u8;
        conn.write_all(&buf)?;
        n += 1;
    }
    conn.0.shutdown(Shutdown::Write)?;
    Ok(ServerStats { count: n })
}

/// Fills `buf`; `false` on a clean end of stream before its first byte.
fn read_message(r: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => bail!(
                "end of stream inside a message ({got} of {} bytes)",
                buf.len()
            ),
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(true)
}

/// Reads to the end of the stream as fast as it can, then answers with the byte count.
fn sink(mut conn: NbStream) -> Result<ServerStats> {
    let mut buf = vec![0u8; BULK_READ];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => total += k as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("reading the stream"),
        }
    }
    conn.write_all(&total.to_le_bytes())?;
    conn.0.shutdown(Shutdown::Write)?;
    Ok(ServerStats { count: total })
}

/// A listener thread's handle: the thread serves one measurement; `stop` ends the connection
/// workload and gives up waiting for a client that never came.
pub struct Server {
    pub stop: Arc<AtomicBool>,
    pub thread: std::thread::JoinHandle<Result<ServerStats>>,
}

/// Starts serving one measurement on a clone of `listener`, on a thread whose CPU affinity is
/// `cpus`.
pub fn spawn_server(
    listener: &TcpListener,
    workload: Workload,
    orig_dst: Option<SocketAddrV4>,
    cpus: nix::sched::CpuSet,
) -> Result<Server> {
    let listener = listener.try_clone()?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::Builder::new()
        .name("bench-listener".into())
        .spawn(move || {
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)
                .context("pinning the listener thread")?;
            serve(&listener, workload, orig_dst, &flag)
        })?;
    Ok(Server { stop, thread })
}
