//! OpenStack REST semantics on top of HTTP exchanges: which service was called (by port
//! or deployment path prefix), which route (templated), by whom (User-Agent, or the
//! address an AMQP connection already named), and the request ids that tie the call to
//! the RPCs it caused (oslo-wire.md §7–8).

pub mod agent;
pub mod fault;
pub mod route;
pub mod secrets;
pub mod services;

use crate::FastMap as HashMap;
use crate::contract::{Endpoint, HttpEnd, HttpEvent, HttpObs, HttpOutcome, Process, method_label};
use crate::health::Health;
use crate::http::{End, Exchange};
use crate::identity::AddressBook;
use crate::recent::Recent;
use agent::Agent;
use services::{DEFAULT_PORTS, DEFAULT_PREFIXES, EXTERNAL};
use std::net::IpAddr;
use std::sync::Arc;

/// `[http]`: which ports and path prefixes are which OpenStack API, and what one HTTP
/// connection may hold.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RestConfig {
    /// Port → service type, merged over the defaults (`"8780" = "placement"`); `""`
    /// removes a default.
    #[serde(deserialize_with = "ports_over_defaults", serialize_with = "as_table")]
    pub ports: Vec<(u16, String)>,
    /// Path prefix → service type, tried before the ports (`"/compute" = "nova"`), merged
    /// over the defaults; `""` removes a default.
    #[serde(
        deserialize_with = "prefixes_over_defaults",
        serialize_with = "as_table"
    )]
    pub prefixes: Vec<(String, String)>,
    /// Detect HTTP by content on ports not in `ports` (a listening port we don't know).
    pub sniff_other_ports: bool,
    /// Distinct route templates per service before new ones fold into `{other}`.
    pub max_routes_per_service: usize,
    /// Requests waiting for their response, per connection.
    pub max_pipeline: usize,
    /// Largest request or response head.
    pub max_head_bytes: usize,
    /// Of a 4xx/5xx body, the bytes kept to read the fault.
    pub max_error_body_bytes: usize,
}

/// Pairs written the way they are read: a table of `key = service`.
fn as_table<K: std::fmt::Display, S: serde::Serializer>(
    list: &[(K, String)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(list.iter().map(|(k, v)| (k.to_string(), v)))
}

/// `key = service` pairs merged over a default list; an empty service removes the key.
fn merge<K: PartialEq>(list: &mut Vec<(K, String)>, over: Vec<(K, String)>) {
    for (k, v) in over {
        list.retain(|(old, _)| *old != k);
        if !v.is_empty() {
            list.push((k, v));
        }
    }
}

fn ports_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<(u16, String)>, D::Error> {
    use serde::Deserialize;
    let given = std::collections::BTreeMap::<String, String>::deserialize(d)?;
    let mut over = Vec::new();
    for (k, v) in given {
        let port = k
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("{k:?} is not a port")))?;
        over.push((port, v));
    }
    let mut list = RestConfig::default().ports;
    merge(&mut list, over);
    Ok(list)
}

fn prefixes_over_defaults<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, String)>, D::Error> {
    use serde::Deserialize;
    let given = std::collections::BTreeMap::<String, String>::deserialize(d)?;
    for k in given.keys() {
        if !k.starts_with('/') || k.ends_with('/') {
            return Err(serde::de::Error::custom(format!(
                "{k:?} must start with / and not end with one"
            )));
        }
    }
    let mut list = RestConfig::default().prefixes;
    merge(&mut list, given.into_iter().collect());
    Ok(list)
}

impl Default for RestConfig {
    fn default() -> Self {
        RestConfig {
            ports: DEFAULT_PORTS
                .iter()
                .map(|(p, s)| (*p, s.to_string()))
                .collect(),
            prefixes: DEFAULT_PREFIXES
                .iter()
                .map(|(p, s)| (p.to_string(), s.to_string()))
                .collect(),
            sniff_other_ports: true,
            max_routes_per_service: 200,
            max_pipeline: 64,
            max_head_bytes: 64 << 10,
            max_error_body_bytes: 4 << 10,
        }
    }
}

impl RestConfig {
    pub fn is_api_port(&self, port: u16) -> bool {
        self.ports.iter().any(|(p, _)| *p == port)
    }

    /// What the HTTP parser of one connection is held to.
    pub fn http(&self) -> crate::http::HttpConfig {
        crate::http::HttpConfig {
            max_head_bytes: self.max_head_bytes,
            max_pipeline: self.max_pipeline.max(1),
            max_error_body: self.max_error_body_bytes,
        }
    }
}

/// The probe's half: a REST exchange → an observation, with what the exchange tells
/// alone (service, route template, fault, the request ids).
pub struct Rest {
    ports: HashMap<u16, Arc<str>>,
    /// The path prefixes in the config's order, each with its service's shared name.
    prefixes: Vec<(String, Arc<str>)>,
}

impl Rest {
    pub fn new(cfg: RestConfig) -> Rest {
        let ports = (cfg.ports.iter())
            .map(|(port, svc)| (*port, Arc::from(svc.as_str())))
            .collect();
        let prefixes = (cfg.prefixes.into_iter())
            .map(|(prefix, svc)| (prefix, Arc::from(svc)))
            .collect();
        Rest { ports, prefixes }
    }

    /// The service and the path with the deployment prefix removed.
    fn service<'a>(&self, port: u16, path: &'a str) -> (Option<Arc<str>>, &'a str) {
        let letter = path.as_bytes().get(1);
        for (prefix, svc) in &self.prefixes {
            // a prefix's first letter rules out most of them without a comparison
            if prefix.len() > 1 && prefix.as_bytes().get(1) != letter {
                continue;
            }
            if let Some(rest) = path.strip_prefix(prefix.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return (Some(svc.clone()), rest);
            }
        }
        (self.ports.get(&port).cloned(), path)
    }

    pub fn observe(&self, ex: Exchange) -> HttpObs {
        let req = ex.request;
        let (service, path) = self.service(ex.server.port, &req.path);
        let route = route::template(service.as_deref(), path);
        let resp = ex.response.as_ref();
        let fault = resp
            .filter(|r| !r.error_body.is_empty())
            .and_then(|r| Some((r.head.status, fault::parse(&r.error_body)?)))
            .map(|(status, mut f)| {
                // an error quotes what it was sent: never what a credential request sent
                let credentials = secrets::redact_fault(&req.method, &route, status);
                f.message = f.message.map(|m| match credentials {
                    true => secrets::REDACTED.to_string(),
                    false => secrets::scrub(&m).into_owned(),
                });
                f
            });
        HttpObs {
            client: ex.client,
            server: ex.server,
            method: method_label(&req.method),
            service,
            route,
            path: req.path,
            user_agent: req.user_agent,
            status: resp.map(|r| r.head.status),
            t_request: ex.t_request,
            t_response: resp.map(|r| r.t_first),
            t_response_end: resp.map(|r| r.t_end),
            end: match ex.end {
                End::Complete => HttpEnd::Complete,
                End::Truncated => HttpEnd::Truncated,
                End::ResponseLost => HttpEnd::ResponseLost,
                End::NoResponse => HttpEnd::NoResponse,
            },
            request_id: resp.and_then(|r| r.head.request_id.clone()),
            // oslo.middleware ignores a global id not of its format; so do we
            global_request_id: req.request_id.filter(|id| valid_request_id(id)),
            trace_context: req.trace_context,
            fault,
        }
    }
}

/// The analyser's half: an observed exchange → a `kind: http` event, with its caller
/// (which may need what another probe's AMQP traffic named) and the route cap (one
/// bound over every probe).
pub struct RestEvents {
    max_routes_per_service: usize,
    /// Distinct templates seen per service (bounded by `max_routes_per_service`).
    routes: HashMap<Arc<str>, crate::FastSet<Arc<str>>>,
    other: Arc<str>,
    /// The callers last named by a name rather than by the address book, and the
    /// servers, shared.
    peers: Peers,
}

/// The callers an exchange names by a name (its User-Agent's process or library, the
/// token middleware's project, `external`) and address, and the servers' addresses
/// spelled, the last few: an API sees the same few callers over and over, and a shared
/// caller is one reference count where a new one was three allocations (its address
/// spelled, its name, the process).
#[derive(Default)]
struct Peers {
    named: Recent<(IpAddr, Arc<Process>), 16>,
    servers: Recent<(Endpoint, Arc<str>), 16>,
}

impl Peers {
    fn named(&mut self, ip: &IpAddr, name: &str) -> Arc<Process> {
        let same =
            |(at, p): &(IpAddr, Arc<Process>)| at == ip && p.service.as_deref() == Some(name);
        let make = || {
            let p = Process {
                service: Some(name.to_string()),
                pid: None,
                host: crate::contract::ip_text(ip),
            };
            (*ip, Arc::new(p))
        };
        self.named.get_or_make(same, make).1
    }

    fn server(&mut self, server: &Endpoint) -> Arc<str> {
        let same = |(at, _): &(Endpoint, Arc<str>)| at == server;
        let make = || (*server, Arc::from(server.text()));
        self.servers.get_or_make(same, make).1
    }
}

const UNKNOWN: &str = "unknown";

impl RestEvents {
    pub fn new(cfg: &RestConfig) -> RestEvents {
        RestEvents {
            max_routes_per_service: cfg.max_routes_per_service,
            routes: HashMap::default(),
            other: Arc::from("{other}"),
            peers: Peers::default(),
        }
    }

    /// The bounded template: new templates past the per-service cap become `{other}`.
    fn route(&mut self, service: Option<&Arc<str>>, template: &str, h: &mut Health) -> Arc<str> {
        let key = service.map_or(UNKNOWN, |s| &**s);
        let seen = match self.routes.get_mut(key) {
            Some(seen) => seen,
            None => self.routes.entry(Arc::from(key)).or_default(),
        };
        if let Some(known) = seen.get(template) {
            return known.clone();
        }
        if seen.len() >= self.max_routes_per_service {
            *h.series_folded.entry("http_route").or_default() += 1;
            return self.other.clone();
        }
        let t: Arc<str> = Arc::from(template);
        seen.insert(t.clone());
        t
    }

    /// The event of one exchange. Its texts are taken from the observation, not copied
    /// (see `Analyser::observe`).
    pub fn event(&mut self, o: &mut HttpObs, book: &mut AddressBook, h: &mut Health) -> HttpEvent {
        let route = self.route(o.service.as_ref(), &o.route, h);
        if let Some(svc) = &o.service {
            book.learn_rest_caller(o.server.ip, services::api_process(svc));
        }
        let client = caller(o.user_agent.as_deref(), &o.client.ip, book, &mut self.peers);
        let outcome = match (o.end, o.status) {
            (HttpEnd::NoResponse, _) => HttpOutcome::NoResponse,
            (HttpEnd::ResponseLost, _) | (_, None) => HttpOutcome::ResponseLost,
            (_, Some(s)) if s >= 500 => HttpOutcome::ServerError,
            (_, Some(s)) if s >= 400 => HttpOutcome::ClientError,
            _ => HttpOutcome::Ok,
        };
        let secs = |t: crate::time::Ts| t.as_secs_f64();
        HttpEvent {
            client,
            user_agent: o.user_agent.take(),
            service: o.service.clone(),
            server: self.peers.server(&o.server),
            method: o.method,
            route,
            path: std::mem::take(&mut o.path),
            status: o.status,
            t_request: secs(o.t_request),
            t_response: o.t_response.map(secs),
            t_response_end: o.t_response_end.map(secs),
            duration_s: o
                .t_response_end
                .filter(|_| o.end == HttpEnd::Complete)
                .map(|e| e.secs_since(o.t_request)),
            request_id: o.request_id.take(),
            global_request_id: o.global_request_id.take(),
            trace_context: o.trace_context,
            outcome,
            truncated: o.end == HttpEnd::Truncated,
            error: o.fault.take(),
        }
    }
}

/// `req-` + a lower-case uuid4, as oslo.middleware's `ID_FORMAT` demands.
pub fn valid_request_id(id: &str) -> bool {
    let Some(u) = id.strip_prefix("req-") else {
        return false;
    };
    let b = u.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_digit() || (b'a'..=b'f').contains(c),
        })
}

/// The caller, always a process name, a client library or `external`:
/// 1. the process its User-Agent names (keystoneauth's app name or argv[0]);
/// 2. the API process of the project keystonemiddleware validates tokens for;
/// 3. the one service its address is home to (AMQP connections named it), unless the
///    User-Agent is a user's tool (the CLI, Terraform, curl…), which no service sends;
/// 4. the client library or tool;
/// 5. `external`.
fn caller(
    ua: Option<&str>,
    ip: &IpAddr,
    book: &mut AddressBook,
    peers: &mut Peers,
) -> Arc<Process> {
    let mut named = |service: &str| peers.named(ip, service);
    match ua.map_or(Agent::Other, agent::classify) {
        Agent::Process(name) => {
            book.learn_rest_caller(*ip, &name);
            // the address may also give the pid, when it is that very service
            match book.lookup(ip) {
                Some(p) if p.service.as_deref() == Some(&name) => p.clone(),
                _ => named(&name),
            }
        }
        // the middleware runs inside the project's API: surer than an address, which may
        // be shared with services whose AMQP connections were not seen yet
        Agent::TokenMiddleware(project) => {
            let process = services::api_process(&project);
            book.learn_rest_caller(*ip, process);
            named(process)
        }
        Agent::ClientLibrary(lib) if services::is_user_tool(&lib) => named(&lib),
        agent => match (book.lookup(ip), agent) {
            (Some(p), _) => p.clone(),
            (None, Agent::ClientLibrary(lib)) => named(&lib),
            (None, _) => named(EXTERNAL),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callers_and_servers_named_again_are_shared() {
        let mut peers = Peers::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        let first = peers.named(&a, "nova-api");
        assert_eq!(
            (first.service.as_deref(), &*first.host),
            (Some("nova-api"), "10.0.0.1")
        );
        assert!(Arc::ptr_eq(&first, &peers.named(&a, "nova-api")));
        // another address or another name is another caller
        assert_eq!(&*peers.named(&b, "nova-api").host, "::1");
        assert!(!Arc::ptr_eq(&first, &peers.named(&a, "cinder-api")));
        let server = Endpoint { ip: b, port: 8774 };
        let spelled = peers.server(&server);
        assert_eq!(&*spelled, "[::1]:8774");
        assert!(Arc::ptr_eq(&spelled, &peers.server(&server)));
        assert_eq!(
            &*peers.server(&Endpoint { ip: a, port: 8774 }),
            "10.0.0.1:8774"
        );
    }

    #[test]
    fn request_id_format_is_oslo_middlewares() {
        assert!(valid_request_id("req-0b7a3c37-8d36-4d52-9c53-ef4d0f0e3a11"));
        assert!(!valid_request_id(
            "req-0B7A3C37-8D36-4D52-9C53-EF4D0F0E3A11"
        ));
        assert!(!valid_request_id("0b7a3c37-8d36-4d52-9c53-ef4d0f0e3a11"));
        assert!(!valid_request_id("req-0b7a3c37"));
    }

    #[test]
    fn prefix_beats_port_and_strips() {
        let r = Rest::new(RestConfig::default());
        let (s, p) = r.service(80, "/compute/v2.1/servers");
        assert_eq!((s.as_deref(), p), (Some("nova"), "/v2.1/servers"));
        let (s, p) = r.service(8774, "/computer");
        assert_eq!((s.as_deref(), p), (Some("nova"), "/computer"));
        assert_eq!(r.service(81, "/x").0, None);
        // prefixes of any depth, a one-letter path, a path that is the prefix
        let r = Rest::new(RestConfig {
            prefixes: vec![
                ("/api/compute".into(), "nova".into()),
                ("/i".into(), "keystone".into()),
            ],
            ..RestConfig::default()
        });
        for (path, service, rest) in [
            ("/api/compute/servers", Some("nova"), "/servers"),
            ("/api/computer", None, "/api/computer"),
            ("/api/compute", Some("nova"), ""),
            ("/i", Some("keystone"), ""),
            ("/i/v3", Some("keystone"), "/v3"),
            ("/", None, "/"),
            ("", None, ""),
        ] {
            let (s, p) = r.service(81, path);
            assert_eq!((s.as_deref(), p), (service, rest), "{path}");
        }
    }

    #[test]
    fn route_cap_folds_and_counts() {
        let mut r = RestEvents::new(&RestConfig {
            max_routes_per_service: 2,
            ..RestConfig::default()
        });
        let mut h = Health::default();
        let nova: Arc<str> = Arc::from("nova");
        for p in ["/a", "/b", "/a", "/c"] {
            r.route(Some(&nova), p, &mut h);
        }
        assert_eq!(&*r.route(Some(&nova), "/d", &mut h), "{other}");
        assert_eq!(&*r.route(Some(&nova), "/b", &mut h), "/b");
        assert_eq!(h.series_folded.get("http_route"), Some(&2));
    }
}
