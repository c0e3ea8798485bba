//! The exchange, routing key and queue names a connection's messages carry, shared: one
//! connection sends and receives on a handful of names, over and over.

use crate::recent::Recent;
use std::sync::Arc;

/// The last few names a connection saw (a publisher's exchanges and routing keys, a
/// consumer's queues).
#[derive(Default)]
pub struct RecentNames(Recent<Arc<str>, 8>);

impl RecentNames {
    pub fn get(&mut self, name: &str) -> Arc<str> {
        self.0.get_or_make(|n| **n == *name, || Arc::from(name))
    }
}
