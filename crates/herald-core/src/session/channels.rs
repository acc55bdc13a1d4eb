//! A session's subscriptions by channel: a vector sorted by channel name, grown one slot at
//! a time. Most connections hold one to a few channels, and a hash map's smallest table
//! (four buckets and their control bytes, ~275 bytes here) was one of the largest parts of an
//! idle connection (docs/performance.md). Lookups are binary searches; `client.max_channels`
//! bounds the length.

pub(super) struct SubsByChannel<V> {
    entries: Vec<(String, V)>,
}

impl<V> Default for SubsByChannel<V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
        }
    }
}

impl<V> SubsByChannel<V> {
    fn find(&self, ch: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|(k, _)| k.as_str().cmp(ch))
    }

    pub(super) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(super) fn contains_key(&self, ch: &str) -> bool {
        self.find(ch).is_ok()
    }

    pub(super) fn get(&self, ch: &str) -> Option<&V> {
        self.find(ch).ok().map(|i| &self.entries[i].1)
    }

    pub(super) fn get_mut(&mut self, ch: &str) -> Option<&mut V> {
        self.find(ch).ok().map(|i| &mut self.entries[i].1)
    }

    /// Adds or replaces; returns the value replaced.
    pub(super) fn insert(&mut self, ch: String, v: V) -> Option<V> {
        match self.find(&ch) {
            Ok(i) => Some(std::mem::replace(&mut self.entries[i].1, v)),
            Err(i) => {
                // Exact growth: a vector's default doubling would keep up to twice the slots.
                self.entries.reserve_exact(1);
                self.entries.insert(i, (ch, v));
                None
            }
        }
    }

    pub(super) fn remove(&mut self, ch: &str) -> Option<V> {
        let i = self.find(ch).ok()?;
        let (_, v) = self.entries.remove(i);
        if self.entries.capacity() > 2 * self.entries.len() {
            self.entries.shrink_to_fit();
        }
        Some(v)
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &String> {
        self.entries.iter().map(|(k, _)| k)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    pub(super) fn iter_mut(&mut self) -> impl Iterator<Item = (&String, &mut V)> {
        self.entries.iter_mut().map(|(k, v)| (&*k, v))
    }

    /// Empties the map, freeing its storage, and returns what it held.
    pub(super) fn take_all(&mut self) -> Vec<(String, V)> {
        std::mem::take(&mut self.entries)
    }
}

#[cfg(test)]
mod tests {
    use super::SubsByChannel;

    #[test]
    fn behaves_as_a_map_in_channel_order_with_exact_storage() {
        let mut m = SubsByChannel::default();
        for (i, ch) in ["news", "alpha", "#42", "zeta", "beta"].iter().enumerate() {
            assert_eq!(m.insert(ch.to_string(), i), None);
            assert_eq!(m.entries.capacity(), m.len(), "grown one slot at a time");
        }
        assert_eq!(m.insert("alpha".into(), 10), Some(1));
        assert_eq!(m.len(), 5);
        let keys: Vec<&str> = m.keys().map(String::as_str).collect();
        assert_eq!(keys, ["#42", "alpha", "beta", "news", "zeta"]);
        assert_eq!(m.get("alpha"), Some(&10));
        assert!(m.contains_key("zeta") && !m.contains_key("zet"));
        if let Some(v) = m.get_mut("news") {
            *v += 100;
        }
        assert_eq!(m.get("news"), Some(&100));
        for (_, v) in m.iter_mut() {
            *v += 1;
        }
        assert_eq!(m.values().copied().collect::<Vec<_>>(), [3, 11, 5, 101, 4]);
        assert_eq!(m.remove("beta"), Some(5));
        assert_eq!(m.remove("beta"), None);
        assert_eq!(m.remove("missing"), None);
        for ch in ["#42", "alpha", "news"] {
            m.remove(ch);
        }
        assert!(
            m.entries.capacity() <= 2,
            "storage shrinks as channels leave"
        );
        let rest = m.take_all();
        assert_eq!(rest, [("zeta".to_string(), 4)]);
        assert_eq!((m.len(), m.entries.capacity()), (0, 0));
    }
}
