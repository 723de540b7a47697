//! `meshctl` against a real API server on 127.0.0.1 (ephemeral port) started in the test:
//! Consul's verbs, output and exit codes.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use mesh_api::{Hooks, Server, ServerConfig};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

struct Env {
    dir: tempfile::TempDir,
    server: Server,
    root: String,
}

async fn start() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::new(dir.path());
    cfg.http_addr = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    let server = Server::start(cfg, Hooks::default()).await.unwrap();
    let root = server.bootstrap_token().unwrap().to_owned();
    Env { dir, server, root }
}

impl Env {
    fn addr(&self) -> String {
        self.server.http_addr().unwrap().to_string()
    }

    /// Runs meshctl with the server's address and the operator token in the environment.
    async fn run(&self, args: &[&str]) -> Run {
        self.run_with(args, &[("MESH_HTTP_TOKEN", &self.root)])
            .await
    }

    async fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshctl"));
        cmd.args(args)
            .env("MESH_HTTP_ADDR", self.addr())
            .env_remove("MESH_HTTP_TOKEN")
            .env_remove("MESH_HTTP_TOKEN_FILE");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().await.unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    fn file(&self, name: &str, content: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, content).unwrap();
        p.display().to_string()
    }
}

#[track_caller]
fn expect(r: &Run, code: i32, stdout: &str, stderr: &str) {
    assert_eq!(r.code, code, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
    assert!(
        r.stdout.contains(stdout),
        "stdout {:?} lacks {stdout:?} (stderr {:?})",
        r.stdout,
        r.stderr
    );
    assert!(
        r.stderr.contains(stderr),
        "stderr {:?} lacks {stderr:?}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intention_verbs_print_and_exit_as_consul() {
    let e = start().await;
    // Nothing yet: list says so and exits 2, as Consul's does.
    expect(
        &e.run(&["intention", "list"]).await,
        2,
        "",
        "There are no intentions.",
    );

    let r = e.run(&["intention", "create", "-deny", "web", "api"]).await;
    assert_eq!(r.stdout, "Created: web => api (deny)\n");
    expect(&r, 0, "", "");
    // Double dashes work too.
    expect(
        &e.run(&[
            "intention",
            "create",
            "--allow",
            "-description",
            "x",
            "ns1/*",
            "ns1/db",
        ])
        .await,
        0,
        "Created: ns1/* => ns1/db (allow)",
        "",
    );
    // A second create for the same pair fails; -replace replaces.
    expect(
        &e.run(&["intention", "create", "web", "api"]).await,
        1,
        "",
        "Error creating intention \"web => api (allow)\": Unexpected response code: 409 (duplicate intention found: DENY default/web => default/api",
    );
    expect(
        &e.run(&["intention", "create", "-allow", "-deny", "a", "b"])
            .await,
        1,
        "",
        "Only one of -allow or -deny may be specified.",
    );
    expect(
        &e.run(&["intention", "create", "web"]).await,
        1,
        "",
        "Must specify two arguments: source and destination",
    );
    expect(
        &e.run(&["intention", "create", "we*", "api"]).await,
        1,
        "",
        "SourceName: wildcard character '*' cannot be used with partial values",
    );

    // check: Allowed/Denied, exit 0/2, 1 on error.
    expect(
        &e.run(&["intention", "check", "web", "api"]).await,
        2,
        "Denied",
        "",
    );
    expect(
        &e.run(&["intention", "create", "-replace", "-allow", "web", "api"])
            .await,
        0,
        "Created: web => api (allow)",
        "",
    );
    let r = e.run(&["intention", "check", "web", "api"]).await;
    assert_eq!(r.stdout, "Allowed\n");
    expect(&r, 0, "", "");
    expect(
        &e.run(&["intention", "check", "db", "api"]).await,
        2,
        "Denied",
        "",
    );
    expect(
        &e.run(&["intention", "check", "ns1/x", "ns1/db"]).await,
        0,
        "Allowed",
        "",
    );
    expect(
        &e.run(&["intention", "check", "-namespace", "ns1", "x", "db"])
            .await,
        0,
        "Allowed",
        "",
    );
    expect(
        &e.run(&["intention", "check", "we*", "api"]).await,
        1,
        "",
        "Error checking the connection: Unexpected response code: 400 (source \"we*\" is invalid",
    );
    expect(
        &e.run(&["intention", "check", "web"]).await,
        1,
        "",
        "command requires exactly two arguments: src and dst",
    );

    // get, by names and by ID.
    let r = e.run(&["intention", "get", "web", "api"]).await;
    expect(
        &r,
        0,
        "Source:       web\nDestination:  api\nAction:       allow\nID:           ",
        "",
    );
    assert!(r.stdout.contains("Created At:   "), "{}", r.stdout);
    let id = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("ID:"))
        .unwrap()
        .trim()
        .to_owned();
    expect(
        &e.run(&["intention", "get", &id]).await,
        0,
        "Destination:  api",
        "",
    );
    expect(
        &e.run(&["intention", "get", "db", "api"]).await,
        1,
        "",
        "Unexpected response code: 404 (Intention not found)",
    );

    // list: a table in precedence order.
    let r = e.run(&["intention", "list"]).await;
    expect(&r, 0, "", "");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{}", r.stdout);
    assert!(lines[0].starts_with("ID"), "{}", lines[0]);
    for col in ["Source", "Action", "Destination", "Precedence"] {
        assert!(lines[0].contains(col), "{}", lines[0]);
    }
    assert!(lines[1].starts_with(&id) && lines[1].contains("web") && lines[1].ends_with('9'));
    assert!(
        lines[2].contains("ns1/*") && lines[2].ends_with('8'),
        "{}",
        lines[2]
    );

    // match: Consul's one-line form, in evaluation order.
    expect(
        &e.run(&["intention", "match", "api"]).await,
        0,
        "web => api (allow)\n",
        "",
    );
    expect(
        &e.run(&["intention", "match", "-source", "ns1/foo"]).await,
        0,
        "ns1/* => ns1/db (allow)",
        "",
    );
    expect(
        &e.run(&["intention", "match", "-source", "-destination", "x"])
            .await,
        1,
        "",
        "only one of -source or -destination may be specified",
    );

    // delete.
    expect(
        &e.run(&["intention", "delete", "web", "api"]).await,
        0,
        "Intention deleted.",
        "",
    );
    expect(
        &e.run(&["intention", "check", "web", "api"]).await,
        2,
        "Denied",
        "",
    );
    expect(
        &e.run(&["intention", "delete", &id]).await,
        1,
        "",
        "non-existent intention",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_write_reads_hcl_and_json() {
    let e = start().await;
    let hcl = e.file(
        "api.hcl",
        r#"
Kind = "service-intentions"
Name = "api"
Sources = [
  { Name = "web", Action = "allow" },
  { Name = "*", Action = "deny", Description = "everyone else" },
]
"#,
    );
    let r = e.run(&["config", "write", &hcl]).await;
    assert_eq!(r.stdout, "Config entry written: service-intentions/api\n");
    expect(&r, 0, "", "");
    expect(
        &e.run(&["intention", "check", "web", "api"]).await,
        0,
        "Allowed",
        "",
    );
    expect(
        &e.run(&["intention", "check", "db", "api"]).await,
        2,
        "Denied",
        "",
    );

    // JSON, detected by extension and, without one, by content.
    let json = e.file(
        "db.json",
        r#"{"Kind": "service-intentions", "Name": "db",
            "Sources": [{"Name": "api", "Action": "allow"}]}"#,
    );
    expect(
        &e.run(&["config", "write", &json]).await,
        0,
        "Config entry written: service-intentions/db",
        "",
    );
    let noext = e.file(
        "cache",
        r#"  {"Kind": "service-intentions", "Name": "cache", "Sources": [{"Name": "api", "Action": "deny"}]}"#,
    );
    expect(
        &e.run(&["config", "write", &noext]).await,
        0,
        "service-intentions/cache",
        "",
    );
    expect(
        &e.run(&["intention", "check", "api", "db"]).await,
        0,
        "Allowed",
        "",
    );

    // read prints the entry as JSON; the single intentions agree with it.
    let r = e
        .run(&[
            "config",
            "read",
            "-kind",
            "service-intentions",
            "-name",
            "api",
        ])
        .await;
    expect(&r, 0, "", "");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["Kind"], "service-intentions");
    assert_eq!(v["Sources"][0]["Name"], "web");
    assert_eq!(v["Sources"][1]["Description"], "everyone else");
    assert!(
        r.stdout.contains("\n    \"Kind\""),
        "four-space indent: {}",
        r.stdout
    );
    expect(
        &e.run(&["intention", "get", "*", "api"]).await,
        0,
        "Description:  everyone else",
        "",
    );
    expect(
        &e.run(&["config", "list", "-kind", "service-intentions"])
            .await,
        0,
        "api\ncache\ndb\n",
        "",
    );

    // Bad files: nothing is sent, the message names the field.
    let bad = e.file(
        "bad.hcl",
        "Kind = \"service-intentions\"\nName = \"api\"\nSources = [{ Name = \"web\", Action = \"permit\" }]\n",
    );
    expect(
        &e.run(&["config", "write", &bad]).await,
        1,
        "",
        "Failed to decode config entry input: Sources[0].Action",
    );
    let bad = e.file(
        "bad.json",
        r#"{"Kind": "service-intentions", "Name": "api", "Sorces": []}"#,
    );
    expect(&e.run(&["config", "write", &bad]).await, 1, "", "Sorces");
    let bad = e.file(
        "kind.json",
        r#"{"Kind": "proxy-defaults", "Name": "global"}"#,
    );
    expect(&e.run(&["config", "write", &bad]).await, 1, "", "Kind");
    // service-defaults: written, read back, an unsupported protocol refused naming the field.
    let defaults = e.file(
        "defaults.hcl",
        "Kind = \"service-defaults\"\nName = \"api\"\nProtocol = \"http\"\n",
    );
    expect(
        &e.run(&["config", "write", &defaults]).await,
        0,
        "Config entry written: service-defaults/api",
        "",
    );
    expect(
        &e.run(&[
            "config",
            "read",
            "-kind",
            "service-defaults",
            "-name",
            "api",
        ])
        .await,
        0,
        "\"Protocol\": \"http\"",
        "",
    );
    let grpc = e.file(
        "grpc.json",
        r#"{"Kind": "service-defaults", "Name": "api", "Protocol": "grpc"}"#,
    );
    expect(&e.run(&["config", "write", &grpc]).await, 1, "", "Protocol");
    expect(
        &e.run(&["config", "write", "/nonexistent/x.hcl"]).await,
        1,
        "",
        "Failed to load data",
    );
    expect(
        &e.run(&["intention", "check", "web", "api"]).await,
        0,
        "Allowed",
        "",
    );

    // CAS.
    expect(
        &e.run(&["config", "write", "-cas", "-modify-index", "0", &json])
            .await,
        1,
        "",
        "Config entry not updated: service-intentions/db",
    );

    // delete.
    expect(
        &e.run(&[
            "config",
            "delete",
            "-kind",
            "service-intentions",
            "-name",
            "api",
        ])
        .await,
        0,
        "Config entry deleted: service-intentions/api",
        "",
    );
    expect(
        &e.run(&["intention", "check", "web", "api"]).await,
        2,
        "Denied",
        "",
    );
    expect(
        &e.run(&["config", "read", "-kind", "service-intentions", "-name", "api"]).await,
        1,
        "",
        "Error reading config entry service-intentions/api: Unexpected response code: 404 (Config entry not found",
    );
    expect(
        &e.run(&[
            "config",
            "read",
            "-kind",
            "proxy-defaults",
            "-name",
            "global",
        ])
        .await,
        1,
        "",
        "invalid config entry kind",
    );
    expect(
        &e.run(&["config", "read", "-name", "api"]).await,
        1,
        "",
        "Must specify the -kind parameter",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_addresses_and_errors() {
    let e = start().await;
    // Create a read-only token and use it.
    let r = e
        .run(&[
            "acl",
            "token",
            "create",
            "-description",
            "viewer",
            "-policy",
            "read-only",
        ])
        .await;
    expect(&r, 0, "Description:      viewer\n", "");
    assert!(
        r.stdout
            .contains("   00000000-0000-0000-0000-000000000002 - read-only"),
        "{}",
        r.stdout
    );
    let field = |name: &str| {
        r.stdout
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let (accessor, secret) = (field("AccessorID:"), field("SecretID:"));
    expect(
        &e.run(&["-token", &secret, "intention", "list"]).await,
        2,
        "",
        "There are no intentions.",
    );
    expect(
        &e.run(&["intention", "create", "-token", &secret, "web", "api"])
            .await,
        1,
        "",
        "Unexpected response code: 403 (Permission denied: token with AccessorID",
    );
    // A token from a file.
    let tf = e.file("token", &format!("{secret}\n"));
    expect(
        &e.run_with(
            &["acl", "token", "read", "-self"],
            &[("MESH_HTTP_TOKEN_FILE", &tf)],
        )
        .await,
        0,
        &accessor,
        "",
    );
    // No token: 401.
    expect(
        &e.run_with(&["intention", "list"], &[]).await,
        1,
        "",
        "Unexpected response code: 401",
    );
    // intention-write tokens.
    let r = e
        .run(&["acl", "token", "create", "-policy", "intention-write:api"])
        .await;
    expect(&r, 0, "intention-write:default/api", "");
    let writer = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("SecretID:"))
        .unwrap()
        .trim()
        .to_owned();
    expect(
        &e.run(&["-token", &writer, "intention", "create", "web", "api"])
            .await,
        0,
        "Created",
        "",
    );
    expect(
        &e.run(&["-token", &writer, "intention", "create", "web", "db"])
            .await,
        1,
        "",
        "403",
    );
    expect(
        &e.run(&["acl", "token", "create", "-policy", "root"]).await,
        1,
        "",
        "Failed to create new token: Unexpected response code: 400 (Policies[0].Name: unknown policy \"root\"",
    );
    // list hides secrets; delete.
    let r = e.run(&["acl", "token", "list"]).await;
    expect(&r, 0, "SecretID:         <hidden>", "");
    assert_eq!(r.stdout.matches("AccessorID:").count(), 3);
    assert!(!r.stdout.contains(&secret));
    expect(
        &e.run(&["acl", "token", "delete", "-id", &accessor]).await,
        0,
        &format!("Token \"{accessor}\" deleted successfully"),
        "",
    );
    expect(
        &e.run(&["-token", &secret, "intention", "list"]).await,
        1,
        "",
        "ACL not found",
    );

    // The Unix socket, by -http-addr.
    let sock = format!("unix://{}", e.server.socket_path().unwrap().display());
    expect(
        &e.run(&["-http-addr", &sock, "intention", "check", "web", "api"])
            .await,
        0,
        "Allowed",
        "",
    );
    expect(
        &e.run(&[&format!("-http-addr={sock}"), "intention", "list"])
            .await,
        0,
        "web",
        "",
    );
    // Nobody there; a bad address; a bad flag.
    let nobody = format!("unix://{}", e.dir.path().join("nobody.sock").display());
    expect(
        &e.run(&["-http-addr", &nobody, "intention", "list"]).await,
        1,
        "",
        "Error connecting to the agent",
    );
    expect(
        &e.run(&["-http-addr", "https://x:1", "intention", "list"])
            .await,
        1,
        "",
        "https",
    );
    expect(
        &e.run(&["intention", "create", "-bogus", "a", "b"]).await,
        1,
        "",
        "--bogus",
    );
    expect(&e.run(&["intention", "-help"]).await, 0, "check", "");
    assert!(Path::new(&e.dir.path().join("api-state.json")).exists());
}

/// The same arguments name the same intention for every verb: a bare name is in the
/// request's namespace (`-namespace`, else `default`), never the other argument's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_arguments_name_the_same_intention_in_every_verb() {
    let e = start().await;
    expect(
        &e.run(&["intention", "create", "-allow", "web", "backend/api-v1"])
            .await,
        0,
        "Created: web => backend/api-v1 (allow)",
        "",
    );
    expect(
        &e.run(&["intention", "get", "web", "backend/api-v1"]).await,
        0,
        "Source:       web\nDestination:  backend/api-v1\nAction:       allow",
        "",
    );
    expect(
        &e.run(&["intention", "check", "web", "backend/api-v1"])
            .await,
        0,
        "Allowed",
        "",
    );
    // backend/web is another service: no rule, denied.
    expect(
        &e.run(&["intention", "check", "backend/web", "backend/api-v1"])
            .await,
        2,
        "Denied",
        "",
    );
    // -replace replaces that intention rather than adding a second one.
    expect(
        &e.run(&[
            "intention",
            "create",
            "-replace",
            "-deny",
            "web",
            "backend/api-v1",
        ])
        .await,
        0,
        "Created: web => backend/api-v1 (deny)",
        "",
    );
    let r = e.run(&["intention", "list"]).await;
    expect(&r, 0, "", "");
    assert_eq!(r.stdout.lines().count(), 2, "{}", r.stdout);
    assert!(r.stdout.contains("deny"), "{}", r.stdout);
    expect(
        &e.run(&["intention", "match", "-source", "web"]).await,
        0,
        "web => backend/api-v1 (deny)",
        "",
    );

    // With -namespace the bare names are in that namespace, for every verb.
    expect(
        &e.run(&[
            "intention",
            "create",
            "-namespace",
            "backend",
            "-allow",
            "web",
            "api-v1",
        ])
        .await,
        0,
        "Created: web => api-v1 (allow)",
        "",
    );
    expect(
        &e.run(&["intention", "get", "-namespace", "backend", "web", "api-v1"])
            .await,
        0,
        "Source:       backend/web\nDestination:  backend/api-v1\nAction:       allow",
        "",
    );
    expect(
        &e.run(&["intention", "check", "backend/web", "backend/api-v1"])
            .await,
        0,
        "Allowed",
        "",
    );
    expect(
        &e.run(&["intention", "check", "web", "backend/api-v1"])
            .await,
        2,
        "Denied",
        "",
    );
    // delete takes the same arguments; the other intention stays.
    expect(
        &e.run(&["intention", "delete", "web", "backend/api-v1"])
            .await,
        0,
        "Intention deleted.",
        "",
    );
    expect(
        &e.run(&["intention", "get", "web", "backend/api-v1"]).await,
        1,
        "",
        "404",
    );
    expect(
        &e.run(&["intention", "get", "backend/web", "backend/api-v1"])
            .await,
        0,
        "Source:       backend/web",
        "",
    );
    expect(
        &e.run(&[
            "intention",
            "delete",
            "-namespace",
            "backend",
            "web",
            "api-v1",
        ])
        .await,
        0,
        "Intention deleted.",
        "",
    );
    expect(
        &e.run(&["intention", "list"]).await,
        2,
        "",
        "There are no intentions.",
    );

    // partition/ns/name for partition default; another partition and peers are refused,
    // naming them.
    expect(
        &e.run(&["intention", "create", "default/ns1/web", "default/ns1/db"])
            .await,
        0,
        "Created: ns1/web => ns1/db (allow)",
        "",
    );
    expect(
        &e.run(&["intention", "check", "ns1/web", "ns1/db"]).await,
        0,
        "Allowed",
        "",
    );
    expect(
        &e.run(&["intention", "create", "p1/ns1/web", "ns1/db"])
            .await,
        1,
        "",
        "partition \"p1\" does not exist",
    );
    expect(
        &e.run(&["intention", "create", "peer:other/web", "ns1/db"])
            .await,
        1,
        "",
        "Error: Invalid intention source: Peer: peer \"other\" is not served",
    );
    expect(
        &e.run(&["intention", "check", "peer:other/web", "ns1/db"])
            .await,
        1,
        "",
        "source \"peer:other/web\" is invalid: Peer: peer \"other\" is not served",
    );
    expect(
        &e.run(&["intention", "list", "-partition", "p3"]).await,
        1,
        "",
        "partition \"p3\" does not exist",
    );
    expect(
        &e.run(&[
            "intention",
            "check",
            "-partition",
            "default",
            "ns1/web",
            "ns1/db",
        ])
        .await,
        0,
        "Allowed",
        "",
    );
    expect(
        &e.run(&["intention", "get", "web", "p2/ns1/db"]).await,
        1,
        "",
        "destination \"p2/ns1/db\" is invalid: Partition: partition \"p2\" does not exist",
    );
}

#[tokio::test]
async fn status_and_intention_list_show_when_the_proxy_decides() {
    use mesh_api::{KernelIntentions, MeshStatus, PublishedStatus};
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::new(dir.path());
    cfg.http_addr = Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)));
    cfg.max_intentions = 262_144;
    let status = std::sync::Arc::new(PublishedStatus::default());
    let hooks = Hooks {
        status: status.clone(),
        ..Hooks::default()
    };
    let server = Server::start(cfg, hooks).await.unwrap();
    let root = server.bootstrap_token().unwrap().to_owned();
    let env = Env { dir, server, root };
    let r = env
        .run(&["intention", "create", "-allow", "web", "api"])
        .await;
    expect(&r, 0, "Created: web => api (allow)", "");
    status.publish(MeshStatus {
        kernel_intentions: KernelIntentions::InSync,
        intentions: 1,
    });
    let r = env.run(&["status"]).await;
    expect(&r, 0, "mesh:\n\tkernel_intentions = in-sync\n", "");
    expect(
        &r,
        0,
        "\tintentions = 1\n\tstored_intentions = 1\n\tmax_intentions = 262144",
        "",
    );
    assert!(r.stderr.is_empty(), "{}", r.stderr);
    let r = env.run(&["intention", "list"]).await;
    expect(&r, 0, "web", "");
    assert!(r.stderr.is_empty(), "{}", r.stderr);

    status.publish(MeshStatus {
        kernel_intentions: KernelIntentions::ProxyDecides {
            reason: "intention map full".into(),
        },
        intentions: 1,
    });
    let r = env.run(&["status"]).await;
    expect(
        &r,
        0,
        "\tkernel_intentions = proxy-decides\n\treason = intention map full\n",
        "Warning: the kernel does not hold the intentions (intention map full)",
    );
    let r = env.run(&["intention", "list"]).await;
    expect(
        &r,
        0,
        "web",
        "Warning: the kernel does not hold the intentions (intention map full); the proxies \
         decide every connection",
    );
    // Without a token the list fails as before and the status is not shown.
    let r = env.run_with(&["status"], &[]).await;
    expect(&r, 1, "", "Error querying the agent's status");
}
