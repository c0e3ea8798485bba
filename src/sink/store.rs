//! The embedded store (`--store PATH`, SQLite): error chains and request trees outlive
//! the process, so `stacktap rca --from URL --since 1h` still answers after a restart.
//!
//! Rows are written in batches (one transaction per flush) and pruned by age (packet
//! time, `store.retention_s` before the newest row) and by count (`store.max_trees`).

use crate::api;
use crate::contract::ChainEvent;
use crate::trace::RequestTree;
use rusqlite::{Connection, params};
use std::path::Path;
use std::sync::Arc;

/// `[store]`: what `--store` keeps.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// Rows older than this (packet time, before the newest) are deleted.
    pub retention_s: f64,
    /// Request trees kept, at most.
    pub max_trees: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            retention_s: 7.0 * 86400.0,
            max_trees: 200_000,
        }
    }
}

pub struct Store {
    db: Connection,
    cfg: StoreConfig,
    chains: Vec<Arc<ChainEvent>>,
    trees: Vec<Arc<RequestTree>>,
}

impl Store {
    pub fn open(path: &Path, cfg: StoreConfig) -> anyhow::Result<Store> {
        let err = |e: rusqlite::Error| anyhow::anyhow!("--store {}: {e}", path.display());
        let db = Connection::open(path).map_err(err)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             PRAGMA synchronous=NORMAL;
             CREATE TABLE IF NOT EXISTS chains (
                 t REAL NOT NULL, request_id TEXT NOT NULL, json TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS chains_t ON chains (t);
             CREATE TABLE IF NOT EXISTS requests (
                 request_id TEXT PRIMARY KEY, t REAL NOT NULL, json TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS requests_t ON requests (t);",
        )
        .map_err(err)?;
        // rows are `api` forms (trees) and contract events (chains), additive only: a
        // database written by another version reads back as far as the fields agree
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema', ?1)",
            params![api::SCHEMA.to_string()],
        )
        .map_err(err)?;
        Ok(Store {
            db,
            cfg,
            chains: Vec::new(),
            trees: Vec::new(),
        })
    }

    pub fn add_chain(&mut self, c: Arc<ChainEvent>) {
        self.chains.push(c);
    }

    pub fn add_tree(&mut self, t: Arc<RequestTree>) {
        self.trees.push(t);
    }

    /// Writes what was added since the last flush, then prunes.
    pub fn flush(&mut self) -> rusqlite::Result<()> {
        if self.chains.is_empty() && self.trees.is_empty() {
            return Ok(());
        }
        let tx = self.db.transaction()?;
        {
            let mut ins =
                tx.prepare_cached("INSERT INTO chains (t, request_id, json) VALUES (?1, ?2, ?3)")?;
            for c in self.chains.drain(..) {
                let json = serde_json::to_string(&*c).unwrap_or_default();
                ins.execute(params![c.origin.t, c.request_id, json])?;
            }
            let mut ins = tx.prepare_cached(
                "INSERT OR REPLACE INTO requests (request_id, t, json) VALUES (?1, ?2, ?3)",
            )?;
            for t in self.trees.drain(..) {
                let json = serde_json::to_string(&api::Tree::from(&*t)).unwrap_or_default();
                ins.execute(params![t.request_id, t.t_first, json])?;
            }
        }
        tx.commit()?;
        self.prune()
    }

    fn prune(&mut self) -> rusqlite::Result<()> {
        let newest: Option<f64> = self
            .db
            .query_row("SELECT max(t) FROM requests", [], |r| r.get(0))?;
        if let Some(newest) = newest {
            let cut = newest - self.cfg.retention_s;
            self.db
                .execute("DELETE FROM chains WHERE t < ?1", params![cut])?;
            self.db
                .execute("DELETE FROM requests WHERE t < ?1", params![cut])?;
        }
        self.db.execute(
            "DELETE FROM requests WHERE request_id IN (SELECT request_id FROM requests \
             ORDER BY t DESC LIMIT -1 OFFSET ?1)",
            params![self.cfg.max_trees as i64],
        )?;
        self.db.execute(
            "DELETE FROM chains WHERE rowid IN (SELECT rowid FROM chains \
             ORDER BY t DESC LIMIT -1 OFFSET ?1)",
            params![self.cfg.max_trees as i64],
        )?;
        Ok(())
    }

    /// The chains kept, oldest first (loaded at start so the API answers at once).
    pub fn chains(&self) -> rusqlite::Result<Vec<ChainEvent>> {
        let mut q = self.db.prepare("SELECT json FROM chains ORDER BY t")?;
        let rows = q.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows
            .filter_map(|j| serde_json::from_str(&j.ok()?).ok())
            .collect())
    }

    pub fn tree(&self, request_id: &str) -> Option<api::Tree> {
        let json: String = self
            .db
            .query_row(
                "SELECT json FROM requests WHERE request_id = ?1",
                params![request_id],
                |r| r.get(0),
            )
            .ok()?;
        serde_json::from_str(&json).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{Hop, build};

    fn chain(id: &str, t: f64) -> Arc<ChainEvent> {
        let hop = Hop {
            service: Some("neutron-server".into()),
            operation: "PUT /v2.0/ports/{id}".into(),
            error: Some("PortBindingFailed".into()),
            message: None,
            t,
            propagation: Some("rest_error_response".into()),
            ..Default::default()
        };
        Arc::new(ChainEvent {
            request_id: id.into(),
            symptom: "resource_error".into(),
            origin: hop.clone(),
            root: hop.clone(),
            hops: vec![hop],
            attempts: Vec::new(),
            inferred: false,
        })
    }

    #[test]
    fn survives_a_reopen_and_prunes_by_age() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let cfg = StoreConfig {
            retention_s: 100.0,
            max_trees: 1000,
        };
        {
            let mut s = Store::open(&path, cfg.clone()).unwrap();
            for (i, t) in [0.0, 50.0, 500.0].into_iter().enumerate() {
                let id = format!("req-{i}");
                s.add_chain(chain(&id, t));
                let mut tree = build(id.clone(), Vec::new());
                tree.t_first = t;
                s.add_tree(Arc::new(tree));
            }
            s.flush().unwrap();
        }
        let s = Store::open(&path, cfg).unwrap();
        let ids: Vec<String> = s
            .chains()
            .unwrap()
            .into_iter()
            .map(|c| c.request_id)
            .collect();
        assert_eq!(ids, ["req-2"], "older than 100 s before the newest: pruned");
        assert!(s.tree("req-2").is_some());
        assert!(s.tree("req-0").is_none());
    }
}
