//! basic.publish, basic.deliver and content headers read by hand: nearly every method
//! frame of an oslo.messaging broker is one of the two methods, each followed by a content
//! header, and they carry only short strings, integers and a small header table.
//!
//! Why not `amq-protocol` here (it reads every other method): its generated parsers go
//! through nom combinators, collect each short string byte by byte and build every header
//! table as a map, several times what the layout needs. This module reads exactly the
//! fields the connection keeps; anything it does not read the way `amq-protocol` would (a
//! truncated frame, a name that is not UTF-8, another method, header tables nested
//! deeper than `MAX_DEPTH`) gives None, and the caller hands the frame to `amq-protocol`, which then
//! decides (and names the anomaly) as before. Property tests (here and in `conn.rs`) hold
//! the two to the same answers on arbitrary payloads.

use super::kept::{Pending, Props};
use super::recent::RecentNames;

const BASIC: u16 = 60;
const PUBLISH: u16 = 40;
const DELIVER: u16 = 60;

/// A method frame's payload (class and method ids first) as basic.publish or
/// basic.deliver; None for any other method and for anything to leave to `amq-protocol`.
pub(super) fn method(payload: &[u8], names: &mut RecentNames) -> Option<Pending> {
    let mut r = Reader(payload);
    let (class, method) = (r.u16()?, r.u16()?);
    match (class, method) {
        (BASIC, PUBLISH) => {
            r.u16()?; // reserved (ticket)
            let exchange = names.get(r.short_str()?);
            let routing_key = names.get(r.short_str()?);
            let flags = r.u8()?;
            Some(Pending::Publish {
                exchange,
                routing_key,
                mandatory: flags & 1 != 0,
            })
        }
        (BASIC, DELIVER) => {
            let consumer_tag = r.short_string()?;
            r.u64()?; // delivery tag: acks are not followed
            let flags = r.u8()?;
            let exchange = names.get(r.short_str()?);
            let routing_key = names.get(r.short_str()?);
            Some(Pending::Deliver {
                consumer_tag,
                redelivered: flags & 1 != 0,
                exchange,
                routing_key,
            })
        }
        _ => None,
    }
}

/// Nesting of header tables and arrays read here; deeper goes to amq-protocol.
const MAX_DEPTH: usize = 8;

/// A content header frame's payload: the body size and the properties kept; None for
/// anything to leave to `amq-protocol`.
pub(super) fn content_header(payload: &[u8]) -> Option<(u64, Props)> {
    let mut r = Reader(payload);
    r.u16()?; // class
    r.u16()?; // weight
    let body_size = r.u64()?;
    let mut p = Props::default();
    let flags = r.u16()?;
    // property k is present when bit 15 - k is set, in this order, for k in 0..14 (bit 0
    // flags more flag words): the set bits are visited, not all fourteen tested
    let mut present = flags & !0b11;
    while present != 0 {
        let k = present.leading_zeros();
        present &= !(0x8000 >> k);
        match k {
            2 => r.headers(&mut p)?,
            3 => p.delivery_mode = Some(r.u8()?),
            4 => _ = r.u8()?, // priority
            7 => p.expiration = Some(r.short_str()?.to_owned()),
            9 => _ = r.u64()?, // timestamp
            // content type and encoding, correlation id, reply-to, message id, type,
            // user id, app id, cluster id
            _ => _ = r.short_str()?,
        }
    }
    Some((body_size, p))
}

/// A header table value, as far as the kept headers need it.
enum Value<'a> {
    Int(i64),
    Text(&'a [u8]),
    Other,
}

/// The unread rest of a payload.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// The header table; `compression` (as text, lossy like amq-protocol's long string),
    /// `x-stream-offset` and `x-delivery-count` are kept.
    fn headers(&mut self, h: &mut Props) -> Option<()> {
        let len = self.u32()? as usize;
        let mut t = Reader(self.take(len)?);
        while !t.0.is_empty() {
            let key = t.short_str()?;
            let value = t.value()?;
            // a key given twice: the last one counts, as in amq-protocol's map
            let int = || match value {
                Value::Int(i) => Some(i),
                _ => None,
            };
            match key {
                "compression" => {
                    h.compression = match value {
                        Value::Text(b) => Some(String::from_utf8_lossy(b).into_owned()),
                        _ => None,
                    }
                }
                "x-stream-offset" => h.stream_offset = int(),
                "x-delivery-count" => h.delivery_count = int(),
                _ => {}
            }
        }
        Some(())
    }

    /// A typed value (amq-protocol's type letters, RabbitMQ's reading of them).
    fn value(&mut self) -> Option<Value<'a>> {
        self.value_at(0)
    }

    fn value_at(&mut self, depth: usize) -> Option<Value<'a>> {
        let tag = self.u8()?;
        Some(match tag {
            b'b' => Value::Int(i64::from(self.u8()? as i8)),
            b'B' => Value::Int(i64::from(self.u8()?)),
            b's' | b'U' => Value::Int(i64::from(self.u16()? as i16)),
            b'u' => Value::Int(i64::from(self.u16()?)),
            b'I' => Value::Int(i64::from(self.u32()? as i32)),
            b'i' => Value::Int(i64::from(self.u32()?)),
            b'L' | b'l' => Value::Int(self.u64()? as i64),
            b'S' => {
                let len = self.u32()? as usize;
                Value::Text(self.take(len)?)
            }
            b't' => self.skip(1)?,
            b'f' => self.skip(4)?,
            b'D' => self.skip(5)?,
            b'd' | b'T' => self.skip(8)?,
            b'x' => {
                let len = self.u32()? as usize;
                self.skip(len)?
            }
            b'V' => Value::Other,
            b'F' | b'A' if depth < MAX_DEPTH => {
                // a nested table or array (RabbitMQ's x-death, …): checked, not kept
                let len = self.u32()? as usize;
                let mut inner = Reader(self.take(len)?);
                while !inner.0.is_empty() {
                    if tag == b'F' {
                        inner.short_str()?;
                    }
                    inner.value_at(depth + 1)?;
                }
                Value::Other
            }
            // deeper nesting and unknown types: amq-protocol's to judge
            _ => return None,
        })
    }

    fn skip(&mut self, n: usize) -> Option<Value<'a>> {
        self.take(n)?;
        Some(Value::Other)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().ok()?))
    }

    /// A length octet and that many bytes of UTF-8.
    fn short_str(&mut self) -> Option<&'a str> {
        let n = self.u8()?;
        crate::text::utf8(self.take(usize::from(n))?)
    }

    fn short_string(&mut self) -> Option<String> {
        self.short_str().map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::{AMQPClass, basic, parse_class};
    use proptest::prelude::*;

    /// What `amq-protocol` reads from the same payload, in this module's terms.
    fn reference(payload: &[u8]) -> Option<Pending> {
        match parse_class(payload).ok()?.1 {
            AMQPClass::Basic(basic::AMQPMethod::Publish(p)) => Some(Pending::Publish {
                exchange: p.exchange.as_str().into(),
                routing_key: p.routing_key.as_str().into(),
                mandatory: p.mandatory,
            }),
            AMQPClass::Basic(basic::AMQPMethod::Deliver(d)) => Some(Pending::Deliver {
                consumer_tag: d.consumer_tag.to_string(),
                redelivered: d.redelivered,
                exchange: d.exchange.as_str().into(),
                routing_key: d.routing_key.as_str().into(),
            }),
            _ => None,
        }
    }

    fn short(s: &[u8]) -> Vec<u8> {
        let mut v = vec![s.len() as u8];
        v.extend_from_slice(s);
        v
    }

    fn publish(exchange: &[u8], routing_key: &[u8], flags: u8) -> Vec<u8> {
        let mut v = vec![0, 60, 0, 40, 0, 0];
        v.extend(short(exchange));
        v.extend(short(routing_key));
        v.push(flags);
        v
    }

    fn deliver(tag: &[u8], delivery: u64, flags: u8, exchange: &[u8], rk: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 60, 0, 60];
        v.extend(short(tag));
        v.extend(delivery.to_be_bytes());
        v.push(flags);
        v.extend(short(exchange));
        v.extend(short(rk));
        v
    }

    #[test]
    fn reads_what_oslo_messaging_sends() {
        let p = publish(b"nova", b"compute.host1", 1);
        assert_eq!(
            method(&p, &mut RecentNames::default()),
            Some(Pending::Publish {
                exchange: "nova".into(),
                routing_key: "compute.host1".into(),
                mandatory: true,
            })
        );
        assert_eq!(method(&p, &mut RecentNames::default()), reference(&p));
        let d = deliver(b"ctag1", 7, 1, b"", b"reply_abc");
        assert_eq!(method(&d, &mut RecentNames::default()), reference(&d));
        assert!(matches!(
            method(&d, &mut RecentNames::default()),
            Some(Pending::Deliver {
                redelivered: true,
                ..
            })
        ));
        // other methods and cut frames are left to amq-protocol
        assert_eq!(
            method(
                &[0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 1, 0],
                &mut RecentNames::default()
            ),
            None
        );
        assert_eq!(method(&p[..p.len() - 1], &mut RecentNames::default()), None);
        assert_eq!(
            method(&publish(b"\xff", b"x", 0), &mut RecentNames::default()),
            None
        );
    }

    proptest! {
        /// Well-formed frames of both methods read as amq-protocol reads them.
        #[test]
        fn agrees_on_well_formed_frames(
            ex in proptest::collection::vec(any::<u8>(), 0..40),
            rk in "\\PC{0,40}",
            tag in "[a-z0-9.-]{0,30}",
            delivery in any::<u64>(),
            flags in any::<u8>(),
            trailing in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            let rk = rk.as_bytes();
            let rk = &rk[..rk.len().min(255)];
            for mut frame in [publish(&ex, rk, flags), deliver(tag.as_bytes(), delivery, flags, &ex, rk)] {
                frame.extend(&trailing);
                let want = reference(&frame);
                prop_assert_eq!(method(&frame, &mut RecentNames::default()), want.clone());
                if std::str::from_utf8(&ex).is_ok() {
                    prop_assert!(want.is_some());
                }
            }
        }

        /// On any bytes after the two ids, it reads the frame exactly as amq-protocol
        /// does: the same fields, or nothing where amq-protocol finds an error.
        #[test]
        fn never_disagrees(deliver_id in any::<bool>(), rest in proptest::collection::vec(any::<u8>(), 0..48)) {
            let mut frame = vec![0, 60, 0, if deliver_id { 60 } else { 40 }];
            frame.extend(rest);
            prop_assert_eq!(method(&frame, &mut RecentNames::default()), reference(&frame));
        }
    }
}
