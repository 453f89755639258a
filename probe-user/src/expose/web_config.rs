//! `--web.config.file`: TLS and authentication for the HTTP endpoint, in the YAML format of
//! Prometheus exporters (exporter-toolkit), so the same file and the same Prometheus scrape
//! settings work:
//!
//! ```yaml
//! tls_server_config:
//!   cert_file: server.crt      # relative paths are relative to this file
//!   key_file: server.key
//! basic_auth_users:
//!   prometheus: $2y$10$...     # bcrypt hashes (htpasswd -nBC 10 "" | tr -d ':')
//! bearer_token_file: token     # flyprobe's addition: one token, for `Authorization: Bearer`
//! ```

use std::{
    collections::{BTreeMap, HashSet},
    fs,
    io::{self, BufReader},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use base64::Engine as _;
use serde::Deserialize;
use thiserror::Error;
use tokio_rustls::rustls::{
    self, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};

#[derive(Debug, Error)]
pub enum WebConfigError {
    #[error("cannot read the web config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("web config {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_yaml_ng::Error,
    },
    #[error("web config {path}: basic_auth_users.{user} must be a bcrypt hash ($2a$/$2b$/$2y$…)")]
    NotBcrypt { path: PathBuf, user: String },
    #[error("web config {path}: tls_server_config needs both cert_file and key_file")]
    TlsIncomplete { path: PathBuf },
    #[error("web config: cannot read {what} {path}: {detail}")]
    TlsFile {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("web config: the certificate and key do not make a TLS server: {source}")]
    Tls {
        #[source]
        source: rustls::Error,
    },
    #[error("web config: bearer_token_file {path} is empty")]
    EmptyToken { path: PathBuf },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFormat {
    tls_server_config: Option<TlsFormat>,
    #[serde(default)]
    basic_auth_users: BTreeMap<String, String>,
    bearer_token_file: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFormat {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
}

/// What the endpoint enforces.
pub struct WebConfig {
    pub tls: Option<Arc<ServerConfig>>,
    pub auth: Option<Arc<Auth>>,
}

pub struct Auth {
    users: BTreeMap<String, String>,
    token: Option<String>,
    /// Credentials that passed bcrypt already: bcrypt is slow on purpose, scrapes are frequent.
    verified: Mutex<HashSet<(String, String)>>,
    /// Checked for unknown users, so they take as long to refuse as known ones.
    dummy: String,
    /// bcrypt runs on blocking threads, this many at once: wrong passwords cannot starve the
    /// runtime that drains the kernel's events and serves scrapes.
    gate: tokio::sync::Semaphore,
}

impl WebConfig {
    pub fn none() -> Self {
        Self {
            tls: None,
            auth: None,
        }
    }

    pub fn load(path: &Path) -> Result<Self, WebConfigError> {
        let text = fs::read_to_string(path).map_err(|source| WebConfigError::Read {
            path: path.into(),
            source,
        })?;
        let file: FileFormat =
            serde_yaml_ng::from_str(&text).map_err(|source| WebConfigError::Parse {
                path: path.into(),
                source,
            })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &Path| dir.join(p);
        for (user, hash) in &file.basic_auth_users {
            if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
                return Err(WebConfigError::NotBcrypt {
                    path: path.into(),
                    user: user.clone(),
                });
            }
        }
        let token = match &file.bearer_token_file {
            Some(p) => {
                let p = resolve(p);
                let token = fs::read_to_string(&p)
                    .map_err(|source| WebConfigError::Read {
                        path: p.clone(),
                        source,
                    })?
                    .trim()
                    .to_string();
                if token.is_empty() {
                    return Err(WebConfigError::EmptyToken { path: p });
                }
                Some(token)
            }
            None => None,
        };
        let tls = match file.tls_server_config {
            Some(TlsFormat {
                cert_file: Some(cert),
                key_file: Some(key),
            }) => Some(Arc::new(tls_config(&resolve(&cert), &resolve(&key))?)),
            Some(_) => return Err(WebConfigError::TlsIncomplete { path: path.into() }),
            None => None,
        };
        // The dummy hash costs what the users' hashes cost ("$2y$10$…": 10).
        let cost = file
            .basic_auth_users
            .values()
            .filter_map(|h| h.get(4..6)?.parse::<u32>().ok())
            .max();
        let dummy = match cost {
            Some(cost) => bcrypt::hash("flyprobe-no-such-user", cost).unwrap_or_default(),
            None => String::new(),
        };
        let auth = (!file.basic_auth_users.is_empty() || token.is_some()).then(|| {
            Arc::new(Auth {
                users: file.basic_auth_users,
                token,
                verified: Mutex::new(HashSet::new()),
                dummy,
                gate: tokio::sync::Semaphore::new(2),
            })
        });
        Ok(Self { tls, auth })
    }
}

fn tls_config(cert: &Path, key: &Path) -> Result<ServerConfig, WebConfigError> {
    let file_err = |what, path: &Path, detail: String| WebConfigError::TlsFile {
        what,
        path: path.into(),
        detail,
    };
    let cert_pem = fs::read(cert).map_err(|e| file_err("cert_file", cert, e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_reader_iter(BufReader::new(cert_pem.as_slice()))
            .collect::<Result<_, _>>()
            .map_err(|e| file_err("cert_file", cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(
            "cert_file",
            cert,
            "no PEM certificate in it".into(),
        ));
    }
    let key_der =
        PrivateKeyDer::from_pem_file(key).map_err(|e| file_err("key_file", key, e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| WebConfigError::Tls { source })?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|source| WebConfigError::Tls { source })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Entries kept in the verified-credentials cache.
const VERIFIED_MAX: usize = 64;

impl Auth {
    /// Does this `Authorization` header value grant access?
    pub async fn allows(self: Arc<Self>, header: Option<String>) -> bool {
        let Some(header) = header else {
            return false;
        };
        if let Some(token) = header.strip_prefix("Bearer ") {
            return self
                .token
                .as_deref()
                .is_some_and(|want| constant_time_eq(want.as_bytes(), token.trim().as_bytes()));
        }
        let Some(encoded) = header.strip_prefix("Basic ") else {
            return false;
        };
        let Some((user, password)) = base64::engine::general_purpose::STANDARD
            .decode(encoded.trim())
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|s| {
                s.split_once(':')
                    .map(|(u, p)| (u.to_string(), p.to_string()))
            })
        else {
            return false;
        };
        if self.users.is_empty() {
            return false;
        }
        let key = (user, password);
        if self.cache().contains(&key) {
            return true;
        }
        let (known, hash) = match self.users.get(&key.0) {
            Some(hash) => (true, hash.clone()),
            None => (false, self.dummy.clone()),
        };
        let Ok(_permit) = self.gate.acquire().await else {
            return false;
        };
        let password = key.1.clone();
        let matched =
            tokio::task::spawn_blocking(move || bcrypt::verify(&password, &hash).unwrap_or(false))
                .await
                .unwrap_or(false);
        if !(known && matched) {
            return false;
        }
        let mut verified = self.cache();
        if verified.len() >= VERIFIED_MAX {
            verified.clear();
        }
        verified.insert(key);
        true
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashSet<(String, String)>> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `WWW-Authenticate` challenge for a refused request.
    pub fn challenge(&self) -> &'static str {
        if self.users.is_empty() {
            "Bearer realm=\"flyprobe\""
        } else {
            "Basic realm=\"flyprobe\""
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flyprobe-webcfg-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn basic_and_bearer_credentials() {
        let dir = tmpdir("auth");
        let hash = bcrypt::hash("s3cret", 4).unwrap();
        write(&dir, "token", "tok-123\n");
        let cfg = write(
            &dir,
            "web.yml",
            &format!("basic_auth_users:\n  alice: '{hash}'\nbearer_token_file: token\n"),
        );
        let auth = WebConfig::load(&cfg).unwrap().auth.unwrap();
        let basic = |u: &str, p: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let allows = |h: Option<&str>| rt.block_on(auth.clone().allows(h.map(str::to_string)));
        assert!(allows(Some(&basic("alice", "s3cret"))));
        assert!(allows(Some(&basic("alice", "s3cret")))); // cached
        assert!(!allows(Some(&basic("alice", "wrong"))));
        assert!(!allows(Some(&basic("bob", "s3cret"))));
        assert!(allows(Some("Bearer tok-123")));
        assert!(!allows(Some("Bearer tok-124")));
        assert!(!allows(None));
        assert!(!allows(Some("Basic !!!")));
    }

    #[test]
    fn bad_files_are_one_clear_error() {
        let dir = tmpdir("bad");
        let err = |text: &str| {
            let p = write(&dir, "web.yml", text);
            match WebConfig::load(&p) {
                Ok(_) => panic!("{text:?} was accepted"),
                Err(e) => e.to_string(),
            }
        };
        assert!(err("basic_auth_users:\n  alice: plain\n").contains("bcrypt"));
        assert!(err("tls_server_config:\n  cert_file: x.crt\n").contains("both cert_file"));
        assert!(
            err("tls_server_config:\n  cert_file: x.crt\n  key_file: x.key\n").contains("x.crt")
        );
        assert!(err("client_ca_file: x\n").contains("unknown field"));
        assert!(err("basic_auth_users: [\n").contains("not valid"));
        let missing = WebConfig::load(&dir.join("nope.yml"))
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("cannot read the web config"), "{missing}");
    }
}
