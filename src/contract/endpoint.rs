//! A TCP endpoint: where a probe saw a connection's client or server.

use std::fmt;
use std::net::IpAddr;

#[derive(Copy, Clone, Eq, PartialEq, Hash, Ord, PartialOrd)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

impl Endpoint {
    /// The text `Display` writes, without the formatting machinery: every REST event
    /// names its server and client, and `fmt` costs more than the rest of the event.
    pub fn text(&self) -> String {
        match self.ip {
            IpAddr::V4(_) => {
                let mut s = ip_text(&self.ip);
                s.push(':');
                push_decimal(&mut s, u32::from(self.port));
                s
            }
            IpAddr::V6(_) => self.to_string(),
        }
    }
}

/// An address as `Display` writes it (IPv4 without the formatting machinery).
pub fn ip_text(ip: &IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(21);
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                push_decimal(&mut s, u32::from(octet));
            }
            s
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

fn push_decimal(s: &mut String, n: u32) {
    s.push_str(itoa::Buffer::new().format(n));
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_what_display_writes() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "192.168.100.255",
            "255.255.255.255",
            "::1",
            "fe80::1",
        ] {
            for port in [0, 9, 80, 5672, 65535] {
                let e = Endpoint {
                    ip: ip.parse().unwrap(),
                    port,
                };
                assert_eq!(e.text(), e.to_string());
                assert_eq!(ip_text(&e.ip), e.ip.to_string());
            }
        }
    }
}
