//! `--redirect iptables`: the same steering as the kernel programs, done with Consul's iptables
//! chains inside a pod's network namespace. The fallback for kernels without sk_msg/sk_lookup and
//! the baseline of every benchmark.
//!
//! As in Consul, every outbound TCP connection that is not to loopback and not from the proxy goes
//! to the outbound listener, and inbound TCP to the pod's app ports goes to the inbound listener.
//! Consul excludes the proxy by its UID; the agent here serves every pod from one process, so its
//! sockets carry [`mesh_common::PROXY_MARK`] and the chains exclude that mark.
//!
//! The chains run through `nsenter --net=<netns>` and the `iptables` / `iptables-restore`
//! binaries (`iptables-restore --wait` needs iptables 1.6.2 or newer), so the host needs
//! util-linux, iptables, `CAP_SYS_ADMIN` + `CAP_NET_ADMIN`, and the kernel's nat table with the
//! `REDIRECT` target and the `mark` match (`nf_nat`, `xt_REDIRECT`, `xt_mark`). IPv4 only: no
//! `ip6tables` rules are written.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mesh_common::PROXY_MARK;

/// What can go wrong running iptables in a namespace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `nsenter` could not be started, fed its standard input, or waited for (not installed,
    /// no permission).
    #[error("running {command} in {netns}: {source}")]
    Spawn {
        /// The command run under `nsenter`, its words joined by spaces.
        command: String,
        /// The network namespace file it ran in.
        netns: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The command ran and exited unsuccessfully (also when `nsenter` cannot enter `netns`).
    #[error("{command} in {netns} failed: {stderr}")]
    Failed {
        /// The command run under `nsenter`, its words joined by spaces.
        command: String,
        /// The network namespace file it ran in.
        netns: PathBuf,
        /// What the command wrote to standard error, trimmed.
        stderr: String,
    },
}

/// Consul's chain names in the nat table, in the order they are declared and flushed.
pub const CHAINS: [&str; 4] = [
    "CONSUL_PROXY_INBOUND",
    "CONSUL_PROXY_IN_REDIRECT",
    "CONSUL_PROXY_OUTPUT",
    "CONSUL_PROXY_REDIRECT",
];

/// What to steer in one pod. Ports are host-order TCP port numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    /// The proxy's outbound listener in the pod: every outbound TCP connection not to
    /// 127.0.0.1 and not marked [`PROXY_MARK`] is redirected here.
    pub outbound_port: u16,
    /// The proxy's inbound listener in the pod: inbound TCP to one of `app_ports` is
    /// redirected here.
    pub inbound_port: u16,
    /// The app's ports whose inbound TCP goes through the proxy; other ports are untouched.
    pub app_ports: Vec<u16>,
}

impl Rules {
    /// The `iptables-restore` input for the nat table: the chains are flushed and refilled in one
    /// atomic commit.
    pub fn restore_input(&self) -> String {
        let mut s = String::from("*nat\n");
        for chain in CHAINS {
            s += &format!(":{chain} - [0:0]\n");
        }
        s += "-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports ";
        s += &format!("{}\n", self.inbound_port);
        for port in &self.app_ports {
            s += &format!("-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport {port} -j CONSUL_PROXY_IN_REDIRECT\n");
        }
        s += &format!(
            "-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports {}\n",
            self.outbound_port
        );
        s += &format!("-A CONSUL_PROXY_OUTPUT -m mark --mark {PROXY_MARK:#x} -j RETURN\n");
        s += "-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN\n";
        s += "-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT\n";
        s += "COMMIT\n";
        s
    }
}

fn nsenter(netns: &Path, args: &[&str], stdin: Option<&str>) -> Result<String, Error> {
    let command = args.join(" ");
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            command: command.clone(),
            netns: netns.to_path_buf(),
            source,
        })?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|source| Error::Spawn {
                command: command.clone(),
                netns: netns.to_path_buf(),
                source,
            })?;
    }
    let out = child.wait_with_output().map_err(|source| Error::Spawn {
        command: command.clone(),
        netns: netns.to_path_buf(),
        source,
    })?;
    if !out.status.success() {
        return Err(Error::Failed {
            command,
            netns: netns.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs (or replaces) the chains in the namespace at `netns` and hooks them into
/// PREROUTING and OUTPUT once. The chains are replaced in one `iptables-restore --noflush`
/// commit; the jumps are added only if `iptables -C` does not find them.
///
/// # Errors
///
/// [`Error::Spawn`] if `nsenter` cannot be run, [`Error::Failed`] if `iptables-restore` or
/// adding a jump fails (namespace gone, nat table or `REDIRECT` unavailable, no permission).
/// A failure after the restore leaves the chains filled but possibly not hooked.
pub fn install(netns: &Path, rules: &Rules) -> Result<(), Error> {
    nsenter(
        netns,
        &["iptables-restore", "--noflush", "--wait"],
        Some(&rules.restore_input()),
    )?;
    for (hook, chain) in [
        ("PREROUTING", "CONSUL_PROXY_INBOUND"),
        ("OUTPUT", "CONSUL_PROXY_OUTPUT"),
    ] {
        let rule = ["-p", "tcp", "-j", chain];
        let check = [&["iptables", "-w", "-t", "nat", "-C", hook][..], &rule].concat();
        if nsenter(netns, &check, None).is_err() {
            let add = [&["iptables", "-w", "-t", "nat", "-A", hook][..], &rule].concat();
            nsenter(netns, &add, None)?;
        }
    }
    Ok(())
}

/// Removes the hooks and chains from the namespace; what is already gone is not an error.
///
/// # Errors
///
/// None today: every failure (including a namespace that cannot be entered) is taken for
/// "already gone" and the function returns `Ok(())`. The `Result` leaves room for reporting.
pub fn remove(netns: &Path) -> Result<(), Error> {
    for (hook, chain) in [
        ("PREROUTING", "CONSUL_PROXY_INBOUND"),
        ("OUTPUT", "CONSUL_PROXY_OUTPUT"),
    ] {
        while nsenter(
            netns,
            &[
                "iptables", "-w", "-t", "nat", "-D", hook, "-p", "tcp", "-j", chain,
            ],
            None,
        )
        .is_ok()
        {}
    }
    for chain in CHAINS {
        let _ = nsenter(netns, &["iptables", "-w", "-t", "nat", "-F", chain], None);
    }
    for chain in CHAINS {
        let _ = nsenter(netns, &["iptables", "-w", "-t", "nat", "-X", chain], None);
    }
    Ok(())
}

/// The nat table of the namespace as `iptables -S` prints it (one rule a line).
///
/// # Errors
///
/// [`Error::Spawn`] if `nsenter` cannot be run, [`Error::Failed`] if `iptables -S` fails.
pub fn list(netns: &Path) -> Result<String, Error> {
    nsenter(netns, &["iptables", "-w", "-t", "nat", "-S"], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_input_has_consul_chains_and_excludes_the_proxy() {
        let r = Rules {
            outbound_port: 15001,
            inbound_port: 20000,
            app_ports: vec![9090, 8080],
        };
        let s = r.restore_input();
        for chain in CHAINS {
            assert!(
                s.contains(&format!(":{chain} - [0:0]")),
                "{chain} missing:\n{s}"
            );
        }
        assert!(s.contains("-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001"));
        assert!(s.contains("-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20000"));
        assert!(s.contains("--dport 9090 -j CONSUL_PROXY_IN_REDIRECT"));
        assert!(s.contains("--dport 8080 -j CONSUL_PROXY_IN_REDIRECT"));
        // The proxy's own sockets and loopback are excluded before the redirect.
        let mark = s
            .find("--mark 0x4d455348 -j RETURN")
            .expect("mark exclusion");
        let lo = s
            .find("-d 127.0.0.1/32 -j RETURN")
            .expect("loopback exclusion");
        let redirect = s
            .find("-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT")
            .expect("jump");
        assert!(mark < redirect && lo < redirect);
        assert!(s.ends_with("COMMIT\n"));
    }
}
