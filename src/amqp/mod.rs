//! AMQP 0-9-1, passive: frames (with resync) → methods and whole messages per channel.
//!
//! Framing and resync are ours (a tap joins streams mid-way and must find frame boundaries
//! itself); method and content-header decoding is `amq-protocol`'s, generated from the spec,
//! except basic.publish, basic.deliver and content headers, the bulk of them, read by
//! hand (`hot`).

mod channels;
pub mod conn;
pub mod frame;
mod hot;
mod kept;
pub mod names;
mod recent;

pub use conn::{AmqpConnection, AmqpEvent, BodyBudget, Message, MessageKind};
pub use kept::Props;

/// `[amqp]`: which ports are AMQP and what one connection may hold.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// The broker's AMQP ports (a cluster's nodes may listen on several).
    pub ports: Vec<u16>,
    /// Largest frame accepted; a larger size field means the stream is out of sync.
    pub max_frame_bytes: usize,
    /// Largest message body assembled; larger ones are skipped, counted.
    pub max_body_bytes: usize,
    /// Body bytes held while messages are assembled, on one connection at most: a content
    /// header may announce a large body and the bytes never come. Past it the message is
    /// dropped and counted (`stacktap_evictions_total{table="amqp_body_bytes"}`).
    pub max_held_bytes_per_connection: usize,
    /// The same, over every connection of the probe.
    pub max_held_bytes: usize,
    /// Consumers remembered per connection (consumer tag → queue).
    pub max_consumers_per_connection: usize,
    /// Message bodies whose oslo reading is remembered (a fanout's copies decode once).
    pub decode_cache_entries: usize,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            ports: vec![5672],
            max_frame_bytes: 4 << 20,
            max_body_bytes: 64 << 20,
            max_held_bytes_per_connection: 64 << 20,
            max_held_bytes: 256 << 20,
            max_consumers_per_connection: 4096,
            decode_cache_entries: 8192,
        }
    }
}
