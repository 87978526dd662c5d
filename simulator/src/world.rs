//! The simulated world: a network with latency, loss and partitions, per-node clocks
//! with skew, crashable metadata stores, and the trace every event is hashed into.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bdr_node::env::{BoxFuture, Env, InboundHandler, KeyValue, MetaStore, NetworkError, ShardStore, StoreError, Tree};
use bdr_node::stores::memory::scan_ordered;
use bdr_protocol::ids::NodeId;
use bdr_protocol::wire::{self, Request, Response};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::disk::{FaultAtlas, FaultyShardStore};
use crate::executor::Executor;

/// Network behaviour, chosen per seed.
#[derive(Debug, Clone, Copy)]
pub struct NetworkSettings {
    pub latency_ms_min: u64,
    pub latency_ms_max: u64,
    /// Probability, in thousandths, that a message (request or answer) is lost.
    pub loss_per_mille: u32,
}

/// Requests of one kind sent in a run.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct MessageKindCount {
    pub requests: u64,
    pub request_bytes: u64,
}

/// Trace bytes not yet hashed, hashed in large pieces: blake3 hashes a long input
/// several chunks at a time (SIMD), and a few bytes per update one chunk at a time, which
/// made hashing the trace a twentieth of a run's instructions. The hash is the same
/// however the input is split.
#[derive(Default)]
struct Trace {
    hasher: blake3::Hasher,
    pending: Vec<u8>,
}

/// Trace bytes buffered before they are hashed.
const TRACE_PENDING_BYTES_MAX: usize = 64 * 1024;

impl Trace {
    fn hash_pending(&mut self) {
        self.hasher.update(&self.pending);
        self.pending.clear();
    }
}

/// Everything shared by the simulated nodes.
pub struct World {
    pub executor: Executor,
    rng: Mutex<ChaCha8Rng>,
    network: Mutex<NetworkSettings>,
    handlers: Mutex<BTreeMap<NodeId, Arc<dyn InboundHandler>>>,
    /// Directed links that drop everything.
    cut_links: Mutex<BTreeSet<(NodeId, NodeId)>>,
    trace: Mutex<Trace>,
    events: AtomicU64,
    messages: AtomicU64,
    /// Requests sent and their encoded bytes, by kind (what the speed work looks at).
    message_mix: Mutex<BTreeMap<&'static str, MessageKindCount>>,
    /// Print every event as it is recorded (BDR_SIM_VERBOSE=1).
    verbose: bool,
}

impl World {
    pub fn new(seed: u64, start_ms: u64, network: NetworkSettings) -> Arc<World> {
        Arc::new(World {
            executor: Executor::new(start_ms),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
            network: Mutex::new(network),
            handlers: Mutex::new(BTreeMap::new()),
            cut_links: Mutex::new(BTreeSet::new()),
            trace: Mutex::new(Trace::default()),
            events: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            message_mix: Mutex::new(BTreeMap::new()),
            verbose: std::env::var("BDR_SIM_VERBOSE").is_ok_and(|value| value == "1"),
        })
    }

    /// Appends an event to the trace (its hash is the run's fingerprint).
    pub fn record(&self, parts: &[&[u8]]) {
        if self.verbose {
            let text: Vec<String> = parts
                .iter()
                .map(|part| match std::str::from_utf8(part) {
                    Ok(text) if part.len() != 32 => text.to_string(),
                    _ if part.len() == 32 => format!("n{}", part[0]),
                    _ => hex::encode(part),
                })
                .collect();
            eprintln!("{:>9} {}", self.executor.now_ms() % 10_000_000, text.join(" "));
        }
        let mut trace = self.trace.lock().expect("not poisoned");
        trace.pending.extend_from_slice(&self.executor.now_ms().to_le_bytes());
        for part in parts {
            trace.pending.extend_from_slice(&(part.len() as u32).to_le_bytes());
            trace.pending.extend_from_slice(part);
        }
        if trace.pending.len() >= TRACE_PENDING_BYTES_MAX {
            trace.hash_pending();
        }
        self.events.fetch_add(1, Ordering::Relaxed);
    }

    pub fn trace_hash(&self) -> String {
        let mut trace = self.trace.lock().expect("not poisoned");
        trace.hash_pending();
        trace.hasher.finalize().to_hex().to_string()
    }

    pub fn event_count(&self) -> u64 {
        self.events.load(Ordering::Relaxed)
    }

    pub fn message_count(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }

    /// Requests sent so far and their encoded bytes, by kind.
    pub fn message_mix(&self) -> BTreeMap<&'static str, MessageKindCount> {
        self.message_mix.lock().expect("not poisoned").clone()
    }

    fn count_message(&self, kind: &'static str, request_bytes: usize) {
        let mut mix = self.message_mix.lock().expect("not poisoned");
        let count = mix.entry(kind).or_default();
        count.requests += 1;
        count.request_bytes += request_bytes as u64;
    }

    pub fn random_below(&self, bound: u64) -> u64 {
        if bound == 0 {
            return 0;
        }
        self.rng.lock().expect("not poisoned").random_range(0..bound)
    }

    pub fn chance_per_mille(&self, per_mille: u32) -> bool {
        per_mille > 0 && self.random_below(1000) < u64::from(per_mille)
    }

    pub fn set_network(&self, network: NetworkSettings) {
        *self.network.lock().expect("not poisoned") = network;
    }

    pub fn register(&self, node: NodeId, handler: Arc<dyn InboundHandler>) {
        self.handlers.lock().expect("not poisoned").insert(node, handler);
    }

    pub fn unregister(&self, node: &NodeId) {
        self.handlers.lock().expect("not poisoned").remove(node);
    }

    pub fn is_up(&self, node: &NodeId) -> bool {
        self.handlers.lock().expect("not poisoned").contains_key(node)
    }

    pub fn cut(&self, from: NodeId, to: NodeId) {
        self.cut_links.lock().expect("not poisoned").insert((from, to));
    }

    pub fn heal_all_links(&self) {
        self.cut_links.lock().expect("not poisoned").clear();
    }

    fn link_works(&self, from: &NodeId, to: &NodeId) -> bool {
        self.is_up(from) && self.is_up(to) && !self.cut_links.lock().expect("not poisoned").contains(&(*from, *to))
    }

    /// Latency of one message, or None if it is lost.
    fn transit(&self, from: &NodeId, to: &NodeId) -> Option<u64> {
        let network = *self.network.lock().expect("not poisoned");
        if !self.link_works(from, to) || self.chance_per_mille(network.loss_per_mille) {
            return None;
        }
        Some(network.latency_ms_min + self.random_below(network.latency_ms_max - network.latency_ms_min + 1))
    }
}

fn request_kind(request: &Request) -> &'static str {
    match request {
        Request::Admit { .. } => "admit",
        Request::Gossip { .. } => "gossip",
        Request::PutShard { .. } => "put-shard",
        Request::GetShard { .. } => "get-shard",
        Request::DeleteShard { .. } => "delete-shard",
        Request::MetaMerge { .. } => "meta-merge",
        Request::MetaGet { .. } => "meta-get",
        Request::MetaScan { .. } => "meta-scan",
        Request::MetaDigest { .. } => "meta-digest",
        Request::MetaPartitionRoots { .. } => "meta-roots",
        Request::MetaBucketRows { .. } => "meta-bucket-rows",
        Request::HasShards { .. } => "has-shards",
        Request::MaintenanceReport => "maintenance-report",
        Request::MaintenanceControl { .. } => "maintenance-control",
    }
}

type Trees = BTreeMap<Tree, BTreeMap<Vec<u8>, Vec<u8>>>;

/// A metadata store that loses unflushed writes on a crash, like a real disk cache.
/// Flushing copies only the rows written since the last flush.
#[derive(Default)]
pub struct CrashableMetaStore {
    current: Mutex<Trees>,
    durable: Mutex<Trees>,
    dirty: Mutex<BTreeSet<(Tree, Vec<u8>)>>,
}

impl CrashableMetaStore {
    /// Forgets everything written since the last flush.
    pub fn crash(&self) {
        let dirty = std::mem::take(&mut *self.dirty.lock().expect("not poisoned"));
        let durable = self.durable.lock().expect("not poisoned");
        let mut current = self.current.lock().expect("not poisoned");
        for (tree, key) in dirty {
            match durable.get(&tree).and_then(|rows| rows.get(&key)) {
                Some(value) => {
                    current.entry(tree).or_default().insert(key, value.clone());
                }
                None => {
                    if let Some(rows) = current.get_mut(&tree) {
                        rows.remove(&key);
                    }
                }
            }
        }
    }

    fn mark_dirty(&self, tree: Tree, key: &[u8]) {
        self.dirty.lock().expect("not poisoned").insert((tree, key.to_vec()));
    }
}

impl MetaStore for CrashableMetaStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .current
            .lock()
            .expect("not poisoned")
            .get(&tree)
            .and_then(|rows| rows.get(key))
            .cloned())
    }

    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.mark_dirty(tree, key);
        self.current
            .lock()
            .expect("not poisoned")
            .entry(tree)
            .or_default()
            .insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn delete(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        self.mark_dirty(tree, key);
        if let Some(rows) = self.current.lock().expect("not poisoned").get_mut(&tree) {
            rows.remove(key);
        }
        Ok(())
    }

    fn scan(&self, tree: Tree, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let current = self.current.lock().expect("not poisoned");
        Ok(current
            .get(&tree)
            .map(|rows| scan_ordered(rows, prefix, after, limit))
            .unwrap_or_default())
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        let dirty = std::mem::take(&mut *self.dirty.lock().expect("not poisoned"));
        let current = self.current.lock().expect("not poisoned");
        let mut durable = self.durable.lock().expect("not poisoned");
        for (tree, key) in dirty {
            match current.get(&tree).and_then(|rows| rows.get(&key)) {
                Some(value) => {
                    durable.entry(tree).or_default().insert(key, value.clone());
                }
                None => {
                    if let Some(rows) = durable.get_mut(&tree) {
                        rows.remove(&key);
                    }
                }
            }
        }
        Box::pin(std::future::ready(Ok(())))
    }
}

/// One simulated node's environment. Survives crashes (it is the node's disk and clock);
/// the node's tasks and in-memory state do not.
pub struct SimEnv {
    pub id: NodeId,
    pub world: Arc<World>,
    pub shards: Arc<FaultyShardStore>,
    pub meta: Arc<CrashableMetaStore>,
    pub clock_skew_ms: AtomicI64,
    rng: Mutex<ChaCha8Rng>,
}

impl SimEnv {
    pub fn new(id: NodeId, world: Arc<World>, seed: u64, capacity_bytes: u64, atlas: Arc<FaultAtlas>) -> SimEnv {
        SimEnv {
            id,
            shards: Arc::new(FaultyShardStore::new(id, capacity_bytes, atlas, world.executor.clone())),
            world,
            meta: Arc::new(CrashableMetaStore::default()),
            clock_skew_ms: AtomicI64::new(0),
            rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)),
        }
    }
}

impl Env for SimEnv {
    fn node_id(&self) -> NodeId {
        self.id
    }

    fn now_ms(&self) -> u64 {
        let now = self.world.executor.now_ms() as i64 + self.clock_skew_ms.load(Ordering::Relaxed);
        now.max(0) as u64
    }

    fn sleep(&self, duration_ms: u64) -> BoxFuture<'static, ()> {
        Box::pin(self.world.executor.sleep(duration_ms))
    }

    fn spawn(&self, _name: &'static str, task: BoxFuture<'static, ()>) {
        self.world.executor.spawn(Some(self.id), task);
    }

    fn random_u64(&self) -> u64 {
        self.rng.lock().expect("not poisoned").next_u64()
    }

    fn request(
        &self,
        to: NodeId,
        request: Request,
        timeout_ms: u64,
    ) -> BoxFuture<'static, Result<Response, NetworkError>> {
        let world = Arc::clone(&self.world);
        let from = self.id;
        Box::pin(async move {
            world.messages.fetch_add(1, Ordering::Relaxed);
            world.record(&[
                b"send",
                from.as_bytes(),
                to.as_bytes(),
                request_kind(&request).as_bytes(),
            ]);
            // Through the real encoding: size bounds and version checks apply.
            let encoded = match wire::encode_request(&request) {
                Ok(encoded) => encoded,
                Err(error) => return Err(NetworkError::Failed(to.short(), error.to_string())),
            };
            world.count_message(request_kind(&request), encoded.len());
            let (sender, receiver) = futures::channel::oneshot::channel::<Response>();
            if let Some(latency_ms) = world.transit(&from, &to) {
                let world_inner = Arc::clone(&world);
                // The handler runs as the receiving node's task: if it crashes, the work dies.
                world.executor.spawn(
                    Some(to),
                    Box::pin(async move {
                        world_inner.executor.sleep(latency_ms).await;
                        let handler = world_inner.handlers.lock().expect("not poisoned").get(&to).cloned();
                        let Some(handler) = handler else { return };
                        // Decoded as the network decodes: shards share the frame's buffer.
                        let Ok(request) = wire::decode_request_shared(&bytes::Bytes::from(encoded)) else {
                            return;
                        };
                        world_inner.record(&[
                            b"deliver",
                            from.as_bytes(),
                            to.as_bytes(),
                            request_kind(&request).as_bytes(),
                        ]);
                        let response = handler.handle(from, request).await;
                        let Some(back_ms) = world_inner.transit(&to, &from) else {
                            world_inner.record(&[b"answer-lost", from.as_bytes(), to.as_bytes()]);
                            return;
                        };
                        world_inner.executor.sleep(back_ms).await;
                        if let Ok(bytes) = wire::encode_response(&response) {
                            if let Ok(response) = wire::decode_response_shared(&bytes::Bytes::from(bytes)) {
                                let _ = sender.send(response);
                            }
                        }
                    }),
                );
            } else {
                world.record(&[b"lost", from.as_bytes(), to.as_bytes()]);
            }
            let timeout = world.executor.sleep(timeout_ms);
            match futures::future::select(receiver, timeout).await {
                futures::future::Either::Left((Ok(response), _)) => Ok(response),
                futures::future::Either::Left((Err(_), _)) => {
                    Err(NetworkError::Unreachable(to.short(), "connection lost".into()))
                }
                futures::future::Either::Right(_) => Err(NetworkError::Timeout(to.short())),
            }
        })
    }

    fn remember_addresses(&self, _node: NodeId, _addresses: &[String]) {}

    fn local_addresses(&self) -> Vec<String> {
        Vec::new()
    }

    fn shard_store(&self) -> Arc<dyn ShardStore> {
        self.shards.clone()
    }

    fn meta_store(&self) -> Arc<dyn MetaStore> {
        self.meta.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_loses_exactly_the_unflushed_writes() {
        let store = CrashableMetaStore::default();
        store.put(Tree::System, b"a", b"1").unwrap();
        store.put(Tree::System, b"b", b"1").unwrap();
        futures::executor::block_on(store.flush()).unwrap();
        store.put(Tree::System, b"a", b"2").unwrap();
        store.delete(Tree::System, b"b").unwrap();
        store.put(Tree::System, b"c", b"new").unwrap();
        assert_eq!(store.get(Tree::System, b"a").unwrap().as_deref(), Some(b"2".as_slice()));
        store.crash();
        assert_eq!(store.get(Tree::System, b"a").unwrap().as_deref(), Some(b"1".as_slice()));
        assert_eq!(store.get(Tree::System, b"b").unwrap().as_deref(), Some(b"1".as_slice()));
        assert_eq!(store.get(Tree::System, b"c").unwrap(), None);
    }
}
