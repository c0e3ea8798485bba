//! stacktap: rebuilds oslo.messaging RPC and OpenStack REST exchanges from packets.
//!
//! The pipeline reads top to bottom in `pipeline.rs`; one module per stage and protocol.

pub mod allocator;
pub mod amqp;
pub mod analyser;
pub mod api;
pub mod config;
pub mod contract;
pub mod correlate;
pub mod decode;
pub mod fleet;
pub mod health;
pub mod http;
pub mod identity;
pub mod openstack;
pub mod oslo;
pub mod otlp;
pub mod parallel;
pub mod pipeline;
pub mod probe;
pub mod protocols;
pub mod rca;
pub mod recent;
pub mod run;
pub mod serve;
pub mod sink;
pub mod source;
pub mod tcp;
#[cfg(test)]
pub mod testing;
pub mod text;
pub mod time;
pub mod trace;
pub mod ui;
pub mod view;

/// Hash map for tables keyed by wire data: foldhash (made for hash tables: fewer
/// instructions than ahash on this build's baseline x86-64, which has no AES for ahash's
/// fast path, and than std's SipHash) with a seed per process (no hash flooding from
/// crafted ids). Iteration order is never relied on; output is sorted.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
pub type FastSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
