//! Observations as OTLP log records: the probe → collector protocol.
//!
//! OTLP/gRPC logs (`opentelemetry.proto.collector.logs.v1.LogsService/Export`) is open,
//! documented, and forwarded unchanged by an OpenTelemetry Collector (`otlp` receiver →
//! `otlp` exporter), which operators can put between probes and a collector for
//! buffering, TLS and fan-in. One observation is one log record:
//! * `time_unix_nano`: the packet time of the observation (never the sender's clock);
//! * `event_name`: `stacktap.<kind>` (`amqp.identified`, `amqp.message`, `amqp.closed`,
//!   `amqp.blocked`, `amqp.cancelled`, `amqp.gone`, `http.exchange`, `probe.tick`,
//!   `probe.stats`, `probe.end`);
//! * attributes: the connection as `client.address`/`client.port`/`server.address`/
//!   `server.port`, semantic-convention names where one exists (`messaging.*`,
//!   `http.*`, `url.path`, `user_agent.original`, `error.type`) and `stacktap.*` for the
//!   rest (the oslo ids, the probe's counters).
//!
//! The resource names the probe: `service.name` = `stacktap-probe`, `stacktap.probe.name`
//! (`--probe-name`), `host.name`, `service.version`. The `stacktap.wire.version`
//! resource attribute is 1; additions keep it, a change of meaning bumps it.

use crate::contract::{
    AmqpKind, AmqpMessage, ConnId, Endpoint, Fault, HttpEnd, HttpObs, NotOslo, Notification, Obs,
    Observation, Oslo, ProbeStats, RemoteError, Reply, ReplyPart, Request, RpcType, TraceContext,
    method_label,
};
use crate::time::Ts;
use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::resource::v1::Resource;
use std::net::IpAddr;
use std::sync::Arc;

/// The wire version (a resource attribute).
pub const VERSION: i64 = 1;
const SCOPE: &str = "stacktap.observations";

/// Who sent a batch: the probe named in the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sender {
    pub probe: String,
    pub host: Option<String>,
}

/// Why a record could not be read (the collector counts it and goes on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    UnknownEvent(String),
    Missing(&'static str),
    BadValue(&'static str),
    NotAProbe,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::UnknownEvent(e) => write!(f, "unknown event {e:?}"),
            WireError::Missing(k) => write!(f, "attribute {k} missing"),
            WireError::BadValue(k) => write!(f, "attribute {k} has a bad value"),
            WireError::NotAProbe => write!(f, "resource has no stacktap.probe.name"),
        }
    }
}

// ---- encoding ----------------------------------------------------------------------

struct Attrs(Vec<KeyValue>);

impl Attrs {
    fn put(&mut self, key: &str, v: Value) {
        self.0.push(KeyValue {
            key: key.to_string(),
            value: Some(AnyValue { value: Some(v) }),
            ..Default::default()
        });
    }
    fn s(&mut self, key: &str, v: &str) {
        self.put(key, Value::StringValue(v.to_string()));
    }
    fn opt_s(&mut self, key: &str, v: &Option<impl AsRef<str>>) {
        if let Some(v) = v {
            self.s(key, v.as_ref());
        }
    }
    fn i(&mut self, key: &str, v: i64) {
        self.put(key, Value::IntValue(v));
    }
    fn b(&mut self, key: &str, v: bool) {
        self.put(key, Value::BoolValue(v));
    }
    fn ts(&mut self, key: &str, t: Ts) {
        self.i(key, t.0 as i64);
    }
    fn conn(&mut self, c: &ConnId) {
        self.s("client.address", &c.client.ip.to_string());
        self.i("client.port", c.client.port.into());
        self.s("server.address", &c.server.ip.to_string());
        self.i("server.port", c.server.port.into());
    }
}

/// One batch of a probe's observations, as one OTLP export request.
pub fn encode_batch(sender: &Sender, obs: &[Observation]) -> ExportLogsServiceRequest {
    let mut res = Attrs(Vec::new());
    res.s("service.name", "stacktap-probe");
    res.s("service.version", env!("CARGO_PKG_VERSION"));
    res.s("stacktap.probe.name", &sender.probe);
    res.opt_s("host.name", &sender.host);
    res.i("stacktap.wire.version", VERSION);
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: Some(Resource {
                attributes: res.0,
                ..Default::default()
            }),
            scope_logs: vec![ScopeLogs {
                scope: Some(InstrumentationScope {
                    name: SCOPE.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                log_records: obs.iter().map(encode).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

pub fn encode(o: &Observation) -> LogRecord {
    let mut a = Attrs(Vec::with_capacity(16));
    let event = match &o.what {
        Obs::AmqpIdentified {
            conn,
            connection_name,
            product,
        } => {
            a.conn(conn);
            a.opt_s("stacktap.amqp.connection_name", connection_name);
            a.opt_s("stacktap.amqp.product", product);
            "amqp.identified"
        }
        Obs::AmqpMessage(m) => {
            encode_message(m, &mut a);
            "amqp.message"
        }
        Obs::AmqpClosed {
            conn,
            channel,
            reply_code,
            by_broker,
        } => {
            a.conn(conn);
            a.b("stacktap.amqp.channel", *channel);
            a.i("stacktap.amqp.reply_code", (*reply_code).into());
            a.b("stacktap.amqp.by_broker", *by_broker);
            "amqp.closed"
        }
        Obs::AmqpBlocked { conn } => {
            a.conn(conn);
            "amqp.blocked"
        }
        Obs::AmqpConsumerCancelled { conn, queue } => {
            a.conn(conn);
            a.opt_s("stacktap.amqp.queue", queue);
            "amqp.cancelled"
        }
        Obs::AmqpGone { conn } => {
            a.conn(conn);
            "amqp.gone"
        }
        Obs::Http(h) => {
            encode_http(h, &mut a);
            "http.exchange"
        }
        Obs::Tick => "probe.tick",
        Obs::ProbeStats(s) => {
            for (k, v) in [
                ("stacktap.probe.packets", s.packets),
                ("stacktap.probe.bytes", s.bytes),
                ("stacktap.probe.drops", s.drops),
                ("stacktap.probe.tcp_gap_bytes", s.tcp_gap_bytes),
                ("stacktap.probe.anomalies", s.anomalies),
                ("stacktap.probe.evictions", s.evictions),
                ("stacktap.probe.unsent", s.unsent),
            ] {
                a.i(k, v as i64);
            }
            "probe.stats"
        }
        Obs::End => "probe.end",
    };
    LogRecord {
        time_unix_nano: o.t.0,
        event_name: format!("stacktap.{event}"),
        attributes: a.0,
        ..Default::default()
    }
}

fn encode_message(m: &AmqpMessage, a: &mut Attrs) {
    a.conn(&m.conn);
    match m.kind {
        AmqpKind::Publish { mandatory } => {
            a.s("stacktap.amqp.kind", "publish");
            a.b("stacktap.amqp.mandatory", mandatory);
        }
        AmqpKind::Deliver { redelivered } => {
            a.s("stacktap.amqp.kind", "deliver");
            a.b("stacktap.amqp.redelivered", redelivered);
        }
        AmqpKind::GetOk { redelivered } => {
            a.s("stacktap.amqp.kind", "get_ok");
            a.b("stacktap.amqp.redelivered", redelivered);
        }
        AmqpKind::Return { reply_code } => {
            a.s("stacktap.amqp.kind", "return");
            a.i("stacktap.amqp.reply_code", reply_code.into());
        }
    }
    a.s("messaging.destination.name", &m.exchange);
    a.s("messaging.rabbitmq.destination.routing_key", &m.routing_key);
    a.opt_s("stacktap.amqp.queue", &m.queue);
    a.opt_s("stacktap.amqp.expiration", &m.expiration);
    if let Some(v) = m.stream_offset {
        a.i("stacktap.amqp.stream_offset", v);
    }
    if let Some(v) = m.delivery_count {
        a.i("stacktap.amqp.delivery_count", v);
    }
    match m.oslo.as_ref() {
        Err(e) => a.s("stacktap.oslo.not_oslo", e.kind()),
        Ok(Oslo::Request(r)) => {
            a.s("stacktap.oslo.shape", "request");
            a.s("stacktap.oslo.rpc_type", r.rpc_type.as_str());
            a.s("stacktap.oslo.method", &r.method);
            a.opt_s("stacktap.oslo.namespace", &r.namespace);
            a.opt_s("stacktap.oslo.version", &r.version);
            a.opt_s("stacktap.oslo.msg_id", &r.msg_id);
            a.opt_s("stacktap.oslo.reply_q", &r.reply_q);
            a.opt_s("stacktap.oslo.unique_id", &r.unique_id);
            a.opt_s("stacktap.oslo.request_id", &r.request_id);
            a.opt_s("stacktap.oslo.global_request_id", &r.global_request_id);
            a.opt_s(
                "stacktap.oslo.trace_context",
                &r.trace_context.map(|c| c.encode()),
            );
            if let Some(v) = r.call_monitor_s {
                a.put("stacktap.oslo.call_monitor_s", Value::DoubleValue(v));
            }
        }
        Ok(Oslo::Reply(r)) => {
            a.s("stacktap.oslo.shape", "reply");
            a.s("stacktap.oslo.msg_id", &r.msg_id);
            a.opt_s("stacktap.oslo.unique_id", &r.unique_id);
            let part = match r.part {
                ReplyPart::Final => "final",
                ReplyPart::Heartbeat => "heartbeat",
                ReplyPart::LegacyPayload => "legacy_payload",
            };
            a.s("stacktap.oslo.reply_part", part);
            if let Some(f) = &r.failure {
                a.s("stacktap.oslo.failure.class", &f.class);
                a.opt_s("stacktap.oslo.failure.module", &f.module);
                a.opt_s("stacktap.oslo.failure.message", &f.message);
            }
        }
        Ok(Oslo::Notification(n)) => {
            a.s("stacktap.oslo.shape", "notification");
            a.s("stacktap.oslo.publisher_id", &n.publisher_id);
            a.s("stacktap.oslo.event_type", &n.event_type);
            a.s("stacktap.oslo.priority", &n.priority);
            a.opt_s("stacktap.oslo.message_id", &n.message_id);
            a.opt_s("stacktap.oslo.unique_id", &n.unique_id);
            a.opt_s("stacktap.oslo.request_id", &n.request_id);
            a.opt_s("stacktap.oslo.global_request_id", &n.global_request_id);
        }
    }
}

fn encode_http(h: &HttpObs, a: &mut Attrs) {
    a.conn(&ConnId {
        client: h.client,
        server: h.server,
    });
    a.s("http.request.method", h.method);
    a.s("url.path", &h.path);
    if let Some(s) = &h.service {
        a.s("stacktap.http.service", s);
    }
    a.s("http.route", &h.route);
    a.opt_s("user_agent.original", &h.user_agent);
    if let Some(s) = h.status {
        a.i("http.response.status_code", s.into());
    }
    a.ts("stacktap.http.t_request", h.t_request);
    if let Some(t) = h.t_response {
        a.ts("stacktap.http.t_response", t);
    }
    if let Some(t) = h.t_response_end {
        a.ts("stacktap.http.t_response_end", t);
    }
    let end = match h.end {
        HttpEnd::Complete => "complete",
        HttpEnd::Truncated => "truncated",
        HttpEnd::ResponseLost => "response_lost",
        HttpEnd::NoResponse => "no_response",
    };
    a.s("stacktap.http.end", end);
    a.opt_s("stacktap.http.request_id", &h.request_id);
    a.opt_s("stacktap.http.global_request_id", &h.global_request_id);
    a.opt_s(
        "stacktap.http.trace_context",
        &h.trace_context.map(|c| c.encode()),
    );
    if let Some(f) = &h.fault {
        a.opt_s("error.type", &f.kind);
        a.opt_s("stacktap.http.fault_message", &f.message);
        a.b("stacktap.http.fault", true);
    }
}

// ---- decoding ----------------------------------------------------------------------

/// The attributes of one record, by key (records are small: a linear scan is fastest).
struct Read<'a>(&'a [KeyValue]);

impl<'a> Read<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.0
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }
    fn trace_context(&self, key: &'static str) -> Result<Option<TraceContext>, WireError> {
        match self.s(key) {
            Some(v) => TraceContext::decode(&v)
                .map(Some)
                .ok_or(WireError::BadValue(key)),
            None => Ok(None),
        }
    }

    fn s(&self, key: &str) -> Option<String> {
        match self.get(key)? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    }
    fn need_s(&self, key: &'static str) -> Result<String, WireError> {
        self.s(key).ok_or(WireError::Missing(key))
    }
    fn i(&self, key: &str) -> Option<i64> {
        match self.get(key)? {
            Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }
    fn b(&self, key: &str) -> bool {
        matches!(self.get(key), Some(Value::BoolValue(true)))
    }
    fn ts(&self, key: &str) -> Option<Ts> {
        self.i(key).map(|v| Ts(v.max(0) as u64))
    }
    fn endpoint(&self, addr: &'static str, port: &'static str) -> Result<Endpoint, WireError> {
        let ip: IpAddr = self
            .need_s(addr)?
            .parse()
            .map_err(|_| WireError::BadValue(addr))?;
        let port = self
            .i(port)
            .and_then(|p| u16::try_from(p).ok())
            .ok_or(WireError::BadValue(port))?;
        Ok(Endpoint { ip, port })
    }
    fn conn(&self) -> Result<ConnId, WireError> {
        Ok(ConnId {
            client: self.endpoint("client.address", "client.port")?,
            server: self.endpoint("server.address", "server.port")?,
        })
    }
}

/// The probe that sent a resource's records.
pub fn sender_of(resource: Option<&Resource>) -> Result<Sender, WireError> {
    let attrs = resource.map_or(&[][..], |r| &r.attributes[..]);
    let r = Read(attrs);
    Ok(Sender {
        probe: r.s("stacktap.probe.name").ok_or(WireError::NotAProbe)?,
        host: r.s("host.name"),
    })
}

pub fn decode(rec: &LogRecord) -> Result<Observation, WireError> {
    let r = Read(&rec.attributes);
    let event = rec
        .event_name
        .strip_prefix("stacktap.")
        .ok_or_else(|| WireError::UnknownEvent(rec.event_name.clone()))?;
    let what = match event {
        "amqp.identified" => Obs::AmqpIdentified {
            conn: r.conn()?,
            connection_name: r.s("stacktap.amqp.connection_name"),
            product: r.s("stacktap.amqp.product"),
        },
        "amqp.message" => Obs::AmqpMessage(Box::new(decode_message(&r)?)),
        "amqp.closed" => Obs::AmqpClosed {
            conn: r.conn()?,
            channel: r.b("stacktap.amqp.channel"),
            reply_code: reply_code(&r)?,
            by_broker: r.b("stacktap.amqp.by_broker"),
        },
        "amqp.blocked" => Obs::AmqpBlocked { conn: r.conn()? },
        "amqp.cancelled" => Obs::AmqpConsumerCancelled {
            conn: r.conn()?,
            queue: r.s("stacktap.amqp.queue"),
        },
        "amqp.gone" => Obs::AmqpGone { conn: r.conn()? },
        "http.exchange" => Obs::Http(Box::new(decode_http(&r)?)),
        "probe.tick" => Obs::Tick,
        "probe.stats" => {
            let n = |k| r.i(k).unwrap_or(0).max(0) as u64;
            Obs::ProbeStats(ProbeStats {
                packets: n("stacktap.probe.packets"),
                bytes: n("stacktap.probe.bytes"),
                drops: n("stacktap.probe.drops"),
                tcp_gap_bytes: n("stacktap.probe.tcp_gap_bytes"),
                anomalies: n("stacktap.probe.anomalies"),
                evictions: n("stacktap.probe.evictions"),
                unsent: n("stacktap.probe.unsent"),
            })
        }
        "probe.end" => Obs::End,
        other => return Err(WireError::UnknownEvent(other.to_string())),
    };
    Ok(Observation {
        t: Ts(rec.time_unix_nano),
        what,
    })
}

fn reply_code(r: &Read<'_>) -> Result<u16, WireError> {
    r.i("stacktap.amqp.reply_code")
        .and_then(|c| u16::try_from(c).ok())
        .ok_or(WireError::BadValue("stacktap.amqp.reply_code"))
}

fn decode_message(r: &Read<'_>) -> Result<AmqpMessage, WireError> {
    let kind = match r.need_s("stacktap.amqp.kind")?.as_str() {
        "publish" => AmqpKind::Publish {
            mandatory: r.b("stacktap.amqp.mandatory"),
        },
        "deliver" => AmqpKind::Deliver {
            redelivered: r.b("stacktap.amqp.redelivered"),
        },
        "get_ok" => AmqpKind::GetOk {
            redelivered: r.b("stacktap.amqp.redelivered"),
        },
        "return" => AmqpKind::Return {
            reply_code: reply_code(r)?,
        },
        _ => return Err(WireError::BadValue("stacktap.amqp.kind")),
    };
    Ok(AmqpMessage {
        conn: r.conn()?,
        kind,
        exchange: r.s("messaging.destination.name").unwrap_or_default().into(),
        routing_key: r
            .s("messaging.rabbitmq.destination.routing_key")
            .unwrap_or_default()
            .into(),
        queue: r.s("stacktap.amqp.queue").map(Arc::from),
        expiration: r.s("stacktap.amqp.expiration"),
        stream_offset: r.i("stacktap.amqp.stream_offset"),
        delivery_count: r.i("stacktap.amqp.delivery_count"),
        oslo: Arc::new(decode_oslo(r)?),
    })
}

fn decode_oslo(r: &Read<'_>) -> Result<Result<Oslo, NotOslo>, WireError> {
    if let Some(kind) = r.s("stacktap.oslo.not_oslo") {
        let e = NotOslo::ALL
            .into_iter()
            .find(|e| e.kind() == kind)
            .ok_or(WireError::BadValue("stacktap.oslo.not_oslo"))?;
        return Ok(Err(e));
    }
    let oslo = match r.need_s("stacktap.oslo.shape")?.as_str() {
        "request" => Oslo::Request(Request {
            rpc_type: match r.need_s("stacktap.oslo.rpc_type")?.as_str() {
                "call" => RpcType::Call,
                "cast" => RpcType::Cast,
                "fanout" => RpcType::Fanout,
                _ => return Err(WireError::BadValue("stacktap.oslo.rpc_type")),
            },
            method: r.need_s("stacktap.oslo.method")?,
            namespace: r.s("stacktap.oslo.namespace"),
            version: r.s("stacktap.oslo.version"),
            msg_id: r.s("stacktap.oslo.msg_id"),
            reply_q: r.s("stacktap.oslo.reply_q"),
            unique_id: r.s("stacktap.oslo.unique_id"),
            request_id: r.s("stacktap.oslo.request_id"),
            global_request_id: r.s("stacktap.oslo.global_request_id"),
            trace_context: r.trace_context("stacktap.oslo.trace_context")?,
            call_monitor_s: match r.get("stacktap.oslo.call_monitor_s") {
                Some(Value::DoubleValue(v)) => Some(*v),
                _ => None,
            },
        }),
        "reply" => Oslo::Reply(Reply {
            msg_id: r.need_s("stacktap.oslo.msg_id")?,
            unique_id: r.s("stacktap.oslo.unique_id"),
            part: match r.need_s("stacktap.oslo.reply_part")?.as_str() {
                "final" => ReplyPart::Final,
                "heartbeat" => ReplyPart::Heartbeat,
                "legacy_payload" => ReplyPart::LegacyPayload,
                _ => return Err(WireError::BadValue("stacktap.oslo.reply_part")),
            },
            failure: r.s("stacktap.oslo.failure.class").map(|class| RemoteError {
                class,
                module: r.s("stacktap.oslo.failure.module"),
                message: r.s("stacktap.oslo.failure.message"),
            }),
        }),
        "notification" => Oslo::Notification(Notification {
            publisher_id: r.need_s("stacktap.oslo.publisher_id")?,
            event_type: r.need_s("stacktap.oslo.event_type")?,
            priority: r.need_s("stacktap.oslo.priority")?,
            message_id: r.s("stacktap.oslo.message_id"),
            unique_id: r.s("stacktap.oslo.unique_id"),
            request_id: r.s("stacktap.oslo.request_id"),
            global_request_id: r.s("stacktap.oslo.global_request_id"),
        }),
        _ => return Err(WireError::BadValue("stacktap.oslo.shape")),
    };
    Ok(Ok(oslo))
}

fn decode_http(r: &Read<'_>) -> Result<HttpObs, WireError> {
    let conn = r.conn()?;
    Ok(HttpObs {
        client: conn.client,
        server: conn.server,
        method: method_label(&r.need_s("http.request.method")?),
        path: r.s("url.path").unwrap_or_default(),
        service: r.s("stacktap.http.service").map(Arc::from),
        route: r.s("http.route").unwrap_or_default(),
        user_agent: r.s("user_agent.original"),
        status: r
            .i("http.response.status_code")
            .and_then(|s| u16::try_from(s).ok()),
        t_request: r
            .ts("stacktap.http.t_request")
            .ok_or(WireError::Missing("stacktap.http.t_request"))?,
        t_response: r.ts("stacktap.http.t_response"),
        t_response_end: r.ts("stacktap.http.t_response_end"),
        end: match r.need_s("stacktap.http.end")?.as_str() {
            "complete" => HttpEnd::Complete,
            "truncated" => HttpEnd::Truncated,
            "response_lost" => HttpEnd::ResponseLost,
            "no_response" => HttpEnd::NoResponse,
            _ => return Err(WireError::BadValue("stacktap.http.end")),
        },
        request_id: r.s("stacktap.http.request_id"),
        global_request_id: r.s("stacktap.http.global_request_id"),
        trace_context: r.trace_context("stacktap.http.trace_context")?,
        fault: r.b("stacktap.http.fault").then(|| Fault {
            kind: r.s("error.type"),
            message: r.s("stacktap.http.fault_message"),
        }),
    })
}
