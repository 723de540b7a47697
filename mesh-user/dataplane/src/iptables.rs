//! `--redirect iptables`: the same steering as the kernel programs, done with Consul's iptables
//! chains inside a pod's network namespace. The fallback for kernels without sk_msg/sk_lookup and
//! the baseline of every benchmark.
//!
//! As in Consul, every outbound TCP connection that is not to loopback and not from the proxy goes
//! to the outbound listener, and inbound TCP to the pod's app ports goes to the inbound listener.
//! Consul excludes the proxy by its UID; the agent here serves every pod from one process, so its
//! sockets carry [`mesh_common::PROXY_MARK`] and the chains exclude that mark.
#![forbid(unsafe_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use mesh_common::PROXY_MARK;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("running {command} in {netns}: {source}")]
    Spawn {
        command: String,
        netns: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} in {netns} failed: {stderr}")]
    Failed {
        command: String,
        netns: PathBuf,
        stderr: String,
    },
}

/// Consul's chain names.
pub const CHAINS: [&str; 4] = [
    "CONSUL_PROXY_INBOUND",
    "CONSUL_PROXY_IN_REDIRECT",
    "CONSUL_PROXY_OUTPUT",
    "CONSUL_PROXY_REDIRECT",
];

/// What to steer in one pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub outbound_port: u16,
    pub inbound_port: u16,
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
/// PREROUTING and OUTPUT once.
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

/// The nat table of the namespace as `iptables -S` prints it.
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
