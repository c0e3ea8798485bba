//! OpenStack REST semantics on top of HTTP exchanges: which service was called (by port
//! or deployment path prefix), which route (templated), by whom (User-Agent, or the
//! address an AMQP connection already named), and the request ids that tie the call to
//! the RPCs it caused (oslo-wire.md §7–8).

pub mod agent;
pub mod fault;
pub mod route;
pub mod services;

use crate::FastMap as HashMap;
use crate::contract::{HttpEvent, HttpOutcome, Process};
use crate::health::Health;
use crate::http::{End, Exchange};
use crate::identity::AddressBook;
use agent::Agent;
use services::{DEFAULT_PORTS, DEFAULT_PREFIXES, EXTERNAL};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct RestConfig {
    pub ports: Vec<(u16, String)>,
    pub prefixes: Vec<(String, String)>,
    /// Detect HTTP by content on ports not in `ports` (a listening port we don't know).
    pub sniff_other_ports: bool,
    /// Distinct route templates per service before new ones fold into `{other}`.
    pub max_routes_per_service: usize,
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
        }
    }
}

impl RestConfig {
    pub fn is_api_port(&self, port: u16) -> bool {
        self.ports.iter().any(|(p, _)| *p == port)
    }
}

/// Label values for the methods of RFC 9110 and WebDAV's common ones; others fold.
const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "COPY", "MOVE",
    "PROPFIND", "MKCOL", "LOCK", "UNLOCK",
];

/// Turns exchanges into `kind: http` events.
pub struct Rest {
    cfg: RestConfig,
    ports: HashMap<u16, Arc<str>>,
    /// Distinct templates seen per service (bounded by `max_routes_per_service`).
    routes: HashMap<Arc<str>, crate::FastSet<Arc<str>>>,
    other: Arc<str>,
}

const UNKNOWN: &str = "unknown";

impl Rest {
    pub fn new(cfg: RestConfig) -> Rest {
        let ports = cfg
            .ports
            .iter()
            .map(|(p, s)| (*p, Arc::from(s.as_str())))
            .collect();
        Rest {
            cfg,
            ports,
            routes: HashMap::default(),
            other: Arc::from("{other}"),
        }
    }

    /// The service and the path with the deployment prefix removed.
    fn service<'a>(&self, port: u16, path: &'a str) -> (Option<Arc<str>>, &'a str) {
        for (prefix, svc) in &self.cfg.prefixes {
            if let Some(rest) = path.strip_prefix(prefix.as_str())
                && (rest.is_empty() || rest.starts_with('/'))
            {
                return (Some(Arc::from(svc.as_str())), rest);
            }
        }
        (self.ports.get(&port).cloned(), path)
    }

    /// The bounded template: new templates past the per-service cap become `{other}`.
    fn route(&mut self, service: Option<&Arc<str>>, path: &str, h: &mut Health) -> Arc<str> {
        let t = route::template(service.map(|s| &**s), path);
        let key = service.map_or(UNKNOWN, |s| &**s);
        let seen = match self.routes.get_mut(key) {
            Some(seen) => seen,
            None => self.routes.entry(Arc::from(key)).or_default(),
        };
        // a known template costs no allocation beyond building it
        if let Some(known) = seen.get(t.as_str()) {
            return known.clone();
        }
        if seen.len() >= self.cfg.max_routes_per_service {
            *h.series_folded.entry("http_route").or_default() += 1;
            return self.other.clone();
        }
        let t: Arc<str> = Arc::from(t);
        seen.insert(t.clone());
        t
    }

    pub fn event(&mut self, ex: Exchange, book: &mut AddressBook, h: &mut Health) -> HttpEvent {
        let req = ex.request;
        let (service, path) = self.service(ex.server.port, &req.path);
        let route = self.route(service.as_ref(), path, h);
        if let Some(svc) = &service {
            book.learn_rest_caller(ex.server.ip, services::api_process(svc));
        }
        let client = caller(req.user_agent.as_deref(), &ex.client.ip, book);
        let method = METHODS
            .iter()
            .find(|m| **m == &*req.method)
            .copied()
            .unwrap_or("OTHER");
        let resp = ex.response.as_ref();
        let status = resp.map(|r| r.head.status);
        let outcome = match (ex.end, status) {
            (End::NoResponse, _) => HttpOutcome::NoResponse,
            (End::ResponseLost, _) | (_, None) => HttpOutcome::ResponseLost,
            (_, Some(s)) if s >= 500 => HttpOutcome::ServerError,
            (_, Some(s)) if s >= 400 => HttpOutcome::ClientError,
            _ => HttpOutcome::Ok,
        };
        let error = resp
            .filter(|r| !r.error_body.is_empty())
            .and_then(|r| fault::parse(&r.error_body));
        // oslo.middleware ignores a global id not of its format; so do we
        let global_request_id = req.request_id.filter(|id| valid_request_id(id));
        let secs = |t: crate::time::Ts| t.as_secs_f64();
        HttpEvent {
            client,
            user_agent: req.user_agent,
            service,
            server: ex.server.to_string(),
            method,
            route,
            path: req.path,
            status,
            t_request: secs(ex.t_request),
            t_response: resp.map(|r| secs(r.t_first)),
            t_response_end: resp.map(|r| secs(r.t_end)),
            duration_s: resp
                .filter(|_| ex.end == End::Complete)
                .map(|r| r.t_end.secs_since(ex.t_request)),
            request_id: resp.and_then(|r| r.head.request_id.clone()),
            global_request_id,
            outcome,
            truncated: ex.end == End::Truncated,
            error,
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
fn caller(ua: Option<&str>, ip: &std::net::IpAddr, book: &mut AddressBook) -> Process {
    let host = ip.to_string();
    let named = |service: &str| Process {
        service: Some(service.to_string()),
        pid: None,
        host: host.clone(),
    };
    match ua.map_or(Agent::Other, agent::classify) {
        Agent::Process(name) => {
            book.learn_rest_caller(*ip, &name);
            // the address may also give the pid, when it is that very service
            match book.lookup(ip) {
                Some(p) if p.service.as_deref() == Some(&name) => (**p).clone(),
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
            (Some(p), _) => (**p).clone(),
            (None, Agent::ClientLibrary(lib)) => named(&lib),
            (None, _) => named(EXTERNAL),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }

    #[test]
    fn route_cap_folds_and_counts() {
        let mut r = Rest::new(RestConfig {
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
