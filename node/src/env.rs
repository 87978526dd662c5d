//! The environment the cluster logic runs in: network, clock and timers, stores, RNG.
//!
//! Everything the logic in [`crate::cluster`] does to the outside world goes through
//! [`Env`]. Production supplies libp2p, tokio time, files and sled ([`crate::runtime`]);
//! the simulator supplies deterministic in-memory implementations with virtual time. So
//! the logic must never call tokio, `Instant::now`, `SystemTime`, thread RNGs or iterate
//! a `HashMap` in a way that decides anything: the simulator's determinism depends on it.
//!
//! Futures are boxed and `Send` so the same logic runs on tokio's multi-threaded runtime
//! and on the simulator's single-threaded executor.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bdr_protocol::erasure::Shard;
use bdr_protocol::ids::{NodeId, StripeId};
use bdr_protocol::wire::{Request, Response, Table};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkError {
    #[error("peer {0} is unreachable: {1}")]
    Unreachable(String, String),
    #[error("request to {0} timed out")]
    Timeout(String),
    #[error("peer {0} refused or failed the request: {1}")]
    Failed(String, String),
    #[error("too many requests queued for peer {0}")]
    Overloaded(String),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no such shard")]
    NotFound,
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("disk full: {needed_bytes} bytes needed, {available_bytes} available")]
    DiskFull { needed_bytes: u64, available_bytes: u64 },
    #[error("store I/O error: {0}")]
    Io(String),
}

/// A shard's address in a shard store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ShardKey {
    pub stripe_id: StripeId,
    pub index: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreUsage {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub shard_count: u64,
    /// Reads that found a shard failing its checksum since start. Each such shard is
    /// quarantined: moved out of the store, so it reads as missing and repair rebuilds it.
    pub corrupt_reads: u64,
}

/// Where shard payloads live: files in production, memory in the simulator.
pub trait ShardStore: Send + Sync + 'static {
    /// Stores a shard durably: when the future resolves `Ok`, the shard survives a crash.
    fn put(&self, shard: Shard) -> BoxFuture<'static, Result<(), StoreError>>;
    /// Reads and verifies a shard; a checksum mismatch is `StoreError::Corrupt`, and the
    /// bad shard is quarantined (no longer listed, contained or counted as used).
    fn get(&self, key: ShardKey) -> BoxFuture<'static, Result<Shard, StoreError>>;
    /// Removes a shard; `Ok(false)` if there was none.
    fn delete(&self, key: ShardKey) -> BoxFuture<'static, Result<bool, StoreError>>;
    /// Every shard held, in key order.
    fn list(&self) -> BoxFuture<'static, Result<Vec<ShardKey>, StoreError>>;
    /// Which of `keys` are held (without reading or verifying them).
    fn contains(&self, keys: Vec<ShardKey>) -> BoxFuture<'static, Result<Vec<bool>, StoreError>>;
    fn usage(&self) -> StoreUsage;
}

/// One metadata entry: (key, value).
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// A metadata tree: one per [`Table`], plus the node's own system tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tree {
    Table(Table),
    /// Node-local state: layout, peer addresses, boot generation.
    System,
}

impl Tree {
    pub fn name(self) -> &'static str {
        match self {
            Tree::Table(table) => table.name(),
            Tree::System => "system",
        }
    }
}

/// Where metadata lives: sled in production, memory in the simulator. Values are opaque
/// bytes here; their format (versioned) belongs to the layer above.
pub trait MetaStore: Send + Sync + 'static {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError>;
    fn delete(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError>;
    /// Up to `limit` entries with keys starting with `prefix` and greater than `after`.
    fn scan(&self, tree: Tree, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, StoreError>;
    /// Makes every earlier write durable.
    fn flush(&self) -> BoxFuture<'static, Result<(), StoreError>>;
}

/// What the network hands to the cluster logic: requests from admitted peers, and news
/// that a peer was admitted (so the logic can gossip with it at once).
pub trait InboundHandler: Send + Sync + 'static {
    fn handle(&self, from: NodeId, request: Request) -> BoxFuture<'static, Response>;
    fn peer_admitted(&self, peer: NodeId);
}

/// Everything the cluster logic may touch.
pub trait Env: Send + Sync + 'static {
    /// This node's id.
    fn node_id(&self) -> NodeId;
    /// Wall-clock milliseconds since the Unix epoch (virtual in the simulator).
    fn now_ms(&self) -> u64;
    /// Resolves after `duration_ms` of (possibly virtual) time.
    fn sleep(&self, duration_ms: u64) -> BoxFuture<'static, ()>;
    /// Runs a background task. `name` appears in logs and simulator traces.
    fn spawn(&self, name: &'static str, task: BoxFuture<'static, ()>);
    /// Uniformly random; seeded in the simulator.
    fn random_u64(&self) -> u64;
    /// Sends a request to a peer (admitting it first if needed) and waits at most
    /// `timeout_ms` for its answer.
    fn request(
        &self,
        to: NodeId,
        request: Request,
        timeout_ms: u64,
    ) -> BoxFuture<'static, Result<Response, NetworkError>>;
    /// Addresses a peer announced, so the network can reach it (opaque to the logic).
    fn remember_addresses(&self, node: NodeId, addresses: &[String]);
    /// Addresses other nodes can reach this one at.
    fn local_addresses(&self) -> Vec<String>;
    fn shard_store(&self) -> Arc<dyn ShardStore>;
    fn meta_store(&self) -> Arc<dyn MetaStore>;
}
