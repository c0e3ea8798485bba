//! oslo.messaging semantics: the JSON body of an AMQP message → call / cast / fanout /
//! reply / heartbeat / notification, with the ids that correlate them.
//!
//! Only the fields named below are read; serde skips everything else without keeping it,
//! so `args`, `payload` and every `_context_*` secret (auth_token, trace_info.hmac_key)
//! never leave the parser.

use crate::amqp::Props;
use serde::Deserialize;
use std::borrow::Cow;
use std::io::Read;

pub mod cache;
pub mod scan;

pub use cache::DecodeCache;

pub use crate::contract::{
    NotOslo, Notification, Oslo, RemoteError, Reply, ReplyPart, Request, RpcType, TraceContext,
};

/// The members of a body or inner message we read; everything else is skipped unread.
#[derive(Default)]
struct Fields<'a> {
    envelope_version: Option<Cow<'a, str>>,
    /// Raw JSON string literal: JSON inside JSON, walked as the inner message's fields.
    envelope_message: Option<&'a str>,
    method: Option<Cow<'a, str>>,
    namespace: Option<Cow<'a, str>>,
    version: Option<Cow<'a, str>>,
    msg_id: Option<Cow<'a, str>>,
    reply_q: Option<Cow<'a, str>>,
    unique_id: Option<Cow<'a, str>>,
    call_monitor: Option<f64>,
    request_id: Option<Cow<'a, str>>,
    global_request_id: Option<Cow<'a, str>>,
    result: bool,
    failure: Option<Cow<'a, str>>,
    ending: Option<bool>,
    event_type: Option<Cow<'a, str>>,
    publisher_id: Option<Cow<'a, str>>,
    priority: Option<Cow<'a, str>>,
    message_id: Option<Cow<'a, str>>,
    traceparent: Option<Cow<'a, str>>,
    /// osprofiler's `{hmac_key, base_id, parent_id}`, raw: only the two ids are read from
    /// it, and only when no `traceparent` came too.
    trace_info: Option<&'a str>,
    /// The text is an inner message still escaped in its envelope.
    escaped: bool,
}

/// A JSON string value; null or any other type reads as absent.
fn string(raw: &str) -> Option<Cow<'_, str>> {
    if raw.starts_with('"') {
        unescape(raw)
    } else {
        None
    }
}

/// The members of a body into `outer`, and of the inner message when the body is an
/// envelope into `inner` (walked in the same pass, escaped, with only the kept values
/// unescaped). Filled in place: the two are large, and moving them out copied them.
fn fields<'a>(json: &'a str, outer: &mut Fields<'a>, inner: &mut Fields<'a>) -> Option<()> {
    inner.escaped = true;
    scan::members_nesting(
        json,
        "oslo.message",
        |key, raw| outer.set(&key, raw, string),
        |key, raw, plain| inner.set(&key, raw, |r| scan::escaped_string(r, plain)),
    )
}

impl<'a> Fields<'a> {
    fn set(&mut self, key: &str, raw: &'a str, string: impl Fn(&'a str) -> Option<Cow<'a, str>>) {
        match key {
            "oslo.version" => self.envelope_version = string(raw),
            "oslo.message" => self.envelope_message = raw.starts_with('"').then_some(raw),
            "method" => self.method = string(raw),
            "namespace" => self.namespace = string(raw),
            "version" => self.version = string(raw),
            "_msg_id" => self.msg_id = string(raw),
            "_reply_q" => self.reply_q = string(raw),
            "_unique_id" => self.unique_id = string(raw),
            "_timeout" => self.call_monitor = raw.parse::<f64>().ok(),
            "_context_request_id" => self.request_id = string(raw),
            "_context_global_request_id" => self.global_request_id = string(raw),
            "result" => self.result = true,
            "failure" => self.failure = string(raw),
            "ending" => self.ending = matches!(raw, "true" | "false").then(|| raw == "true"),
            "event_type" => self.event_type = string(raw),
            "publisher_id" => self.publisher_id = string(raw),
            "priority" => self.priority = string(raw),
            "message_id" => self.message_id = string(raw),
            "_context_traceparent" => self.traceparent = string(raw),
            "_context_trace_info" => self.trace_info = raw.starts_with('{').then_some(raw),
            _ => {}
        }
    }
}

impl Fields<'_> {
    /// The trace the sender is in: W3C first (what an OpenTelemetry backend holds), else
    /// osprofiler's ids. The `hmac_key` beside them is skipped, never copied.
    fn trace_context(&self) -> Option<TraceContext> {
        if let Some(tp) = self
            .traceparent
            .as_deref()
            .and_then(TraceContext::from_traceparent)
        {
            return Some(tp);
        }
        let raw = self.trace_info?;
        let (mut base, mut parent) = (None, None);
        let mut keep = |key: Cow<'_, str>, value: Option<Cow<'_, str>>| match &*key {
            "base_id" => base = value.map(Cow::into_owned),
            "parent_id" => parent = value.map(Cow::into_owned),
            _ => {}
        };
        if self.escaped {
            scan::nested_escaped_members(raw, |k, v| keep(k, scan::escaped_value(v)))?;
        } else {
            scan::members(raw, |k, v| keep(k, string(v)))?;
        }
        let base = base?;
        TraceContext::from_osprofiler(&base, parent.as_deref().unwrap_or(&base))
    }
}

#[derive(Deserialize)]
struct Failure<'a> {
    #[serde(borrow)]
    class: Option<Cow<'a, str>>,
    #[serde(borrow)]
    module: Option<Cow<'a, str>>,
    #[serde(borrow)]
    message: Option<Cow<'a, str>>,
}

/// Longest exception message kept (the rest of a traceback-laden message is noise).
const MAX_ERROR_MESSAGE: usize = 512;

fn own(c: Option<Cow<'_, str>>) -> Option<String> {
    c.map(Cow::into_owned)
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

pub fn parse_failure(text: &str) -> RemoteError {
    match serde_json::from_str::<Failure<'_>>(text) {
        Ok(f) => RemoteError {
            class: f
                .class
                .map(Cow::into_owned)
                .unwrap_or_else(|| "unknown".into()),
            module: own(f.module),
            message: f.message.map(|m| {
                let m = crate::openstack::secrets::scrub(&m).into_owned();
                truncate(m, MAX_ERROR_MESSAGE)
            }),
        },
        Err(_) => RemoteError {
            class: "unknown".into(),
            module: None,
            message: None,
        },
    }
}

/// Reads an AMQP message body as oslo.messaging. `exchange` tells fanouts apart; a
/// compressed body is inflated to `max_inflated` bytes at most (`amqp.max_body_bytes`: a
/// few KiB of zlib can claim gigabytes).
pub fn decode(
    exchange: &str,
    props: &Props,
    body: &[u8],
    max_inflated: usize,
) -> Result<Oslo, NotOslo> {
    let inflated;
    let body = match props.compression.as_deref() {
        None => body,
        // kombu's "gzip" is a zlib stream
        Some("application/x-gzip") | Some("zlib") | Some("application/zlib") => {
            let mut out = Vec::new();
            flate2::read::ZlibDecoder::new(body)
                .take((max_inflated as u64).saturating_add(1))
                .read_to_end(&mut out)
                .map_err(|_| NotOslo::BadCompression)?;
            if out.len() > max_inflated {
                return Err(NotOslo::InflatedTooLarge);
            }
            inflated = out;
            &inflated
        }
        Some(_) => return Err(NotOslo::CompressedUnsupported),
    };
    let text = crate::text::utf8(body).ok_or(NotOslo::NotJson)?;
    let (mut outer, mut inner) = (Fields::default(), Fields::default());
    fields(text, &mut outer, &mut inner).ok_or(NotOslo::NotJson)?;
    match (&outer.envelope_version, outer.envelope_message) {
        (Some(v), Some(_)) => {
            if !v.starts_with("2.") {
                return Err(NotOslo::UnsupportedEnvelope);
            }
            classify(exchange, &mut inner)
        }
        // no envelope: the 1.0 format, still used by the `messaging` notification driver
        _ => classify(exchange, &mut outer),
    }
}

/// The message `f` holds; its kept values are taken out of it.
fn classify(exchange: &str, f: &mut Fields<'_>) -> Result<Oslo, NotOslo> {
    if let (Some(event_type), Some(publisher_id)) = (&f.event_type, &f.publisher_id) {
        return Ok(Oslo::Notification(Notification {
            publisher_id: publisher_id.to_string(),
            event_type: event_type.to_string(),
            priority: f.priority.as_deref().unwrap_or("INFO").to_owned(),
            message_id: own(f.message_id.take()),
            unique_id: own(f.unique_id.take()),
            request_id: own(f.request_id.take()),
            global_request_id: own(f.global_request_id.take()),
        }));
    }
    if f.method.is_some() {
        let trace_context = f.trace_context();
        let method = f.method.take().unwrap_or_default();
        let rpc_type = if exchange.ends_with("_fanout") {
            RpcType::Fanout
        } else if f.msg_id.is_some() {
            RpcType::Call
        } else {
            RpcType::Cast
        };
        return Ok(Oslo::Request(Request {
            rpc_type,
            method: method.into_owned(),
            namespace: own(f.namespace.take()),
            version: own(f.version.take()),
            msg_id: own(f.msg_id.take()),
            reply_q: own(f.reply_q.take()),
            unique_id: own(f.unique_id.take()),
            request_id: own(f.request_id.take()),
            global_request_id: own(f.global_request_id.take()),
            call_monitor_s: f.call_monitor,
            trace_context,
        }));
    }
    if (f.ending.is_some() || f.result || f.failure.is_some())
        && let Some(msg_id) = f.msg_id.take()
    {
        let failure = f.failure.as_deref().map(parse_failure);
        let part = match f.ending {
            Some(true) => ReplyPart::Final,
            Some(false) if failure.is_none() => ReplyPart::Heartbeat,
            _ => ReplyPart::LegacyPayload,
        };
        return Ok(Oslo::Reply(Reply {
            msg_id: msg_id.into_owned(),
            unique_id: own(f.unique_id.take()),
            part,
            failure,
        }));
    }
    Err(NotOslo::UnknownShape)
}

/// Unescapes a JSON string literal (quotes included). The envelope's `oslo.message` is
/// JSON inside JSON: every inner quote is an escape, which serde_json handles one at a
/// time; copying the runs between backslashes is several times faster. None if malformed.
pub fn unescape(literal: &str) -> Option<Cow<'_, str>> {
    let s = literal.strip_prefix('"')?.strip_suffix('"')?;
    let b = s.as_bytes();
    let Some(first) = memchr::memchr(b'\\', b) else {
        return Some(Cow::Borrowed(s));
    };
    let mut out: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    let mut at = Some(first);
    while let Some(j) = at {
        out.extend_from_slice(&b[i..j]);
        let esc = *b.get(j + 1)?;
        i = j + 2;
        if esc == b'u' {
            let hex = |k: usize| u32::from_str_radix(s.get(k..k + 4)?, 16).ok();
            let mut cp = hex(j + 2)?;
            i = j + 6;
            // the next escape is read for a low half only after a high one (else it is
            // read once, on its own turn)
            if high_surrogate(cp)
                && b.get(i) == Some(&b'\\')
                && b.get(i + 1) == Some(&b'u')
                && let Some(pair) = hex(i + 2).and_then(|lo| surrogate_pair(cp, lo))
            {
                cp = pair;
                i += 6;
            }
            push_code_point(&mut out, cp);
        } else {
            out.push(escaped_byte(esc)?);
        }
        at = memchr::memchr(b'\\', &b[i..]).map(|k| k + i);
    }
    out.extend_from_slice(&b[i..]);
    String::from_utf8(out).ok().map(Cow::Owned)
}

/// The byte a JSON escape's letter stands for (`\\n` → newline), for every letter but
/// `u`; None if it is not an escape.
pub(super) fn escaped_byte(letter: u8) -> Option<u8> {
    Some(match letter {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => return None,
    })
}

/// Whether a `\\uXXXX` escape is the first half of a UTF-16 surrogate pair.
pub(super) fn high_surrogate(cp: u32) -> bool {
    (0xD800..0xDC00).contains(&cp)
}

/// The code point a `\\uXXXX` pair of UTF-16 surrogates spells, if they are one.
pub(super) fn surrogate_pair(high: u32, low: u32) -> Option<u32> {
    (high_surrogate(high) && (0xDC00..0xE000).contains(&low))
        .then(|| 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
}

/// A `\\uXXXX` escape's code point as UTF-8 (a lone surrogate as U+FFFD, as serde_json
/// reads it lossily).
pub(super) fn push_code_point(out: &mut Vec<u8>, cp: u32) {
    let c = char::from_u32(cp).unwrap_or('\u{FFFD}');
    out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
}

/// `compute.host1` → (`compute`, Some(`host1`)). Topics have no dots; hosts may.
pub fn split_routing_key(rk: &str) -> (&str, Option<&str>) {
    match rk.split_once('.') {
        Some((topic, server)) if !server.is_empty() => (topic, Some(server)),
        _ => (rk, None),
    }
}

/// What an oslo.messaging queue is for, by its name: `reply` (`reply_<uuid>`, or the
/// queue manager's `reply_<host>:<process>:<n>`), `fanout` (`<topic>_fanout_<id>`, or the
/// shared `<topic>_fanout` stream), `notification` (`<topic>.<priority>`), else `rpc`.
pub fn queue_kind(queue: &str) -> &'static str {
    const PRIORITIES: &[&str] = &[
        "audit", "debug", "info", "warn", "error", "critical", "sample",
    ];
    if queue.starts_with("reply_") {
        "reply"
    } else if queue.contains("_fanout") {
        "fanout"
    } else if queue
        .rsplit_once('.')
        .is_some_and(|(_, p)| PRIORITIES.contains(&p))
    {
        "notification"
    } else {
        "rpc"
    }
}

/// `argv0:pid:uuid` → (service, pid).
pub fn parse_connection_name(name: &str) -> (Option<String>, Option<u32>) {
    let mut parts = name.rsplitn(3, ':');
    let _uuid = parts.next();
    let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
    let argv0 = parts.next();
    match (argv0, pid) {
        (Some(a), Some(p)) if !a.is_empty() => (Some(a.to_owned()), Some(p)),
        _ => (Some(name.to_owned()).filter(|n| !n.is_empty()), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read with the default `amqp.max_body_bytes`.
    fn decode(exchange: &str, props: &Props, body: &[u8]) -> Result<Oslo, NotOslo> {
        super::decode(exchange, props, body, 64 << 20)
    }

    fn env(inner: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"oslo.version": "2.0", "oslo.message": inner}))
            .unwrap()
    }

    #[test]
    fn call_from_the_reference() {
        let inner = r#"{"method": "echo", "args": {"value": "hello"}, "version": "5.0", "_msg_id": "18c3aeba5d884884a9ea818660fd1abe", "_reply_q": "reply_290096a378764630a92d2701b519157d", "_timeout": null, "_unique_id": "2ca8e518e0514cd0a3f72626d9ad5aff", "_context_auth_token": "SECRET-TOKEN", "_context_request_id": "req-11111111-2222-3333-4444-555555555555", "_context_global_request_id": "req-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee", "_context_roles": ["member"]}"#;
        let Oslo::Request(r) = decode("nova", &Props::default(), &env(inner)).unwrap() else {
            panic!()
        };
        assert_eq!(r.rpc_type, RpcType::Call);
        assert_eq!(r.method, "echo");
        assert_eq!(
            r.msg_id.as_deref(),
            Some("18c3aeba5d884884a9ea818660fd1abe")
        );
        assert_eq!(
            r.request_id.as_deref(),
            Some("req-11111111-2222-3333-4444-555555555555")
        );
        assert_eq!(r.call_monitor_s, None);
        assert!(!format!("{r:?}").contains("SECRET"));
    }

    #[test]
    fn replies_heartbeats_failures() {
        let hb = r#"{"result": null, "failure": null, "ending": false, "_msg_id": "m1", "_unique_id": "u"}"#;
        let Oslo::Reply(r) = decode("", &Props::default(), &env(hb)).unwrap() else {
            panic!()
        };
        assert_eq!(r.part, ReplyPart::Heartbeat);
        let failure = serde_json::to_string(&serde_json::json!({"class": "PortBindingFailed", "module": "nova.exception", "message": "Binding failed", "tb": ["x"], "args": [], "kwargs": {}})).unwrap();
        let inner = serde_json::json!({"result": null, "failure": failure, "ending": true, "_msg_id": "m2", "_unique_id": "u2"}).to_string();
        let Oslo::Reply(r) = decode("", &Props::default(), &env(&inner)).unwrap() else {
            panic!()
        };
        assert_eq!(r.part, ReplyPart::Final);
        let f = r.failure.unwrap();
        assert_eq!(
            (f.class.as_str(), f.module.as_deref()),
            ("PortBindingFailed", Some("nova.exception"))
        );
        // legacy two-part reply
        let legacy = r#"{"result": 5, "failure": null, "_msg_id": "m3", "_unique_id": "u3"}"#;
        let Oslo::Reply(r) = decode("", &Props::default(), &env(legacy)).unwrap() else {
            panic!()
        };
        assert_eq!(r.part, ReplyPart::LegacyPayload);
    }

    #[test]
    fn fanout_cast_notification_v1() {
        let inner = r#"{"method": "update", "args": {}, "_unique_id": "u"}"#;
        let Oslo::Request(r) = decode("scheduler_fanout", &Props::default(), &env(inner)).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.rpc_type, RpcType::Fanout);
        let Oslo::Request(r) = decode("nova", &Props::default(), &env(inner)).unwrap() else {
            panic!()
        };
        assert_eq!(r.rpc_type, RpcType::Cast);
        let bare = br#"{"message_id": "x", "publisher_id": "compute.host1", "event_type": "compute.instance.create.error", "priority": "ERROR", "payload": {}, "timestamp": "t"}"#;
        let Oslo::Notification(n) = decode("nova", &Props::default(), bare).unwrap() else {
            panic!()
        };
        assert_eq!(n.priority, "ERROR");
    }

    #[test]
    fn compressed_and_garbage() {
        use std::io::Write;
        let plain = env(r#"{"method": "m", "_unique_id": "u"}"#);
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
        z.write_all(&plain).unwrap();
        let props = Props {
            compression: Some("application/x-gzip".into()),
            ..Default::default()
        };
        let zipped = z.finish().unwrap();
        assert!(matches!(
            decode("nova", &props, &zipped),
            Ok(Oslo::Request(_))
        ));
        // inflated to the byte the cap allows, not one more
        let fits = super::decode("nova", &props, &zipped, plain.len());
        assert!(matches!(fits, Ok(Oslo::Request(_))));
        assert_eq!(
            super::decode("nova", &props, &zipped, plain.len() - 1),
            Err(NotOslo::InflatedTooLarge)
        );
        let bz = Props {
            compression: Some("application/x-bz2".into()),
            ..Default::default()
        };
        assert_eq!(
            decode("nova", &bz, b"x"),
            Err(NotOslo::CompressedUnsupported)
        );
        assert_eq!(
            decode("nova", &Props::default(), b"\xff\x00"),
            Err(NotOslo::NotJson)
        );
        assert_eq!(
            decode("nova", &Props::default(), &env("{\"a\":1}")),
            Err(NotOslo::UnknownShape)
        );
        let v3 = br#"{"oslo.version": "3.0", "oslo.message": "{}"}"#;
        assert_eq!(
            decode("nova", &Props::default(), v3),
            Err(NotOslo::UnsupportedEnvelope)
        );
    }

    proptest::proptest! {
        #[test]
        fn unescape_agrees_with_serde_json(text in "\\PC*", ctl in proptest::collection::vec(0u32..0x10FFFF, 0..8)) {
            let mut s = text.clone();
            s.extend(ctl.into_iter().filter_map(char::from_u32));
            let literal = serde_json::to_string(&s).unwrap();
            let got = unescape(&literal).unwrap().into_owned();
            proptest::prop_assert_eq!(got, s.clone());
            // Python's json.dumps escapes non-ASCII as \uXXXX (surrogate pairs too); the textual
            // rewrite below needs a string with no backslash of its own: the same text without
            // them (a rejected case instead made proptest give up at high case counts)
            let s: String = s.chars().filter(|&c| c != '\\').collect();
            let ascii: String = s.chars().map(|c| if c.is_ascii() { c.to_string() } else {
                let mut b = [0u16; 2];
                c.encode_utf16(&mut b).iter().map(|u| format!("\\u{u:04x}")).collect()
            }).collect();
            let literal = serde_json::to_string(&ascii).unwrap().replace("\\\\u", "\\u");
            let got = unescape(&literal).unwrap().into_owned();
            proptest::prop_assert_eq!(got, s);
        }
    }

    #[test]
    fn unescape_rejects_garbage() {
        for bad in ["", "\"", "\"\\\"", "\"\\x\"", "\"\\u12\"", "x"] {
            assert!(unescape(bad).is_none(), "{bad:?}");
        }
        assert_eq!(unescape("\"\\ud83d\\ude00\"").unwrap(), "😀");
    }

    #[test]
    fn names() {
        assert_eq!(
            split_routing_key("compute.host1.example.org"),
            ("compute", Some("host1.example.org"))
        );
        assert_eq!(split_routing_key("scheduler"), ("scheduler", None));
        assert_eq!(
            parse_connection_name("nova-compute:12449:949f05df-d1e4-4ae0-9d9d-32747b9aa1a7"),
            (Some("nova-compute".into()), Some(12449))
        );
        assert_eq!(parse_connection_name("weird"), (Some("weird".into()), None));
        for (q, kind) in [
            ("reply_290096a378764630a92d2701b519157d", "reply"),
            ("reply_host1:nova-api:3", "reply"),
            ("scheduler_fanout_5b4c", "fanout"),
            ("scheduler_fanout", "fanout"),
            ("compute_fanout_host2:nova-compute:1", "fanout"),
            ("notifications.info", "notification"),
            ("compute.host1", "rpc"),
            ("conductor", "rpc"),
        ] {
            assert_eq!(queue_kind(q), kind, "{q}");
        }
    }
}
