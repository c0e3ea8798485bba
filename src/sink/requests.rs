//! Finished requests and their chains, kept for the API (`/api/chains`,
//! `/api/requests/{id}`), `stacktap rca` and the store: recent trees by id, recent
//! chains, and root causes ranked by how many user requests they broke. Bounded.

use crate::FastMap as HashMap;
use crate::trace::{ChainEvent, RequestTree};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// `[requests]`: how requests are collected and judged, and what is kept of them.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestsConfig {
    /// A request is judged after this long without news (packet time).
    pub settle_s: f64,
    /// Requests being collected at once; the oldest is judged early past this.
    pub max_open: usize,
    /// Spans kept per request.
    pub max_spans: usize,
    /// Finished request trees kept for lookup by id.
    pub max_trees: usize,
    /// Chains kept (newest first out of the ranking window too).
    pub max_chains: usize,
    /// History the call graph keeps, and a live capture's default view of it.
    pub graph_window_s: f64,
    /// The graph's window step.
    pub graph_slot_s: f64,
}

impl Default for RequestsConfig {
    fn default() -> Self {
        RequestsConfig {
            settle_s: 60.0,
            max_open: 100_000,
            max_spans: 2_000,
            max_trees: 20_000,
            max_chains: 10_000,
            graph_window_s: 900.0,
            graph_slot_s: 10.0,
        }
    }
}

pub use crate::api::{RcaReport, RootCause};

pub struct Requests {
    cfg: RequestsConfig,
    trees: HashMap<String, Arc<RequestTree>>,
    tree_order: VecDeque<String>,
    chains: VecDeque<Arc<ChainEvent>>,
    /// Masked failures: their times (bounded) and how many in all.
    masked: VecDeque<f64>,
    masked_total: u64,
    /// Trees always kept regardless of the cap (e.g. the one `rca --request-id` wants).
    pinned: Option<String>,
    /// `--store`: everything added is also written there, and read back after a restart.
    store: Option<super::store::Store>,
}

impl Requests {
    pub fn new(cfg: RequestsConfig) -> Requests {
        Requests {
            cfg,
            trees: HashMap::default(),
            tree_order: VecDeque::new(),
            chains: VecDeque::new(),
            masked: VecDeque::new(),
            masked_total: 0,
            pinned: None,
            store: None,
        }
    }

    /// Persists to `store` from now on, starting with the chains it already holds.
    pub fn attach_store(&mut self, store: super::store::Store) -> anyhow::Result<()> {
        for c in store
            .chains()
            .map_err(|e| anyhow::anyhow!("--store: cannot read it back: {e}"))?
        {
            self.chains.push_back(Arc::new(c));
        }
        while self.chains.len() > self.cfg.max_chains {
            self.chains.pop_front();
        }
        self.store = Some(store);
        Ok(())
    }

    /// Writes what was added to the store (a no-op without one).
    pub fn flush(&mut self) -> anyhow::Result<()> {
        if let Some(s) = self.store.as_mut() {
            s.flush()
                .map_err(|e| anyhow::anyhow!("--store: cannot write: {e}"))?;
        }
        Ok(())
    }

    /// Closes the store (its database file complete, no write-ahead log left behind).
    pub fn close_store(&mut self) {
        self.store = None;
    }

    /// Keeps this request's tree however many others come after it.
    pub fn pin(&mut self, id: &str) {
        self.pinned = Some(id.to_string());
    }

    pub fn add_tree(&mut self, t: Arc<RequestTree>) {
        if let Some(s) = self.store.as_mut() {
            s.add_tree(t.clone());
        }
        let id = t.request_id.clone();
        if self.trees.insert(id.clone(), t).is_none() {
            self.tree_order.push_back(id);
        }
        while self.trees.len() > self.cfg.max_trees {
            let Some(old) = self.tree_order.pop_front() else {
                break;
            };
            if self.pinned.as_deref() == Some(old.as_str()) {
                self.tree_order.push_back(old);
                continue;
            }
            self.trees.remove(&old);
        }
    }

    pub fn add_chain(&mut self, c: Arc<ChainEvent>) {
        if let Some(s) = self.store.as_mut() {
            s.add_chain(c.clone());
        }
        self.chains.push_back(c);
        while self.chains.len() > self.cfg.max_chains {
            self.chains.pop_front();
        }
    }

    pub fn add_masked(&mut self, t: f64) {
        self.masked_total += 1;
        self.masked.push_back(t);
        while self.masked.len() > self.cfg.max_chains {
            self.masked.pop_front();
        }
    }

    /// The request's tree as the API serves it (linked now if it was kept unlinked).
    pub fn tree(&self, id: &str) -> Option<crate::api::Tree> {
        match self.trees.get(id) {
            Some(t) => Some(crate::api::Tree::from(&**t)),
            None => self.store.as_ref()?.tree(id),
        }
    }

    /// Chains that showed at or after `since` (packet time), oldest first.
    pub fn chains_since(&self, since: f64) -> Vec<Arc<ChainEvent>> {
        self.chains
            .iter()
            .filter(|c| c.origin.t >= since)
            .cloned()
            .collect()
    }

    /// The newest packet time a chain or masked failure was seen at.
    pub fn latest(&self) -> Option<f64> {
        let c = self.chains.iter().map(|c| c.origin.t).fold(None, max);
        let m = self.masked.iter().copied().fold(None, max);
        [c, m].into_iter().flatten().fold(None, max)
    }

    /// Root causes of the chains since `since` (`f64::MIN`: everything kept).
    pub fn rca(&self, since: f64) -> RcaReport {
        let masked = if since == f64::MIN {
            self.masked_total
        } else {
            self.masked.iter().filter(|t| **t >= since).count() as u64
        };
        rank(&self.chains_since(since), masked)
    }
}

fn max(a: Option<f64>, b: f64) -> Option<f64> {
    Some(a.map_or(b, |a| a.max(b)))
}

/// Root causes ranked by user requests broken (then by most recent).
pub fn rank(chains: &[Arc<ChainEvent>], masked: u64) -> RcaReport {
    let mut by_root: BTreeMap<(Option<String>, String, Option<String>), RootCause> =
        BTreeMap::new();
    for c in chains {
        let key = (
            c.root.service.clone(),
            c.root.operation.clone(),
            c.root.error.clone(),
        );
        let seen_as = format!(
            "{} via {}",
            c.symptom,
            c.origin.error.clone().unwrap_or_default()
        );
        let r = by_root.entry(key).or_insert_with(|| RootCause {
            service: c.root.service.clone(),
            operation: c.root.operation.clone(),
            error: c.root.error.clone(),
            message: None,
            requests: 0,
            first_seen: c.origin.t,
            last_seen: c.origin.t,
            example_request_id: c.request_id.clone(),
            seen_as: BTreeMap::new(),
            path: c.hops.iter().filter_map(|h| h.service.clone()).collect(),
        });
        r.requests += 1;
        r.first_seen = r.first_seen.min(c.origin.t);
        r.last_seen = r.last_seen.max(c.origin.t);
        if c.root.message.is_some() {
            r.message = c.root.message.clone();
        }
        *r.seen_as.entry(seen_as).or_default() += 1;
    }
    let mut roots: Vec<RootCause> = by_root.into_values().collect();
    roots.sort_by(|a, b| {
        b.requests
            .cmp(&a.requests)
            .then(b.last_seen.total_cmp(&a.last_seen))
            .then(a.operation.cmp(&b.operation))
    });
    RcaReport {
        failed_requests: chains.len() as u64,
        masked_failures: masked,
        first: chains
            .iter()
            .map(|c| c.origin.t)
            .fold(None, max)
            .map(|_| chains.iter().map(|c| c.origin.t).fold(f64::MAX, f64::min)),
        last: chains.iter().map(|c| c.origin.t).fold(None, max),
        roots,
    }
}
