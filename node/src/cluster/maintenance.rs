//! Repair, rebalance, scrub and garbage collection: the work that keeps every stripe at
//! full redundancy where placement wants it, and removes what nothing references.
//!
//! Two roles, both on every node, both written against [`Env`] so the simulator drives
//! them unchanged:
//!
//! - **Maintainer** (per metadata partition: its first replica that is not down). Walks
//!   the stripe records of its partitions. A stripe whose owner no longer references it
//!   (deleted, overwritten, aborted, never committed, or written in a bucket that has
//!   since been deleted, perhaps created again: its record names another generation) is
//!   garbage once the write deadline and a grace period have passed: its shards are
//!   deleted and its record tombstoned. The object version rows of such deleted buckets
//!   are tombstoned too, after the same wait.
//!   Every other stripe is surveyed: each shard index is looked up (a batched directory
//!   lookup, no data read) on its target (placement with down nodes left out) and on its
//!   recorded holder. Stripes missing anything are queued, fewest surviving shards first;
//!   a shard that still exists elsewhere is copied to its target (rebalance), one that
//!   exists nowhere is rebuilt from any k survivors (repair). The record's holders are
//!   then updated. Repair is paced to a configured rate.
//!   A copied shard's old copy stays recorded as its holder until its target has been seen
//!   holding the new copy for a grace period; then the maintainer deletes the old copy.
//! - **Holder** (every node, for its own shards, once per scrub). Scrub re-reads and
//!   verifies every shard; the store quarantines a shard that fails, which makes it
//!   missing, which makes the maintainer rebuild it. Then each local shard's record is
//!   looked up: a shard whose record is gone or tombstoned for a whole grace period is an
//!   orphan (its writer died mid-stripe, or GC missed a copy) and is deleted; one on a
//!   node that is neither its canonical holder nor its target is deleted once its target
//!   has been seen holding it for a grace period.
//!
//! Safety rests on three rules: no shard exists without a stripe record written first
//! (the data path writes it before any shard); a write that has not committed its owner
//! record within the write deadline never will (the data path refuses); and every delete
//! waits a grace period of continuously observed garbage (for unreferenced stripes, the
//! write deadline plus the grace), so views that differ for a moment (layout, liveness, a
//! metadata replica that has not caught up) never delete live data. All these spans are
//! measured on one node's clock, never compared across nodes, so clock skew cannot cut
//! them short. Timers live in memory: a restart only delays deletes.
//!
//! Restart: repair state is not a queue on disk but the shards themselves. A restarted
//! maintainer surveys again, and what it repaired before is found healthy; the scrub
//! cursor and the pause switch are persisted.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::stream::FuturesUnordered;
use futures::StreamExt;

use bdr_protocol::erasure::{ChecksumCheck, Shard};
use bdr_protocol::hlc::HlcTimestamp;
use bdr_protocol::ids::{NodeId, StripeId};
use bdr_protocol::layout::Layout;
use bdr_protocol::placement::{place, place_with, Placement};
use bdr_protocol::records::{
    decode_stored_value, Lww, ObjectData, Record, RowKey, StripeOwner, StripeRecord, METADATA_PARTITIONS,
};
use bdr_protocol::wire::{
    MaintenanceCommand, MaintenanceReport, RemoteErrorKind, Request, Response, ShardRef, StripeHealth, Table,
    HAS_SHARDS_KEYS_MAX,
};
use serde::{Deserialize, Serialize};

use super::data::{
    bucket_row, object_row, part_row, stripe_row, upload_row, NULL_VERSION, SHARD_READ_TIMEOUT_MS,
    SHARD_WRITE_TIMEOUT_MS,
};
use super::membership::Liveness;
use super::metadata::ReplicasRead;
use super::ClusterNode;
use crate::env::{Env, KeyValue, ShardKey, StoreError, Tree};

/// How often the maintenance loops wake to see whether work is due.
pub const MAINTENANCE_TICK_MS: u64 = 1_000;
/// How often the repair loop looks whether a node went down or the layout changed: the
/// delay this adds to rebuilding a lost node.
pub const REPAIR_TICK_MS: u64 = 250;
/// Stripes surveyed together (their lookups are batched per node).
pub const SURVEY_BATCH_STRIPES: usize = 256;
/// Stripes a repair pass queues at most; the least urgent beyond this wait for the next
/// pass, which then starts at once.
pub const REPAIR_QUEUE_STRIPES_MAX: usize = 10_000;
/// Garbage and move timers tracked at most (each a few dozen bytes).
pub const GRACE_TIMERS_MAX: usize = 200_000;
/// Owners whose references a pass remembers, so an object of many stripes is read once.
pub const OWNER_CACHE_ENTRIES_MAX: usize = 4_096;
/// A stripe found referenced by its owner is trusted to stay referenced for this many
/// repair passes without reading the owner again: reading every stripe's owner on every
/// pass was most of a pass's metadata reads. Each pass reads about one owner in this
/// many again (chosen by a hash of the owner, so the reads spread over passes). The cost
/// is that garbage is noticed up to this many passes later; deleting still needs a
/// fresh read of the owner.
pub const OWNER_RECHECK_PASSES: u64 = 4;
/// Stripes whose confirmed reference a node remembers (about 40 bytes each); past it,
/// stripes are read every pass as before.
pub const CONFIRMED_STRIPES_MAX: usize = 1_000_000;
/// Object versions read per page when looking for a completed upload's references.
pub const VERSIONS_PAGE_ROWS: u32 = 100;
/// Stripes one node repairs at once. Each holds about k + m shards in memory (6 MiB for
/// 4 MiB stripes of 4+2); several in flight keep the network and both cores busy while
/// one stripe waits for its shards.
pub const REPAIR_STRIPES_IN_FLIGHT_MAX: usize = 4;
/// Metadata lookups a pass keeps in flight at once.
pub const LOOKUPS_IN_FLIGHT_MAX: usize = 32;
/// Shards scrubbed between persisted cursor updates.
pub const SCRUB_CHECKPOINT_SHARDS: u64 = 256;
/// How long a peer has to answer a maintenance report request.
pub const MAINTENANCE_REPORT_TIMEOUT_MS: u64 = 5_000;
/// How long a removal waits for every node to finish a fresh survey.
pub const REMOVE_CHECK_TIMEOUT_MS: u64 = 120_000;

#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("node {0} is active and up: drain it first (`bdr-node admin node drain`), or use --force")]
    StillActive(String),
    #[error(
        "removing the node now would leave stripes short of full redundancy ({} of {} healthy: {} misplaced, \
         {} degraded, {} at risk, {} lost, {} unknown); wait for repair and retry, or use --force",
        .0.healthy, .0.total, .0.misplaced, .0.degraded, .0.at_risk, .0.lost, .0.unknown
    )]
    NotSafe(StripeHealth),
    #[error("not every node finished a fresh survey within {REMOVE_CHECK_TIMEOUT_MS} ms ({0}); retry")]
    Timeout(String),
    #[error(transparent)]
    Cluster(#[from] super::ClusterError),
}

const REPAIR_PAUSED_KEY: &[u8] = b"maintenance/repair-paused";
const SCRUB_CURSOR_KEY: &[u8] = b"maintenance/scrub-cursor";
const SCRUB_DUE_KEY: &[u8] = b"maintenance/scrub-due-at";
const TIDY_DUE_KEY: &[u8] = b"maintenance/tidy-due-at";
/// Tidy passes (orphan shards, old copies of moved shards) come this many GC graces
/// apart, or a scrub interval if that is shorter. Each looks up the record of every
/// stripe the node holds a shard of, and what it deletes must be seen by two passes a
/// grace apart, so the space comes back within two intervals (eight hours with the
/// defaults) for a lookup per held stripe every four hours.
const TIDY_INTERVAL_GRACES: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaintenanceConfig {
    /// Time between repair passes (survey, repair, garbage collection).
    pub repair_interval_ms: u64,
    /// Bytes of shards written by repair per second at most (0: unpaced).
    pub repair_rate_bytes_per_s: u64,
    /// Time between the starts of scrub passes.
    pub scrub_interval_ms: u64,
    /// Bytes scrub reads per second at most (0: unpaced).
    pub scrub_rate_bytes_per_s: u64,
    /// How long garbage must be seen as garbage, and a moved shard's new copy confirmed,
    /// before anything is deleted.
    pub gc_grace_ms: u64,
    /// A write must commit within this long after it started, or it fails.
    pub write_deadline_ms: u64,
}

impl MaintenanceConfig {
    pub const DEFAULT: MaintenanceConfig = MaintenanceConfig {
        repair_interval_ms: 60_000,
        repair_rate_bytes_per_s: 64 * 1024 * 1024,
        scrub_interval_ms: 7 * 24 * 3_600_000,
        scrub_rate_bytes_per_s: 16 * 1024 * 1024,
        gc_grace_ms: 3_600_000,
        // Bounds one PUT or one part (S3 caps both at 5 GiB: 9 minutes at 10 MB/s).
        write_deadline_ms: 3_600_000,
    };

    /// Time between the starts of tidy passes (see [`TIDY_INTERVAL_GRACES`]).
    pub fn tidy_interval_ms(&self) -> u64 {
        self.scrub_interval_ms
            .min(self.gc_grace_ms.saturating_mul(TIDY_INTERVAL_GRACES))
            .max(MAINTENANCE_TICK_MS)
    }
}

/// Node-local maintenance records in the system tree (versioned like every record).
#[derive(Serialize, Deserialize)]
enum MaintenanceRecord {
    RepairPausedV1(bool),
    ScrubCursorV1(Option<(StripeId, u8)>),
    /// When the next pass of a periodic kind (the key says which) is due, by this node's
    /// clock: kept across restarts, so a node restarted more often than the interval
    /// still runs its passes.
    PassDueAtV1(u64),
}

/// When a periodic pass is first due after a start at `now_ms`: when it was due before
/// the restart (saved as each pass began), or soon if a pass was cut short, but never
/// sooner than `settle_ms` (gossip must first say who is up) and never later than one
/// interval from now (the clock may have been set back). A node that never ran one
/// waits a whole interval.
fn first_pass_due_at_ms(
    saved_due_at_ms: Option<u64>,
    interrupted: bool,
    now_ms: u64,
    interval_ms: u64,
    settle_ms: u64,
) -> u64 {
    let soonest_ms = now_ms + settle_ms.min(interval_ms);
    let latest_ms = now_ms + interval_ms;
    match (interrupted, saved_due_at_ms) {
        (true, _) => soonest_ms,
        (false, Some(due_at_ms)) => due_at_ms.clamp(soonest_ms, latest_ms),
        (false, None) => latest_ms,
    }
}

#[derive(Default)]
pub(crate) struct PassLocks {
    repair: futures::lock::Mutex<()>,
    tidy: futures::lock::Mutex<()>,
    scrub: futures::lock::Mutex<()>,
}

#[derive(Default)]
pub(crate) struct MaintenanceState {
    report: MaintenanceReport,
    repair_requested: bool,
    scrub_requested: bool,
    next_repair_at_ms: u64,
    next_scrub_at_ms: u64,
    next_tidy_at_ms: u64,
    /// Maintainer: stripes seen unreferenced, and since when.
    unreferenced_since_ms: BTreeMap<StripeId, u64>,
    /// Maintainer: old copies of moved shards (also on their target), and since when.
    extra_copy_since_ms: BTreeMap<ShardKey, u64>,
    /// Holder: shards whose stripe record was absent or a tombstone, and since when.
    orphan_since_ms: BTreeMap<ShardKey, u64>,
    /// Holder: misplaced shards whose target confirmed a copy, and since when.
    moved_since_ms: BTreeMap<ShardKey, u64>,
    /// Maintainer: object version rows (encoded keys) seen holding a version of a deleted
    /// bucket, the register's timestamp seen, and since when.
    stale_version_since_ms: BTreeMap<Vec<u8>, (HlcTimestamp, u64)>,
    /// Maintainer: stripes their owner referenced when last read (see
    /// [`OWNER_RECHECK_PASSES`]).
    confirmed_referenced: BTreeSet<StripeId>,
}

/// Whether a pass must read the owner of `stripe_id`, or may trust that it was
/// referenced. The pass of the recheck is chosen by owner, so an object of many stripes
/// is read once on one pass, not on most passes for one stripe or another.
fn owner_read_due(
    confirmed_referenced: &BTreeSet<StripeId>,
    stripe_id: &StripeId,
    owner: &StripeOwner,
    pass: u64,
) -> bool {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    owner.hash(&mut hasher);
    let residue = hasher.finish() % OWNER_RECHECK_PASSES;
    !confirmed_referenced.contains(stripe_id) || pass % OWNER_RECHECK_PASSES == residue
}

/// Whether a stripe's owner references it.
#[derive(Debug, PartialEq)]
enum Reference {
    Referenced,
    /// Not referenced, but not for long enough to be garbage (a write in progress, or
    /// garbage in its grace period).
    Unreferenced,
    /// Unreferenced for long enough, and confirmed by a fresh read of its owner.
    Garbage,
    /// The owner could not be read (no quorum): decide nothing.
    Unknown,
}

/// One stripe that lacks shards on its targets.
struct RepairTask {
    stripe_id: StripeId,
    record: StripeRecord,
    targets: Vec<NodeId>,
    on_target: Vec<bool>,
    /// Present on the recorded holder, which is not the target: the source of a move, or
    /// (when also on target) an old copy to delete once the grace period has passed.
    elsewhere: Vec<bool>,
    available: usize,
}

impl RepairTask {
    fn missing_on_target(&self) -> usize {
        self.on_target.iter().filter(|present| !**present).count()
    }
}

/// Starts `key`'s timer if it has none; whether it has run for `grace_ms`.
fn grace_elapsed<K: Ord + Copy>(timers: &mut BTreeMap<K, u64>, key: K, now_ms: u64, grace_ms: u64) -> bool {
    if let Some(since) = timers.get(&key) {
        return now_ms.saturating_sub(*since) >= grace_ms;
    }
    if timers.len() < GRACE_TIMERS_MAX {
        timers.insert(key, now_ms);
    }
    grace_ms == 0
}

fn data_stripes(data: &ObjectData) -> BTreeSet<StripeId> {
    match data {
        ObjectData::Striped(manifest) => manifest.stripes.iter().map(|stripe| stripe.stripe_id).collect(),
        _ => BTreeSet::new(),
    }
}

fn manifest_stripes(record: Option<&Lww<Record>>) -> BTreeSet<StripeId> {
    match record.and_then(|register| register.value.as_ref()) {
        Some(Record::ObjectVersion(object)) => data_stripes(&object.data),
        Some(Record::MultipartPart(part)) => data_stripes(&part.data),
        _ => BTreeSet::new(),
    }
}

/// The stripes an owner's records reference, by the generation (`created_at_ms`) of the
/// bucket each record was written in. Generation 0 is unknown (a record from before
/// generations were recorded) and always counts, as it always did.
struct OwnerReferences {
    bucket: String,
    by_generation: BTreeMap<u64, BTreeSet<StripeId>>,
}

impl OwnerReferences {
    fn new(bucket: &str) -> OwnerReferences {
        OwnerReferences {
            bucket: bucket.to_string(),
            by_generation: BTreeMap::new(),
        }
    }

    fn add(&mut self, bucket_created_at_ms: u64, stripes: BTreeSet<StripeId>) {
        self.by_generation
            .entry(bucket_created_at_ms)
            .or_default()
            .extend(stripes);
    }

    /// Whether every record that references a stripe is of no known generation or of
    /// generation `bucket_created_at_ms`: then all its stripes are live, whatever the
    /// bucket is now (keeping is always safe).
    fn all_of_generation(&self, bucket_created_at_ms: u64) -> bool {
        self.by_generation
            .iter()
            .all(|(generation, stripes)| *generation == 0 || *generation == bucket_created_at_ms || stripes.is_empty())
    }

    /// Whether which stripes are referenced depends on the bucket's generation now.
    fn needs_bucket(&self) -> bool {
        self.by_generation
            .iter()
            .any(|(generation, stripes)| *generation != 0 && !stripes.is_empty())
    }

    /// The stripes referenced by records of the bucket that exists now (generation
    /// `current_bucket_created_at_ms`; None: no bucket of the name exists) or of no known
    /// generation. Records of any other generation belong to a deleted bucket: no
    /// request ever serves them again, so their stripes are garbage.
    fn all_stripes(self) -> BTreeSet<StripeId> {
        self.by_generation.into_values().flatten().collect()
    }

    fn live(self, current_bucket_created_at_ms: Option<u64>) -> BTreeSet<StripeId> {
        self.by_generation
            .into_iter()
            .filter(|(generation, _)| *generation == 0 || Some(*generation) == current_bucket_created_at_ms)
            .flat_map(|(_, stripes)| stripes)
            .collect()
    }
}

/// The bucket generations a repair pass has read so far. They only ever spare reads
/// that would keep something: a record of a generation seen is live (keeping is always
/// safe, and if its bucket went since, the next pass reads it afresh). Judging a record
/// stale always takes a bucket read made after the record was read.
#[derive(Default)]
struct BucketGenerationsSeen {
    generations: BTreeMap<String, u64>,
}

impl BucketGenerationsSeen {
    fn note(&mut self, bucket: &str, bucket_created_at_ms: u64) {
        if self.generations.len() < BUCKET_GENERATIONS_SEEN_MAX || self.generations.contains_key(bucket) {
            self.generations.insert(bucket.to_string(), bucket_created_at_ms);
        }
    }

    fn is(&self, bucket: &str, bucket_created_at_ms: u64) -> bool {
        self.generations.get(bucket) == Some(&bucket_created_at_ms)
    }

    fn keeps_every_record(&self, references: &OwnerReferences) -> bool {
        self.generations
            .get(&references.bucket)
            .is_some_and(|seen| references.all_of_generation(*seen))
    }
}

/// Bucket generations one repair pass remembers (beyond it, buckets are read per page).
const BUCKET_GENERATIONS_SEEN_MAX: usize = 10_000;

/// What one repair pass did, for the loop deciding when the next one runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairPassOutcome {
    /// The queue was cut at [`REPAIR_QUEUE_STRIPES_MAX`].
    pub overflowed: bool,
    /// Stripes for which the pass wrote shards (rebuilt or moved). Waiting out the grace
    /// of an old copy is not progress.
    pub stripes_written: u64,
}

/// Repair progress summed over the nodes that answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairSummary {
    /// Nodes whose repair is paused.
    pub paused_nodes: u32,
    pub queued_stripes: u64,
    pub queued_bytes: u64,
    pub repaired_stripes: u64,
    pub moved_shards: u64,
    pub bytes_per_s: u64,
    /// Queued bytes at the current rate (absent while nothing was measured yet).
    pub eta_s: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubSummary {
    pub shards_checked: u64,
    pub shards_total: u64,
    pub corrupt_found: u64,
    /// The fewest scrub passes any node has completed.
    pub passes_completed_min: u64,
}

/// The cluster's maintenance, as the `stripes`, `repair` and `scrub` of `admin status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceSummary {
    pub stripes: StripeHealth,
    pub repair: RepairSummary,
    pub scrub: ScrubSummary,
    pub gc_deleted_shards: u64,
    pub shards_stored: u64,
    pub nodes_reporting: u32,
    /// Live nodes that did not answer (their stripes are missing from the counts).
    pub nodes_unreachable: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMaintenance {
    pub node: String,
    pub report: Option<MaintenanceReport>,
    pub error: Option<String>,
}

/// `GET /v1/maintenance`: the summary and every node's report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceView {
    pub summary: MaintenanceSummary,
    pub nodes: Vec<NodeMaintenance>,
}

impl MaintenanceView {
    pub fn from_reports(reports: Vec<(NodeId, Result<MaintenanceReport, String>)>) -> MaintenanceView {
        let mut summary = MaintenanceSummary::default();
        let mut nodes = Vec::new();
        let mut passes_min: Option<u64> = None;
        for (node, report) in reports {
            match report {
                Ok(report) => {
                    summary.nodes_reporting += 1;
                    summary.stripes.add(&report.stripes);
                    let repair = &mut summary.repair;
                    repair.paused_nodes += u32::from(report.repair_paused);
                    repair.queued_stripes += report.repair_queued_stripes;
                    repair.queued_bytes += report.repair_queued_bytes;
                    repair.repaired_stripes += report.repaired_stripes_total;
                    repair.moved_shards += report.moved_shards_total;
                    repair.bytes_per_s += report.repair_bytes_per_s;
                    let scrub = &mut summary.scrub;
                    scrub.shards_checked += report.scrub_shards_checked;
                    scrub.shards_total += report.scrub_shards_total;
                    scrub.corrupt_found += report.scrub_corrupt_found_total;
                    passes_min = Some(passes_min.map_or(report.scrub_passes_completed, |passes| {
                        passes.min(report.scrub_passes_completed)
                    }));
                    summary.gc_deleted_shards += report.gc_deleted_shards_total;
                    summary.shards_stored += report.shards_stored;
                    nodes.push(NodeMaintenance {
                        node: node.to_string(),
                        report: Some(report),
                        error: None,
                    });
                }
                Err(error) => {
                    summary.nodes_unreachable.push(node.to_string());
                    nodes.push(NodeMaintenance {
                        node: node.to_string(),
                        report: None,
                        error: Some(error),
                    });
                }
            }
        }
        summary.scrub.passes_completed_min = passes_min.unwrap_or(0);
        let repair = &mut summary.repair;
        repair.eta_s = match (repair.queued_bytes, repair.bytes_per_s) {
            (0, _) => Some(0),
            (_, 0) => None,
            (queued, rate) => Some(queued.div_ceil(rate)),
        };
        MaintenanceView { summary, nodes }
    }
}

impl<E: Env> ClusterNode<E> {
    /// Every live node's maintenance report, summed.
    pub async fn maintenance_view(self: &Arc<Self>) -> MaintenanceView {
        MaintenanceView::from_reports(self.cluster_maintenance_reports().await)
    }

    pub(crate) fn restore_maintenance_state(&self) {
        let paused = matches!(
            self.load_maintenance_record(REPAIR_PAUSED_KEY),
            Some(MaintenanceRecord::RepairPausedV1(true))
        );
        let mut state = self.maintenance.lock().expect("not poisoned");
        state.report.repair_paused = paused;
        let now_ms = self.env.now_ms();
        // The first passes come soon after start (a restart may follow a failure), not
        // immediately: gossip must first say who is up.
        let settle_ms = self.membership_config().down_after_ms;
        state.next_repair_at_ms = now_ms + settle_ms.min(self.maintenance_config.repair_interval_ms);
        let saved_due_at_ms = |key: &[u8]| match self.load_maintenance_record(key) {
            Some(MaintenanceRecord::PassDueAtV1(due_at_ms)) => Some(due_at_ms),
            _ => None,
        };
        let scrub_interrupted = matches!(
            self.load_maintenance_record(SCRUB_CURSOR_KEY),
            Some(MaintenanceRecord::ScrubCursorV1(Some(_)))
        );
        state.next_scrub_at_ms = first_pass_due_at_ms(
            saved_due_at_ms(SCRUB_DUE_KEY),
            scrub_interrupted,
            now_ms,
            self.maintenance_config.scrub_interval_ms,
            settle_ms,
        );
        state.next_tidy_at_ms = first_pass_due_at_ms(
            saved_due_at_ms(TIDY_DUE_KEY),
            false,
            now_ms,
            self.maintenance_config.tidy_interval_ms(),
            settle_ms,
        );
    }

    fn load_maintenance_record(&self, key: &[u8]) -> Option<MaintenanceRecord> {
        let bytes = self.env.meta_store().get(Tree::System, key).ok()??;
        postcard::from_bytes(&bytes).ok()
    }

    fn save_maintenance_record(&self, key: &[u8], record: &MaintenanceRecord) {
        let bytes = postcard::to_allocvec(record).expect("maintenance records encode");
        if let Err(error) = self.env.meta_store().put(Tree::System, key, &bytes) {
            tracing::error!(%error, "cannot persist maintenance state");
        }
    }

    /// This node's maintenance progress (the answer to `MaintenanceReport`).
    pub fn maintenance_report(&self) -> MaintenanceReport {
        let usage = self.env.shard_store().usage();
        let mut report = self.maintenance.lock().expect("not poisoned").report.clone();
        report.shards_stored = usage.shard_count;
        report.used_bytes = usage.used_bytes;
        report
    }

    /// Applies an operator's command to this node's maintenance.
    pub fn control_maintenance(&self, command: MaintenanceCommand) -> MaintenanceReport {
        {
            let mut state = self.maintenance.lock().expect("not poisoned");
            match command {
                MaintenanceCommand::RepairStart => {
                    state.report.repair_paused = false;
                    state.repair_requested = true;
                }
                MaintenanceCommand::RepairPause => state.report.repair_paused = true,
                MaintenanceCommand::ScrubStart => state.scrub_requested = true,
                MaintenanceCommand::SurveyNow => state.repair_requested = true,
            }
        }
        if matches!(
            command,
            MaintenanceCommand::RepairStart | MaintenanceCommand::RepairPause
        ) {
            let paused = command == MaintenanceCommand::RepairPause;
            self.save_maintenance_record(REPAIR_PAUSED_KEY, &MaintenanceRecord::RepairPausedV1(paused));
        }
        self.maintenance_report()
    }

    /// Every live node's maintenance report (ours included), for cluster-wide status.
    pub async fn cluster_maintenance_reports(self: &Arc<Self>) -> Vec<(NodeId, Result<MaintenanceReport, String>)> {
        self.broadcast_maintenance(Request::MaintenanceReport).await
    }

    /// Sends a maintenance command to every live node (ours included).
    pub async fn control_cluster_maintenance(
        self: &Arc<Self>,
        command: MaintenanceCommand,
    ) -> Vec<(NodeId, Result<MaintenanceReport, String>)> {
        self.broadcast_maintenance(Request::MaintenanceControl { command })
            .await
    }

    async fn broadcast_maintenance(
        self: &Arc<Self>,
        request: Request,
    ) -> Vec<(NodeId, Result<MaintenanceReport, String>)> {
        let me = self.env.node_id();
        let layout = self.layout();
        let nodes: Vec<NodeId> = layout
            .entries()
            .filter(|entry| entry.status != bdr_protocol::layout::NodeStatus::Removed)
            .map(|entry| entry.node)
            .filter(|node| *node == me || self.liveness(node) != Liveness::Down)
            .collect();
        let asks = nodes.into_iter().map(|node| {
            let request = request.clone();
            async move {
                if node == me {
                    let report = match request {
                        Request::MaintenanceControl { command } => self.control_maintenance(command),
                        _ => self.maintenance_report(),
                    };
                    return (node, Ok(report));
                }
                let answer = match self.env.request(node, request, MAINTENANCE_REPORT_TIMEOUT_MS).await {
                    Ok(Response::Maintenance(report)) => Ok(report),
                    Ok(Response::Error { message, .. }) => Err(message),
                    Ok(other) => Err(format!("unexpected answer {other:?}")),
                    Err(error) => Err(error.to_string()),
                };
                (node, answer)
            }
        });
        futures::future::join_all(asks).await
    }

    /// Marks `node` removed for good, after checking (unless `force`) that every stripe is
    /// at full redundancy without it: the node must be drained or down, and a survey by
    /// every live node, started after the request, must find all stripes healthy.
    pub async fn remove_node(self: &Arc<Self>, node: NodeId, force: bool) -> Result<StripeHealth, RemoveError> {
        let entry = self
            .layout()
            .get(&node)
            .cloned()
            .ok_or_else(|| super::ClusterError::UnknownNode(node.to_string()))?;
        let mut health = StripeHealth::default();
        if !force {
            let down = node != self.env.node_id() && self.liveness(&node) == Liveness::Down;
            if entry.status == bdr_protocol::layout::NodeStatus::Active && !down {
                return Err(RemoveError::StillActive(node.to_string()));
            }
            health = self.fresh_cluster_health().await?;
            let short = health.healthy != health.total || health.unknown > 0;
            if short {
                return Err(RemoveError::NotSafe(health));
            }
        }
        self.set_node_status(node, bdr_protocol::layout::NodeStatus::Removed)
            .await?;
        Ok(health)
    }

    /// Has every live node run a survey starting now, and sums the health they find.
    pub async fn fresh_cluster_health(self: &Arc<Self>) -> Result<StripeHealth, RemoveError> {
        let before: BTreeMap<NodeId, u64> = self
            .control_cluster_maintenance(MaintenanceCommand::SurveyNow)
            .await
            .into_iter()
            .filter_map(|(node, report)| {
                // A pass already running began before the request: wait for the next.
                let report = report.ok()?;
                Some((
                    node,
                    report.repair_passes_completed + u64::from(report.repair_pass_in_progress),
                ))
            })
            .collect();
        let deadline_ms = self.env.now_ms() + REMOVE_CHECK_TIMEOUT_MS;
        loop {
            self.env.sleep(MAINTENANCE_TICK_MS).await;
            let reports: BTreeMap<NodeId, MaintenanceReport> = self
                .cluster_maintenance_reports()
                .await
                .into_iter()
                .filter_map(|(node, report)| Some((node, report.ok()?)))
                .collect();
            let waiting: Vec<String> = before
                .iter()
                .filter(|(node, passes)| {
                    reports
                        .get(node)
                        .is_none_or(|report| report.repair_passes_completed <= **passes)
                })
                .map(|(node, _)| node.short())
                .collect();
            if waiting.is_empty() {
                let mut health = StripeHealth::default();
                for report in reports.values() {
                    health.add(&report.stripes);
                }
                return Ok(health);
            }
            if self.env.now_ms() >= deadline_ms {
                return Err(RemoveError::Timeout(format!("waiting for {}", waiting.join(", "))));
            }
        }
    }

    /// Storage side of HasShards.
    pub(crate) async fn serve_has_shards(&self, keys: Vec<ShardRef>) -> Response {
        if keys.len() > HAS_SHARDS_KEYS_MAX {
            return Response::error(RemoteErrorKind::BadRequest, "too many shard keys");
        }
        let keys = keys
            .into_iter()
            .map(|key| ShardKey {
                stripe_id: key.stripe_id,
                index: key.index,
            })
            .collect();
        match self.env.shard_store().contains(keys).await {
            Ok(present) => Response::HasShards { present },
            Err(error) => Response::error(RemoteErrorKind::Internal, error.to_string()),
        }
    }

    /// Which metadata partitions this node maintains: those whose first replica that is
    /// not down (in our view) is us.
    fn maintained_partitions(&self, layout: &Arc<Layout>) -> Vec<u32> {
        let me = self.env.node_id();
        let now_ms = self.env.now_ms();
        // Judged once per node, not once per partition replica (256 partitions).
        let down: BTreeSet<NodeId> = {
            let membership = self.membership.lock().expect("not poisoned");
            layout
                .entries()
                .map(|entry| entry.node)
                .filter(|node| membership.liveness(node, now_ms) == Liveness::Down)
                .collect()
        };
        (0..METADATA_PARTITIONS)
            .filter(|partition| {
                let Ok(placement) = self.partition_replicas(layout, *partition) else {
                    return false;
                };
                placement.replicas.iter().find(|node| !down.contains(node)) == Some(&me)
            })
            .collect()
    }

    /// Where the shards of a stripe should be now: placement over nodes that are not down.
    fn stripe_targets(&self, layout: &Layout, stripe_id: &StripeId, record: &StripeRecord) -> Option<Vec<NodeId>> {
        self.placement_without_down(
            layout,
            stripe_id,
            record.codec.data_shards,
            record.codec.parity_shards,
            None,
        )
        .map(|placement| placement.holders)
    }

    /// Placement over the nodes that are not down. `canonical`, the stripe's placement
    /// over all nodes if the caller has it, is the answer when no candidate is down (the
    /// usual case), which spares placing the stripe a second time.
    pub(crate) fn placement_without_down(
        &self,
        layout: &Layout,
        stripe_id: &StripeId,
        data_shards: u8,
        parity_shards: u8,
        canonical: Option<&Placement>,
    ) -> Option<Placement> {
        let now_ms = self.env.now_ms();
        let membership = self.membership.lock().expect("not poisoned");
        let is_up = |node: &NodeId| membership.liveness(node, now_ms) != Liveness::Down;
        if let Some(canonical) = canonical {
            let all_up = layout
                .entries()
                .filter(|entry| entry.is_placement_candidate())
                .all(|entry| is_up(&entry.node));
            if all_up {
                return Some(canonical.clone());
            }
        }
        place_with(layout, stripe_id, data_shards, parity_shards, is_up).ok()
    }

    // ----- the loops ------------------------------------------------------------------

    /// What decides where shards belong: the layout, and which nodes are down.
    fn placement_inputs(&self) -> ([u8; 32], Vec<NodeId>) {
        let now_ms = self.env.now_ms();
        let membership = self.membership.lock().expect("not poisoned");
        let down = membership
            .layout()
            .entries()
            .map(|entry| entry.node)
            .filter(|node| membership.liveness(node, now_ms) == Liveness::Down)
            .collect();
        (membership.layout_digest(), down)
    }

    /// Runs repair passes: every `repair_interval`, at once when asked, as soon as the
    /// layout or the set of down nodes changes (a lost node is rebuilt without waiting for
    /// the interval), and back to back while passes find work (the next pass confirms
    /// the repairs and takes what the last one queued too late) while they make progress.
    pub(crate) async fn repair_loop(self: Arc<Self>) {
        let mut last_inputs = None;
        loop {
            self.env.sleep(REPAIR_TICK_MS).await;
            let now_ms = self.env.now_ms();
            let inputs = self.placement_inputs();
            let due = {
                let mut state = self.maintenance.lock().expect("not poisoned");
                let due = state.repair_requested
                    || now_ms >= state.next_repair_at_ms
                    || last_inputs.as_ref() != Some(&inputs);
                if due {
                    state.repair_requested = false;
                }
                due
            };
            if !due || !self.is_joined() {
                continue;
            }
            last_inputs = Some(inputs);
            let outcome = self.repair_pass().await;
            let mut state = self.maintenance.lock().expect("not poisoned");
            // Only progress earns an immediate pass: stripes that cannot be repaired now
            // (too few shards reachable) must not keep passes running back to back.
            let interval_ms = if outcome.overflowed || outcome.stripes_written > 0 {
                0
            } else {
                self.maintenance_config.repair_interval_ms
            };
            state.next_repair_at_ms = self.env.now_ms() + interval_ms;
        }
    }

    pub(crate) async fn scrub_loop(self: Arc<Self>) {
        loop {
            self.env.sleep(MAINTENANCE_TICK_MS).await;
            let now_ms = self.env.now_ms();
            let next_due_at_ms = {
                let mut state = self.maintenance.lock().expect("not poisoned");
                let due = state.scrub_requested || now_ms >= state.next_scrub_at_ms;
                if due {
                    state.scrub_requested = false;
                    state.next_scrub_at_ms = now_ms + self.maintenance_config.scrub_interval_ms;
                }
                due.then_some(state.next_scrub_at_ms)
            };
            if let Some(next_due_at_ms) = next_due_at_ms {
                self.save_maintenance_record(SCRUB_DUE_KEY, &MaintenanceRecord::PassDueAtV1(next_due_at_ms));
                self.scrub_pass().await;
            }
        }
    }

    /// Tidies this node's shards every [`MaintenanceConfig::tidy_interval_ms`]. It used to
    /// follow each scrub pass, a week apart by default and never on a node restarted
    /// more often than that: the simulator at production timers found old copies of
    /// moved shards still held hours after the cluster healed.
    pub(crate) async fn tidy_loop(self: Arc<Self>) {
        loop {
            self.env.sleep(MAINTENANCE_TICK_MS).await;
            // Orphans are judged against the cluster's records: not before joining it.
            if !self.is_joined() {
                continue;
            }
            let now_ms = self.env.now_ms();
            let next_due_at_ms = {
                let mut state = self.maintenance.lock().expect("not poisoned");
                let due = now_ms >= state.next_tidy_at_ms;
                if due {
                    state.next_tidy_at_ms = now_ms + self.maintenance_config.tidy_interval_ms();
                }
                due.then_some(state.next_tidy_at_ms)
            };
            if let Some(next_due_at_ms) = next_due_at_ms {
                self.save_maintenance_record(TIDY_DUE_KEY, &MaintenanceRecord::PassDueAtV1(next_due_at_ms));
                self.tidy_local_shards().await;
            }
        }
    }

    // ----- maintainer -----------------------------------------------------------------

    /// One pass over the stripes this node maintains.
    pub async fn repair_pass(self: &Arc<Self>) -> RepairPassOutcome {
        let _pass = self.maintenance_passes.repair.lock().await;
        self.maintenance
            .lock()
            .expect("not poisoned")
            .report
            .repair_pass_in_progress = true;
        let layout = self.layout();
        let mut health = StripeHealth::default();
        let mut queue: Vec<RepairTask> = Vec::new();
        let mut overflowed = false;
        let mut owners: BTreeMap<StripeOwner, Option<BTreeSet<StripeId>>> = BTreeMap::new();
        let mut seen: BTreeSet<StripeId> = BTreeSet::new();
        let mut stale_rows_seen: BTreeSet<Vec<u8>> = BTreeSet::new();
        let mut buckets_seen = BucketGenerationsSeen::default();
        let pass = self
            .maintenance
            .lock()
            .expect("not poisoned")
            .report
            .repair_passes_completed;
        for partition in self.maintained_partitions(&layout) {
            let mut after: Option<Vec<u8>> = None;
            loop {
                let (page, full_page) = match self.next_local_page(Table::Stripes, partition, &mut after) {
                    Ok(page) => page,
                    Err(error) => {
                        tracing::error!(%error, partition, "cannot scan stripe records");
                        break;
                    }
                };
                let records: Vec<(StripeId, StripeRecord)> = page
                    .iter()
                    .filter_map(|(key, value)| decode_stripe_row(key, value))
                    .collect();
                let read_due: Vec<bool> = {
                    let state = self.maintenance.lock().expect("not poisoned");
                    records
                        .iter()
                        .map(|(stripe_id, record)| {
                            owner_read_due(&state.confirmed_referenced, stripe_id, &record.owner, pass)
                        })
                        .collect()
                };
                let owners_due = records
                    .iter()
                    .zip(&read_due)
                    .filter(|(_, due)| **due)
                    .map(|((_, record), _)| &record.owner);
                self.load_owner_references(owners_due, &mut owners, &mut buckets_seen)
                    .await;
                // Applied to the state once per page, not under a lock per stripe.
                let (mut confirmed, mut unconfirmed) = (Vec::new(), Vec::new());
                let mut live = Vec::new();
                for ((stripe_id, record), read_due) in records.into_iter().zip(read_due) {
                    seen.insert(stripe_id);
                    let mut reference = match owners.get(&record.owner) {
                        _ if !read_due => Reference::Referenced,
                        Some(Some(referenced)) if referenced.contains(&stripe_id) => {
                            confirmed.push(stripe_id);
                            Reference::Referenced
                        }
                        Some(Some(_)) => Reference::Unreferenced,
                        _ => Reference::Unknown,
                    };
                    if reference != Reference::Referenced {
                        unconfirmed.push(stripe_id);
                    }
                    if reference == Reference::Unreferenced && self.is_garbage(&stripe_id) {
                        // The pass's owner cache may predate the write's commit (a pass
                        // can outlast a write deadline under faults), so the owner is
                        // read again before anything is deleted.
                        reference = match self.owner_references_now(&record.owner, &stripe_id).await {
                            Some(false) => Reference::Garbage,
                            Some(true) => Reference::Referenced,
                            // Some replica is out of reach: the stripe waits, still
                            // unreferenced by a quorum (so it holds back no node removal,
                            // which is what lets a lost replica leave the layout).
                            None => Reference::Unreferenced,
                        };
                        tracing::debug!(stripe = %stripe_id.short(), ?reference, "garbage stripe's owner read afresh");
                    }
                    match reference {
                        Reference::Unknown => {
                            tracing::trace!(stripe = %stripe_id.short(), "stripe owner unknown");
                            health.unknown += 1
                        }
                        Reference::Referenced => {
                            self.maintenance
                                .lock()
                                .expect("not poisoned")
                                .unreferenced_since_ms
                                .remove(&stripe_id);
                            live.push((stripe_id, record));
                        }
                        // Neither counted nor repaired.
                        Reference::Unreferenced => {
                            tracing::trace!(stripe = %stripe_id.short(), "unreferenced stripe");
                        }
                        Reference::Garbage => self.collect_stripe(&layout, &stripe_id, &record).await,
                    }
                }
                {
                    let mut state = self.maintenance.lock().expect("not poisoned");
                    for stripe_id in unconfirmed {
                        state.confirmed_referenced.remove(&stripe_id);
                    }
                    let room = CONFIRMED_STRIPES_MAX.saturating_sub(state.confirmed_referenced.len());
                    state.confirmed_referenced.extend(confirmed.into_iter().take(room));
                }
                self.survey(&layout, live, &mut health, &mut queue).await;
                if queue.len() > REPAIR_QUEUE_STRIPES_MAX {
                    queue.sort_by_key(|task| (task.available, task.stripe_id));
                    queue.truncate(REPAIR_QUEUE_STRIPES_MAX);
                    overflowed = true;
                }
                if !full_page {
                    break;
                }
            }
            self.collect_stale_versions(partition, &mut stale_rows_seen, &mut buckets_seen)
                .await;
        }
        {
            // Forget timers of stripes (and rows) no longer ours or no longer there.
            let mut state = self.maintenance.lock().expect("not poisoned");
            state
                .stale_version_since_ms
                .retain(|row, _| stale_rows_seen.contains(row));
            state.unreferenced_since_ms.retain(|stripe, _| seen.contains(stripe));
            state.confirmed_referenced.retain(|stripe| seen.contains(stripe));
            state.extra_copy_since_ms.retain(|key, _| seen.contains(&key.stripe_id));
            state.report.stripes = health;
        }
        queue.sort_by_key(|task| (task.available, task.stripe_id));
        let stripes_written = self.run_repairs(queue).await;
        let mut state = self.maintenance.lock().expect("not poisoned");
        state.report.repair_passes_completed += 1;
        state.report.repair_pass_in_progress = false;
        state.report.repair_last_pass_completed_at_ms = self.env.now_ms();
        RepairPassOutcome {
            overflowed,
            stripes_written,
        }
    }

    /// The stripes `owner`'s records reference now, by bucket generation; None if that
    /// cannot be read (no quorum).
    async fn owner_references(
        self: &Arc<Self>,
        owner: &StripeOwner,
        replicas_read: ReplicasRead,
    ) -> Option<OwnerReferences> {
        match owner {
            StripeOwner::Object {
                bucket,
                key,
                version_id,
            } => {
                let mut references = OwnerReferences::new(bucket);
                // A "null" row's address carries its bucket generation, which the owner
                // does not name: every generation's "null" row of the key is read (few:
                // maintenance collects those of deleted buckets).
                if version_id == NULL_VERSION {
                    let mut sort_prefix = key.as_bytes().to_vec();
                    sort_prefix.push(0);
                    sort_prefix.extend_from_slice(NULL_VERSION.as_bytes());
                    self.add_version_references(bucket, &sort_prefix, &mut references, replicas_read)
                        .await?;
                    return Some(references);
                }
                // A versioned id's row does not depend on the generation.
                let register = self
                    .meta_get_from(Table::Objects, &object_row(bucket, 0, key, version_id), replicas_read)
                    .await
                    .ok()?;
                if let Some(Lww {
                    value: Some(Record::ObjectVersion(object)),
                    ..
                }) = register
                {
                    references.add(object.bucket_created_at_ms, data_stripes(&object.data));
                }
                Some(references)
            }
            StripeOwner::Part {
                bucket,
                key,
                upload_id,
                part_number,
            } => {
                self.part_references(bucket, key, upload_id, *part_number, replicas_read)
                    .await
            }
        }
    }

    /// Whether `owner` references `stripe_id` now, its records and then its bucket read
    /// afresh (None: they cannot be read). Garbage collection asks this last: the
    /// unreferenced timer proves that any write of the stripe has committed or never
    /// will only for owner reads made after it ran out.
    async fn owner_references_now(self: &Arc<Self>, owner: &StripeOwner, stripe_id: &StripeId) -> Option<bool> {
        // From every replica: a record that reached only some (its writer crashed
        // mid-write) is spread by anti-entropy later, and must not then name a stripe
        // collected meanwhile. A replica that does not answer keeps the stripe.
        let references = self.owner_references(owner, ReplicasRead::All).await?;
        let live = match references.needs_bucket() {
            true => {
                let current = self.bucket_generation(&references.bucket, ReplicasRead::All).await?;
                references.live(current)
            }
            false => references.live(None),
        };
        Some(live.contains(stripe_id))
    }

    /// Reads the references of every owner in `wanted` not yet in `owners` (a per-pass
    /// cache, so an object of many stripes is read once), a bounded number at a time.
    async fn load_owner_references(
        self: &Arc<Self>,
        wanted: impl Iterator<Item = &StripeOwner>,
        owners: &mut BTreeMap<StripeOwner, Option<BTreeSet<StripeId>>>,
        buckets_seen: &mut BucketGenerationsSeen,
    ) {
        let missing: Vec<StripeOwner> = wanted
            .filter(|owner| !owners.contains_key(*owner))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .cloned()
            .collect();
        if owners.len() + missing.len() > OWNER_CACHE_ENTRIES_MAX {
            owners.clear();
        }
        for batch in missing.chunks(LOOKUPS_IN_FLIGHT_MAX) {
            let reads = batch
                .iter()
                .map(|owner| self.owner_references(owner, ReplicasRead::Quorum));
            let results = futures::future::join_all(reads).await;
            // The buckets are read after their owners' records, never before: a record
            // names a generation its bucket had before the record was written, and a
            // generation never comes back, so a bucket read later that shows another one
            // (or none) means the record's bucket is gone for good. Read the other way
            // round, a bucket created (and an object put in it) between the two reads
            // would make a live record look orphaned.
            // A generation seen earlier in the pass may only keep stripes: records of
            // it are live without a read (and if the bucket went since, a later pass
            // reads it afresh).
            let names: BTreeSet<String> = results
                .iter()
                .flatten()
                .filter(|references| references.needs_bucket())
                .filter(|references| !buckets_seen.keeps_every_record(references))
                .map(|references| references.bucket.clone())
                .collect();
            let generations = self.read_bucket_generations(names, buckets_seen).await;
            let resolved = results.into_iter().map(|references| {
                let references = references?;
                if !references.needs_bucket() {
                    return Some(references.live(None));
                }
                if let Some(current) = generations.get(&references.bucket) {
                    // A bucket that could not be read: decide nothing.
                    return current.map(|current| references.live(current));
                }
                debug_assert!(buckets_seen.keeps_every_record(&references));
                Some(references.all_stripes())
            });
            owners.extend(batch.iter().cloned().zip(resolved));
        }
    }

    /// Reads the generations of the buckets `names` now (None where one cannot be read)
    /// and notes them as seen in this pass.
    async fn read_bucket_generations(
        self: &Arc<Self>,
        names: BTreeSet<String>,
        buckets_seen: &mut BucketGenerationsSeen,
    ) -> BTreeMap<String, Option<Option<u64>>> {
        let generations: BTreeMap<String, Option<Option<u64>>> =
            futures::future::join_all(names.into_iter().map(|name| async move {
                let generation = self.bucket_generation(&name, ReplicasRead::Quorum).await;
                (name, generation)
            }))
            .await
            .into_iter()
            .collect();
        for (name, generation) in &generations {
            if let Some(Some(current)) = generation {
                buckets_seen.note(name, *current);
            }
        }
        generations
    }

    /// The `created_at_ms` of the bucket named `name` (Some(None): there is none); None if
    /// it cannot be read (no quorum).
    async fn bucket_generation(self: &Arc<Self>, name: &str, replicas_read: ReplicasRead) -> Option<Option<u64>> {
        match self
            .meta_get_from(Table::Buckets, &bucket_row(name), replicas_read)
            .await
            .ok()?
        {
            Some(Lww {
                value: Some(Record::Bucket(bucket)),
                ..
            }) => Some(Some(bucket.created_at_ms)),
            _ => Some(None),
        }
    }

    /// Stripes a part's stripe may be referenced from: the part while its upload is open
    /// (under the upload's bucket generation: an upload of a deleted bucket never
    /// completes), then the object versions of its key (a completed upload moved them
    /// there). The part is read before the objects: completion commits the object before
    /// it closes the upload, so this order never misses a reference.
    async fn part_references(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        upload_id: &str,
        part_number: u32,
        replicas_read: ReplicasRead,
    ) -> Option<OwnerReferences> {
        let upload = self
            .meta_get_from(
                Table::MultipartUploads,
                &upload_row(bucket, key, upload_id),
                replicas_read,
            )
            .await
            .ok()?;
        let mut referenced = OwnerReferences::new(bucket);
        if let Some(Lww {
            value: Some(upload), ..
        }) = upload
        {
            let part = self
                .meta_get_from(Table::MultipartParts, &part_row(upload_id, part_number), replicas_read)
                .await
                .ok()?;
            // Anything else in the uploads table is unexpected: it counts as of no known
            // generation, so it keeps the part (never drop data on a surprise).
            let generation = match upload {
                Record::MultipartUpload(upload) => upload.bucket_created_at_ms,
                _ => 0,
            };
            referenced.add(generation, manifest_stripes(part.as_ref()));
        }
        let mut sort_prefix = key.as_bytes().to_vec();
        sort_prefix.push(0);
        self.add_version_references(bucket, &sort_prefix, &mut referenced, replicas_read)
            .await?;
        Some(referenced)
    }

    /// Adds the stripes of every version of `bucket` whose row's sort key starts with
    /// `sort_prefix` to `references`, by generation; None if they cannot be read.
    async fn add_version_references(
        self: &Arc<Self>,
        bucket: &str,
        sort_prefix: &[u8],
        references: &mut OwnerReferences,
        replicas_read: ReplicasRead,
    ) -> Option<()> {
        self.meta_scan_pages(
            Table::Objects,
            bucket.as_bytes(),
            sort_prefix,
            VERSIONS_PAGE_ROWS,
            replicas_read,
            |page| {
                for (_, register) in &page {
                    if let Some(Record::ObjectVersion(object)) = &register.value {
                        references.add(object.bucket_created_at_ms, data_stripes(&object.data));
                    }
                }
                std::ops::ControlFlow::<()>::Continue(())
            },
        )
        .await
        .ok()
        .map(|_| ())
    }

    /// Tombstones the object version rows of `partition` that a deleted bucket left
    /// behind: a write that committed while (or just after) its bucket was deleted names
    /// a generation no bucket of its name has any more. No request serves such a version;
    /// this removes its row (and inline data), and with it the last reference to its
    /// stripes. Versions of no known generation (0) are kept, as they always were.
    ///
    /// A row goes only after it was seen stale, holding the same register, continuously
    /// for the write deadline plus the grace (on this node's clock), and only if a quorum
    /// still holds that register. Its tombstone is stamped just above that register and
    /// below every stamp a writer that saw the register takes (same wall time and counter,
    /// the greatest node id), so it can only replace the stale version, never a write
    /// that came after it.
    /// The next page (up to [`SURVEY_BATCH_STRIPES`] rows) of this replica's rows of
    /// `table` in `partition` after `cursor`, which it advances; and whether the page is
    /// full (more may follow).
    fn next_local_page(
        &self,
        table: Table,
        partition: u32,
        cursor: &mut Option<Vec<u8>>,
    ) -> Result<(Vec<KeyValue>, bool), StoreError> {
        let page = self.env.meta_store().scan(
            Tree::Table(table),
            &RowKey::partition_prefix(partition),
            cursor.as_deref(),
            SURVEY_BATCH_STRIPES,
        )?;
        *cursor = page.last().map(|(key, _)| key.clone());
        let full_page = page.len() == SURVEY_BATCH_STRIPES;
        Ok((page, full_page))
    }

    async fn collect_stale_versions(
        self: &Arc<Self>,
        partition: u32,
        rows_seen: &mut BTreeSet<Vec<u8>>,
        buckets_seen: &mut BucketGenerationsSeen,
    ) {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (page, full_page) = match self.next_local_page(Table::Objects, partition, &mut after) {
                Ok(page) => page,
                Err(error) => {
                    tracing::error!(%error, partition, "cannot scan object versions");
                    return;
                }
            };
            // (row, register timestamp, bucket, bucket generation) of versions whose
            // generation is known.
            let versions: Vec<(Vec<u8>, HlcTimestamp, String, u64)> = page
                .into_iter()
                .filter_map(|(key, value)| {
                    let register = decode_stored_value(&value).ok()?;
                    match register.value? {
                        Record::ObjectVersion(object) if object.bucket_created_at_ms != 0 => {
                            Some((key, register.timestamp, object.bucket, object.bucket_created_at_ms))
                        }
                        _ => None,
                    }
                })
                .collect();
            // Buckets are read after the rows, as in `load_owner_references`; a version
            // of the generation seen earlier in the pass is kept without a read.
            let names: BTreeSet<String> = versions
                .iter()
                .filter(|(_, _, bucket, generation)| !buckets_seen.is(bucket, *generation))
                .map(|(_, _, bucket, _)| bucket.clone())
                .collect();
            let generations = self.read_bucket_generations(names, buckets_seen).await;
            for (row, timestamp, bucket, generation) in versions {
                let stale = match generations.get(&bucket) {
                    Some(Some(current)) => *current != Some(generation),
                    None => {
                        debug_assert!(buckets_seen.is(&bucket, generation));
                        false
                    }
                    // The bucket could not be read: decide nothing, keep the timer.
                    _ => {
                        rows_seen.insert(row);
                        continue;
                    }
                };
                if !stale {
                    self.maintenance
                        .lock()
                        .expect("not poisoned")
                        .stale_version_since_ms
                        .remove(&row);
                    continue;
                }
                rows_seen.insert(row.clone());
                if self.stale_version_expired(&row, timestamp) {
                    self.tombstone_stale_version(&row, timestamp).await;
                }
            }
            if !full_page {
                return;
            }
        }
    }

    /// Whether `row` has been seen stale, holding the register stamped `timestamp`,
    /// continuously for the write deadline plus the grace: any write that began before
    /// the register was there has committed or failed by then.
    fn stale_version_expired(&self, row: &[u8], timestamp: HlcTimestamp) -> bool {
        let now_ms = self.env.now_ms();
        let config = self.maintenance_config;
        let wait_ms = config.write_deadline_ms.saturating_add(config.gc_grace_ms);
        let mut state = self.maintenance.lock().expect("not poisoned");
        match state.stale_version_since_ms.get(row) {
            Some((seen, since_ms)) if *seen == timestamp => now_ms.saturating_sub(*since_ms) >= wait_ms,
            // First seen, or holding another register than before: the wait starts over.
            seen => {
                if seen.is_some() || state.stale_version_since_ms.len() < GRACE_TIMERS_MAX {
                    state.stale_version_since_ms.insert(row.to_vec(), (timestamp, now_ms));
                }
                wait_ms == 0
            }
        }
    }

    async fn tombstone_stale_version(self: &Arc<Self>, encoded_row: &[u8], timestamp: HlcTimestamp) {
        let Ok(row) = RowKey::decode(encoded_row) else { return };
        let tombstone_at = HlcTimestamp {
            node: NodeId([0xff; 32]),
            ..timestamp
        };
        if tombstone_at <= timestamp {
            return;
        }
        // Another register on a quorum (a newer write, or one this replica has not yet
        // merged): this one is not the row any more, and its successor gets its own wait.
        match self.meta_get(Table::Objects, &row).await {
            Ok(Some(current)) if current.timestamp == timestamp => {}
            _ => return,
        }
        match self
            .meta_write_register(Table::Objects, &row, &Lww::tombstone(tombstone_at))
            .await
        {
            Ok(()) => {
                tracing::debug!(bucket = %String::from_utf8_lossy(&row.partition_key), "version of a deleted bucket collected");
                self.maintenance
                    .lock()
                    .expect("not poisoned")
                    .stale_version_since_ms
                    .remove(encoded_row);
            }
            Err(error) => tracing::debug!(%error, "cannot tombstone a version of a deleted bucket"),
        }
    }

    /// Seen unreferenced, by this node's clock, continuously for the write deadline plus
    /// the grace period. The record existed when first seen, so its write began before;
    /// a write commits within the deadline by its own clock or never. Both spans are
    /// measured locally, so clock skew between nodes cannot shorten them (only a
    /// restart, which resets the timer, can lengthen them).
    fn is_garbage(&self, stripe_id: &StripeId) -> bool {
        let now_ms = self.env.now_ms();
        let config = self.maintenance_config;
        let wait_ms = config.write_deadline_ms.saturating_add(config.gc_grace_ms);
        let mut state = self.maintenance.lock().expect("not poisoned");
        grace_elapsed(&mut state.unreferenced_since_ms, *stripe_id, now_ms, wait_ms)
    }

    /// Deletes a garbage stripe's shards wherever they may be, then its record.
    async fn collect_stripe(self: &Arc<Self>, layout: &Layout, stripe_id: &StripeId, record: &StripeRecord) {
        let (k, m) = (record.codec.data_shards, record.codec.parity_shards);
        let mut places: BTreeSet<(NodeId, u8)> = BTreeSet::new();
        for (index, holder) in record.holders.iter().enumerate() {
            places.insert((*holder, index as u8));
        }
        let canonical = place(layout, stripe_id, k, m).ok();
        let targets = self.placement_without_down(layout, stripe_id, k, m, canonical.as_ref());
        for placement in [canonical, targets].into_iter().flatten() {
            for (index, holder) in placement.holders.into_iter().enumerate() {
                places.insert((holder, index as u8));
            }
        }
        // A removed node never answers again (its disk is gone or wiped): waiting for it
        // would keep the record, and the shards it protects elsewhere, forever.
        let places: Vec<(NodeId, u8)> = places
            .into_iter()
            .filter(|(node, _)| {
                layout
                    .get(node)
                    .is_none_or(|entry| entry.status != bdr_protocol::layout::NodeStatus::Removed)
            })
            .collect();
        let deletes = places
            .iter()
            .map(|(node, index)| self.delete_shard_on(*node, *stripe_id, *index));
        let results = futures::future::join_all(deletes).await;
        let deleted = results.iter().filter(|result| matches!(result, Ok(true))).count() as u64;
        // A holder that is down is not waited for: it may stay down for days, and every
        // stripe with a shard on it would keep its garbage that long. Once the record is
        // a tombstone, the holder drops its copy as an orphan when it is back (tidy).
        // A holder that is up but failed to answer is asked again next pass.
        let unanswered_up: Vec<(NodeId, &String)> = places
            .iter()
            .zip(&results)
            .filter_map(|((node, _), result)| result.as_ref().err().map(|error| (*node, error)))
            .filter(|(node, _)| self.liveness(node) != Liveness::Down)
            .collect();
        if !unanswered_up.is_empty() {
            tracing::debug!(stripe = %stripe_id.short(), ?unanswered_up, "garbage stripe kept: a live holder did not answer");
            return;
        }
        match self.meta_put(Table::Stripes, &stripe_row(stripe_id), None).await {
            Ok(_) => {
                tracing::debug!(stripe = %stripe_id.short(), deleted, "garbage stripe collected");
                let mut state = self.maintenance.lock().expect("not poisoned");
                state.report.gc_deleted_shards_total += deleted;
                state.report.gc_deleted_stripe_records_total += 1;
                state.unreferenced_since_ms.remove(stripe_id);
            }
            Err(error) => tracing::debug!(%error, "cannot tombstone a garbage stripe record"),
        }
    }

    async fn delete_shard_on(&self, node: NodeId, stripe_id: StripeId, index: u8) -> Result<bool, String> {
        if node == self.env.node_id() {
            return self
                .env
                .shard_store()
                .delete(ShardKey { stripe_id, index })
                .await
                .map_err(|error| error.to_string());
        }
        match self
            .shard_request(node, Request::DeleteShard { stripe_id, index }, SHARD_WRITE_TIMEOUT_MS)
            .await
        {
            // Deleted answers alike whether the shard was there.
            Ok(Response::Deleted) => Ok(true),
            Ok(Response::Error { message, .. }) => Err(message),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Asks each node which of `keys` it holds, in batches; None where it could not answer.
    async fn lookup_shards(&self, wanted: BTreeSet<(NodeId, ShardRef)>) -> BTreeMap<(NodeId, ShardRef), Option<bool>> {
        let mut per_node: BTreeMap<NodeId, Vec<ShardRef>> = BTreeMap::new();
        for (node, key) in wanted {
            per_node.entry(node).or_default().push(key);
        }
        let batches = per_node.into_iter().flat_map(|(node, keys)| {
            keys.chunks(HAS_SHARDS_KEYS_MAX)
                .map(|chunk| (node, chunk.to_vec()))
                .collect::<Vec<_>>()
        });
        let asks = batches.map(|(node, keys)| async move {
            let answer = self.has_shards_on(node, keys.clone()).await;
            (node, keys, answer)
        });
        let mut found = BTreeMap::new();
        for (node, keys, answer) in futures::future::join_all(asks).await {
            for (position, key) in keys.into_iter().enumerate() {
                let present = answer.as_ref().ok().and_then(|present| present.get(position).copied());
                found.insert((node, key), present);
            }
        }
        found
    }

    async fn has_shards_on(&self, node: NodeId, keys: Vec<ShardRef>) -> Result<Vec<bool>, String> {
        let answer = if node == self.env.node_id() {
            self.serve_has_shards(keys.clone()).await
        } else {
            self.shard_request(node, Request::HasShards { keys: keys.clone() }, SHARD_READ_TIMEOUT_MS)
                .await
                .map_err(|error| error.to_string())?
        };
        match answer {
            Response::HasShards { present } if present.len() == keys.len() => Ok(present),
            Response::Error { message, .. } => Err(message),
            other => Err(format!("unexpected answer {other:?}")),
        }
    }

    /// Looks every shard of `stripes` up on its target and recorded holder; counts health
    /// and queues what lacks shards on its targets.
    async fn survey(
        self: &Arc<Self>,
        layout: &Layout,
        stripes: Vec<(StripeId, StripeRecord)>,
        health: &mut StripeHealth,
        queue: &mut Vec<RepairTask>,
    ) {
        let mut planned = Vec::new();
        let mut wanted: BTreeSet<(NodeId, ShardRef)> = BTreeSet::new();
        for (stripe_id, record) in stripes {
            let Some(targets) = self.stripe_targets(layout, &stripe_id, &record) else {
                health.total += 1;
                health.unknown += 1;
                continue;
            };
            for (index, target) in targets.iter().enumerate() {
                let key = ShardRef {
                    stripe_id,
                    index: index as u8,
                };
                wanted.insert((*target, key));
                if let Some(holder) = record.holders.get(index) {
                    wanted.insert((*holder, key));
                }
            }
            planned.push((stripe_id, record, targets));
        }
        let found = self.lookup_shards(wanted).await;
        let present = |node: &NodeId, key: ShardRef| found.get(&(*node, key)).copied().flatten() == Some(true);
        for (stripe_id, record, targets) in planned {
            let total = targets.len();
            let k = usize::from(record.codec.data_shards);
            let mut on_target = Vec::with_capacity(total);
            let mut elsewhere = Vec::with_capacity(total);
            for (index, target) in targets.iter().enumerate() {
                let key = ShardRef {
                    stripe_id,
                    index: index as u8,
                };
                let here = present(target, key);
                on_target.push(here);
                elsewhere.push(
                    record
                        .holders
                        .get(index)
                        .is_some_and(|holder| holder != target && present(holder, key)),
                );
            }
            let available = (0..total)
                .filter(|index| on_target[*index] || elsewhere[*index])
                .count();
            {
                // A copy-deletion timer runs only while the old copy is continuously extra.
                let mut state = self.maintenance.lock().expect("not poisoned");
                for index in (0..total).filter(|index| !(on_target[*index] && elsewhere[*index])) {
                    state.extra_copy_since_ms.remove(&ShardKey {
                        stripe_id,
                        index: index as u8,
                    });
                }
            }
            health.total += 1;
            match available {
                _ if available == total && on_target.iter().all(|here| *here) => health.healthy += 1,
                _ if available == total => health.misplaced += 1,
                _ if available > k => health.degraded += 1,
                _ if available == k => health.at_risk += 1,
                _ => health.lost += 1,
            }
            let task = RepairTask {
                stripe_id,
                record,
                targets,
                on_target,
                elsewhere,
                available,
            };
            if task.missing_on_target() > 0 || task.record.holders != task.targets {
                queue.push(task);
            }
        }
    }

    /// Repairs the queue in order; returns for how many stripes shards were written.
    async fn run_repairs(self: &Arc<Self>, queue: Vec<RepairTask>) -> u64 {
        let queued_bytes: u64 = queue.iter().map(|task| self.task_bytes(task)).sum();
        {
            let mut state = self.maintenance.lock().expect("not poisoned");
            state.report.repair_queued_stripes = queue.len() as u64;
            state.report.repair_queued_bytes = queued_bytes;
        }
        let started_at_ms = self.env.now_ms();
        let mut written_bytes = 0u64;
        let mut stripes_written = 0u64;
        // Most-at-risk first: the queue is in that order, and at most
        // REPAIR_STRIPES_IN_FLIGHT_MAX stripes are started ahead of the one finishing.
        let mut queue = queue.into_iter();
        let mut in_flight = FuturesUnordered::new();
        loop {
            let paused = self.maintenance.lock().expect("not poisoned").report.repair_paused;
            while !paused && in_flight.len() < REPAIR_STRIPES_IN_FLIGHT_MAX {
                let Some(task) = queue.next() else { break };
                let task_bytes = self.task_bytes(&task);
                // Pacing delays the start of the next stripe, inside its own future, so the
                // stripes already in flight keep going meanwhile.
                let delay_ms = self.pacing_delay_ms(
                    written_bytes,
                    self.maintenance_config.repair_rate_bytes_per_s,
                    started_at_ms,
                );
                in_flight.push(async move {
                    if delay_ms > 0 {
                        self.env.sleep(delay_ms).await;
                    }
                    (task_bytes, self.repair_stripe(task).await)
                });
            }
            let Some((task_bytes, outcome)) = in_flight.next().await else {
                break;
            };
            written_bytes += outcome.written_bytes;
            stripes_written += u64::from(outcome.written_bytes > 0);
            let elapsed_ms = self.env.now_ms().saturating_sub(started_at_ms).max(1);
            {
                let mut state = self.maintenance.lock().expect("not poisoned");
                let report = &mut state.report;
                report.repair_queued_stripes = report.repair_queued_stripes.saturating_sub(1);
                report.repair_queued_bytes = report.repair_queued_bytes.saturating_sub(task_bytes);
                report.repaired_bytes_total += outcome.written_bytes;
                report.moved_shards_total += outcome.moved_shards;
                report.repaired_stripes_total += u64::from(outcome.repaired);
                report.repair_bytes_per_s = written_bytes.saturating_mul(1000) / elapsed_ms;
            }
        }
        let mut state = self.maintenance.lock().expect("not poisoned");
        state.report.repair_queued_stripes = 0;
        state.report.repair_queued_bytes = 0;
        stripes_written
    }

    /// How long to wait until `done_bytes` since `started_at_ms` fit `rate_bytes_per_s`
    /// (0: no limit).
    fn pacing_delay_ms(&self, done_bytes: u64, rate_bytes_per_s: u64, started_at_ms: u64) -> u64 {
        let Some(due_ms) = done_bytes.saturating_mul(1000).checked_div(rate_bytes_per_s) else {
            return 0;
        };
        due_ms.saturating_sub(self.env.now_ms().saturating_sub(started_at_ms))
    }

    /// Sleeps until `done_bytes` since `started_at_ms` fit `rate_bytes_per_s` (0: no limit).
    async fn pace(&self, done_bytes: u64, rate_bytes_per_s: u64, started_at_ms: u64) {
        let delay_ms = self.pacing_delay_ms(done_bytes, rate_bytes_per_s, started_at_ms);
        if delay_ms > 0 {
            self.env.sleep(delay_ms).await;
        }
    }

    fn task_bytes(&self, task: &RepairTask) -> u64 {
        let shard_bytes = task.record.codec.shard_length_bytes(task.record.sealed_length_bytes) as u64;
        shard_bytes * task.missing_on_target() as u64
    }

    /// Brings one stripe's shards to its targets: copies where a shard exists elsewhere,
    /// rebuilds from k survivors where it exists nowhere, then records the new holders.
    async fn repair_stripe(self: &Arc<Self>, task: RepairTask) -> RepairOutcome {
        let mut outcome = RepairOutcome::default();
        let stripe_id = task.stripe_id;
        let codec = task.record.codec;
        let total = task.targets.len();
        let mut placed = task.on_target.clone();
        let mut rebuild: Vec<u8> = Vec::new();
        for (index, target) in task.targets.iter().enumerate() {
            if placed[index] {
                continue;
            }
            if task.elsewhere[index] {
                let source = task.record.holders[index];
                if let Ok(shard) = self.fetch_verified_shard(source, stripe_id, index as u8, &task).await {
                    if self.put_shard_on(*target, &shard).await.is_ok() {
                        placed[index] = true;
                        outcome.moved_shards += 1;
                        outcome.written_bytes += shard.encoded_length_bytes();
                        continue;
                    }
                }
            }
            rebuild.push(index as u8);
        }
        if !rebuild.is_empty() {
            // Sources: every index present on its target or recorded holder.
            let sources: Vec<(u8, NodeId)> = (0..total)
                .filter_map(|index| match () {
                    _ if placed[index] => Some((index as u8, task.targets[index])),
                    _ if task.elsewhere[index] => Some((index as u8, task.record.holders[index])),
                    _ => None,
                })
                .collect();
            // k fetches at once; each failure is replaced by the next source.
            let data_shards = usize::from(codec.data_shards);
            let mut sources = sources.into_iter();
            let mut shards: Vec<Shard> = Vec::new();
            let mut fetching = FuturesUnordered::new();
            loop {
                while shards.len() + fetching.len() < data_shards {
                    let Some((index, node)) = sources.next() else { break };
                    let task = &task;
                    fetching.push(async move { self.fetch_verified_shard(node, stripe_id, index, task).await });
                }
                match fetching.next().await {
                    Some(Ok(shard)) => shards.push(shard),
                    Some(Err(_)) => {}
                    None => break,
                }
                if shards.len() >= data_shards {
                    break;
                }
            }
            drop(fetching);
            if shards.len() < usize::from(codec.data_shards) {
                tracing::warn!(
                    stripe = %stripe_id.short(),
                    have = shards.len(),
                    need = codec.data_shards,
                    "stripe cannot be rebuilt now: too few shards reachable"
                );
            } else {
                match codec.rebuild(stripe_id, &shards, &rebuild) {
                    Ok(rebuilt) => {
                        for shard in rebuilt {
                            let index = usize::from(shard.header().index);
                            match self.put_shard_on(task.targets[index], &shard).await {
                                Ok(()) => {
                                    placed[index] = true;
                                    outcome.written_bytes += shard.encoded_length_bytes();
                                }
                                Err(error) => tracing::debug!(
                                    stripe = %stripe_id.short(), index, %error, "cannot store a rebuilt shard"
                                ),
                            }
                        }
                    }
                    Err(error) => tracing::warn!(stripe = %stripe_id.short(), %error, "rebuild failed"),
                }
            }
        }
        outcome.repaired = placed.iter().all(|here| *here);
        // Old copies of shards that are on their target now: deleted once the target has
        // been seen holding its copy for the grace period (a view of the layout that
        // differs for a moment must never cost the only copy).
        let mut extra_deleted = vec![false; total];
        let extra_indexes: Vec<usize> = (0..total)
            .filter(|index| task.on_target[*index] && task.elsewhere[*index])
            .collect();
        for index in extra_indexes {
            let key = ShardKey {
                stripe_id,
                index: index as u8,
            };
            let expired = {
                let now_ms = self.env.now_ms();
                let grace_ms = self.maintenance_config.gc_grace_ms;
                let mut state = self.maintenance.lock().expect("not poisoned");
                grace_elapsed(&mut state.extra_copy_since_ms, key, now_ms, grace_ms)
            };
            if !expired {
                continue;
            }
            let old_holder = task.record.holders[index];
            if self.delete_shard_on(old_holder, stripe_id, index as u8).await.is_ok() {
                extra_deleted[index] = true;
                let mut state = self.maintenance.lock().expect("not poisoned");
                state.extra_copy_since_ms.remove(&key);
                state.report.gc_deleted_shards_total += 1;
            }
        }
        // Record where the shards are now, so the next survey (and readers) look there: the
        // target where it holds the only copy, the old holder while it still has one.
        let holders: Vec<NodeId> = (0..total)
            .map(|index| {
                let old_copy_remains = task.elsewhere[index] && !extra_deleted[index];
                match placed[index] && !old_copy_remains {
                    true => task.targets[index],
                    false => task.record.holders.get(index).copied().unwrap_or(task.targets[index]),
                }
            })
            .collect();
        if holders != task.record.holders {
            let mut record = task.record.clone();
            record.holders = holders;
            if let Err(error) = self
                .meta_put(Table::Stripes, &stripe_row(&stripe_id), Some(Record::Stripe(record)))
                .await
            {
                tracing::debug!(%error, "cannot update a stripe's holders");
            }
        }
        outcome
    }

    async fn fetch_verified_shard(
        &self,
        node: NodeId,
        stripe_id: StripeId,
        index: u8,
        task: &RepairTask,
    ) -> Result<Shard, String> {
        let shard = self
            .fetch_shard(node, stripe_id, index, ChecksumCheck::Verify)
            .await
            .map_err(|error| format!("{}: {error}", node.short()))?;
        let header = shard.header();
        if header.stripe_id != stripe_id
            || header.index != index
            || header.codec != task.record.codec.codec
            || header.data_shards != task.record.codec.data_shards
            || header.parity_shards != task.record.codec.parity_shards
        {
            return Err(format!("{} returned a different shard", node.short()));
        }
        Ok(shard)
    }

    // ----- holder ---------------------------------------------------------------------

    /// Drops this node's orphan shards and old copies of moved shards (after grace).
    pub async fn tidy_local_shards(self: &Arc<Self>) {
        let _pass = self.maintenance_passes.tidy.lock().await;
        let store = self.env.shard_store();
        let keys = match store.list().await {
            Ok(keys) => keys,
            Err(error) => {
                tracing::error!(%error, "cannot list shards");
                return;
            }
        };
        let me = self.env.node_id();
        let layout = self.layout();
        let grace_ms = self.maintenance_config.gc_grace_ms;
        let held: BTreeSet<ShardKey> = keys.iter().copied().collect();
        let mut by_stripe: BTreeMap<StripeId, Vec<ShardKey>> = BTreeMap::new();
        for key in keys {
            by_stripe.entry(key.stripe_id).or_default().push(key);
        }
        let stripes: Vec<(StripeId, Vec<ShardKey>)> = by_stripe.into_iter().collect();
        for batch in stripes.chunks(LOOKUPS_IN_FLIGHT_MAX) {
            let lookups = batch.iter().map(|(stripe_id, _)| async move {
                match self.meta_get(Table::Stripes, &stripe_row(stripe_id)).await {
                    Ok(Some(Lww {
                        value: Some(Record::Stripe(record)),
                        ..
                    })) => Ok(Some(record)),
                    Ok(_) => Ok(None),
                    Err(error) => Err(error),
                }
            });
            let records = futures::future::join_all(lookups).await;
            for ((_, keys), record) in batch.iter().zip(records) {
                // Cannot tell: decide nothing for this stripe.
                let Ok(record) = record else { continue };
                for key in keys {
                    self.tidy_local_shard(*key, record.as_ref(), &layout, me, grace_ms)
                        .await;
                }
            }
        }
        let mut state = self.maintenance.lock().expect("not poisoned");
        state.orphan_since_ms.retain(|key, _| held.contains(key));
        state.moved_since_ms.retain(|key, _| held.contains(key));
    }

    async fn tidy_local_shard(
        self: &Arc<Self>,
        key: ShardKey,
        record: Option<&StripeRecord>,
        layout: &Layout,
        me: NodeId,
        grace_ms: u64,
    ) {
        let now_ms = self.env.now_ms();
        let Some(record) = record else {
            let expired = {
                let mut state = self.maintenance.lock().expect("not poisoned");
                state.moved_since_ms.remove(&key);
                grace_elapsed(&mut state.orphan_since_ms, key, now_ms, grace_ms)
            };
            if expired {
                self.drop_local_shard(key, "orphan").await;
            }
            return;
        };
        self.maintenance
            .lock()
            .expect("not poisoned")
            .orphan_since_ms
            .remove(&key);
        let index = usize::from(key.index);
        let (k, m) = (record.codec.data_shards, record.codec.parity_shards);
        let Ok(canonical) = place(layout, &key.stripe_id, k, m) else {
            return;
        };
        // A shard at its home (most of them) needs no placement without the down nodes.
        let at_home = index >= canonical.holders.len() || canonical.holders[index] == me;
        let targets = if at_home {
            Vec::new()
        } else {
            match self.placement_without_down(layout, &key.stripe_id, k, m, Some(&canonical)) {
                Some(placement) => placement.holders,
                None => return,
            }
        };
        if at_home || index >= targets.len() || targets[index] == me {
            self.maintenance
                .lock()
                .expect("not poisoned")
                .moved_since_ms
                .remove(&key);
            return;
        }
        let shard = ShardRef {
            stripe_id: key.stripe_id,
            index: key.index,
        };
        let confirmed = matches!(
            self.has_shards_on(targets[index], vec![shard]).await.as_deref(),
            Ok([true])
        );
        let expired = {
            let mut state = self.maintenance.lock().expect("not poisoned");
            match confirmed {
                true => grace_elapsed(&mut state.moved_since_ms, key, now_ms, grace_ms),
                false => {
                    state.moved_since_ms.remove(&key);
                    false
                }
            }
        };
        if expired {
            self.drop_local_shard(key, "moved").await;
        }
    }

    async fn drop_local_shard(&self, key: ShardKey, why: &'static str) {
        match self.env.shard_store().delete(key).await {
            Ok(deleted) => {
                tracing::debug!(stripe = %key.stripe_id.short(), index = key.index, why, "shard deleted");
                let mut state = self.maintenance.lock().expect("not poisoned");
                state.report.gc_deleted_shards_total += u64::from(deleted);
                state.orphan_since_ms.remove(&key);
                state.moved_since_ms.remove(&key);
            }
            Err(error) => tracing::warn!(%error, "cannot delete a shard"),
        }
    }

    /// Re-reads and verifies every local shard, from the persisted cursor on, paced.
    pub async fn scrub_pass(self: &Arc<Self>) {
        let _pass = self.maintenance_passes.scrub.lock().await;
        let store = self.env.shard_store();
        let keys = match store.list().await {
            Ok(keys) => keys,
            Err(error) => {
                tracing::error!(%error, "cannot list shards to scrub");
                return;
            }
        };
        let cursor = match self.load_maintenance_record(SCRUB_CURSOR_KEY) {
            Some(MaintenanceRecord::ScrubCursorV1(cursor)) => cursor,
            _ => None,
        };
        let start = cursor.map_or(0, |(stripe_id, index)| {
            keys.partition_point(|key| (key.stripe_id, key.index) <= (stripe_id, index))
        });
        {
            let mut state = self.maintenance.lock().expect("not poisoned");
            state.report.scrub_shards_total = keys.len() as u64;
            state.report.scrub_shards_checked = start as u64;
        }
        let started_at_ms = self.env.now_ms();
        let mut read_bytes = 0u64;
        for (position, key) in keys.iter().enumerate().skip(start) {
            match store.get(*key).await {
                Ok(shard) => read_bytes += shard.encoded_length_bytes(),
                Err(StoreError::Corrupt(reason)) => {
                    tracing::warn!(stripe = %key.stripe_id.short(), index = key.index, %reason, "scrub found a corrupt shard");
                    self.maintenance
                        .lock()
                        .expect("not poisoned")
                        .report
                        .scrub_corrupt_found_total += 1;
                }
                // Deleted since the listing: nothing to check.
                Err(StoreError::NotFound) => {}
                Err(error) => tracing::warn!(%error, "scrub cannot read a shard"),
            }
            let checked = position as u64 + 1;
            self.maintenance
                .lock()
                .expect("not poisoned")
                .report
                .scrub_shards_checked = checked;
            if checked.is_multiple_of(SCRUB_CHECKPOINT_SHARDS) {
                self.save_maintenance_record(
                    SCRUB_CURSOR_KEY,
                    &MaintenanceRecord::ScrubCursorV1(Some((key.stripe_id, key.index))),
                );
            }
            self.pace(
                read_bytes,
                self.maintenance_config.scrub_rate_bytes_per_s,
                started_at_ms,
            )
            .await;
        }
        self.save_maintenance_record(SCRUB_CURSOR_KEY, &MaintenanceRecord::ScrubCursorV1(None));
        {
            let mut state = self.maintenance.lock().expect("not poisoned");
            state.report.scrub_passes_completed += 1;
            state.report.scrub_last_pass_completed_at_ms = self.env.now_ms();
        }
        drop(_pass);
    }
}

#[derive(Default)]
struct RepairOutcome {
    written_bytes: u64,
    moved_shards: u64,
    repaired: bool,
}

fn decode_stripe_row(key: &[u8], value: &[u8]) -> Option<(StripeId, StripeRecord)> {
    let row = RowKey::decode(key).ok()?;
    let stripe_id = StripeId(row.partition_key.as_slice().try_into().ok()?);
    match decode_stored_value(value).ok()?.value {
        Some(Record::Stripe(record)) => Some((stripe_id, record)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_records_of_a_bucket_generation_that_no_longer_exists_stop_referencing_stripes() {
        let stripe = |byte: u8| StripeId([byte; 32]);
        let references = || {
            let mut references = OwnerReferences::new("backups");
            references.add(0, BTreeSet::from([stripe(1)]));
            references.add(5, BTreeSet::from([stripe(2)]));
            references.add(7, BTreeSet::from([stripe(3)]));
            references
        };
        assert!(references().needs_bucket());
        // Generation 0 (a record from before generations) always counts, even with no
        // bucket of the name: it was never judged by its bucket, and is not now.
        assert_eq!(references().live(None), BTreeSet::from([stripe(1)]));
        assert_eq!(references().live(Some(5)), BTreeSet::from([stripe(1), stripe(2)]));
        assert_eq!(references().live(Some(7)), BTreeSet::from([stripe(1), stripe(3)]));
        let mut legacy_only = OwnerReferences::new("backups");
        legacy_only.add(0, BTreeSet::from([stripe(1)]));
        legacy_only.add(9, BTreeSet::new());
        assert!(!legacy_only.needs_bucket(), "no stripe hangs on a generation");
    }

    #[test]
    fn periodic_passes_keep_their_schedule_across_restarts() {
        const HOUR_MS: u64 = 3_600_000;
        const WEEK_MS: u64 = 7 * 24 * HOUR_MS;
        let now_ms = 100 * WEEK_MS;
        let settle_ms = 10 * 60_000;
        // (saved due time, pass cut short, expected first due time)
        let cases = [
            // Never ran: a whole interval (a new node has nothing to scrub yet).
            (None, false, now_ms + WEEK_MS),
            // Restarted a day before the pass was due: still due then, not a week on
            // (the old behaviour, under which a node restarted weekly never scrubbed).
            (Some(now_ms + 24 * HOUR_MS), false, now_ms + 24 * HOUR_MS),
            // Due while the node was down: as soon as gossip has settled.
            (Some(now_ms - HOUR_MS), false, now_ms + settle_ms),
            (Some(now_ms + 60_000), false, now_ms + settle_ms),
            // A pass cut short by the restart resumes soon, whatever was saved.
            (Some(now_ms + 6 * 24 * HOUR_MS), true, now_ms + settle_ms),
            (None, true, now_ms + settle_ms),
            // A clock set back leaves a due time far ahead: at most one interval.
            (Some(now_ms + 30 * WEEK_MS), false, now_ms + WEEK_MS),
        ];
        for (saved_due_at_ms, interrupted, expected_ms) in cases {
            assert_eq!(
                first_pass_due_at_ms(saved_due_at_ms, interrupted, now_ms, WEEK_MS, settle_ms),
                expected_ms,
                "saved {saved_due_at_ms:?}, interrupted {interrupted}"
            );
        }
        // An interval shorter than the settle time is not stretched by it.
        assert_eq!(
            first_pass_due_at_ms(None, true, now_ms, 5_000, settle_ms),
            now_ms + 5_000
        );
    }

    #[test]
    fn tidy_passes_come_a_few_graces_apart_and_never_rarer_than_scrubs() {
        assert_eq!(MaintenanceConfig::DEFAULT.tidy_interval_ms(), 4 * 3_600_000);
        let often_scrubbed = MaintenanceConfig {
            scrub_interval_ms: 20_000,
            gc_grace_ms: 3_600_000,
            ..MaintenanceConfig::DEFAULT
        };
        assert_eq!(often_scrubbed.tidy_interval_ms(), 20_000);
        let no_grace = MaintenanceConfig {
            gc_grace_ms: 0,
            ..MaintenanceConfig::DEFAULT
        };
        assert_eq!(no_grace.tidy_interval_ms(), MAINTENANCE_TICK_MS);
    }
}
