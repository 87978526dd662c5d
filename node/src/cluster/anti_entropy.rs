//! Anti-entropy between metadata replicas, and tombstone collection.
//!
//! Every round, for each partition this node replicates, it picks one other replica and
//! compares root hashes (one request per peer for all partitions), unless it has already
//! found every other replica's root equal to its own as it is now (see
//! [`ExchangeMemory`]). Where roots differ it
//! asks for the partition's digest: per table, 16 buckets, each the XOR of the hashes of
//! its rows (key and stored bytes; see [`PartitionDigest`]). Buckets that differ are pulled row by row and
//! merged (LWW, idempotent), so a replica that was down, or missed a write while a quorum
//! went ahead without it, catches up within a few rounds. Each replica pulls, so
//! differences heal in both directions.
//!
//! Tombstones older than the grace period are removed in the same round, for each
//! partition at most [`TOMBSTONE_COLLECTIONS_PER_GRACE`] times per grace period (each
//! collection reads every row of the partition). A replica that stays away longer than
//! the grace period could bring a deleted row back; the grace period (default a day) must
//! exceed the longest outage after which a node may rejoin with its old disk.

use std::collections::{BTreeMap, BTreeSet};
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

/// How many times per tombstone grace period a partition's tombstones are collected. A
/// collection reads and decodes every row of the partition, and it used to run every
/// round (a full pass over all metadata every minute, to remove rows that expire once a
/// day). A tombstone now stays at most 1 + 1/8 grace periods (plus a round); keeping one
/// longer is always safe.
pub const TOMBSTONE_COLLECTIONS_PER_GRACE: u64 = 8;

/// Rounds for which a peer's root found equal to ours spares the comparison. Agreement is
/// sound without a limit (see [`ExchangeMemory`]); the limit bounds what an unforeseen
/// way for two replicas to differ with neither root changing could cost: this many rounds.
pub const AGREEMENT_ROUNDS_MAX: u64 = 10;

fn bucket_of(key: &[u8]) -> usize {
    usize::from(blake3::hash(key).as_bytes()[0] >> 4)
}

/// The hash a row adds to its bucket: of its key (length-prefixed) and its stored bytes.
fn row_hash(key: &[u8], stored_value: &[u8]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(key.len() as u32).to_le_bytes());
    hasher.update(key);
    hasher.update(stored_value);
    *hasher.finalize().as_bytes()
}

fn xor_into(bucket: &mut [u8; 32], hash: &[u8; 32]) {
    for (byte, other) in bucket.iter_mut().zip(hash) {
        *byte ^= other;
    }
}

/// A partition's root: the hash of each table's fold (the XOR of its buckets, which is
/// the XOR of all its rows' hashes), so, like the buckets, a function of the set of
/// (table, row). It hashes 7 folds, not 112 buckets: roots are rehashed after every
/// change of their partition, and hashing every bucket was a sixteenth of the
/// simulator's instructions. A difference the folds hide needs row hashes whose XOR
/// cancels, as a difference hidden inside one bucket already does.
fn root_of(tables: &[[[u8; 32]; DIGEST_BUCKETS]]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    for buckets in tables {
        let mut fold = [0u8; 32];
        for bucket in buckets {
            xor_into(&mut fold, bucket);
        }
        hasher.update(&fold);
    }
    *hasher.finalize().as_bytes()
}

/// The root of a partition without rows: what a replica that holds none answers.
pub(crate) fn empty_partition_root() -> [u8; 32] {
    root_of(&[[[0u8; 32]; DIGEST_BUCKETS]; Table::ALL.len()])
}

fn table_index(table: Table) -> usize {
    Table::ALL
        .iter()
        .position(|known| *known == table)
        .expect("Table::ALL lists every table")
}

/// A replica's digest of one partition: per table (in [`Table::ALL`] order), per bucket,
/// the XOR of its rows' hashes. XOR makes the digest a function of the set of rows, so a
/// write updates it in place (out with the row's old hash, in with the new) instead of
/// rehashing the partition: every anti-entropy round asks for the root of every
/// partition replicated, and rehashing a partition after each write cost a pass over
/// all its rows per write.
pub(crate) struct PartitionDigest {
    tables: Vec<[[u8; 32]; DIGEST_BUCKETS]>,
    /// Computed when asked, forgotten when a bucket changes.
    root: Option<[u8; 32]>,
}

impl PartitionDigest {
    pub(crate) fn root(&mut self) -> [u8; 32] {
        *self.root.get_or_insert_with(|| root_of(&self.tables))
    }

    fn table_digests(&self) -> Vec<TableDigest> {
        Table::ALL
            .iter()
            .zip(&self.tables)
            .map(|(table, buckets)| TableDigest {
                table: *table,
                buckets: buckets.to_vec(),
            })
            .collect()
    }
}

/// Cached partition digests, kept current by every local change of a metadata row.
#[derive(Default)]
pub(crate) struct DigestCache {
    partitions: BTreeMap<u32, PartitionDigest>,
    /// Counts changes made while their partition had no cached digest. A digest whose
    /// scan began before such a change may have missed it, so it is not cached.
    changes_uncached: u64,
}

/// What anti-entropy remembers between rounds, in memory only: a restarted node (which
/// may have lost unflushed rows) remembers nothing, so it compares every partition with
/// every peer.
///
/// Why skipping agreed peers loses nothing. Replica A skips peer B for partition P only
/// while A's root is the one it found B's equal to (as an answer to A's request, or
/// sent with B's request), so A has not changed since. When B changes, B's root no
/// longer matches its own agreement with A, so B compares with its peers again, A among
/// them in some round (it picks at random among those not agreed). B's request carries
/// B's root; A, finding it different from its own, forgets its agreement with B and
/// compares with B on its next round too, so a difference is pulled from both sides, as
/// before. And two replicas that each skip the other hold the same rows: each one's
/// agreement was formed from a root the other had earlier, neither has changed since,
/// and row sets only grow under LWW merges, so each holds at least what the other does.
/// The exceptions shrink a row set: tombstone collection and dropping a partition change
/// the root (so the node compares again), and a restart forgets every agreement.
#[derive(Default)]
pub(crate) struct ExchangeMemory {
    /// (partition, peer) -> our root when the peer's root was last found equal to it.
    agreed: BTreeMap<(u32, NodeId), Agreement>,
    /// Partition -> when this node last collected its tombstones.
    tombstones_collected_at_ms: BTreeMap<u32, u64>,
    rounds_run: u64,
}

struct Agreement {
    root: [u8; 32],
    round: u64,
}

impl ExchangeMemory {
    fn agrees(&self, partition: u32, peer: NodeId, our_root: &[u8; 32]) -> bool {
        self.agreed.get(&(partition, peer)).is_some_and(|agreement| {
            agreement.root == *our_root && self.rounds_run.saturating_sub(agreement.round) < AGREEMENT_ROUNDS_MAX
        })
    }

    fn note_agreement(&mut self, partition: u32, peer: NodeId, root: [u8; 32]) {
        let round = self.rounds_run;
        self.agreed.insert((partition, peer), Agreement { root, round });
    }

    /// `peer` asked for our root of `partition`, sending its own: equal, we agree (it
    /// had that root before we found ours equal); different, we compare with it on our
    /// next round, so rows only we hold reach it although it only pulls.
    fn asked(&mut self, partition: u32, peer: NodeId, our_root: &[u8; 32], asker_root: &[u8; 32]) {
        if our_root == asker_root {
            self.note_agreement(partition, peer, *our_root);
        } else {
            self.agreed.remove(&(partition, peer));
        }
    }

    /// Agreements with peers this node no longer compares with (so the map holds at most
    /// one entry per replica of each partition replicated here).
    fn keep_only(&mut self, current: &BTreeSet<(u32, NodeId)>) {
        self.agreed.retain(|pair, _| current.contains(pair));
    }

    fn tombstones_due(&mut self, partition: u32, now_ms: u64, every_ms: u64) -> bool {
        let due = self
            .tombstones_collected_at_ms
            .get(&partition)
            .is_none_or(|collected_ms| now_ms.saturating_sub(*collected_ms) >= every_ms);
        if due {
            self.tombstones_collected_at_ms.insert(partition, now_ms);
        }
        due
    }
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
    fn with_partition_digest<T>(
        &self,
        partition: u32,
        read: impl FnOnce(&mut PartitionDigest) -> T,
    ) -> Result<T, MetaError> {
        let changes_before = {
            let mut cache = self.digest_cache.lock().expect("not poisoned");
            if let Some(cached) = cache.partitions.get_mut(&partition) {
                return Ok(read(cached));
            }
            cache.changes_uncached
        };
        // Hashed without the lock: rows change meanwhile, which the counter tells.
        let mut digest = self.compute_partition_digest(partition)?;
        let value = read(&mut digest);
        let mut cache = self.digest_cache.lock().expect("not poisoned");
        if cache.changes_uncached == changes_before {
            // A digest cached meanwhile has been kept current since: it stays.
            cache.partitions.entry(partition).or_insert(digest);
        }
        Ok(value)
    }

    /// Per table, the 16 bucket hashes of this replica's rows of `partition`.
    pub fn partition_digest(&self, partition: u32) -> Result<Vec<TableDigest>, MetaError> {
        self.with_partition_digest(partition, |digest| digest.table_digests())
    }

    /// Brings the cached digest of `key`'s partition up to date with a change of the row
    /// from `old` to `new` (stored bytes; None: absent). Called after the store changed,
    /// under the row's lock.
    pub(crate) fn digest_row_changed(&self, table: Table, key: &[u8], old: Option<&[u8]>, new: Option<&[u8]>) {
        let Ok(row) = RowKey::decode(key) else {
            return;
        };
        let mut cache = self.digest_cache.lock().expect("not poisoned");
        let Some(digest) = cache.partitions.get_mut(&row.partition()) else {
            cache.changes_uncached += 1;
            return;
        };
        let bucket = &mut digest.tables[table_index(table)][bucket_of(key)];
        for stored_value in [old, new].into_iter().flatten() {
            xor_into(bucket, &row_hash(key, stored_value));
        }
        digest.root = None;
    }

    /// Forgets the cached digest of `partition` (its rows changed wholesale).
    pub(crate) fn invalidate_partition_digest(&self, partition: u32) {
        let mut cache = self.digest_cache.lock().expect("not poisoned");
        cache.partitions.remove(&partition);
        cache.changes_uncached += 1;
    }

    pub(crate) fn compute_partition_digest(&self, partition: u32) -> Result<PartitionDigest, MetaError> {
        let mut tables = vec![[[0u8; 32]; DIGEST_BUCKETS]; Table::ALL.len()];
        for (table, buckets) in Table::ALL.iter().zip(tables.iter_mut()) {
            self.for_each_local_row(*table, partition, |key, value| {
                xor_into(&mut buckets[bucket_of(key)], &row_hash(key, value));
            })?;
        }
        Ok(PartitionDigest { tables, root: None })
    }

    /// Whether the digest kept of `partition` equals one hashed afresh from its rows (for
    /// checkers: a stale digest would hide a difference from anti-entropy).
    pub fn kept_partition_digest_is_fresh(&self, partition: u32) -> Result<bool, MetaError> {
        let kept = self.partition_root(partition)?;
        Ok(self.compute_partition_digest(partition)?.root() == kept)
    }

    /// Whether this node skips comparing `partition` with `peer` while its root stays as
    /// it is (for tests).
    pub fn anti_entropy_agrees(&self, partition: u32, peer: NodeId) -> bool {
        let Ok(our_root) = self.partition_root(partition) else {
            return false;
        };
        self.exchange_memory
            .lock()
            .expect("not poisoned")
            .agrees(partition, peer, &our_root)
    }

    /// The root hash of a partition: the hash of its table digests.
    pub fn partition_root(&self, partition: u32) -> Result<[u8; 32], MetaError> {
        self.with_partition_digest(partition, PartitionDigest::root)
    }

    /// Replica side of MetaPartitionRoots / MetaDigest / MetaBucketRows.
    pub(crate) fn serve_anti_entropy(&self, from: NodeId, request: &Request) -> Response {
        let result = match request {
            Request::MetaPartitionRoots {
                partitions,
                roots: asker_roots,
            } if partitions.len() <= METADATA_PARTITIONS as usize
                && partitions.iter().all(|partition| *partition < METADATA_PARTITIONS)
                && (asker_roots.is_empty() || asker_roots.len() == partitions.len()) =>
            {
                let roots = partitions
                    .iter()
                    .map(|partition| self.partition_root(*partition))
                    .collect::<Result<Vec<_>, _>>();
                if let Ok(roots) = &roots {
                    if !asker_roots.is_empty() {
                        let mut memory = self.exchange_memory.lock().expect("not poisoned");
                        for ((partition, our_root), asker_root) in partitions.iter().zip(roots).zip(asker_roots) {
                            memory.asked(*partition, from, our_root, asker_root);
                        }
                    }
                }
                roots.map(|roots| Response::MetaPartitionRoots { roots })
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
        let now_ms = self.env.now_ms();
        let collect_every_ms = self.membership_config().tombstone_grace_ms / TOMBSTONE_COLLECTIONS_PER_GRACE;
        // For each partition we replicate, one random live other replica to compare with,
        // among those whose root we have not found equal to ours as it is now.
        // Peer -> the partitions to compare with it, each with our root as it is now.
        let mut by_peer: BTreeMap<NodeId, Vec<(u32, [u8; 32])>> = BTreeMap::new();
        let mut current_pairs: BTreeSet<(u32, NodeId)> = BTreeSet::new();
        for partition in 0..METADATA_PARTITIONS {
            let Some(placement) = self.partition_placement(&layout, partition) else {
                return;
            };
            let holders = &placement.holders;
            if !holders.contains(&me) {
                continue;
            }
            let collect =
                self.exchange_memory
                    .lock()
                    .expect("not poisoned")
                    .tombstones_due(partition, now_ms, collect_every_ms);
            if collect {
                self.collect_tombstones(partition);
            }
            let Ok(our_root) = self.partition_root(partition) else {
                continue;
            };
            let peers: Vec<NodeId> = {
                let memory = self.exchange_memory.lock().expect("not poisoned");
                holders
                    .iter()
                    .copied()
                    .filter(|node| *node != me)
                    .inspect(|node| {
                        current_pairs.insert((partition, *node));
                    })
                    .filter(|node| !memory.agrees(partition, *node, &our_root))
                    .filter(|node| self.liveness(node) != Liveness::Down)
                    .collect()
            };
            if !peers.is_empty() {
                let peer = peers[(self.env.random_u64() % peers.len() as u64) as usize];
                by_peer.entry(peer).or_default().push((partition, our_root));
            }
        }
        {
            let mut memory = self.exchange_memory.lock().expect("not poisoned");
            memory.keep_only(&current_pairs);
            memory.rounds_run += 1;
        }
        let mut repaired_rows = 0u64;
        for (peer, compared) in by_peer {
            let (partitions, our_roots): (Vec<u32>, Vec<[u8; 32]>) = compared.into_iter().unzip();
            let roots = match self
                .env
                .request(
                    peer,
                    Request::MetaPartitionRoots {
                        partitions: partitions.clone(),
                        roots: our_roots,
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
                let mut equal = self.partition_root(partition).ok() == Some(their_root);
                if !equal {
                    match self.sync_partition_from(peer, partition).await {
                        Ok(rows) => repaired_rows += rows,
                        Err(error) => {
                            tracing::debug!(partition, peer = %peer.short(), %error, "anti-entropy failed");
                            continue;
                        }
                    }
                    // Pulling what differed may have made ours equal to theirs (the peer
                    // had nothing we lacked).
                    equal = self.partition_root(partition).ok() == Some(their_root);
                }
                if equal {
                    self.exchange_memory
                        .lock()
                        .expect("not poisoned")
                        .note_agreement(partition, peer, their_root);
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
    pub(crate) fn collect_tombstones(&self, partition: u32) {
        let grace_ms = self.membership_config().tombstone_grace_ms;
        let horizon_ms = self.env.now_ms().saturating_sub(grace_ms);
        let is_expired_tombstone = |stored_value: &[u8]| matches!(decode_stored_value(stored_value), Ok(Lww { timestamp, value: None }) if timestamp.wall_ms < horizon_ms);
        let store = self.env.meta_store();
        for table in Table::ALL {
            let tree = Tree::Table(table);
            let mut expired = Vec::new();
            let scanned = self.for_each_local_row(table, partition, |key, value| {
                if is_expired_tombstone(value) {
                    expired.push(key.to_vec());
                }
            });
            if let Err(error) = scanned {
                tracing::warn!(%error, "cannot scan for tombstones");
                continue;
            }
            for key in expired {
                let _row = self.row_lock(&key);
                // A write may have replaced the tombstone since the scan.
                let current = match store.get(tree, &key) {
                    Ok(Some(current)) if is_expired_tombstone(&current) => current,
                    Ok(_) => continue,
                    Err(error) => {
                        tracing::warn!(%error, "cannot read a tombstone");
                        continue;
                    }
                };
                match store.delete(tree, &key) {
                    Ok(()) => self.digest_row_changed(table, &key, Some(&current), None),
                    Err(error) => tracing::warn!(%error, "cannot remove a tombstone"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_row(table: usize, bucket: usize, hash: [u8; 32]) -> Vec<[[u8; 32]; DIGEST_BUCKETS]> {
        let mut tables = vec![[[0u8; 32]; DIGEST_BUCKETS]; Table::ALL.len()];
        xor_into(&mut tables[table][bucket], &hash);
        tables
    }

    /// The root tells apart a row in one table from the same row in another, and a
    /// partition with a row from one without; the bucket a row falls in does not matter
    /// to it (the buckets say where a difference is, the root only whether there is one).
    #[test]
    fn roots_depend_on_the_set_of_table_rows() {
        let row = *blake3::hash(b"row").as_bytes();
        let empty = root_of(&vec![[[0u8; 32]; DIGEST_BUCKETS]; Table::ALL.len()]);
        assert_eq!(empty, empty_partition_root());
        assert_ne!(root_of(&with_row(0, 3, row)), empty);
        assert_ne!(root_of(&with_row(0, 3, row)), root_of(&with_row(1, 3, row)));
        assert_eq!(root_of(&with_row(2, 3, row)), root_of(&with_row(2, 11, row)));
        let other = *blake3::hash(b"other row").as_bytes();
        let mut both = with_row(2, 3, row);
        xor_into(&mut both[2][9], &other);
        assert_ne!(root_of(&both), root_of(&with_row(2, 3, row)));
        // Taking the other row out again gives the first root back.
        xor_into(&mut both[2][9], &other);
        assert_eq!(root_of(&both), root_of(&with_row(2, 3, row)));
    }
}
