//! `mesh-probe`: the application side of the root tests. It moves itself into a pod's cgroup and
//! network namespace, then does one thing and reports it on stdout.
//!
//! ```text
//! mesh-probe --netns PATH --cgroup PATH <command>
//!   dial-many ADDR[,ADDR...] COUNT   connect COUNT times, round robin; send "<addr>\n", read to EOF
//!   exchange ADDR BYTES SEED [LOCAL_PORT]
//!                                     send BYTES of stream SEED then half-close, read stream SEED+1
//!                                     to EOF; print "sent=N received=M ok=BOOL"
//!   connect ADDR                      print "connected" or "error <errno> <message>"
//!   push ADDR BYTES                   blocking writes of 64 KiB; print "pushed N" or "error ..."
//!   serve ADDR REPLY                  accept forever; write REPLY to each connection, close
//! ```
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::{read_pattern, write_pattern};

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
    while args.len() >= 2 && args[0].starts_with("--") {
        let value = args.remove(1);
        match args.remove(0).as_str() {
            "--netns" => netns = Some(PathBuf::from(value)),
            "--cgroup" => cgroup = Some(PathBuf::from(value)),
            other => bail!("unknown option {other}"),
        }
    }
    // cgroup first: sockets belong to the cgroup of the process that creates them.
    if let Some(cg) = cgroup {
        mesh_user::cgroup::add_process(&cg, std::process::id())?;
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
            let s = match args.get(4) {
                Some(port) => {
                    let sock = socket2_bind(port.parse()?)?;
                    sock.connect(&addr.into())?;
                    TcpStream::from(sock)
                }
                None => TcpStream::connect(addr)?,
            };
            let mut w = s.try_clone()?;
            let writer = std::thread::spawn(move || -> std::io::Result<()> {
                write_pattern(&mut w, seed, bytes)?;
                w.shutdown(Shutdown::Write)
            });
            let mut r = s;
            let (received, ok) = read_pattern(&mut r, seed + 1)?;
            writer.join().map_err(|_| anyhow::anyhow!("writer panicked"))??;
            println!("sent={bytes} received={received} ok={ok}");
        }
        "connect" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(_) => println!("connected"),
                Err(e) => println!("error {} {e}", e.raw_os_error().unwrap_or(0)),
            }
        }
        "push" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let bytes: u64 = arg(2)?.parse()?;
            let mut s = TcpStream::connect(addr)?;
            match write_pattern(&mut s, 7, bytes).and_then(|()| s.shutdown(Shutdown::Write)) {
                Ok(()) => {
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest)?;
                    println!("pushed {bytes}");
                }
                Err(e) => println!("error {} {e}", e.raw_os_error().unwrap_or(0)),
            }
        }
        "serve" => {
            let addr: SocketAddr = arg(1)?.parse()?;
            let reply = arg(2)?.to_string();
            let listener = TcpListener::bind(addr)?;
            println!("listening");
            std::io::stdout().flush()?;
            for conn in listener.incoming() {
                let mut conn = conn?;
                let _ = conn.write_all(reply.as_bytes());
            }
        }
        other => bail!("unknown command {other:?}"),
    }
    Ok(())
}

/// A TCP socket bound to 127.0.0.1:`port` with SO_REUSEADDR, not yet connected.
fn socket2_bind(port: u16) -> Result<socket2::Socket> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    Ok(sock)
}
