//! The web UI in a real browser: headless Chromium (Debian's `chromium`) driven through
//! `chromedriver` with fantoccini, against `meshd local`. The tutorial as a user does it in
//! Consul's UI: the deny-all intention from the Intentions page, the Services page, fake-service's
//! own page through `meshctl port-forward` (a 500, the failed upstream), web's topology with
//! the denied edge, the allow created from it, fake-service's 200, the edge turning allowed.
//! Also: a read-only token cannot write, a bad token is refused, and api-v1 in namespace
//! `backend`. Each step is saved as a screenshot under `target/ui-screenshots/` (the ones in
//! `docs/ui/` are copied from there).
//!
//! The browser only ever loads loopback URLs ([`Browser::goto`] refuses others, and its host
//! resolver resolves nothing but `localhost`); chromedriver listens on a free loopback port.
//! Chromium runs as root, so without its sandbox, and in a profile directory of its own.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use super::local::{examples, LocalMesh};

/// How long a page may take to show what a step waits for: the UI follows the agent every
/// second, the dataplane applies an intention within a few.
const STEP: Duration = Duration::from_secs(20);

/// Where the screenshots go: `target/ui-screenshots/` of the source tree.
fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/ui-screenshots")
}

/// Chromium driven by a chromedriver child (in its own process group, which holds the
/// browser's processes too): the whole group is killed on drop.
struct Browser {
    client: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free loopback port and a headless Chromium session with a
    /// `width`×`height` window.
    async fn start(width: u32, height: u32) -> Result<Browser> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let profile = tempfile::tempdir()?;
        let driver = {
            use std::os::unix::process::CommandExt;
            Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .context(
                    "starting chromedriver (installed by `cargo xtask setup`: chromium-driver)",
                )?
        };
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": "/usr/bin/chromium",
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.path().display()),
                    format!("--window-size={width},{height}"),
                    "--hide-scrollbars",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-default-apps",
                    "--disable-extensions",
                    "--disable-sync",
                    // Nothing but localhost resolves; the test only loads 127.0.0.1 URLs.
                    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
                ],
            }),
        );
        let url = format!("http://127.0.0.1:{port}");
        let started = Instant::now();
        let mut browser = None;
        let mut last = String::new();
        while started.elapsed() < Duration::from_secs(30) {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            match ClientBuilder::new(connector)
                .capabilities(caps.clone())
                .connect(&url)
                .await
            {
                Ok(c) => {
                    browser = Some(c);
                    break;
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let mut b = Browser {
            client: match browser {
                Some(c) => c,
                None => {
                    let mut d = driver;
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(d.id() as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    let _ = d.wait();
                    bail!("no WebDriver session from chromedriver within 30 s: {last}");
                }
            },
            driver,
            _profile: profile,
        };
        b.client.set_window_size(width, height).await?;
        b.resize_viewport(width, height).await?;
        Ok(b)
    }

    /// Makes the page area `width`×`height` (headless windows have no frame, but be sure).
    async fn resize_viewport(&mut self, width: u32, height: u32) -> Result<()> {
        let inner = self
            .client
            .execute("return [window.innerWidth, window.innerHeight];", vec![])
            .await?;
        let (iw, ih) = (
            inner[0].as_u64().unwrap_or(width as u64) as u32,
            inner[1].as_u64().unwrap_or(height as u64) as u32,
        );
        if (iw, ih) != (width, height) {
            self.client
                .set_window_size(
                    width + (width.saturating_sub(iw)),
                    height + height.saturating_sub(ih),
                )
                .await?;
        }
        Ok(())
    }

    /// Loads `url`, which must be a loopback URL.
    async fn goto(&self, url: &str) -> Result<()> {
        let rest = url
            .strip_prefix("http://")
            .context("only http:// URLs are loaded")?;
        let host = rest.split(['/', ':']).next().unwrap_or_default();
        ensure!(
            host == "127.0.0.1" || host == "localhost",
            "the browser loads loopback URLs only, not {url}"
        );
        self.client.goto(url).await?;
        Ok(())
    }

    /// Polls `f` every 200 ms until it answers `Some`, failing past [`STEP`] with what
    /// the page shows.
    async fn until<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<Option<T>>>,
    {
        let start = Instant::now();
        let mut last = String::new();
        loop {
            match f().await {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => last.clear(),
                Err(e) => last = format!(" (last error: {e:#})"),
            }
            if start.elapsed() > STEP {
                let text = self
                    .client
                    .find(Locator::Css("body"))
                    .await
                    .map(|b| async move { b.text().await.unwrap_or_default() });
                let text = match text {
                    Ok(t) => t.await,
                    Err(_) => String::new(),
                };
                bail!("waited {STEP:?} for {what}{last}; the page shows:\n{text}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The element `css` once it is on the page.
    async fn find(&self, css: &str) -> Result<Element> {
        self.until(&format!("an element {css}"), || async {
            Ok(self.client.find(Locator::Css(css)).await.ok())
        })
        .await
    }

    /// Waits until the element `css` holds `text`; returns its whole text.
    async fn text_in(&self, css: &str, text: &str) -> Result<String> {
        self.until(&format!("{text:?} in {css}"), || async {
            let Ok(e) = self.client.find(Locator::Css(css)).await else {
                return Ok(None);
            };
            let t = e.text().await?;
            Ok(t.contains(text).then_some(t))
        })
        .await
    }

    /// Waits for an element `css` whose attribute `attr` is `value`.
    async fn with_attr(&self, css: &str, attr: &str, value: &str) -> Result<Element> {
        self.until(&format!("{css} with {attr}={value:?}"), || async {
            for e in self.client.find_all(Locator::Css(css)).await? {
                if e.attr(attr).await?.as_deref() == Some(value) {
                    return Ok(Some(e));
                }
            }
            Ok(None)
        })
        .await
    }

    /// Types into the input `css` (cleared first).
    async fn fill(&self, css: &str, text: &str) -> Result<()> {
        let e = self.find(css).await?;
        e.clear().await?;
        e.send_keys(text).await?;
        Ok(())
    }

    async fn click(&self, css: &str) -> Result<()> {
        self.find(css).await?.click().await?;
        Ok(())
    }

    /// Saves the page as `target/ui-screenshots/<name>.png`.
    async fn shot(&self, name: &str) -> Result<()> {
        let png = self.client.screenshot().await?;
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(format!("{name}.png")), png)?;
        Ok(())
    }

    /// Logs in with `token` from the top right; waits for the dialog's answer and returns
    /// what the dialog says when it refuses (`None` when it closed: logged in).
    async fn log_in(&self, token: &str) -> Result<Option<String>> {
        if self
            .client
            .find(Locator::Css("#logout:not([hidden])"))
            .await
            .is_ok()
        {
            self.click("#logout").await?;
        }
        self.click("#login-open").await?;
        self.fill("#login-token", token).await?;
        self.click("#login-submit").await?;
        self.until("the login's answer", || async {
            let open = self
                .client
                .execute("return document.getElementById('login').open;", vec![])
                .await?;
            if open == Value::Bool(false) {
                return Ok(Some(None));
            }
            let err = self
                .client
                .find(Locator::Css("#login-error"))
                .await?
                .text()
                .await?;
            Ok((!err.is_empty()).then_some(Some(err)))
        })
        .await
    }

    /// The tooltip of the disabled write control `css` (it must be disabled).
    async fn disabled_reason(&self, css: &str) -> Result<String> {
        let b = self.find(css).await?;
        ensure!(
            b.attr("disabled").await?.is_some(),
            "{css} is enabled, but must be disabled"
        );
        b.attr("title")
            .await?
            .with_context(|| format!("{css} is disabled without a tooltip saying why"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and the Chromium it started share the group it leads.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.driver.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.driver.wait();
    }
}

/// Applies the manifests of `dir` (and waits until `pods` are Ready).
fn apply(mesh: &mut LocalMesh, dir: PathBuf, pods: &[&str]) -> Result<()> {
    mesh.meshctl(&["apply", "-f", dir.to_str().context("path")?])?;
    mesh.wait_ready(pods)
}

/// A new token with `policy`: its SecretID.
fn token_with(mesh: &LocalMesh, policy: &str) -> Result<String> {
    let out = mesh.meshctl(&[
        "acl",
        "token",
        "create",
        "-description",
        &format!("UI test {policy}"),
        "-policy-name",
        policy,
    ])?;
    out.lines()
        .find_map(|l| l.strip_prefix("SecretID:").map(|s| s.trim().to_owned()))
        .with_context(|| format!("no SecretID in {out}"))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// fake-service's page at `fwd`: waits until the top call answered `code`; returns the page's
/// text.
async fn fake_service_page(b: &Browser, fwd: SocketAddr, code: u16) -> Result<String> {
    b.goto(&format!("http://127.0.0.1:{}/ui", fwd.port()))
        .await?;
    b.until(&format!("fake-service's page showing {code}"), || async {
        let Ok(top) = b.client.find(Locator::Css("#tree > li")).await else {
            return Ok(None);
        };
        if top.attr("data-code").await?.as_deref() == Some(&code.to_string()) {
            return Ok(Some(
                b.client.find(Locator::Css("#tree")).await?.text().await?,
            ));
        }
        // Not yet: ask again, as a user reloads.
        b.client.find(Locator::Css("#call")).await?.click().await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(None)
    })
    .await
}

#[test]
fn tutorial_through_the_ui() -> Result<()> {
    let mut mesh = LocalMesh::start("ebpf")?;
    apply(
        &mut mesh,
        examples(),
        &["default/api-v1-0", "default/web-0"],
    )?;
    let web = mesh.port_forward("web", 9090)?;
    let read_only = token_with(&mesh, "read-only")?;
    let ui = format!("http://{}/ui", mesh.http_addr);
    let rt = runtime()?;
    rt.block_on(async {
        let b = Browser::start(1280, 800).await?;

        // Without a token nothing can be read (this agent's ACLs deny by default) and
        // nothing can be written: the page says so.
        b.goto(&format!("{ui}/intentions")).await?;
        b.text_in("#intentions", "needs an ACL token").await?;
        let why = b.disabled_reason("#create-intention").await?;
        ensure!(
            why.contains("Log in"),
            "tooltip of Create without a token: {why}"
        );
        b.shot("01-logged-out").await?;

        // Log in with the bootstrap token, top right.
        ensure!(
            b.log_in(&mesh.token).await?.is_none(),
            "the bootstrap token was refused"
        );
        b.text_in("#who", "operator").await?;

        // The deny-all intention from the Intentions page; a form error names the field.
        b.click("a#create-intention").await?;
        b.find("#f-SourceName").await?;
        b.fill("#f-SourceNS", "*").await?;
        b.fill("#f-DestinationNS", "*").await?;
        b.fill("#f-DestinationName", "*").await?;
        b.click("input[name=Action][value=deny]").await?;
        b.click("#save-intention").await?;
        let err = b.text_in("#e-SourceName", "SourceName").await?;
        eprintln!("the form's error for a missing source: {err}");
        ensure!(
            b.find("#f-SourceName")
                .await?
                .attr("aria-invalid")
                .await?
                .as_deref()
                == Some("true"),
            "the source field is not marked invalid"
        );
        b.shot("02-intention-form-error").await?;
        b.fill("#f-SourceName", "*").await?;
        b.fill("#f-Description", "Deny everything by default")
            .await?;
        b.click("#save-intention").await?;
        let row = b
            .with_attr("#intentions tr", "data-intention", "*/* => */*")
            .await?;
        let text = row.text().await?;
        ensure!(
            text.contains("deny") && text.contains("Deny everything by default"),
            "the deny-all row: {text}"
        );
        b.shot("03-intentions-deny-all").await?;

        // The Services page: web and api-v1, one healthy instance each, in the mesh.
        b.click("nav a[data-nav=services]").await?;
        for svc in ["web", "api-v1"] {
            let row = b.with_attr("#services tr", "data-service", svc).await?;
            let text = row.text().await?;
            ensure!(
                text.contains("1 instance")
                    && text.contains("1 passing, 0 critical")
                    && text.contains("in mesh")
                    && !text.contains("not in mesh"),
                "{svc}'s row on the Services page: {text}"
            );
        }
        b.fill("#service-search", "api").await?;
        b.until("the search to leave only api-v1", || async {
            let rows = b
                .client
                .find_all(Locator::Css("#services tbody tr"))
                .await?;
            let mut names = Vec::new();
            for r in rows {
                names.push(r.attr("data-service").await?.unwrap_or_default());
            }
            Ok((names == ["api-v1"]).then_some(()))
        })
        .await?;
        b.fill("#service-search", "").await?;
        b.with_attr("#services tr", "data-service", "web").await?;
        b.shot("04-services").await?;

        // fake-service's own page through the port-forward: the 500 and the failed upstream.
        let tree = fake_service_page(&b, web, 500).await?;
        let failed = b.find("#tree li li.failed").await?;
        let failed_text = failed.text().await?;
        ensure!(
            failed_text.contains("http://localhost:9091")
                && failed
                    .find(Locator::Css(".error"))
                    .await?
                    .text()
                    .await?
                    .contains("Error"),
            "the failed upstream with its error: {failed_text}\n{tree}"
        );
        b.shot("05-fake-service-500").await?;

        // web's topology: the edge to api-v1 is denied by the deny-all intention.
        b.goto(&format!("{ui}/services/default/web")).await?;
        b.with_attr("#instances tr", "data-pod", "web-0").await?;
        let denied = "web → api-v1: denied by */* => */*";
        let edge = b.with_attr("a.edge", "aria-label", denied).await?;
        ensure!(
            edge.attr("data-allowed").await?.as_deref() == Some("false")
                && edge.find(Locator::Css("path.x")).await.is_ok(),
            "the denied edge has its x"
        );
        b.shot("06-topology-denied").await?;

        // Click it: the offer to allow; create the intention.
        edge.click().await?;
        b.text_in(
            "#offer",
            "Create an intention that allows web to connect to api-v1",
        )
        .await?;
        b.shot("07-offer-allow").await?;
        b.click("#create-allow").await?;
        b.text_in("#offer", "Intention created").await?;

        // The edge turns allowed on the open page, linking to its intention.
        let allowed = "web → api-v1: allowed by default/web => default/api-v1";
        let edge = b.with_attr("a.edge", "aria-label", allowed).await?;
        let href = edge.attr("href").await?.unwrap_or_default();
        ensure!(
            href.starts_with("/ui/intentions/"),
            "the allowed edge links to {href:?}"
        );
        b.shot("08-topology-allowed").await?;

        // fake-service's page: 200, with api-v1's message.
        let tree = fake_service_page(&b, web, 200).await?;
        ensure!(
            tree.contains("Response from API v1") && !tree.contains("no answer"),
            "fake-service's page after the allow:\n{tree}"
        );
        b.shot("09-fake-service-200").await?;

        // The allowed edge leads to the intention, which the bootstrap token may edit.
        b.goto(&format!("{ui}/services/default/web")).await?;
        b.with_attr("a.edge", "aria-label", allowed)
            .await?
            .click()
            .await?;
        b.find("#f-SourceName[readonly]").await?;
        let src = b.find("#f-SourceName").await?.prop("value").await?;
        ensure!(
            src.as_deref() == Some("web"),
            "the edge led to the intention of {src:?}"
        );

        // A read-only token sees everything and can write nothing: the controls say why.
        ensure!(
            b.log_in(&read_only).await?.is_none(),
            "the read-only token was refused"
        );
        b.goto(&format!("{ui}/intentions")).await?;
        b.with_attr(
            "#intentions tr",
            "data-intention",
            "default/web => default/api-v1",
        )
        .await?;
        let why = b.disabled_reason("#create-intention").await?;
        ensure!(
            why.contains("may not"),
            "tooltip of Create for a read-only token: {why}"
        );
        let del = b
            .disabled_reason("button[aria-label='Delete default/web => default/api-v1']")
            .await?;
        ensure!(
            del.contains("may not"),
            "tooltip of Delete for a read-only token: {del}"
        );
        b.shot("10-read-only").await?;

        // A bad token is refused, with a message.
        let refused = b.log_in("00000000-0000-0000-0000-00000000dead").await?;
        let msg = refused.context("a bad token was accepted")?;
        ensure!(
            msg.contains("The token was refused"),
            "the login's message: {msg}"
        );
        b.shot("11-bad-token").await?;
        b.click("#login-cancel").await?;
        b.text_in("#who", "Not logged in").await?;

        // On a phone the Services page still reads.
        let mut b = b;
        b.log_in(&mesh.token).await?;
        b.resize_viewport(390, 844).await?;
        b.goto(&format!("{ui}/services")).await?;
        b.with_attr("#services tr", "data-service", "api-v1")
            .await?;
        b.shot("12-services-phone").await?;
        b.client.clone().close().await?;
        anyhow::Ok(())
    })?;
    mesh.stop()
}

#[test]
fn namespaces_through_the_ui() -> Result<()> {
    let mut mesh = LocalMesh::start("ebpf")?;
    mesh.meshctl(&["intention", "create", "-deny", "*/*", "*/*"])?;
    apply(
        &mut mesh,
        examples().join("namespaces"),
        &["backend/api-v1-0", "default/web-0"],
    )?;
    let ui = format!("http://{}/ui", mesh.http_addr);
    runtime()?.block_on(async {
        let b = Browser::start(1280, 800).await?;
        b.goto(&format!("{ui}/services")).await?;
        ensure!(
            b.log_in(&mesh.token).await?.is_none(),
            "the bootstrap token was refused"
        );
        let row = b
            .with_attr("#services tr", "data-service", "api-v1")
            .await?;
        ensure!(
            row.attr("data-namespace").await?.as_deref() == Some("backend"),
            "api-v1's namespace on the Services page"
        );
        // The namespace selector narrows the list to one namespace.
        b.find("#ns-select option[value=backend]")
            .await?
            .click()
            .await?;
        b.until("only backend's services", || async {
            let rows = b
                .client
                .find_all(Locator::Css("#services tbody tr"))
                .await?;
            let mut nss = Vec::new();
            for r in rows {
                nss.push(r.attr("data-namespace").await?.unwrap_or_default());
            }
            Ok((!nss.is_empty() && nss.iter().all(|n| n == "backend")).then_some(()))
        })
        .await?;
        b.shot("13-services-namespace").await?;

        b.goto(&format!("{ui}/services/default/web")).await?;
        let denied = "web → backend/api-v1: denied by */* => */*";
        b.with_attr("a.edge", "aria-label", denied)
            .await?
            .click()
            .await?;
        b.click("#create-allow").await?;
        let allowed = "web → backend/api-v1: allowed by default/web => backend/api-v1";
        b.with_attr("a.edge", "aria-label", allowed).await?;
        b.shot("14-topology-namespace").await?;
        b.client.clone().close().await?;
        anyhow::Ok(())
    })?;
    mesh.stop()
}
