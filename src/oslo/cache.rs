//! Recently read bodies, shared by every shard of a run.

use super::{NotOslo, Oslo};
use crate::FastMap as HashMap;
use crate::amqp::Props;
use rapidhash::v3::{RapidSecrets, rapidhash_v3_seeded};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

/// Recently decoded bodies. A deliver carries the exact bytes of its publish, so each
/// message's JSON is parsed once, not once per copy. Keyed by a 64-bit hash of exchange,
/// compression and body (a collision among the last few thousand bodies is ~1e-12).
pub struct DecodeCache {
    secrets: RapidSecrets,
    cap: usize,
    /// `amqp.max_body_bytes`: what a compressed body may inflate to.
    max_inflated: usize,
    /// Shared by every shard of a run: a message's publish and its deliveries cross
    /// different connections, so different shards, and one reading serves them all.
    table: Mutex<Remembered>,
}

#[derive(Default)]
struct Remembered {
    map: HashMap<u64, Arc<Result<Oslo, NotOslo>>>,
    order: VecDeque<u64>,
}

impl DecodeCache {
    /// `amqp.decode_cache_entries` and `amqp.max_body_bytes`.
    pub fn new(cfg: &crate::amqp::AmqpConfig) -> Arc<DecodeCache> {
        Arc::new(DecodeCache {
            secrets: RapidSecrets::seed(ahash::RandomState::new().hash_one(0x5eed_u64)),
            cap: cfg.decode_cache_entries.max(1),
            max_inflated: cfg.max_body_bytes,
            table: Mutex::default(),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Remembered> {
        // a shard that panicked holding it left a whole table: keep using it
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The reading of a message's body (`exchange` and `props` as it was sent).
    pub fn decode(&self, exchange: &str, props: &Props, body: &[u8]) -> Arc<Result<Oslo, NotOslo>> {
        // rapidhash over the body, salted per process so that crafted bodies cannot be
        // made to collide on purpose: a third fewer instructions than xxh3 on oslo's
        // bodies of a few KiB, the largest share of a message's cost before it is read
        let key = [
            exchange.as_bytes(),
            props.compression.as_deref().unwrap_or("").as_bytes(),
            body,
        ]
        .iter()
        .fold(0, |h: u64, part| {
            h.rotate_left(29) ^ rapidhash_v3_seeded(part, &self.secrets)
        });
        if let Some(hit) = self.table().map.get(&key) {
            return hit.clone();
        }
        // read without the lock held: other shards do not wait for this one's decoding
        // (two shards reading one body at once both decode it; the reading is the same)
        let decoded = Arc::new(super::decode(exchange, props, body, self.max_inflated));
        let mut t = self.table();
        if !t.map.contains_key(&key) {
            if t.order.len() >= self.cap
                && let Some(old) = t.order.pop_front()
            {
                t.map.remove(&old);
            }
            t.order.push_back(key);
            t.map.insert(key, decoded.clone());
        }
        decoded
    }
}
