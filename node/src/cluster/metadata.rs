//! Replicated metadata: quorum writes and reads of LWW registers over 3 replicas.
//!
//! A row's partition (a hash of its partition key, e.g. the bucket name) is placed like a
//! stripe with k=1, m=2, so its 3 replicas sit in distinct zones whenever the cluster has
//! 3 zones. Writes read first (a quorum), then write with a hybrid timestamp above what
//! they read, so a later acknowledged write wins even when writers' clocks disagree by
//! minutes. Reads merge a quorum of answers and repair stale replicas in the background.
//! A replica merges every incoming value with what it holds (never blind overwrite) and
//! flushes before acknowledging.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use bdr_protocol::hlc::HlcTimestamp;
use bdr_protocol::ids::NodeId;
use bdr_protocol::layout::Layout;
use bdr_protocol::placement::place;
use bdr_protocol::records::{
    decode_stored_value, encode_stored_value, stored_value_is_current, Lww, Record, RecordDecodeError, RowKey,
    RowKeyError, METADATA_PARTITIONS,
};
use bdr_protocol::wire::{MetaRow, RemoteErrorKind, Request, Response, Table, SCAN_ROWS_MAX};
use futures::channel::mpsc;
use futures::StreamExt;

use super::membership::Liveness;
use super::ClusterNode;
use crate::env::{Env, StoreError, Tree};

/// Replicas per metadata partition.
pub const METADATA_REPLICAS: u8 = 3;
/// How long a coordinator waits for replicas before giving up on a quorum.
pub const METADATA_TIMEOUT_MS: u64 = 10_000;
/// How long a metadata read waits for the replicas it asked before it asks one more (a
/// read asks only as many as it needs). Far above a loopback or regional round trip,
/// far below [`METADATA_TIMEOUT_MS`].
pub const META_READ_HEDGE_AFTER_MS: u64 = 500;
/// Times a request refused for a layout mismatch is sent again after a gossip exchange
/// with the replica (one exchange makes both hold the merge of their layouts).
pub(crate) const LAYOUT_MISMATCH_RETRIES_MAX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("this node has not heard from the cluster since it started; try again shortly")]
    NotJoined,
    #[error("no storage node is available to hold metadata")]
    NoReplicas,
    #[error("metadata quorum not reached: {reached} of {needed} replicas answered ({errors})")]
    QuorumUnavailable {
        needed: usize,
        reached: usize,
        errors: String,
    },
    #[error("metadata row key: {0}")]
    RowKey(#[from] RowKeyError),
    #[error("metadata record is corrupt: {0}")]
    Corrupt(#[from] RecordDecodeError),
    #[error("local metadata store: {0}")]
    Store(#[from] StoreError),
}

/// One replica's answer to a read or scan: rows by encoded key.
type ReplicaRows = BTreeMap<Vec<u8>, Lww<Record>>;

/// How many replicas a metadata read waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplicasRead {
    /// A majority: sees every write acknowledged to a majority.
    Quorum,
    /// Every replica: also sees a write that reached only some (its writer failed or
    /// crashed mid-way), which anti-entropy would later spread to all. Garbage
    /// collection's last look uses it; an unreachable replica makes the read fail.
    All,
}

fn quorum_of(replica_count: usize) -> usize {
    replica_count / 2 + 1
}

/// One replica's answer to a quorum read, sent when the read task ends, with or without
/// an answer.
struct AnswerOnDrop {
    replica: NodeId,
    sender: Option<mpsc::UnboundedSender<(NodeId, Result<ReplicaRows, String>)>>,
}

impl AnswerOnDrop {
    fn send(mut self, answer: Result<ReplicaRows, String>) {
        if let Some(sender) = self.sender.take() {
            let _ = sender.unbounded_send((self.replica, answer));
        }
    }
}

impl Drop for AnswerOnDrop {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            let error = format!("{}: the read ended without an answer", self.replica.short());
            let _ = sender.unbounded_send((self.replica, Err(error)));
        }
    }
}

/// Recent round trips of metadata reads, by replica: a smoothed average (each new
/// sample weighs a quarter), so a read asks the nearest replicas first, as waiting for
/// the quickest two of all three did. At most one entry per node ever read from (the
/// layout bounds them); a node that left keeps its few bytes.
#[derive(Default)]
pub(crate) struct ReplicaRoundTrips {
    smoothed_ms: BTreeMap<NodeId, u64>,
}

impl ReplicaRoundTrips {
    fn record(&mut self, replica: NodeId, round_trip_ms: u64) {
        let smoothed = self.smoothed_ms.entry(replica).or_insert(round_trip_ms);
        *smoothed = (*smoothed * 3 + round_trip_ms) / 4;
    }

    /// A replica known to take at least `round_trip_ms` (silent that long): its estimate
    /// rises to that, without waiting for the answer that may never come.
    fn record_at_least(&mut self, replica: NodeId, round_trip_ms: u64) {
        let smoothed = self.smoothed_ms.entry(replica).or_insert(round_trip_ms);
        *smoothed = (*smoothed).max(round_trip_ms);
    }

    /// Unknown replicas count as quick, so each is tried and measured.
    fn estimate_ms(&self, replica: &NodeId) -> u64 {
        self.smoothed_ms.get(replica).copied().unwrap_or(0)
    }
}

/// The replicas of metadata partitions under the last layout asked about. Placement is
/// a pure function of the layout, and every repair tick and anti-entropy round asks for
/// all partitions: recomputing them was most of an idle node's CPU.
#[derive(Default)]
pub(crate) struct PartitionReplicasCache {
    /// The layout last asked about (usually the very allocation callers pass, so
    /// checking it is a pointer comparison) and its placements, shared with every node
    /// of this process under an equal layout.
    last: Option<(Arc<Layout>, Arc<PartitionTable>)>,
}

/// The placements of all metadata partitions under one layout, filled as asked. By
/// partition, a vector, not a map: every metadata operation and every repair pass (for
/// each of the 256 partitions) looks here. Unset: not computed yet; None: no placement
/// (too few nodes).
pub(crate) struct PartitionTable {
    layout: Arc<Layout>,
    placements: Vec<OnceLock<Option<Arc<PartitionPlacement>>>>,
}

/// Partition tables of the layouts this process's nodes used last, shared: placement is
/// a pure function of the layout, and a process running several nodes (`bdr-node dev`,
/// the simulator) would otherwise place all 256 partitions once per node, and again
/// after each restart (in the simulator, 8% of its instructions). A memo of a pure
/// function: what it returns never depends on which node filled it.
static SHARED_PARTITION_TABLES: Mutex<Vec<Arc<PartitionTable>>> = Mutex::new(Vec::new());
/// Layouts whose tables stay shared: enough for a layout change in progress in each of
/// a few simulations running at once.
const SHARED_PARTITION_TABLES_MAX: usize = 8;

fn shared_partition_table(layout: &Arc<Layout>) -> Arc<PartitionTable> {
    let mut tables = SHARED_PARTITION_TABLES.lock().expect("not poisoned");
    if let Some(position) = tables.iter().position(|table| *table.layout == **layout) {
        let table = tables.remove(position);
        tables.push(Arc::clone(&table));
        return table;
    }
    let table = Arc::new(PartitionTable {
        layout: Arc::clone(layout),
        placements: (0..METADATA_PARTITIONS).map(|_| OnceLock::new()).collect(),
    });
    if tables.len() >= SHARED_PARTITION_TABLES_MAX {
        tables.remove(0);
    }
    tables.push(Arc::clone(&table));
    table
}

fn place_partition(layout: &Layout, partition: u32) -> Option<Arc<PartitionPlacement>> {
    let placement = place(
        layout,
        &RowKey::partition_placement_id(partition),
        1,
        METADATA_REPLICAS - 1,
    )
    .ok()?;
    let mut seen = std::collections::BTreeSet::new();
    let replicas = placement
        .holders
        .iter()
        .copied()
        .filter(|node| seen.insert(*node))
        .collect();
    Some(Arc::new(PartitionPlacement {
        holders: placement.holders,
        replicas,
    }))
}

/// Where one metadata partition lives under one layout.
pub(crate) struct PartitionPlacement {
    /// The placement holders (a node may appear twice when zones are few).
    pub holders: Vec<NodeId>,
    /// The distinct holders, in placement order (the same on every node with the same
    /// layout).
    pub replicas: Vec<NodeId>,
}

impl<E: Env> ClusterNode<E> {
    /// The distinct replicas of the partition holding `partition_key`.
    pub fn metadata_replicas(&self, partition_key: &[u8]) -> Result<Vec<NodeId>, MetaError> {
        if !self.is_joined() {
            return Err(MetaError::NotJoined);
        }
        let placement = self.partition_replicas(&self.layout(), RowKey::partition_of(partition_key))?;
        Ok(placement.replicas.clone())
    }

    /// Where metadata partition `partition` lives under `layout`.
    pub(crate) fn partition_replicas(
        &self,
        layout: &Arc<Layout>,
        partition: u32,
    ) -> Result<Arc<PartitionPlacement>, MetaError> {
        self.partition_placement(layout, partition).ok_or(MetaError::NoReplicas)
    }

    /// Where metadata partition `partition` lives under `layout`, or None when there is
    /// no placement.
    pub(crate) fn partition_placement(&self, layout: &Arc<Layout>, partition: u32) -> Option<Arc<PartitionPlacement>> {
        if partition >= METADATA_PARTITIONS {
            return None;
        }
        let table = {
            let mut cache = self.partition_replicas_cache.lock().expect("not poisoned");
            match &mut cache.last {
                Some((cached, table)) if Arc::ptr_eq(cached, layout) => Arc::clone(table),
                Some((cached, table)) if *table.layout == **layout => {
                    // Keep the caller's allocation, so the next call with it takes the
                    // pointer check.
                    *cached = Arc::clone(layout);
                    Arc::clone(table)
                }
                last => {
                    let table = shared_partition_table(layout);
                    *last = Some((Arc::clone(layout), Arc::clone(&table)));
                    table
                }
            }
        };
        table.placements[partition as usize]
            .get_or_init(|| place_partition(&table.layout, partition))
            .clone()
    }

    /// Merges `value` into the local row; returns whether the row changed. Not durable
    /// until the store is flushed.
    pub(crate) fn merge_local(&self, table: Table, key: &[u8], value: &[u8]) -> Result<bool, MetaError> {
        RowKey::decode(key)?;
        let incoming: Lww<Record> = decode_stored_value(value)?;

        let store = self.env.meta_store();
        let tree = Tree::Table(table);
        // Read, merge and write as one step: two merges of the row interleaved between
        // read and write would lose one (the tokio runtime runs requests in parallel).
        let _row = self.row_lock(key);
        let existing = store.get(tree, key)?;
        let changed = match &existing {
            Some(existing) => {
                let mut merged: Lww<Record> = decode_stored_value(existing)?;
                // A row in an older format reads the same but hashes differently from
                // another replica's current bytes (anti-entropy digests hash the stored
                // bytes), so it would be pulled again every round: rewrite it when touched.
                let outdated = !stored_value_is_current(existing);
                (merged.merge(&incoming) || outdated).then_some(merged)
            }
            None => Some(incoming),
        };
        let Some(merged) = changed else {
            return Ok(false);
        };
        let stored_value = encode_stored_value(&merged);
        store.put(tree, key, &stored_value)?;
        self.digest_row_changed(table, key, existing.as_deref(), Some(&stored_value));
        Ok(true)
    }

    /// Replica side of a write: merges `value` into the local row and makes it durable.
    pub(crate) async fn apply_meta_merge(&self, table: Table, key: &[u8], value: &[u8]) -> Result<(), MetaError> {
        if self.merge_local(table, key, value)? {
            self.env.meta_store().flush().await?;
        }
        Ok(())
    }

    fn local_rows(&self, request: &Request) -> Result<ReplicaRows, MetaError> {
        let store = self.env.meta_store();
        let mut rows = ReplicaRows::new();
        match request {
            Request::MetaGet { table, key, .. } => {
                if let Some(bytes) = store.get(Tree::Table(*table), key)? {
                    rows.insert(key.clone(), decode_stored_value(&bytes)?);
                }
            }
            Request::MetaScan {
                table,
                prefix,
                after,
                limit,
                ..
            } => {
                let limit = (*limit).min(SCAN_ROWS_MAX) as usize;
                for (key, bytes) in store.scan(Tree::Table(*table), prefix, after.as_deref(), limit)? {
                    rows.insert(key, decode_stored_value(&bytes)?);
                }
            }
            _ => {}
        }
        Ok(rows)
    }

    /// Why this replica refuses a metadata request, if it does: the coordinator placed it
    /// under another layout, or (for reads) this replica has not yet pulled the partition
    /// it took over in a layout change.
    pub(crate) fn refuse_meta_request(&self, request: &Request) -> Option<Response> {
        let (layout_digest, encoded_key) = match request {
            Request::MetaMerge { layout_digest, .. } => (layout_digest, None),
            Request::MetaGet { layout_digest, key, .. } => (layout_digest, Some(key)),
            Request::MetaScan {
                layout_digest, prefix, ..
            } => (layout_digest, Some(prefix)),
            _ => return None,
        };
        if *layout_digest != self.layout_digest() {
            return Some(Response::error(
                RemoteErrorKind::LayoutMismatch,
                "this replica uses another layout; exchange gossip and retry",
            ));
        }
        let partition = encoded_key.map(|key| RowKey::partition_of_encoded(key))?;
        match partition {
            None => Some(Response::error(RemoteErrorKind::BadRequest, "malformed row key")),
            Some(partition) if !self.metadata_partition_ready(partition) => Some(Response::error(
                RemoteErrorKind::NotReady,
                format!("metadata partition {partition} is still being handed over to this replica"),
            )),
            Some(_) => None,
        }
    }

    /// Replica side of MetaGet / MetaScan.
    pub(crate) fn serve_meta_read(&self, request: &Request) -> Response {
        if let Some(refusal) = self.refuse_meta_request(request) {
            return refusal;
        }
        let rows = match self.local_rows(request) {
            Ok(rows) => rows,
            Err(error) => return Response::error(RemoteErrorKind::Internal, error.to_string()),
        };
        match request {
            Request::MetaGet { .. } => Response::MetaValue {
                value: rows.values().next().map(encode_stored_value),
            },
            _ => Response::MetaRows {
                rows: rows
                    .into_iter()
                    .map(|(key, value)| MetaRow {
                        key,
                        value: encode_stored_value(&value),
                    })
                    .collect(),
            },
        }
    }

    /// Sends a metadata request to `replica`. A replica on another layout refuses it;
    /// then the two exchange gossip (so both merge their layouts) and the request is
    /// sent once more, re-stamped with the merged layout.
    async fn request_replica(&self, replica: NodeId, mut request: Request) -> Result<Response, String> {
        for attempt in 0..=LAYOUT_MISMATCH_RETRIES_MAX {
            match self.env.request(replica, request.clone(), METADATA_TIMEOUT_MS).await {
                Ok(Response::Error {
                    kind: RemoteErrorKind::LayoutMismatch,
                    ..
                }) if attempt < LAYOUT_MISMATCH_RETRIES_MAX => {
                    let (layout, heartbeats) = self.membership.lock().expect("not poisoned").gossip_payload_whole();
                    self.exchange(replica, layout, heartbeats).await;
                    let digest = self.layout_digest();
                    match &mut request {
                        Request::MetaMerge { layout_digest, .. }
                        | Request::MetaGet { layout_digest, .. }
                        | Request::MetaScan { layout_digest, .. } => *layout_digest = digest,
                        _ => {}
                    }
                }
                Ok(response) => return Ok(response),
                Err(error) => return Err(error.to_string()),
            }
        }
        Err(format!("{}: uses another layout", replica.short()))
    }

    /// Sends `request` to one replica (or serves it locally) and returns its rows.
    async fn read_replica(self: Arc<Self>, replica: NodeId, request: Request) -> Result<ReplicaRows, String> {
        if replica == self.env.node_id() {
            if let Some(Response::Error { message, .. }) = self.refuse_meta_request(&request) {
                return Err(format!("{}: {message}", replica.short()));
            }
            return self.local_rows(&request).map_err(|error| error.to_string());
        }
        let key = match &request {
            Request::MetaGet { key, .. } => Some(key.clone()),
            _ => None,
        };
        let sent_at_ms = self.env.now_ms();
        let response = self.request_replica(replica, request).await;
        if response.is_ok() {
            let round_trip_ms = self.env.now_ms().saturating_sub(sent_at_ms);
            self.replica_round_trips
                .lock()
                .expect("not poisoned")
                .record(replica, round_trip_ms);
        }
        match response {
            Ok(Response::MetaValue { value }) => {
                let mut rows = ReplicaRows::new();
                if let (Some(key), Some(value)) = (key, value) {
                    rows.insert(key, decode_stored_value(&value).map_err(|error| error.to_string())?);
                }
                Ok(rows)
            }
            Ok(Response::MetaRows { rows }) => rows
                .into_iter()
                .map(|row| {
                    Ok((
                        row.key,
                        decode_stored_value(&row.value).map_err(|error| error.to_string())?,
                    ))
                })
                .collect(),
            Ok(Response::Error { message, .. }) => Err(format!("{}: {message}", replica.short())),
            Ok(other) => Err(format!("{}: unexpected answer {other:?}", replica.short())),
            Err(error) => Err(error),
        }
    }

    /// Asks a quorum of replicas (or all of them), more when some fail or are slow, waits
    /// for as many answers, merges them and repairs replicas that answered with stale or
    /// missing rows.
    async fn quorum_read(
        self: &Arc<Self>,
        partition_key: &[u8],
        request: Request,
        replicas_read: ReplicasRead,
    ) -> Result<ReplicaRows, MetaError> {
        let replicas = self.metadata_replicas(partition_key)?;
        let needed = match replicas_read {
            ReplicasRead::Quorum => quorum_of(replicas.len()),
            ReplicasRead::All => replicas.len(),
        };
        // A replica known to be down would only be waited for until the timeout.
        if replicas_read == ReplicasRead::All {
            let down = replicas
                .iter()
                .filter(|replica| **replica != self.env.node_id() && self.liveness(replica) == Liveness::Down)
                .count();
            if down > 0 {
                return Err(MetaError::QuorumUnavailable {
                    needed,
                    reached: replicas.len() - down,
                    errors: format!("{down} replicas are down"),
                });
            }
        }
        // Only as many replicas as the read needs are asked, the likeliest to answer
        // first; a failed one is replaced at once, and a slow one after
        // META_READ_HEDGE_AFTER_MS. Asking all three for two answers cost every read a
        // third replica's lookup, encoding and transport, which were thrown away.
        let mut unasked = self.replicas_in_read_order(replicas).into_iter();
        let (sender, mut answers) = mpsc::unbounded();
        let ask = |replica: NodeId| {
            let node = Arc::clone(self);
            // Answers even if the task ends without an answer (a panic): the read counts
            // the replicas in flight and would otherwise wait for one forever.
            let answer = AnswerOnDrop {
                replica,
                sender: Some(sender.clone()),
            };
            let request = request.clone();
            self.env.spawn(
                "meta-read",
                Box::pin(async move {
                    answer.send(node.read_replica(replica, request).await);
                }),
            );
        };
        let mut waiting_for: Vec<NodeId> = Vec::new();
        for replica in unasked.by_ref().take(needed) {
            ask(replica);
            waiting_for.push(replica);
        }
        let mut answered: Vec<(NodeId, ReplicaRows)> = Vec::new();
        let mut errors = Vec::new();
        while answered.len() < needed && !waiting_for.is_empty() {
            let next = answers.next();
            let hedge = self.env.sleep(META_READ_HEDGE_AFTER_MS);
            let answer = match futures::future::select(next, hedge).await {
                futures::future::Either::Left((answer, _)) => answer,
                futures::future::Either::Right(((), _)) => {
                    // Nothing came for a while: the replicas still silent count as at least
                    // this slow (one that hangs while gossip sees it up must not stay first
                    // and cost every read a hedge), and one more is asked, keeping the
                    // slow ones.
                    {
                        let mut round_trips = self.replica_round_trips.lock().expect("not poisoned");
                        for replica in &waiting_for {
                            round_trips.record_at_least(*replica, META_READ_HEDGE_AFTER_MS);
                        }
                    }
                    if let Some(replica) = unasked.next() {
                        ask(replica);
                        waiting_for.push(replica);
                    }
                    continue;
                }
            };
            let Some((replica, answer)) = answer else { break };
            waiting_for.retain(|waiting| *waiting != replica);
            match answer {
                Ok(rows) => answered.push((replica, rows)),
                Err(error) => {
                    errors.push(error);
                    if let Some(replica) = unasked.next() {
                        ask(replica);
                        waiting_for.push(replica);
                    }
                }
            }
        }
        if answered.len() < needed {
            return Err(MetaError::QuorumUnavailable {
                needed,
                reached: answered.len(),
                errors: errors.join("; "),
            });
        }
        let mut merged = ReplicaRows::new();
        for (_, rows) in &answered {
            for (key, value) in rows {
                match merged.get_mut(key) {
                    Some(existing) => {
                        existing.merge(value);
                    }
                    None => {
                        merged.insert(key.clone(), value.clone());
                    }
                }
            }
        }
        let table = match &request {
            Request::MetaGet { table, .. } | Request::MetaScan { table, .. } => *table,
            _ => unreachable!("quorum_read takes reads only"),
        };
        // Read repair: replicas that answered but lack the merged value get it now.
        for (replica, rows) in answered {
            for (key, value) in &merged {
                if rows.get(key) != Some(value) {
                    self.spawn_replica_write(replica, table, key.clone(), encode_stored_value(value), None);
                }
            }
        }
        Ok(merged)
    }

    /// A partition's replicas in the order a read asks them: this node (no network), then
    /// those up, suspect and down; within each group the quickest lately, then placement
    /// order (which differs per partition, so equally quick replicas share the reads).
    fn replicas_in_read_order(&self, mut replicas: Vec<NodeId>) -> Vec<NodeId> {
        let me = self.env.node_id();
        let now_ms = self.env.now_ms();
        let membership = self.membership.lock().expect("not poisoned");
        let round_trips = self.replica_round_trips.lock().expect("not poisoned");
        // A stable sort keeps placement order among equals.
        replicas.sort_by_cached_key(|replica| {
            let group = match membership.liveness(replica, now_ms) {
                _ if *replica == me => 0,
                Liveness::Up => 1,
                Liveness::Suspect => 2,
                Liveness::Down => 3,
            };
            (group, round_trips.estimate_ms(replica))
        });
        replicas
    }

    fn spawn_replica_write(
        self: &Arc<Self>,
        replica: NodeId,
        table: Table,
        key: Vec<u8>,
        value: Vec<u8>,
        done: Option<mpsc::UnboundedSender<Result<(), String>>>,
    ) {
        let node = Arc::clone(self);
        self.env.spawn(
            "meta-write",
            Box::pin(async move {
                let result = if replica == node.env.node_id() {
                    node.apply_meta_merge(table, &key, &value)
                        .await
                        .map_err(|error| error.to_string())
                } else {
                    let request = Request::MetaMerge {
                        layout_digest: node.layout_digest(),
                        table,
                        key,
                        value,
                    };
                    match node.request_replica(replica, request).await {
                        Ok(Response::MetaMerged) => Ok(()),
                        Ok(Response::Error { message, .. }) => Err(format!("{}: {message}", replica.short())),
                        Ok(other) => Err(format!("{}: unexpected answer {other:?}", replica.short())),
                        Err(error) => Err(error),
                    }
                };
                if let Some(done) = done {
                    let _ = done.unbounded_send(result);
                }
            }),
        );
    }

    /// Reads one row: the quorum-merged register (possibly a tombstone), or None.
    pub async fn meta_get(self: &Arc<Self>, table: Table, row: &RowKey) -> Result<Option<Lww<Record>>, MetaError> {
        self.meta_get_from(table, row, ReplicasRead::Quorum).await
    }

    /// [`ClusterNode::meta_get`] from a quorum or from every replica.
    pub(crate) async fn meta_get_from(
        self: &Arc<Self>,
        table: Table,
        row: &RowKey,
        replicas_read: ReplicasRead,
    ) -> Result<Option<Lww<Record>>, MetaError> {
        let key = row.encode()?;
        let mut rows = self
            .quorum_read(
                &row.partition_key,
                Request::MetaGet {
                    layout_digest: self.layout_digest(),
                    table,
                    key: key.clone(),
                },
                replicas_read,
            )
            .await?;
        Ok(rows.remove(&key))
    }

    /// Reads up to `limit` rows of one partition whose sort keys start with
    /// `sort_prefix`, after `after_sort_key`, in order. Tombstones come back too (value
    /// None) and count towards the page, so a caller skips them and pages on with the
    /// last key it saw.
    pub async fn meta_scan(
        self: &Arc<Self>,
        table: Table,
        partition_key: &[u8],
        sort_prefix: &[u8],
        after_sort_key: Option<&[u8]>,
        limit: u32,
    ) -> Result<Vec<(RowKey, Lww<Record>)>, MetaError> {
        self.meta_scan_from(
            table,
            partition_key,
            sort_prefix,
            after_sort_key,
            limit,
            ReplicasRead::Quorum,
        )
        .await
    }

    /// Reads the rows of one partition whose sort keys start with `sort_prefix`
    /// (tombstones too), `page_rows` at a time, handing each page to `each` until the
    /// rows end (None) or `each` breaks (Some of what it broke with). Lists that skip
    /// tombstones must page on past them: one page of tombstones (kept for the grace)
    /// would otherwise end the list early.
    pub(crate) async fn meta_scan_pages<B>(
        self: &Arc<Self>,
        table: Table,
        partition_key: &[u8],
        sort_prefix: &[u8],
        page_rows: u32,
        replicas_read: ReplicasRead,
        mut each: impl FnMut(Vec<(RowKey, Lww<Record>)>) -> std::ops::ControlFlow<B>,
    ) -> Result<Option<B>, MetaError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .meta_scan_from(
                    table,
                    partition_key,
                    sort_prefix,
                    after.as_deref(),
                    page_rows,
                    replicas_read,
                )
                .await?;
            let full_page = page.len() as u32 >= page_rows;
            after = page.last().map(|(row, _)| row.sort_key.clone());
            if let std::ops::ControlFlow::Break(reason) = each(page) {
                return Ok(Some(reason));
            }
            if !full_page {
                return Ok(None);
            }
        }
    }

    /// [`ClusterNode::meta_scan`] from a quorum or from every replica.
    async fn meta_scan_from(
        self: &Arc<Self>,
        table: Table,
        partition_key: &[u8],
        sort_prefix: &[u8],
        after_sort_key: Option<&[u8]>,
        limit: u32,
        replicas_read: ReplicasRead,
    ) -> Result<Vec<(RowKey, Lww<Record>)>, MetaError> {
        let prefix = RowKey::prefix(partition_key, sort_prefix)?;
        let after = after_sort_key
            .map(|sort_key| RowKey::new(partition_key, sort_key).encode())
            .transpose()?;
        let rows = self
            .quorum_read(
                partition_key,
                Request::MetaScan {
                    layout_digest: self.layout_digest(),
                    table,
                    prefix,
                    after,
                    limit: limit.min(SCAN_ROWS_MAX),
                },
                replicas_read,
            )
            .await?;
        rows.into_iter()
            .take(limit as usize)
            .map(|(key, value)| Ok((RowKey::decode(&key)?, value)))
            .collect()
    }

    /// A fresh timestamp after `floor` and after every timestamp this node has seen
    /// (`HlcTimestamp::ZERO` for no floor).
    pub(crate) fn stamp_after(&self, floor: HlcTimestamp) -> HlcTimestamp {
        let now_ms = self.env.now_ms();
        self.membership
            .lock()
            .expect("not poisoned")
            .timestamp_after(now_ms, &floor)
    }

    /// Writes a row (`None` writes a tombstone) with a timestamp above every value a
    /// quorum holds, and returns once a quorum of replicas made it durable.
    pub async fn meta_put(
        self: &Arc<Self>,
        table: Table,
        row: &RowKey,
        value: Option<Record>,
    ) -> Result<HlcTimestamp, MetaError> {
        let current = self.meta_get(table, row).await?;
        let timestamp = self.stamp_after(current.as_ref().map_or(HlcTimestamp::ZERO, |current| current.timestamp));
        debug_assert!(current.as_ref().is_none_or(|current| current.timestamp < timestamp));
        let register = Lww { timestamp, value };
        self.meta_write_register(table, row, &register).await?;
        Ok(timestamp)
    }

    /// Writes a row that cannot exist yet (its key is fresh and unique, like a new
    /// stripe's): skips the read-before-write, saving a quorum round trip.
    pub(crate) async fn meta_put_fresh(
        self: &Arc<Self>,
        table: Table,
        row: &RowKey,
        value: Record,
    ) -> Result<(), MetaError> {
        let timestamp = {
            let now_ms = self.env.now_ms();
            self.membership.lock().expect("not poisoned").timestamp(now_ms)
        };
        self.meta_write_register(table, row, &Lww::new(timestamp, value)).await
    }

    /// Replicates an already-stamped register to a quorum.
    pub(crate) async fn meta_write_register(
        self: &Arc<Self>,
        table: Table,
        row: &RowKey,
        register: &Lww<Record>,
    ) -> Result<(), MetaError> {
        let key = row.encode()?;
        let value = encode_stored_value(register);
        let replicas = self.metadata_replicas(&row.partition_key)?;
        let needed = quorum_of(replicas.len());
        let (sender, mut results) = mpsc::unbounded();
        for replica in &replicas {
            // Every replica gets the write, even after the quorum answered.
            self.spawn_replica_write(*replica, table, key.clone(), value.clone(), Some(sender.clone()));
        }
        drop(sender);
        let (mut succeeded, mut errors) = (0usize, Vec::new());
        while succeeded < needed {
            match results.next().await {
                Some(Ok(())) => succeeded += 1,
                Some(Err(error)) => errors.push(error),
                None => break,
            }
        }
        if succeeded < needed {
            return Err(MetaError::QuorumUnavailable {
                needed,
                reached: succeeded,
                errors: errors.join("; "),
            });
        }
        Ok(())
    }
}
