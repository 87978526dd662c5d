//! One simulation run: boot a cluster of real `ClusterNode`s in the simulated world, run a
//! client workload while injecting faults, then heal everything and check the invariants.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use bdr_node::cluster::data::{object_row, BodyCheck, BucketOptions, DataError, DataKeys, ObjectWrite};
use bdr_node::cluster::maintenance::MaintenanceConfig;
use bdr_node::cluster::membership::MembershipConfig;
use bdr_node::cluster::versions::LockChange;
use bdr_node::cluster::{ClusterInbound, ClusterNode};
use bdr_node::env::{Env, InboundHandler, ShardStore, Tree};
use bdr_protocol::envelope::RootKey;
use bdr_protocol::erasure::{CodecId, StripeCodec};
use bdr_protocol::ids::{NodeId, StripeId, ZoneName};
use bdr_protocol::layout::{NodeRoles, NodeSpec, NodeStatus};
use bdr_protocol::placement::place;
use bdr_protocol::records::{Retention, RetentionMode, RowKey, VersioningState, METADATA_PARTITIONS};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use crate::disk::{DiskFaultCounters, FaultAtlas, LostWrites};
use crate::plots::RedundancySample;
use crate::world::{NetworkSettings, SimEnv, World};

/// Virtual start time: a plausible wall clock, so HLC timestamps look real.
const START_MS: u64 = 1_790_000_000_000;
const BUCKET: &str = "sim";
/// Bucket creation is retried (the booting cluster may still be handing metadata over)
/// this often, this far apart, all before the fault phase begins.
const BUCKET_CREATE_ATTEMPTS_MAX: u32 = 60;
/// Longest the cluster may take to boot and create the workload's bucket (virtual).
const SETUP_MS_MAX: u64 = 40_000;
const BUCKET_CREATE_RETRY_MS: u64 = 500;
/// Fault kinds that hit the one failing disk (`Shared::disk_node`).
const DISK_FAULTS: [&str; 5] = ["bit-rot", "torn-write", "lost-write", "read-error", "disk-full"];
/// A torn-write fault makes that disk's writes take this long (+ up to the spread), then
/// crashes the node as soon as one is in flight, polling this often.
const TORN_WRITE_LATENCY_MS_MIN: u64 = 20;
const TORN_WRITE_LATENCY_MS_SPREAD: u64 = 180;
const TORN_WRITE_POLL_MS: u64 = 5;
/// The cluster's redundancy and repair queue are sampled this often (virtual time, on
/// the multiples since the start; sampling only reads, so the trace does not change).
const SAMPLE_INTERVAL_MS: u64 = 1_000;
/// Rolls (of 100) below this are multipart uploads when the scenario has them.
const MULTIPART_ROLL_BELOW: u64 = 10;
/// With `bucket_churn`, rolls (of 100) from this one go to the scratch bucket instead.
const BUCKET_CHURN_ROLL_FROM: u64 = 55;
/// The bucket that `bucket_churn` creates, fills, empties and deletes over and over.
const SCRATCH_BUCKET: &str = "scratch";
const SCRATCH_KEYS: u64 = 3;
/// Objects a scratch bucket deletion lists and deletes before it deletes the bucket.
const SCRATCH_LIST_LIMIT: u32 = 100;
/// With `object_lock`, rolls (of 100) in this range go to the Object Lock bucket instead.
const LOCK_ROLLS: std::ops::Range<u64> = 85..95;
/// The bucket with Object Lock that `object_lock` writes, locks and deletes versions in.
const LOCK_BUCKET: &str = "vault";
const LOCK_KEYS: u64 = 3;
/// The retention that `object_lock` places: GOVERNANCE (deletes here never bypass it),
/// long enough to outlast any run.
const LOCK_RETENTION_MS: u64 = 365 * 86_400_000;
/// Parts uploaded per multipart upload, at most.
const MULTIPART_PARTS_MAX: u64 = 3;
/// Layout changes (drain, remove) are retried this often until they succeed.
const LAYOUT_RETRY_MS: u64 = 5_000;
/// Beyond the budget: how many live stripes lose m+1 shards.
const BEYOND_BUDGET_STRIPES: usize = 3;
/// Planted in every object's content: must never be found on any node's "disk".
pub const PLAINTEXT_MARKER: &[u8] = b"SIM-PLAINTEXT-MARKER-7d2e";

/// Which faults a run may inject. With `swarm`, each is further switched off at random
/// per seed, so different seeds stress different combinations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    pub nodes: u32,
    pub zones: u32,
    pub data_shards: u8,
    pub parity_shards: u8,
    pub stripe_length_bytes: u32,
    pub inline_threshold_bytes: u32,
    /// Length of the fault phase (virtual milliseconds).
    pub fault_phase_ms: u64,
    /// Length of the healed phase before the final checks.
    pub settle_ms: u64,
    pub operations_per_client: u32,
    pub clients: u32,
    pub keys_per_client: u32,
    pub swarm: bool,
    pub crashes: bool,
    pub partitions: bool,
    pub message_loss: bool,
    pub clock_skew: bool,
    pub bit_rot: bool,
    pub zone_outage: bool,
    /// Disk faults on one node's shard disk (each a fault kind of its own, swarm-toggled):
    /// torn writes, lost writes, latent read errors, a full disk. Not meant to be combined
    /// with `zone_outage` (a zone outage alone uses the whole budget of m shards).
    #[serde(default)]
    pub disk_faults: bool,
    /// Go beyond the budget: when the faults heal, m+1 shards of a few live stripes are
    /// destroyed (deleted or rotten on every node). Reads must then return the exact
    /// acknowledged bytes or fail, never wrong bytes; reads of the lost objects must fail
    /// and the maintainers must count the stripes as lost.
    #[serde(default)]
    pub beyond_budget: bool,
    /// Multipart uploads in the workload (create, upload parts, complete or abort),
    /// checked by the model like puts.
    #[serde(default)]
    pub multipart: bool,
    /// Nodes that join during the fault phase (zones round-robin), spread over it.
    #[serde(default)]
    pub joining_nodes: u32,
    /// One node is replaced during the fault phase: lost with its disk (half the seeds)
    /// or drained (the others); a new node joins in its zone and the old one is removed.
    #[serde(default)]
    pub node_replacement: bool,
    /// Turn versioning on for the workload's bucket (with `swarm`, for half the seeds):
    /// puts add versions, deletes add delete markers, and every acknowledged version must
    /// read back by its id at the end.
    #[serde(default)]
    pub versioning: bool,
    /// A second bucket is created, written, emptied and deleted over and over while
    /// puts to it are in flight: versions that commit into a deleted bucket must never be
    /// served by the next bucket of the name, and maintenance must collect them and
    /// their stripes (the final checks count what is left).
    #[serde(default)]
    pub bucket_churn: bool,
    /// A bucket with Object Lock where clients put versions, place legal holds and
    /// retention, and delete versions by id, some of them racing one another through two
    /// gateways. Holds are never lifted and retention never ends within a run, so a
    /// version whose lock was acknowledged must be there, locked, at the end; one whose
    /// delete was acknowledged must never come back; and no version may have both.
    #[serde(default)]
    pub object_lock: bool,
    /// The nodes' timers: the seeds' compressed ones (default) or a deployment's.
    #[serde(default)]
    pub timers: Timers,
}

/// The virtual time a run with [`Timers::Production`] needs healed before its checks: a
/// shard written by a put that never committed is collected only after the write
/// deadline plus the GC grace (an hour each), and found by a repair pass (every minute).
pub const PRODUCTION_SETTLE_MS: u64 = 2 * 3_600_000 + 5 * 60_000;

impl Scenario {
    /// The same scenario at bdr-node's default timers, healed at least
    /// [`PRODUCTION_SETTLE_MS`] so that its checks can pass.
    pub fn at_production_timers(self) -> Scenario {
        Scenario {
            timers: Timers::Production,
            settle_ms: self.settle_ms.max(PRODUCTION_SETTLE_MS),
            ..self
        }
    }
}

/// The intervals and grace periods the nodes run with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Timers {
    /// Maintenance 20 times as often as a deployment's and grace periods of seconds
    /// (repair every 3 s, GC grace 5 s, down after 4 s), so that a run of a few virtual
    /// minutes takes faults, repair, rebalancing and garbage collection through to the
    /// end. Every virtual second then carries far more work than a deployment's does.
    #[default]
    Compressed,
    /// `bdr-node`'s defaults (repair every minute, GC grace an hour, down after ten
    /// minutes): what a deployed cluster does with each virtual second. A run needs a
    /// settle phase of hours before the checks (two for garbage collection, about nine
    /// for stand-in copies left to tidy passes), and of more than a week with bit rot or
    /// torn writes (found by the weekly scrub).
    Production,
}

impl Timers {
    fn maintenance(self) -> MaintenanceConfig {
        match self {
            Timers::Compressed => MaintenanceConfig {
                repair_interval_ms: 3_000,
                repair_rate_bytes_per_s: 0,
                scrub_interval_ms: 20_000,
                scrub_rate_bytes_per_s: 0,
                gc_grace_ms: 5_000,
                write_deadline_ms: 10_000,
            },
            Timers::Production => MaintenanceConfig::DEFAULT,
        }
    }

    fn membership(self) -> MembershipConfig {
        match self {
            Timers::Compressed => MembershipConfig {
                down_after_ms: 4_000,
                gossip_interval_ms: 500,
                anti_entropy_interval_ms: 3_000,
                tombstone_grace_ms: 3_600_000,
            },
            Timers::Production => MembershipConfig {
                down_after_ms: bdr_node::config::DEFAULT_DOWN_AFTER_MS,
                gossip_interval_ms: bdr_node::config::DEFAULT_GOSSIP_INTERVAL_MS,
                anti_entropy_interval_ms: bdr_node::config::DEFAULT_ANTI_ENTROPY_INTERVAL_MS,
                tombstone_grace_ms: bdr_node::config::DEFAULT_TOMBSTONE_GRACE_MS,
            },
        }
    }
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "swarm".into(),
            nodes: 6,
            zones: 3,
            data_shards: 4,
            parity_shards: 2,
            stripe_length_bytes: 4096,
            inline_threshold_bytes: 512,
            fault_phase_ms: 60_000,
            settle_ms: 120_000,
            operations_per_client: 40,
            clients: 2,
            keys_per_client: 6,
            swarm: true,
            crashes: true,
            partitions: true,
            message_loss: true,
            clock_skew: true,
            bit_rot: true,
            zone_outage: false,
            disk_faults: true,
            beyond_budget: false,
            multipart: true,
            joining_nodes: 0,
            node_replacement: false,
            versioning: true,
            bucket_churn: false,
            object_lock: false,
            timers: Timers::Compressed,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub seed: u64,
    pub scenario: String,
    pub trace: String,
    pub failures: Vec<String>,
    pub operations: u64,
    pub acknowledged_writes: u64,
    pub unavailable_operations: u64,
    /// Acknowledged versions read back by id at the end (0 when versioning was off).
    pub versions_checked: u64,
    /// With `object_lock`: versions whose lock or delete by id was acknowledged, checked
    /// at the end.
    pub lock_versions_checked: u64,
    /// With `object_lock`: races of a lock and a delete by id that the delete won (the
    /// lock was refused) and that the lock won (the delete was refused).
    pub lock_races_delete_won: u64,
    pub lock_races_lock_won: u64,
    pub faults_injected: Vec<String>,
    /// What the disk faults did, summed over the nodes.
    pub disk_faults: DiskFaultCounters,
    /// Beyond the budget: stripes destroyed, reads (final and by version) that failed on
    /// them as they must, and the stripes the maintainers' last surveys count as lost.
    pub stripes_destroyed: u64,
    pub detected_losses: u64,
    pub lost_stripes_reported: u64,
    /// Multipart uploads completed (acknowledged; of them, those listing several parts)
    /// and aborted.
    pub multipart_completed: u64,
    pub multipart_completed_multiple_parts: u64,
    pub multipart_aborted: u64,
    /// With `bucket_churn`: scratch buckets deleted, scratch puts acknowledged, and
    /// versions of deleted buckets present when the faults healed (all must be
    /// collected by the final checks).
    pub scratch_buckets_deleted: u64,
    pub scratch_puts_acknowledged: u64,
    pub stale_versions_at_heal: u64,
    /// Versions written into a bucket already deleted (puts whose body was held back
    /// until their bucket went), all of which maintenance must collect.
    pub stale_versions_written: u64,
    /// Layout changes done: nodes joined, nodes removed.
    pub nodes_joined: u64,
    pub nodes_removed: u64,
    /// The cluster's redundancy and repair queue over virtual time (for the plots).
    pub samples: Vec<RedundancySample>,
    pub events: u64,
    pub messages: u64,
    /// Requests sent and their encoded bytes, by kind.
    pub message_mix: BTreeMap<&'static str, crate::world::MessageKindCount>,
    pub virtual_ms: u64,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The value a key holds in the model: the content hash, or None when deleted.
type Value = Option<[u8; 32]>;

#[derive(Default, Clone)]
struct KeyModel {
    /// What the last acknowledged operation left.
    acknowledged: Value,
    /// Values of operations that failed or were cut off after it: they may have landed.
    maybe: Vec<Value>,
}

impl KeyModel {
    fn allows(&self, value: &Value) -> bool {
        self.acknowledged == *value || self.maybe.contains(value)
    }
}

struct Shared {
    world: Arc<World>,
    scenario: Scenario,
    envs: Vec<Arc<SimEnv>>,
    specs: Vec<NodeSpec>,
    nodes: Mutex<BTreeMap<NodeId, Arc<ClusterNode<SimEnv>>>>,
    models: Mutex<BTreeMap<String, KeyModel>>,
    failures: Mutex<Vec<String>>,
    counters: Mutex<BTreeMap<&'static str, u64>>,
    faults: Mutex<Vec<String>>,
    /// The one node whose disk fails (bit rot, torn and lost writes, read errors, full),
    /// each fault on at most one shard per stripe (the atlas): with one other node
    /// impaired a stripe then misses at most 2 = m shards.
    disk_node: Option<usize>,
    atlas: Arc<FaultAtlas>,
    /// Nodes that belong to the cluster now (booted at the heal): the first `nodes` at
    /// the start, joiners once they join, less any node removed.
    members: Mutex<BTreeSet<usize>>,
    /// Zone of every node (index), joiners and replacements included.
    zones: Vec<u32>,
    /// With `node_replacement`: (the node replaced, its replacement).
    replacement: Option<(usize, usize)>,
    /// The redundancy and repair queue, every `SAMPLE_INTERVAL_MS`.
    samples: Mutex<Vec<RedundancySample>>,
    /// Stripes destroyed beyond the budget: reads of objects using them may fail.
    destroyed: Mutex<BTreeSet<StripeId>>,
    /// Nodes booted (or booting) and not crashed since: a node's store must never be
    /// driven by two instances at once.
    running: Mutex<std::collections::BTreeSet<usize>>,
    /// Set once the workload's bucket exists: the fault phase waits for it.
    bucket_created: Mutex<bool>,
    /// Whether the bucket keeps versions.
    versioned: bool,
    /// Every acknowledged version: (key, version id, content hash).
    versions: Mutex<Vec<(String, String, [u8; 32])>>,
    /// With `object_lock`: every version acknowledged into the Object Lock bucket and
    /// what was acknowledged of its lock and deletion.
    lock_versions: Mutex<Vec<LockedVersion>>,
    /// How buckets are made (the workload's and the scratch bucket).
    bucket_options: Option<BucketOptions>,
    /// Content hashes of every put attempted into the scratch bucket: a read there may
    /// fail or return one of them, never anything else.
    scratch_attempts: Mutex<BTreeSet<[u8; 32]>>,
    /// What happened to the scratch bucket, to check that no deletion of it was
    /// acknowledged while it held an acknowledged put.
    scratch_history: Mutex<ScratchHistory>,
}

/// A version in the Object Lock bucket and what was acknowledged of it.
#[derive(Debug, Clone, Default)]
struct LockedVersion {
    key: String,
    version_id: String,
    hold_acknowledged: bool,
    retention_acknowledged: bool,
    delete_acknowledged: bool,
}

/// The scratch bucket's acknowledged puts and deletions, and every object delete tried
/// there. A put acknowledged into a generation that is not the bucket's generation at
/// the end must have been deleted by an object delete that could come after it (one that
/// ended after the put began): DeleteBucket removes only empty buckets, and a bucket is
/// never replaced but through a deletion. Otherwise the put was lost with its bucket
/// (deleted under it, or replaced by a concurrent CreateBucket).
#[derive(Default)]
struct ScratchHistory {
    /// (bucket generation, key, virtual ms the put began).
    puts_acknowledged: Vec<(u64, String, u64)>,
    /// (key, virtual ms the delete ended; `u64::MAX` until it does, or when its gateway
    /// crashed and its effect is unknown).
    object_deletes: Vec<(String, u64)>,
    generations_deleted: BTreeSet<u64>,
}

impl ScratchHistory {
    /// Acknowledged puts whose bucket generation is gone (`final_generation` is the one
    /// there is at the end, if any; None: only generations whose deletion was
    /// acknowledged count as gone) with no object delete that could have come after them.
    fn puts_lost_with_their_bucket(&self, final_generation: Option<Option<u64>>) -> Vec<(u64, String)> {
        self.puts_acknowledged
            .iter()
            .filter(|(generation, _, _)| match final_generation {
                Some(last) => last != Some(*generation),
                None => self.generations_deleted.contains(generation),
            })
            .filter(|(_, key, began_ms)| {
                !self
                    .object_deletes
                    .iter()
                    .any(|(deleted, ended_ms)| deleted == key && ended_ms >= began_ms)
            })
            .map(|(generation, key, _)| (*generation, key.clone()))
            .collect()
    }
}

fn node_id(index: usize) -> NodeId {
    // Distinct, stable ids; the simulator never needs real ed25519 keys.
    let mut bytes = *blake3::hash(&(index as u64).to_le_bytes()).as_bytes();
    bytes[0] = index as u8;
    NodeId(bytes)
}

fn content(seed: u64, length: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(length);
    bytes.extend_from_slice(&PLAINTEXT_MARKER[..PLAINTEXT_MARKER.len().min(length)]);
    let mut state = seed | 1;
    while bytes.len() < length {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.push(state as u8);
    }
    bytes
}

impl Shared {
    fn fail(&self, message: String) {
        self.world.record(&[b"FAIL", message.as_bytes()]);
        self.failures.lock().expect("not poisoned").push(message);
    }

    fn count(&self, counter: &'static str) {
        self.count_by(counter, 1);
    }

    fn count_by(&self, counter: &'static str, amount: u64) {
        *self.counters.lock().expect("not poisoned").entry(counter).or_default() += amount;
    }

    /// Whether a read of an object made of `stripes` may fail: one of them was destroyed
    /// beyond the budget.
    fn lost_beyond_budget(&self, stripes: &[StripeId]) -> bool {
        let destroyed = self.destroyed.lock().expect("not poisoned");
        stripes.iter().any(|stripe_id| destroyed.contains(stripe_id))
    }

    /// The latest record of every row of `table`, merged over every node's local rows.
    fn merged_rows(
        &self,
        table: bdr_protocol::wire::Table,
    ) -> BTreeMap<Vec<u8>, bdr_protocol::records::Lww<bdr_protocol::records::Record>> {
        let mut merged: BTreeMap<Vec<u8>, bdr_protocol::records::Lww<bdr_protocol::records::Record>> = BTreeMap::new();
        for env in &self.envs {
            let rows = env
                .meta_store()
                .scan(Tree::Table(table), b"", None, 1_000_000)
                .unwrap_or_default();
            for (key, value) in rows {
                let Ok(register) = bdr_protocol::records::decode_stored_value(&value) else {
                    self.fail(format!("undecodable {} row", table.name()));
                    continue;
                };
                match merged.get_mut(&key) {
                    Some(existing) => {
                        existing.merge(&register);
                    }
                    None => {
                        merged.insert(key, register);
                    }
                }
            }
        }
        merged
    }

    /// The generation (`created_at_ms`) of every bucket that exists, by name.
    fn bucket_generations(&self) -> BTreeMap<String, u64> {
        use bdr_protocol::records::Record;
        self.merged_rows(bdr_protocol::wire::Table::Buckets)
            .into_values()
            .filter_map(|register| match register.value {
                Some(Record::Bucket(bucket)) => Some((bucket.name, bucket.created_at_ms)),
                _ => None,
            })
            .collect()
    }

    /// Object versions left by a bucket that was deleted (perhaps created again since):
    /// no request serves them, and maintenance must collect them.
    fn stale_object_versions(&self) -> usize {
        use bdr_protocol::records::Record;
        let generations = self.bucket_generations();
        self.merged_rows(bdr_protocol::wire::Table::Objects)
            .values()
            .filter(|register| match &register.value {
                Some(Record::ObjectVersion(object)) => !of_existing_bucket(object, &generations),
                _ => false,
            })
            .count()
    }

    /// Stripes that committed object versions of existing buckets use, with their codes.
    fn object_stripes(&self) -> BTreeMap<StripeId, StripeCodec> {
        use bdr_protocol::records::{ObjectData, Record};
        let generations = self.bucket_generations();
        let mut live = BTreeMap::new();
        for register in self.merged_rows(bdr_protocol::wire::Table::Objects).values() {
            if let Some(Record::ObjectVersion(object)) = &register.value {
                if !of_existing_bucket(object, &generations) {
                    continue;
                }
                if let ObjectData::Striped(manifest) = &object.data {
                    for stripe in &manifest.stripes {
                        live.insert(stripe.stripe_id, manifest.codec);
                    }
                }
            }
        }
        live
    }

    /// Stripes of the parts of multipart uploads still in progress (neither completed
    /// nor aborted): they must be kept, at full redundancy, like objects'.
    fn upload_part_stripes(&self) -> BTreeMap<StripeId, StripeCodec> {
        use bdr_protocol::records::{ObjectData, Record};
        let uploads: BTreeSet<String> = self
            .merged_rows(bdr_protocol::wire::Table::MultipartUploads)
            .into_values()
            .filter_map(|register| match register.value {
                Some(Record::MultipartUpload(upload)) => Some(upload.upload_id),
                _ => None,
            })
            .collect();
        let mut live = BTreeMap::new();
        for register in self.merged_rows(bdr_protocol::wire::Table::MultipartParts).values() {
            if let Some(Record::MultipartPart(part)) = &register.value {
                if !uploads.contains(&part.upload_id) {
                    continue;
                }
                if let ObjectData::Striped(manifest) = &part.data {
                    for stripe in &manifest.stripes {
                        live.insert(stripe.stripe_id, manifest.codec);
                    }
                }
            }
        }
        live
    }

    /// Beyond the budget: m+1 shards of a few live object stripes are destroyed on every
    /// node (deleted, or rotten so that reads find them corrupt).
    fn destroy_beyond_budget(&self) {
        let mut candidates: Vec<(StripeId, StripeCodec)> = self.object_stripes().into_iter().collect();
        let count = BEYOND_BUDGET_STRIPES.min(candidates.len());
        for pick in 0..count {
            let at = pick + self.world.random_below((candidates.len() - pick) as u64) as usize;
            candidates.swap(pick, at);
            let (stripe_id, codec) = candidates[pick];
            let mut indexes: Vec<u8> = (0..codec.total_shards()).collect();
            let doomed = usize::from(codec.parity_shards) + 1;
            for slot in 0..doomed {
                let at = slot + self.world.random_below((indexes.len() - slot) as u64) as usize;
                indexes.swap(slot, at);
            }
            for index in &indexes[..doomed] {
                let key = bdr_node::env::ShardKey {
                    stripe_id,
                    index: *index,
                };
                let by_rot = self.world.random_below(2) == 0;
                let position = self.world.random_below(64) as usize;
                for env in &self.envs {
                    if by_rot {
                        env.shards.destroy_by_rot(key, position);
                    } else {
                        env.shards.destroy(key);
                    }
                }
            }
            self.world.record(&[b"destroy", stripe_id.as_bytes()]);
            self.destroyed.lock().expect("not poisoned").insert(stripe_id);
            self.faults.lock().expect("not poisoned").push(format!(
                "beyond budget: stripe {} loses {doomed} of {} shards",
                stripe_id.short(),
                codec.total_shards()
            ));
        }
        self.count_by("stripes_destroyed", count as u64);
    }

    /// Beyond the budget: the maintainers must count the destroyed stripes still in use
    /// as lost (their surveys ran during the settle phase).
    fn check_loss_reported(&self) {
        let object_stripes = self.object_stripes();
        let destroyed_in_use = self
            .destroyed
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|stripe_id| object_stripes.contains_key(stripe_id))
            .count() as u64;
        let lost_reported: u64 = self
            .up_nodes()
            .iter()
            .map(|(_, node)| node.maintenance_report().stripes.lost)
            .sum();
        self.count_by("lost_stripes_reported", lost_reported);
        self.world.record(&[
            b"loss-reported",
            &destroyed_in_use.to_le_bytes(),
            &lost_reported.to_le_bytes(),
        ]);
        if destroyed_in_use > 0 && lost_reported == 0 {
            self.fail(format!(
                "{destroyed_in_use} stripes in use lost m+1 shards, but no maintainer reports a lost stripe"
            ));
        }
    }

    fn up_nodes(&self) -> Vec<(usize, Arc<ClusterNode<SimEnv>>)> {
        let nodes = self.nodes.lock().expect("not poisoned");
        self.envs
            .iter()
            .enumerate()
            .filter_map(|(index, env)| nodes.get(&env.id).map(|node| (index, Arc::clone(node))))
            .collect()
    }

    fn boot(self: &Arc<Self>, index: usize) {
        // A node removed from the cluster (or lost) never comes back.
        if !self.members.lock().expect("not poisoned").contains(&index) {
            return;
        }
        if !self.running.lock().expect("not poisoned").insert(index) {
            return;
        }
        let env = Arc::clone(&self.envs[index]);
        let shared = Arc::clone(self);
        let spec = self.specs[index].clone();
        let timers = self.scenario.timers;
        self.world.record(&[b"boot", env.id.as_bytes()]);
        self.world.executor.spawn(
            Some(env.id),
            Box::pin(async move {
                let keys = DataKeys::from_root(&RootKey([7; 32]));
                let node = match ClusterNode::start(
                    Arc::clone(&env),
                    timers.membership(),
                    timers.maintenance(),
                    spec,
                    Some(keys),
                )
                .await
                {
                    Ok(node) => node,
                    Err(error) => {
                        shared.fail(format!("node {index} failed to start: {error}"));
                        return;
                    }
                };
                // Simulated objects are kilobytes: parts of any size let completions
                // list many parts, as real uploads of large backups do.
                node.set_part_bytes_min(1);
                let inbound = ClusterInbound(Arc::clone(&node));
                shared
                    .world
                    .register(env.id, Arc::new(ClusterInbound(Arc::clone(&node))));
                shared.nodes.lock().expect("not poisoned").insert(env.id, node);
                // Meet the other nodes that are up, as bootstrap peers would.
                for (other, _) in shared.up_nodes() {
                    if other != index {
                        inbound.peer_admitted(shared.envs[other].id);
                    }
                }
            }),
        );
    }

    fn crash(&self, index: usize) {
        self.running.lock().expect("not poisoned").remove(&index);
        let env = &self.envs[index];
        self.world.record(&[b"crash", env.id.as_bytes()]);
        self.world.unregister(&env.id);
        self.nodes.lock().expect("not poisoned").remove(&env.id);
        self.world.executor.kill_node_tasks(&env.id);
        env.meta.crash();
        env.shards.crash();
    }

    fn zone_of(&self, index: usize) -> u32 {
        self.zones[index]
    }

    /// Runs the world until `until_ms`, sampling at every multiple of
    /// `SAMPLE_INTERVAL_MS` on the way. Running in steps runs exactly the same schedule.
    fn run_until_sampled(&self, until_ms: u64) {
        let executor = &self.world.executor;
        if executor.now_ms() >= until_ms {
            executor.run_until(until_ms);
            return;
        }
        while executor.now_ms() < until_ms {
            let elapsed_ms = executor.now_ms() - START_MS;
            let next_sample_ms = START_MS + (elapsed_ms / SAMPLE_INTERVAL_MS + 1) * SAMPLE_INTERVAL_MS;
            let step_end_ms = next_sample_ms.min(until_ms);
            executor.run_until(step_end_ms);
            if step_end_ms == next_sample_ms {
                self.sample();
            }
        }
    }

    /// Records the summed maintenance reports of the nodes up (reads only).
    fn sample(&self) {
        let mut sample = RedundancySample {
            at_ms: self.world.executor.now_ms() - START_MS,
            ..RedundancySample::default()
        };
        for (_, node) in self.up_nodes() {
            let report = node.maintenance_report();
            sample.stripes.add(&report.stripes);
            sample.repair_queued_stripes += report.repair_queued_stripes;
            sample.nodes_up += 1;
        }
        self.samples.lock().expect("not poisoned").push(sample);
    }

    fn member_list(&self) -> Vec<usize> {
        self.members.lock().expect("not poisoned").iter().copied().collect()
    }

    /// Runs one client operation on `gateway` as that node's task, so a crash of the
    /// gateway cuts it off like a dropped connection.
    async fn operation(self: &Arc<Self>, client: u32, number: u32) {
        let up = self.up_nodes();
        if up.is_empty() {
            return;
        }
        let (gateway_index, gateway) = up[self.world.random_below(up.len() as u64) as usize].clone();
        let key = format!(
            "c{client}/k{}",
            self.world.random_below(u64::from(self.scenario.keys_per_client))
        );
        let roll = self.world.random_below(100);
        let shared = Arc::clone(self);
        let (sender, receiver) = futures::channel::oneshot::channel::<()>();
        let max_length = u64::from(self.scenario.stripe_length_bytes) * 3;
        let length = self.world.random_below(max_length + 1) as usize;
        let value_seed = (u64::from(client) << 48) | (u64::from(number) << 16) | self.world.random_below(1 << 16);
        self.world
            .record(&[b"op", key.as_bytes(), &roll.to_le_bytes(), &[gateway_index as u8]]);
        let gateway_id = self.envs[gateway_index].id;
        self.world.executor.spawn(
            Some(gateway_id),
            Box::pin(async move {
                if LOCK_ROLLS.contains(&roll) && shared.scenario.object_lock {
                    shared.lock_step(&gateway, value_seed).await;
                } else if roll >= BUCKET_CHURN_ROLL_FROM && shared.scenario.bucket_churn {
                    shared.churn(&gateway, value_seed, length).await;
                } else if roll < MULTIPART_ROLL_BELOW && shared.scenario.multipart {
                    shared.multipart(&gateway, &key, value_seed, max_length).await;
                } else if roll < 45 {
                    shared.put(&gateway, &key, content(value_seed, length)).await;
                } else if roll < 85 {
                    shared.get(&gateway, &key, false).await;
                } else {
                    shared.delete(&gateway, &key).await;
                }
                let _ = sender.send(());
            }),
        );
        if receiver.await.is_err() {
            // The gateway crashed mid-operation: its effect is unknown. The model
            // already holds the attempted value as "maybe" (put/delete register first).
            self.count("cut_off");
        }
        self.count("operations");
    }

    /// Runs `work` as a task of `node`, as a request to that node runs in its process: a
    /// crash of the node drops it. Called from another node's task instead, the work
    /// would go on after the crash, a zombie writing to the disk of the node's next run
    /// behind its back (found so: a row written so went missing from the next run's
    /// anti-entropy digest). None if `node` is not running (it crashed, even if it has
    /// started again since) or crashed before the work ended.
    async fn on_node<T: Send + 'static>(
        &self,
        node: &Arc<ClusterNode<SimEnv>>,
        work: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let running = self
            .nodes
            .lock()
            .expect("not poisoned")
            .get(&node.env().node_id())
            .is_some_and(|live| Arc::ptr_eq(live, node));
        if !running {
            return None;
        }
        let (sender, receiver) = futures::channel::oneshot::channel();
        self.world.executor.spawn(
            Some(node.env().node_id()),
            Box::pin(async move {
                let _ = sender.send(work.await);
            }),
        );
        receiver.await.ok()
    }

    /// Creates a bucket for the workload, retrying while the metadata replicas finish the
    /// handover of the layout the booting nodes just built (they refuse reads until
    /// then), like a client. Setup is not under test: it may take as long as the cluster
    /// needs to converge. False (and a failure) if it cannot.
    async fn create_bucket_retrying(
        &self,
        node: &Arc<ClusterNode<SimEnv>>,
        name: &str,
        options: BucketOptions,
    ) -> bool {
        for attempt in 1..=BUCKET_CREATE_ATTEMPTS_MAX {
            match node.create_bucket_with(name, "sim", options).await {
                Ok(_) => {
                    self.world.record(&[b"bucket-created", &attempt.to_le_bytes()]);
                    return true;
                }
                Err(DataError::BucketExists(_)) if attempt > 1 => return true,
                Err(DataError::Meta(_) | DataError::BucketBusy(_)) if attempt < BUCKET_CREATE_ATTEMPTS_MAX => {
                    self.world.executor.sleep(BUCKET_CREATE_RETRY_MS).await;
                }
                Err(error) => {
                    self.fail(format!("cannot create the bucket {name}: {error}"));
                    return false;
                }
            }
        }
        false
    }

    /// One step in the Object Lock bucket, picked at random: put a version, place a legal
    /// hold or a retention on a version written before, delete one by id, or place a hold
    /// while another gateway deletes the version.
    async fn lock_step(self: &Arc<Self>, gateway: &Arc<ClusterNode<SimEnv>>, value_seed: u64) {
        let known = self.lock_versions.lock().expect("not poisoned").len() as u64;
        let step = match known {
            0 => 0,
            _ => self.world.random_below(5),
        };
        if step == 0 {
            let key = format!("v{}", self.world.random_below(LOCK_KEYS));
            let write = ObjectWrite {
                bucket: LOCK_BUCKET.into(),
                key: key.clone(),
                ..ObjectWrite::default()
            };
            let data = content(value_seed, (value_seed % 64) as usize);
            let result = gateway.put_object(write, futures::io::Cursor::new(data)).await;
            self.world
                .record(&[b"lock-put", key.as_bytes(), &[result.is_ok() as u8]]);
            match result {
                Ok(record) => self.lock_versions.lock().expect("not poisoned").push(LockedVersion {
                    key,
                    version_id: record.version_id,
                    ..LockedVersion::default()
                }),
                Err(_) => self.count("unavailable"),
            }
            return;
        }
        let index = self.world.random_below(known) as usize;
        let (key, version_id) = {
            let versions = self.lock_versions.lock().expect("not poisoned");
            (versions[index].key.clone(), versions[index].version_id.clone())
        };
        let bucket = match gateway.bucket(LOCK_BUCKET).await {
            Ok(Some(bucket)) => bucket,
            _ => {
                self.count("unavailable");
                return;
            }
        };
        let retention = Retention {
            mode: RetentionMode::Governance,
            retain_until_ms: gateway.env().now_ms().saturating_add(LOCK_RETENTION_MS),
        };
        // The race places a hold or a retention, at random.
        let race_change = 1 + self.world.random_below(2);
        let change = |step| match step {
            2 => LockChange::Retention(Some(retention)),
            _ => LockChange::LegalHold(true),
        };
        let (deleted, changed) = match step {
            1 | 2 => {
                let changed = gateway
                    .change_object_lock(&bucket, &key, Some(&version_id), change(step), false)
                    .await;
                (None, Some(changed.map(|_| ())))
            }
            3 => {
                let deleted = gateway
                    .delete_object_version(&bucket, &key, Some(&version_id), false)
                    .await;
                (Some(deleted.map(|_| ())), None)
            }
            _ => {
                // The race: the delete runs as a task of another node, the hold here.
                let up = self.up_nodes();
                let (_, other) = up[self.world.random_below(up.len() as u64) as usize].clone();
                let delete = {
                    let (deleter, bucket, key, version_id) =
                        (Arc::clone(&other), bucket.clone(), key.clone(), version_id.clone());
                    self.on_node(&other, async move {
                        deleter
                            .delete_object_version(&bucket, &key, Some(&version_id), false)
                            .await
                            .map(|_| ())
                    })
                };
                let lock = gateway.change_object_lock(&bucket, &key, Some(&version_id), change(race_change), false);
                let (deleted, locked) = futures::join!(delete, lock);
                match (&deleted, &locked) {
                    (Some(Ok(())), Err(_)) => self.count("lock_races_delete_won"),
                    (Some(Err(_)), Ok(_)) => self.count("lock_races_lock_won"),
                    _ => {}
                }
                // A delete whose node crashed (None) has an unknown effect, like a failed one.
                (deleted, Some(locked.map(|_| ())))
            }
        };
        let step = match step {
            4 => race_change,
            _ => step,
        };
        let ok = |result: &Option<Result<(), DataError>>| result.as_ref().is_some_and(Result::is_ok);
        self.world.record(&[
            b"lock-step",
            key.as_bytes(),
            version_id.as_bytes(),
            &[step as u8, ok(&deleted) as u8, ok(&changed) as u8],
        ]);
        let mut versions = self.lock_versions.lock().expect("not poisoned");
        let version = &mut versions[index];
        version.delete_acknowledged |= ok(&deleted);
        if ok(&changed) {
            match step {
                2 => version.retention_acknowledged = true,
                _ => version.hold_acknowledged = true,
            }
        }
    }

    /// Every version of the Object Lock bucket whose lock or deletion was acknowledged:
    /// a lock holds and a deletion stays, and never were both acknowledged.
    async fn check_object_locks(&self, up: &[(usize, Arc<ClusterNode<SimEnv>>)]) {
        let versions = self.lock_versions.lock().expect("not poisoned").clone();
        // Every replica's rows, merged: what the cluster converges to, including a
        // tombstone that reached one replica only.
        let merged = self.merged_rows(bdr_protocol::wire::Table::Objects);
        let mut checked = 0;
        for (position, version) in versions.iter().enumerate() {
            let locked = version.hold_acknowledged || version.retention_acknowledged;
            if !locked && !version.delete_acknowledged {
                continue;
            }
            checked += 1;
            let gateway = &up[position % up.len()].1;
            let observed =
                match gateway.bucket(LOCK_BUCKET).await {
                    Ok(Some(bucket)) => {
                        let read = gateway
                            .object_version(&bucket, &version.key, Some(&version.version_id))
                            .await;
                        let row = object_row(LOCK_BUCKET, bucket.created_at_ms, &version.key, &version.version_id);
                        let everywhere = row.encode().ok().and_then(|row| merged.get(&row)).and_then(|register| {
                            match &register.value {
                                Some(bdr_protocol::records::Record::ObjectVersion(record)) => Some(record.clone()),
                                _ => None,
                            }
                        });
                        match (read, everywhere) {
                            (Ok(record), Some(everywhere)) if record == everywhere => Ok(record),
                            (Err(DataError::NoSuchVersion), None) => Err(DataError::NoSuchVersion),
                            (read, everywhere) => {
                                self.fail(format!(
                                "version {} of {}: a quorum read gives {read:?} but the replicas hold {everywhere:?}",
                                version.version_id, version.key
                            ));
                                continue;
                            }
                        }
                    }
                    Ok(None) => Err(DataError::NoSuchBucket(LOCK_BUCKET.into())),
                    Err(error) => Err(error),
                };
            let tag: &[u8] = match &observed {
                Ok(record) if record.lock.legal_hold => b"held",
                Ok(_) => b"present",
                Err(DataError::NoSuchVersion) => b"absent",
                Err(_) => b"unavailable",
            };
            self.world.record(&[
                b"lock-check",
                version.key.as_bytes(),
                version.version_id.as_bytes(),
                tag,
            ]);
            let name = format!("version {} of {}", version.version_id, version.key);
            if locked && version.delete_acknowledged {
                self.fail(format!(
                    "{name}: both a lock and a delete by id were acknowledged ({version:?})"
                ));
            }
            match observed {
                Ok(record) => {
                    if version.delete_acknowledged {
                        self.fail(format!("{name} came back after its delete was acknowledged"));
                    }
                    if version.hold_acknowledged && !record.lock.legal_hold {
                        self.fail(format!("{name} lost its acknowledged legal hold: {:?}", record.lock));
                    }
                    if version.retention_acknowledged && record.lock.retention.is_none() {
                        self.fail(format!("{name} lost its acknowledged retention: {:?}", record.lock));
                    }
                }
                Err(DataError::NoSuchVersion) if locked => {
                    self.fail(format!("{name} is gone though its lock was acknowledged ({version:?})"));
                }
                Err(DataError::NoSuchVersion) => {}
                Err(error) => self.fail(format!("{name} cannot be read after healing: {error}")),
            }
        }
        self.count_by("lock_versions_checked", checked);
    }

    /// One step of the scratch bucket's life, picked at random: create it, put an
    /// object, read one back, or empty and delete it. Steps interleave across clients,
    /// so puts race deletions and re-creations.
    async fn churn(self: &Arc<Self>, gateway: &Arc<ClusterNode<SimEnv>>, value_seed: u64, length: usize) {
        let key = format!("s{}", self.world.random_below(SCRATCH_KEYS));
        // Of 11: create 1, two creations racing 1, put 4, read 2, empty and delete 1, a
        // put racing an emptying and deletion 1, a put outliving its bucket 1.
        match self.world.random_below(11) {
            0 => {
                let Some(options) = self.bucket_options else { return };
                let result = gateway.create_bucket_with(SCRATCH_BUCKET, "sim", options).await;
                self.world.record(&[b"scratch-create", &[result.is_ok() as u8]]);
            }
            1 => {
                // Two creations at once through two gateways: at most one may succeed,
                // or puts acknowledged in the other generation would be lost with it.
                let Some(options) = self.bucket_options else { return };
                let up = self.up_nodes();
                let other = Arc::clone(&up[self.world.random_below(up.len() as u64) as usize].1);
                let creator = Arc::clone(&other);
                let (here, there) = futures::future::join(
                    gateway.create_bucket_with(SCRATCH_BUCKET, "sim", options),
                    self.on_node(&other, async move {
                        creator.create_bucket_with(SCRATCH_BUCKET, "sim", options).await
                    }),
                )
                .await;
                let there = there.unwrap_or_else(|| Err(DataError::NotDurable("the other gateway crashed".into())));
                self.world
                    .record(&[b"scratch-create-racing", &[here.is_ok() as u8, there.is_ok() as u8]]);
                if here.is_ok() && there.is_ok() {
                    self.fail("two concurrent CreateBucket calls of one name were both acknowledged".into());
                }
                // Each creator writes at once into the bucket it was told it created.
                let (shared, writer) = (Arc::clone(self), Arc::clone(&other));
                let other_key = key.clone();
                futures::future::join(
                    self.scratch_put(gateway, key, value_seed, length),
                    self.on_node(&other, async move {
                        shared.scratch_put(&writer, other_key, value_seed ^ 1, length).await
                    }),
                )
                .await;
            }
            2..=5 => self.scratch_put(gateway, key, value_seed, length).await,
            6..=7 => {
                let observed = match version_of(gateway, SCRATCH_BUCKET, &key, None).await {
                    Ok(record) => content_hash_of(gateway, record).await,
                    Err(error) => Err(error),
                };
                let tag: &[u8] = match &observed {
                    Ok(hash) => hash,
                    Err(_) => b"unavailable",
                };
                self.world.record(&[b"scratch-get", key.as_bytes(), tag]);
                if let Ok(hash) = observed {
                    if !self.scratch_attempts.lock().expect("not poisoned").contains(&hash) {
                        self.fail(format!(
                            "scratch object {key} reads {}, which nobody wrote",
                            hex::encode(&hash[..6])
                        ));
                    }
                }
            }
            8 => {
                let deleted = self.empty_and_delete_scratch_bucket(gateway).await;
                self.world
                    .record(&[b"scratch-delete-bucket", &[matches!(deleted, Ok(true)) as u8]]);
                if matches!(deleted, Ok(true)) {
                    self.count("scratch_buckets_deleted");
                }
            }
            10 => {
                // A put whose body is slow to arrive (a large one, a slow client) while
                // the bucket is emptied and deleted: the deletion sees nothing of it, and
                // its version, written once the body is in, names a dead generation.
                // The put must fail; its version is garbage to collect.
                let (body_released, released) = futures::channel::oneshot::channel::<()>();
                let (put, deleted) = futures::future::join(
                    self.scratch_put_held_back(gateway, key, value_seed, length, released),
                    async {
                        let deleted = self.empty_and_delete_scratch_bucket(gateway).await;
                        let _ = body_released.send(());
                        deleted
                    },
                )
                .await;
                self.world
                    .record(&[b"scratch-delete-bucket-outlived", &[matches!(deleted, Ok(true)) as u8]]);
                if matches!(deleted, Ok(true)) {
                    self.count("scratch_buckets_deleted");
                    // It saw the bucket before the deletion ended, so NoSuchBucket came
                    // from its commit, which writes the version first: a version of a
                    // deleted bucket, which the final checks require to be collected.
                    if matches!(put, Err(DataError::NoSuchBucket(_))) {
                        self.count("stale_versions_written");
                    }
                }
            }
            _ => {
                // The race DeleteBucket must settle: a put in flight while the bucket is
                // emptied and deleted. Either the deletion sees the put's version and
                // refuses, or the put fails (its version then goes as garbage).
                let (_, deleted) = futures::future::join(
                    self.scratch_put(gateway, key, value_seed, length),
                    self.empty_and_delete_scratch_bucket(gateway),
                )
                .await;
                self.world
                    .record(&[b"scratch-delete-bucket-racing", &[matches!(deleted, Ok(true)) as u8]]);
                if matches!(deleted, Ok(true)) {
                    self.count("scratch_buckets_deleted");
                }
            }
        }
    }

    /// A put into the scratch bucket, noted as attempted and, if acknowledged, with the
    /// bucket generation it was acknowledged in.
    async fn scratch_put(&self, gateway: &Arc<ClusterNode<SimEnv>>, key: String, value_seed: u64, length: usize) {
        let data = content(value_seed, length);
        let _ = self
            .scratch_put_body(gateway, key, &data, futures::io::Cursor::new(data.clone()))
            .await;
    }

    /// [`Self::scratch_put`] whose body's last byte arrives only once `released` fires.
    async fn scratch_put_held_back(
        &self,
        gateway: &Arc<ClusterNode<SimEnv>>,
        key: String,
        value_seed: u64,
        length: usize,
        released: futures::channel::oneshot::Receiver<()>,
    ) -> Result<(), DataError> {
        use futures::TryStreamExt;
        let data = content(value_seed, length);
        let split = data.len().saturating_sub(1);
        let (head, tail) = (data[..split].to_vec(), data[split..].to_vec());
        let body = futures::stream::iter([Ok::<_, std::io::Error>(head)])
            .chain(futures::stream::once(Box::pin(async move {
                let _ = released.await;
                Ok(tail)
            })))
            .into_async_read();
        self.scratch_put_body(gateway, key, &data, body).await
    }

    async fn scratch_put_body(
        &self,
        gateway: &Arc<ClusterNode<SimEnv>>,
        key: String,
        data: &[u8],
        body: impl futures::AsyncBufRead + Send + Unpin,
    ) -> Result<(), DataError> {
        let hash = *blake3::hash(data).as_bytes();
        self.scratch_attempts.lock().expect("not poisoned").insert(hash);
        let write = ObjectWrite {
            bucket: SCRATCH_BUCKET.into(),
            key: key.clone(),
            ..ObjectWrite::default()
        };
        let began_ms = self.world.executor.now_ms();
        let result = gateway.put_object(write, body).await;
        self.world
            .record(&[b"scratch-put", key.as_bytes(), &[result.is_ok() as u8]]);
        let record = result?;
        self.count("scratch_puts_acknowledged");
        self.scratch_history
            .lock()
            .expect("not poisoned")
            .puts_acknowledged
            .push((record.bucket_created_at_ms, key, began_ms));
        Ok(())
    }

    /// Deletes the scratch bucket's objects, then the bucket if it is empty (as an S3
    /// client does: DeleteBucket refuses a bucket with objects). Returns whether the
    /// bucket was deleted.
    async fn empty_and_delete_scratch_bucket(&self, gateway: &Arc<ClusterNode<SimEnv>>) -> Result<bool, DataError> {
        let listing = gateway
            .list_objects(SCRATCH_BUCKET, "", None, SCRATCH_LIST_LIMIT)
            .await?;
        for object in &listing.records {
            let position = {
                let mut history = self.scratch_history.lock().expect("not poisoned");
                history.object_deletes.push((object.key.clone(), u64::MAX));
                history.object_deletes.len() - 1
            };
            let deleted = gateway.delete_object(SCRATCH_BUCKET, &object.key).await;
            // Failed deletes may have taken effect too: only the end time is learnt.
            self.scratch_history.lock().expect("not poisoned").object_deletes[position].1 =
                self.world.executor.now_ms();
            deleted?;
        }
        self.delete_scratch_bucket(gateway).await
    }

    /// DeleteBucket on the scratch bucket as it is now: whether it went (false when it
    /// was not empty).
    async fn delete_scratch_bucket(&self, gateway: &Arc<ClusterNode<SimEnv>>) -> Result<bool, DataError> {
        let bucket = gateway
            .bucket(SCRATCH_BUCKET)
            .await?
            .ok_or_else(|| DataError::NoSuchBucket(SCRATCH_BUCKET.into()))?;
        match gateway.delete_bucket_generation(&bucket).await {
            Ok(()) => {
                self.scratch_history
                    .lock()
                    .expect("not poisoned")
                    .generations_deleted
                    .insert(bucket.created_at_ms);
                Ok(true)
            }
            Err(DataError::BucketNotEmpty(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// A multipart upload: create, upload up to `MULTIPART_PARTS_MAX` parts, then abort
    /// (a quarter of the time) or complete with a random ascending selection of the
    /// parts that were stored (the others become garbage, as an S3 client leaves them
    /// when it retries a part). Nodes take parts of any size here (see
    /// `ClusterNode::set_part_bytes_min`), so completions list several parts.
    async fn multipart(&self, gateway: &Arc<ClusterNode<SimEnv>>, key: &str, value_seed: u64, max_length: u64) {
        let write = ObjectWrite {
            bucket: BUCKET.into(),
            key: key.into(),
            ..ObjectWrite::default()
        };
        let upload_id = match gateway.create_multipart_upload(write).await {
            Ok(upload_id) => upload_id,
            Err(_) => {
                self.world.record(&[b"multipart-create", key.as_bytes(), &[0]]);
                self.count("unavailable");
                return;
            }
        };
        self.world
            .record(&[b"multipart-create", key.as_bytes(), upload_id.as_bytes()]);
        let part_count = 1 + self.world.random_below(MULTIPART_PARTS_MAX) as u32;
        let mut uploaded: Vec<(u32, String, Vec<u8>)> = Vec::new();
        for part_number in 1..=part_count {
            let length = 1 + self.world.random_below(max_length) as usize;
            let data = content(value_seed ^ (u64::from(part_number) << 8), length);
            let result = gateway
                .upload_part(
                    BUCKET,
                    key,
                    &upload_id,
                    part_number,
                    futures::io::Cursor::new(data.clone()),
                    BodyCheck::none(),
                )
                .await;
            self.world.record(&[
                b"multipart-part",
                key.as_bytes(),
                &[part_number as u8, result.is_ok() as u8],
            ]);
            if let Ok(part) = result {
                uploaded.push((part_number, part.etag, data));
            }
        }
        if uploaded.is_empty() || self.world.random_below(4) == 0 {
            let result = gateway.abort_multipart_upload(BUCKET, key, &upload_id).await;
            self.world
                .record(&[b"multipart-abort", key.as_bytes(), &[result.is_ok() as u8]]);
            match result {
                Ok(()) => self.count("multipart_aborted"),
                Err(_) => self.count("unavailable"),
            }
            return;
        }
        // Each stored part is listed with probability 3/4, and at least one is.
        let mut listed: Vec<&(u32, String, Vec<u8>)> =
            uploaded.iter().filter(|_| self.world.random_below(4) != 0).collect();
        if listed.is_empty() {
            listed.push(&uploaded[self.world.random_below(uploaded.len() as u64) as usize]);
        }
        let mut hasher = blake3::Hasher::new();
        for (_, _, data) in &listed {
            hasher.update(data);
        }
        let hash = *hasher.finalize().as_bytes();
        let parts: Vec<(u32, String)> = listed
            .iter()
            .map(|(part_number, etag, _)| (*part_number, etag.clone()))
            .collect();
        self.note_attempt(key, Some(hash));
        let result = gateway.complete_multipart_upload(BUCKET, key, &upload_id, &parts).await;
        self.world.record(&[
            b"multipart-complete",
            key.as_bytes(),
            &[parts.len() as u8, result.is_ok() as u8],
        ]);
        match result {
            Ok(record) => {
                self.count("multipart_completed");
                if parts.len() > 1 {
                    self.count("multipart_completed_multiple_parts");
                }
                self.note_acknowledged_write(key, Some(hash), record.version_id, hash);
            }
            Err(_) => self.count("unavailable"),
        }
    }

    /// Layout changes during the fault phase: nodes join, and with `node_replacement` one
    /// node is replaced (lost with its disk, or drained) and removed once safe.
    async fn layout_changes(self: Arc<Self>) {
        let phase_ms = self.scenario.fault_phase_ms;
        let joining = self.scenario.joining_nodes as usize;
        if let Some((old, new)) = self.replacement {
            self.world.executor.sleep(phase_ms / 4).await;
            let lost = self.world.random_below(2) == 0;
            self.world.record(&[b"replace", &[old as u8, new as u8, lost as u8]]);
            self.faults.lock().expect("not poisoned").push(format!(
                "node {old} {} and replaced by node {new}",
                if lost { "lost with its disk" } else { "drained" }
            ));
            if lost {
                self.members.lock().expect("not poisoned").remove(&old);
                self.crash(old);
                self.envs[old].shards.wipe();
            }
            self.members.lock().expect("not poisoned").insert(new);
            self.boot(new);
            self.count("nodes_joined");
            if !lost {
                let old_id = self.envs[old].id;
                loop {
                    self.world.executor.sleep(LAYOUT_RETRY_MS).await;
                    let Some((_, node)) = self.up_nodes().into_iter().find(|(index, _)| *index != old) else {
                        continue;
                    };
                    let operator = Arc::clone(&node);
                    let drained = self
                        .on_node(&node, async move {
                            operator.set_node_status(old_id, NodeStatus::Draining).await
                        })
                        .await;
                    if matches!(drained, Some(Ok(_))) {
                        break;
                    }
                }
            }
            self.remove_when_safe(old, !lost).await;
        }
        for number in 0..joining {
            self.world.executor.sleep(phase_ms / (joining as u64 + 2)).await;
            let index = self.scenario.nodes as usize + number;
            self.world.record(&[b"join", &[index as u8]]);
            self.faults
                .lock()
                .expect("not poisoned")
                .push(format!("node {index} joins zone-{}", self.zone_of(index)));
            self.members.lock().expect("not poisoned").insert(index);
            self.boot(index);
            self.count("nodes_joined");
        }
    }

    /// Removes `old` from the layout through another node, retrying (without --force)
    /// until every stripe is at full redundancy without it; then a node that was still
    /// running (drained) is stopped and its disk wiped, as an operator would.
    async fn remove_when_safe(&self, old: usize, running: bool) {
        let old_id = self.envs[old].id;
        loop {
            self.world.executor.sleep(LAYOUT_RETRY_MS).await;
            let Some((_, node)) = self.up_nodes().into_iter().find(|(index, _)| *index != old) else {
                continue;
            };
            let operator = Arc::clone(&node);
            let removed = self
                .on_node(&node, async move { operator.remove_node(old_id, false).await.is_ok() })
                .await
                .unwrap_or(false);
            self.world.record(&[b"remove", &[old as u8, removed as u8]]);
            if removed {
                break;
            }
        }
        self.count("nodes_removed");
        if running {
            self.members.lock().expect("not poisoned").remove(&old);
            self.crash(old);
            self.envs[old].shards.wipe();
        }
    }

    fn note_attempt(&self, key: &str, value: Value) {
        self.models
            .lock()
            .expect("not poisoned")
            .entry(key.to_string())
            .or_default()
            .maybe
            .push(value);
    }

    fn note_acknowledged(&self, key: &str, value: Value) {
        let mut models = self.models.lock().expect("not poisoned");
        let model = models.entry(key.to_string()).or_default();
        model.acknowledged = value;
        model.maybe.clear();
    }

    /// An acknowledged write of `key` (a put or a completed multipart upload): the model's
    /// value, and on a versioned bucket the version to read back by id at the end.
    fn note_acknowledged_write(&self, key: &str, value: Value, version_id: String, hash: [u8; 32]) {
        self.count("acknowledged_writes");
        self.note_acknowledged(key, value);
        if self.versioned {
            self.versions
                .lock()
                .expect("not poisoned")
                .push((key.to_string(), version_id, hash));
        }
    }

    async fn put(&self, gateway: &Arc<ClusterNode<SimEnv>>, key: &str, data: Vec<u8>) {
        let hash = *blake3::hash(&data).as_bytes();
        let value = Some(hash);
        self.note_attempt(key, value);
        let write = ObjectWrite {
            bucket: BUCKET.into(),
            key: key.into(),
            ..ObjectWrite::default()
        };
        let result = gateway.put_object(write, futures::io::Cursor::new(data)).await;
        self.world.record(&[b"put", key.as_bytes(), &[result.is_ok() as u8]]);
        match result {
            Ok(record) => self.note_acknowledged_write(key, value, record.version_id, hash),
            Err(_) => self.count("unavailable"),
        }
    }

    /// Reads every acknowledged version by its id: none may be lost or wrong, whatever
    /// was written or deleted after it (older versions stay live for repair and GC).
    async fn check_versions(&self, up: &[(usize, Arc<ClusterNode<SimEnv>>)]) {
        let versions = self.versions.lock().expect("not poisoned").clone();
        for (position, (key, version_id, hash)) in versions.iter().enumerate() {
            let gateway = &up[position % up.len()].1;
            let mut stripes_read: Vec<StripeId> = Vec::new();
            let observed = match version_of(gateway, BUCKET, key, Some(version_id)).await {
                Ok(record) => {
                    stripes_read = stripes_of(&record);
                    content_hash_of(gateway, record).await
                }
                Err(error) => Err(error),
            };
            let tag: &[u8] = match &observed {
                Ok(hash) => hash,
                Err(_) => b"unavailable",
            };
            self.world
                .record(&[b"get-version", key.as_bytes(), version_id.as_bytes(), tag]);
            match observed {
                Ok(observed) if observed == *hash => {}
                Ok(observed) => self.fail(format!(
                    "version {version_id} of {key} reads {} instead of {}",
                    hex::encode(&observed[..6]),
                    hex::encode(&hash[..6])
                )),
                Err(_) if self.lost_beyond_budget(&stripes_read) => self.count("detected_losses"),
                Err(error) => self.fail(format!("version {version_id} of {key} is lost: {error}")),
            }
        }
        self.count_by("versions_checked", versions.len() as u64);
    }

    async fn delete(&self, gateway: &Arc<ClusterNode<SimEnv>>, key: &str) {
        self.note_attempt(key, None);
        let result = gateway.delete_object(BUCKET, key).await;
        self.world.record(&[b"delete", key.as_bytes(), &[result.is_ok() as u8]]);
        match result {
            Ok(()) => {
                self.count("acknowledged_writes");
                self.note_acknowledged(key, None);
            }
            Err(_) => self.count("unavailable"),
        }
    }

    /// Reads a key and checks the answer against the model. With `must_succeed`, an
    /// unavailable read is a failure too (used after the faults have healed).
    async fn get(&self, gateway: &Arc<ClusterNode<SimEnv>>, key: &str, must_succeed: bool) {
        let model = self
            .models
            .lock()
            .expect("not poisoned")
            .get(key)
            .cloned()
            .unwrap_or_default();
        let mut stripes_read: Vec<StripeId> = Vec::new();
        let observed: Result<Value, DataError> = async {
            let record = match gateway.head_object(BUCKET, key).await {
                Ok(record) => record,
                Err(DataError::NoSuchKey) => return Ok(None),
                Err(error) => return Err(error),
            };
            stripes_read = stripes_of(&record);
            Ok(Some(content_hash_of(gateway, record).await?))
        }
        .await;
        let tag: &[u8] = match &observed {
            Ok(Some(hash)) => hash,
            Ok(None) => b"absent",
            Err(_) => b"unavailable",
        };
        self.world.record(&[b"get", key.as_bytes(), tag]);
        match observed {
            Ok(value) if model.allows(&value) => {}
            Ok(value) => self.fail(format!(
                "read of {key} returned {} but the model allows only {} (+{} unacknowledged)",
                value
                    .map(|hash| hex::encode(&hash[..6]))
                    .unwrap_or_else(|| "absent".into()),
                model
                    .acknowledged
                    .map(|hash| hex::encode(&hash[..6]))
                    .unwrap_or_else(|| "absent".into()),
                model.maybe.len()
            )),
            Err(_) if must_succeed && self.lost_beyond_budget(&stripes_read) => self.count("detected_losses"),
            Err(error) if must_succeed => self.fail(format!("read of {key} failed after healing: {error}")),
            Err(_) => self.count("unavailable"),
        }
    }

    /// Issues operations until the fault phase ends (so the settle phase sees no writes).
    async fn client_loop(self: Arc<Self>, client: u32, end_ms: u64) {
        for number in 0..self.scenario.operations_per_client {
            if self.world.executor.now_ms() >= end_ms {
                return;
            }
            self.operation(client, number).await;
            let pause_ms = 100
                + self
                    .world
                    .random_below(self.scenario.fault_phase_ms / u64::from(self.scenario.operations_per_client.max(1)));
            self.world.executor.sleep(pause_ms).await;
        }
    }

    /// Injects faults until the fault phase ends; at most one node is impaired at a time
    /// (crashed or cut off), which keeps every stripe and partition within its budget.
    async fn fault_loop(self: Arc<Self>, enabled: Vec<&'static str>) {
        let end_ms = self.world.executor.now_ms() + self.scenario.fault_phase_ms;
        while !enabled.is_empty() && self.world.executor.now_ms() + 10_000 < end_ms {
            self.world.executor.sleep(1_000 + self.world.random_below(4_000)).await;
            let fault = enabled[self.world.random_below(enabled.len() as u64) as usize];
            let members = self.member_list();
            let mut victim = members[self.world.random_below(members.len() as u64) as usize];
            if DISK_FAULTS.contains(&fault) {
                match self.disk_node {
                    Some(disk_node) => victim = disk_node,
                    None => continue,
                }
            }
            let duration_ms = 1_000 + self.world.random_below(8_000);
            self.world.record(&[b"fault", fault.as_bytes(), &[victim as u8]]);
            self.faults
                .lock()
                .expect("not poisoned")
                .push(format!("{fault} node {victim} for {duration_ms} ms"));
            match fault {
                "crash" => {
                    self.crash(victim);
                    self.world.executor.sleep(duration_ms).await;
                    self.boot(victim);
                }
                "partition" => {
                    let id = self.envs[victim].id;
                    for other in &self.envs {
                        if other.id != id {
                            self.world.cut(id, other.id);
                            self.world.cut(other.id, id);
                        }
                    }
                    self.world.executor.sleep(duration_ms).await;
                    self.world.heal_all_links();
                }
                "one-way-partition" => {
                    let id = self.envs[victim].id;
                    for other in &self.envs {
                        if other.id != id {
                            self.world.cut(id, other.id);
                        }
                    }
                    self.world.executor.sleep(duration_ms).await;
                    self.world.heal_all_links();
                }
                "zone-outage" => {
                    let zone = self.zone_of(victim);
                    let members: Vec<usize> = self
                        .member_list()
                        .into_iter()
                        .filter(|index| self.zone_of(*index) == zone)
                        .collect();
                    for member in &members {
                        self.crash(*member);
                    }
                    self.world.executor.sleep(duration_ms).await;
                    for member in members {
                        self.boot(member);
                    }
                }
                "bit-rot" => {
                    let store = Arc::clone(&self.envs[victim].shards);
                    let keys = store.list().await.unwrap_or_default();
                    if !keys.is_empty() {
                        let key = keys[self.world.random_below(keys.len() as u64) as usize];
                        let position = self.world.random_below(64) as usize;
                        store.rot(key, |bytes| {
                            let at = position % bytes.len().max(1);
                            if let Some(byte) = bytes.get_mut(at) {
                                *byte ^= 0x20;
                            }
                        });
                    }
                }
                "torn-write" => {
                    // Crash the node while one of its shard writes is half done.
                    let store = Arc::clone(&self.envs[victim].shards);
                    store.set_torn_writes(Some(
                        TORN_WRITE_LATENCY_MS_MIN + self.world.random_below(TORN_WRITE_LATENCY_MS_SPREAD),
                    ));
                    let give_up_ms = self.world.executor.now_ms() + duration_ms;
                    while store.puts_in_flight() == 0 && self.world.executor.now_ms() < give_up_ms {
                        self.world.executor.sleep(TORN_WRITE_POLL_MS).await;
                    }
                    store.set_torn_writes(None);
                    self.crash(victim);
                    self.world.executor.sleep(duration_ms).await;
                    self.boot(victim);
                }
                "lost-write" => {
                    let store = Arc::clone(&self.envs[victim].shards);
                    let mode = if self.world.random_below(2) == 0 {
                        LostWrites::Cached
                    } else {
                        LostWrites::Silent
                    };
                    store.set_lost_writes(Some(mode));
                    self.world.executor.sleep(duration_ms).await;
                    if mode == LostWrites::Cached && self.world.random_below(2) == 0 {
                        // The cache dies with the node; it comes back without those shards.
                        self.crash(victim);
                        store.set_lost_writes(None);
                        self.world.executor.sleep(duration_ms).await;
                        self.boot(victim);
                    } else {
                        // Firmware drops its cache while the node runs on, none the wiser.
                        store.lose_cached_writes();
                        store.set_lost_writes(None);
                    }
                }
                "read-error" => {
                    let store = Arc::clone(&self.envs[victim].shards);
                    store.set_read_errors(Some(self.world.random_below(256) as u8));
                    self.world.executor.sleep(duration_ms).await;
                    store.set_read_errors(None);
                }
                "disk-full" => {
                    let store = Arc::clone(&self.envs[victim].shards);
                    store.set_disk_full(true);
                    self.world.executor.sleep(duration_ms).await;
                    store.set_disk_full(false);
                }
                _ => {}
            }
        }
    }

    /// After healing: every stripe an object references is back at full redundancy, each
    /// shard verified at its canonical holder, and no other shard is left anywhere (all
    /// garbage collected, every stand-in copy removed).
    async fn check_redundancy_and_garbage(&self, layout: &bdr_protocol::layout::Layout) {
        use bdr_protocol::records::{decode_stored_value, Record};
        let destroyed = self.destroyed.lock().expect("not poisoned").clone();
        let mut live = self.object_stripes();
        live.extend(self.upload_part_stripes());
        // Destroyed beyond the budget: cannot come back, and their survivors stay put.
        live.retain(|stripe_id, _| !destroyed.contains(stripe_id));
        let mut wanted: BTreeMap<(bdr_protocol::ids::StripeId, u8), NodeId> = BTreeMap::new();
        for (stripe_id, codec) in &live {
            let Ok(placement) = place(layout, stripe_id, codec.data_shards, codec.parity_shards) else {
                self.fail(format!("no placement for stripe {}", stripe_id.short()));
                continue;
            };
            for (index, holder) in placement.holders.into_iter().enumerate() {
                wanted.insert((*stripe_id, index as u8), holder);
            }
        }
        let mut missing = 0usize;
        let mut extra = 0usize;
        let mut extra_of_live = 0usize;
        let mut first_garbage: Option<bdr_protocol::ids::StripeId> = None;
        let mut first_garbage_holder: Option<(String, u8)> = None;
        // (stripe, shard, where it is, where it belongs)
        let mut first_stand_in: Option<(String, u8, String, String)> = None;
        let mut found: std::collections::BTreeSet<(bdr_protocol::ids::StripeId, u8)> = Default::default();
        for env in &self.envs {
            for key in env.shards.list().await.unwrap_or_default() {
                if destroyed.contains(&key.stripe_id) {
                    continue;
                }
                let at_home = wanted.get(&(key.stripe_id, key.index)) == Some(&env.id);
                if !at_home {
                    extra += 1;
                    if live.contains_key(&key.stripe_id) {
                        extra_of_live += 1;
                        if first_stand_in.is_none() {
                            let home = wanted.get(&(key.stripe_id, key.index)).map(NodeId::short);
                            first_stand_in = Some((
                                key.stripe_id.short(),
                                key.index,
                                env.id.short(),
                                home.unwrap_or_default(),
                            ));
                        }
                    } else if first_garbage.is_none() {
                        first_garbage = Some(key.stripe_id);
                        first_garbage_holder = Some((env.id.short(), key.index));
                    }
                    continue;
                }
                match env.shards.get(key).await {
                    Ok(_) => {
                        found.insert((key.stripe_id, key.index));
                    }
                    Err(_) => missing += 1,
                }
            }
        }
        missing += wanted.len() - found.len().min(wanted.len());
        self.world.record(&[
            b"redundancy",
            &(live.len() as u64).to_le_bytes(),
            &(missing as u64).to_le_bytes(),
            &(extra as u64).to_le_bytes(),
        ]);
        if missing > 0 {
            let first_missing = wanted
                .keys()
                .find(|key| !found.contains(key))
                .map(|(stripe_id, index)| {
                    format!(" (first: stripe {} shard {index})", hex::encode(stripe_id.as_bytes()))
                })
                .unwrap_or_default();
            self.fail(format!(
                "{missing} of {} shards of {} live stripes are not back at their holders after healing{first_missing}",
                wanted.len(),
                live.len()
            ));
        }
        if extra > 0 {
            let mut detail = String::new();
            if let Some(stripe_id) = first_garbage {
                let row = RowKey::new(stripe_id.as_bytes().to_vec(), Vec::new())
                    .encode()
                    .expect("row key");
                for (index, env) in self.envs.iter().enumerate() {
                    let value = env
                        .meta_store()
                        .get(Tree::Table(bdr_protocol::wire::Table::Stripes), &row)
                        .ok()
                        .flatten();
                    let text = match value.map(|value| decode_stored_value(&value)) {
                        None => "none".to_string(),
                        Some(Ok(register)) => match register.value {
                            Some(Record::Stripe(record)) => format!("{:?} at {:?}", record.owner, register.timestamp),
                            _ => format!("tombstone at {:?}", register.timestamp),
                        },
                        Some(Err(error)) => error.to_string(),
                    };
                    detail.push_str(&format!("; node {index}: {text}"));
                }
            }
            for (index, node) in self.up_nodes() {
                let report = node.maintenance_report();
                detail.push_str(&format!(
                    "\n node {index}: passes {} in_progress {} health {:?} gc {} / {}",
                    report.repair_passes_completed,
                    report.repair_pass_in_progress,
                    report.stripes,
                    report.gc_deleted_stripe_records_total,
                    report.gc_deleted_shards_total
                ));
            }
            self.fail(format!(
                "{extra} shards remain that no live stripe needs there ({extra_of_live} stand-in copies of live \
                 stripes, the rest garbage; first stand-in copy (stripe, shard, on, home) {first_stand_in:?}; \
                 first garbage stripe {:?} (node, shard) {first_garbage_holder:?} record{detail})",
                first_garbage.map(|stripe| stripe.short())
            ));
        }
    }

    /// After healing: every key reads back its last acknowledged value (or a later
    /// unacknowledged one), metadata replicas agree, and no plaintext is stored anywhere.
    async fn final_checks(self: Arc<Self>) {
        // Metadata replicas converge.
        let up = self.up_nodes();
        let layout = up[0].1.layout();
        for partition in 0..METADATA_PARTITIONS {
            let Ok(placement) = place(&layout, &RowKey::partition_placement_id(partition), 1, 2) else {
                continue;
            };
            let digests: Vec<_> = placement
                .holders
                .iter()
                .filter_map(|holder| self.nodes.lock().expect("not poisoned").get(holder).cloned())
                .map(|node| node.partition_digest(partition).ok())
                .collect();
            if digests.windows(2).any(|pair| pair[0] != pair[1]) {
                // Name the first differing row, for the report.
                let mut detail = String::new();
                for table in bdr_protocol::wire::Table::ALL {
                    let per_replica: Vec<Vec<(Vec<u8>, Vec<u8>)>> = placement
                        .holders
                        .iter()
                        .filter_map(|holder| self.envs.iter().find(|env| env.id == *holder))
                        .map(|env| {
                            env.meta_store()
                                .scan(Tree::Table(table), &RowKey::partition_prefix(partition), None, 100_000)
                                .unwrap_or_default()
                        })
                        .collect();
                    if per_replica.windows(2).any(|pair| pair[0] != pair[1]) {
                        let keys: Vec<usize> = per_replica.iter().map(Vec::len).collect();
                        let differing = per_replica[0]
                            .iter()
                            .find(|row| per_replica.iter().any(|other| !other.contains(row)))
                            .map(|(key, value)| {
                                let decoded = bdr_protocol::records::decode_stored_value(value)
                                    .map(|register| {
                                        format!("{:?} tombstone={}", register.timestamp, register.value.is_none())
                                    })
                                    .unwrap_or_default();
                                format!("{} {decoded}", String::from_utf8_lossy(key))
                            });
                        detail = format!(
                            "table {} rows per replica {keys:?}, first difference {differing:?}",
                            table.name()
                        );
                        break;
                    }
                }
                let roots: Vec<String> = placement
                    .holders
                    .iter()
                    .filter_map(|holder| self.nodes.lock().expect("not poisoned").get(holder).cloned())
                    .map(|node| {
                        node.partition_root(partition)
                            .map(|root| hex::encode(&root[..4]))
                            .unwrap_or_default()
                    })
                    .collect();
                let fresh: Vec<bool> = placement
                    .holders
                    .iter()
                    .filter_map(|holder| self.nodes.lock().expect("not poisoned").get(holder).cloned())
                    .map(|node| node.kept_partition_digest_is_fresh(partition).unwrap_or(false))
                    .collect();
                self.fail(format!(
                    "metadata replicas of partition {partition} did not converge (roots {roots:?}, cache fresh \
                     {fresh:?}): {detail}"
                ));
            }
        }
        if let Some((old, _)) = self.replacement {
            let status = layout.get(&self.envs[old].id).map(|entry| entry.status);
            if status != Some(NodeStatus::Removed) {
                self.fail(format!("the replaced node {old} was never removed (status {status:?})"));
            }
        }
        self.check_redundancy_and_garbage(&layout).await;
        let stale_versions = self.stale_object_versions();
        self.world
            .record(&[b"stale-versions", &(stale_versions as u64).to_le_bytes()]);
        if stale_versions > 0 {
            self.fail(format!(
                "{stale_versions} object versions of deleted buckets remain after healing"
            ));
        }
        let final_generation = match self.up_nodes().first() {
            Some((_, gateway)) => gateway
                .bucket(SCRATCH_BUCKET)
                .await
                .ok()
                .map(|bucket| bucket.map(|bucket| bucket.created_at_ms)),
            None => None,
        };
        let (lost, deleted) = {
            let history = self.scratch_history.lock().expect("not poisoned");
            (
                history.puts_lost_with_their_bucket(final_generation),
                history.generations_deleted.clone(),
            )
        };
        for (generation, key) in lost {
            let how = match deleted.contains(&generation) {
                true => "was deleted",
                false => "was replaced",
            };
            self.fail(format!(
                "scratch bucket generation {generation} {how} holding acknowledged put {key}"
            ));
        }
        // Every key reads back what the model allows, through any node.
        let up = self.up_nodes();
        let keys: Vec<String> = self.models.lock().expect("not poisoned").keys().cloned().collect();
        for (position, key) in keys.iter().enumerate() {
            let gateway = &up[position % up.len()].1;
            self.get(gateway, key, true).await;
        }
        self.check_versions(&up).await;
        if self.scenario.object_lock {
            self.check_object_locks(&up).await;
        }
        if self.scenario.beyond_budget {
            self.check_loss_reported();
        }
        // No plaintext on any node's disk (shards and metadata).
        for (index, env) in self.envs.iter().enumerate() {
            for key in env.shards.list().await.unwrap_or_default() {
                if let Ok(shard) = env.shards.get(key).await {
                    if shard
                        .payload()
                        .windows(PLAINTEXT_MARKER.len())
                        .any(|window| window == PLAINTEXT_MARKER)
                    {
                        self.fail(format!("plaintext found in a shard on node {index}"));
                    }
                }
            }
            let rows = env
                .meta_store()
                .scan(Tree::Table(bdr_protocol::wire::Table::Objects), b"", None, 100_000);
            for (_, value) in rows.unwrap_or_default() {
                if value
                    .windows(PLAINTEXT_MARKER.len())
                    .any(|window| window == PLAINTEXT_MARKER)
                {
                    self.fail(format!("plaintext found in metadata on node {index}"));
                }
            }
        }
    }
}

/// Runs one seed of `scenario`.
pub fn run(seed: u64, scenario: &Scenario) -> Outcome {
    let world = World::new(
        seed,
        START_MS,
        NetworkSettings {
            latency_ms_min: 1,
            latency_ms_max: 40,
            loss_per_mille: 0,
        },
    );
    // Swarm testing: each fault kind is on for this seed with probability 3/4.
    let mut enabled: Vec<&'static str> = Vec::new();
    let mut toggle = |on: bool, name: &'static str| {
        let kept = !scenario.swarm || world.random_below(4) != 0;
        if on && kept {
            enabled.push(name);
        }
    };
    toggle(scenario.crashes, "crash");
    toggle(scenario.partitions, "partition");
    toggle(scenario.partitions, "one-way-partition");
    toggle(scenario.bit_rot, "bit-rot");
    toggle(scenario.zone_outage, "zone-outage");
    toggle(scenario.disk_faults, "torn-write");
    toggle(scenario.disk_faults, "lost-write");
    toggle(scenario.disk_faults, "read-error");
    toggle(scenario.disk_faults, "disk-full");
    let message_loss = scenario.message_loss && (!scenario.swarm || world.random_below(4) != 0);
    let clock_skew = scenario.clock_skew && (!scenario.swarm || world.random_below(4) != 0);
    let versioned = scenario.versioning && (!scenario.swarm || world.random_below(2) != 0);
    if message_loss {
        world.set_network(NetworkSettings {
            latency_ms_min: 1,
            latency_ms_max: 200,
            loss_per_mille: 1 + world.random_below(30) as u32,
        });
    }

    // Joiners and the replacement get their own indexes after the first `nodes`.
    let total_nodes =
        scenario.nodes as usize + scenario.joining_nodes as usize + usize::from(scenario.node_replacement);
    let mut zones: Vec<u32> = (0..total_nodes as u32).map(|index| index % scenario.zones).collect();
    let replacement = scenario.node_replacement.then(|| {
        let old = world.random_below(u64::from(scenario.nodes)) as usize;
        (old, total_nodes - 1)
    });
    if let Some((old, new)) = replacement {
        zones[new] = zones[old];
    }
    let atlas = Arc::new(FaultAtlas::default());
    let envs: Vec<Arc<SimEnv>> = (0..total_nodes)
        .map(|index| {
            let env = SimEnv::new(
                node_id(index),
                Arc::clone(&world),
                seed ^ ((index as u64 + 1) * 0x9e37),
                1 << 40,
                Arc::clone(&atlas),
            );
            if clock_skew {
                let skew_ms = world.random_below(10 * 60 * 1000) as i64 - 5 * 60 * 1000;
                env.clock_skew_ms.store(skew_ms, std::sync::atomic::Ordering::Relaxed);
            }
            Arc::new(env)
        })
        .collect();
    let specs: Vec<NodeSpec> = (0..total_nodes)
        .map(|index| NodeSpec {
            zone: ZoneName::new(format!("zone-{}", zones[index])).expect("valid zone"),
            capacity_bytes: 1 << 40,
            roles: NodeRoles::STORAGE_AND_GATEWAY,
            status: NodeStatus::Active,
        })
        .collect();
    let disk_node = enabled
        .iter()
        .any(|fault| DISK_FAULTS.contains(fault))
        .then(|| world.random_below(u64::from(scenario.nodes)) as usize);
    let shared = Arc::new(Shared {
        world: Arc::clone(&world),
        scenario: scenario.clone(),
        envs,
        specs,
        nodes: Mutex::new(BTreeMap::new()),
        models: Mutex::new(BTreeMap::new()),
        failures: Mutex::new(Vec::new()),
        counters: Mutex::new(BTreeMap::new()),
        faults: Mutex::new(Vec::new()),
        disk_node,
        atlas,
        destroyed: Mutex::new(BTreeSet::new()),
        samples: Mutex::new(Vec::new()),
        members: Mutex::new((0..scenario.nodes as usize).collect()),
        zones,
        replacement,
        running: Mutex::new(std::collections::BTreeSet::new()),
        bucket_created: Mutex::new(false),
        versioned,
        versions: Mutex::new(Vec::new()),
        lock_versions: Mutex::new(Vec::new()),
        bucket_options: StripeCodec::new(CodecId::DEFAULT, scenario.data_shards, scenario.parity_shards)
            .ok()
            .map(|codec| BucketOptions {
                codec,
                stripe_length_bytes: scenario.stripe_length_bytes,
                inline_threshold_bytes: scenario.inline_threshold_bytes,
                object_lock_enabled: false,
            }),
        scratch_attempts: Mutex::new(BTreeSet::new()),
        scratch_history: Mutex::new(ScratchHistory::default()),
    });
    for index in 0..scenario.nodes as usize {
        shared.boot(index);
    }
    // Let membership converge, then create the bucket.
    shared.run_until_sampled(START_MS + 5_000);
    let creator = Arc::clone(&shared);
    world.executor.spawn(
        None,
        Box::pin(async move {
            let Some(options) = creator.bucket_options else {
                creator.fail("invalid erasure code in the scenario".into());
                return;
            };
            let Some((_, node)) = creator.up_nodes().first().cloned() else {
                return;
            };
            if !creator.create_bucket_retrying(&node, BUCKET, options).await {
                return;
            }
            for attempt in 1..=BUCKET_CREATE_ATTEMPTS_MAX {
                if !creator.versioned {
                    break;
                }
                match node.set_bucket_versioning(BUCKET, VersioningState::Enabled).await {
                    Ok(_) => break,
                    Err(DataError::Meta(_)) if attempt < BUCKET_CREATE_ATTEMPTS_MAX => {
                        creator.world.executor.sleep(BUCKET_CREATE_RETRY_MS).await;
                    }
                    Err(error) => {
                        creator.fail(format!("cannot turn versioning on: {error}"));
                        return;
                    }
                }
            }
            let lock_options = BucketOptions {
                object_lock_enabled: true,
                ..options
            };
            if creator.scenario.object_lock && !creator.create_bucket_retrying(&node, LOCK_BUCKET, lock_options).await {
                return;
            }
            *creator.bucket_created.lock().expect("not poisoned") = true;
        }),
    );
    // The fault phase starts once the bucket exists (or creation gave up).
    let mut setup_end_ms = START_MS + 10_000;
    shared.run_until_sampled(setup_end_ms);
    while !*shared.bucket_created.lock().expect("not poisoned")
        && shared.failures.lock().expect("not poisoned").is_empty()
        && setup_end_ms < START_MS + SETUP_MS_MAX
    {
        setup_end_ms += 1_000;
        shared.run_until_sampled(setup_end_ms);
    }

    // Fault phase: clients and the fault injector run together.
    let fault_end = setup_end_ms + scenario.fault_phase_ms;
    for client in 0..scenario.clients {
        let shared = Arc::clone(&shared);
        world.executor.spawn(
            None,
            Box::pin(async move { shared.client_loop(client, fault_end).await }),
        );
    }
    if scenario.joining_nodes > 0 || scenario.node_replacement {
        let changer = Arc::clone(&shared);
        world
            .executor
            .spawn(None, Box::pin(async move { changer.layout_changes().await }));
    }
    let injector = Arc::clone(&shared);
    world
        .executor
        .spawn(None, Box::pin(async move { injector.fault_loop(enabled).await }));
    shared.run_until_sampled(fault_end);
    if scenario.bucket_churn {
        // What the final checks will require maintenance to have collected by then.
        shared.count_by("stale_versions_at_heal", shared.stale_object_versions() as u64);
    }

    // Liveness phase: heal everything, let repair and anti-entropy run, then check.
    world.record(&[b"heal"]);
    world.heal_all_links();
    for env in &shared.envs {
        env.shards.heal();
    }
    world.set_network(NetworkSettings {
        latency_ms_min: 1,
        latency_ms_max: 40,
        loss_per_mille: 0,
    });
    for index in shared.member_list() {
        shared.boot(index);
    }
    if scenario.beyond_budget {
        shared.destroy_beyond_budget();
    }
    shared.run_until_sampled(fault_end + scenario.settle_ms);
    let checker = Arc::clone(&shared);
    let checks_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::clone(&checks_done);
    world.executor.spawn(
        None,
        Box::pin(async move {
            checker.final_checks().await;
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        }),
    );
    // The checks read every key (bounded by timeouts): give them up to two minutes, but
    // stop as soon as they are done.
    let checks_deadline_ms = fault_end + scenario.settle_ms + 120_000;
    while !checks_done.load(std::sync::atomic::Ordering::Relaxed) && world.executor.now_ms() < checks_deadline_ms {
        shared.run_until_sampled(world.executor.now_ms() + 1_000);
    }
    if !checks_done.load(std::sync::atomic::Ordering::Relaxed) {
        shared.fail("the final checks did not finish within two virtual minutes".into());
    }

    let mut disk_faults = DiskFaultCounters::default();
    for env in &shared.envs {
        disk_faults.add(&env.shards.counters());
    }
    disk_faults.stripes_claimed = shared.atlas.claimed_stripes() as u64;
    if disk_faults.torn_read_as_data > 0 {
        shared.fail(format!(
            "{} torn shard files read back as data instead of corrupt",
            disk_faults.torn_read_as_data
        ));
    }
    let counters = shared.counters.lock().expect("not poisoned").clone();
    let outcome = Outcome {
        seed,
        scenario: scenario.name.clone(),
        trace: world.trace_hash(),
        failures: shared.failures.lock().expect("not poisoned").clone(),
        operations: counters.get("operations").copied().unwrap_or(0),
        acknowledged_writes: counters.get("acknowledged_writes").copied().unwrap_or(0),
        unavailable_operations: counters.get("unavailable").copied().unwrap_or(0),
        versions_checked: counters.get("versions_checked").copied().unwrap_or(0),
        lock_versions_checked: counters.get("lock_versions_checked").copied().unwrap_or(0),
        lock_races_delete_won: counters.get("lock_races_delete_won").copied().unwrap_or(0),
        lock_races_lock_won: counters.get("lock_races_lock_won").copied().unwrap_or(0),
        stripes_destroyed: counters.get("stripes_destroyed").copied().unwrap_or(0),
        detected_losses: counters.get("detected_losses").copied().unwrap_or(0),
        lost_stripes_reported: counters.get("lost_stripes_reported").copied().unwrap_or(0),
        multipart_completed: counters.get("multipart_completed").copied().unwrap_or(0),
        multipart_completed_multiple_parts: counters.get("multipart_completed_multiple_parts").copied().unwrap_or(0),
        multipart_aborted: counters.get("multipart_aborted").copied().unwrap_or(0),
        scratch_buckets_deleted: counters.get("scratch_buckets_deleted").copied().unwrap_or(0),
        scratch_puts_acknowledged: counters.get("scratch_puts_acknowledged").copied().unwrap_or(0),
        stale_versions_at_heal: counters.get("stale_versions_at_heal").copied().unwrap_or(0),
        stale_versions_written: counters.get("stale_versions_written").copied().unwrap_or(0),
        nodes_joined: counters.get("nodes_joined").copied().unwrap_or(0),
        nodes_removed: counters.get("nodes_removed").copied().unwrap_or(0),
        samples: std::mem::take(&mut *shared.samples.lock().expect("not poisoned")),
        faults_injected: shared.faults.lock().expect("not poisoned").clone(),
        disk_faults,
        events: world.event_count(),
        messages: world.message_count(),
        message_mix: world.message_mix(),
        virtual_ms: world.executor.now_ms() - START_MS,
    };
    // Stop every node so their tasks (and the Arcs they hold) are dropped.
    for env in &shared.envs {
        world.executor.kill_node_tasks(&env.id);
    }
    outcome
}

/// Version `version_id` (None: the current one) of `key` in the bucket named `bucket`.
async fn version_of(
    gateway: &Arc<ClusterNode<SimEnv>>,
    bucket: &str,
    key: &str,
    version_id: Option<&str>,
) -> Result<bdr_protocol::records::ObjectVersionRecord, DataError> {
    let bucket = gateway
        .bucket(bucket)
        .await?
        .ok_or_else(|| DataError::NoSuchBucket(bucket.into()))?;
    gateway.object_version(&bucket, key, version_id).await
}

/// Reads a whole object version and hashes its bytes (what the model compares).
async fn content_hash_of(
    gateway: &Arc<ClusterNode<SimEnv>>,
    record: bdr_protocol::records::ObjectVersionRecord,
) -> Result<[u8; 32], DataError> {
    let size = record.size_bytes;
    let mut stream = Box::pin(gateway.read_object(record, 0..size)?);
    let mut hasher = blake3::Hasher::new();
    while let Some(chunk) = stream.next().await {
        hasher.update(&chunk?);
    }
    Ok(*hasher.finalize().as_bytes())
}

/// Whether a version belongs to the bucket of its name that exists now (versions from
/// before generations were recorded always do).
fn of_existing_bucket(
    object: &bdr_protocol::records::ObjectVersionRecord,
    generations: &BTreeMap<String, u64>,
) -> bool {
    generations
        .get(&object.bucket)
        .is_some_and(|generation| object.belongs_to_generation(*generation))
        || object.bucket_created_at_ms == 0
}

/// The stripes an object version's data lives in (none when inline).
fn stripes_of(record: &bdr_protocol::records::ObjectVersionRecord) -> Vec<StripeId> {
    match &record.data {
        bdr_protocol::records::ObjectData::Striped(manifest) => {
            manifest.stripes.iter().map(|stripe| stripe.stripe_id).collect()
        }
        _ => Vec::new(),
    }
}
