//! Simulated disks that fail: a shard store wrapping the in-memory one with torn writes,
//! lost writes, latent read errors and a full disk, and the fault atlas that keeps every
//! such fault within the failure budget.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bdr_node::env::{BoxFuture, ShardKey, ShardStore, StoreError, StoreUsage};
use bdr_node::stores::memory::MemoryShardStore;
use bdr_protocol::erasure::Shard;
use bdr_protocol::ids::{NodeId, StripeId};

use crate::executor::Executor;

/// Which shard of each stripe disk faults may touch. A stripe is given to the first
/// (node, shard) that claims it and refused to every other one for the whole run, so at
/// most one shard of any stripe is ever damaged by a disk fault; with at most one more
/// node impaired at a time (crashed or cut off), a stripe never misses more than
/// 2 = m shards. Claims are never released: a stripe repaired after a fault stays
/// spoken for, which keeps the rule simple and conservative.
#[derive(Default)]
pub struct FaultAtlas {
    claims: Mutex<BTreeMap<StripeId, (NodeId, u8)>>,
}

impl FaultAtlas {
    /// Whether `node` may damage shard `key`; claims the stripe if it is free.
    pub fn claim(&self, node: NodeId, key: ShardKey) -> bool {
        let mut claims = self.claims.lock().expect("not poisoned");
        let claim = claims.entry(key.stripe_id).or_insert((node, key.index));
        *claim == (node, key.index)
    }

    pub fn claimed_stripes(&self) -> usize {
        self.claims.lock().expect("not poisoned").len()
    }
}

/// How a lost-write fault loses the shards a disk acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LostWrites {
    /// Acknowledged puts are kept in a volatile cache and vanish at the next crash (or
    /// when the fault ends, without one: firmware that drops its cache).
    Cached,
    /// Acknowledged puts are never stored at all.
    Silent,
}

/// Faults switched on for one disk right now.
#[derive(Default)]
struct DiskFaultState {
    /// Puts first leave a torn (truncated or zero-filled) shard at its final name and
    /// only complete after a delay: a crash in between leaves the torn file behind.
    torn_write_latency_ms: Option<u64>,
    /// Puts in progress under torn writes (the file at their name is torn right now).
    puts_in_flight: u64,
    /// Keys whose file is torn (and not yet rewritten, deleted or quarantined).
    torn: BTreeSet<ShardKey>,
    lost_writes: Option<LostWrites>,
    /// Acknowledged under `LostWrites::Cached`, not yet durable.
    cached: BTreeSet<ShardKey>,
    /// Reads of keys chosen by this salt fail with an I/O error.
    read_error_salt: Option<u8>,
    disk_full: bool,
    /// What the faults did so far (`stripes_claimed` is the atlas's, filled in by the run).
    counters: DiskFaultCounters,
}

/// Counters of what the disk faults did, for the outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DiskFaultCounters {
    pub torn_files_left: u64,
    pub writes_lost: u64,
    pub read_errors_returned: u64,
    pub puts_refused_disk_full: u64,
    /// A torn file that read back as a valid shard: must never happen.
    pub torn_read_as_data: u64,
    /// Stripes some disk fault touched (the atlas's claims).
    pub stripes_claimed: u64,
}

impl DiskFaultCounters {
    pub fn add(&mut self, other: &DiskFaultCounters) {
        self.torn_files_left += other.torn_files_left;
        self.writes_lost += other.writes_lost;
        self.read_errors_returned += other.read_errors_returned;
        self.puts_refused_disk_full += other.puts_refused_disk_full;
        self.torn_read_as_data += other.torn_read_as_data;
        self.stripes_claimed += other.stripes_claimed;
    }
}

/// One node's shard disk: the in-memory store plus the faults switched on for it.
pub struct FaultyShardStore {
    node: NodeId,
    inner: Arc<MemoryShardStore>,
    state: Arc<Mutex<DiskFaultState>>,
    atlas: Arc<FaultAtlas>,
    executor: Executor,
}

fn key_of(shard: &Shard) -> ShardKey {
    ShardKey {
        stripe_id: shard.header().stripe_id,
        index: shard.header().index,
    }
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(std::future::ready(value))
}

impl FaultyShardStore {
    pub fn new(node: NodeId, capacity_bytes: u64, atlas: Arc<FaultAtlas>, executor: Executor) -> FaultyShardStore {
        FaultyShardStore {
            node,
            inner: Arc::new(MemoryShardStore::new(capacity_bytes)),
            state: Arc::new(Mutex::new(DiskFaultState::default())),
            atlas,
            executor,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, DiskFaultState> {
        self.state.lock().expect("not poisoned")
    }

    /// Applies `damage` to a stored shard's bytes if the atlas allows (bit rot).
    pub fn rot(&self, key: ShardKey, damage: impl FnOnce(&mut Vec<u8>)) -> bool {
        self.atlas.claim(self.node, key) && self.inner.damage(key, damage)
    }

    /// Removes a shard outright, whatever the budget (beyond-budget destruction).
    pub fn destroy(&self, key: ShardKey) -> bool {
        self.state().torn.remove(&key);
        futures::executor::block_on(self.inner.delete(key)).unwrap_or(false)
    }

    /// Empties the disk (a node lost with its disk, or decommissioned and wiped).
    pub fn wipe(&self) {
        for key in futures::executor::block_on(self.inner.list()).unwrap_or_default() {
            self.destroy(key);
        }
    }

    /// Flips a byte of a stored shard, whatever the budget (beyond-budget rot).
    pub fn destroy_by_rot(&self, key: ShardKey, position: usize) -> bool {
        self.inner.damage(key, |bytes| {
            let at = position % bytes.len().max(1);
            if let Some(byte) = bytes.get_mut(at) {
                *byte ^= 0x20;
            }
        })
    }

    pub fn set_torn_writes(&self, latency_ms: Option<u64>) {
        self.state().torn_write_latency_ms = latency_ms;
    }

    pub fn puts_in_flight(&self) -> u64 {
        self.state().puts_in_flight
    }

    pub fn set_lost_writes(&self, mode: Option<LostWrites>) {
        self.state().lost_writes = mode;
    }

    pub fn set_read_errors(&self, salt: Option<u8>) {
        self.state().read_error_salt = salt;
    }

    pub fn set_disk_full(&self, full: bool) {
        self.state().disk_full = full;
    }

    /// Drops every acknowledged write still in the volatile cache.
    pub fn lose_cached_writes(&self) {
        let cached = std::mem::take(&mut self.state().cached);
        for key in cached {
            if futures::executor::block_on(self.inner.delete(key)).unwrap_or(false) {
                self.state().counters.writes_lost += 1;
            }
        }
    }

    /// The node crashed: the volatile cache is lost. (Puts in flight leave their torn
    /// files when their futures are dropped with the node's tasks.)
    pub fn crash(&self) {
        self.lose_cached_writes();
    }

    /// Ends every temporary fault (the liveness phase starts); torn files stay.
    pub fn heal(&self) {
        let mut state = self.state();
        state.torn_write_latency_ms = None;
        state.read_error_salt = None;
        state.disk_full = false;
        state.lost_writes = None;
        // What the cache holds by now is durable: the fault is over.
        state.cached.clear();
    }

    pub fn counters(&self) -> DiskFaultCounters {
        self.state().counters
    }

    /// Whether a latent read error hides `key` now.
    fn read_error_hits(&self, key: ShardKey) -> bool {
        let Some(salt) = self.state().read_error_salt else {
            return false;
        };
        // About a third of the shards sit on bad sectors during the fault.
        (key.stripe_id.as_bytes()[0] ^ salt ^ key.index).is_multiple_of(3) && self.atlas.claim(self.node, key)
    }
}

/// A put under torn writes: dropped before it completes (its node crashed, or the
/// writer gave up on it), it leaves the torn file at the shard's name.
struct PutInFlight {
    state: Arc<Mutex<DiskFaultState>>,
    key: ShardKey,
    completed: bool,
}

impl PutInFlight {
    fn finish(mut self) {
        self.completed = true;
    }
}

impl Drop for PutInFlight {
    fn drop(&mut self) {
        let mut state = self.state.lock().expect("not poisoned");
        state.puts_in_flight -= 1;
        if self.completed {
            state.torn.remove(&self.key);
        } else if state.torn.contains(&self.key) {
            state.counters.torn_files_left += 1;
        }
    }
}

/// Leaves a torn version of `bytes`: a prefix (the rest never written), or the full
/// length with the second half unwritten: zeros (the file was extended first), or stale
/// sector contents where the shard itself ends in zeros (padding of a short stripe), so
/// that the torn file always differs from the shard.
fn tear(bytes: &mut Vec<u8>, truncate: bool) {
    const STALE_SECTOR_BYTE: u8 = 0xa5;
    let half = bytes.len() / 2;
    if truncate {
        bytes.truncate(half);
    } else {
        let fill = if bytes[half..].iter().all(|byte| *byte == 0) {
            STALE_SECTOR_BYTE
        } else {
            0
        };
        for byte in &mut bytes[half..] {
            *byte = fill;
        }
    }
}

impl ShardStore for FaultyShardStore {
    fn put(&self, shard: Shard) -> BoxFuture<'static, Result<(), StoreError>> {
        let key = key_of(&shard);
        let (disk_full, torn_latency_ms, lost_writes) = {
            let state = self.state();
            (state.disk_full, state.torn_write_latency_ms, state.lost_writes)
        };
        if disk_full {
            self.state().counters.puts_refused_disk_full += 1;
            return ready(Err(StoreError::DiskFull {
                needed_bytes: shard.encoded_length_bytes(),
                available_bytes: 0,
            }));
        }
        if let Some(mode) = lost_writes {
            if self.atlas.claim(self.node, key) {
                match mode {
                    LostWrites::Silent => {
                        self.state().counters.writes_lost += 1;
                        return ready(Ok(()));
                    }
                    LostWrites::Cached => {
                        let result = futures::executor::block_on(self.inner.put(shard));
                        if result.is_ok() {
                            let mut state = self.state();
                            state.cached.insert(key);
                            state.torn.remove(&key);
                        }
                        return ready(result);
                    }
                }
            }
        }
        if let Some(latency_ms) = torn_latency_ms {
            if self.atlas.claim(self.node, key) {
                // The file at the final name is torn until the write completes.
                if let Err(error) = futures::executor::block_on(self.inner.put(shard.clone())) {
                    return ready(Err(error));
                }
                let truncate = key.stripe_id.as_bytes()[1].is_multiple_of(2);
                self.inner.damage(key, |bytes| tear(bytes, truncate));
                {
                    let mut state = self.state();
                    state.torn.insert(key);
                    state.puts_in_flight += 1;
                }
                let inner = Arc::clone(&self.inner);
                let in_flight = PutInFlight {
                    state: Arc::clone(&self.state),
                    key,
                    completed: false,
                };
                let sleep = self.executor.sleep(latency_ms);
                return Box::pin(async move {
                    sleep.await;
                    let result = inner.put(shard).await;
                    in_flight.finish();
                    result
                });
            }
        }
        let result = futures::executor::block_on(self.inner.put(shard));
        if result.is_ok() {
            self.state().torn.remove(&key);
        }
        ready(result)
    }

    fn get(&self, key: ShardKey) -> BoxFuture<'static, Result<Shard, StoreError>> {
        if self.read_error_hits(key) {
            self.state().counters.read_errors_returned += 1;
            return ready(Err(StoreError::Io("latent sector error (simulated)".into())));
        }
        let result = futures::executor::block_on(self.inner.get(key));
        let mut state = self.state();
        if state.torn.contains(&key) {
            match result {
                Ok(_) => state.counters.torn_read_as_data += 1,
                // Quarantined: the torn file is gone.
                Err(_) => {
                    state.torn.remove(&key);
                }
            }
        }
        ready(result)
    }

    fn delete(&self, key: ShardKey) -> BoxFuture<'static, Result<bool, StoreError>> {
        {
            let mut state = self.state();
            state.torn.remove(&key);
            state.cached.remove(&key);
        }
        self.inner.delete(key)
    }

    fn list(&self) -> BoxFuture<'static, Result<Vec<ShardKey>, StoreError>> {
        self.inner.list()
    }

    fn contains(&self, keys: Vec<ShardKey>) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        self.inner.contains(keys)
    }

    fn usage(&self) -> StoreUsage {
        self.inner.usage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdr_protocol::erasure::{CodecId, StripeCodec};

    fn shards() -> Vec<Shard> {
        let codec = StripeCodec::new(CodecId::DEFAULT, 2, 1).unwrap();
        codec.encode(StripeId([9; 32]), &[7u8; 1000]).unwrap()
    }

    #[test]
    fn a_crash_mid_write_leaves_a_torn_file_that_reads_as_corrupt() {
        let executor = Executor::new(0);
        let atlas = Arc::new(FaultAtlas::default());
        let store = Arc::new(FaultyShardStore::new(NodeId([1; 32]), 1 << 30, atlas, executor.clone()));
        store.set_torn_writes(Some(50));
        let shard = shards().remove(0);
        let key = key_of(&shard);
        let writing = Arc::clone(&store);
        executor.spawn(
            Some(NodeId([1; 32])),
            Box::pin(async move {
                let _ = writing.put(shard).await;
            }),
        );
        executor.run_until(10);
        assert_eq!(store.puts_in_flight(), 1);
        executor.kill_node_tasks(&NodeId([1; 32]));
        store.crash();
        let result = futures::executor::block_on(store.get(key));
        assert!(matches!(result, Err(StoreError::Corrupt(_))), "{result:?}");
        assert_eq!(store.counters().torn_files_left, 1);
        assert_eq!(store.counters().torn_read_as_data, 0);
    }

    #[test]
    fn cached_lost_writes_vanish_at_a_crash_within_the_atlas() {
        let atlas = Arc::new(FaultAtlas::default());
        let store = FaultyShardStore::new(NodeId([1; 32]), 1 << 30, Arc::clone(&atlas), Executor::new(0));
        let other = FaultyShardStore::new(NodeId([2; 32]), 1 << 30, atlas, Executor::new(0));
        let mut all = shards();
        let (first, second) = (all.remove(0), all.remove(0));
        let (first_key, second_key) = (key_of(&first), key_of(&second));
        store.set_lost_writes(Some(LostWrites::Cached));
        other.set_lost_writes(Some(LostWrites::Cached));
        futures::executor::block_on(store.put(first)).unwrap();
        // The same stripe on another disk: the atlas refuses a second damaged shard.
        futures::executor::block_on(other.put(second)).unwrap();
        store.crash();
        other.crash();
        assert!(matches!(
            futures::executor::block_on(store.get(first_key)),
            Err(StoreError::NotFound)
        ));
        assert!(futures::executor::block_on(other.get(second_key)).is_ok());
        assert_eq!(store.counters().writes_lost, 1);
    }

    #[test]
    fn a_full_disk_refuses_puts_and_read_errors_pass() {
        let store = FaultyShardStore::new(
            NodeId([1; 32]),
            1 << 30,
            Arc::new(FaultAtlas::default()),
            Executor::new(0),
        );
        let shard = shards().remove(0);
        let key = key_of(&shard);
        store.set_disk_full(true);
        assert!(matches!(
            futures::executor::block_on(store.put(shard.clone())),
            Err(StoreError::DiskFull { .. })
        ));
        store.set_disk_full(false);
        futures::executor::block_on(store.put(shard)).unwrap();
        let salt = (0..=255u8)
            .find(|salt| (key.stripe_id.as_bytes()[0] ^ salt ^ key.index).is_multiple_of(3))
            .unwrap();
        store.set_read_errors(Some(salt));
        assert!(matches!(
            futures::executor::block_on(store.get(key)),
            Err(StoreError::Io(_))
        ));
        store.heal();
        assert!(futures::executor::block_on(store.get(key)).is_ok());
    }
}
