//! Which process lives at an address, learned from AMQP: oslo.messaging names its process
//! in every connection it opens (`connection_name`). REST callers are then recognised by
//! their source address, when that address is home to one service only.

use crate::FastMap as HashMap;
use crate::contract::Process;
use std::net::IpAddr;
use std::sync::Arc;

/// What one address is known to host.
#[derive(Debug, Clone)]
enum Tenant {
    One(Arc<Process>),
    /// One service, several processes (API workers): the pid is not known.
    OneService(Arc<Process>),
    /// Several services share the address: it names nobody.
    Shared,
}

/// Bounded: past `cap` addresses, new ones are not learned (counted by the caller).
#[derive(Debug)]
pub struct AddressBook {
    by_ip: HashMap<IpAddr, Tenant>,
    cap: usize,
}

impl AddressBook {
    pub fn new(cap: usize) -> AddressBook {
        AddressBook {
            by_ip: HashMap::default(),
            cap,
        }
    }

    /// Learns a named process; false when the book is full and the address is new.
    pub fn learn(&mut self, ip: IpAddr, p: &Arc<Process>) -> bool {
        if p.service.is_none() {
            return true;
        }
        let full = self.by_ip.len() >= self.cap;
        match self.by_ip.get_mut(&ip) {
            None if full => return false,
            None => {
                self.by_ip.insert(ip, Tenant::One(p.clone()));
            }
            Some(t) => {
                let next = match &*t {
                    Tenant::One(q) if q.service == p.service && q.pid == p.pid => return true,
                    Tenant::One(q) | Tenant::OneService(q) if q.service == p.service => {
                        Tenant::OneService(Arc::new(Process {
                            service: q.service.clone(),
                            pid: None,
                            host: q.host.clone(),
                        }))
                    }
                    _ => Tenant::Shared,
                };
                *t = next;
            }
        }
        true
    }

    /// A REST exchange showed `service` at `ip` (its User-Agent named it, or it served an
    /// API there): an address already home to another service names nobody any more.
    /// REST alone never names an address: a User-Agent is the caller's say-so.
    pub fn learn_rest_caller(&mut self, ip: IpAddr, service: &str) {
        if let Some(t) = self.by_ip.get_mut(&ip) {
            let other = match &*t {
                Tenant::One(p) | Tenant::OneService(p) => p.service.as_deref() != Some(service),
                Tenant::Shared => false,
            };
            if other {
                *t = Tenant::Shared;
            }
        }
    }

    /// The one service (and process, when there is one) at `ip`.
    pub fn lookup(&self, ip: &IpAddr) -> Option<&Arc<Process>> {
        match self.by_ip.get(ip)? {
            Tenant::One(p) | Tenant::OneService(p) => Some(p),
            Tenant::Shared => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(service: &str, pid: u32) -> Arc<Process> {
        Arc::new(Process {
            service: Some(service.into()),
            pid: Some(pid),
            host: "10.0.0.5".into(),
        })
    }

    #[test]
    fn an_address_names_only_a_single_service() {
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        let mut b = AddressBook::new(10);
        b.learn(ip, &p("nova-compute", 7));
        assert_eq!(b.lookup(&ip).unwrap().pid, Some(7));
        b.learn(ip, &p("nova-compute", 8));
        let q = b.lookup(&ip).unwrap();
        assert_eq!((q.service.as_deref(), q.pid), (Some("nova-compute"), None));
        b.learn(ip, &p("neutron-server", 9));
        assert!(b.lookup(&ip).is_none());
        let other: IpAddr = "10.0.0.7".parse().unwrap();
        b.learn(other, &p("nova-compute", 7));
        b.learn_rest_caller(other, "nova-compute");
        assert!(b.lookup(&other).is_some());
        b.learn_rest_caller(other, "neutron-server");
        assert!(
            b.lookup(&other).is_none(),
            "a REST caller of another service shares it"
        );
        let mut small = AddressBook::new(1);
        assert!(small.learn(ip, &p("a", 1)));
        assert!(!small.learn("10.0.0.6".parse().unwrap(), &p("b", 2)));
    }
}
