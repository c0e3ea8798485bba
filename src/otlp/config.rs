//! Where spans go: the `[otlp]` section (this struct is its schema), then the standard
//! OpenTelemetry exporter variables over it, then `--otlp-endpoint` over both.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// `[otlp]`: OTLP span export. Every key optional; nothing is exported without an
/// endpoint.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct OtlpConfig {
    /// Where spans go, used as is: `http://jaeger:4317` (gRPC) or
    /// `http://tempo:4318/v1/traces` (HTTP/protobuf).
    pub endpoint: Option<String>,
    /// `grpc` or `http/protobuf`. Unset: gRPC, unless the endpoint's port is 4318 or its
    /// path ends in `/v1/traces`.
    pub protocol: Option<String>,
    /// Sent with every export (an API key for a hosted backend). Never logged.
    pub headers: BTreeMap<String, String>,
    /// How long one export may take.
    pub timeout_s: f64,
    /// `gzip` or `none`.
    pub compression: Option<String>,
    /// A PEM CA to trust for `https://` (else the system's roots).
    pub certificate: Option<PathBuf>,
    /// Added to every span's resource (`deployment.environment.name`, `cloud.region`).
    pub resource_attributes: BTreeMap<String, String>,
    /// Spans waiting to be exported, at most; past it, spans are dropped and counted
    /// (`stacktap_otlp_spans_dropped_total`): the capture never waits for the backend.
    pub max_queue_spans: usize,
    /// Spans per export request, at most.
    pub max_batch_spans: usize,
    /// A partial batch goes out after this long (wall time).
    pub flush_interval_s: f64,
    /// Attempts per batch before it is dropped (and counted), with backoff between.
    pub max_attempts: u32,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        OtlpConfig {
            endpoint: None,
            protocol: None,
            headers: BTreeMap::new(),
            timeout_s: 10.0,
            compression: None,
            certificate: None,
            resource_attributes: BTreeMap::new(),
            max_queue_spans: 8192,
            max_batch_spans: 512,
            flush_interval_s: 1.0,
            max_attempts: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
}

/// The export settings after the flag, the environment and the file are weighed.
#[derive(Clone)]
pub struct Export {
    /// The URL requests go to (HTTP: the whole traces URL).
    pub url: String,
    pub protocol: Protocol,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
    pub gzip: bool,
    pub certificate: Option<PathBuf>,
    pub resource: Vec<(String, String)>,
    pub max_queue_spans: usize,
    pub max_batch_spans: usize,
    pub flush_interval: Duration,
    pub max_attempts: u32,
    /// A full queue makes the analysis wait while the backend is answering (a replay: the
    /// file can wait, and a replay exports everything), instead of dropping (a capture).
    pub wait_when_full: bool,
}

impl std::fmt::Debug for Export {
    // the headers may hold an API key
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("url", &self.url)
            .field("protocol", &self.protocol)
            .field("headers", &format!("{} (not shown)", self.headers.len()))
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl OtlpConfig {
    /// The export to run, if any: `--otlp-endpoint`, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`,
    /// else `OTEL_EXPORTER_OTLP_ENDPOINT` (a base URL: `/v1/traces` is added for HTTP),
    /// else `[otlp] endpoint`. `OTEL_SDK_DISABLED=true` turns it off. `env` reads a
    /// variable (the process environment, or a test's).
    pub fn resolve(
        &self,
        flag: Option<&str>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> anyhow::Result<Option<Export>> {
        let var = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| env(n).filter(|v| !v.trim().is_empty()))
        };
        if var(&["OTEL_SDK_DISABLED"]).is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        let protocol = match var(&[
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ])
        .or_else(|| self.protocol.clone())
        {
            Some(p) => Some(parse_protocol(&p)?),
            None => None,
        };
        let (url, base) = if let Some(f) = flag {
            (f.to_string(), false)
        } else if let Some(u) = var(&["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]) {
            (u, false)
        } else if let Some(u) = var(&["OTEL_EXPORTER_OTLP_ENDPOINT"]) {
            (u, true)
        } else if let Some(u) = &self.endpoint {
            (u.clone(), false)
        } else {
            return Ok(None);
        };
        let url = url.trim().to_string();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            anyhow::bail!(
                "OTLP endpoint {url:?}: expected http://HOST:PORT or https://HOST:PORT[/PATH]"
            );
        }
        let protocol = protocol.unwrap_or_else(|| infer_protocol(&url));
        let url = match protocol {
            Protocol::HttpProtobuf if base || path_of(&url).is_empty() => {
                format!("{}/v1/traces", url.trim_end_matches('/'))
            }
            _ => url,
        };
        let mut headers: BTreeMap<String, String> = self
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(v) = var(&[name]) {
                for (k, v) in pairs(&v).map_err(|e| anyhow::anyhow!("{name}: {e}"))? {
                    headers.insert(k.to_ascii_lowercase(), v);
                }
            }
        }
        let timeout = match var(&[
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
            "OTEL_EXPORTER_OTLP_TIMEOUT",
        ]) {
            Some(ms) => Duration::from_millis(ms.trim().parse().map_err(|_| {
                anyhow::anyhow!("OTEL_EXPORTER_OTLP_TIMEOUT: {ms:?} is not milliseconds")
            })?),
            None => Duration::from_secs_f64(self.timeout_s.max(0.001)),
        };
        let gzip = match var(&[
            "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
            "OTEL_EXPORTER_OTLP_COMPRESSION",
        ])
        .or_else(|| self.compression.clone())
        .as_deref()
        .map(str::trim)
        {
            None | Some("none") => false,
            Some("gzip") => true,
            Some(other) => anyhow::bail!("OTLP compression {other:?}: expected gzip or none"),
        };
        let certificate = var(&[
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ])
        .map(PathBuf::from)
        .or_else(|| self.certificate.clone());
        let mut resource = self.resource_attributes.clone();
        if let Some(v) = var(&["OTEL_RESOURCE_ATTRIBUTES"]) {
            resource
                .extend(pairs(&v).map_err(|e| anyhow::anyhow!("OTEL_RESOURCE_ATTRIBUTES: {e}"))?);
        }
        Ok(Some(Export {
            url,
            protocol,
            headers: headers.into_iter().collect(),
            timeout,
            gzip,
            certificate,
            resource: resource.into_iter().collect(),
            max_queue_spans: self.max_queue_spans.max(1),
            max_batch_spans: self.max_batch_spans.max(1),
            flush_interval: Duration::from_secs_f64(self.flush_interval_s.clamp(0.01, 60.0)),
            max_attempts: self.max_attempts.max(1),
            wait_when_full: false,
        }))
    }
}

fn parse_protocol(p: &str) -> anyhow::Result<Protocol> {
    match p.trim() {
        "grpc" => Ok(Protocol::Grpc),
        "http/protobuf" => Ok(Protocol::HttpProtobuf),
        "http/json" => {
            anyhow::bail!("OTLP protocol http/json is not supported: use grpc or http/protobuf")
        }
        other => anyhow::bail!("OTLP protocol {other:?}: expected grpc or http/protobuf"),
    }
}

/// The path of a URL (`""` for none or `/`).
fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    match rest.find('/') {
        Some(i) if &rest[i..] != "/" => &rest[i..],
        _ => "",
    }
}

/// The collector's conventional ports: 4317 gRPC, 4318 HTTP.
fn infer_protocol(url: &str) -> Protocol {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or("");
    if authority.ends_with(":4318") || path_of(url).ends_with("/v1/traces") {
        Protocol::HttpProtobuf
    } else {
        Protocol::Grpc
    }
}

/// `k1=v1,k2=v2`, values percent-decoded (the variables' W3C Baggage-like format).
fn pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| "expected key=value pairs separated by commas".to_string())?;
        let k = k.trim();
        if k.is_empty() {
            return Err("a pair has no key".into());
        }
        out.push((k.to_string(), percent_decode(v.trim())));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |n| vars.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
    }

    #[test]
    fn nothing_configured_exports_nothing() {
        assert!(
            OtlpConfig::default()
                .resolve(None, &env(&[]))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_flag_beats_the_environment_which_beats_the_file() {
        let file = OtlpConfig {
            endpoint: Some("http://file:4317".into()),
            ..OtlpConfig::default()
        };
        let e = env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://env:4318")]);
        let x = file.resolve(Some("http://flag:4317"), &e).unwrap().unwrap();
        assert_eq!(
            (x.url.as_str(), x.protocol),
            ("http://flag:4317", Protocol::Grpc)
        );
        let x = file.resolve(None, &e).unwrap().unwrap();
        // a base endpoint: HTTP gets the traces path
        assert_eq!(x.url, "http://env:4318/v1/traces");
        assert_eq!(x.protocol, Protocol::HttpProtobuf);
        let x = file.resolve(None, &env(&[])).unwrap().unwrap();
        assert_eq!(x.url, "http://file:4317");
    }

    #[test]
    fn the_standard_variables_are_honoured() {
        let e = env(&[
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "https://tempo.example:443/otlp/v1/traces",
            ),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "X-Scope-OrgID=region%20one, Authorization=Bearer abc",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "cloud.region=RegionOne,deployment.environment.name=prod",
            ),
        ]);
        let x = OtlpConfig::default().resolve(None, &e).unwrap().unwrap();
        assert_eq!(x.url, "https://tempo.example:443/otlp/v1/traces");
        assert_eq!(x.protocol, Protocol::HttpProtobuf);
        assert!(
            x.headers
                .contains(&("x-scope-orgid".into(), "region one".into()))
        );
        assert!(
            x.headers
                .contains(&("authorization".into(), "Bearer abc".into()))
        );
        assert_eq!(x.timeout, Duration::from_millis(2500));
        assert!(x.gzip);
        assert!(
            x.resource
                .contains(&("cloud.region".into(), "RegionOne".into()))
        );
        // the API key is not in the debug form
        assert!(!format!("{x:?}").contains("abc"));
        let off = env(&[
            ("OTEL_SDK_DISABLED", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:4317"),
        ]);
        assert!(
            OtlpConfig::default()
                .resolve(Some("http://y:4317"), &off)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn bad_settings_are_clear_errors() {
        let c = OtlpConfig::default();
        for (flag, vars) in [
            ("jaeger:4317", vec![]),
            (
                "http://x:4317",
                vec![("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")],
            ),
            (
                "http://x:4317",
                vec![("OTEL_EXPORTER_OTLP_TIMEOUT", "soon")],
            ),
            (
                "http://x:4317",
                vec![("OTEL_EXPORTER_OTLP_HEADERS", "novalue")],
            ),
            (
                "http://x:4317",
                vec![("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")],
            ),
        ] {
            assert!(
                c.resolve(Some(flag), &env(&vars)).is_err(),
                "{flag} {vars:?}"
            );
        }
        assert!(toml::from_str::<OtlpConfig>("endpont = \"x\"").is_err());
    }
}
