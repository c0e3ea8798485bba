//! Records by id in a slab. The id index holds only a slot number (the id itself is in
//! the record), the insertion order and the timers hold a (slot, generation) handle, so
//! none of them keeps an id twice, and a handle to a record gone (its slot reused) is
//! recognised as stale. The order list is pruned once it holds more stale handles than
//! live ones, so a table never grows past its records.

use super::record::{Field, Id, Record};
use crate::time::Ts;
use hashbrown::HashTable;
use std::collections::VecDeque;

/// A record's place in its table; stale once the record is gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handle {
    slot: u32,
    generation: u32,
}

impl Handle {
    /// The handle in 8 bytes with room for a tag (a timer's kind) in the top byte: the
    /// generation keeps 24 bits, enough to tell a reused slot from its last tenants.
    pub fn pack(self, tag: u8) -> u64 {
        (tag as u64) << 56 | ((self.generation & 0xff_ffff) as u64) << 32 | self.slot as u64
    }

    pub fn unpack(v: u64) -> (Handle, u8) {
        let h = Handle {
            slot: v as u32,
            generation: ((v >> 32) & 0xff_ffff) as u32,
        };
        (h, (v >> 56) as u8)
    }
}

struct Slot {
    generation: u32,
    record: Option<Record>,
}

pub struct Table {
    /// Which id names a record here (calls: `_msg_id`; casts: `_unique_id`).
    key: Field,
    slots: Vec<Slot>,
    free: Vec<u32>,
    index: HashTable<u32>,
    hasher: ahash::RandomState,
    /// Insertion order, for evicting the oldest (lazy: may hold stale handles).
    order: VecDeque<Handle>,
}

impl Table {
    pub fn new(key: Field) -> Table {
        Table {
            key,
            slots: Vec::new(),
            free: Vec::new(),
            index: HashTable::new(),
            // keyed afresh per table: the ids are the senders' (a fixed key would let
            // crafted `_msg_id`s be made to collide); nothing is ever read in the
            // index's order, so the run stays the same whatever the key
            hasher: ahash::RandomState::new(),
            order: VecDeque::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    fn hash(&self, id: &Id) -> u64 {
        self.hasher.hash_one(id)
    }

    fn slot_of(&self, id: &Id) -> Option<u32> {
        let (slots, key) = (&self.slots, self.key);
        self.index
            .find(self.hash(id), |&s| {
                slots[s as usize]
                    .record
                    .as_ref()
                    .is_some_and(|r| r.key(key) == *id)
            })
            .copied()
    }

    pub fn contains(&self, id: &Id) -> bool {
        self.slot_of(id).is_some()
    }

    pub fn get(&self, id: &Id) -> Option<&Record> {
        let s = self.slot_of(id)?;
        self.slots[s as usize].record.as_ref()
    }

    pub fn get_mut(&mut self, id: &Id) -> Option<&mut Record> {
        let s = self.slot_of(id)?;
        self.slots[s as usize].record.as_mut()
    }

    /// The record a handle names, with its id, if it is still there.
    pub fn at(&mut self, h: Handle) -> Option<(Id, &mut Record)> {
        let key = self.key;
        let s = self.slots.get_mut(h.slot as usize)?;
        if s.generation & 0xff_ffff != h.generation & 0xff_ffff {
            return None;
        }
        s.record.as_mut().map(|r| (r.key(key), r))
    }

    /// Whether a handle still names a record.
    pub fn live(&self, h: Handle) -> bool {
        self.slots.get(h.slot as usize).is_some_and(|s| {
            s.generation & 0xff_ffff == h.generation & 0xff_ffff && s.record.is_some()
        })
    }

    /// Adds a record (its id is its `key` field).
    pub fn insert(&mut self, record: Record) -> Handle {
        let id = record.key(self.key);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(Slot {
                    generation: 0,
                    record: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let s = &mut self.slots[slot as usize];
        s.generation = s.generation.wrapping_add(1);
        s.record = Some(record);
        let h = Handle {
            slot,
            generation: s.generation,
        };
        let hash = self.hash(&id);
        let (slots, hasher, key) = (&self.slots, &self.hasher, self.key);
        self.index.insert_unique(hash, slot, |&s| {
            let r = slots[s as usize]
                .record
                .as_ref()
                .expect("indexed slots hold a record");
            hasher.hash_one(r.key(key))
        });
        self.order.push_back(h);
        self.prune_order();
        h
    }

    pub fn remove(&mut self, id: &Id) -> Option<Record> {
        let hash = self.hash(id);
        let (slots, key) = (&self.slots, self.key);
        let entry = self
            .index
            .find_entry(hash, |&s| {
                slots[s as usize]
                    .record
                    .as_ref()
                    .is_some_and(|r| r.key(key) == *id)
            })
            .ok()?;
        let (slot, _) = entry.remove();
        let r = self.slots[slot as usize].record.take()?;
        self.free.push(slot);
        Some(r)
    }

    /// The oldest record's id.
    pub fn oldest(&mut self) -> Option<Id> {
        while let Some(&h) = self.order.front() {
            if let Some((id, _)) = self.at(h) {
                return Some(id);
            }
            self.order.pop_front();
        }
        None
    }

    /// Every record's id, oldest first (ties by the id's text).
    pub fn ids_by_age(&self) -> Vec<Id> {
        let key = self.key;
        let mut v: Vec<(Ts, Option<String>, Id)> = self
            .slots
            .iter()
            .filter_map(|s| s.record.as_ref())
            .map(|r| (r.first_seen, r.id(key), r.key(key)))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        v.into_iter().map(|(_, _, id)| id).collect()
    }

    pub fn clear(&mut self) {
        *self = Table::new(self.key);
    }

    fn prune_order(&mut self) {
        if self.order.len() > 2 * self.index.len() + 1024 {
            let slots = &self.slots;
            self.order.retain(|h| {
                slots.get(h.slot as usize).is_some_and(|s| {
                    s.generation & 0xff_ffff == h.generation & 0xff_ffff && s.record.is_some()
                })
            });
        }
    }
}
