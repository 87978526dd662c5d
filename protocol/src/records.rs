//! Metadata records and their last-writer-wins merge.
//!
//! Every metadata value is a [`Lww`] register: a hybrid timestamp and either a value or a
//! tombstone. Replicas merge by keeping the greater timestamp, so merge is commutative,
//! associative and idempotent (property-tested below) and replicas converge whatever
//! order writes arrive in. Records that several writers change independently (bucket
//! grants, multipart parts) get their own keys, so one writer never erases another's
//! change.
//!
//! Persisted form: [`encode_stored_value`] wraps the register in a versioned envelope.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::erasure::StripeCodec;
use crate::hlc::HlcTimestamp;
use crate::ids::{NodeId, StripeId};

/// Largest encoded metadata value accepted from disk or the wire. Inline objects are the
/// largest values (64 KiB by default, at most [`INLINE_OBJECT_BYTES_MAX`]); manifests of
/// very large objects come next (a 5 TiB object of 4 MiB stripes is ~1.3 M stripes, so
/// such objects are split into manifest segments by the data path rather than growing
/// one value without bound).
pub const STORED_VALUE_BYTES_MAX: u64 = 4 * 1024 * 1024;
/// Objects up to this size may be stored inline in metadata (the threshold is configurable
/// below it).
pub const INLINE_OBJECT_BYTES_MAX: u64 = 1024 * 1024;

/// A last-writer-wins register. `value: None` is a tombstone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lww<T> {
    pub timestamp: HlcTimestamp,
    pub value: Option<T>,
}

impl<T: RegisterValue> Lww<T> {
    pub fn new(timestamp: HlcTimestamp, value: T) -> Lww<T> {
        Lww {
            timestamp,
            value: Some(value),
        }
    }

    pub fn tombstone(timestamp: HlcTimestamp) -> Lww<T> {
        Lww { timestamp, value: None }
    }

    /// Keeps the greater of the two registers; returns whether `self` changed. Registers
    /// of equal timestamps meet by [`RegisterValue::merge_tied`].
    pub fn merge(&mut self, other: &Lww<T>) -> bool {
        match other.timestamp.cmp(&self.timestamp) {
            std::cmp::Ordering::Greater => {
                *self = other.clone();
                true
            }
            std::cmp::Ordering::Less => false,
            std::cmp::Ordering::Equal => T::merge_tied(&mut self.value, &other.value),
        }
    }
}

/// A value kept in an [`Lww`] register: how two values written at one timestamp meet.
pub trait RegisterValue: Serialize + Clone + PartialEq {
    /// Merges `theirs` into `ours`, both of one timestamp; returns whether `ours` changed.
    /// It must be commutative, associative and idempotent, like the register's merge.
    ///
    /// By default equal timestamps with different values cannot come from correct nodes
    /// (the HLC includes the node id), and a deterministic tie-break on the encoded value
    /// keeps the merge a total function even for corrupt or hostile input.
    fn merge_tied(ours: &mut Option<Self>, theirs: &Option<Self>) -> bool {
        if ours == theirs {
            return false;
        }
        let take_theirs = encoded(theirs) > encoded(ours);
        if take_theirs {
            ours.clone_from(theirs);
        }
        take_theirs
    }
}

fn encoded<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_allocvec(value).expect("value encodes")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VersioningState {
    Unversioned,
    Enabled,
    Suspended,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RetentionMode {
    Governance,
    Compliance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Retention {
    pub mode: RetentionMode,
    pub retain_until_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DefaultRetention {
    pub mode: RetentionMode,
    pub days: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRecord {
    pub name: String,
    pub owner_key_id: String,
    pub created_at_ms: u64,
    pub versioning: VersioningState,
    pub object_lock_enabled: bool,
    pub default_retention: Option<DefaultRetention>,
    /// How new objects in this bucket are erasure-coded.
    pub codec: StripeCodec,
    pub stripe_length_bytes: u32,
    /// Objects up to this size are sealed inline in metadata instead of striped.
    pub inline_threshold_bytes: u32,
}

/// One CreateBucket or DeleteBucket in progress, in a row of its own (partitions
/// `creations:<bucket>` and `deletions:<bucket>`; see `ClusterNode::create_bucket_with`
/// and `ClusterNode::delete_bucket`). Each side of a race writes its row (or its
/// version) first and reads the other's second, so one of them always sees the other;
/// each removes only its own row, so concurrent requests cannot hide one another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketIntentRecord {
    /// The generation (`created_at_ms`) of the bucket being deleted; 0 for a creation
    /// (its generation is chosen later).
    pub bucket_created_at_ms: u64,
    /// When the request began, on its gateway's clock.
    pub started_at_ms: u64,
}

impl BucketIntentRecord {
    /// Whether the request may still be deciding, on a clock that reads `now_ms`: a
    /// request gives up unless it writes the bucket's record within
    /// [`BUCKET_INTENT_DEADLINE_MS`] of starting on its own clock, and clocks may differ
    /// by up to [`CLOCK_SKEW_ALLOWANCE_MS`]. The row of a crashed request expires.
    pub fn in_progress(&self, now_ms: u64) -> bool {
        now_ms
            < self
                .started_at_ms
                .saturating_add(BUCKET_INTENT_DEADLINE_MS)
                .saturating_add(CLOCK_SKEW_ALLOWANCE_MS)
    }
}

/// How long a CreateBucket or DeleteBucket may take from announcing itself to writing
/// the bucket's record, on its gateway's clock; past it the request withdraws and fails.
pub const BUCKET_INTENT_DEADLINE_MS: u64 = 30_000;
/// How far apart two nodes' clocks may be for time-based rules that compare them. It is
/// the S3 bound on a request's clock skew (`RequestTimeTooSkewed`): nodes are expected to
/// run NTP, and clients further off than this are refused anyway.
pub const CLOCK_SKEW_ALLOWANCE_MS: u64 = 15 * 60 * 1000;

/// One access key's rights on one bucket (keyed by bucket and key id). The bucket's owner
/// needs no grant: [`BucketRecord::owner_key_id`] has every right.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketGrant {
    pub read: bool,
    pub write: bool,
    /// The `created_at_ms` of the bucket this grant was given on: a grant never carries
    /// over to a later bucket of the same name (deleted and created again by someone else).
    pub bucket_created_at_ms: u64,
    pub granted_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessKeyRecord {
    pub key_id: String,
    pub name: String,
    /// The SigV4 secret. Gateways need it in clear to verify signatures.
    pub secret_key: String,
    pub allow_create_bucket: bool,
    pub created_at_ms: u64,
}

/// One stripe of an object, in object order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeRef {
    pub stripe_id: StripeId,
    /// Plaintext bytes of the object in this stripe.
    pub plaintext_length_bytes: u64,
    /// Bytes that were erasure-coded (the sealed envelope).
    pub sealed_length_bytes: u64,
    /// Where each shard (by index) was written. Usually the placement's holders; a
    /// fallback node when a holder was down. Readers also try the current placement,
    /// since repair and rebalance move shards after the manifest was written.
    pub holders: Vec<NodeId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub codec: StripeCodec,
    pub key_epoch: u32,
    pub stripes: Vec<StripeRef>,
}

impl Manifest {
    pub fn plaintext_length_bytes(&self) -> u64 {
        self.stripes.iter().map(|stripe| stripe.plaintext_length_bytes).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ObjectData {
    /// Small objects: a sealed envelope (never plaintext: metadata lives on storage nodes).
    Inline {
        /// As bytes, not a sequence: postcard writes both the same way (a length, then
        /// each byte as itself), but decoding a sequence went byte by byte, 5% of a
        /// small GET's node CPU.
        #[serde(with = "serde_bytes")]
        sealed: Vec<u8>,
    },
    Striped(Manifest),
    /// A versioned delete.
    DeleteMarker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ChecksumAlgorithm {
    Crc32,
    Crc32c,
    Sha1,
    Sha256,
    /// Appended last: stored records keep their variant indices.
    Crc64Nvme,
}

/// The standard HTTP headers S3 stores with an object and returns on GET and HEAD, as
/// the client sent them (besides Content-Type, which has its own field).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StandardHeaders {
    pub cache_control: Option<String>,
    pub content_disposition: Option<String>,
    pub content_encoding: Option<String>,
    pub content_language: Option<String>,
    /// The Expires header's text (an HTTP date), kept as sent.
    pub expires: Option<String>,
}

/// Object Lock settings of one object version.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectLock {
    pub retention: Option<Retention>,
    pub legal_hold: bool,
}

impl ObjectLock {
    /// Whether the version may not be deleted at `now_ms`; `bypass_governance` lifts
    /// GOVERNANCE retention (never COMPLIANCE, never a legal hold).
    pub fn forbids_delete(&self, now_ms: u64, bypass_governance: bool) -> bool {
        if self.legal_hold {
            return true;
        }
        match self.retention {
            Some(retention) if retention.retain_until_ms > now_ms => {
                !(retention.mode == RetentionMode::Governance && bypass_governance)
            }
            _ => false,
        }
    }
}

/// When each of a version's lock settings last changed, and the newest deletes by id
/// that found the version unlocked (V5).
///
/// A lock change rewrites the version at its register's timestamp, so any delete's
/// tombstone (stamped later) still wins; two records of one timestamp merge field by
/// field, each field keeping its newest change ([`Record`]'s [`RegisterValue`]). So a
/// legal hold and a retention change made at once both stay, and no lock change can
/// write a deleted version back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockChanges {
    pub retention_stamp: HlcTimestamp,
    pub legal_hold_stamp: HlcTimestamp,
    /// The newest [`DELETION_MARKS_MAX`] marks, newest first. A set rather than one
    /// slot: a delete that gives up withdraws only its own mark, never a concurrent
    /// delete's that a lock change must wait for.
    pub deletions: Vec<DeletionMark>,
}

impl LockChanges {
    /// A version's lock as first written: set at the version's own stamp.
    pub fn at(version_stamp: HlcTimestamp) -> LockChanges {
        LockChanges {
            retention_stamp: version_stamp,
            legal_hold_stamp: version_stamp,
            deletions: Vec::new(),
        }
    }

    /// The newest of the stamps, for a change that must be stamped after all of them.
    pub fn newest_stamp(&self) -> HlcTimestamp {
        let deletion = self.deletions.iter().map(|mark| mark.stamp).max();
        self.retention_stamp
            .max(self.legal_hold_stamp)
            .max(deletion.unwrap_or(HlcTimestamp::ZERO))
    }

    /// Whether a delete that marked the version may still write its tombstone, on a
    /// clock that reads `now_ms`.
    pub fn delete_may_be_in_progress(&self, now_ms: u64) -> bool {
        self.deletions
            .iter()
            .any(|mark| !mark.withdrawn && mark.may_be_in_progress(now_ms))
    }

    /// Adds (or, withdrawn, updates) a mark, keeping the set's order and bound.
    pub fn add_deletion(&mut self, mark: DeletionMark) {
        merge_deletion_marks(&mut self.deletions, &[mark]);
    }
}

/// Merges `theirs` into `ours`: the union by stamp (of two marks of one stamp, the later
/// start, and withdrawn if either is), newest first, cut to the newest
/// [`DELETION_MARKS_MAX`]. A join: the marks cut from one side's union are cut from every
/// larger union too. The result is in normal form whatever the inputs' order or length.
fn merge_deletion_marks(ours: &mut Vec<DeletionMark>, theirs: &[DeletionMark]) -> bool {
    let mut by_stamp: BTreeMap<HlcTimestamp, DeletionMark> = BTreeMap::new();
    for mark in ours.iter().chain(theirs) {
        let kept = by_stamp.entry(mark.stamp).or_insert(*mark);
        kept.began_at_ms = kept.began_at_ms.max(mark.began_at_ms);
        kept.withdrawn |= mark.withdrawn;
    }
    let merged: Vec<DeletionMark> = by_stamp.into_values().rev().take(DELETION_MARKS_MAX).collect();
    let changed = merged != *ours;
    *ours = merged;
    changed
}

/// How many deletion marks a version keeps; more deletes of one version at once than
/// this could hide one from a lock change.
pub const DELETION_MARKS_MAX: usize = 8;

/// A delete by id that found the version unlocked and is about to write its tombstone.
/// The deleter writes the mark and then reads the lock again; a lock change writes the
/// lock and then reads for marks. Each writes before it reads, so one of two racing
/// requests always sees the other: the delete gives up (and withdraws its mark), or the
/// lock change waits for the delete to finish (see `ClusterNode::change_object_lock`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeletionMark {
    pub stamp: HlcTimestamp,
    /// When the delete began, on its gateway's clock.
    pub began_at_ms: u64,
    /// The delete gave up without writing its tombstone.
    pub withdrawn: bool,
}

impl DeletionMark {
    /// Whether the delete may still write its tombstone, on a clock that reads `now_ms`
    /// (the rule of [`BucketIntentRecord::in_progress`]).
    pub fn may_be_in_progress(&self, now_ms: u64) -> bool {
        now_ms
            < self
                .began_at_ms
                .saturating_add(DELETION_MARK_DEADLINE_MS)
                .saturating_add(CLOCK_SKEW_ALLOWANCE_MS)
    }
}

/// How long a delete by id may take from writing its [`DeletionMark`] to writing its
/// tombstone, on its gateway's clock; past it the delete gives up.
pub const DELETION_MARK_DEADLINE_MS: u64 = 5_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectVersionRecord {
    pub bucket: String,
    pub key: String,
    /// "null" for objects written while versioning was off or suspended; otherwise
    /// [`version_id_of`] its stamp.
    pub version_id: String,
    /// Orders the versions of one key: the greatest stamp is the current version. Taken
    /// above every version the writer saw, so a write acknowledged before another began
    /// is always older, whatever the clocks of the two gateways.
    pub version_stamp: HlcTimestamp,
    pub created_at_ms: u64,
    pub size_bytes: u64,
    pub etag: String,
    pub content_type: Option<String>,
    pub headers: StandardHeaders,
    pub user_metadata: BTreeMap<String, String>,
    pub checksums: BTreeMap<ChecksumAlgorithm, String>,
    pub data: ObjectData,
    pub lock: ObjectLock,
    /// The `created_at_ms` of the bucket the version was written in (0: unknown, a record
    /// from before V3). A write in flight while its bucket is deleted may still commit;
    /// its record then names the old bucket and is never served by, nor kept alive for, a
    /// later bucket of the same name.
    pub bucket_created_at_ms: u64,
    pub lock_changes: LockChanges,
}

impl ObjectVersionRecord {
    pub fn is_delete_marker(&self) -> bool {
        matches!(self.data, ObjectData::DeleteMarker)
    }

    /// Whether the version belongs to `bucket` rather than to an earlier bucket of the same
    /// name. Records that predate the field (0) are taken to belong to the current bucket,
    /// as they always were.
    pub fn belongs_to(&self, bucket: &BucketRecord) -> bool {
        self.belongs_to_generation(bucket.created_at_ms)
    }

    /// [`ObjectVersionRecord::belongs_to`] for a bucket known only by its `created_at_ms`.
    pub fn belongs_to_generation(&self, bucket_created_at_ms: u64) -> bool {
        self.bucket_created_at_ms == 0 || self.bucket_created_at_ms == bucket_created_at_ms
    }
}

/// The id of a version stamped `stamp`: 40 hex digits that sort newest first (inverted
/// wall time, counter and node prefix, in the stamp's own order), so a key's newest
/// version is the first row of its versions. "null" sorts after every such id.
pub fn version_id_of(stamp: &HlcTimestamp) -> String {
    let mut bytes = Vec::with_capacity(20);
    bytes.extend_from_slice(&(!stamp.wall_ms).to_be_bytes());
    bytes.extend_from_slice(&(!stamp.logical).to_be_bytes());
    bytes.extend(stamp.node.0[..8].iter().map(|byte| !byte));
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipartUploadRecord {
    pub bucket: String,
    pub key: String,
    pub upload_id: String,
    pub created_at_ms: u64,
    pub content_type: Option<String>,
    pub headers: StandardHeaders,
    pub user_metadata: BTreeMap<String, String>,
    /// Applied to the object when the upload completes.
    pub lock: ObjectLock,
    /// The checksum algorithm the upload declared: its parts carry one, and the object
    /// gets the composite of theirs.
    pub checksum_algorithm: Option<ChecksumAlgorithm>,
    /// The `created_at_ms` of the bucket the upload was started in (0: unknown, a V1
    /// record): an upload never completes into a later bucket of the same name.
    pub bucket_created_at_ms: u64,
}

impl MultipartUploadRecord {
    pub fn belongs_to(&self, bucket: &BucketRecord) -> bool {
        self.bucket_created_at_ms == 0 || self.bucket_created_at_ms == bucket.created_at_ms
    }
}

/// One uploaded part (keyed by upload id and part number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipartPartRecord {
    pub upload_id: String,
    pub part_number: u32,
    pub size_bytes: u64,
    pub etag: String,
    /// The checksums the client sent with the part and the gateway verified.
    pub checksums: BTreeMap<ChecksumAlgorithm, String>,
    pub data: ObjectData,
}

/// Every record kind, so one table store can hold any of them with one versioned format.
/// The one record that may reference a stripe (stripe ids are unique per write).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum StripeOwner {
    Object {
        bucket: String,
        key: String,
        version_id: String,
    },
    /// A multipart part; once the upload completes, the object at (bucket, key,
    /// version_id of the completed object) references the stripe instead.
    Part {
        bucket: String,
        key: String,
        upload_id: String,
        part_number: u32,
    },
}

/// Written to a metadata quorum before any shard of the stripe is sent, so every shard on
/// any disk has a record saying what owns it. Repair walks these records; garbage
/// collection removes the shards of a stripe whose owner no longer references it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeRecord {
    pub owner: StripeOwner,
    pub codec: StripeCodec,
    pub sealed_length_bytes: u64,
    /// Writer's clock when the write began (for operators and tools; garbage collection
    /// measures the write deadline on its own clock, so skew cannot fool it).
    pub started_at_ms: u64,
    /// Where each shard index is believed to be: the placement at write time, updated by
    /// repair and rebalance after they move shards.
    pub holders: Vec<NodeId>,
}

// Object versions are the common value and the largest; boxing them would add an
// allocation to every decode to save stack space in a few short-lived places.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Bucket(BucketRecord),
    BucketGrant(BucketGrant),
    AccessKey(AccessKeyRecord),
    ObjectVersion(ObjectVersionRecord),
    MultipartUpload(MultipartUploadRecord),
    MultipartPart(MultipartPartRecord),
    Stripe(StripeRecord),
    BucketIntent(BucketIntentRecord),
}

impl RegisterValue for Record {
    /// Object versions of one timestamp that differ only in their lock (a lock change
    /// keeps the register's timestamp: see [`LockChanges`]) merge field by field, each
    /// field keeping its newest change. Any other difference is the default tie-break,
    /// judged on the values without their locks, so the merge stays a lexicographic
    /// join: commutative, associative and idempotent (property-tested below).
    fn merge_tied(ours: &mut Option<Record>, theirs: &Option<Record>) -> bool {
        if ours == theirs {
            return false;
        }
        if let (Some(Record::ObjectVersion(ours)), Some(Record::ObjectVersion(theirs))) = (ours.as_mut(), theirs) {
            if ours.same_apart_from_lock(theirs) {
                return ours.merge_lock(theirs);
            }
        }
        let take_theirs = match tie_base(theirs).cmp(&tie_base(ours)) {
            std::cmp::Ordering::Greater => true,
            std::cmp::Ordering::Less => false,
            // Equal bases that were not the same version apart from lock: impossible,
            // since the base encodes everything but the lock.
            std::cmp::Ordering::Equal => encoded(theirs) > encoded(ours),
        };
        if take_theirs {
            ours.clone_from(theirs);
        }
        take_theirs
    }
}

/// What a tied merge orders values by before their locks: the encoded value with an
/// object version's lock fields cleared.
fn tie_base(value: &Option<Record>) -> Vec<u8> {
    match value {
        Some(Record::ObjectVersion(object)) => {
            let mut without_lock = object.clone();
            without_lock.lock = ObjectLock::default();
            without_lock.lock_changes = LockChanges::at(HlcTimestamp::ZERO);
            encoded(&Some(Record::ObjectVersion(without_lock)))
        }
        other => encoded(other),
    }
}

impl ObjectVersionRecord {
    /// Whether the two records are one version's, differing at most in their locks.
    fn same_apart_from_lock(&self, other: &ObjectVersionRecord) -> bool {
        let ObjectVersionRecord {
            bucket,
            key,
            version_id,
            version_stamp,
            created_at_ms,
            size_bytes,
            etag,
            content_type,
            headers,
            user_metadata,
            checksums,
            data,
            lock: _,
            bucket_created_at_ms,
            lock_changes: _,
        } = other;
        self.bucket == *bucket
            && self.key == *key
            && self.version_id == *version_id
            && self.version_stamp == *version_stamp
            && self.created_at_ms == *created_at_ms
            && self.size_bytes == *size_bytes
            && self.etag == *etag
            && self.content_type == *content_type
            && self.headers == *headers
            && self.user_metadata == *user_metadata
            && self.checksums == *checksums
            && self.data == *data
            && self.bucket_created_at_ms == *bucket_created_at_ms
    }

    /// Keeps each lock field's newest change (equal stamps: the greater value); returns
    /// whether `self` changed.
    fn merge_lock(&mut self, other: &ObjectVersionRecord) -> bool {
        let mut changed = false;
        let theirs = (other.lock_changes.retention_stamp, other.lock.retention);
        if theirs > (self.lock_changes.retention_stamp, self.lock.retention) {
            (self.lock_changes.retention_stamp, self.lock.retention) = theirs;
            changed = true;
        }
        let theirs = (other.lock_changes.legal_hold_stamp, other.lock.legal_hold);
        if theirs > (self.lock_changes.legal_hold_stamp, self.lock.legal_hold) {
            (self.lock_changes.legal_hold_stamp, self.lock.legal_hold) = theirs;
            changed = true;
        }
        changed |= merge_deletion_marks(&mut self.lock_changes.deletions, &other.lock_changes.deletions);
        changed
    }
}

/// Longest partition key (a bucket name, an access key id, an upload id).
pub const PARTITION_KEY_BYTES_MAX: usize = 1024;
/// Longest full row key: S3 allows 1024-byte object keys, plus bucket and version id.
pub const ROW_KEY_BYTES_MAX: usize = 4096;
/// Metadata partitions; each is replicated on 3 nodes chosen by placement.
pub const METADATA_PARTITIONS: u32 = 256;

/// A metadata row's key: which partition it lives in and its sort key within it.
/// Encoded as `[partition u16 BE][partition key length u16 BE][partition key][sort key]`:
/// the rows of one partition are contiguous in the stores (for anti-entropy), and within
/// it the rows of one partition key are contiguous and ordered by sort key (for listing).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RowKey {
    pub partition_key: Vec<u8>,
    pub sort_key: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowKeyError {
    #[error("row key too long or malformed")]
    Malformed,
}

const ROW_KEY_HEADER_BYTES: usize = 4;

impl RowKey {
    pub fn new(partition_key: impl Into<Vec<u8>>, sort_key: impl Into<Vec<u8>>) -> RowKey {
        RowKey {
            partition_key: partition_key.into(),
            sort_key: sort_key.into(),
        }
    }

    pub fn partition(&self) -> u32 {
        RowKey::partition_of(&self.partition_key)
    }

    pub fn encode(&self) -> Result<Vec<u8>, RowKeyError> {
        if self.partition_key.len() > PARTITION_KEY_BYTES_MAX
            || ROW_KEY_HEADER_BYTES + self.partition_key.len() + self.sort_key.len() > ROW_KEY_BYTES_MAX
        {
            return Err(RowKeyError::Malformed);
        }
        let mut bytes = Vec::with_capacity(ROW_KEY_HEADER_BYTES + self.partition_key.len() + self.sort_key.len());
        bytes.extend_from_slice(&(self.partition() as u16).to_be_bytes());
        bytes.extend_from_slice(&(self.partition_key.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&self.partition_key);
        bytes.extend_from_slice(&self.sort_key);
        Ok(bytes)
    }

    pub fn decode(bytes: &[u8]) -> Result<RowKey, RowKeyError> {
        if bytes.len() < ROW_KEY_HEADER_BYTES || bytes.len() > ROW_KEY_BYTES_MAX {
            return Err(RowKeyError::Malformed);
        }
        let length = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
        if length > PARTITION_KEY_BYTES_MAX || bytes.len() < ROW_KEY_HEADER_BYTES + length {
            return Err(RowKeyError::Malformed);
        }
        let row = RowKey::new(
            &bytes[ROW_KEY_HEADER_BYTES..ROW_KEY_HEADER_BYTES + length],
            &bytes[ROW_KEY_HEADER_BYTES + length..],
        );
        if u32::from(u16::from_be_bytes([bytes[0], bytes[1]])) != row.partition() {
            return Err(RowKeyError::Malformed);
        }
        Ok(row)
    }

    /// The encoded prefix shared by every row of `partition_key` whose sort key starts
    /// with `sort_prefix`.
    pub fn prefix(partition_key: &[u8], sort_prefix: &[u8]) -> Result<Vec<u8>, RowKeyError> {
        RowKey::new(partition_key, sort_prefix).encode()
    }

    /// The partition of an encoded row key or key prefix (its first two bytes).
    pub fn partition_of_encoded(encoded: &[u8]) -> Option<u32> {
        let partition = u32::from(u16::from_be_bytes(encoded.get(..2)?.try_into().ok()?));
        (partition < METADATA_PARTITIONS).then_some(partition)
    }

    /// The encoded prefix of every row in `partition`.
    pub fn partition_prefix(partition: u32) -> [u8; 2] {
        (partition as u16).to_be_bytes()
    }

    /// The partition (0..METADATA_PARTITIONS) of a partition key.
    pub fn partition_of(partition_key: &[u8]) -> u32 {
        let digest = blake3::hash(partition_key);
        u32::from_le_bytes(digest.as_bytes()[..4].try_into().expect("4 bytes")) % METADATA_PARTITIONS
    }

    /// The pseudo stripe id whose placement (k=1, m=2) gives a partition's replicas.
    pub fn partition_placement_id(partition: u32) -> StripeId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"bdr metadata partition v1");
        hasher.update(&partition.to_le_bytes());
        StripeId(*hasher.finalize().as_bytes())
    }
}

/// The persisted envelope: the enum variant is the format version. V1 records predate
/// versioning, Object Lock and standard headers; V2 object versions predate their bucket
/// generation; V3 predates bucket deletion rows; V4 object versions predate their
/// [`LockChanges`]. All are read (and upgraded), never written. Variants are only ever
/// appended: postcard encodes the variant's index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum StoredValue {
    V1(Lww<legacy::RecordV1>),
    V2(Lww<legacy::RecordV2>),
    /// V4 only appended a variant to V3's records, so V3 values decode as V4's.
    V3(Lww<legacy::RecordV4>),
    V4(Lww<legacy::RecordV4>),
    V5(Lww<Record>),
}

/// The [`StoredValue`] variant index [`encode_stored_value`] writes (postcard's leading
/// varint of the envelope).
const STORED_VALUE_VERSION_CURRENT: u32 = 4;

/// Record formats of earlier versions, kept to read what older nodes wrote.
mod legacy {
    use super::*;

    impl RegisterValue for RecordV1 {}
    impl RegisterValue for RecordV2 {}
    impl RegisterValue for RecordV4 {}

    /// An object version as V3 and V4 wrote it: without its [`LockChanges`].
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ObjectVersionRecordV4 {
        pub bucket: String,
        pub key: String,
        pub version_id: String,
        pub version_stamp: HlcTimestamp,
        pub created_at_ms: u64,
        pub size_bytes: u64,
        pub etag: String,
        pub content_type: Option<String>,
        pub headers: StandardHeaders,
        pub user_metadata: BTreeMap<String, String>,
        pub checksums: BTreeMap<ChecksumAlgorithm, String>,
        pub data: ObjectData,
        pub lock: ObjectLock,
        pub bucket_created_at_ms: u64,
    }

    /// V3's and V4's records: V5 changed only the object version. The other variants
    /// share the current types, so a later change to any of them needs its own snapshot.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub enum RecordV4 {
        Bucket(BucketRecord),
        BucketGrant(BucketGrant),
        AccessKey(AccessKeyRecord),
        ObjectVersion(ObjectVersionRecordV4),
        MultipartUpload(MultipartUploadRecord),
        MultipartPart(MultipartPartRecord),
        Stripe(StripeRecord),
        BucketIntent(BucketIntentRecord),
    }

    /// A V4 object's lock settings date from the version itself: every later change is
    /// stamped after it.
    pub fn upgrade_v4(register: Lww<RecordV4>) -> Lww<Record> {
        let value = register.value.map(|record| match record {
            RecordV4::Bucket(bucket) => Record::Bucket(bucket),
            RecordV4::BucketGrant(grant) => Record::BucketGrant(grant),
            RecordV4::AccessKey(key) => Record::AccessKey(key),
            RecordV4::ObjectVersion(object) => Record::ObjectVersion(ObjectVersionRecord {
                bucket: object.bucket,
                key: object.key,
                version_id: object.version_id,
                version_stamp: object.version_stamp,
                created_at_ms: object.created_at_ms,
                size_bytes: object.size_bytes,
                etag: object.etag,
                content_type: object.content_type,
                headers: object.headers,
                user_metadata: object.user_metadata,
                checksums: object.checksums,
                data: object.data,
                lock: object.lock,
                bucket_created_at_ms: object.bucket_created_at_ms,
                lock_changes: LockChanges::at(object.version_stamp),
            }),
            RecordV4::MultipartUpload(upload) => Record::MultipartUpload(upload),
            RecordV4::MultipartPart(part) => Record::MultipartPart(part),
            RecordV4::Stripe(stripe) => Record::Stripe(stripe),
            RecordV4::BucketIntent(intent) => Record::BucketIntent(intent),
        });
        Lww {
            timestamp: register.timestamp,
            value,
        }
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ObjectVersionRecordV1 {
        pub bucket: String,
        pub key: String,
        pub version_id: String,
        pub created_at_ms: u64,
        pub size_bytes: u64,
        pub etag: String,
        pub content_type: Option<String>,
        pub user_metadata: BTreeMap<String, String>,
        pub checksums: BTreeMap<ChecksumAlgorithm, String>,
        pub data: ObjectData,
        pub retention: Option<Retention>,
        pub legal_hold: bool,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MultipartUploadRecordV1 {
        pub bucket: String,
        pub key: String,
        pub upload_id: String,
        pub created_at_ms: u64,
        pub content_type: Option<String>,
        pub user_metadata: BTreeMap<String, String>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct MultipartPartRecordV1 {
        pub upload_id: String,
        pub part_number: u32,
        pub size_bytes: u64,
        pub etag: String,
        pub data: ObjectData,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub enum RecordV1 {
        Bucket(BucketRecord),
        BucketGrant(BucketGrant),
        AccessKey(AccessKeyRecord),
        ObjectVersion(ObjectVersionRecordV1),
        MultipartUpload(MultipartUploadRecordV1),
        MultipartPart(MultipartPartRecordV1),
        Stripe(StripeRecord),
    }

    /// A V1 object's stamp is its register's timestamp: V1 had only "null" versions,
    /// one per key, so nothing else orders them.
    pub fn upgrade_v1(register: Lww<RecordV1>) -> Lww<RecordV2> {
        let stamp = register.timestamp;
        let value = register.value.map(|record| match record {
            RecordV1::Bucket(bucket) => RecordV2::Bucket(bucket),
            RecordV1::BucketGrant(grant) => RecordV2::BucketGrant(grant),
            RecordV1::AccessKey(key) => RecordV2::AccessKey(key),
            RecordV1::ObjectVersion(object) => RecordV2::ObjectVersion(ObjectVersionRecordV2 {
                bucket: object.bucket,
                key: object.key,
                version_id: object.version_id,
                version_stamp: stamp,
                created_at_ms: object.created_at_ms,
                size_bytes: object.size_bytes,
                etag: object.etag,
                content_type: object.content_type,
                headers: StandardHeaders::default(),
                user_metadata: object.user_metadata,
                checksums: object.checksums,
                data: object.data,
                lock: ObjectLock {
                    retention: object.retention,
                    legal_hold: object.legal_hold,
                },
            }),
            RecordV1::MultipartUpload(upload) => RecordV2::MultipartUpload(MultipartUploadRecord {
                bucket: upload.bucket,
                key: upload.key,
                upload_id: upload.upload_id,
                created_at_ms: upload.created_at_ms,
                content_type: upload.content_type,
                headers: StandardHeaders::default(),
                user_metadata: upload.user_metadata,
                lock: ObjectLock::default(),
                checksum_algorithm: None,
                bucket_created_at_ms: 0,
            }),
            RecordV1::MultipartPart(part) => RecordV2::MultipartPart(MultipartPartRecord {
                upload_id: part.upload_id,
                part_number: part.part_number,
                size_bytes: part.size_bytes,
                etag: part.etag,
                checksums: BTreeMap::new(),
                data: part.data,
            }),
            RecordV1::Stripe(stripe) => RecordV2::Stripe(stripe),
        });
        Lww {
            timestamp: register.timestamp,
            value,
        }
    }

    /// An object version as V2 wrote it: without its bucket's generation.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ObjectVersionRecordV2 {
        pub bucket: String,
        pub key: String,
        pub version_id: String,
        pub version_stamp: HlcTimestamp,
        pub created_at_ms: u64,
        pub size_bytes: u64,
        pub etag: String,
        pub content_type: Option<String>,
        pub headers: StandardHeaders,
        pub user_metadata: BTreeMap<String, String>,
        pub checksums: BTreeMap<ChecksumAlgorithm, String>,
        pub data: ObjectData,
        pub lock: ObjectLock,
    }

    /// V2's records: V3 changed only the object version. The other variants share the
    /// current types, so a later change to any of them needs its own snapshot here.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub enum RecordV2 {
        Bucket(BucketRecord),
        BucketGrant(BucketGrant),
        AccessKey(AccessKeyRecord),
        ObjectVersion(ObjectVersionRecordV2),
        MultipartUpload(MultipartUploadRecord),
        MultipartPart(MultipartPartRecord),
        Stripe(StripeRecord),
    }

    /// A V2 object's bucket generation is unknown (0): it is served by whichever bucket
    /// of its name exists, as it was before generations were recorded.
    pub fn upgrade_v2(register: Lww<RecordV2>) -> Lww<RecordV4> {
        let value = register.value.map(|record| match record {
            RecordV2::Bucket(bucket) => RecordV4::Bucket(bucket),
            RecordV2::BucketGrant(grant) => RecordV4::BucketGrant(grant),
            RecordV2::AccessKey(key) => RecordV4::AccessKey(key),
            RecordV2::ObjectVersion(object) => RecordV4::ObjectVersion(ObjectVersionRecordV4 {
                bucket: object.bucket,
                key: object.key,
                version_id: object.version_id,
                version_stamp: object.version_stamp,
                created_at_ms: object.created_at_ms,
                size_bytes: object.size_bytes,
                etag: object.etag,
                content_type: object.content_type,
                headers: object.headers,
                user_metadata: object.user_metadata,
                checksums: object.checksums,
                data: object.data,
                lock: object.lock,
                bucket_created_at_ms: 0,
            }),
            RecordV2::MultipartUpload(upload) => RecordV4::MultipartUpload(upload),
            RecordV2::MultipartPart(part) => RecordV4::MultipartPart(part),
            RecordV2::Stripe(stripe) => RecordV4::Stripe(stripe),
        });
        Lww {
            timestamp: register.timestamp,
            value,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordDecodeError {
    #[error("stored value of {length_bytes} bytes exceeds the {STORED_VALUE_BYTES_MAX}-byte maximum")]
    TooLarge { length_bytes: u64 },
    #[error("stored value is corrupt or of an unknown format: {0}")]
    Corrupt(String),
}

pub fn encode_stored_value(register: &Lww<Record>) -> Vec<u8> {
    postcard::to_allocvec(&StoredValue::V5(register.clone())).expect("records encode")
}

/// Whether `bytes` are in the format [`encode_stored_value`] writes now (not an older
/// one that decodes only by upgrading). Replicas rewrite old rows they touch, so the
/// anti-entropy digests, which hash the stored bytes, agree once every copy is current.
pub fn stored_value_is_current(bytes: &[u8]) -> bool {
    matches!(
        postcard::take_from_bytes::<u32>(bytes),
        Ok((STORED_VALUE_VERSION_CURRENT, _))
    )
}

pub fn decode_stored_value(bytes: &[u8]) -> Result<Lww<Record>, RecordDecodeError> {
    if bytes.len() as u64 > STORED_VALUE_BYTES_MAX {
        return Err(RecordDecodeError::TooLarge {
            length_bytes: bytes.len() as u64,
        });
    }
    match postcard::from_bytes::<StoredValue>(bytes) {
        Ok(StoredValue::V1(register)) => Ok(legacy::upgrade_v4(legacy::upgrade_v2(legacy::upgrade_v1(register)))),
        Ok(StoredValue::V2(register)) => Ok(legacy::upgrade_v4(legacy::upgrade_v2(register))),
        Ok(StoredValue::V3(register) | StoredValue::V4(register)) => Ok(legacy::upgrade_v4(register)),
        Ok(StoredValue::V5(mut register)) => {
            // Marks as merges leave them (ordered, one per stamp, bounded), whatever the
            // bytes held: replicas holding the same odd bytes would otherwise never
            // rewrite them, and readers scan every mark.
            if let Some(Record::ObjectVersion(object)) = &mut register.value {
                merge_deletion_marks(&mut object.lock_changes.deletions, &[]);
            }
            Ok(register)
        }
        Err(error) => Err(RecordDecodeError::Corrupt(error.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::erasure::CodecId;
    use proptest::prelude::*;

    fn stamp(wall_ms: u64, logical: u32, node: u8) -> HlcTimestamp {
        HlcTimestamp {
            wall_ms,
            logical,
            node: NodeId([node; 32]),
        }
    }

    fn object(key: &str, size_bytes: u64) -> ObjectVersionRecord {
        ObjectVersionRecord {
            bucket: "backups".into(),
            key: key.into(),
            version_id: "null".into(),
            version_stamp: stamp(1, 0, 1),
            created_at_ms: 1,
            size_bytes,
            etag: "\"abc\"".into(),
            content_type: None,
            headers: StandardHeaders::default(),
            user_metadata: BTreeMap::from([("owner".into(), "ops".into())]),
            checksums: BTreeMap::new(),
            data: ObjectData::Striped(Manifest {
                codec: StripeCodec::new(CodecId::DEFAULT, 4, 2).unwrap(),
                key_epoch: 0,
                stripes: vec![StripeRef {
                    stripe_id: StripeId([7; 32]),
                    plaintext_length_bytes: size_bytes,
                    sealed_length_bytes: size_bytes + 46,
                    holders: vec![NodeId([1; 32]); 6],
                }],
            }),
            lock: ObjectLock::default(),
            bucket_created_at_ms: 1,
            lock_changes: LockChanges::at(stamp(1, 0, 1)),
        }
    }

    #[test]
    fn version_one_records_are_read_and_upgraded() {
        let old = legacy::ObjectVersionRecordV1 {
            bucket: "backups".into(),
            key: "k".into(),
            version_id: "null".into(),
            created_at_ms: 7,
            size_bytes: 3,
            etag: "\"e\"".into(),
            content_type: Some("text/plain".into()),
            user_metadata: BTreeMap::new(),
            checksums: BTreeMap::new(),
            data: ObjectData::Inline { sealed: vec![1, 2, 3] },
            retention: None,
            legal_hold: true,
        };
        let register = Lww::new(stamp(9, 1, 3), legacy::RecordV1::ObjectVersion(old));
        let bytes = postcard::to_allocvec(&StoredValue::V1(register)).unwrap();
        let upgraded = decode_stored_value(&bytes).unwrap();
        assert_eq!(upgraded.timestamp, stamp(9, 1, 3));
        let Some(Record::ObjectVersion(object)) = upgraded.value else {
            panic!("not an object: {upgraded:?}")
        };
        assert_eq!(object.version_stamp, stamp(9, 1, 3));
        assert_eq!(object.content_type.as_deref(), Some("text/plain"));
        assert!(object.lock.legal_hold);
        assert_eq!(object.headers, StandardHeaders::default());
        assert_eq!(
            object.bucket_created_at_ms, 0,
            "a V1 object's bucket generation is unknown"
        );
    }

    #[test]
    fn version_two_records_are_read_and_upgraded_with_an_unknown_bucket_generation() {
        let current = object("a/b", 10);
        let old = legacy::ObjectVersionRecordV2 {
            bucket: current.bucket.clone(),
            key: current.key.clone(),
            version_id: current.version_id.clone(),
            version_stamp: current.version_stamp,
            created_at_ms: current.created_at_ms,
            size_bytes: current.size_bytes,
            etag: current.etag.clone(),
            content_type: Some("text/plain".into()),
            headers: StandardHeaders {
                cache_control: Some("no-cache".into()),
                ..StandardHeaders::default()
            },
            user_metadata: current.user_metadata.clone(),
            checksums: BTreeMap::from([(ChecksumAlgorithm::Crc32c, "AAAAAA==".into())]),
            data: current.data.clone(),
            lock: ObjectLock {
                retention: None,
                legal_hold: true,
            },
        };
        let register = Lww::new(stamp(9, 1, 3), legacy::RecordV2::ObjectVersion(old.clone()));
        let bytes = postcard::to_allocvec(&StoredValue::V2(register)).unwrap();
        assert!(!stored_value_is_current(&bytes));
        let upgraded = decode_stored_value(&bytes).unwrap();
        assert_eq!(upgraded.timestamp, stamp(9, 1, 3));
        let Some(Record::ObjectVersion(object)) = upgraded.value else {
            panic!("not an object: {upgraded:?}")
        };
        assert_eq!(
            object,
            ObjectVersionRecord {
                bucket: old.bucket,
                key: old.key,
                version_id: old.version_id,
                version_stamp: old.version_stamp,
                created_at_ms: old.created_at_ms,
                size_bytes: old.size_bytes,
                etag: old.etag,
                content_type: old.content_type,
                headers: old.headers,
                user_metadata: old.user_metadata,
                checksums: old.checksums,
                data: old.data,
                lock: old.lock,
                bucket_created_at_ms: 0,
                lock_changes: LockChanges::at(old.version_stamp),
            }
        );
        // Unknown means "the bucket of its name that exists", as before generations.
        let bucket = |created_at_ms| BucketRecord {
            name: "backups".into(),
            owner_key_id: "owner".into(),
            created_at_ms,
            versioning: VersioningState::Unversioned,
            object_lock_enabled: false,
            default_retention: None,
            codec: StripeCodec::new(CodecId::DEFAULT, 4, 2).unwrap(),
            stripe_length_bytes: 1024,
            inline_threshold_bytes: 64,
        };
        assert!(object.belongs_to(&bucket(5)) && object.belongs_to(&bucket(6)));
        // Every other V2 record decodes unchanged (V3 changed only object versions).
        let grant = BucketGrant {
            read: true,
            write: false,
            bucket_created_at_ms: 5,
            granted_at_ms: 6,
        };
        let old_grant = Lww::new(stamp(2, 0, 1), legacy::RecordV2::BucketGrant(grant));
        let decoded = decode_stored_value(&postcard::to_allocvec(&StoredValue::V2(old_grant)).unwrap()).unwrap();
        assert_eq!(decoded, Lww::new(stamp(2, 0, 1), Record::BucketGrant(grant)));
        let tombstone: Lww<legacy::RecordV2> = Lww::tombstone(stamp(3, 0, 1));
        let decoded = decode_stored_value(&postcard::to_allocvec(&StoredValue::V2(tombstone)).unwrap()).unwrap();
        assert_eq!(decoded, Lww::tombstone(stamp(3, 0, 1)));
    }

    /// A small "null" object as the V2 code wrote it (a postcard envelope of variant 1).
    fn golden_version_two_object() -> legacy::ObjectVersionRecordV2 {
        legacy::ObjectVersionRecordV2 {
            bucket: "b".into(),
            key: "k".into(),
            version_id: "null".into(),
            version_stamp: stamp(2, 1, 3),
            created_at_ms: 4,
            size_bytes: 1,
            etag: "e".into(),
            content_type: None,
            headers: StandardHeaders::default(),
            user_metadata: BTreeMap::new(),
            checksums: BTreeMap::new(),
            data: ObjectData::Inline { sealed: vec![9] },
            lock: ObjectLock::default(),
        }
    }

    #[test]
    fn inline_data_is_encoded_as_a_length_and_the_bytes_as_before() {
        // Pinned: [variant 0][length 4][the bytes, each as itself], what the sequence
        // encoding wrote before inline data was encoded as bytes.
        let inline = ObjectData::Inline {
            sealed: vec![1, 2, 3, 200],
        };
        let written = [0u8, 4, 1, 2, 3, 200];
        assert_eq!(postcard::to_allocvec(&inline).unwrap(), written);
        assert_eq!(postcard::from_bytes::<ObjectData>(&written).unwrap(), inline);
    }

    #[test]
    fn bytes_the_version_two_code_wrote_still_decode() {
        // Pinned: what the V2 code (ObjectVersionRecord without its bucket generation,
        // envelope variant 1) wrote for `golden_version_two_object`. If this changes, old
        // rows on disk no longer decode.
        let written_by_v2 = hex::decode(
            "010500010101010101010101010101010101010101010101010101010101010101010101030162016b046e756c6c02010303\
             0303030303030303030303030303030303030303030303030303030303030401016500000000000000000001090000",
        )
        .unwrap();
        let register = Lww::new(
            stamp(5, 0, 1),
            legacy::RecordV2::ObjectVersion(golden_version_two_object()),
        );
        assert_eq!(
            postcard::to_allocvec(&StoredValue::V2(register)).unwrap(),
            written_by_v2
        );
        let decoded = decode_stored_value(&written_by_v2).unwrap();
        let Some(Record::ObjectVersion(object)) = decoded.value else {
            panic!("not an object: {decoded:?}")
        };
        assert_eq!((object.bucket.as_str(), object.key.as_str()), ("b", "k"));
        assert_eq!(object.version_stamp, stamp(2, 1, 3));
        assert_eq!(object.data, ObjectData::Inline { sealed: vec![9] });
        assert_eq!(object.bucket_created_at_ms, 0);
    }

    #[test]
    fn version_three_bytes_still_decode_and_deletion_rows_round_trip() {
        // Pinned: what the V3 code (envelope variant 2) wrote for this bucket. If this
        // changes, old rows no longer decode.
        let bucket = BucketRecord {
            name: "b".into(),
            owner_key_id: "o".into(),
            created_at_ms: 5,
            versioning: VersioningState::Enabled,
            object_lock_enabled: true,
            default_retention: Some(DefaultRetention {
                mode: RetentionMode::Compliance,
                days: 3,
            }),
            codec: StripeCodec::new(CodecId::DEFAULT, 4, 2).unwrap(),
            stripe_length_bytes: 1024,
            inline_threshold_bytes: 64,
        };
        let written_by_v3 = hex::decode(
            "020500010101010101010101010101010101010101010101010101010101010101010101000162016f050101010103010402800840",
        )
        .unwrap();
        assert!(!stored_value_is_current(&written_by_v3));
        assert_eq!(
            decode_stored_value(&written_by_v3).unwrap(),
            Lww::new(stamp(5, 0, 1), Record::Bucket(bucket))
        );
        // A deletion row, in the current format; in progress only until its deadline
        // and the clock allowance have both passed.
        let deletion = BucketIntentRecord {
            bucket_created_at_ms: 5,
            started_at_ms: 1_000,
        };
        let register = Lww::new(stamp(6, 0, 1), Record::BucketIntent(deletion));
        let bytes = encode_stored_value(&register);
        assert!(stored_value_is_current(&bytes));
        assert_eq!(decode_stored_value(&bytes).unwrap(), register);
        let expiry_ms = 1_000 + BUCKET_INTENT_DEADLINE_MS + CLOCK_SKEW_ALLOWANCE_MS;
        assert!(deletion.in_progress(0) && deletion.in_progress(expiry_ms - 1));
        assert!(!deletion.in_progress(expiry_ms));
    }

    #[test]
    fn version_four_objects_still_decode_with_their_lock_set_at_the_version() {
        // Pinned: what the V4 code (ObjectVersionRecord without its LockChanges, envelope
        // variant 3) wrote for this held version. If this changes, old rows no longer decode.
        let old = legacy::ObjectVersionRecordV4 {
            bucket: "b".into(),
            key: "k".into(),
            version_id: "v".into(),
            version_stamp: stamp(2, 1, 3),
            created_at_ms: 4,
            size_bytes: 1,
            etag: "e".into(),
            content_type: None,
            headers: StandardHeaders::default(),
            user_metadata: BTreeMap::new(),
            checksums: BTreeMap::new(),
            data: ObjectData::Inline { sealed: vec![9] },
            lock: ObjectLock {
                retention: None,
                legal_hold: true,
            },
            bucket_created_at_ms: 7,
        };
        let register = Lww::new(stamp(5, 0, 1), legacy::RecordV4::ObjectVersion(old));
        let written_by_v4 = hex::decode(
            "030500010101010101010101010101010101010101010101010101010101010101010101030162016b017602010303\
             030303030303030303030303030303030303030303030303030303030303040101650000000000000000000109000107",
        )
        .unwrap();
        assert_eq!(
            postcard::to_allocvec(&StoredValue::V4(register)).unwrap(),
            written_by_v4
        );
        assert!(!stored_value_is_current(&written_by_v4));
        let decoded = decode_stored_value(&written_by_v4).unwrap();
        assert_eq!(decoded.timestamp, stamp(5, 0, 1));
        let object = object_in(&decoded);
        assert_eq!((object.version_id.as_str(), object.bucket_created_at_ms), ("v", 7));
        assert!(object.lock.legal_hold);
        assert_eq!(object.lock_changes, LockChanges::at(stamp(2, 1, 3)));
        // Rewritten in the current format, it reads back the same.
        let current = encode_stored_value(&decoded);
        assert!(stored_value_is_current(&current));
        assert_eq!(decode_stored_value(&current).unwrap(), decoded);
    }

    #[test]
    fn an_object_belongs_only_to_the_bucket_generation_it_was_written_in() {
        let mut record = object("k", 1);
        record.bucket_created_at_ms = 5;
        assert!(record.belongs_to_generation(5));
        assert!(!record.belongs_to_generation(6), "a later bucket of the same name");
        assert!(!record.belongs_to_generation(4));
    }

    #[test]
    fn version_ids_sort_newest_first_and_before_null() {
        let ids: Vec<String> = [
            stamp(5, 0, 1),
            stamp(5, 1, 1),
            stamp(6, 0, 0),
            // Equal wall time and counter: the node orders them, as in the stamps.
            stamp(6, 0, 3),
            stamp(u64::MAX >> 1, 9, 2),
        ]
        .iter()
        .map(version_id_of)
        .collect();
        for pair in ids.windows(2) {
            assert!(pair[0] > pair[1], "{pair:?}");
            assert_eq!(pair[0].len(), 40);
        }
        assert!(ids.iter().all(|id| id.as_str() < "null"));
    }

    #[test]
    fn locks_forbid_deletes_until_retention_ends_and_governance_yields_to_bypass() {
        let governance = ObjectLock {
            retention: Some(Retention {
                mode: RetentionMode::Governance,
                retain_until_ms: 100,
            }),
            legal_hold: false,
        };
        assert!(governance.forbids_delete(99, false));
        assert!(!governance.forbids_delete(99, true));
        assert!(!governance.forbids_delete(100, false));
        let compliance = ObjectLock {
            retention: Some(Retention {
                mode: RetentionMode::Compliance,
                retain_until_ms: 100,
            }),
            legal_hold: false,
        };
        assert!(compliance.forbids_delete(99, true));
        let held = ObjectLock {
            retention: None,
            legal_hold: true,
        };
        assert!(held.forbids_delete(u64::MAX, true));
        assert!(!ObjectLock::default().forbids_delete(0, false));
    }

    #[test]
    fn stored_values_round_trip_and_garbage_is_a_typed_error() {
        let register = Lww::new(stamp(5, 0, 1), Record::ObjectVersion(object("a/b", 10)));
        let bytes = encode_stored_value(&register);
        assert!(stored_value_is_current(&bytes));
        assert_eq!(decode_stored_value(&bytes).unwrap(), register);
        assert!(matches!(
            decode_stored_value(&[9, 9, 9]),
            Err(RecordDecodeError::Corrupt(_))
        ));
        let tombstone: Lww<Record> = Lww::tombstone(stamp(6, 0, 1));
        assert_eq!(
            decode_stored_value(&encode_stored_value(&tombstone)).unwrap(),
            tombstone
        );
    }

    #[test]
    fn row_keys_round_trip_and_sort_by_partition_then_sort_key() {
        let a = RowKey::new(b"bucket".to_vec(), b"a/1".to_vec());
        assert_eq!(RowKey::decode(&a.encode().unwrap()).unwrap(), a);
        let b = RowKey::new(b"bucket".to_vec(), b"b".to_vec());
        assert!(a.encode().unwrap() < b.encode().unwrap());
        assert!(a
            .encode()
            .unwrap()
            .starts_with(&RowKey::prefix(b"bucket", b"a/").unwrap()));
        assert!(RowKey::decode(&[0, 0, 0, 9, 1]).is_err());
        let mut wrong_partition = a.encode().unwrap();
        wrong_partition[1] ^= 1;
        assert!(RowKey::decode(&wrong_partition).is_err());
        assert!(a
            .encode()
            .unwrap()
            .starts_with(&RowKey::partition_prefix(a.partition())));
        assert!(RowKey::new(vec![0; 2000], b"x".to_vec()).encode().is_err());
        assert!(RowKey::partition_of(b"bucket") < METADATA_PARTITIONS);
    }

    fn object_register(timestamp: HlcTimestamp, object: ObjectVersionRecord) -> Lww<Record> {
        Lww::new(timestamp, Record::ObjectVersion(object))
    }

    fn object_in(register: &Lww<Record>) -> &ObjectVersionRecord {
        match &register.value {
            Some(Record::ObjectVersion(object)) => object,
            other => panic!("not an object: {other:?}"),
        }
    }

    #[test]
    fn later_write_wins_even_from_a_node_with_a_slower_clock_after_observing() {
        let mut replica = object_register(stamp(100, 0, 1), object("k", 1));
        // The second write's HLC observed the first, so it is greater despite a slow clock.
        let second = object_register(stamp(100, 1, 2), object("k", 2));
        assert!(replica.merge(&second));
        assert!(!replica.merge(&object_register(stamp(100, 0, 1), object("k", 1))));
        assert_eq!(object_in(&replica).size_bytes, 2);
    }

    #[test]
    fn concurrent_lock_changes_both_stay_and_none_outlives_a_delete() {
        let version = object_register(stamp(100, 0, 1), object("k", 1));
        let retain = Retention {
            mode: RetentionMode::Compliance,
            retain_until_ms: 9_000,
        };
        // Two gateways change the lock at once, each from the version as first written,
        // each keeping the register's timestamp and stamping only its field.
        let mut held = object_in(&version).clone();
        held.lock.legal_hold = true;
        held.lock_changes.legal_hold_stamp = stamp(200, 0, 2);
        let mut retained = object_in(&version).clone();
        retained.lock.retention = Some(retain);
        retained.lock_changes.retention_stamp = stamp(201, 0, 3);
        let held = object_register(stamp(100, 0, 1), held);
        let retained = object_register(stamp(100, 0, 1), retained);
        for (first, second) in [(&held, &retained), (&retained, &held)] {
            let mut replica = version.clone();
            assert!(replica.merge(first));
            assert!(replica.merge(second));
            let lock = object_in(&replica).lock;
            assert_eq!(
                lock,
                ObjectLock {
                    retention: Some(retain),
                    legal_hold: true
                }
            );
        }
        // A later lift of the hold wins over the hold, whatever the order.
        let mut lifted = object_in(&held).clone();
        lifted.lock.legal_hold = false;
        lifted.lock_changes.legal_hold_stamp = stamp(300, 0, 3);
        let lifted = object_register(stamp(100, 0, 1), lifted);
        let mut replica = lifted.clone();
        assert!(!replica.merge(&held));
        assert!(!object_in(&replica).lock.legal_hold);
        // A delete's tombstone is stamped after the version, so a lock change written
        // at the version's timestamp never brings the version back.
        let tombstone = Lww::tombstone(stamp(150, 0, 4));
        for change in [&held, &retained, &lifted] {
            let mut replica = tombstone.clone();
            assert!(!replica.merge(change));
            assert_eq!(replica, tombstone);
        }
    }

    #[test]
    fn deletion_marks_keep_the_newest_and_a_withdrawal_withdraws_only_its_own() {
        let mark = |at, withdrawn| DeletionMark {
            stamp: stamp(at, 0, 2),
            began_at_ms: 1_000,
            withdrawn,
        };
        let mut changes = LockChanges::at(stamp(1, 0, 1));
        assert!(!changes.delete_may_be_in_progress(1_000));
        changes.add_deletion(mark(10, false));
        changes.add_deletion(mark(11, false));
        assert!(changes.delete_may_be_in_progress(1_000));
        assert_eq!(changes.newest_stamp(), stamp(11, 0, 2));
        // The newer delete gives up; the older one may still write its tombstone.
        changes.add_deletion(mark(11, true));
        assert!(changes.delete_may_be_in_progress(1_000));
        changes.add_deletion(mark(10, true));
        assert!(!changes.delete_may_be_in_progress(1_000));
        // A withdrawal is never undone by the mark it withdrew.
        changes.add_deletion(mark(10, false));
        assert_eq!(changes.deletions, vec![mark(11, true), mark(10, true)]);
        // Only the newest marks are kept, newest first.
        for at in 20..40 {
            changes.add_deletion(mark(at, false));
        }
        let kept: Vec<u64> = changes.deletions.iter().map(|mark| mark.stamp.wall_ms).collect();
        assert_eq!(kept, (32..40).rev().collect::<Vec<u64>>());
        // One stamp with different starts: the later start, withdrawn if either is.
        let mut changes = LockChanges::at(stamp(1, 0, 1));
        let late_start = DeletionMark {
            began_at_ms: 2_000,
            ..mark(50, false)
        };
        changes.add_deletion(late_start);
        changes.add_deletion(mark(50, true));
        assert_eq!(
            changes.deletions,
            vec![DeletionMark {
                withdrawn: true,
                ..late_start
            }]
        );
        // Odd stored bytes (unordered, too many marks) decode in the form merges leave.
        let mut odd = object("k", 0);
        odd.lock_changes.deletions = (0..20).map(|at| mark(at, false)).collect();
        let decoded = decode_stored_value(&encode_stored_value(&object_register(stamp(1, 0, 1), odd))).unwrap();
        let kept: Vec<u64> = object_in(&decoded)
            .lock_changes
            .deletions
            .iter()
            .map(|mark| mark.stamp.wall_ms)
            .collect();
        assert_eq!(kept, (12..20).rev().collect::<Vec<u64>>());
        // A mark expires once its delete's deadline and the clock allowance have passed.
        let expiry_ms = 1_000 + DELETION_MARK_DEADLINE_MS + CLOCK_SKEW_ALLOWANCE_MS;
        assert!(mark(1, false).may_be_in_progress(expiry_ms - 1));
        assert!(!mark(1, false).may_be_in_progress(expiry_ms));
    }

    fn arbitrary_lock_changes() -> impl Strategy<Value = (ObjectLock, LockChanges)> {
        (
            0u64..3,
            proptest::option::of(0u64..2),
            0u64..3,
            any::<bool>(),
            // More marks than a version keeps, so the cut is exercised too.
            proptest::collection::vec((0u64..12, 0u64..2, any::<bool>()), 0..10),
        )
            .prop_map(|(retention_at, retain_until_ms, hold_at, legal_hold, deletions)| {
                let lock = ObjectLock {
                    retention: retain_until_ms.map(|retain_until_ms| Retention {
                        mode: match retain_until_ms {
                            0 => RetentionMode::Governance,
                            _ => RetentionMode::Compliance,
                        },
                        retain_until_ms,
                    }),
                    legal_hold,
                };
                let mut changes = LockChanges::at(stamp(0, 0, 1));
                changes.retention_stamp = stamp(retention_at, 0, 1);
                changes.legal_hold_stamp = stamp(hold_at, 0, 1);
                // Raw marks (any order, one stamp more than once), normalized as decoding does.
                changes.deletions = deletions
                    .into_iter()
                    .map(|(at, began_at_ms, withdrawn)| DeletionMark {
                        stamp: stamp(at, 0, 2),
                        began_at_ms,
                        withdrawn,
                    })
                    .collect();
                let register = Lww::new(
                    stamp(0, 0, 1),
                    Record::ObjectVersion(ObjectVersionRecord {
                        lock_changes: changes,
                        ..object("k", 0)
                    }),
                );
                let decoded = decode_stored_value(&encode_stored_value(&register)).unwrap();
                let changes = object_in(&decoded).lock_changes.clone();
                (lock, changes)
            })
    }

    fn arbitrary_register() -> impl Strategy<Value = Lww<Record>> {
        // Tiny domains make equal timestamps (the tie-break and field-merge paths) and
        // versions differing only in their locks common.
        (
            0u64..2,
            0u8..2,
            proptest::option::of((0u64..3, arbitrary_lock_changes())),
            any::<bool>(),
        )
            .prop_map(|(wall_ms, node, object_value, a_grant)| Lww {
                timestamp: stamp(wall_ms, 0, node),
                value: match (object_value, a_grant) {
                    (Some((size_bytes, (lock, lock_changes))), _) => Some(Record::ObjectVersion(ObjectVersionRecord {
                        lock,
                        lock_changes,
                        ..object("k", size_bytes)
                    })),
                    (None, true) => Some(Record::BucketGrant(BucketGrant {
                        read: true,
                        write: false,
                        bucket_created_at_ms: 1,
                        granted_at_ms: 1,
                    })),
                    (None, false) => None,
                },
            })
    }

    proptest! {
        #[test]
        fn lww_merge_is_commutative_associative_and_idempotent(
            a in arbitrary_register(), b in arbitrary_register(), c in arbitrary_register()
        ) {
            let merged = |x: &Lww<Record>, y: &Lww<Record>| { let mut z = x.clone(); z.merge(y); z };
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
            // `merge` says whether it changed anything.
            let mut z = a.clone();
            let changed = z.merge(&b);
            prop_assert_eq!(changed, z != a);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_stored_value(&bytes);
        }
    }
}
