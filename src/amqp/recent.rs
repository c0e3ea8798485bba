//! The exchange, routing key and queue names a connection's messages carry, shared: one
//! connection sends and receives on a handful of names, over and over, and a shared name
//! is one reference count where a copy was an allocation per message.

use std::sync::Arc;

/// The last few names a connection saw; a name not among them is copied and kept in
/// place of the oldest.
#[derive(Default)]
pub struct RecentNames {
    names: Vec<Arc<str>>,
    next: usize,
}

/// Names kept per connection: a publisher's exchanges and routing keys, a consumer's
/// queues. Past it, a connection that spreads over many names copies as before.
const KEPT: usize = 8;

impl RecentNames {
    pub fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(n) = self.names.iter().find(|n| ***n == *name) {
            return n.clone();
        }
        let n: Arc<str> = Arc::from(name);
        if self.names.len() < KEPT {
            self.names.push(n.clone());
        } else {
            self.names[self.next] = n.clone();
            self.next = (self.next + 1) % KEPT;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_seen_again_is_shared_and_the_oldest_makes_room() {
        let mut names = RecentNames::default();
        let first = names.get("nova");
        assert!(Arc::ptr_eq(&first, &names.get("nova")));
        for i in 0..KEPT {
            names.get(&format!("reply_{i}"));
        }
        // "nova" was the oldest: a new copy, equal in text
        let again = names.get("nova");
        assert!(!Arc::ptr_eq(&first, &again));
        assert_eq!(&*again, "nova");
        assert_eq!(names.names.len(), KEPT);
    }
}
