use std::io::BufReader;
use std::os::unix::net::UnixListener;
use std::thread::JoinHandle;

use super::*;

/// A stand-in agent answering one request with `reply`; joins to the request it got.
fn agent(dir: &Path, reply: Reply) -> (PathBuf, JoinHandle<Request>) {
    let path = dir.join("cni.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let request: Request = wire::read_line(&mut BufReader::new(&stream)).unwrap();
        wire::write_line(&mut &stream, &reply).unwrap();
        request
    });
    (path, handle)
}

fn env(command: &str) -> BTreeMap<String, String> {
    [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", "c0ffee"),
        ("CNI_NETNS", "/var/run/netns/cni-1234"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=0c4d6e4a-8a3e-4c8e-9f0a-2b1d3c4e5f60",
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// What the bridge plugin prints, as the runtime passes it on.
const PREV: &str = r#"{"cniVersion":"1.0.0","interfaces":[{"name":"cni0","mac":"aa:bb:cc:dd:ee:ff"},{"name":"eth0","mac":"aa:bb:cc:dd:ee:01","sandbox":"/var/run/netns/cni-1234"}],"ips":[{"interface":1,"address":"10.91.1.5/24","gateway":"10.91.1.1"}],"routes":[{"dst":"0.0.0.0/0"}],"dns":{}}"#;

fn conf(socket: &Path, extra: &str) -> Vec<u8> {
    format!(
        r#"{{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"mesh-cni","socketPath":{}{extra},"prevResult":{PREV}}}"#,
        serde_json::to_string(socket).unwrap()
    )
    .into_bytes()
}

fn error_of(out: &Output) -> Value {
    assert_eq!(out.exit, 1, "{out:?}");
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["cniVersion"], "1.0.0", "{v}");
    v
}

#[test]
fn add_hands_the_pod_to_the_agent_and_passes_prev_result_through_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = agent(dir.path(), Reply::Meshed);
    let out = run(&env("ADD"), &conf(&sock, ""));
    assert_eq!(out.exit, 0, "{out:?}");
    let printed: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(printed, serde_json::from_str::<Value>(PREV).unwrap());
    let Request::Add(pod) = seen.join().unwrap() else {
        panic!("not an ADD")
    };
    assert_eq!(
        pod,
        Pod {
            namespace: "default".into(),
            name: "web-0".into(),
            uid: Some("0c4d6e4a-8a3e-4c8e-9f0a-2b1d3c4e5f60".into()),
            container_id: "c0ffee".into(),
            netns: Some("/var/run/netns/cni-1234".into()),
            ifname: "eth0".into(),
            ips: vec!["10.91.1.5".parse().unwrap()],
        }
    );
}

#[test]
fn a_pod_outside_the_mesh_passes_and_a_refused_one_fails_with_the_agents_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = agent(dir.path(), Reply::NotInMesh);
    let out = run(&env("ADD"), &conf(&sock, ""));
    assert_eq!(out.exit, 0, "{out:?}");
    seen.join().unwrap();
    std::fs::remove_file(&sock).unwrap();
    let (sock, seen) = agent(
        dir.path(),
        Reply::Refused {
            reason: "no free inbound listener slot".into(),
        },
    );
    let out = run(&env("ADD"), &conf(&sock, ""));
    let v = error_of(&out);
    assert_eq!(v["code"], code::REFUSED);
    assert_eq!(v["msg"], "meshd refused to mesh pod default/web-0");
    assert_eq!(v["details"], "no free inbound listener slot");
    seen.join().unwrap();
}

#[test]
fn add_without_an_agent_fails_saying_so_and_del_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("absent.sock");
    let v = error_of(&run(&env("ADD"), &conf(&sock, "")));
    assert_eq!(v["code"], code::TRY_AGAIN_LATER);
    assert_eq!(v["msg"], "meshd is not running on this node");
    assert!(
        v["details"].as_str().unwrap().contains("absent.sock"),
        "{v}"
    );
    let out = run(&env("DEL"), &conf(&sock, ""));
    assert_eq!((out.exit, out.stdout.as_str()), (0, ""), "{out:?}");
    // DEL after the namespace is gone, without prevResult.
    let mut gone = env("DEL");
    gone.remove("CNI_NETNS");
    let bare = format!(
        r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","socketPath":{}}}"#,
        serde_json::to_string(&sock).unwrap()
    );
    assert_eq!(run(&gone, bare.as_bytes()).exit, 0);
    let v = error_of(&run(&env("STATUS"), &conf(&sock, "")));
    assert_eq!(v["code"], code::NOT_AVAILABLE);
}

#[test]
fn excluded_namespaces_and_containers_without_a_pod_never_ask_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("absent.sock");
    let mut system = env("ADD");
    system.insert(
        "CNI_ARGS".into(),
        "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=coredns-1".into(),
    );
    assert_eq!(run(&system, &conf(&sock, "")).exit, 0);
    // An explicit list replaces the default one.
    let v = error_of(&run(
        &system,
        &conf(&sock, r#","excludeNamespaces":["infra"]"#),
    ));
    assert_eq!(v["code"], code::TRY_AGAIN_LATER);
    let mut bare = env("ADD");
    bare.remove("CNI_ARGS");
    let out = run(&bare, &conf(&sock, ""));
    assert_eq!(out.exit, 0, "{out:?}");
}

#[test]
fn check_reports_what_the_agent_found() {
    let dir = tempfile::tempdir().unwrap();
    let (sock, seen) = agent(
        dir.path(),
        Reply::Refused {
            reason: "sk_lookup: the pin cannot be opened".into(),
        },
    );
    let v = error_of(&run(&env("CHECK"), &conf(&sock, "")));
    assert_eq!(v["code"], code::REFUSED);
    assert_eq!(v["details"], "sk_lookup: the pin cannot be opened");
    assert!(matches!(seen.join().unwrap(), Request::Check(_)));
    std::fs::remove_file(&sock).unwrap();
    let (sock, seen) = agent(dir.path(), Reply::Meshed);
    let out = run(&env("CHECK"), &conf(&sock, ""));
    assert_eq!((out.exit, out.stdout.as_str()), (0, ""), "{out:?}");
    seen.join().unwrap();
}

#[test]
fn an_agent_that_does_not_answer_in_time_fails_the_add() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let slow = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        drop(stream);
    });
    let started = std::time::Instant::now();
    let v = error_of(&run(&env("ADD"), &conf(&path, r#","timeoutSeconds":0.3"#)));
    assert!(
        started.elapsed() < Duration::from_millis(1200),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(v["code"], code::TRY_AGAIN_LATER, "{v}");
    assert!(v["msg"].as_str().unwrap().contains("did not answer"), "{v}");
    slow.join().unwrap();
}

#[test]
fn bad_invocations_get_the_specs_codes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("absent.sock");
    let v: Value =
        serde_json::from_str(&run(&env("VERSION"), br#"{"cniVersion":"1.0.0"}"#).stdout).unwrap();
    assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
    let out = run(&env("ADD"), b"not json");
    let v: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!((out.exit, v["code"].as_u64()), (1, Some(6)));
    let old = br#"{"cniVersion":"0.2.0","name":"n","type":"mesh-cni"}"#;
    let v: Value = serde_json::from_str(&run(&env("ADD"), old).stdout).unwrap();
    assert_eq!(v["code"], code::INCOMPATIBLE_VERSION);
    let mut no_netns = env("ADD");
    no_netns.remove("CNI_NETNS");
    let v = error_of(&run(&no_netns, &conf(&sock, "")));
    assert_eq!(
        (v["code"].as_u64(), v["msg"].as_str()),
        (Some(4), Some("CNI_NETNS is not set"))
    );
    let v = error_of(&run(&env("ADD"), &conf(&sock, r#","timeoutSeconds":-1"#)));
    assert_eq!(v["code"], code::INVALID_CONFIG);
    assert!(v["msg"].as_str().unwrap().contains("timeoutSeconds"), "{v}");
    let first = format!(
        r#"{{"cniVersion":"1.0.0","name":"n","type":"mesh-cni","socketPath":{}}}"#,
        serde_json::to_string(&sock).unwrap()
    );
    let v = error_of(&run(&env("ADD"), first.as_bytes()));
    assert!(v["msg"].as_str().unwrap().contains("prevResult"), "{v}");
    let v = error_of(&run(&env("FROB"), &conf(&sock, "")));
    assert_eq!(v["code"], code::INVALID_ENV);
}
