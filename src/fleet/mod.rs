//! A fleet: probes on the nodes that see the packets (one per RabbitMQ node, one per API
//! node) ship their observations to one collector, which joins them into one analyser.
//!
//! * `wire`: observations as OTLP log records (the protocol);
//! * `sender`: the probe's side: batching, a bounded buffer with counted drops, retries
//!   with backoff, TLS and a bearer token; capture never waits for it;
//! * `skew`: each probe's clock offset, estimated from RPC causality;
//! * `merge`: one packet clock over many probes (the slowest live probe's watermark),
//!   duplicates dropped, offsets applied;
//! * `collector`: the OTLP/gRPC receiver and the loop that feeds the analyser.

pub mod collector;
pub mod merge;
pub mod sender;
pub mod skew;
pub mod wire;
