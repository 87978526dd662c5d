//! In-memory stores for unit tests and the simulator.
//!
//! Shards are kept as their encoded bytes, so the simulator can rot, truncate or lose
//! them exactly as a disk would, and every read goes through the same verification as the
//! file store. Nothing here blocks and every future is ready at once, which keeps the
//! simulator's schedule deterministic.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bdr_protocol::erasure::Shard;

use crate::env::{BoxFuture, KeyValue, MetaStore, ShardKey, ShardStore, StoreError, StoreUsage, Tree};

#[derive(Default)]
struct ShardState {
    shards: BTreeMap<ShardKey, Vec<u8>>,
    used_bytes: u64,
    corrupt_reads: u64,
}

pub struct MemoryShardStore {
    capacity_bytes: u64,
    state: Mutex<ShardState>,
}

impl MemoryShardStore {
    pub fn new(capacity_bytes: u64) -> MemoryShardStore {
        MemoryShardStore {
            capacity_bytes,
            state: Mutex::new(ShardState::default()),
        }
    }

    /// Applies `damage` to a stored shard's bytes (fault injection). Returns false if absent.
    pub fn damage(&self, key: ShardKey, damage: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        let Some(bytes) = state.shards.get_mut(&key) else {
            return false;
        };
        let before = bytes.len() as u64;
        damage(bytes);
        let after = bytes.len() as u64;
        state.used_bytes = state.used_bytes + after - before;
        true
    }

    fn put_now(&self, shard: &Shard) -> Result<(), StoreError> {
        let key = ShardKey {
            stripe_id: shard.header().stripe_id,
            index: shard.header().index,
        };
        let bytes = shard.to_bytes();
        let mut state = self.state.lock().expect("not poisoned");
        let replaced = state.shards.get(&key).map_or(0, |old| old.len() as u64);
        let available_bytes = self.capacity_bytes.saturating_sub(state.used_bytes - replaced);
        if bytes.len() as u64 > available_bytes {
            return Err(StoreError::DiskFull {
                needed_bytes: bytes.len() as u64,
                available_bytes,
            });
        }
        state.used_bytes = state.used_bytes - replaced + bytes.len() as u64;
        state.shards.insert(key, bytes);
        Ok(())
    }

    fn get_now(&self, key: ShardKey) -> Result<Shard, StoreError> {
        let mut state = self.state.lock().expect("not poisoned");
        let bytes = state.shards.get(&key).ok_or(StoreError::NotFound)?;
        match Shard::from_bytes(bytes) {
            Ok(shard) if shard.header().stripe_id == key.stripe_id && shard.header().index == key.index => Ok(shard),
            Ok(_) => {
                Self::quarantine(&mut state, key);
                Err(StoreError::Corrupt("shard stored under the wrong key".into()))
            }
            Err(error) => {
                Self::quarantine(&mut state, key);
                Err(StoreError::Corrupt(error.to_string()))
            }
        }
    }

    /// Takes a corrupt shard out of the store, as the file store moves it aside.
    fn quarantine(state: &mut ShardState, key: ShardKey) {
        state.corrupt_reads += 1;
        if let Some(bytes) = state.shards.remove(&key) {
            state.used_bytes -= bytes.len() as u64;
        }
    }

    fn delete_now(&self, key: ShardKey) -> bool {
        let mut state = self.state.lock().expect("not poisoned");
        match state.shards.remove(&key) {
            Some(bytes) => {
                state.used_bytes -= bytes.len() as u64;
                true
            }
            None => false,
        }
    }
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

impl ShardStore for MemoryShardStore {
    fn put(&self, shard: Shard) -> BoxFuture<'static, Result<(), StoreError>> {
        ready(self.put_now(&shard))
    }

    fn get(&self, key: ShardKey) -> BoxFuture<'static, Result<Shard, StoreError>> {
        ready(self.get_now(key))
    }

    fn delete(&self, key: ShardKey) -> BoxFuture<'static, Result<bool, StoreError>> {
        ready(Ok(self.delete_now(key)))
    }

    fn list(&self) -> BoxFuture<'static, Result<Vec<ShardKey>, StoreError>> {
        ready(Ok(self
            .state
            .lock()
            .expect("not poisoned")
            .shards
            .keys()
            .copied()
            .collect()))
    }

    fn contains(&self, keys: Vec<ShardKey>) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        let state = self.state.lock().expect("not poisoned");
        ready(Ok(keys.iter().map(|key| state.shards.contains_key(key)).collect()))
    }

    fn usage(&self) -> StoreUsage {
        let state = self.state.lock().expect("not poisoned");
        StoreUsage {
            capacity_bytes: self.capacity_bytes,
            used_bytes: state.used_bytes,
            shard_count: state.shards.len() as u64,
            corrupt_reads: state.corrupt_reads,
        }
    }
}

type OrderedTree = BTreeMap<Vec<u8>, Vec<u8>>;

/// Up to `limit` rows of `rows` with keys starting with `prefix` and greater than
/// `after`, in order: the `MetaStore::scan` contract over an ordered map.
pub fn scan_ordered(rows: &OrderedTree, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Vec<KeyValue> {
    let start = match after {
        Some(after) => std::ops::Bound::Excluded(after.to_vec()),
        None => std::ops::Bound::Included(prefix.to_vec()),
    };
    rows.range((start, std::ops::Bound::Unbounded))
        .take_while(|(key, _)| key.starts_with(prefix))
        .take(limit)
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect()
}

/// Metadata in ordered maps, one per tree.
#[derive(Default)]
pub struct MemoryMetaStore {
    trees: Mutex<BTreeMap<Tree, OrderedTree>>,
}

impl MemoryMetaStore {
    pub fn new() -> MemoryMetaStore {
        MemoryMetaStore::default()
    }
}

impl MetaStore for MemoryMetaStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let trees = self.trees.lock().expect("not poisoned");
        Ok(trees.get(&tree).and_then(|entries| entries.get(key)).cloned())
    }

    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let mut trees = self.trees.lock().expect("not poisoned");
        trees.entry(tree).or_default().insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        let mut trees = self.trees.lock().expect("not poisoned");
        if let Some(entries) = trees.get_mut(&tree) {
            entries.remove(key);
        }
        Ok(())
    }

    fn scan(&self, tree: Tree, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let trees = self.trees.lock().expect("not poisoned");
        Ok(trees
            .get(&tree)
            .map(|rows| scan_ordered(rows, prefix, after, limit))
            .unwrap_or_default())
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        ready(Ok(()))
    }
}
