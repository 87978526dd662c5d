//! Cluster logic: everything a node decides, written against [`Env`] only.
//!
//! This module must stay free of tokio, libp2p, files, sled and wall-clock reads: the
//! simulator runs it with virtual time and in-memory stores, and its determinism depends
//! on every decision coming from `Env` (time, randomness, messages) in a fixed order.

pub mod anti_entropy;
pub mod data;
pub mod handover;
pub mod maintenance;
pub mod membership;
pub mod metadata;
pub mod versions;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bdr_protocol::ids::{NodeId, ZoneName};
use bdr_protocol::layout::{Layout, LayoutError, NodeSpec, NodeStatus};
use bdr_protocol::wire::{GossipLayout, PeerHeartbeat, RemoteErrorKind, Request, Response};
use serde::{Deserialize, Serialize};

use crate::env::{BoxFuture, Env, InboundHandler, StoreError, Tree};
use maintenance::{MaintenanceConfig, MaintenanceState};
use membership::{Liveness, Membership, MembershipConfig};

const LAYOUT_KEY: &[u8] = b"layout";
const GENERATION_KEY: &[u8] = b"generation";
const HANDOVER_KEY: &[u8] = b"handover";
/// Locks guarding local metadata rows, each row hashed to one: enough that unrelated
/// rows seldom wait on each other, few enough to keep in every node.
const ROW_LOCK_STRIPES: usize = 64;

/// Node-local records in the system tree, versioned like every persisted record.
#[derive(Serialize, Deserialize)]
enum SystemRecord {
    LayoutV1(Layout),
    GenerationV1(u64),
    HandoverV1 {
        layout_digest: [u8; 32],
        ready_partitions: Vec<u32>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("metadata store: {0}")]
    Store(#[from] StoreError),
    #[error("system record {0:?} is corrupt: {1}")]
    CorruptSystemRecord(&'static str, String),
    #[error("layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("no node {0} in the layout")]
    UnknownNode(String),
}

/// One node in `bdr-node admin status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatusView {
    pub id: String,
    pub zone: String,
    pub state: Liveness,
    /// The operator's intent: active, draining or removed.
    pub status: String,
    pub roles: Vec<String>,
    pub capacity_bytes: u64,
    /// As last announced by the node; absent until we have heard from it.
    pub used_bytes: Option<u64>,
    /// Whether the node announced a complete copy of the metadata partitions it
    /// replicates under this node's layout (false while a layout change is handed over).
    pub metadata_synced: bool,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub node_id: String,
    pub zone: String,
    pub layout_version: u64,
    pub nodes: Vec<NodeStatusView>,
    /// Stripes by health, repair and scrub progress, summed over every live node (filled
    /// by the admin API, which asks them; absent in a node's local view).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<maintenance::MaintenanceSummary>,
}

/// One layout entry in `bdr-node admin layout show`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutEntryView {
    pub id: String,
    pub zone: String,
    pub capacity_bytes: u64,
    pub roles: Vec<String>,
    pub status: String,
    pub revision: u64,
}

/// `GET /v1/layout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutView {
    pub version: u64,
    pub digest: String,
    pub nodes: Vec<LayoutEntryView>,
}

fn roles_of(roles: bdr_protocol::layout::NodeRoles) -> Vec<String> {
    let mut names = Vec::new();
    if roles.storage {
        names.push("storage".to_string());
    }
    if roles.gateway {
        names.push("gateway".to_string());
    }
    names
}

fn status_name(status: NodeStatus) -> &'static str {
    match status {
        NodeStatus::Active => "active",
        NodeStatus::Draining => "draining",
        NodeStatus::Removed => "removed",
    }
}

pub struct ClusterNode<E: Env> {
    env: Arc<E>,
    membership: Mutex<Membership>,
    zone: ZoneName,
    /// Present on gateway nodes only: storage-only nodes never hold data keys.
    data_keys: Option<data::DataKeys>,
    /// Whether this node has exchanged gossip with a peer since it started. Until then
    /// its layout may be stale (a restart) and it coordinates no metadata or data
    /// operation: a node that believed itself alone would serve from itself only.
    joined: AtomicBool,
    /// Anti-entropy digests of metadata partitions, updated by every local change of a
    /// metadata row (`merge_local`, tombstone collection, dropping a former partition).
    digest_cache: Mutex<anti_entropy::DigestCache>,
    /// Anti-entropy agreements and tombstone collection times (see
    /// [`anti_entropy::ExchangeMemory`]).
    exchange_memory: Mutex<anti_entropy::ExchangeMemory>,
    /// See [`ClusterNode::row_lock`].
    row_locks: Vec<Mutex<()>>,
    /// Which metadata partitions this node holds completely under which layout.
    handover: Mutex<handover::HandoverState>,
    maintenance_config: MaintenanceConfig,
    maintenance: Mutex<MaintenanceState>,
    /// One repair pass, one tidy pass and one scrub pass at a time per node (the loops
    /// and an operator's or test's explicit call may overlap).
    maintenance_passes: maintenance::PassLocks,
    /// Bucket records and access keys recently read for S3 requests (see
    /// [`data::REQUEST_CACHE_TTL_MS`]).
    request_cache: Mutex<data::RequestCache>,
    partition_replicas_cache: Mutex<metadata::PartitionReplicasCache>,
    /// How long metadata reads from each replica took lately (see
    /// [`metadata::ReplicaRoundTrips`]): reads ask the quickest replicas first.
    replica_round_trips: Mutex<metadata::ReplicaRoundTrips>,
    /// See [`ClusterNode::set_part_bytes_min`].
    part_bytes_min: AtomicU64,
    /// This node's bucket creations and deletions in progress: intent slot -> the
    /// partition its row is in (see [`data::BucketIntent`]).
    bucket_intent_slots: Mutex<BTreeMap<u32, Vec<u8>>>,
    /// Drawn at start, in every intent row's key: rows of an earlier run of this node
    /// are told apart, and no write still in flight from before a restart (stamped by a
    /// clock that may have run ahead of this run's) lands on a row of this run.
    bucket_intent_incarnation: u64,
}

fn load_system_record(env: &impl Env, key: &'static [u8]) -> Result<Option<SystemRecord>, ClusterError> {
    let Some(bytes) = env.meta_store().get(Tree::System, key)? else {
        return Ok(None);
    };
    let name = match key {
        LAYOUT_KEY => "layout",
        GENERATION_KEY => "generation",
        _ => "handover",
    };
    postcard::from_bytes(&bytes)
        .map(Some)
        .map_err(|error| ClusterError::CorruptSystemRecord(name, error.to_string()))
}

fn save_system_record(env: &impl Env, key: &[u8], record: &SystemRecord) -> Result<(), ClusterError> {
    let bytes = postcard::to_allocvec(record).expect("system records encode");
    env.meta_store().put(Tree::System, key, &bytes)?;
    Ok(())
}

impl<E: Env> ClusterNode<E> {
    /// Restores persisted state, joins with `own_spec` and starts gossiping.
    pub async fn start(
        env: Arc<E>,
        config: MembershipConfig,
        maintenance_config: MaintenanceConfig,
        own_spec: NodeSpec,
        data_keys: Option<data::DataKeys>,
    ) -> Result<Arc<Self>, ClusterError> {
        let layout = match load_system_record(env.as_ref(), LAYOUT_KEY)? {
            Some(SystemRecord::LayoutV1(layout)) => layout,
            Some(_) => return Err(ClusterError::CorruptSystemRecord("layout", "wrong record kind".into())),
            None => Layout::new(),
        };
        let previous_generation = match load_system_record(env.as_ref(), GENERATION_KEY)? {
            Some(SystemRecord::GenerationV1(generation)) => generation,
            Some(_) => {
                return Err(ClusterError::CorruptSystemRecord(
                    "generation",
                    "wrong record kind".into(),
                ))
            }
            None => 0,
        };
        // Wall time keeps generations growing even if the record was lost with a disk;
        // the persisted one keeps them growing if the clock went back.
        let now_ms = env.now_ms();
        let generation = (previous_generation + 1).max(now_ms);
        save_system_record(env.as_ref(), GENERATION_KEY, &SystemRecord::GenerationV1(generation))?;

        let handover_state = match load_system_record(env.as_ref(), HANDOVER_KEY)? {
            Some(SystemRecord::HandoverV1 {
                layout_digest,
                ready_partitions,
            }) => handover::HandoverState::restored(layout_digest, ready_partitions.into_iter().collect()),
            Some(_) => {
                return Err(ClusterError::CorruptSystemRecord(
                    "handover",
                    "wrong record kind".into(),
                ))
            }
            None => handover::HandoverState::default(),
        };
        let zone = own_spec.zone.clone();
        let membership = Membership::new(env.node_id(), config, layout, own_spec, generation, now_ms)?;
        save_system_record(
            env.as_ref(),
            LAYOUT_KEY,
            &SystemRecord::LayoutV1(membership.layout().clone()),
        )?;
        env.meta_store().flush().await?;
        // A node that knows of no other node is a one-node cluster and may serve at once;
        // one that knows others must hear from one first (see `joined`).
        let alone = membership.layout().len() == 1;
        let node = Arc::new(ClusterNode {
            env: Arc::clone(&env),
            membership: Mutex::new(membership),
            zone,
            data_keys,
            joined: AtomicBool::new(alone),
            digest_cache: Mutex::new(anti_entropy::DigestCache::default()),
            exchange_memory: Mutex::new(anti_entropy::ExchangeMemory::default()),
            row_locks: (0..ROW_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            request_cache: Mutex::new(data::RequestCache::default()),
            partition_replicas_cache: Mutex::new(metadata::PartitionReplicasCache::default()),
            replica_round_trips: Mutex::new(metadata::ReplicaRoundTrips::default()),
            handover: Mutex::new(handover_state),
            maintenance_config,
            maintenance: Mutex::new(MaintenanceState::default()),
            maintenance_passes: maintenance::PassLocks::default(),
            part_bytes_min: AtomicU64::new(data::PART_BYTES_MIN),
            bucket_intent_slots: Mutex::new(BTreeMap::new()),
            bucket_intent_incarnation: env.random_u64(),
        });
        node.restore_maintenance_state();
        let gossiping = Arc::clone(&node);
        env.spawn("gossip", Box::pin(async move { gossiping.gossip_loop().await }));
        let syncing = Arc::clone(&node);
        env.spawn(
            "anti-entropy",
            Box::pin(async move { syncing.anti_entropy_loop().await }),
        );
        let handing_over = Arc::clone(&node);
        env.spawn("handover", Box::pin(async move { handing_over.handover_loop().await }));
        let repairing = Arc::clone(&node);
        env.spawn("repair", Box::pin(async move { repairing.repair_loop().await }));
        let scrubbing = Arc::clone(&node);
        env.spawn("scrub", Box::pin(async move { scrubbing.scrub_loop().await }));
        let tidying = Arc::clone(&node);
        env.spawn("tidy", Box::pin(async move { tidying.tidy_loop().await }));
        Ok(node)
    }

    pub fn env(&self) -> &Arc<E> {
        &self.env
    }

    pub(crate) fn membership_config(&self) -> MembershipConfig {
        self.membership.lock().expect("not poisoned").config()
    }

    pub(crate) async fn persist_handover_state(&self, state: handover::HandoverState) -> Result<(), ClusterError> {
        let record = SystemRecord::HandoverV1 {
            layout_digest: state.layout_digest,
            ready_partitions: state.ready_partitions.into_iter().collect(),
        };
        save_system_record(self.env.as_ref(), HANDOVER_KEY, &record)?;
        self.env.meta_store().flush().await?;
        Ok(())
    }

    fn gossip_timeout_ms(&self) -> u64 {
        let config = self.membership_config();
        (config.gossip_interval_ms * 4).min(config.down_after_ms / 2).max(500)
    }

    async fn gossip_loop(self: Arc<Self>) {
        let interval_ms = self.membership_config().gossip_interval_ms;
        loop {
            self.gossip_round().await;
            self.env.sleep(interval_ms).await;
        }
    }

    /// One round: bump our heartbeat and exchange state with a few peers in parallel.
    pub async fn gossip_round(&self) {
        let used_bytes = self.env.shard_store().usage().used_bytes;
        let addresses = self.env.local_addresses();
        let now_ms = self.env.now_ms();
        let payloads: Vec<(NodeId, GossipLayout, Vec<PeerHeartbeat>)> = {
            let mut membership = self.membership.lock().expect("not poisoned");
            membership.beat(used_bytes, addresses);
            let targets = membership.gossip_targets(now_ms, || self.env.random_u64());
            targets
                .into_iter()
                .map(|target| {
                    let (layout, heartbeats) = membership.gossip_payload_for(&target);
                    (target, layout, heartbeats)
                })
                .collect()
        };
        let exchanges = payloads
            .into_iter()
            .map(|(target, layout, heartbeats)| self.exchange(target, layout, heartbeats));
        futures::future::join_all(exchanges).await;
    }

    pub(crate) async fn exchange(&self, target: NodeId, layout: GossipLayout, heartbeats: Vec<PeerHeartbeat>) {
        let request = Request::Gossip { layout, heartbeats };
        match self.env.request(target, request, self.gossip_timeout_ms()).await {
            Ok(Response::Gossip { layout, heartbeats }) => {
                self.absorb(&layout, &heartbeats);
                self.mark_joined();
            }
            Ok(other) => tracing::warn!(peer = %target.short(), ?other, "unexpected answer to gossip"),
            Err(error) => tracing::debug!(peer = %target.short(), %error, "gossip failed"),
        }
    }

    fn absorb(&self, layout: &GossipLayout, heartbeats: &[PeerHeartbeat]) {
        let now_ms = self.env.now_ms();
        let (changed, advanced, layout) = {
            let mut membership = self.membership.lock().expect("not poisoned");
            let (changed, advanced) = membership.absorb_gossip(layout, heartbeats, now_ms);
            (changed, advanced, changed.then(|| membership.layout().clone()))
        };
        for heartbeat in &advanced {
            self.env.remember_addresses(heartbeat.node, &heartbeat.addresses);
        }
        if let Some(layout) = layout {
            debug_assert!(changed);
            self.persist_layout(layout);
        }
    }

    fn persist_layout(&self, layout: Layout) {
        tracing::info!(version = layout.version(), nodes = layout.len(), "layout changed");
        if let Err(error) = save_system_record(self.env.as_ref(), LAYOUT_KEY, &SystemRecord::LayoutV1(layout)) {
            tracing::error!(%error, "cannot persist the layout");
        }
        // A restart must find the layout it had: flush in the background.
        let store = self.env.meta_store();
        self.env.spawn(
            "flush-layout",
            Box::pin(async move {
                if let Err(error) = store.flush().await {
                    tracing::error!(%error, "cannot flush the layout");
                }
            }),
        );
    }

    /// The layout as this node knows it.
    pub fn layout_view(&self) -> LayoutView {
        let layout = self.layout();
        LayoutView {
            version: layout.version(),
            digest: hex::encode(layout.digest()),
            nodes: layout
                .entries()
                .map(|entry| LayoutEntryView {
                    id: entry.node.to_string(),
                    zone: entry.zone.to_string(),
                    capacity_bytes: entry.capacity_bytes,
                    roles: roles_of(entry.roles),
                    status: status_name(entry.status).to_string(),
                    revision: entry.revision,
                })
                .collect(),
        }
    }

    /// The node whose hex id is `text` or starts with it (at least 8 characters, so
    /// operators can paste the short ids that tables show).
    pub fn resolve_node(&self, text: &str) -> Result<NodeId, ClusterError> {
        let text = text.trim().to_ascii_lowercase();
        if text.len() < 8 {
            return Err(ClusterError::UnknownNode(format!(
                "{text:?} (give at least 8 hex characters)"
            )));
        }
        let matches: Vec<NodeId> = self
            .layout()
            .entries()
            .map(|entry| entry.node)
            .filter(|node| node.to_string().starts_with(&text))
            .collect();
        match matches.as_slice() {
            [node] => Ok(*node),
            [] => Err(ClusterError::UnknownNode(text)),
            _ => Err(ClusterError::UnknownNode(format!(
                "{text} (ambiguous: give more characters)"
            ))),
        }
    }

    /// Sets a node's status (an operator's drain or removal) and spreads the new layout.
    pub async fn set_node_status(&self, node: NodeId, status: NodeStatus) -> Result<(), ClusterError> {
        let layout = {
            let now_ms = self.env.now_ms();
            let mut membership = self.membership.lock().expect("not poisoned");
            if membership.layout().get(&node).is_none() {
                return Err(ClusterError::UnknownNode(node.to_string()));
            }
            membership
                .set_status(node, status, now_ms)?
                .then(|| membership.layout().clone())
        };
        if let Some(layout) = layout {
            self.persist_layout(layout);
            self.gossip_round().await;
        }
        Ok(())
    }

    /// Answers a request from an admitted peer.
    pub async fn handle_request(&self, from: NodeId, request: Request) -> Response {
        match request {
            Request::Gossip { layout, heartbeats } => {
                self.absorb(&layout, &heartbeats);
                self.mark_joined();
                let (layout, heartbeats) = self
                    .membership
                    .lock()
                    .expect("not poisoned")
                    .gossip_answer(&layout.digest, &heartbeats);
                Response::Gossip { layout, heartbeats }
            }
            Request::Admit { .. } => Response::error(RemoteErrorKind::BadRequest, "admission is the network's job"),
            request @ Request::MetaMerge { .. } => {
                if let Some(refusal) = self.refuse_meta_request(&request) {
                    return refusal;
                }
                let Request::MetaMerge { table, key, value, .. } = request else {
                    unreachable!("matched above")
                };
                match self.apply_meta_merge(table, &key, &value).await {
                    Ok(()) => Response::MetaMerged,
                    Err(error) => {
                        tracing::warn!(peer = %from.short(), %error, "refused a metadata write");
                        Response::error(RemoteErrorKind::BadRequest, error.to_string())
                    }
                }
            }
            request @ (Request::MetaGet { .. } | Request::MetaScan { .. }) => self.serve_meta_read(&request),
            request @ (Request::MetaDigest { .. }
            | Request::MetaBucketRows { .. }
            | Request::MetaPartitionRoots { .. }) => self.serve_anti_entropy(from, &request),
            request @ (Request::PutShard { .. } | Request::GetShard { .. } | Request::DeleteShard { .. }) => {
                self.serve_shard_request(request).await
            }
            Request::HasShards { keys } => self.serve_has_shards(keys).await,
            Request::MaintenanceReport => Response::Maintenance(self.maintenance_report()),
            Request::MaintenanceControl { command } => Response::Maintenance(self.control_maintenance(command)),
        }
    }

    fn mark_joined(&self) {
        if !self.joined.swap(true, Ordering::Relaxed) {
            tracing::info!("joined the cluster");
        }
    }

    /// Whether this node has heard from the cluster since it started.
    pub fn is_joined(&self) -> bool {
        self.joined.load(Ordering::Relaxed)
    }

    /// The layout as of now, shared (see [`Membership::shared_layout`]).
    /// The lock of a local metadata row: held while the row is read, changed and written
    /// back, and while the digest of its partition is brought up to date.
    fn row_lock(&self, key: &[u8]) -> std::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut hasher);
        let stripe = (hasher.finish() % ROW_LOCK_STRIPES as u64) as usize;
        self.row_locks[stripe].lock().expect("not poisoned")
    }

    pub fn layout(&self) -> Arc<Layout> {
        self.membership.lock().expect("not poisoned").shared_layout()
    }

    pub fn layout_digest(&self) -> [u8; 32] {
        self.membership.lock().expect("not poisoned").layout_digest()
    }

    pub fn liveness(&self, node: &NodeId) -> Liveness {
        self.membership
            .lock()
            .expect("not poisoned")
            .liveness(node, self.env.now_ms())
    }

    pub fn status(&self) -> ClusterStatus {
        let now_ms = self.env.now_ms();
        let membership = self.membership.lock().expect("not poisoned");
        let layout = membership.layout();
        let nodes = layout
            .entries()
            .map(|entry| NodeStatusView {
                id: entry.node.to_string(),
                zone: entry.zone.to_string(),
                state: membership.liveness(&entry.node, now_ms),
                status: status_name(entry.status).to_string(),
                roles: roles_of(entry.roles),
                capacity_bytes: entry.capacity_bytes,
                used_bytes: membership.used_bytes(&entry.node),
                metadata_synced: membership.metadata_synced_digest(&entry.node) == Some(membership.layout_digest()),
            })
            .collect();
        ClusterStatus {
            node_id: membership.me().to_string(),
            zone: self.zone.to_string(),
            layout_version: layout.version(),
            nodes,
            maintenance: None,
        }
    }
}

/// Binds a [`ClusterNode`] to the network's inbound side.
pub struct ClusterInbound<E: Env>(pub Arc<ClusterNode<E>>);

impl<E: Env> InboundHandler for ClusterInbound<E> {
    fn handle(&self, from: NodeId, request: Request) -> BoxFuture<'static, Response> {
        let node = Arc::clone(&self.0);
        Box::pin(async move { node.handle_request(from, request).await })
    }

    fn peer_admitted(&self, peer: NodeId) {
        // Gossip with a newly admitted peer at once: a joining node learns the cluster in
        // one round trip instead of waiting for someone to pick it at random.
        let node = Arc::clone(&self.0);
        self.0.env.spawn(
            "gossip-on-admit",
            Box::pin(async move {
                let (layout, heartbeats) = node.membership.lock().expect("not poisoned").gossip_payload_for(&peer);
                node.exchange(peer, layout, heartbeats).await;
            }),
        );
    }
}
