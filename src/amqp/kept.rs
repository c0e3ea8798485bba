//! What a connection keeps of a message's method and content header while its body is
//! assembled: read by `hot` (the common methods and headers) or from amq-protocol's
//! parse (`conn`, the rest), into the same types.

use std::sync::Arc;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Props {
    pub expiration: Option<String>,
    pub delivery_mode: Option<u8>,
    /// The `compression` application header kombu sets when it compressed the body.
    pub compression: Option<String>,
    /// A stream queue's delivery: the message's offset in the stream (`x-stream-offset`,
    /// oslo.messaging's `rabbit_stream_fanout`).
    pub stream_offset: Option<i64>,
    /// A quorum queue's redelivery count (`x-delivery-count`).
    pub delivery_count: Option<i64>,
}

/// The method that opened a message, until its header and body complete it. Exchange
/// and routing key are shared with the connection's other messages (`RecentNames`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Pending {
    Publish {
        exchange: Arc<str>,
        routing_key: Arc<str>,
        mandatory: bool,
    },
    Deliver {
        consumer_tag: String,
        redelivered: bool,
        exchange: Arc<str>,
        routing_key: Arc<str>,
    },
    GetOk {
        redelivered: bool,
        exchange: Arc<str>,
        routing_key: Arc<str>,
    },
    Return {
        reply_code: u16,
        reply_text: String,
        exchange: Arc<str>,
        routing_key: Arc<str>,
    },
}
