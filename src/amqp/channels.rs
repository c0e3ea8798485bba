//! The messages being assembled on one direction of a connection, by channel.
//!
//! Nearly always none or one: oslo.messaging sends one message at a time on a channel and
//! opens few channels. Each message takes six lookups (method, header, body, end), which
//! a hash map made a noticeable part of a message's cost; a short list searched in place
//! costs a few compares. Past `FEW` channels at once the rest go to a hash map, so a
//! connection with thousands open (a flood, a fuzzer) stays cheap per frame.

use crate::FastMap;

/// Channels kept in the list before the map takes the rest.
const FEW: usize = 8;

pub struct ChannelMap<T> {
    few: Vec<(u16, T)>,
    many: FastMap<u16, T>,
}

impl<T> Default for ChannelMap<T> {
    fn default() -> Self {
        ChannelMap {
            few: Vec::new(),
            many: FastMap::default(),
        }
    }
}

impl<T> ChannelMap<T> {
    pub fn get(&self, channel: u16) -> Option<&T> {
        match self.few.iter().find(|(c, _)| *c == channel) {
            Some((_, v)) => Some(v),
            None if self.many.is_empty() => None,
            None => self.many.get(&channel),
        }
    }

    pub fn get_mut(&mut self, channel: u16) -> Option<&mut T> {
        match self.few.iter_mut().find(|(c, _)| *c == channel) {
            Some((_, v)) => Some(v),
            None if self.many.is_empty() => None,
            None => self.many.get_mut(&channel),
        }
    }

    /// Puts `value` on `channel`, returning what was there.
    pub fn insert(&mut self, channel: u16, value: T) -> Option<T> {
        if let Some(slot) = self.get_mut(channel) {
            return Some(std::mem::replace(slot, value));
        }
        if self.few.len() < FEW {
            self.few.push((channel, value));
        } else {
            self.many.insert(channel, value);
        }
        None
    }

    pub fn remove(&mut self, channel: u16) -> Option<T> {
        match self.few.iter().position(|(c, _)| *c == channel) {
            Some(i) => Some(self.few.swap_remove(i).1),
            None if self.many.is_empty() => None,
            None => self.many.remove(&channel),
        }
    }

    pub fn channels(&self) -> Vec<u16> {
        self.few
            .iter()
            .map(|(c, _)| *c)
            .chain(self.many.keys().copied())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Whatever the operations, it answers as a plain map does (few channels and
        /// many, so both halves are used, and channels moving between them).
        #[test]
        fn acts_as_a_map(ops in proptest::collection::vec((0u8..3, 0u16..24, any::<u32>()), 0..200)) {
            let mut ours = ChannelMap::default();
            let mut plain = HashMap::new();
            for (op, ch, v) in ops {
                match op {
                    0 => prop_assert_eq!(ours.insert(ch, v), plain.insert(ch, v)),
                    1 => prop_assert_eq!(ours.remove(ch), plain.remove(&ch)),
                    _ => {
                        if let (Some(a), Some(b)) = (ours.get_mut(ch), plain.get_mut(&ch)) {
                            *a = a.wrapping_add(1);
                            *b = b.wrapping_add(1);
                        }
                    }
                }
                for c in 0u16..24 {
                    prop_assert_eq!(ours.get(c), plain.get(&c));
                }
                let mut keys = ours.channels();
                keys.sort_unstable();
                let mut want: Vec<u16> = plain.keys().copied().collect();
                want.sort_unstable();
                prop_assert_eq!(keys, want);
            }
        }
    }
}
