//! Keys made of addresses: the sinks find an event's state by the addresses of the
//! correlator's interned names (and of static text) before they look at any text.

use std::hash::{Hash, Hasher};

/// Addresses and lengths (of interned names, of static text, small tags), compared
/// word by word and hashed as one word mixed from all of them. A lookup by address is on
/// every event's path, and the map's hasher took a round per word (and one for the
/// array's length), more than the rest of the lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses<const N: usize>(pub [usize; N]);

impl<const N: usize> Hash for Addresses<N> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // a multiply and a rotation per word spread every bit of it over the result;
        // the map's hasher still mixes that result once more
        let mixed = self.0.iter().fold(0u64, |acc, &w| {
            (acc ^ w as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15)
                .rotate_left(29)
        });
        h.write_u64(mixed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    #[test]
    fn keys_that_differ_in_any_word_are_apart() {
        // neighbouring addresses (what allocations look like) in every position: no word
        // is left out of the hash, and none cancels another
        let mut seen = HashSet::new();
        let mut hashes = HashSet::new();
        for pos in 0..4 {
            for k in 0..256usize {
                let mut words = [0x5555_0000_1000usize; 4];
                words[pos] += 16 * k;
                let key = Addresses(words);
                seen.insert(key);
                hashes.insert(foldhash::fast::FixedState::default().hash_one(key));
            }
        }
        // each position's first value is the same key
        assert_eq!(seen.len(), 4 * 255 + 1);
        assert_eq!(hashes.len(), seen.len());
    }
}
