//! What `mesh-cni` and the agent say to each other over the agent's Unix socket
//! (`/var/run/meshd/cni.sock` by default): one [`Request`] as a line of JSON, then one
//! [`Reply`] as a line of JSON, then the connection closes.
#![warn(missing_docs)]

use std::io::{self, BufRead, Write};
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The agent's socket when the plugin's configuration names none.
pub const DEFAULT_SOCKET: &str = "/var/run/meshd/cni.sock";

/// The longest line either side accepts, in bytes: a request carries a handful of names, paths
/// and addresses, far below this.
pub const MAX_LINE: usize = 64 * 1024;

/// The pod a CNI call is about, from the runtime's `CNI_*` variables and the chained result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    /// `K8S_POD_NAMESPACE` of `CNI_ARGS`.
    pub namespace: String,
    /// `K8S_POD_NAME` of `CNI_ARGS`.
    pub name: String,
    /// `K8S_POD_UID` of `CNI_ARGS`, when the runtime sends it (containerd and CRI-O do).
    #[serde(default)]
    pub uid: Option<String>,
    /// `CNI_CONTAINERID`: the pod sandbox's id.
    pub container_id: String,
    /// `CNI_NETNS`: the sandbox's network namespace file (`/var/run/netns/cni-…`); absent on a
    /// `DEL` after the namespace went away.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`: the interface the chain configured (`eth0`).
    pub ifname: String,
    /// The pod's addresses from the chain's `prevResult` (`ips[].address` without the prefix
    /// length).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl Pod {
    /// `namespace/name`, as `kubectl` names a pod.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What the plugin asks, one per connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", content = "pod", rename_all = "lowercase")]
pub enum Request {
    /// `ADD`: mesh this pod, answering only once it is meshed (attached and listening).
    Add(Pod),
    /// `CHECK`: is this pod still meshed, its steering intact?
    Check(Pod),
    /// `DEL`: the sandbox is being torn down.
    Del(Pod),
}

impl Request {
    /// The pod the request is about.
    pub fn pod(&self) -> &Pod {
        match self {
            Request::Add(p) | Request::Check(p) | Request::Del(p) => p,
        }
    }
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// `ADD`: the pod is meshed, its app may start. `CHECK`: it still is.
    Meshed,
    /// The pod is not part of the mesh (no `connect-inject`, not in the catalog): the plugin
    /// lets it through unchanged.
    NotInMesh,
    /// `ADD`: the pod must be meshed and could not be; `CHECK`: it lost its steering. The
    /// reason is for the runtime's error message.
    Refused {
        /// Why, in words the user can act on.
        reason: String,
    },
    /// `DEL`: the agent has noted the sandbox's end (nothing of it needs the plugin).
    Released,
    /// The request could not be decoded; the reason names what was wrong.
    Invalid {
        /// What was wrong with the request.
        reason: String,
    },
}

/// Writes `value` as one line of JSON and flushes.
///
/// # Errors
///
/// The write error.
pub fn write_line<T: Serialize>(out: &mut impl Write, value: &T) -> io::Result<()> {
    let mut line = serde_json::to_vec(value).map_err(io::Error::other)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()
}

/// Reads one line of JSON (at most [`MAX_LINE`] bytes) and decodes it.
///
/// # Errors
///
/// The read error; `UnexpectedEof` if the peer closed before a full line, `InvalidData` if the
/// line is too long or does not decode as `T` (the message says why).
pub fn read_line<T: for<'de> Deserialize<'de>>(input: &mut impl BufRead) -> io::Result<T> {
    let mut line = Vec::new();
    let n = io::Read::take(&mut *input, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    decode_line(&line, n)
}

/// Decodes a line read by either side's reader (`n` bytes read, `line` the bytes).
///
/// # Errors
///
/// As [`read_line`].
pub fn decode_line<T: for<'de> Deserialize<'de>>(line: &[u8], n: usize) -> io::Result<T> {
    if n > MAX_LINE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("line longer than {MAX_LINE} bytes"),
        ));
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the peer closed before a full line",
        ));
    }
    serde_json::from_slice(line).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        Pod {
            namespace: "default".into(),
            name: "web-0".into(),
            uid: Some("0c4d6e4a-8a3e-4c8e-9f0a-2b1d3c4e5f60".into()),
            container_id: "abc".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            ifname: "eth0".into(),
            ips: vec!["10.91.1.5".parse().unwrap()],
        }
    }

    #[test]
    fn requests_and_replies_round_trip_as_lines() {
        let mut buf = Vec::new();
        write_line(&mut buf, &Request::Add(pod())).unwrap();
        assert_eq!(buf.iter().filter(|b| **b == b'\n').count(), 1);
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(
            text.starts_with(r#"{"command":"add","pod":{"namespace":"default""#),
            "{text}"
        );
        let back: Request = read_line(&mut buf.as_slice()).unwrap();
        assert_eq!(back, Request::Add(pod()));
        let mut buf = Vec::new();
        write_line(
            &mut buf,
            &Reply::Refused {
                reason: "no".into(),
            },
        )
        .unwrap();
        assert_eq!(buf, b"{\"result\":\"refused\",\"reason\":\"no\"}\n");
    }

    #[test]
    fn truncated_oversized_and_unknown_input_is_refused() {
        let err = read_line::<Reply>(&mut &b"{\"result\":\"meshed\"}"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        let long = vec![b' '; MAX_LINE + 10];
        let err = read_line::<Reply>(&mut long.as_slice()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let err =
            read_line::<Request>(&mut &b"{\"command\":\"frob\",\"pod\":{}}\n"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("frob"), "{err}");
    }
}
