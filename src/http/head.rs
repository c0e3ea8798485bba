//! Request and response heads: httparse does the syntax; we keep only the few header
//! values framing and OpenStack semantics need. Every other header, credentials included
//! (X-Auth-Token, Authorization, Cookie, …), is skipped without being copied.

use crate::contract::TraceContext;
use std::mem::MaybeUninit;

/// Longest request path kept (after the query string is dropped).
const MAX_PATH: usize = 2048;
/// Longest User-Agent / request id kept.
const MAX_VALUE: usize = 256;
/// Headers per message httparse is given room for; more is an anomaly.
const MAX_HEADERS: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body, or a body of exactly this many bytes.
    Length(u64),
    Chunked,
    /// The body ends when the connection closes (responses only).
    UntilClose,
    /// The connection stops being HTTP (CONNECT 2xx, 101 Switching Protocols).
    Tunnel,
}

/// What the length headers say, before the method/status rules are applied.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BodyHeaders {
    pub content_length: Option<u64>,
    pub chunked: bool,
    /// Two Content-Length headers that disagree (request smuggling or a broken peer).
    pub conflicting_length: bool,
    pub bad_length: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    pub method: Box<str>,
    /// The path of the request target: no query string, no scheme or authority.
    pub path: String,
    pub minor: u8,
    pub body: BodyHeaders,
    pub user_agent: Option<String>,
    /// `X-OpenStack-Request-ID` as sent: the caller's global request id.
    pub request_id: Option<String>,
    pub expect_continue: bool,
    pub upgrade: bool,
    /// The request line had no `HTTP/1.x` (an HTTP/0.9-style or broken client).
    pub missing_version: bool,
    /// The trace the caller is in (`traceparent`, else osprofiler's `X-Trace-Info`).
    pub trace_context: Option<TraceContext>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    pub minor: u8,
    pub body: BodyHeaders,
    /// `x-openstack-request-id` (or nova's `x-compute-request-id`, ironic's
    /// `openstack-request-id`): the callee's own request id.
    pub request_id: Option<String>,
    /// Content-Type is JSON (or absent): the error body may carry an OpenStack fault.
    pub json_or_unknown: bool,
    /// Content-Encoding other than identity: the body is not readable as is.
    pub encoded: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Not an HTTP/1.x message start (the kind names the httparse error).
    Syntax(&'static str),
    TooManyHeaders,
}

impl HeadError {
    pub fn kind(self) -> &'static str {
        match self {
            HeadError::Syntax(k) => k,
            HeadError::TooManyHeaders => "too_many_headers",
        }
    }
}

fn syntax(e: httparse::Error) -> HeadError {
    match e {
        httparse::Error::TooManyHeaders => HeadError::TooManyHeaders,
        httparse::Error::HeaderName => HeadError::Syntax("bad_header_name"),
        httparse::Error::HeaderValue => HeadError::Syntax("bad_header_value"),
        httparse::Error::NewLine => HeadError::Syntax("bad_newline"),
        httparse::Error::Status => HeadError::Syntax("bad_status"),
        httparse::Error::Token => HeadError::Syntax("bad_token"),
        httparse::Error::Version => HeadError::Syntax("bad_version"),
    }
}

fn config() -> httparse::ParserConfig {
    let mut c = httparse::ParserConfig::default();
    c.allow_multiple_spaces_in_request_line_delimiters(true)
        .allow_multiple_spaces_in_response_status_delimiters(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .allow_spaces_after_header_name_in_responses(true)
        .ignore_invalid_headers_in_responses(true)
        .ignore_invalid_headers_in_requests(true);
    c
}

/// A bounded, printable copy of a header value we keep.
fn keep(v: &[u8]) -> Option<String> {
    let v = v.trim_ascii();
    if v.is_empty() {
        return None;
    }
    let v = &v[..v.len().min(MAX_VALUE)];
    if let Some(text) = crate::text::printable_ascii(v) {
        return Some(text.to_owned()); // the usual case: one copy
    }
    Some(
        String::from_utf8_lossy(v)
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect(),
    )
}

/// The header fields either direction reads: every other one is skipped unread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ContentLength,
    TransferEncoding,
    UserAgent,
    /// `X-OpenStack-Request-ID`: the caller's id in a request, the callee's in a response.
    OpenStackRequestId,
    /// nova's `x-compute-request-id` and ironic's `openstack-request-id` (responses).
    OtherRequestId,
    Expect,
    Upgrade,
    TraceParent,
    TraceInfo,
    ContentType,
    ContentEncoding,
    Other,
}

impl Field {
    /// A name's field, by its length first: a head's fields are mostly ones we skip,
    /// and a length rules out all but one or two names without reading a byte.
    fn of(name: &str) -> Field {
        let is = |known: &str| name.eq_ignore_ascii_case(known);
        match name.len() {
            6 if is("expect") => Field::Expect,
            7 if is("upgrade") => Field::Upgrade,
            10 if is("user-agent") => Field::UserAgent,
            11 if is("traceparent") => Field::TraceParent,
            12 if is("content-type") => Field::ContentType,
            12 if is("x-trace-info") => Field::TraceInfo,
            14 if is("content-length") => Field::ContentLength,
            16 if is("content-encoding") => Field::ContentEncoding,
            17 if is("transfer-encoding") => Field::TransferEncoding,
            20 if is("x-compute-request-id") || is("openstack-request-id") => Field::OtherRequestId,
            22 if is("x-openstack-request-id") => Field::OpenStackRequestId,
            _ => Field::Other,
        }
    }
}

impl BodyHeaders {
    /// A Content-Length header.
    fn content_length(&mut self, value: &[u8]) {
        match crate::text::utf8(value).and_then(|s| s.trim().parse::<u64>().ok()) {
            Some(n) => {
                if self.content_length.is_some_and(|old| old != n) {
                    self.conflicting_length = true;
                }
                self.content_length.get_or_insert(n);
            }
            None => self.bad_length = true,
        }
    }

    /// A Transfer-Encoding header: chunked must be the last coding; anything else leaves
    /// the body unframed.
    fn transfer_encoding(&mut self, value: &[u8]) {
        let last = value.rsplit(|b| *b == b',').next().unwrap_or(b"");
        self.chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
    }
}

/// Whether a Content-Type names JSON (`application/json`, `…+json`), in any case.
fn names_json(value: &[u8]) -> bool {
    value.windows(4).any(|w| w.eq_ignore_ascii_case(b"json"))
}

fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|b| *b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The path of a request target: origin form as is, absolute form without scheme and
/// authority (which may hold `user:password@`), the query and fragment dropped.
pub fn target_path(target: &str) -> String {
    let mut t = target;
    if let Some(rest) = t
        .strip_prefix("http://")
        .or_else(|| t.strip_prefix("https://"))
    {
        t = rest.find('/').map_or("/", |i| &rest[i..]);
    }
    let end = memchr::memchr2(b'?', b'#', t.as_bytes()).unwrap_or(t.len());
    let mut p = &t[..end];
    if p.len() > MAX_PATH {
        let mut cut = MAX_PATH;
        while !p.is_char_boundary(cut) {
            cut -= 1;
        }
        p = &p[..cut];
    }
    p.to_string()
}

/// Parses a complete request head (`buf` ends with the blank line).
pub fn parse_request(buf: &[u8]) -> Result<RequestHead, HeadError> {
    let mut headers = [MaybeUninit::uninit(); MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = config().parse_request_with_uninit_headers(&mut req, buf, &mut headers);
    let (method, target, minor, fields, missing_version) = match parsed {
        Ok(httparse::Status::Complete(_)) => (
            req.method.unwrap_or(""),
            req.path.unwrap_or(""),
            req.version.unwrap_or(1),
            &*req.headers,
            false,
        ),
        Ok(httparse::Status::Partial) => return Err(HeadError::Syntax("bad_head")),
        Err(e @ (httparse::Error::Version | httparse::Error::Token)) => {
            return parse_request_without_version(buf).ok_or(syntax(e));
        }
        Err(e) => return Err(syntax(e)),
    };
    Ok(request_head(method, target, minor, fields, missing_version))
}

/// `GET /path` with no protocol version: kept as a request (the server may answer it),
/// its headers read if they parse.
fn parse_request_without_version(buf: &[u8]) -> Option<RequestHead> {
    let nl = memchr::memchr(b'\n', buf)?;
    let line = std::str::from_utf8(&buf[..nl]).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ').filter(|p| !p.is_empty());
    let (method, target) = (parts.next()?, parts.next()?);
    if parts.next().is_some() || looks_like_request(line.as_bytes()) != Some(true) {
        return None;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let fields = match httparse::parse_headers(&buf[nl + 1..], &mut headers) {
        Ok(httparse::Status::Complete((_, h))) => h,
        _ => &[],
    };
    Some(request_head(method, target, 0, fields, true))
}

fn request_head(
    method: &str,
    target: &str,
    minor: u8,
    fields: &[httparse::Header<'_>],
    missing_version: bool,
) -> RequestHead {
    let mut head = RequestHead {
        method: method.into(),
        path: target_path(target),
        minor,
        body: BodyHeaders::default(),
        user_agent: None,
        request_id: None,
        expect_continue: false,
        upgrade: false,
        missing_version,
        trace_context: None,
    };
    let mut osprofiler = None;
    for h in fields {
        match Field::of(h.name) {
            Field::ContentLength => head.body.content_length(h.value),
            Field::TransferEncoding => head.body.transfer_encoding(h.value),
            Field::UserAgent => head.user_agent = keep(h.value),
            Field::OpenStackRequestId => head.request_id = keep(h.value),
            Field::Expect => head.expect_continue = has_token(h.value, b"100-continue"),
            Field::Upgrade => head.upgrade = true,
            Field::TraceParent => {
                head.trace_context =
                    crate::text::utf8(h.value).and_then(TraceContext::from_traceparent)
            }
            Field::TraceInfo => osprofiler = osprofiler_ids(h.value),
            _ => {}
        }
    }
    // both sent: the W3C context is the one an OpenTelemetry backend holds
    head.trace_context = head.trace_context.or(osprofiler);
    head
}

/// osprofiler's `X-Trace-Info`: base64url of `{"base_id": …, "parent_id": …}` (signed by
/// `X-Trace-HMAC`, which a tap cannot check and does not read).
fn osprofiler_ids(value: &[u8]) -> Option<TraceContext> {
    use base64::Engine;
    if value.len() > 1024 {
        return None;
    }
    let v = value.trim_ascii();
    let json = base64::engine::general_purpose::URL_SAFE
        .decode(v)
        .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(v))
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Ids<'a> {
        #[serde(borrow)]
        base_id: std::borrow::Cow<'a, str>,
        #[serde(borrow)]
        parent_id: Option<std::borrow::Cow<'a, str>>,
    }
    let ids: Ids<'_> = serde_json::from_slice(&json).ok()?;
    // a request that starts a trace names no parent: the trace itself is its parent
    let parent = ids.parent_id.as_deref().unwrap_or(&ids.base_id);
    TraceContext::from_osprofiler(&ids.base_id, parent)
}

/// Parses a complete response head.
pub fn parse_response(buf: &[u8]) -> Result<ResponseHead, HeadError> {
    let mut headers = [MaybeUninit::uninit(); MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    match config().parse_response_with_uninit_headers(&mut resp, buf, &mut headers) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(HeadError::Syntax("bad_head")),
        Err(e) => return Err(syntax(e)),
    }
    let mut head = ResponseHead {
        status: resp.code.unwrap_or(0),
        minor: resp.version.unwrap_or(1),
        body: BodyHeaders::default(),
        request_id: None,
        json_or_unknown: true,
        encoded: false,
    };
    for h in resp.headers.iter() {
        match Field::of(h.name) {
            Field::ContentLength => head.body.content_length(h.value),
            Field::TransferEncoding => head.body.transfer_encoding(h.value),
            // nova sends two of these with one value; the first wins
            Field::OpenStackRequestId | Field::OtherRequestId if head.request_id.is_none() => {
                head.request_id = keep(h.value)
            }
            Field::ContentType => head.json_or_unknown = names_json(h.value),
            Field::ContentEncoding => {
                head.encoded = !h.value.trim_ascii().eq_ignore_ascii_case(b"identity")
            }
            _ => {}
        }
    }
    Ok(head)
}

/// Request body framing (RFC 9112 §6.3): chunked, else Content-Length, else none.
pub fn request_framing(head: &RequestHead) -> Framing {
    if head.body.chunked {
        Framing::Chunked
    } else {
        Framing::Length(head.body.content_length.unwrap_or(0))
    }
}

/// Response body framing, which depends on the request it answers.
pub fn response_framing(head: &ResponseHead, request_method: Option<&str>) -> Framing {
    let s = head.status;
    let connect = request_method == Some("CONNECT");
    if s == 101 || (connect && (200..300).contains(&s)) {
        return Framing::Tunnel;
    }
    if (100..200).contains(&s) || s == 204 || s == 304 || request_method == Some("HEAD") {
        return Framing::Length(0);
    }
    if head.body.chunked {
        Framing::Chunked
    } else if let Some(n) = head.body.content_length {
        Framing::Length(n)
    } else {
        Framing::UntilClose
    }
}

/// Could `b` be the start of a request line? (A method token and a space.) `None`: too
/// few bytes to tell.
pub fn looks_like_request(b: &[u8]) -> Option<bool> {
    let mut n = 0;
    for &c in b.iter().take(24) {
        if c == b' ' {
            return Some(n >= 3 && b[..n].iter().all(|c| c.is_ascii_uppercase()));
        }
        if !c.is_ascii_uppercase() {
            return Some(false);
        }
        n += 1;
    }
    if n >= 24 { Some(false) } else { None }
}

/// Could `b` be the start of a status line (`HTTP/1.x `)?
pub fn looks_like_response(b: &[u8]) -> Option<bool> {
    const P: &[u8] = b"HTTP/1.";
    let n = b.len().min(P.len());
    if b[..n] != P[..n] {
        Some(false)
    } else if n < P.len() {
        None
    } else {
        Some(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_keeps_only_what_it_needs() {
        let h = parse_request(
            b"PUT /v2.0/ports/9a3c?fields=id HTTP/1.1\r\nHost: x\r\nX-Auth-Token: gAAAA-secret\r\n\
              User-Agent: nova-compute keystoneauth1/5.18.1\r\nX-OpenStack-Request-ID: req-1\r\n\
              Content-Length: 12\r\n\r\n",
        )
        .unwrap();
        assert_eq!(&*h.method, "PUT");
        assert_eq!(h.path, "/v2.0/ports/9a3c");
        assert_eq!(h.body.content_length, Some(12));
        assert_eq!(h.request_id.as_deref(), Some("req-1"));
        assert!(!format!("{h:?}").contains("secret"));
        assert_eq!(request_framing(&h), Framing::Length(12));
    }

    #[test]
    fn fields_are_known_in_any_case_and_only_by_their_whole_name() {
        let known = [
            ("Expect", Field::Expect),
            ("Upgrade", Field::Upgrade),
            ("User-Agent", Field::UserAgent),
            ("traceparent", Field::TraceParent),
            ("Content-Type", Field::ContentType),
            ("X-Trace-Info", Field::TraceInfo),
            ("Content-Length", Field::ContentLength),
            ("Content-Encoding", Field::ContentEncoding),
            ("Transfer-Encoding", Field::TransferEncoding),
            ("x-compute-request-id", Field::OtherRequestId),
            ("OpenStack-Request-ID", Field::OtherRequestId),
            ("X-OpenStack-Request-ID", Field::OpenStackRequestId),
        ];
        for (name, field) in known {
            assert_eq!(Field::of(name), field, "{name}");
            assert_eq!(Field::of(&name.to_ascii_uppercase()), field, "{name}");
            // one byte changed anywhere, or one more or fewer, is another header
            for at in 0..name.len() {
                let mut other = name.as_bytes().to_vec();
                other[at] = b'_';
                let other = String::from_utf8(other).unwrap();
                assert_eq!(Field::of(&other), Field::Other, "{other}");
            }
            assert_eq!(Field::of(&name[1..]), Field::Other, "{name}");
            assert_eq!(Field::of(&format!("{name}s")), Field::Other, "{name}");
        }
        for skipped in ["X-Auth-Token", "Authorization", "Host", "Accept", ""] {
            assert_eq!(Field::of(skipped), Field::Other, "{skipped}");
        }
    }

    #[test]
    fn json_content_types_in_any_case() {
        for json in [
            "application/json",
            "Application/JSON; charset=UTF-8",
            "a/x+json",
        ] {
            assert!(names_json(json.as_bytes()), "{json}");
        }
        for other in ["text/html", "application/jso", "", "js on"] {
            assert!(!names_json(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn absolute_targets_lose_credentials_and_query() {
        assert_eq!(target_path("http://u:pw@h:80/a/b?token=x"), "/a/b");
        assert_eq!(target_path("http://h"), "/");
        assert_eq!(target_path("*"), "*");
        assert_eq!(target_path("/a#frag?x"), "/a");
        assert_eq!(target_path("/servers/é?q"), "/servers/é");
    }

    #[test]
    fn response_framing_rules() {
        let r =
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").unwrap();
        assert_eq!(response_framing(&r, Some("GET")), Framing::Chunked);
        assert_eq!(response_framing(&r, Some("HEAD")), Framing::Length(0));
        assert_eq!(response_framing(&r, Some("CONNECT")), Framing::Tunnel);
        let r = parse_response(b"HTTP/1.0 200 OK\r\n\r\n").unwrap();
        assert_eq!(response_framing(&r, Some("GET")), Framing::UntilClose);
        let r = parse_response(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n").unwrap();
        assert_eq!(response_framing(&r, Some("GET")), Framing::Length(0));
        let r = parse_response(
            b"HTTP/1.1 500 x\r\nContent-Length: 3\r\ncontent-length: 4\r\n\
              x-openstack-request-id: req-a\r\nx-compute-request-id: req-a\r\n\
              Content-Type: application/json\r\n\r\n",
        )
        .unwrap();
        assert!(r.body.conflicting_length && r.json_or_unknown);
        assert_eq!(r.request_id.as_deref(), Some("req-a"));
    }

    #[test]
    fn start_line_sniffing() {
        assert_eq!(looks_like_request(b"GET / HTTP/1.1"), Some(true));
        assert_eq!(looks_like_request(b"GE"), None);
        assert_eq!(looks_like_request(b"get /"), Some(false));
        assert_eq!(looks_like_request(b"\x16\x03\x01"), Some(false));
        assert_eq!(looks_like_response(b"HTTP/1.1 200"), Some(true));
        assert_eq!(looks_like_response(b"HTT"), None);
        assert_eq!(looks_like_response(b"AMQP"), Some(false));
    }

    #[test]
    fn a_request_line_without_version_is_still_a_request() {
        let h = parse_request(b"GET /gen.php?x=1\r\nHost: a\r\nUser-Agent: m\r\n\r\n").unwrap();
        assert!(h.missing_version);
        assert_eq!((&*h.method, h.path.as_str()), ("GET", "/gen.php"));
        assert_eq!(h.user_agent.as_deref(), Some("m"));
        let h = parse_request(b"GET /\r\nFakeHeader\r\nHost: localhost\r\n\r\n").unwrap();
        assert!(h.missing_version && h.user_agent.is_none());
        assert!(parse_request(b"GET / HTTP/2.0\r\n\r\n").is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(parse_request(b"\x00\x01\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 2XX OK\r\n\r\n").is_err());
    }
}
