//! Bytes through the proxy: large transfers with half-close, resets passed on.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_upstream_10_mib_each_way_with_half_close() {
    within(120, async {
        let env = Env::new(test_config());
        // App A reads everything until the caller's end of stream, then answers with all of it.
        let app_a = App::start(|mut stream| async move {
            let mut all = Vec::new();
            stream.read_to_end(&mut all).await.unwrap();
            stream.write_all(&all).await.unwrap();
            stream.shutdown().await.unwrap();
        })
        .await;
        // App B speaks first and half-closes, then reads the caller's answer to its end.
        let (got_tx, mut got_rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        let app_b = App::start(move |mut stream| {
            let got_tx = got_tx.clone();
            async move {
                stream.write_all(&pattern(2, 10 * MIB)).await.unwrap();
                stream.shutdown().await.unwrap();
                let mut all = Vec::new();
                stream.read_to_end(&mut all).await.unwrap();
                got_tx.send(all).unwrap();
            }
        })
        .await;
        let (api, inbound) = env.server("api", &[app_a.port, app_b.port]);
        let mut web = env.client("web", None);
        let to_a = env.upstream(&mut web, "api-a", "api", app_a.port, vec![inbound]);
        let to_b = env.upstream(&mut web, "api-b", "api", app_b.port, vec![inbound]);

        // A: the caller sends 10 MiB and half-closes; the answer still flows back.
        let sent = pattern(1, 10 * MIB);
        let mut stream = TcpStream::connect(to_a).await.unwrap();
        stream.write_all(&sent).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back.len(), sent.len());
        assert!(back == sent, "10 MiB came back altered");
        drop(stream);

        // B: the app sends 10 MiB and half-closes; the caller answers after the end of stream.
        let mut stream = TcpStream::connect(to_b).await.unwrap();
        let mut first = Vec::new();
        stream.read_to_end(&mut first).await.unwrap();
        assert!(first == pattern(2, 10 * MIB), "10 MiB from the app altered");
        let answer = pattern(3, 10 * MIB);
        stream.write_all(&answer).await.unwrap();
        stream.shutdown().await.unwrap();
        let got = got_rx.recv().await.unwrap();
        assert_eq!(got.len(), answer.len());
        assert!(got == answer, "10 MiB to the app altered");
        drop(stream);

        eventually("both connections closed", || {
            web.stats().active_connections == 0 && api.stats().active_connections == 0
        })
        .await;
        let (w, a) = (web.stats(), api.stats());
        let twenty = 20 * MIB as u64;
        assert_eq!(
            (w.bytes_from_app, w.bytes_to_app),
            (twenty, twenty),
            "{w:?}"
        );
        assert_eq!(
            (a.bytes_to_app, a.bytes_from_app),
            (twenty, twenty),
            "{a:?}"
        );
        assert_eq!((w.outbound_connections, w.tls_handshakes), (2, 2));
        assert_eq!((a.inbound_connections, a.tls_handshakes), (2, 2));
        assert_eq!(w.errors + a.errors + w.tls_failures + a.tls_failures, 0);
        assert_eq!(app_a.accepted() + app_b.accepted(), 2);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_by_the_app_reaches_the_caller_as_a_reset() {
    within(30, async {
        let env = Env::new(test_config());
        // The app answers part of a reply, then aborts its connection.
        let app = App::start(|mut stream| async move {
            let mut first = [0u8; 1];
            let _ = stream.read_exact(&mut first).await;
            let _ = stream.write_all(b"partial").await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = stream.set_zero_linger();
        })
        .await;
        let (_api, inbound) = env.server("api", &[app.port]);
        let mut web = env.client("web", None);
        let to_api = env.upstream(&mut web, "api", "api", app.port, vec![inbound]);
        let mut stream = TcpStream::connect(to_api).await.unwrap();
        stream.write_all(b"?").await.unwrap();
        let ended = tokio::time::timeout(Duration::from_secs(3), async {
            let mut buf = [0u8; 64];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => return Ok(()),
                    Ok(_) => continue,
                    Err(e) => return Err(e),
                }
            }
        })
        .await
        .expect("connection still open after 3 s");
        let error = ended.expect_err("an aborted connection ended like a complete one");
        assert_eq!(error.kind(), io::ErrorKind::ConnectionReset);
    })
    .await;
}
