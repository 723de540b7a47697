//! `mesh-probe`: the application side of the root tests. It moves itself into a pod's cgroup and
//! network namespace, then does one thing and reports it on stdout.
//!
//! ```text
//! mesh-probe --netns PATH --cgroup PATH [--blocking] <command>
//!
//! Sockets are non-blocking with `poll` (as event-loop applications use them) unless `--blocking`.
//!   dial-many ADDR[,ADDR...] COUNT   connect COUNT times, round robin; send "<addr>\n", read to EOF
//!   exchange ADDR BYTES SEED [LOCAL_PORT]
//!                                     send BYTES of stream SEED then half-close, read stream SEED+1
//!                                     to EOF; print "sent=N received=M ok=BOOL"
//!   send-after-shutdown ADDR BYTES   send BYTES of stream 0, wait 300 ms, half-close, wait
//!                                     300 ms, send 5000 bytes more; read to EOF; print
//!                                     "after-shutdown <sent N|error ERRNO> received=M"
//!   send-after-go ADDR GO_FILE        send 1000 bytes in ten writes 50 ms apart, print "sent
//!                                     1000"; once GO_FILE exists, one write of 5000 bytes; read
//!                                     to EOF or an error (8 s at most); print "after <sent
//!                                     N|error ERRNO> <eof|error ERRNO|timeout>"
//!   connect ADDR                      print "connected" or "error <errno> <message>"
//!   push ADDR BYTES                   blocking writes of 64 KiB; print "pushed N" or "error ..."
//!   connect-latency ADDR COUNT        time COUNT connect() calls (each then closed); print
//!                                     "p50_ns=.. p99_ns=.. failed=.. errno=E:N,.." (N failed
//!                                     connects got errno E)
//!   fetch ADDR                        connect, read to EOF, print what was read
//!   fail-connects ADDR LOCAL_PORT COUNT [THREADS]
//!                                     THREADS threads (1 by default), thread t on local port
//!                                     LOCAL_PORT+t: connect once from 127.0.0.1:<port> and keep
//!                                     it, then its share of COUNT non-blocking connects from the
//!                                     same port (SO_REUSEADDR), which the kernel refuses after
//!                                     connect4 ran (EADDRNOTAVAIL: the 4-tuple is taken); print
//!                                     "failed=N other=M" (summed over threads)
//!   http-get ADDR                     send a plaintext HTTP request, print what comes back (or
//!                                     the error)
//!   hold ADDR                         connect (5 s), send one keep-alive HTTP request, print
//!                                     "connected <ns> <status line>" once the answer starts,
//!                                     then keep the connection and read until it is closed;
//!                                     print "closed <ns> <eof|why>" (Unix-epoch ns)
//!   exchange-server ADDR BYTES SEED   accept forever; per connection read stream SEED to EOF and
//!                                     send BYTES of stream SEED+1, half-close; print each result
//!   eof-server ADDR WATCH_MS          accept forever; per connection read to EOF, keep reading
//!                                     WATCH_MS more, write "bye\n" and close; print
//!                                     "served received=N after_eof=M"
//!   serve ADDR REPLY                  accept forever; write REPLY to each connection, close
//!   echo-server ADDR                  accept forever; send back what each connection sends
//!                                     (non-blocking sockets, as event-loop servers)
//!   linger-server ADDR GO_FILE        accept; per connection read once, answer "resp1\n", wait
//!                                     until GO_FILE exists, then write "EVIL\n" into the same
//!                                     socket (print "sent evil" or "evil failed <why>") and
//!                                     keep it open: a server that talks after its peer left
//!   reuse-port-victim FIRST SECOND GO_FILE
//!                                     connect to FIRST, send "req1\n", read the answer, close;
//!                                     3 s later connect to SECOND from the same local port
//!                                     (retrying for 10 s), send "req2\n", create GO_FILE, read
//!                                     for 4 s; print "first <port> <answer>", "second <port>",
//!                                     "received <bytes, escaped>"
//!   converse ADDR INTERVAL_MS         connect (non-blocking), then every INTERVAL_MS send "ping <n>\n"
//!                                     and read it back; print "echo <ns> <n>" per answer and
//!                                     "closed <ns> <eof|mismatch|why>" when it ends
//!   pause                             print "paused", then sleep forever (a pod's pause process)
//!   loopback-pairs SOURCE COUNT [MARK]
//!                                     listen on 127.0.0.1 (any port), connect COUNT times from
//!                                     SOURCE (port 0; SO_MARK MARK first, if given) and accept
//!                                     each; print "holding COUNT", then keep every socket open
//!                                     until killed
//!   fetch-loop INTERVAL_MS ADDR       until killed: connect (1 s), read to EOF (2 s), print
//!                                     "fetch <start_ns> <end_ns> got <text>" or
//!                                     "fetch <start_ns> <end_ns> error <why>" (Unix-epoch ns)
//!   probe-loop COUNT INTERVAL_MS MARKER ADDR[,ADDR...]
//!                                     a thread per address: COUNT times (0: until killed)
//!                                     connect (500 ms), send an HTTP request line, read to EOF
//!                                     (1 s); print "probe <ns> <addr> <outcome> bytes=N marker=0|1"
//!                                     where outcome is connect-<why> or connected-<eof|why>
//! ```
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_kit::{read_pattern, write_pattern, NbStream};

fn main() {
    if let Err(e) = real_main() {
        eprintln!("mesh-probe: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut netns = None;
    let mut cgroup = None;
    let mut blocking = false;
    while !args.is_empty() && args[0].starts_with("--") {
        let opt = args.remove(0);
        if opt == "--blocking" {
            blocking = true;
            continue;
        }
        ensure!(!args.is_empty(), "{opt} needs a value");
        let value = args.remove(0);
        match opt.as_str() {
            "--netns" => netns = Some(PathBuf::from(value)),
            "--cgroup" => cgroup = Some(PathBuf::from(value)),
            other => bail!("unknown option {other}"),
        }
    }
    // cgroup first: sockets belong to the cgroup of the process that creates them.
    if let Some(cg) = cgroup {
        mesh_dataplane::cgroup::add_process(&cg, std::process::id())?;
    }
    if let Some(ns) = netns {
        let file = std::fs::File::open(&ns).with_context(|| format!("{}", ns.display()))?;
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
    }
    let cmd = args.first().cloned().unwrap_or_default();
    let arg = |i: usize| -> Result<&str> {
        args.get(i)
            .map(String::as_str)
            .with_context(|| format!("{cmd}: missing argument {i}"))
    };
    match cmd.as_str() {
        "dial-many" => {
            let targets: Vec<SocketAddr> = arg(1)?
                .split(',')
                .map(|a| a.parse().context("address"))
                .collect::<Result<_>>()?;
            let count: usize = arg(2)?.parse()?;
            for i in 0..count {
                let target = targets[i % targets.len()];
                let mut s = TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    .with_context(|| format!("connection {i} to {target}"))?;
                writeln!(s, "{target}")?;
                let mut sink = Vec::new();
                s.read_to_end(&mut sink)?;
            }
            println!("dialled {count}");
        }
        "exchange" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let bytes: u64 = arg(2)?.parse()?;
            let seed: u64 = arg(3)?.parse()?;
            let local_port = args.get(4).map(|p| p.parse()).transpose()?;
            let (sent, received, ok) = if blocking {
                let s = match local_port {
                    Some(port) => {
                        let sock = socket2_bind(port)?;
                        sock.connect(&addr.into())?;
                        TcpStream::from(sock)
                    }
                    None => TcpStream::connect(addr)?,
                };
                exchange(s.try_clone()?, s, bytes, seed)?
            } else {
                let s = NbStream::connect(addr, local_port)?;
                exchange(s.try_clone()?, s, bytes, seed)?
            };
            println!("sent={sent} received={received} ok={ok}");
        }
        "send-after-shutdown" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let bytes: u64 = arg(2)?.parse()?;
            let mut s = NbStream::connect(addr, None)?;
            write_pattern(&mut s, 0, bytes)?;
            std::thread::sleep(Duration::from_millis(300));
            s.half_close()?;
            std::thread::sleep(Duration::from_millis(300));
            let after = write_once(&mut s.0, &[b'x'; 5000]);
            let mut answer = Vec::new();
            s.read_to_end(&mut answer)?;
            println!("after-shutdown {after} received={}", answer.len());
        }
        "send-after-go" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let go = std::path::PathBuf::from(arg(2)?);
            let mut s = NbStream::connect(addr, None)?;
            for _ in 0..10 {
                s.write_all(&[b'a'; 100])?;
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("sent 1000");
            std::io::stdout().flush()?;
            while !go.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let after = write_once(&mut s.0, &[b'x'; 5000]);
            s.0.set_nonblocking(false)?;
            s.0.set_read_timeout(Some(Duration::from_secs(8)))?;
            let mut sink = Vec::new();
            let end = match s.0.read_to_end(&mut sink) {
                Ok(_) => "eof".to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "timeout".to_string(),
                Err(e) => format!("error {}", e.raw_os_error().unwrap_or(0)),
            };
            println!("after {after} {end}");
        }
        "connect" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(_) => println!("connected"),
                Err(e) => println!("error {} {e}", e.raw_os_error().unwrap_or(0)),
            }
        }
        "connect-latency" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let count: usize = arg(2)?.parse()?;
            let mut times = Vec::with_capacity(count);
            let mut failed = 0;
            // errno -> how many connects failed with it
            let mut errors = std::collections::BTreeMap::<i32, usize>::new();
            for _ in 0..count {
                let sock =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                let start = std::time::Instant::now();
                let r = sock.connect(&addr.into());
                let took = start.elapsed();
                match r {
                    Ok(()) => times.push(took.as_nanos() as u64),
                    Err(e) => {
                        failed += 1;
                        *errors.entry(e.raw_os_error().unwrap_or(0)).or_default() += 1;
                    }
                }
            }
            times.sort_unstable();
            let at = |q: f64| {
                times
                    .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(0)
            };
            // "errno=<n>:<count>,..." names the errors of the failed connects (none: "errno=").
            let errnos: Vec<String> = errors.iter().map(|(e, n)| format!("{e}:{n}")).collect();
            println!(
                "p50_ns={} p99_ns={} failed={failed} errno={}",
                at(0.5),
                at(0.99),
                errnos.join(",")
            );
        }
        "fail-connects" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let port: u16 = arg(2)?.parse()?;
            let count: usize = arg(3)?.parse()?;
            let threads: usize = args.get(4).map(|t| t.parse()).transpose()?.unwrap_or(1);
            ensure!(threads >= 1, "fail-connects: THREADS must be at least 1");
            let workers: Vec<_> = (0..threads)
                .map(|t| {
                    let share = count / threads + usize::from(t < count % threads);
                    let port = port + t as u16;
                    std::thread::spawn(move || fail_connects(addr, port, share))
                })
                .collect();
            let (mut failed, mut other) = (0, 0);
            for w in workers {
                let (f, o) = w
                    .join()
                    .map_err(|_| anyhow::anyhow!("a fail-connects thread panicked"))??;
                failed += f;
                other += o;
            }
            println!("failed={failed} other={other}");
        }
        "fetch" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            println!("{text}");
        }
        "http-get" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")?;
            let mut text = Vec::new();
            match s.read_to_end(&mut text) {
                Ok(_) => println!("{}", String::from_utf8_lossy(&text)),
                Err(e) => println!("error {} {e}", e.raw_os_error().unwrap_or(0)),
            }
        }
        "hold" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .with_context(|| format!("connecting to {addr}"))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: keep-alive\r\n\r\n")?;
            let mut buf = vec![0u8; 16384];
            let mut announced = false;
            let why = loop {
                match s.read(&mut buf) {
                    Ok(0) => break "eof".to_string(),
                    Ok(n) => {
                        if !announced {
                            announced = true;
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let status = text.lines().next().unwrap_or_default().to_string();
                            println!("connected {} {status}", unix_ns());
                            std::io::stdout().flush()?;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => break format!("error {} {e}", e.raw_os_error().unwrap_or(0)),
                }
            };
            println!("closed {} {why}", unix_ns());
        }
        "push" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let bytes: u64 = arg(2)?.parse()?;
            let result = if blocking {
                push(TcpStream::connect(addr)?, bytes)
            } else {
                let s = NbStream::connect(addr, None)?;
                push(s, bytes)
            };
            match result {
                Ok(()) => println!("pushed {bytes}"),
                Err(e) => println!("error {} {e}", e.raw_os_error().unwrap_or(0)),
            }
        }
        "exchange-server" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let bytes: u64 = arg(2)?.parse()?;
            let seed: u64 = arg(3)?.parse()?;
            let listener = listen(addr)?;
            for conn in listener.incoming() {
                let conn = NbStream::new(conn?)?;
                std::thread::spawn(move || {
                    let result = (|| -> std::io::Result<(u64, bool)> {
                        let mut w = conn.try_clone()?;
                        let writer = std::thread::spawn(move || -> std::io::Result<()> {
                            write_pattern(&mut w, seed + 1, bytes)?;
                            w.half_close()
                        });
                        let mut r = conn;
                        let got = read_pattern(&mut r, seed)?;
                        writer
                            .join()
                            .map_err(|_| std::io::Error::other("writer panicked"))??;
                        Ok(got)
                    })();
                    match result {
                        Ok((n, ok)) => println!("served received={n} ok={ok}"),
                        Err(e) => println!("served error {e}"),
                    }
                    let _ = std::io::stdout().flush();
                });
            }
        }
        "loopback-pairs" => {
            let source: std::net::Ipv4Addr = arg(1)?.parse().context("SOURCE")?;
            let count: usize = arg(2)?.parse().context("COUNT")?;
            let mark: Option<u32> = args.get(3).map(|m| m.parse()).transpose().context("MARK")?;
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let to = listener.local_addr()?;
            let mut held = Vec::with_capacity(2 * count);
            for i in 0..count {
                let sock =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                if let Some(mark) = mark {
                    sock.set_mark(mark).context("SO_MARK")?;
                }
                sock.bind(&SocketAddr::from((source, 0)).into())
                    .with_context(|| format!("binding {source}"))?;
                sock.connect(&to.into())
                    .with_context(|| format!("connection {i} to {to}"))?;
                held.push(TcpStream::from(sock));
                held.push(listener.accept()?.0);
            }
            println!("holding {count}");
            std::io::stdout().flush()?;
            loop {
                std::thread::park();
            }
        }
        // A pod sandbox's pause process: holds the pod's namespaces and does nothing.
        "pause" => {
            println!("paused");
            std::io::stdout().flush()?;
            loop {
                std::thread::park();
            }
        }
        "eof-server" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let watch = Duration::from_millis(arg(2)?.parse()?);
            let listener = listen(addr)?;
            for conn in listener.incoming() {
                let mut conn = NbStream::new(conn?)?;
                std::thread::spawn(move || {
                    let result = (|| -> std::io::Result<(usize, usize)> {
                        let mut buf = vec![0; 64 << 10];
                        let mut received = 0;
                        loop {
                            match conn.read(&mut buf)? {
                                0 => break,
                                n => received += n,
                            }
                        }
                        // A TCP socket reads nothing after its end of stream, ever.
                        let mut after_eof = 0;
                        let until = std::time::Instant::now() + watch;
                        while std::time::Instant::now() < until {
                            match conn.read(&mut buf)? {
                                0 => std::thread::sleep(Duration::from_millis(10)),
                                n => after_eof += n,
                            }
                        }
                        conn.write_all(b"bye\n")?;
                        Ok((received, after_eof))
                    })();
                    match result {
                        Ok((n, after)) => println!("served received={n} after_eof={after}"),
                        Err(e) => println!("served error {e}"),
                    }
                    let _ = std::io::stdout().flush();
                });
            }
        }
        "serve" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let reply = arg(2)?.to_string();
            let listener = listen(addr)?;
            for conn in listener.incoming() {
                let mut conn = conn?;
                let _ = conn.write_all(reply.as_bytes());
            }
        }
        "echo-server" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let listener = listen(addr)?;
            for conn in listener.incoming() {
                // Non-blocking, as event-loop servers are (the splice needs it).
                let mut conn = NbStream::new(conn?)?;
                std::thread::spawn(move || {
                    let mut back = conn.try_clone()?;
                    std::io::copy(&mut conn, &mut back)
                });
            }
        }
        "linger-server" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let go = std::path::PathBuf::from(arg(2)?);
            let listener = listen(addr)?;
            for conn in listener.incoming() {
                let mut conn = NbStream::new(conn?)?;
                let go = go.clone();
                std::thread::spawn(move || -> std::io::Result<()> {
                    // The request ("req1\n", one write) before the answer.
                    let mut buf = [0u8; 100];
                    if conn.read(&mut buf)? == 0 {
                        return Ok(());
                    }
                    conn.write_all(b"resp1\n")?;
                    while !go.exists() {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    std::thread::sleep(Duration::from_millis(300));
                    match conn.write_all(b"EVIL\n") {
                        Ok(()) => println!("sent evil"),
                        Err(e) => println!("evil failed {e}"),
                    }
                    std::io::stdout().flush()?;
                    std::thread::sleep(Duration::from_secs(3600));
                    Ok(())
                });
            }
        }
        "reuse-port-victim" => {
            let first: SocketAddr = arg(1)?.parse()?;
            let second: SocketAddr = arg(2)?.parse()?;
            let go = std::path::PathBuf::from(arg(3)?);
            // SO_REUSEADDR on both sockets (port 0: any), so the second may bind the first's
            // port while the first lingers in TIME_WAIT.
            let mut s = NbStream::connect(first, Some(0))?;
            let port = s.0.local_addr()?.port();
            s.write_all(b"req1\n")?;
            let mut buf = [0u8; 100];
            let n = s.read(&mut buf)?;
            println!(
                "first {port} {}",
                String::from_utf8_lossy(&buf[..n]).escape_debug()
            );
            drop(s);
            std::thread::sleep(Duration::from_secs(3));
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut s = loop {
                match NbStream::connect(second, Some(port)) {
                    Ok(s) => break s,
                    Err(e) if std::time::Instant::now() < deadline => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    Err(e) => return Err(e).context("reusing the local port"),
                }
            };
            println!("second {}", s.0.local_addr()?.port());
            s.write_all(b"req2\n")?;
            std::fs::write(&go, b"")?;
            // Still non-blocking (the splice only serves such sockets): poll by hand.
            let end = std::time::Instant::now() + Duration::from_secs(4);
            let mut got = Vec::new();
            while std::time::Instant::now() < end {
                match s.0.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => break,
                }
            }
            println!("received {}", String::from_utf8_lossy(&got).escape_debug());
        }
        "converse" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let interval = Duration::from_millis(arg(2)?.parse()?);
            let s =
                NbStream::connect(addr, None).with_context(|| format!("connecting to {addr}"))?;
            let mut reader = std::io::BufReader::new(s.try_clone()?);
            let mut writer = s;
            let why = (0u64..)
                .find_map(|n| {
                    let ping = format!("ping {n}\n");
                    if let Err(e) = writer.write_all(ping.as_bytes()) {
                        return Some(format!("error {} {e}", e.raw_os_error().unwrap_or(0)));
                    }
                    let mut line = String::new();
                    match std::io::BufRead::read_line(&mut reader, &mut line) {
                        Ok(0) => return Some("eof".to_string()),
                        Ok(_) if line != ping => return Some(format!("mismatch {line:?}")),
                        Ok(_) => {}
                        Err(e) => {
                            return Some(format!("error {} {e}", e.raw_os_error().unwrap_or(0)))
                        }
                    }
                    println!("echo {} {n}", unix_ns());
                    let _ = std::io::stdout().flush();
                    std::thread::sleep(interval);
                    None
                })
                .unwrap_or_default();
            println!("closed {} {why}", unix_ns());
        }
        "fetch-loop" => {
            let interval = Duration::from_millis(arg(1)?.parse()?);
            let addr: SocketAddr = arg(2)?.parse()?;
            loop {
                let start = unix_ns();
                let outcome = match fetch_once(addr) {
                    Ok(text) => format!(
                        "got {}",
                        text.split_whitespace().collect::<Vec<_>>().join("_")
                    ),
                    Err(e) => format!("error {}", why(&e)),
                };
                println!("fetch {start} {} {outcome}", unix_ns());
                std::thread::sleep(interval);
            }
        }
        "probe-loop" => {
            let count: u64 = arg(1)?.parse()?;
            let interval = Duration::from_millis(arg(2)?.parse()?);
            let marker = arg(3)?.to_string();
            let targets: Vec<SocketAddr> = arg(4)?
                .split(',')
                .map(|a| a.parse().with_context(|| format!("address {a}")))
                .collect::<Result<_>>()?;
            let threads: Vec<_> = targets
                .into_iter()
                .map(|target| {
                    let marker = marker.clone();
                    std::thread::spawn(move || {
                        let mut i = 0;
                        while count == 0 || i < count {
                            let at = unix_ns();
                            let outcome = probe_once(target, marker.as_bytes());
                            println!("probe {at} {target} {outcome}");
                            i += 1;
                            std::thread::sleep(interval);
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join()
                    .map_err(|_| anyhow::anyhow!("a probe thread panicked"))?;
            }
        }
        other => bail!("unknown command {other:?}"),
    }
    Ok(())
}

/// Writes `bytes` of stream `seed` on `w` and half-closes while reading stream `seed + 1` from
/// `r` to EOF. Returns (sent, received, whether what was received is exact).
fn exchange<S: Read + Write + HalfClose + Send + 'static>(
    mut w: S,
    mut r: S,
    bytes: u64,
    seed: u64,
) -> Result<(u64, u64, bool)> {
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        write_pattern(&mut w, seed, bytes)?;
        w.half_close()
    });
    let (received, ok) = read_pattern(&mut r, seed + 1)?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    Ok((bytes, received, ok))
}

/// Writes `bytes` of stream 7, half-closes, and reads to EOF; any error is the app's error.
fn push<S: Read + Write + HalfClose>(mut s: S, bytes: u64) -> std::io::Result<()> {
    write_pattern(&mut s, 7, bytes)?;
    s.half_close()?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)?;
    Ok(())
}

trait HalfClose {
    fn half_close(&self) -> std::io::Result<()>;
}

impl HalfClose for TcpStream {
    fn half_close(&self) -> std::io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl HalfClose for NbStream {
    fn half_close(&self) -> std::io::Result<()> {
        self.0.shutdown(Shutdown::Write)
    }
}

/// Binds a server command's listener on `addr` and says "listening" (what the tests wait for).
fn listen(addr: SocketAddr) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
    println!("listening");
    std::io::stdout().flush()?;
    Ok(listener)
}

/// One `write` of `bytes`, straight to the socket: "sent N", or "error ERRNO" when TCP refuses it.
fn write_once(s: &mut TcpStream, bytes: &[u8]) -> String {
    match s.write(bytes) {
        Ok(n) => format!("sent {n}"),
        Err(e) => format!("error {}", e.raw_os_error().unwrap_or(0)),
    }
}

/// A TCP socket bound to 127.0.0.1:`port` with SO_REUSEADDR, not yet connected.
/// `fail-connects`' work on one local port: connect once from 127.0.0.1:`port` and keep it, then
/// `count` non-blocking connects from the same port, which the kernel refuses at once
/// (`EADDRNOTAVAIL`) after connect4 ran. Returns (refused so, anything else).
fn fail_connects(addr: SocketAddr, port: u16, count: usize) -> Result<(usize, usize)> {
    let keep = socket2_bind(port)?;
    keep.connect(&addr.into())
        .context("the first connect, which must succeed")?;
    let (mut failed, mut other) = (0, 0);
    for _ in 0..count {
        let s = socket2_bind(port)?;
        s.set_nonblocking(true)?;
        match s.connect(&addr.into()) {
            Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => failed += 1,
            _ => other += 1,
        }
    }
    drop(keep);
    Ok((failed, other))
}

fn socket2_bind(port: u16) -> Result<socket2::Socket> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    Ok(sock)
}

/// Nanoseconds since the Unix epoch (the test process compares them with its own clock).
fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// An error as one word: `errno<N>`, or its kind when there is no errno (a connect timeout).
fn why(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => format!("errno{n}"),
        None => format!("{:?}", e.kind()).to_lowercase(),
    }
}

/// Connects (1 s), reads to EOF (2 s).
fn fetch_once(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    Ok(text)
}

/// One plaintext attempt at `addr` as a client outside the mesh makes it: connect (500 ms),
/// send a request, read what comes back until EOF or an error (1 s without a byte). Says how
/// it ended, how many bytes came back and whether `marker` was among them.
fn probe_once(addr: SocketAddr, marker: &[u8]) -> String {
    let mut s = match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
        Ok(s) => s,
        Err(e) => return format!("connect-{} bytes=0 marker=0", why(&e)),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    // The request may fail (a reset); what was already sent back is still read.
    let _ = s.write_all(b"GET / HTTP/1.0\r\nHost: api\r\n\r\n");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let end = loop {
        match s.read(&mut buf) {
            Ok(0) => break "eof".to_string(),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.len() > 1 << 20 {
                    break "more".to_string();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break why(&e),
        }
    };
    let seen = !marker.is_empty() && got.windows(marker.len()).any(|w| w == marker);
    format!(
        "connected-{end} bytes={} marker={}",
        got.len(),
        u8::from(seen)
    )
}
