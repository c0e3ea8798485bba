//! Who may read what the listener serves, and over which transport: TLS from a certificate
//! and key (PEM), a bearer token and/or HTTP basic-auth users, `/metrics` open or not.
//!
//! Everything here is read from files named in `[listen]`, so a SIGHUP can swap it while
//! connections are served: a new `Access` is built whole and replaces the old one only when
//! every file read and parsed, so a half-written certificate never takes the listener down.

use super::ListenConfig;
use anyhow::Context;
use axum::http::{HeaderMap, StatusCode, header};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

/// The credentials and TLS identity in force.
pub struct Access {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    token: Option<String>,
    /// user name → bcrypt hash
    users: BTreeMap<String, String>,
    metrics_open: bool,
    /// `Authorization` values that passed a bcrypt check: a hash costs tens of
    /// milliseconds, and the UI asks several times a second. Bounded; cleared when full.
    verified: Mutex<Vec<String>>,
}

/// What a request may do.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No or wrong credentials: 401 with a challenge.
    Unauthorized,
}

const VERIFIED_CAP: usize = 64;

impl Access {
    /// Reads the files `[listen]` names. Errors name the key and the file.
    pub fn load(cfg: &ListenConfig) -> anyhow::Result<Access> {
        let tls = match (&cfg.tls_cert, &cfg.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(server_tls(cert, key)?)),
            (None, None) => None,
            _ => anyhow::bail!("[listen] tls_cert and tls_key go together"),
        };
        let token = match &cfg.token_file {
            Some(p) => Some(read_token(p)?),
            None => None,
        };
        for (user, hash) in &cfg.basic_auth_users {
            if user.contains(':') || user.is_empty() {
                anyhow::bail!("[listen.basic_auth_users] {user:?}: a user name without ':'");
            }
            hash.parse::<bcrypt::HashParts>().map_err(|_| {
                anyhow::anyhow!(
                    "[listen.basic_auth_users] {user}: not a bcrypt hash (make one with \
                     `htpasswd -nbB {user} PASSWORD`)"
                )
            })?;
        }
        Ok(Access {
            tls,
            token,
            users: cfg.basic_auth_users.clone(),
            metrics_open: cfg.metrics_open,
            verified: Mutex::new(Vec::new()),
        })
    }

    /// Some credential is configured.
    pub fn has_credentials(&self) -> bool {
        self.token.is_some() || !self.users.is_empty()
    }

    /// Whether a request for `path` with these headers may be answered. With no credential
    /// configured (a loopback listener) everything is; `/healthz` always is (it says
    /// nothing but "ok", and liveness probes carry no secrets).
    pub fn judge(&self, path: &str, headers: &HeaderMap) -> Verdict {
        if !self.has_credentials()
            || path == "/healthz"
            || (path == "/metrics" && self.metrics_open)
        {
            return Verdict::Allowed;
        }
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
        else {
            return Verdict::Unauthorized;
        };
        if self.allows(given) {
            Verdict::Allowed
        } else {
            Verdict::Unauthorized
        }
    }

    fn allows(&self, given: &str) -> bool {
        if let (Some(want), Some(got)) = (&self.token, bearer(given)) {
            return constant_time_eq(got.as_bytes(), want.as_bytes());
        }
        let Some((user, password)) = basic(given) else {
            return false;
        };
        let Some(hash) = self.users.get(&user) else {
            return false;
        };
        let mut seen = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if seen
            .iter()
            .any(|v| constant_time_eq(v.as_bytes(), given.as_bytes()))
        {
            return true;
        }
        if !bcrypt::verify(password, hash).unwrap_or(false) {
            return false;
        }
        if seen.len() >= VERIFIED_CAP {
            seen.clear();
        }
        seen.push(given.to_string());
        true
    }
}

/// The listener's current `Access`, swapped whole on reload.
#[derive(Clone)]
pub struct AccessHandle(Arc<RwLock<Arc<Access>>>);

impl AccessHandle {
    pub fn new(a: Access) -> AccessHandle {
        AccessHandle(Arc::new(RwLock::new(Arc::new(a))))
    }

    pub fn current(&self) -> Arc<Access> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn replace(&self, a: Access) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(a);
    }
}

/// The 401 a browser turns into a login prompt (basic) and an API client into an error.
pub fn unauthorized(access: &Access) -> axum::response::Response {
    use axum::response::IntoResponse;
    let challenge = if access.users.is_empty() {
        "Bearer realm=\"stacktap\""
    } else {
        "Basic realm=\"stacktap\", charset=\"UTF-8\""
    };
    let mut r = (StatusCode::UNAUTHORIZED, "credentials are required\n").into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static(challenge),
    );
    r
}

fn bearer(given: &str) -> Option<&str> {
    let (scheme, rest) = given.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
}

/// `Basic base64(user:password)` → (user, password).
fn basic(given: &str) -> Option<(String, String)> {
    use base64::Engine;
    let (scheme, rest) = given.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Equal without telling, through its timing, how much of a guess was right.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn read_token(p: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("[listen] token_file {}", p.display()))?;
    let token = text.trim();
    if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        anyhow::bail!(
            "[listen] token_file {}: one line of at least 16 characters without spaces",
            p.display()
        );
    }
    Ok(token.to_string())
}

/// A rustls server configuration from a PEM certificate chain and private key.
fn server_tls(cert: &Path, key: &Path) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("[listen] tls_cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        anyhow::bail!("[listen] tls_cert {}: no certificate in it", cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("[listen] tls_key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| anyhow::anyhow!("[listen] tls_cert/tls_key: {e}"))?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ListenConfig {
        ListenConfig::default()
    }

    /// A config whose token file holds `token` (the directory lives as long as the guard).
    fn with_token(token: &str) -> (ListenConfig, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, token).unwrap();
        let mut c = cfg();
        c.token_file = Some(f);
        (c, dir)
    }

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn without_credentials_configured_everything_is_allowed() {
        let a = Access::load(&cfg()).unwrap();
        assert_eq!(a.judge("/api/graph", &HeaderMap::new()), Verdict::Allowed);
    }

    #[test]
    fn a_bearer_token_guards_the_api_but_not_healthz() {
        let (c, _dir) = with_token("s3cr3t-t0ken-0123456789\n");
        let a = Access::load(&c).unwrap();
        let none = HeaderMap::new();
        assert_eq!(a.judge("/api/graph", &none), Verdict::Unauthorized);
        assert_eq!(a.judge("/metrics", &none), Verdict::Unauthorized);
        assert_eq!(a.judge("/healthz", &none), Verdict::Allowed);
        let good = headers("Bearer s3cr3t-t0ken-0123456789");
        assert_eq!(a.judge("/api/graph", &good), Verdict::Allowed);
        let bad = headers("Bearer s3cr3t-t0ken-0123456780");
        assert_eq!(a.judge("/api/graph", &bad), Verdict::Unauthorized);
    }

    #[test]
    fn metrics_can_be_left_open() {
        let (mut c, _dir) = with_token("s3cr3t-t0ken-0123456789");
        c.metrics_open = true;
        let a = Access::load(&c).unwrap();
        assert_eq!(a.judge("/metrics", &HeaderMap::new()), Verdict::Allowed);
        assert_eq!(a.judge("/", &HeaderMap::new()), Verdict::Unauthorized);
    }

    #[test]
    fn basic_auth_checks_the_bcrypt_hash() {
        let mut c = cfg();
        let hash = bcrypt::hash("correct horse", 4).unwrap();
        c.basic_auth_users.insert("ops".into(), hash);
        let a = Access::load(&c).unwrap();
        use base64::Engine;
        let enc = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let good = headers(&format!("Basic {}", enc("ops:correct horse")));
        assert_eq!(a.judge("/", &good), Verdict::Allowed);
        // the second time from the cache
        assert_eq!(a.judge("/", &good), Verdict::Allowed);
        for wrong in ["ops:wrong", "other:correct horse", "ops"] {
            let h = headers(&format!("Basic {}", enc(wrong)));
            assert_eq!(a.judge("/", &h), Verdict::Unauthorized, "{wrong}");
        }
        assert_eq!(a.judge("/", &headers("Basic !!!")), Verdict::Unauthorized);
    }

    #[test]
    fn bad_settings_are_refused_with_the_key_named() {
        let mut c = cfg();
        c.basic_auth_users.insert("ops".into(), "plaintext".into());
        let e = Access::load(&c).err().unwrap().to_string();
        assert!(e.contains("bcrypt"), "{e}");
        let (c, dir) = with_token("short");
        let e = Access::load(&c).err().unwrap().to_string();
        assert!(e.contains("token_file"), "{e}");
        let mut c = cfg();
        c.tls_cert = Some(dir.path().join("missing.pem"));
        let e = Access::load(&c).err().unwrap().to_string();
        assert!(e.contains("tls_cert and tls_key"), "{e}");
        c.tls_key = Some(dir.path().join("missing-key.pem"));
        let e = Access::load(&c).err().unwrap().to_string();
        assert!(e.contains("tls_cert"), "{e}");
    }
}
