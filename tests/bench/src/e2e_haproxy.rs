//! The `haproxy-sidecars` configuration of the end-to-end benchmark: what a user would assemble
//! without the mesh. HAProxy (Debian's package) runs as a pair of mTLS sidecars, each a process
//! in its pod's network namespace and cgroup:
//!
//! - client pod: plain TCP listeners on `127.0.0.1:<port>` (the app's port, and iperf3's) that
//!   connect to the server pod with a client certificate (`ssl crt client.pem ca-file ca.pem
//!   verify required`);
//! - server pod: TLS listeners on `<pod IP>:<tls port>` that require and verify a client
//!   certificate (`verify required`) and forward to the app on `127.0.0.1:<port>`.
//!
//! One CA, ECDSA P-256 keys (the mesh's key type), TLS 1.3 only (`ssl-min-ver TLSv1.3` both
//! ways), L4 (`mode tcp`) like the mesh's proxy. Session resumption is HAProxy's default: the
//! client side keeps the last session per `server` line and offers it on the next connection
//! (disabled only by `no-ssl-reuse`), the server side issues TLS 1.3 session tickets and keeps
//! a session cache (`tune.ssl.cachesize`, 20,000 entries by default).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_kit::Pod;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};

/// One forwarded port: the app's port in the server pod, and the TLS port between the pods.
#[derive(Clone, Copy, Debug)]
pub struct Forward {
    pub app_port: u16,
    pub tls_port: u16,
}

/// The certificates of the pair, as HAProxy reads them: `ca.pem`, and for each side a file with
/// its certificate followed by its PKCS#8 key.
pub struct Certs {
    pub ca: PathBuf,
    pub client: PathBuf,
    pub server: PathBuf,
}

/// Makes a CA and the two leaves (ECDSA P-256) in `dir`.
pub fn make_certs(dir: &Path) -> Result<Certs> {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "mesh-bench haproxy CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::from_ca_cert_der(ca_cert.der(), ca_key)?;
    let leaf = |name: &str| -> Result<String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut p = CertificateParams::new(vec![name.to_string()])?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, &issuer)?;
        Ok(format!("{}{}", cert.pem(), key.serialize_pem()))
    };
    let certs = Certs {
        ca: dir.join("ca.pem"),
        client: dir.join("client.pem"),
        server: dir.join("server.pem"),
    };
    std::fs::write(&certs.ca, ca_cert.pem())?;
    std::fs::write(&certs.client, leaf("web")?)?;
    std::fs::write(&certs.server, leaf("api")?)?;
    Ok(certs)
}

const GLOBAL: &str = "global
    maxconn 4096
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3

defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
";

/// The client-side sidecar: `127.0.0.1:<app port>` → `<server ip>:<tls port>` over mTLS.
pub fn client_config(certs: &Certs, server: &Pod, forwards: &[Forward]) -> String {
    let mut cfg = GLOBAL.to_string();
    for f in forwards {
        cfg += &format!(
            "
frontend out_{app}
    bind 127.0.0.1:{app}
    default_backend up_{app}

backend up_{app}
    server api {ip}:{tls} ssl crt {crt} ca-file {ca} verify required
",
            app = f.app_port,
            tls = f.tls_port,
            ip = server.ip,
            crt = certs.client.display(),
            ca = certs.ca.display(),
        );
    }
    cfg
}

/// The server-side sidecar: `<pod ip>:<tls port>` (mTLS, client certificate required) →
/// `127.0.0.1:<app port>`.
pub fn server_config(certs: &Certs, server: &Pod, forwards: &[Forward]) -> String {
    let mut cfg = GLOBAL.to_string();
    for f in forwards {
        cfg += &format!(
            "
frontend in_{tls}
    bind {ip}:{tls} ssl crt {crt} ca-file {ca} verify required
    default_backend app_{app}

backend app_{app}
    server app 127.0.0.1:{app}
",
            app = f.app_port,
            tls = f.tls_port,
            ip = server.ip,
            crt = certs.server.display(),
            ca = certs.ca.display(),
        );
    }
    cfg
}

/// A running HAProxy process (foreground, `-db`). Dropping it stops it with SIGTERM and waits
/// (SIGKILL after 3 s).
pub struct Haproxy {
    pub pid: u32,
    child: Child,
}

impl Haproxy {
    /// Starts `haproxy -db -f <config>` inside `pod` (its cgroup, then its network namespace,
    /// through `mesh-bench exec`) and waits until every port of `listens` is listening there.
    pub fn start(exe: &Path, pod: &Pod, config: &Path, listens: &[u16]) -> Result<Self> {
        let child = Command::new(exe)
            .arg("exec")
            .arg("--netns")
            .arg(&pod.netns_path)
            .arg("--cgroup")
            .arg(&pod.cgroup)
            .args(["--", "haproxy", "-db", "-f"])
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting haproxy (installed by `cargo xtask setup`)")?;
        let mut me = Self {
            pid: child.id(),
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = me.child.try_wait()? {
                anyhow::bail!("haproxy in {} exited at start: {status}", pod.name);
            }
            let out = mesh_kit::run("ip", &["netns", "exec", &pod.netns_name, "ss", "-Hltn"])?;
            if listens.iter().all(|p| out.contains(&format!(":{p} "))) {
                return Ok(me);
            }
            ensure!(
                Instant::now() < deadline,
                "haproxy in {} does not listen on {listens:?}",
                pod.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Pod {
        Pod {
            name: "api-h".into(),
            netns_name: "x".into(),
            netns_path: "/run/netns/x".into(),
            cgroup: "/sys/fs/cgroup/x".into(),
            ip: std::net::Ipv4Addr::new(10, 213, 9, 5),
        }
    }

    #[test]
    fn configs_require_mutual_tls_1_3_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let certs = make_certs(dir.path()).unwrap();
        let f = [Forward {
            app_port: 9091,
            tls_port: 8443,
        }];
        let c = client_config(&certs, &pod(), &f);
        assert!(c.contains("bind 127.0.0.1:9091"), "{c}");
        assert!(
            c.contains("server api 10.213.9.5:8443 ssl crt ") && c.contains("verify required"),
            "{c}"
        );
        assert!(c.contains("ssl-min-ver TLSv1.3"));
        let s = server_config(&certs, &pod(), &f);
        assert!(s.contains("bind 10.213.9.5:8443 ssl crt "), "{s}");
        assert!(s.contains("verify required") && s.contains("server app 127.0.0.1:9091"));
        // Each crt file holds a certificate and its key; the CA file only the certificate.
        let client = std::fs::read_to_string(&certs.client).unwrap();
        assert!(client.contains("BEGIN CERTIFICATE") && client.contains("BEGIN PRIVATE KEY"));
        let ca = std::fs::read_to_string(&certs.ca).unwrap();
        assert!(ca.contains("BEGIN CERTIFICATE") && !ca.contains("PRIVATE KEY"));
    }
}
