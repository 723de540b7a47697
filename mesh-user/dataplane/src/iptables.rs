//! `--redirect iptables`: the same steering as the kernel programs, done with Consul's iptables
//! chains inside a pod's network namespace. The fallback for kernels without sk_msg/sk_lookup and
//! the baseline of every benchmark.
//!
//! As in Consul, every outbound IPv4 TCP connection that is not to loopback and not from the proxy
//! goes to the outbound listener, and every inbound TCP connection, IPv4 and IPv6, goes to the
//! inbound listener, except to the excluded ports
//! (`consul.hashicorp.com/transparent-proxy-exclude-inbound-ports`). Consul excludes the proxy by
//! its UID; the agent here serves every pod from one process, so its sockets carry
//! [`mesh_common::PROXY_MARK`] and the chains exclude that mark.
//!
//! IPv6 (ip6tables) gets the inbound chains only, as the kernel programs decide: no mesh service
//! has a native IPv6 address, so native IPv6 egress is not redirected (an `AF_INET6` socket
//! dialling a v4-mapped address makes an IPv4 connection, which the IPv4 chains see); inbound
//! IPv6 lands on the inbound listener (dual-stack), which refuses plaintext.
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
    /// Inbound ports that reach the app directly; every other inbound TCP port goes to the
    /// inbound listener.
    pub exclude_inbound_ports: Vec<u16>,
}

/// The hooks of the IPv4 chains; IPv6 has only the first.
const HOOKS: [(&str, &str); 2] = [
    ("PREROUTING", "CONSUL_PROXY_INBOUND"),
    ("OUTPUT", "CONSUL_PROXY_OUTPUT"),
];

impl Rules {
    /// The inbound chains, as `iptables-restore` and `ip6tables-restore` lines.
    fn inbound_lines(&self) -> String {
        let mut s = String::new();
        s += "-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports ";
        s += &format!("{}\n", self.inbound_port);
        for port in &self.exclude_inbound_ports {
            s += &format!("-A CONSUL_PROXY_INBOUND -p tcp -m tcp --dport {port} -j RETURN\n");
        }
        s += "-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT\n";
        s
    }

    /// The `ip6tables-restore` input for the nat table: the inbound chains only (see the module
    /// docs), flushed and refilled in one atomic commit.
    pub fn restore_input6(&self) -> String {
        let mut s = String::from("*nat\n");
        for chain in &CHAINS[..2] {
            s += &format!(":{chain} - [0:0]\n");
        }
        s += &self.inbound_lines();
        s += "COMMIT\n";
        s
    }

    /// The `iptables-restore` input for the nat table: the chains are flushed and refilled in one
    /// atomic commit.
    pub fn restore_input(&self) -> String {
        let mut s = String::from("*nat\n");
        for chain in CHAINS {
            s += &format!(":{chain} - [0:0]\n");
        }
        s += &self.inbound_lines();
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

/// One address family's tools and the hooks of its chains.
struct Family {
    tool: &'static str,
    restore: &'static str,
    hooks: &'static [(&'static str, &'static str)],
}

const FAMILIES: [Family; 2] = [
    Family {
        tool: "iptables",
        restore: "iptables-restore",
        hooks: &HOOKS,
    },
    Family {
        tool: "ip6tables",
        restore: "ip6tables-restore",
        hooks: &[HOOKS[0]],
    },
];

/// Installs (or replaces) the chains in the namespace at `netns`, IPv4 and IPv6, and hooks them
/// into PREROUTING (and, IPv4, OUTPUT) once. Errors: the failing command and its stderr.
pub fn install(netns: &Path, rules: &Rules) -> Result<(), Error> {
    for Family {
        tool,
        restore,
        hooks,
    } in FAMILIES
    {
        let input = if tool == "iptables" {
            rules.restore_input()
        } else {
            rules.restore_input6()
        };
        nsenter(netns, &[restore, "--noflush", "--wait"], Some(&input))?;
        for (hook, chain) in hooks {
            let rule = ["-p", "tcp", "-j", chain];
            let check = [&[tool, "-w", "-t", "nat", "-C", hook][..], &rule].concat();
            if nsenter(netns, &check, None).is_err() {
                let add = [&[tool, "-w", "-t", "nat", "-A", hook][..], &rule].concat();
                nsenter(netns, &add, None)?;
            }
        }
    }
    Ok(())
}

/// Removes the hooks and chains from the namespace, IPv4 and IPv6; what is already gone is not
/// an error.
pub fn remove(netns: &Path) -> Result<(), Error> {
    for Family { tool, hooks, .. } in FAMILIES {
        for (hook, chain) in hooks {
            while nsenter(
                netns,
                &[
                    tool, "-w", "-t", "nat", "-D", hook, "-p", "tcp", "-j", chain,
                ],
                None,
            )
            .is_ok()
            {}
        }
        for chain in CHAINS {
            let _ = nsenter(netns, &[tool, "-w", "-t", "nat", "-F", chain], None);
        }
        for chain in CHAINS {
            let _ = nsenter(netns, &[tool, "-w", "-t", "nat", "-X", chain], None);
        }
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

/// What is missing of the pod's IPv4 steering in the namespace at `netns`, or nothing: each
/// hook into Consul's chains (`-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND`, `-A OUTPUT -p
/// tcp -j CONSUL_PROXY_OUTPUT`) and each chain must be there.
///
/// # Errors
///
/// As [`list`].
pub fn problems(netns: &Path) -> Result<Vec<String>, Error> {
    let table = list(netns)?;
    let lines: Vec<&str> = table.lines().map(str::trim).collect();
    let mut out = Vec::new();
    for (hook, chain) in HOOKS {
        let rule = format!("-A {hook} -p tcp -j {chain}");
        if !lines.contains(&rule.as_str()) {
            out.push(format!("iptables: the nat table has no `{rule}`"));
        }
    }
    for chain in CHAINS {
        if !lines.contains(&format!("-N {chain}").as_str()) {
            out.push(format!("iptables: the nat table has no chain {chain}"));
        }
    }
    Ok(out)
}

/// The IPv6 nat table of the namespace as `ip6tables -S` prints it.
pub fn list6(netns: &Path) -> Result<String, Error> {
    nsenter(netns, &["ip6tables", "-w", "-t", "nat", "-S"], None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_input_has_consul_chains_and_excludes_the_proxy() {
        let r = Rules {
            outbound_port: 15001,
            inbound_port: 20000,
            exclude_inbound_ports: vec![9090, 8080],
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
        // Every inbound port is redirected, after the excluded ones returned.
        let excluded = s.find("--dport 9090 -j RETURN").expect("exclusion");
        assert!(s.contains("--dport 8080 -j RETURN"));
        let all = s
            .find("-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT")
            .expect("every inbound port");
        assert!(excluded < all);
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

        // IPv6: the same inbound chains, no outbound redirect.
        let s6 = r.restore_input6();
        assert!(s6.contains("-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 20000"));
        assert!(s6.contains("--dport 8080 -j RETURN"));
        assert!(s6.contains("-A CONSUL_PROXY_INBOUND -p tcp -j CONSUL_PROXY_IN_REDIRECT"));
        assert!(!s6.contains("CONSUL_PROXY_OUTPUT") && !s6.contains("--to-ports 15001"));
        assert!(s6.ends_with("COMMIT\n"));
    }
}
