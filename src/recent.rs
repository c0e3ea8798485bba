//! The last few values a hot path made, kept to be shared: a connection or an API sees
//! the same few names and peers over and over, and a shared one is a reference count
//! where a new one was an allocation (or several) per message.

/// Up to `KEPT` values; one not among them is made and kept in place of the oldest.
/// Small enough to search in a line: past it, a caller that spreads over many values
/// makes new ones as it would without this.
pub struct Recent<T, const KEPT: usize> {
    kept: Vec<T>,
    next: usize,
}

impl<T, const KEPT: usize> Default for Recent<T, KEPT> {
    fn default() -> Self {
        Recent {
            kept: Vec::new(),
            next: 0,
        }
    }
}

impl<T: Clone, const KEPT: usize> Recent<T, KEPT> {
    /// The kept value `is` picks, else `make`'s, now kept.
    #[inline]
    pub fn get_or_make(&mut self, is: impl Fn(&T) -> bool, make: impl FnOnce() -> T) -> T {
        if let Some(v) = self.kept.iter().find(|v| is(v)) {
            return v.clone();
        }
        let v = make();
        if self.kept.len() < KEPT {
            self.kept.push(v.clone());
        } else if KEPT > 0 {
            self.kept[self.next] = v.clone();
            self.next = (self.next + 1) % KEPT;
        }
        v
    }

    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_value_made_again_is_shared_and_the_oldest_makes_room() {
        let mut recent: Recent<Arc<str>, 3> = Recent::default();
        let mut get = |name: &str| recent.get_or_make(|v| **v == *name, || Arc::from(name));
        let first = get("nova");
        assert!(Arc::ptr_eq(&first, &get("nova")));
        for name in ["a", "b", "c"] {
            get(name);
        }
        // "nova" was the oldest: made again, equal in text
        let again = get("nova");
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(&*again, "nova");
        assert_eq!(recent.len(), 3);
        let mut none: Recent<u8, 0> = Recent::default();
        assert_eq!(none.get_or_make(|_| true, || 7), 7);
        assert!(none.is_empty());
    }
}
