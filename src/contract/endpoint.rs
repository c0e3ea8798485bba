//! A TCP endpoint: where a probe saw a connection's client or server.

use std::fmt;
use std::net::IpAddr;

#[derive(Copy, Clone, Eq, PartialEq, Hash, Ord, PartialOrd)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
}

impl Endpoint {
    /// The endpoint as one 64-bit word, the address (an IPv6 one folded) above the port:
    /// for hashing (one write where a derived hash makes four per endpoint), never for
    /// equality, as an IPv6 address does not fit.
    pub fn word(&self) -> u64 {
        let ip = match self.ip {
            IpAddr::V4(v4) => u64::from(u32::from(v4)),
            IpAddr::V6(v6) => {
                let x = u128::from(v6);
                // prefix and interface id, turned against each other so that equal halves
                // do not cancel
                (x as u64) ^ ((x >> 64) as u64).rotate_left(29)
            }
        };
        ip.rotate_left(16) ^ u64::from(self.port)
    }

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

    /// Endpoints that differ in any part of the address or port get different words, as
    /// far as a word can tell them apart (an IPv6 address is folded to 64 bits).
    #[test]
    fn words_tell_endpoints_apart() {
        let ep = |ip: &str, port| Endpoint {
            ip: ip.parse().expect("an address"),
            port,
        };
        let all = [
            ep("127.0.0.1", 5672),
            ep("127.0.0.1", 5673),
            ep("127.0.0.2", 5672),
            ep("10.0.0.1", 80),
            ep("::1", 5672),
            ep("::2", 5672),
            ep("fe80::1", 5672),
            // prefix and interface id alike: they must not cancel
            ep("1:2:3:4:1:2:3:4", 5672),
            ep("5:6:7:8:5:6:7:8", 5672),
        ];
        let mut words: Vec<u64> = all.iter().map(Endpoint::word).collect();
        words.sort_unstable();
        words.dedup();
        assert_eq!(words.len(), all.len());
    }

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
