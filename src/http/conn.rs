//! One HTTP/1.x connection: each direction is framed into messages, and responses are
//! paired with requests in order (HTTP/1.1 answers in request order, pipelined or not).
//!
//! Bodies are skipped, never buffered, except the first bytes of a 4xx/5xx response,
//! where OpenStack puts its fault. Request bodies are never read at all (keystone's
//! `/v3/auth/tokens` carries passwords there). After a capture gap or garbage the
//! direction resynchronises at the next line that starts a message; a response whose
//! request was lost is counted, never paired with the wrong request.

use super::head::{
    self, Framing, RequestHead, ResponseHead, looks_like_request, looks_like_response,
};
use crate::decode::Endpoint;
use crate::health::Health;
use crate::tcp::flows::{App, Dir};
use crate::tcp::stream::Chunk;
use crate::time::Ts;
use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// A head longer than this is garbage, not HTTP.
    pub max_head_bytes: usize,
    /// Requests waiting for their response per connection (pipelining depth).
    pub max_pipeline: usize,
    /// Bytes of a 4xx/5xx body kept to read the fault message from.
    pub max_error_body: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            max_head_bytes: 64 << 10,
            max_pipeline: 64,
            max_error_body: 4 << 10,
        }
    }
}

/// How an exchange ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The whole response was seen.
    Complete,
    /// The response head was seen, part of its body was not (gap, connection cut).
    Truncated,
    /// A capture gap swallowed the response (or it was not HTTP).
    ResponseLost,
    /// The connection or the capture ended with no response.
    NoResponse,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub head: ResponseHead,
    /// First byte of the final response's status line.
    pub t_first: Ts,
    /// Last byte of the response.
    pub t_end: Ts,
    /// 1xx responses before the final one.
    pub informational: u8,
    /// The start of a 4xx/5xx body (de-chunked), for the fault message.
    pub error_body: Vec<u8>,
}

/// One request and what became of it.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub flow: u64,
    pub client: Endpoint,
    pub server: Endpoint,
    pub request: RequestHead,
    pub t_request: Ts,
    pub response: Option<Response>,
    pub end: End,
}

#[derive(Debug)]
enum Pending {
    Request {
        head: RequestHead,
        t_request: Ts,
        informational: u8,
    },
    /// A request the capture lost part of: its response must not pair with the next one.
    Lost,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between messages: CR/LF are skipped, anything else starts a head.
    Start,
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    Trailer,
    UntilClose,
    /// Lost: looking for a line that starts a message.
    Resync {
        line_start: bool,
    },
    /// No longer HTTP (CONNECT, Upgrade).
    Tunnel,
}

/// Why a side is resynchronising: decides what it means when the next bytes are not a
/// message start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Suspect {
    Nothing,
    /// Joined mid-stream: a request side inside a request whose response must not pair
    /// with the next request.
    Midstream,
    /// A gap ended between messages or past one's end: if what follows is not a message
    /// start, the gap swallowed one.
    Gap,
}

/// One direction's framing state.
#[derive(Debug)]
struct Side {
    state: State,
    /// The head (or chunk-size / trailer line) being gathered; in Resync, a short carry.
    buf: Vec<u8>,
    /// When the message being gathered started.
    started: Ts,
    suspect: Suspect,
}

impl Side {
    fn new(midstream: bool) -> Side {
        Side {
            state: if midstream {
                State::Resync { line_start: true }
            } else {
                State::Start
            },
            buf: Vec::new(),
            started: Ts::ZERO,
            suspect: if midstream {
                Suspect::Midstream
            } else {
                Suspect::Nothing
            },
        }
    }
}

/// The response being read now.
#[derive(Debug)]
struct Current {
    /// None: a response with no request to pair with (counted, not reported).
    request: Option<(RequestHead, Ts)>,
    response: Response,
    capture: bool,
    truncated: bool,
}

pub struct HttpConnection {
    id: u64,
    client: Endpoint,
    server: Endpoint,
    cfg: HttpConfig,
    sides: [Side; 2],
    pending: VecDeque<Pending>,
    current: Option<Current>,
}

impl HttpConnection {
    pub fn new(
        id: u64,
        client: Endpoint,
        server: Endpoint,
        midstream: bool,
        cfg: HttpConfig,
    ) -> HttpConnection {
        HttpConnection {
            id,
            client,
            server,
            cfg,
            sides: [Side::new(midstream), Side::new(midstream)],
            pending: VecDeque::new(),
            current: None,
        }
    }

    fn exchange(
        &self,
        request: RequestHead,
        t_request: Ts,
        response: Option<Response>,
        end: End,
    ) -> Exchange {
        Exchange {
            flow: self.id,
            client: self.client,
            server: self.server,
            request,
            t_request,
            response,
            end,
        }
    }

    fn feed(&mut self, dir: Dir, ts: Ts, data: &[u8], h: &mut Health, out: &mut Vec<Exchange>) {
        let side = &mut self.sides[dir as usize];
        if matches!(side.state, State::Resync { .. }) && !side.buf.is_empty() {
            // a possible message start was cut at the end of the last chunk
            let mut joined = std::mem::take(&mut side.buf);
            joined.extend_from_slice(data);
            self.feed_data(dir, ts, &joined, h, out);
        } else {
            self.feed_data(dir, ts, data, h, out);
        }
    }

    fn feed_data(
        &mut self,
        dir: Dir,
        ts: Ts,
        mut data: &[u8],
        h: &mut Health,
        out: &mut Vec<Exchange>,
    ) {
        while !data.is_empty() {
            let d = dir as usize;
            match self.sides[d].state {
                State::Start => {
                    let skip = data
                        .iter()
                        .position(|b| !matches!(b, b'\r' | b'\n'))
                        .unwrap_or(data.len());
                    data = &data[skip..];
                    if !data.is_empty() {
                        let side = &mut self.sides[d];
                        side.state = State::Head;
                        side.started = ts;
                        side.buf.clear();
                    }
                }
                State::Head => data = self.gather_head(dir, ts, data, h, out),
                State::Body(left) => {
                    let n = left.min(data.len() as u64) as usize;
                    self.body_bytes(dir, &data[..n]);
                    data = &data[n..];
                    if left == n as u64 {
                        self.message_done(dir, ts, out);
                    } else {
                        self.sides[d].state = State::Body(left - n as u64);
                    }
                }
                State::ChunkSize | State::Trailer => data = self.gather_line(dir, ts, data, h, out),
                State::ChunkData(left) => {
                    let n = left.min(data.len() as u64) as usize;
                    self.body_bytes(dir, &data[..n]);
                    data = &data[n..];
                    self.sides[d].state = if left == n as u64 {
                        State::ChunkEnd
                    } else {
                        State::ChunkData(left - n as u64)
                    };
                }
                State::ChunkEnd => {
                    // CRLF (a bare LF is tolerated); anything else means we lost the framing
                    match data[0] {
                        b'\r' => data = &data[1..],
                        b'\n' => {
                            data = &data[1..];
                            self.sides[d].state = State::ChunkSize;
                            self.sides[d].buf.clear();
                        }
                        _ => {
                            h.anomaly("http", "bad_chunk");
                            self.lose_message(dir, ts, out);
                        }
                    }
                }
                State::UntilClose => {
                    self.body_bytes(dir, data);
                    data = &[];
                }
                State::Resync { line_start } => data = self.resync(dir, data, line_start, h, out),
                State::Tunnel => data = &[],
            }
        }
        if let Some(c) = self.current.as_mut()
            && dir == Dir::ToClient
        {
            c.response.t_end = ts;
        }
    }

    /// Gathers head bytes until the blank line; parses the head when it is complete.
    fn gather_head<'a>(
        &mut self,
        dir: Dir,
        ts: Ts,
        data: &'a [u8],
        h: &mut Health,
        out: &mut Vec<Exchange>,
    ) -> &'a [u8] {
        let max = self.cfg.max_head_bytes;
        let side = &mut self.sides[dir as usize];
        if side.buf.is_empty() {
            // the usual case: the whole head is in this chunk and is parsed in place
            let plausible = if dir == Dir::ToServer {
                looks_like_request(data)
            } else {
                looks_like_response(data)
            };
            if plausible != Some(false)
                && let Some(end) = head_end(&data[..data.len().min(max)], 0)
            {
                self.on_head(dir, ts, &data[..end], h, out);
                return &data[end..];
            }
        }
        let old = side.buf.len();
        let take = data.len().min(max + 4 - old.min(max));
        side.buf.extend_from_slice(&data[..take]);
        // reject non-HTTP early instead of gathering 64 KiB of it
        let plausible = if dir == Dir::ToServer {
            looks_like_request(&side.buf)
        } else {
            looks_like_response(&side.buf)
        };
        if plausible == Some(false) && side.buf.starts_with(&[0x16, 0x03]) {
            // a TLS handshake on an API port: nothing here is readable
            h.anomaly("http", "tls_encrypted");
            self.sides = [Side::new(false), Side::new(false)];
            for s in &mut self.sides {
                s.state = State::Tunnel;
            }
            return &[];
        }
        if plausible == Some(false) {
            h.anomaly("http", "not_a_message_start");
            self.lose_message(dir, ts, out);
            return &data[take..];
        }
        match head_end(&side.buf, old.saturating_sub(3)) {
            Some(end) => {
                let rest = &data[end - old..];
                side.buf.truncate(end);
                let buf = std::mem::take(&mut side.buf);
                self.on_head(dir, ts, &buf, h, out);
                let side = &mut self.sides[dir as usize];
                if side.buf.capacity() == 0 && buf.capacity() <= 16 << 10 {
                    side.buf = buf; // keep the allocation
                    side.buf.clear();
                }
                rest
            }
            None if side.buf.len() > max => {
                h.anomaly("http", "head_too_large");
                self.lose_message(dir, ts, out);
                &data[take..]
            }
            None => &data[take..],
        }
    }

    /// A chunk-size line or a trailer line.
    fn gather_line<'a>(
        &mut self,
        dir: Dir,
        ts: Ts,
        data: &'a [u8],
        h: &mut Health,
        out: &mut Vec<Exchange>,
    ) -> &'a [u8] {
        let side = &mut self.sides[dir as usize];
        let Some(nl) = memchr::memchr(b'\n', data) else {
            side.buf.extend_from_slice(data);
            if side.buf.len() > 4096 {
                h.anomaly("http", "bad_chunk");
                self.lose_message(dir, ts, out);
            }
            return &[];
        };
        side.buf.extend_from_slice(&data[..=nl]);
        let rest = &data[nl + 1..];
        let line = std::mem::take(&mut side.buf);
        let is_trailer = side.state == State::Trailer;
        if is_trailer {
            if line.trim_ascii().is_empty() {
                self.message_done(dir, ts, out);
            }
            // a trailer field: skipped, like every header we don't need
        } else {
            match httparse::parse_chunk_size(&line) {
                Ok(httparse::Status::Complete((_, 0))) => side.state = State::Trailer,
                Ok(httparse::Status::Complete((_, n))) => side.state = State::ChunkData(n),
                _ => {
                    h.anomaly("http", "bad_chunk");
                    self.lose_message(dir, ts, out);
                }
            }
        }
        let side = &mut self.sides[dir as usize];
        if side.buf.capacity() == 0 {
            side.buf = line;
            side.buf.clear();
        }
        rest
    }

    /// Skips to the next line that starts a message of this direction.
    fn resync<'a>(
        &mut self,
        dir: Dir,
        data: &'a [u8],
        line_start: bool,
        h: &mut Health,
        out: &mut Vec<Exchange>,
    ) -> &'a [u8] {
        let side = &mut self.sides[dir as usize];
        if line_start {
            let at = data
                .iter()
                .position(|b| !matches!(b, b'\r' | b'\n'))
                .unwrap_or(data.len());
            let data = &data[at..];
            if data.is_empty() {
                return data;
            }
            let verdict = if dir == Dir::ToServer {
                looks_like_request(data)
            } else {
                looks_like_response(data)
            };
            match verdict {
                Some(true) => {
                    side.state = State::Start;
                    side.suspect = Suspect::Nothing;
                    return data;
                }
                None => {
                    side.buf.clear();
                    side.buf.extend_from_slice(data);
                    return &[];
                }
                Some(false) => {}
            }
            match std::mem::replace(&mut side.suspect, Suspect::Nothing) {
                Suspect::Nothing => {}
                Suspect::Midstream => {
                    // joined inside a message: if it was a request, its response must
                    // not pair with the next request
                    if dir == Dir::ToServer {
                        self.pending.push_back(Pending::Lost);
                    }
                    h.anomaly("http", "midstream_skip");
                }
                Suspect::Gap => {
                    h.anomaly("http", "gap_lost_message");
                    self.lose_one(dir, out);
                }
            }
        }
        let side = &mut self.sides[dir as usize];
        // a message may also start right after body bytes with no line break between
        // (a body whose end the capture lost): look for the start line's version token
        let glued = glued_start(dir, data);
        let nl = memchr::memchr(b'\n', data);
        match (glued, nl) {
            (Some(at), nl) if nl.is_none_or(|nl| at <= nl) => {
                side.state = State::Start;
                side.suspect = Suspect::Nothing;
                &data[at..]
            }
            (_, Some(nl)) => {
                side.state = State::Resync { line_start: true };
                &data[nl + 1..]
            }
            (_, None) => {
                side.state = State::Resync { line_start: false };
                // keep the tail: a version token may be cut at the chunk's end
                let keep = data.len().min(24);
                side.buf.clear();
                side.buf.extend_from_slice(&data[data.len() - keep..]);
                &[]
            }
        }
    }

    fn on_head(&mut self, dir: Dir, ts: Ts, buf: &[u8], h: &mut Health, out: &mut Vec<Exchange>) {
        let started = self.sides[dir as usize].started;
        if dir == Dir::ToServer {
            match head::parse_request(buf) {
                Ok(req) => {
                    if req.missing_version {
                        h.anomaly("http", "request_line_missing_protocol");
                    }
                    if req.body.conflicting_length {
                        h.anomaly("http", "conflicting_content_length");
                    }
                    if req.body.bad_length {
                        h.anomaly("http", "bad_content_length");
                    }
                    let framing = head::request_framing(&req);
                    let connect = &*req.method == "CONNECT";
                    if self.pending.len() >= self.cfg.max_pipeline {
                        h.anomaly("http", "pipeline_overflow");
                        if let Some(Pending::Request {
                            head, t_request, ..
                        }) = self.pending.pop_front()
                        {
                            out.push(self.exchange(head, t_request, None, End::NoResponse));
                        }
                    }
                    self.pending.push_back(Pending::Request {
                        head: req,
                        t_request: started,
                        informational: 0,
                    });
                    self.sides[0].state = if connect {
                        // what follows is the tunnel, unless the proxy refuses
                        State::Tunnel
                    } else {
                        match framing {
                            Framing::Length(0) => State::Start,
                            Framing::Length(n) => State::Body(n),
                            _ => State::ChunkSize,
                        }
                    };
                }
                Err(e) => {
                    h.anomaly("http", e.kind());
                    self.pending.push_back(Pending::Lost);
                    self.sides[0].state = State::Resync { line_start: false };
                }
            }
            return;
        }
        let resp = match head::parse_response(buf) {
            Ok(r) => r,
            Err(e) => {
                h.anomaly("http", e.kind());
                self.lose_message(dir, ts, out);
                return;
            }
        };
        if resp.body.conflicting_length {
            h.anomaly("http", "conflicting_content_length");
        }
        if (100..200).contains(&resp.status) && resp.status != 101 {
            // 100 Continue, 103 Early Hints: the final response is still to come
            if let Some(Pending::Request { informational, .. }) = self.pending.front_mut() {
                *informational = informational.saturating_add(1);
            }
            self.sides[1].state = State::Start;
            return;
        }
        let (request, informational) = match self.pending.pop_front() {
            Some(Pending::Request {
                head,
                t_request,
                informational,
            }) => (Some((head, t_request)), informational),
            Some(Pending::Lost) => {
                h.anomaly("http", "response_to_lost_request");
                (None, 0)
            }
            None => {
                h.anomaly("http", "response_without_request");
                (None, 0)
            }
        };
        let method = request.as_ref().map(|(r, _)| &*r.method);
        let framing = head::response_framing(&resp, method);
        let capture = resp.status >= 400 && resp.json_or_unknown && !resp.encoded;
        self.current = Some(Current {
            request,
            response: Response {
                head: resp,
                t_first: started,
                t_end: ts,
                informational,
                error_body: Vec::new(),
            },
            capture,
            truncated: false,
        });
        match framing {
            Framing::Length(0) => self.message_done(dir, ts, out),
            Framing::Length(n) => self.sides[1].state = State::Body(n),
            Framing::Chunked => self.sides[1].state = State::ChunkSize,
            Framing::UntilClose => self.sides[1].state = State::UntilClose,
            Framing::Tunnel => {
                self.message_done(dir, ts, out);
                self.sides[0].state = State::Tunnel;
                self.sides[1].state = State::Tunnel;
            }
        }
        if framing != Framing::Tunnel && self.sides[0].state == State::Tunnel {
            // a refused CONNECT: the client goes on speaking HTTP
            self.sides[0].state = State::Start;
        }
    }

    fn body_bytes(&mut self, dir: Dir, bytes: &[u8]) {
        if dir == Dir::ToServer {
            return;
        }
        if let Some(c) = self.current.as_mut()
            && c.capture
        {
            let room = self
                .cfg
                .max_error_body
                .saturating_sub(c.response.error_body.len());
            c.response
                .error_body
                .extend_from_slice(&bytes[..bytes.len().min(room)]);
        }
    }

    /// The message of this direction ended normally.
    fn message_done(&mut self, dir: Dir, ts: Ts, out: &mut Vec<Exchange>) {
        self.sides[dir as usize].state = State::Start;
        if dir == Dir::ToClient {
            self.finish_response(ts, out);
        }
    }

    fn finish_response(&mut self, ts: Ts, out: &mut Vec<Exchange>) {
        if let Some(mut c) = self.current.take() {
            c.response.t_end = ts;
            if let Some((req, t)) = c.request {
                let end = if c.truncated {
                    End::Truncated
                } else {
                    End::Complete
                };
                out.push(self.exchange(req, t, Some(c.response), end));
            }
        }
    }

    /// This direction lost its framing (gap, garbage): the message in progress is given
    /// up and the side resynchronises.
    fn lose_message(&mut self, dir: Dir, ts: Ts, out: &mut Vec<Exchange>) {
        let d = dir as usize;
        let state = self.sides[d].state;
        self.sides[d].state = State::Resync { line_start: false };
        self.sides[d].buf.clear();
        if dir == Dir::ToServer {
            if matches!(state, State::Start | State::Head) {
                self.lose_one(dir, out);
            }
            return;
        }
        match state {
            State::Start | State::Head => self.lose_one(dir, out),
            State::Resync { .. } | State::Tunnel => {}
            _ => {
                if let Some(c) = self.current.as_mut() {
                    c.truncated = true;
                }
                self.finish_response(ts, out);
            }
        }
    }

    /// A message start of this direction was lost: a request whose response must not
    /// pair with the next request, or the response to the oldest waiting request.
    fn lose_one(&mut self, dir: Dir, out: &mut Vec<Exchange>) {
        if dir == Dir::ToServer {
            self.pending.push_back(Pending::Lost);
        } else if let Some(p) = self.pending.pop_front()
            && let Pending::Request {
                head, t_request, ..
            } = p
        {
            out.push(self.exchange(head, t_request, None, End::ResponseLost));
        }
    }

    fn gap(&mut self, dir: Dir, ts: Ts, mut n: u64, h: &mut Health, out: &mut Vec<Exchange>) {
        let d = dir as usize;
        match self.sides[d].state {
            State::Body(left) | State::ChunkData(left) if n <= left => {
                // only body bytes are missing: the framing survives
                if dir == Dir::ToClient
                    && let Some(c) = self.current.as_mut()
                {
                    c.truncated = true;
                    c.capture = false;
                }
                let rest = left - n;
                let chunked = matches!(self.sides[d].state, State::ChunkData(_));
                if rest == 0 {
                    if chunked {
                        self.sides[d].state = State::ChunkEnd;
                    } else {
                        self.message_done(dir, ts, out);
                    }
                } else {
                    self.sides[d].state = if chunked {
                        State::ChunkData(rest)
                    } else {
                        State::Body(rest)
                    };
                }
                return;
            }
            State::Body(left) => {
                // the body ended inside the gap, and the next message started in it
                if dir == Dir::ToClient
                    && let Some(c) = self.current.as_mut()
                {
                    c.truncated = true;
                }
                self.message_done(dir, ts, out);
                n -= left;
            }
            State::UntilClose => {
                if let Some(c) = self.current.as_mut() {
                    c.truncated = true;
                }
                return;
            }
            State::Resync { .. } | State::Tunnel => {
                self.sides[d].buf.clear();
                self.sides[d].state = State::Resync { line_start: false };
                return;
            }
            _ => {}
        }
        let side = &mut self.sides[d];
        match side.state {
            State::Start if n > 0 => {
                // the gap ended between messages or inside the next one: the bytes after
                // it tell which
                side.state = State::Resync { line_start: true };
                side.suspect = Suspect::Gap;
            }
            State::Start => {}
            _ => {
                h.anomaly("http", "gap_lost_message");
                self.lose_message(dir, ts, out);
                self.sides[d].state = State::Resync { line_start: true };
            }
        }
    }
}

/// Methods a request line may start with after garbage, longest first.
const METHODS: &[&[u8]] = &[
    b"OPTIONS", b"CONNECT", b"DELETE", b"PATCH", b"TRACE", b"POST", b"HEAD", b"GET", b"PUT",
];

/// Where a start line begins inside `data` with no line break before it: a status line's
/// `HTTP/1.`, or a request line's method before ` <target> HTTP/1.`.
fn glued_start(dir: Dir, data: &[u8]) -> Option<usize> {
    if dir == Dir::ToClient {
        let at = memchr::memmem::find(data, b"HTTP/1.")?;
        return (data.len() - at >= 9).then_some(at);
    }
    let v = memchr::memmem::find(data, b" HTTP/1.")?;
    let line = memchr::memrchr(b'\n', &data[..v]).map_or(0, |i| i + 1);
    let target_sp = memchr::memrchr(b' ', &data[line..v])? + line;
    let word = &data[line..target_sp];
    METHODS
        .iter()
        .find(|m| word.ends_with(m))
        .map(|m| target_sp - m.len())
}

/// End of the head: the byte after the blank line (CRLF CRLF, or bare LF LF).
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    // one searcher over the head's lines (a search per line set one up per line)
    memchr::memchr_iter(b'\n', &buf[from..]).find_map(|p| {
        let nl = from + p;
        match buf.get(nl + 1) {
            Some(b'\n') => Some(nl + 2),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => Some(nl + 3),
            _ => None,
        }
    })
}

impl App for HttpConnection {
    type Out = Vec<Exchange>;

    fn on_chunk(
        &mut self,
        dir: Dir,
        ts: Ts,
        chunk: Chunk<'_>,
        h: &mut Health,
        out: &mut Self::Out,
    ) {
        match chunk {
            Chunk::Data(d) => self.feed(dir, ts, d, h, out),
            Chunk::Gap(n) => self.gap(dir, ts, n, h, out),
        }
    }

    fn on_close(&mut self, ts: Ts, h: &mut Health, out: &mut Self::Out) {
        match self.sides[1].state {
            // a close-delimited body ends here, complete
            State::UntilClose => self.finish_response(ts, out),
            State::Start | State::Resync { .. } | State::Tunnel => {}
            _ => {
                if self.current.is_some() {
                    h.anomaly("http", "truncated_response");
                }
                if let Some(c) = self.current.as_mut() {
                    c.truncated = true;
                }
                self.finish_response(ts, out);
            }
        }
        for p in std::mem::take(&mut self.pending) {
            if let Pending::Request {
                head, t_request, ..
            } = p
            {
                out.push(self.exchange(head, t_request, None, End::NoResponse));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn ep(port: u16) -> Endpoint {
        Endpoint {
            ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port,
        }
    }

    /// Feeds (direction, bytes) pieces, one per "packet", then closes.
    fn run(midstream: bool, pieces: &[(Dir, Chunk<'_>)]) -> (Vec<Exchange>, Health) {
        let mut c = HttpConnection::new(1, ep(40000), ep(8774), midstream, HttpConfig::default());
        let mut h = Health::default();
        let mut out = Vec::new();
        for (i, (d, ch)) in pieces.iter().enumerate() {
            let ch = match ch {
                Chunk::Data(b) => Chunk::Data(b),
                Chunk::Gap(n) => Chunk::Gap(*n),
            };
            c.on_chunk(*d, Ts(i as u64 * 1000), ch, &mut h, &mut out);
        }
        c.on_close(Ts(1_000_000), &mut h, &mut out);
        (out, h)
    }

    use Dir::{ToClient as S, ToServer as C};

    /// Client bytes; server bytes.
    fn c(b: &[u8]) -> (Dir, Chunk<'_>) {
        (Dir::ToServer, Chunk::Data(b))
    }
    fn s(b: &[u8]) -> (Dir, Chunk<'_>) {
        (S, Chunk::Data(b))
    }

    /// The exchanges, as (path, status, end), are exactly `want`.
    #[track_caller]
    fn check(ex: &[Exchange], want: &[(&str, Option<u16>, End)]) {
        let got: Vec<(&str, Option<u16>, End)> = ex
            .iter()
            .map(|e| {
                let status = e.response.as_ref().map(|r| r.head.status);
                (e.request.path.as_str(), status, e.end)
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn pipelined_requests_pair_in_order_across_any_split() {
        let req =
            b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n\r\nHEAD /3 HTTP/1.1\r\n\r\n";
        let resp: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 404 No\r\n\
            Transfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
            HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n";
        for cut in 1..resp.len() {
            let (ex, h) = run(
                false,
                &[
                    (C, Chunk::Data(req)),
                    (S, Chunk::Data(&resp[..cut])),
                    (S, Chunk::Data(&resp[cut..])),
                ],
            );
            let want = [
                ("/1", Some(200), End::Complete),
                ("/2", Some(404), End::Complete),
                ("/3", Some(200), End::Complete),
            ];
            check(&ex, &want);
            assert!(h.anomalies.is_empty(), "cut {cut}: {:?}", h.anomalies);
            assert_eq!(ex[1].response.as_ref().unwrap().error_body, b"abc");
        }
    }

    #[test]
    fn continue_and_close_delimited_bodies() {
        let (ex, _) = run(
            false,
            &[
                (
                    C,
                    Chunk::Data(
                        b"POST /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
                    ),
                ),
                s(b"HTTP/1.1 100 Continue\r\n\r\n"),
                c(b"abc"),
                (
                    S,
                    Chunk::Data(
                        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\n\r\nbody until close",
                    ),
                ),
            ],
        );
        check(&ex, &[("/u", Some(200), End::Complete)]);
        assert_eq!(ex[0].response.as_ref().unwrap().informational, 2);
    }

    #[test]
    fn body_gap_keeps_framing_and_head_gap_loses_one_response() {
        let reqs: &[u8] = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n\
            GET /4 HTTP/1.1\r\n\r\n";
        let (ex, _) = run(
            false,
            &[
                (C, Chunk::Data(reqs)),
                s(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01"),
                // inside the body: the framing survives
                (S, Chunk::Gap(8)),
                s(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nab"),
                // a whole response gone, and the next one starts cleanly: a lost message
                // can't be seen, so the next response pairs with /3 (as Suricata does)
                (S, Chunk::Gap(30)),
                s(b"HTTP/1.1 201 OK\r\nContent-Length: 0\r\n\r\n"),
                // the gap ends inside a response: that response is lost, the next pairs
                (S, Chunk::Gap(30)),
                s(b"tail of a lost body\r\nHTTP/1.1 204 No\r\n\r\n"),
            ],
        );
        check(
            &ex,
            &[
                ("/1", Some(200), End::Truncated),
                ("/2", Some(200), End::Complete),
                ("/3", Some(201), End::Complete),
                ("/4", None, End::ResponseLost),
            ],
        );
    }

    #[test]
    fn gap_past_a_body_end_then_a_clean_start_loses_nothing() {
        let (ex, h) = run(
            false,
            &[
                c(b"GET /1 HTTP/1.0\r\n\r\nGET /2 HTTP/1.0\r\n\r\n"),
                s(b"HTTP/1.0 200 OK\r\nContent-Length: 12\r\n\r\n"),
                (S, Chunk::Gap(14)),
                s(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
        );
        check(
            &ex,
            &[
                ("/1", Some(200), End::Truncated),
                ("/2", Some(200), End::Complete),
            ],
        );
        assert_eq!(h.anomaly_count("http", "gap_lost_message"), 0);
    }

    #[test]
    fn midstream_join_never_invents_a_pairing() {
        // joined inside a request body: its response must not be given to /next
        let (ex, h) = run(
            true,
            &[
                c(b"ody of a lost request\r\n"),
                s(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"),
                c(b"GET /next HTTP/1.1\r\n\r\n"),
                s(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
            ],
        );
        check(&ex, &[("/next", Some(200), End::Complete)]);
        assert_eq!(
            h.anomalies.get(&("http", "response_to_lost_request")),
            Some(&1)
        );
    }

    #[test]
    fn connect_tunnels_and_garbage_is_counted() {
        let (ex, _) = run(
            false,
            &[
                c(b"CONNECT h:443 HTTP/1.1\r\n\r\n"),
                s(b"HTTP/1.1 200 Connection established\r\n\r\n"),
                c(b"\x16\x03\x01 tls bytes GET / HTTP/1.1\r\n\r\n"),
                s(b"\x16\x03\x03 more HTTP/1.1 200 OK\r\n\r\n"),
            ],
        );
        check(&ex, &[("h:443", Some(200), End::Complete)]);
        let (ex, h) = run(false, &[c(b"\x00\x01\x02\x03binary\n")]);
        assert!(ex.is_empty());
        assert!(h.anomalies.contains_key(&("http", "not_a_message_start")));
    }

    #[test]
    fn switching_protocols_ends_http_and_a_refused_upgrade_does_not() {
        let upgrade = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        let (ex, h) = run(
            false,
            &[
                c(upgrade),
                s(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n"),
                c(b"\x81\x85GET / HTTP/1.1\r\n\r\n"),
                s(b"\x81\x05HTTP/1.1 200 OK\r\n\r\n"),
            ],
        );
        check(&ex, &[("/ws", Some(101), End::Complete)]);
        assert_eq!(h.total_anomalies(), 0);
        let (ex, _) = run(
            false,
            &[
                c(upgrade),
                s(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                c(b"GET /next HTTP/1.1\r\n\r\n"),
                s(b"HTTP/1.1 204 No Content\r\n\r\n"),
            ],
        );
        check(
            &ex,
            &[
                ("/ws", Some(200), End::Complete),
                ("/next", Some(204), End::Complete),
            ],
        );
    }

    #[test]
    fn tls_on_an_api_port_is_counted_once_and_skipped() {
        let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 GET / HTTP/1.1\r\n\r\n";
        let (ex, h) = run(
            false,
            &[c(hello), s(b"\x16\x03\x03\x00\x7a HTTP/1.1 200 OK\r\n\r\n")],
        );
        assert!(ex.is_empty());
        assert_eq!(h.anomaly_count("http", "tls_encrypted"), 1);
        assert_eq!(h.total_anomalies(), 1);
    }

    #[test]
    fn pipeline_depth_is_bounded_and_the_overflow_reported() {
        let cfg = HttpConfig {
            max_pipeline: 2,
            ..HttpConfig::default()
        };
        let mut conn = HttpConnection::new(1, ep(40000), ep(8774), false, cfg);
        let (mut h, mut out) = (Health::default(), Vec::new());
        let reqs = b"GET /1 HTTP/1.1\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\n\r\n";
        conn.on_chunk(C, Ts(1), Chunk::Data(reqs), &mut h, &mut out);
        conn.on_close(Ts(2), &mut h, &mut out);
        check(
            &out,
            &[
                ("/1", None, End::NoResponse),
                ("/2", None, End::NoResponse),
                ("/3", None, End::NoResponse),
            ],
        );
        assert_eq!(h.anomaly_count("http", "pipeline_overflow"), 1);
    }

    #[test]
    fn unanswered_requests_are_reported_at_close() {
        let (ex, _) = run(false, &[c(b"DELETE /x HTTP/1.1\r\n\r\n")]);
        check(&ex, &[("/x", None, End::NoResponse)]);
    }
}
