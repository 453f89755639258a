//! Headless Chromium driven over WebDriver (Debian's `chromium` + `chromium-driver`), for
//! the dashboard's end-to-end test. A blocking facade over fantoccini, like the rest of the
//! harness: each call runs on the browser's own small tokio runtime.
//!
//! A missing browser or driver fails the test with the fix (never skips), as everywhere in
//! the harness.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use fantoccini::{Client, ClientBuilder};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::{artifact, client::Conn, eventually, flyprobe::log_path, free_port, procs::Guard};

/// The flags every headless session runs with (plus a fresh `--user-data-dir`).
pub const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

pub struct Browser {
    client: Option<Client>,
    rt: tokio::runtime::Runtime,
    /// chromedriver, in its own process group with the browser it starts.
    _driver: Guard,
    driver_log: PathBuf,
    profile: PathBuf,
}

impl Browser {
    /// Start chromedriver on a free port and open a headless session with a fresh profile
    /// and a `width`×`height` window.
    pub fn start(width: u32, height: u32) -> Self {
        // `cargo xtask setup` installs both (Debian packages chromium, chromium-driver).
        let chromium = artifact("FLYPROBE_CHROMIUM", PathBuf::from("/usr/bin/chromium"));
        let driver = artifact(
            "FLYPROBE_CHROMEDRIVER",
            PathBuf::from("/usr/bin/chromedriver"),
        );
        let port = free_port();
        let driver_log = log_path("chromedriver");
        let guard = Guard::spawn(
            "chromedriver",
            Command::new(&driver)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", driver_log.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        eventually(
            "chromedriver to answer /status",
            Duration::from_secs(30),
            || {
                let resp = Conn::connect(port)
                    .and_then(|mut c| c.get("/status"))
                    .map_err(|e| e.to_string())?;
                (resp.status == 200)
                    .then_some(())
                    .ok_or(resp.status.to_string())
            },
        );

        let profile =
            std::env::temp_dir().join(format!("flyprobe-chromium-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&profile);
        std::fs::create_dir_all(&profile).expect("creating the browser profile directory");
        let mut args: Vec<String> = CHROMIUM_FLAGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        args.push(format!("--window-size={width},{height}"));
        let caps = json!({
            "browserName": "chrome",
            // The daemon's TLS tests use a self-signed certificate for 127.0.0.1.
            "acceptInsecureCerts": true,
            "goog:chromeOptions": { "binary": chromium, "args": args },
        });
        let Value::Object(caps) = caps else {
            unreachable!()
        };

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime for the WebDriver client");
        // chromedriver listens on loopback over plain HTTP: no TLS stack is needed.
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = rt
            .block_on(
                ClientBuilder::new(connector)
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "starting a headless chromium session: {e}\n{}",
                    std::fs::read_to_string(&driver_log).unwrap_or_default()
                )
            });
        Self {
            client: Some(client),
            rt,
            _driver: guard,
            driver_log,
            profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("the session is open")
    }

    pub fn goto(&self, url: &str) {
        self.rt
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("loading {url}: {e}"));
    }

    /// Run `script` (a function body: `return …;`) in the page and decode what it returns.
    pub fn eval<T: DeserializeOwned>(&self, script: &str) -> T {
        let value = self
            .rt
            .block_on(self.client().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("running script in the page: {e}\n{script}"));
        serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("unexpected script result {value}: {e}\n{script}"))
    }

    /// A PNG of the viewport, written to `path` (parent directories created).
    pub fn screenshot(&self, path: &Path) {
        let png = self
            .rt
            .block_on(self.client().screenshot())
            .unwrap_or_else(|e| panic!("taking a screenshot: {e}"));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("creating the screenshot directory");
        }
        std::fs::write(path, png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
    }

    /// chromedriver's log, for failure messages.
    pub fn driver_log(&self) -> String {
        std::fs::read_to_string(&self.driver_log).unwrap_or_default()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Ends the session, which quits chromium; the guard then stops chromedriver.
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), client.close()).await
            });
        }
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
