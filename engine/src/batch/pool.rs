//! [`PrefixCache`]: the KV caches of finished sequences, kept for the prompts that start the
//! same way.
//!
//! When a sequence leaves the batch its cache still holds the keys and values of every token
//! it fed (its prompt and all but the last generated token). The batch hands it here with
//! those tokens. A new request asks for the kept cache whose tokens share the longest prefix
//! with its prompt; it takes that cache, truncated to the shared prefix, and prefills only the
//! rest (at least its last prompt token is always run, since the first sampled token needs
//! its logits). Because the forward computes each position the same way whichever forward
//! wrote it, a reused prefix gives the same bits as prefilling it again.
//!
//! Memory is bounded by the batch's KV budget: the batch evicts kept caches, least recently
//! used first, whenever a new reservation needs their bytes, and at most `max_kept` caches
//! are kept at all.

use crate::llama::SequenceCache;

/// One kept cache and the tokens whose positions it holds.
#[derive(Debug)]
struct Kept {
    tokens: Vec<u32>,
    cache: SequenceCache,
    last_used: u64,
}

/// Finished sequences' caches, by their tokens; see the module docs.
#[derive(Debug)]
pub struct PrefixCache {
    kept: Vec<Kept>,
    clock: u64,
    max_kept: usize,
}

/// A kept cache handed to a new sequence.
#[derive(Debug)]
pub struct Reuse {
    /// The cache, truncated to the reused positions.
    pub cache: SequenceCache,
    /// Prompt positions it already holds.
    pub positions: usize,
}

impl PrefixCache {
    /// An empty prefix cache keeping at most `max_kept` caches.
    pub fn new(max_kept: usize) -> Self {
        Self {
            kept: Vec::new(),
            clock: 0,
            max_kept,
        }
    }

    /// Caches kept.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Bytes the kept caches hold.
    pub fn bytes(&self) -> u64 {
        self.kept
            .iter()
            .map(|k| k.cache.allocated_bytes() as u64)
            .sum()
    }

    /// Keeps `cache`, which holds the positions of `tokens` (extra tokens past the cache's
    /// length are ignored); evicts the least recently used cache beyond `max_kept`.
    pub fn put(&mut self, mut tokens: Vec<u32>, cache: SequenceCache) {
        if self.max_kept == 0 || cache.is_empty() {
            return;
        }
        tokens.truncate(cache.len());
        self.clock += 1;
        self.kept.push(Kept {
            tokens,
            cache,
            last_used: self.clock,
        });
        while self.kept.len() > self.max_kept {
            self.evict_lru();
        }
    }

    /// Takes the kept cache sharing the longest prefix with `prompt`, if any shares at least
    /// one token that may be reused (never the prompt's last token).
    pub fn take(&mut self, prompt: &[u32]) -> Option<Reuse> {
        let limit = prompt.len().saturating_sub(1);
        let (best, shared) = self
            .kept
            .iter()
            .enumerate()
            .map(|(i, k)| (i, common_prefix(&k.tokens, prompt).min(limit)))
            .max_by_key(|&(i, shared)| (shared, self.kept[i].last_used))?;
        if shared == 0 {
            return None;
        }
        let mut cache = self.kept.swap_remove(best).cache;
        cache.truncate(shared);
        Some(Reuse {
            cache,
            positions: shared,
        })
    }

    /// Drops the least recently used cache; false when none is kept.
    pub fn evict_lru(&mut self) -> bool {
        let Some((lru, _)) = self
            .kept
            .iter()
            .enumerate()
            .min_by_key(|(_, k)| k.last_used)
        else {
            return false;
        };
        self.kept.swap_remove(lru);
        true
    }
}

/// Length of the common prefix of `a` and `b`.
pub(super) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache(len: usize) -> SequenceCache {
        SequenceCache::zeroed(2, 4, 64, len)
    }

    #[test]
    fn takes_the_longest_shared_prefix_and_never_the_last_prompt_token() {
        let mut pool = PrefixCache::new(4);
        pool.put(vec![1, 2, 3, 4, 5], cache(5));
        pool.put(vec![1, 2, 9], cache(3));
        assert!(pool.take(&[7, 8]).is_none(), "nothing shared");
        let reuse = pool.take(&[1, 2, 3, 4, 5, 6]).expect("hit");
        assert_eq!(reuse.positions, 5);
        assert_eq!(reuse.cache.len(), 5);
        assert_eq!(pool.len(), 1, "the taken cache leaves the pool");
        pool.put(vec![1, 2, 3, 4, 5], cache(5));
        let reuse = pool.take(&[1, 2, 3, 4, 5]).expect("hit");
        assert_eq!(reuse.positions, 4, "the last prompt token is always run");
        assert_eq!(reuse.cache.len(), 4);
        let reuse = pool.take(&[1, 2, 9, 9]).expect("hit");
        assert_eq!(reuse.positions, 3);
        assert!(pool.is_empty());
    }

    #[test]
    fn keeps_only_the_tokens_the_cache_holds_and_evicts_least_recently_used() {
        let mut pool = PrefixCache::new(2);
        pool.put(vec![1, 2, 3, 4], cache(2));
        let reuse = pool.take(&[1, 2, 3, 4, 5]).expect("hit");
        assert_eq!(reuse.positions, 2, "only positions the cache holds");
        pool.put(vec![1], cache(1));
        pool.put(vec![2], cache(1));
        pool.put(vec![3], cache(1));
        assert_eq!(pool.len(), 2);
        assert!(pool.take(&[1, 0]).is_none(), "the oldest was evicted");
        assert!(pool.bytes() > 0);
        assert!(pool.evict_lru());
        assert!(pool.evict_lru());
        assert!(!pool.evict_lru());
        assert_eq!(pool.bytes(), 0);
        PrefixCache::new(0).put(vec![1], cache(1));
    }
}
