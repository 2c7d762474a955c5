//! A connection's subscriptions: a sorted vector of (id, state).
//!
//! Every connection has one, so its size matters more than its lookup speed: 24 bytes per
//! subscription with no empty buckets, versus a hash map's spare capacity and control bytes. A
//! connection holds at most `limits.max_subscriptions` (1000 by default), so binary search and
//! the occasional shift are cheap.

use std::borrow::Borrow;

/// Sorted by id; ids unique. `K` is the id type (a user or a group id), read as `&str`.
#[derive(Debug)]
pub struct SubSet<K, V> {
    entries: Vec<(K, V)>,
}

impl<K, V> Default for SubSet<K, V> {
    fn default() -> Self {
        SubSet {
            entries: Vec::new(),
        }
    }
}

impl<K: Borrow<str>, V> SubSet<K, V> {
    fn find(&self, id: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.borrow().cmp(id))
    }

    pub fn contains_key(&self, id: &str) -> bool {
        self.find(id).is_ok()
    }

    /// Inserts or replaces.
    pub fn insert(&mut self, id: K, value: V) {
        match self.find(id.borrow()) {
            Ok(i) => self.entries[i].1 = value,
            Err(i) => self.entries.insert(i, (id, value)),
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<V> {
        let i = self.find(id).ok()?;
        let (_, v) = self.entries.remove(i);
        if self.entries.capacity() > 2 * self.entries.len() + 4 {
            self.entries.shrink_to_fit();
        }
        Some(v)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut V> {
        let i = self.find(id).ok()?;
        Some(&mut self.entries[i].1)
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.entries.iter().map(|(k, _)| k)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops spare capacity (after a batch of inserts).
    pub fn shrink(&mut self) {
        self.entries.shrink_to_fit();
    }
}

/// The entries, in id order.
impl<K, V> IntoIterator for SubSet<K, V> {
    type Item = (K, V);
    type IntoIter = std::vec::IntoIter<(K, V)>;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Behaves like a map: same answers as a BTreeMap under any sequence of operations.
        #[test]
        fn matches_a_map(ops in proptest::collection::vec((0..3u8, 0..20u8, 0..100u32), 0..200)) {
            let mut ours: SubSet<String, u32> = SubSet::default();
            let mut model = std::collections::BTreeMap::new();
            for (op, key, val) in ops {
                let k = format!("k{key}");
                match op {
                    0 => { ours.insert(k.clone(), val); model.insert(k, val); }
                    1 => prop_assert_eq!(ours.remove(&k), model.remove(&k)),
                    _ => prop_assert_eq!(ours.get_mut(&k).copied(), model.get(&k).copied()),
                }
                prop_assert_eq!(ours.len(), model.len());
                prop_assert!(ours.keys().eq(model.keys()));
            }
        }
    }
}
