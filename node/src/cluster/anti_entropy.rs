//! Anti-entropy between metadata replicas, and tombstone collection.
//!
//! Every round, for each partition this node replicates, it picks one other replica and
//! compares root hashes (one request per peer for all partitions). Where roots differ it
//! asks for the partition's digest: per table, 16 bucket hashes over (key,
//! blake3(value)) of the partition's rows. Buckets that differ are pulled row by row and
//! merged (LWW, idempotent), so a replica that was down, or missed a write while a quorum
//! went ahead without it, catches up within a few rounds. Each replica pulls, so
//! differences heal in both directions.
//!
//! Tombstones older than the grace period are removed in the same round. A replica that
//! stays away longer than the grace period could bring a deleted row back; the grace
//! period (default a day) must exceed the longest outage after which a node may rejoin
//! with its old disk.

use std::collections::BTreeMap;
use std::sync::Arc;

use bdr_protocol::ids::NodeId;
use bdr_protocol::records::{decode_stored_value, Lww, RowKey, METADATA_PARTITIONS};
use bdr_protocol::wire::{
    MetaRow, RemoteErrorKind, Request, Response, Table, TableDigest, DIGEST_BUCKETS, SCAN_ROWS_MAX,
};

use super::membership::Liveness;
use super::metadata::{MetaError, METADATA_TIMEOUT_MS};
use super::ClusterNode;
use crate::env::{Env, Tree};

/// Rows read from the store per page while hashing or collecting.
const PAGE_ROWS: usize = 1000;

fn bucket_of(key: &[u8]) -> usize {
    usize::from(blake3::hash(key).as_bytes()[0] >> 4)
}

fn root_of(tables: &[TableDigest]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for table in tables {
        for bucket in &table.buckets {
            hasher.update(bucket);
        }
    }
    *hasher.finalize().as_bytes()
}

/// The root of a partition with no rows on a replica.
pub(crate) fn empty_partition_root() -> [u8; 32] {
    let empty_bucket = *blake3::Hasher::new().finalize().as_bytes();
    let tables: Vec<TableDigest> = Table::ALL
        .iter()
        .map(|table| TableDigest {
            table: *table,
            buckets: vec![empty_bucket; DIGEST_BUCKETS],
        })
        .collect();
    root_of(&tables)
}

/// A replica's digest of one partition and its root, kept until a row of the partition
/// changes: every anti-entropy round asks for the roots of every partition replicated.
pub(crate) struct PartitionDigest {
    tables: Vec<TableDigest>,
    root: [u8; 32],
}

impl<E: Env> ClusterNode<E> {
    /// Visits every local row of `table` in `partition`, in key order.
    pub(crate) fn for_each_local_row(
        &self,
        table: Table,
        partition: u32,
        mut visit: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), MetaError> {
        let store = self.env.meta_store();
        let prefix = RowKey::partition_prefix(partition);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = store.scan(Tree::Table(table), &prefix, after.as_deref(), PAGE_ROWS)?;
            for (key, value) in &page {
                visit(key, value);
            }
            match page.last() {
                Some((key, _)) if page.len() == PAGE_ROWS => after = Some(key.clone()),
                _ => return Ok(()),
            }
        }
    }

    /// This replica's digest of `partition`, from the cache or computed (and cached).
    fn cached_partition_digest<T>(
        &self,
        partition: u32,
        read: impl FnOnce(&PartitionDigest) -> T,
    ) -> Result<T, MetaError> {
        if let Some(cached) = self.digest_cache.lock().expect("not poisoned").get(&partition) {
            return Ok(read(cached));
        }
        let tables = self.compute_partition_digest(partition)?;
        let digest = PartitionDigest {
            root: root_of(&tables),
            tables,
        };
        let value = read(&digest);
        self.digest_cache
            .lock()
            .expect("not poisoned")
            .insert(partition, digest);
        Ok(value)
    }

    /// Per table, the 16 bucket hashes of this replica's rows of `partition`.
    pub fn partition_digest(&self, partition: u32) -> Result<Vec<TableDigest>, MetaError> {
        self.cached_partition_digest(partition, |digest| digest.tables.clone())
    }

    /// Forgets the cached digest of the partition holding `row_key` (after a change).
    pub(crate) fn invalidate_digest(&self, row_key: &[u8]) {
        if let Ok(row) = RowKey::decode(row_key) {
            self.digest_cache.lock().expect("not poisoned").remove(&row.partition());
        }
    }

    pub fn compute_partition_digest(&self, partition: u32) -> Result<Vec<TableDigest>, MetaError> {
        Table::ALL
            .iter()
            .map(|table| {
                let mut hashers: Vec<blake3::Hasher> = (0..DIGEST_BUCKETS).map(|_| blake3::Hasher::new()).collect();
                self.for_each_local_row(*table, partition, |key, value| {
                    let hasher = &mut hashers[bucket_of(key)];
                    hasher.update(&(key.len() as u32).to_le_bytes());
                    hasher.update(key);
                    hasher.update(blake3::hash(value).as_bytes());
                })?;
                Ok(TableDigest {
                    table: *table,
                    buckets: hashers.iter().map(|hasher| *hasher.finalize().as_bytes()).collect(),
                })
            })
            .collect()
    }

    /// The root hash of a partition: the hash of its table digests.
    pub fn partition_root(&self, partition: u32) -> Result<[u8; 32], MetaError> {
        self.cached_partition_digest(partition, |digest| digest.root)
    }

    /// Replica side of MetaPartitionRoots / MetaDigest / MetaBucketRows.
    pub(crate) fn serve_anti_entropy(&self, request: &Request) -> Response {
        let result = match request {
            Request::MetaPartitionRoots { partitions }
                if partitions.len() <= METADATA_PARTITIONS as usize
                    && partitions.iter().all(|partition| *partition < METADATA_PARTITIONS) =>
            {
                partitions
                    .iter()
                    .map(|partition| self.partition_root(*partition))
                    .collect::<Result<Vec<_>, _>>()
                    .map(|roots| Response::MetaPartitionRoots { roots })
            }
            Request::MetaDigest { partition } if *partition < METADATA_PARTITIONS => self
                .partition_digest(*partition)
                .map(|tables| Response::MetaDigest { tables }),
            Request::MetaBucketRows {
                table,
                partition,
                bucket,
                after,
                limit,
            } if *partition < METADATA_PARTITIONS => {
                let limit = (*limit).min(SCAN_ROWS_MAX) as usize;
                let store = self.env.meta_store();
                let prefix = RowKey::partition_prefix(*partition);
                let mut rows = Vec::new();
                let mut cursor = after.clone();
                // Pages through the partition until `limit` rows of the bucket are found.
                loop {
                    let page = match store.scan(Tree::Table(*table), &prefix, cursor.as_deref(), PAGE_ROWS) {
                        Ok(page) => page,
                        Err(error) => return Response::error(RemoteErrorKind::Internal, error.to_string()),
                    };
                    let full_page = page.len() == PAGE_ROWS;
                    cursor = page.last().map(|(key, _)| key.clone());
                    for (key, value) in page {
                        if bucket_of(&key) == usize::from(*bucket) && rows.len() < limit {
                            rows.push(MetaRow { key, value });
                        }
                    }
                    if !full_page || rows.len() >= limit {
                        break;
                    }
                }
                Ok(Response::MetaRows { rows })
            }
            _ => return Response::error(RemoteErrorKind::BadRequest, "bad anti-entropy request"),
        };
        result.unwrap_or_else(|error| Response::error(RemoteErrorKind::Internal, error.to_string()))
    }

    pub(crate) async fn anti_entropy_loop(self: Arc<Self>) {
        let interval_ms = self.membership_config().anti_entropy_interval_ms;
        loop {
            self.env.sleep(interval_ms).await;
            self.anti_entropy_round().await;
        }
    }

    /// One pass over the partitions this node replicates.
    pub async fn anti_entropy_round(self: &Arc<Self>) {
        if !self.is_joined() {
            return;
        }
        let layout = self.layout();
        let me = self.env.node_id();
        // For each partition we replicate, one random live other replica to compare with.
        let mut by_peer: BTreeMap<NodeId, Vec<u32>> = BTreeMap::new();
        for partition in 0..METADATA_PARTITIONS {
            let Some(placement) = self.partition_placement(&layout, partition) else {
                return;
            };
            let holders = &placement.holders;
            if !holders.contains(&me) {
                continue;
            }
            self.collect_tombstones(partition);
            let peers: Vec<NodeId> = holders
                .iter()
                .copied()
                .filter(|node| *node != me && self.liveness(node) != Liveness::Down)
                .collect();
            if !peers.is_empty() {
                let peer = peers[(self.env.random_u64() % peers.len() as u64) as usize];
                by_peer.entry(peer).or_default().push(partition);
            }
        }
        let mut repaired_rows = 0u64;
        for (peer, partitions) in by_peer {
            let roots = match self
                .env
                .request(
                    peer,
                    Request::MetaPartitionRoots {
                        partitions: partitions.clone(),
                    },
                    METADATA_TIMEOUT_MS,
                )
                .await
            {
                Ok(Response::MetaPartitionRoots { roots }) if roots.len() == partitions.len() => roots,
                Ok(other) => {
                    tracing::debug!(peer = %peer.short(), ?other, "unexpected anti-entropy answer");
                    continue;
                }
                Err(error) => {
                    tracing::debug!(peer = %peer.short(), %error, "anti-entropy failed");
                    continue;
                }
            };
            for (partition, their_root) in partitions.into_iter().zip(roots) {
                if self.partition_root(partition).ok() == Some(their_root) {
                    continue;
                }
                match self.sync_partition_from(peer, partition).await {
                    Ok(rows) => repaired_rows += rows,
                    Err(error) => tracing::debug!(partition, peer = %peer.short(), %error, "anti-entropy failed"),
                }
            }
        }
        if repaired_rows > 0 {
            tracing::info!(repaired_rows, "anti-entropy merged rows from other replicas");
            if let Err(error) = self.env.meta_store().flush().await {
                tracing::error!(%error, "cannot flush metadata after anti-entropy");
            }
        }
    }

    /// Pulls the rows of `partition` that differ from `peer`'s; returns rows changed here.
    pub(crate) async fn sync_partition_from(self: &Arc<Self>, peer: NodeId, partition: u32) -> Result<u64, String> {
        let theirs = match self
            .env
            .request(peer, Request::MetaDigest { partition }, METADATA_TIMEOUT_MS)
            .await
        {
            Ok(Response::MetaDigest { tables }) => tables,
            Ok(other) => return Err(format!("unexpected answer {other:?}")),
            Err(error) => return Err(error.to_string()),
        };
        let ours = self.partition_digest(partition).map_err(|error| error.to_string())?;
        let mut changed = 0u64;
        for their_table in theirs {
            let Some(our_table) = ours.iter().find(|digest| digest.table == their_table.table) else {
                continue;
            };
            for bucket in 0..DIGEST_BUCKETS.min(their_table.buckets.len()) {
                if their_table.buckets[bucket] == our_table.buckets[bucket] {
                    continue;
                }
                changed += self
                    .pull_bucket(peer, their_table.table, partition, bucket as u8)
                    .await?;
            }
        }
        Ok(changed)
    }

    async fn pull_bucket(&self, peer: NodeId, table: Table, partition: u32, bucket: u8) -> Result<u64, String> {
        let mut after = None;
        let mut changed = 0u64;
        loop {
            let request = Request::MetaBucketRows {
                table,
                partition,
                bucket,
                after: after.clone(),
                limit: SCAN_ROWS_MAX,
            };
            let rows = match self.env.request(peer, request, METADATA_TIMEOUT_MS).await {
                Ok(Response::MetaRows { rows }) => rows,
                Ok(other) => return Err(format!("unexpected answer {other:?}")),
                Err(error) => return Err(error.to_string()),
            };
            let page_full = rows.len() as u32 >= SCAN_ROWS_MAX;
            after = rows.last().map(|row| row.key.clone());
            for row in rows {
                // A peer's row outside the partition it was asked for is a bug or an attack.
                let in_partition = RowKey::decode(&row.key).is_ok_and(|key| key.partition() == partition);
                if !in_partition {
                    return Err("peer sent a row outside the partition".into());
                }
                if self
                    .merge_local(table, &row.key, &row.value)
                    .map_err(|error| error.to_string())?
                {
                    changed += 1;
                }
            }
            if !page_full {
                return Ok(changed);
            }
        }
    }

    /// Removes this replica's tombstones of `partition` older than the grace period.
    fn collect_tombstones(&self, partition: u32) {
        let grace_ms = self.membership_config().tombstone_grace_ms;
        let horizon_ms = self.env.now_ms().saturating_sub(grace_ms);
        let store = self.env.meta_store();
        for table in Table::ALL {
            let mut expired = Vec::new();
            let scanned = self.for_each_local_row(table, partition, |key, value| {
                if let Ok(Lww { timestamp, value: None }) = decode_stored_value(value) {
                    if timestamp.wall_ms < horizon_ms {
                        expired.push(key.to_vec());
                    }
                }
            });
            if let Err(error) = scanned {
                tracing::warn!(%error, "cannot scan for tombstones");
                continue;
            }
            for key in expired {
                self.invalidate_digest(&key);
                if let Err(error) = store.delete(Tree::Table(table), &key) {
                    tracing::warn!(%error, "cannot remove a tombstone");
                }
            }
        }
    }
}
