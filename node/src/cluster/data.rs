//! The object data path: buckets, and objects written as encrypted, erasure-coded stripes
//! (or sealed inline in metadata when small), read back from any k shards per stripe.
//!
//! Write: the body is read stripe by stripe (never whole); each stripe is named by a keyed
//! hash, sealed, encoded into k+m shards and sent to its placement holders in parallel,
//! with at most [`PUT_BYTES_IN_FLIGHT_MAX`] of plaintext in flight. A shard whose holder
//! fails is retried on the next placement candidate in the same zone. A stripe counts as
//! written only when the shards that are durable survive the loss of a zone (and of a
//! node) as far as the layout allows; the object is acknowledged only after its manifest
//! is committed to a metadata quorum.
//!
//! Read: the manifest comes from a metadata quorum; per stripe, shards are fetched from
//! the nearest candidates first and the next candidate is tried on any failure, or as a
//! hedge when nothing arrived for [`SHARD_READ_HEDGE_AFTER_MS`], until k verified shards
//! decode. The AEAD then authenticates the whole stripe, and its keyed hash must match
//! the stripe id, so wrong bytes are never returned.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{ControlFlow, Range};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use bdr_protocol::envelope::{self, DerivedKey, KeyPurpose, RootKey, NONCE_LENGTH_BYTES};
use bdr_protocol::erasure::{ChecksumCheck, CodecId, Shard, StripeCodec};
use bdr_protocol::ids::{NodeId, StripeId, ZoneName};
use bdr_protocol::layout::Layout;
use bdr_protocol::placement::{failures_tolerated, place, place_with};
use bdr_protocol::records::{
    AccessKeyRecord, BucketGrant, BucketIntentRecord, BucketRecord, ChecksumAlgorithm, LockChanges, Lww, Manifest,
    MultipartPartRecord, MultipartUploadRecord, ObjectData, ObjectLock, ObjectVersionRecord, Record, RowKey,
    StandardHeaders, StripeOwner, StripeRecord, StripeRef, VersioningState, BUCKET_INTENT_DEADLINE_MS,
    CLOCK_SKEW_ALLOWANCE_MS,
};
use bdr_protocol::wire::{RemoteErrorKind, Request, Response, Table};
use futures::channel::oneshot;
use futures::stream::FuturesUnordered;
use futures::{AsyncBufRead, AsyncBufReadExt, Stream, StreamExt};
use md5::{Digest, Md5};

use super::membership::Liveness;
use super::metadata::{MetaError, ReplicasRead};
use super::ClusterNode;
use crate::env::{Env, NetworkError, ShardKey, StoreError};

/// Objects up to this size are sealed inline in metadata instead of erasure-coded.
pub const INLINE_OBJECT_BYTES_DEFAULT: u32 = 64 * 1024;
pub const STRIPE_LENGTH_BYTES_DEFAULT: u32 = 4 * 1024 * 1024;
pub const DATA_SHARDS_DEFAULT: u8 = 4;
pub const PARITY_SHARDS_DEFAULT: u8 = 2;
/// Plaintext bytes of one put being encoded and sent at once, whatever the stripe length
/// (a put holds a few times this: shards, and the frames carrying them). A stripe's round
/// trip (record on a metadata quorum, shards fsynced on six nodes) is mostly waiting, so
/// several stripes overlap; 16 MiB kept a 2 GiB put's gateway at 143 MiB peak RSS where
/// 32 MiB took 215 MiB for no more throughput on two cores (bench/data_path.py).
pub const PUT_BYTES_IN_FLIGHT_MAX: u64 = 16 * 1024 * 1024;
/// Plaintext bytes of one read being fetched and decoded ahead of the reader.
pub const READ_AHEAD_BYTES_MAX: u64 = 16 * 1024 * 1024;

/// How many units of `unit_bytes` fit in `budget_bytes`: at least one, so any stripe
/// length makes progress.
fn units_within(budget_bytes: u64, unit_bytes: u64) -> usize {
    (budget_bytes / unit_bytes.max(1)).max(1) as usize
}
pub const SHARD_WRITE_TIMEOUT_MS: u64 = 30_000;
pub const SHARD_READ_TIMEOUT_MS: u64 = 15_000;
/// A stripe read that receives no shard for this long asks one more candidate (a hedge),
/// up to m extra shards: a slow node delays a read by about this, not by the read
/// timeout. Long enough that a 1 MiB shard over a slow inter-site link is not hedged on
/// every read.
pub const SHARD_READ_HEDGE_AFTER_MS: u64 = 1_000;
/// How often a shard request in flight looks whether its peer has been reported down.
pub const PEER_DOWN_POLL_MS: u64 = 250;
/// Holders tried per shard index before the index counts as failed.
pub const SHARD_WRITE_ATTEMPTS_MAX: usize = 3;
/// Longest access key id accepted in a lookup (ours are 20 characters).
pub const ACCESS_KEY_ID_BYTES_MAX: usize = 128;
/// Longest object key (S3's limit) and bucket name.
pub const OBJECT_KEY_BYTES_MAX: usize = 1024;
pub const BUCKET_NAME_BYTES_MAX: usize = 63;
/// S3's multipart limits.
pub const PART_BYTES_MIN: u64 = 5 * 1024 * 1024;
pub const PART_NUMBER_MAX: u32 = 10_000;
/// Part records of a finished upload being tombstoned at once.
pub const PART_RECORDS_FORGOTTEN_IN_FLIGHT_MAX: usize = 16;

/// How long a gateway answers S3 requests with a bucket record or access key it read
/// before, instead of two more quorum reads per request. A bucket's settings and a
/// deletion reach other gateways within this long (S3's own propagate with delay too);
/// this gateway's own changes apply at once. Grants are not cached: a revoked grant
/// stops working at once.
pub const REQUEST_CACHE_TTL_MS: u64 = 1_000;
/// Entries per cache; a full cache is emptied (entries live a second anyway).
pub const REQUEST_CACHE_ENTRIES_MAX: usize = 4_096;

/// See [`REQUEST_CACHE_TTL_MS`]: existing buckets and keys only (a miss is read again).
#[derive(Default)]
pub(crate) struct RequestCache {
    buckets: BTreeMap<String, (BucketRecord, u64)>,
    access_keys: BTreeMap<String, (AccessKeyRecord, u64)>,
}

fn cache_get<T: Clone>(entries: &BTreeMap<String, (T, u64)>, name: &str, now_ms: u64) -> Option<T> {
    entries
        .get(name)
        .filter(|(_, read_at_ms)| now_ms.saturating_sub(*read_at_ms) < REQUEST_CACHE_TTL_MS && now_ms >= *read_at_ms)
        .map(|(value, _)| value.clone())
}

fn cache_put<T>(entries: &mut BTreeMap<String, (T, u64)>, name: &str, value: T, now_ms: u64) {
    if entries.len() >= REQUEST_CACHE_ENTRIES_MAX {
        entries.clear();
    }
    entries.insert(name.to_string(), (value, now_ms));
}

/// The version id of objects written while versioning is off.
pub const NULL_VERSION: &str = "null";

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("this node holds no data key (storage-only): it cannot serve object data")]
    NoDataKeys,
    #[error("invalid bucket options: stripe length must be 1 byte..8 MiB, inline threshold at most 1 MiB")]
    InvalidBucketOptions,
    #[error("invalid bucket name {0:?}")]
    InvalidBucketName(String),
    #[error("invalid object key: {0}")]
    InvalidKey(String),
    #[error("no such bucket {0:?}")]
    NoSuchBucket(String),
    #[error("bucket {0:?} already exists")]
    BucketExists(String),
    #[error("{0}")]
    BucketNotEmpty(String),
    #[error("bucket {0:?} is being deleted; retry to learn whether it went")]
    BucketBeingDeleted(String),
    #[error("bucket {0:?} is being created by another request; retry")]
    BucketBusy(String),
    #[error("this node runs {0} bucket creations and deletions already; retry")]
    BucketRequestsBusy(u32),
    #[error("the cluster holds more than {0} buckets, more than a bucket list returns")]
    TooManyBuckets(u64),
    #[error("no such key")]
    NoSuchKey,
    #[error("range {start}..{end} is not satisfiable for an object of {size} bytes")]
    InvalidRange { start: u64, end: u64, size: u64 },
    #[error("reading the request body failed: {0}")]
    Body(String),
    #[error("the request body stalled: {0}")]
    BodyTimeout(String),
    #[error("write not durable: {0}")]
    NotDurable(String),
    #[error("stripe {stripe} cannot be read: {reason}")]
    StripeUnreadable { stripe: String, reason: String },
    #[error("object data failed verification: {0}")]
    Corrupt(String),
    #[error("no such multipart upload")]
    NoSuchUpload,
    #[error("invalid part: {0}")]
    InvalidPart(String),
    #[error("parts must be listed in ascending order")]
    InvalidPartOrder,
    #[error("part {part_number} is {size_bytes} bytes; every part but the last must be at least {size_bytes_min}")]
    EntityTooSmall {
        part_number: u32,
        size_bytes: u64,
        size_bytes_min: u64,
    },
    #[error("the body does not match its checksum: {0}")]
    BadDigest(String),
    #[error("no such access key {0:?}")]
    NoSuchAccessKey(String),
    #[error("access key {0:?} owns the bucket: an owner's rights cannot be granted or taken")]
    OwnerRights(String),
    #[error("no such version")]
    NoSuchVersion,
    #[error("invalid version id {0:?}")]
    InvalidVersionId(String),
    #[error("object locked: {0}")]
    ObjectLocked(String),
    #[error("version busy: {0}")]
    VersionBusy(String),
    #[error("invalid bucket state: {0}")]
    InvalidBucketState(String),
    #[error("invalid Object Lock request: {0}")]
    InvalidLockRequest(String),
    #[error("metadata: {0}")]
    Meta(#[from] MetaError),
}

/// What one access key may do with one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BucketRights {
    pub read: bool,
    pub write: bool,
    /// Owners also change the bucket's settings and delete it.
    pub owner: bool,
}

impl BucketRights {
    pub const OWNER: BucketRights = BucketRights {
        read: true,
        write: true,
        owner: true,
    };
}

/// The keys a gateway node holds. Storage-only nodes have none.
#[derive(Clone)]
pub struct DataKeys {
    stripe_data: DerivedKey,
    inline_data: DerivedKey,
    stripe_naming: [u8; 32],
}

impl DataKeys {
    pub fn from_root(root: &RootKey) -> DataKeys {
        DataKeys {
            stripe_data: root.derive(KeyPurpose::StripeData, 0),
            inline_data: root.derive(KeyPurpose::InlineData, 0),
            stripe_naming: root.derive(KeyPurpose::StripeNaming, 0).bytes,
        }
    }
}

pub(crate) enum FetchError {
    /// The shard exists but failed verification: skip it and have it repaired.
    Corrupt(String),
    /// The shard could not be had from that node (down, missing, timeout).
    Unavailable(String),
}

impl std::fmt::Display for FetchError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FetchError::Corrupt(reason) => write!(formatter, "corrupt: {reason}"),
            FetchError::Unavailable(reason) => write!(formatter, "unavailable: {reason}"),
        }
    }
}

/// How a bucket's objects are stored.
#[derive(Debug, Clone, Copy)]
pub struct BucketOptions {
    pub codec: StripeCodec,
    pub stripe_length_bytes: u32,
    pub inline_threshold_bytes: u32,
    /// Object Lock (and with it versioning, for good) from the start.
    pub object_lock_enabled: bool,
}

impl Default for BucketOptions {
    fn default() -> Self {
        BucketOptions {
            codec: StripeCodec::new(CodecId::DEFAULT, DATA_SHARDS_DEFAULT, PARITY_SHARDS_DEFAULT)
                .expect("default code is valid"),
            stripe_length_bytes: STRIPE_LENGTH_BYTES_DEFAULT,
            inline_threshold_bytes: INLINE_OBJECT_BYTES_DEFAULT,
            object_lock_enabled: false,
        }
    }
}

/// What a put writes besides the bytes.
#[derive(Debug, Clone, Default)]
pub struct ObjectWrite {
    pub bucket: String,
    pub key: String,
    pub content_type: Option<String>,
    pub headers: StandardHeaders,
    pub user_metadata: BTreeMap<String, String>,
    /// The retention and legal hold the request asked for (the bucket's default
    /// retention applies where it asked for none).
    pub lock: ObjectLock,
    /// For a multipart upload: the checksum algorithm every part will carry.
    pub checksum_algorithm: Option<ChecksumAlgorithm>,
    pub body_check: BodyCheck,
    /// The bucket's record if the caller has just read it (the gateway's access check
    /// does), so the put does not read it again.
    pub bucket_record: Option<BucketRecord>,
}

/// Checksums of a body, base64 as S3 shows them, by algorithm.
pub type Checksums = BTreeMap<ChecksumAlgorithm, String>;

/// Makes a multipart object's composite checksum from its parts' checksums (the
/// gateway's hash functions; None if it cannot).
pub type ChecksumCombine = dyn Fn(ChecksumAlgorithm, &[String]) -> Option<String> + Send + Sync;

type BodyCheckFn = dyn Fn() -> Result<Checksums, String> + Send + Sync;

/// Run by the data path once a body has been read to its end and before anything is
/// committed: the gateway verifies the client's checksums here (a trailing checksum
/// arrives only after the last byte). Returns the checksums to store with the object;
/// an error fails the write with [`DataError::BadDigest`].
#[derive(Clone, Default)]
pub struct BodyCheck(Option<Arc<BodyCheckFn>>);

impl BodyCheck {
    pub fn none() -> BodyCheck {
        BodyCheck(None)
    }

    pub fn new(check: impl Fn() -> Result<Checksums, String> + Send + Sync + 'static) -> BodyCheck {
        BodyCheck(Some(Arc::new(check)))
    }

    fn run(&self) -> Result<Checksums, DataError> {
        match &self.0 {
            None => Ok(Checksums::new()),
            Some(check) => check().map_err(DataError::BadDigest),
        }
    }
}

impl std::fmt::Debug for BodyCheck {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(if self.0.is_some() {
            "BodyCheck(..)"
        } else {
            "BodyCheck(none)"
        })
    }
}

pub fn validate_bucket_name(name: &str) -> Result<(), DataError> {
    let valid = (3..=BUCKET_NAME_BYTES_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'-' || byte == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    if !valid {
        return Err(DataError::InvalidBucketName(name.to_string()));
    }
    Ok(())
}

pub(crate) fn validate_key(key: &str) -> Result<(), DataError> {
    if key.is_empty() || key.len() > OBJECT_KEY_BYTES_MAX {
        return Err(DataError::InvalidKey(format!(
            "must be 1..={OBJECT_KEY_BYTES_MAX} bytes"
        )));
    }
    if key.contains('\0') {
        return Err(DataError::InvalidKey("must not contain NUL".into()));
    }
    Ok(())
}

/// The row of version `version_id` of `key` in the bucket generation
/// `bucket_created_at_ms`: `key NUL id`. Versioned ids come from stamps, so no two
/// versions share one; "null" is every generation's id, so its row carries the generation
/// (`null-` and 16 hex digits, still after every versioned id). Were it shared, a late
/// write from a deleted bucket, stamped by a fast clock, would win the register over an
/// acknowledged version of the bucket of the same name created since.
pub fn object_row(bucket: &str, bucket_created_at_ms: u64, key: &str, version_id: &str) -> RowKey {
    let mut sort_key = key.as_bytes().to_vec();
    sort_key.push(0);
    sort_key.extend_from_slice(version_row_id(version_id, bucket_created_at_ms).as_bytes());
    RowKey::new(bucket.as_bytes(), sort_key)
}

/// The row `record` lives in.
pub(crate) fn object_row_of(record: &ObjectVersionRecord) -> RowKey {
    object_row(
        &record.bucket,
        record.bucket_created_at_ms,
        &record.key,
        &record.version_id,
    )
}

/// The id part of a version's sort key (see [`object_row`]).
fn version_row_id(version_id: &str, bucket_created_at_ms: u64) -> std::borrow::Cow<'_, str> {
    match version_id == NULL_VERSION {
        true => format!("{NULL_VERSION}-{bucket_created_at_ms:016x}").into(),
        false => version_id.into(),
    }
}

/// Whether the row `sort_key` is where `record` lives: a "null" version written before
/// rows carried their generation sits at another address, and is served from nowhere.
pub(crate) fn is_row_of(sort_key: &[u8], record: &ObjectVersionRecord) -> bool {
    let id = version_row_id(&record.version_id, record.bucket_created_at_ms);
    match sort_key.split_at_checked(record.key.len()) {
        Some((key, rest)) => key == record.key.as_bytes() && rest.first() == Some(&0) && &rest[1..] == id.as_bytes(),
        None => false,
    }
}

/// The version id a `key NUL id` object row holds ("null" for every generation's).
pub(crate) fn version_id_of_row(row_id: &str) -> &str {
    match row_id.starts_with(NULL_VERSION) {
        true => NULL_VERSION,
        false => row_id,
    }
}

/// A bucket creation or deletion in progress on this node: its intent row and start
/// time. Each holds one of the node's [`BUCKET_INTENT_SLOTS_MAX`] slots, which names its
/// row (node id, incarnation, slot), so a partition keeps at most one row per node run
/// and slot however many requests come and go (a fresh row per request piled up tombstones for the
/// tombstone grace, until a full page read as "in progress" and refused everything).
/// Dropping it frees the slot, also when the request's future is dropped mid-way; the
/// next request of the slot in that partition writes over whatever row was left.
pub(crate) struct BucketIntent<'a> {
    pub row: RowKey,
    pub started_at_ms: u64,
    slots: &'a Mutex<BTreeMap<u32, Vec<u8>>>,
    slot: u32,
}

impl Drop for BucketIntent<'_> {
    fn drop(&mut self) {
        self.slots.lock().expect("not poisoned").remove(&self.slot);
    }
}

/// The sort key of the intent row of `slot` in one run (`incarnation`) of `node`.
fn intent_sort_key(node: NodeId, incarnation: u64, slot: u32) -> Vec<u8> {
    let mut sort_key = node.as_bytes().to_vec();
    sort_key.extend_from_slice(&incarnation.to_be_bytes());
    sort_key.extend_from_slice(&slot.to_be_bytes());
    sort_key
}

/// All bucket records share one partition, so listing buckets is one range scan.
pub(crate) fn bucket_row(bucket: &str) -> RowKey {
    RowKey::new(b"buckets".to_vec(), bucket.as_bytes())
}

/// The partitions of a bucket's deletion and creation rows (Buckets table). No bucket
/// name holds a colon, so neither is ever the bucket list's partition.
fn bucket_deletions_partition(bucket: &str) -> Vec<u8> {
    format!("deletions:{bucket}").into_bytes()
}

fn bucket_creations_partition(bucket: &str) -> Vec<u8> {
    format!("creations:{bucket}").into_bytes()
}

/// Access keys likewise share one partition.
fn access_key_row(key_id: &str) -> RowKey {
    RowKey::new(b"access-keys".to_vec(), key_id.as_bytes())
}

/// Grants on a bucket share the bucket's partition in the grants table, one row per key.
fn grant_row(bucket: &str, key_id: &str) -> RowKey {
    RowKey::new(bucket.as_bytes(), key_id.as_bytes())
}

/// Rows of the bucket list read per page.
pub const BUCKETS_PAGE_ROWS: u32 = bdr_protocol::wire::SCAN_ROWS_MAX;
/// Buckets ListBuckets returns at most (S3's default quota per account is 10,000).
pub const BUCKETS_LISTED_MAX: u64 = 100_000;

/// Grant rows read per page.
pub const GRANTS_PAGE_ROWS: u32 = 1_000;
/// Multipart uploads a DeleteBucket looks at: a full page of them counts as uploads in
/// progress, even if they were all left by an earlier bucket of the name.
pub const BUCKET_DELETION_UPLOADS_SCANNED_MAX: u32 = 1_000;
/// Creation or deletion rows a request looks at; a full page counts as one in progress.
/// A partition holds at most one row per node and intent slot ever used on it (rows are
/// reused), so this is reached only by many nodes each running many at once.
pub const BUCKET_INTENTS_SCANNED_MAX: u32 = 1_000;
/// Bucket creations and deletions one node runs at once (each holds an intent slot; see
/// [`BucketIntent`]); more are refused (BucketRequestsBusy) until one ends.
pub const BUCKET_INTENT_SLOTS_MAX: u32 = 64;
/// How long a bucket creation or deletion waits before writing the bucket's record or
/// tombstone again when it reached too few replicas (see
/// `ClusterNode::settle_bucket_register`).
pub const BUCKET_REGISTER_RETRY_MS: u64 = 1_000;
/// How long a write whose bucket is being deleted waits for the deletion's outcome
/// before it fails (BucketBeingDeleted), and how often it looks meanwhile. A deletion
/// takes a few metadata round trips; the row of one left by a crashed gateway lasts
/// until it expires, which the write does not wait for.
pub const COMMIT_DELETION_WAIT_MS: u64 = 5_000;
pub const COMMIT_DELETION_POLL_MS: u64 = 100;

pub(crate) fn upload_row(bucket: &str, key: &str, upload_id: &str) -> RowKey {
    let mut sort_key = key.as_bytes().to_vec();
    sort_key.push(0);
    sort_key.extend_from_slice(upload_id.as_bytes());
    RowKey::new(bucket.as_bytes(), sort_key)
}

/// A stripe's record lives in the partition of its id: stripes spread evenly over all
/// metadata partitions, so repair work spreads evenly over their maintainers.
pub(crate) fn stripe_row(stripe_id: &StripeId) -> RowKey {
    RowKey::new(stripe_id.as_bytes().to_vec(), Vec::new())
}

/// Parts of one upload share a partition (the upload id), ordered by part number.
pub(crate) fn part_row(upload_id: &str, part_number: u32) -> RowKey {
    RowKey::new(upload_id.as_bytes(), part_number.to_be_bytes().to_vec())
}

/// The sort key to scan strictly after, for rows `key NUL id` (object versions,
/// multipart uploads): after the row of `id`, or without one after every row of `key`
/// (`key NUL 0xff` sorts after them all and before any longer key: keys are UTF-8,
/// which never contains 0xff).
pub(crate) fn marker_sort_key(key: &str, id: Option<&str>) -> Vec<u8> {
    let mut sort_key = key.as_bytes().to_vec();
    sort_key.push(0);
    match id {
        Some(id) => sort_key.extend_from_slice(id.as_bytes()),
        None => sort_key.push(0xff),
    }
    sort_key
}

/// The (key, id) of a `key NUL id` row's sort key.
pub(crate) fn split_marker_sort_key(sort_key: &[u8]) -> Option<(String, String)> {
    let (key, id) = sort_key.split_at(sort_key.iter().position(|byte| *byte == 0)?);
    Some((
        String::from_utf8(key.to_vec()).ok()?,
        String::from_utf8(id[1..].to_vec()).ok()?,
    ))
}

/// One page of multipart uploads in progress.
pub struct UploadListing {
    pub uploads: Vec<MultipartUploadRecord>,
    /// The (key, upload id) of the last row scanned, when the scan was cut at its limit.
    pub next_after: Option<(String, String)>,
}

/// One page of object listing.
pub struct ObjectListing {
    /// Live objects in key order.
    pub records: Vec<ObjectVersionRecord>,
    /// Set when the scan filled its page: list on after this key.
    pub next_after: Option<String>,
}

const ACCESS_KEY_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
const SECRET_KEY_ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

fn inline_binding(bucket: &str, key: &str, version_id: &str) -> Vec<u8> {
    let mut binding = b"I".to_vec();
    for part in [bucket, key, version_id] {
        binding.extend_from_slice(&(part.len() as u32).to_le_bytes());
        binding.extend_from_slice(part.as_bytes());
    }
    binding
}

/// Reads until `buffer` holds `length` bytes or the body ends; returns bytes read.
async fn fill<R: AsyncBufRead + Unpin>(body: &mut R, buffer: &mut Vec<u8>, length: usize) -> Result<usize, DataError> {
    let start = buffer.len();
    // Straight from the body's own buffers: reading into the vector would first have it
    // zeroed, a pass over every byte put (1.2% of a large PUT's CPU).
    buffer.reserve(length.saturating_sub(start));
    while buffer.len() < length {
        let available = body.fill_buf().await.map_err(|error| match error.kind() {
            std::io::ErrorKind::TimedOut => DataError::BodyTimeout(error.to_string()),
            _ => DataError::Body(error.to_string()),
        })?;
        if available.is_empty() {
            break;
        }
        let taken = available.len().min(length - buffer.len());
        buffer.extend_from_slice(&available[..taken]);
        body.consume_unpin(taken);
    }
    Ok(buffer.len() - start)
}

impl<E: Env> ClusterNode<E> {
    /// Lowers the size every multipart part but the last must reach (S3's 5 MiB,
    /// [`PART_BYTES_MIN`], by default). Only for simulations and tests, whose objects are
    /// a few kilobytes: it lets them complete uploads of many parts.
    pub fn set_part_bytes_min(&self, size_bytes_min: u64) {
        self.part_bytes_min.store(size_bytes_min, Ordering::Relaxed);
    }

    fn data_keys(&self) -> Result<&DataKeys, DataError> {
        self.data_keys.as_ref().ok_or(DataError::NoDataKeys)
    }

    fn random_nonce(&self) -> [u8; NONCE_LENGTH_BYTES] {
        let mut nonce = [0u8; NONCE_LENGTH_BYTES];
        for chunk in nonce.chunks_mut(8) {
            chunk.copy_from_slice(&self.env.random_u64().to_le_bytes()[..chunk.len()]);
        }
        nonce
    }

    pub async fn create_bucket(self: &Arc<Self>, name: &str, owner_key_id: &str) -> Result<BucketRecord, DataError> {
        self.create_bucket_with(name, owner_key_id, BucketOptions::default())
            .await
    }

    /// Creates a bucket unless one of the name exists (BucketExists) or another creation
    /// of the name is in progress (BucketBusy: both may be refused, never both
    /// acknowledged). Like a deletion, a creation writes a row of its own first, then
    /// reads the other creations' rows and the bucket, then writes the bucket's record
    /// and withdraws its row: of two concurrent creations at least one sees the other,
    /// and one that started after another finished sees its bucket. Without this, both
    /// could be told they created the bucket, and puts acknowledged in the losing
    /// generation would be lost with it.
    pub async fn create_bucket_with(
        self: &Arc<Self>,
        name: &str,
        owner_key_id: &str,
        options: BucketOptions,
    ) -> Result<BucketRecord, DataError> {
        validate_bucket_name(name)?;
        if options.stripe_length_bytes == 0
            || u64::from(options.stripe_length_bytes) > bdr_protocol::erasure::STRIPE_LENGTH_BYTES_MAX / 2
            || u64::from(options.inline_threshold_bytes) > bdr_protocol::records::INLINE_OBJECT_BYTES_MAX
        {
            return Err(DataError::InvalidBucketOptions);
        }
        if let Some(Lww {
            value: Some(Record::Bucket(_)),
            ..
        }) = self.meta_get(Table::Buckets, &bucket_row(name)).await?
        {
            return Err(DataError::BucketExists(name.to_string()));
        }
        let (owned_name, owner_key_id) = (name.to_string(), owner_key_id.to_string());
        self.run_bucket_request(
            "bucket-create",
            name,
            bucket_creations_partition(name),
            0,
            move |node, own_row, started_at_ms| async move {
                node.create_announced_bucket(&owned_name, &own_row, started_at_ms, &owner_key_id, options)
                    .await
            },
        )
        .await
    }

    /// Runs a bucket creation or deletion to its end (see
    /// [`ClusterNode::run_to_completion`]): announces its intent row in `partition`, does
    /// `work` (given the row and when it was announced), which yields the answer and the
    /// bucket register it wrote, settles that register on a quorum
    /// ([`ClusterNode::settle_bucket_register`]), withdraws the row whatever the outcome
    /// (one left behind by a crash expires), and answers.
    async fn run_bucket_request<T, Work, WorkFuture>(
        self: &Arc<Self>,
        task_name: &'static str,
        name: &str,
        partition: Vec<u8>,
        bucket_created_at_ms: u64,
        work: Work,
    ) -> Result<T, DataError>
    where
        T: Send + 'static,
        Work: FnOnce(Arc<Self>, RowKey, u64) -> WorkFuture + Send + 'static,
        WorkFuture: std::future::Future<Output = Result<(T, Lww<Record>), DataError>> + Send,
    {
        let node = Arc::clone(self);
        let name = name.to_string();
        self.run_to_completion(task_name, move |answer| async move {
            let mut answer = Some(answer);
            let outcome = async {
                let intent = node.announce_bucket_intent(partition, bucket_created_at_ms).await?;
                let outcome = async {
                    let (value, register) = work(Arc::clone(&node), intent.row.clone(), intent.started_at_ms).await?;
                    node.settle_bucket_register(&name, &register, &intent, &mut answer)
                        .await?;
                    Ok(value)
                }
                .await;
                if let Err(error) = node.meta_put(Table::Buckets, &intent.row, None).await {
                    tracing::warn!(bucket = name, task_name, %error, "could not withdraw a bucket request's row; it expires");
                }
                outcome
            }
            .await;
            let _ = answer.take().map(|answer| answer.send(outcome));
        })
        .await
    }

    /// Runs a bucket creation or deletion as a task of its own, to its end even if the
    /// caller stops waiting (a client that disconnects drops its request's future), so
    /// it always withdraws its intent row: a row left behind holds writes (or creations)
    /// of the name back until it expires, about 15 minutes. `task` gets the sender of
    /// the caller's answer: it may answer before it ends (see
    /// [`ClusterNode::settle_bucket_register`]).
    async fn run_to_completion<T, Task>(
        self: &Arc<Self>,
        task_name: &'static str,
        task: impl FnOnce(oneshot::Sender<Result<T, DataError>>) -> Task,
    ) -> Result<T, DataError>
    where
        T: Send + 'static,
        Task: std::future::Future<Output = ()> + Send + 'static,
    {
        let (answer, answered) = oneshot::channel();
        self.env.spawn(task_name, Box::pin(task(answer)));
        answered
            .await
            .map_err(|_| DataError::NotDurable(format!("{task_name} was stopped (the node is shutting down)")))?
    }

    /// The creation proper, once announced.
    async fn create_announced_bucket(
        self: &Arc<Self>,
        name: &str,
        own_row: &RowKey,
        started_at_ms: u64,
        owner_key_id: &str,
        options: BucketOptions,
    ) -> Result<(BucketRecord, Lww<Record>), DataError> {
        let (intents, too_many) = self
            .bucket_intents_in_progress(bucket_creations_partition(name))
            .await?;
        let another = intents
            .iter()
            .any(|(row, _)| row != own_row && !self.is_dead_own_intent(row));
        if another || too_many {
            return Err(DataError::BucketBusy(name.to_string()));
        }
        // `created_at_ms` is the bucket's generation: what its grants, uploads and object
        // versions name, so that none of them passes to a later bucket of the name. It
        // must differ from the previous bucket's even when that one was deleted within
        // the same millisecond, or by a gateway whose clock runs ahead. Every bucket's
        // register is stamped at or above its `created_at_ms` (below), and the deletion's
        // tombstone above that register, so a generation past the tombstone's wall time
        // is new.
        let previous = self.meta_get(Table::Buckets, &bucket_row(name)).await?;
        let after_previous_ms = match &previous {
            Some(Lww {
                value: Some(Record::Bucket(_)),
                ..
            }) => return Err(DataError::BucketExists(name.to_string())),
            Some(tombstone) => tombstone.timestamp.wall_ms.saturating_add(1),
            None => 0,
        };
        let created_at_ms = self.env.now_ms().max(after_previous_ms);
        let record = BucketRecord {
            name: name.to_string(),
            owner_key_id: owner_key_id.to_string(),
            created_at_ms,
            versioning: match options.object_lock_enabled {
                true => VersioningState::Enabled,
                false => VersioningState::Unversioned,
            },
            object_lock_enabled: options.object_lock_enabled,
            default_retention: None,
            codec: options.codec,
            stripe_length_bytes: options.stripe_length_bytes,
            inline_threshold_bytes: options.inline_threshold_bytes,
        };
        // Stamped above what was read (as `meta_put` would, without reading again) and
        // with `created_at_ms` as the clock's physical time, so the stamp's wall time is
        // at least the generation even when that is a millisecond ahead of the clock.
        let stamp = {
            let mut membership = self.membership.lock().expect("not poisoned");
            match &previous {
                Some(previous) => membership.timestamp_after(created_at_ms, &previous.timestamp),
                None => membership.timestamp(created_at_ms),
            }
        };
        // Right before the record is written: other creations trust a row only this long.
        if self.env.now_ms().saturating_sub(started_at_ms) > BUCKET_INTENT_DEADLINE_MS {
            return Err(DataError::NotDurable(format!(
                "creating bucket {name} took longer than {BUCKET_INTENT_DEADLINE_MS} ms; retry"
            )));
        }
        let register = Lww::new(stamp, Record::Bucket(record.clone()));
        Ok((record, register))
    }

    /// A bucket record for an S3 request's access check: as read within
    /// [`REQUEST_CACHE_TTL_MS`] (`cached`), or read now. Writes must not act on a cached
    /// record (its versioning state or Object Lock may be a second old): they read again.
    pub async fn bucket_for_request(self: &Arc<Self>, name: &str) -> Result<Option<(BucketRecord, bool)>, DataError> {
        let now_ms = self.env.now_ms();
        let cached = cache_get(&self.request_cache.lock().expect("not poisoned").buckets, name, now_ms);
        if let Some(record) = cached {
            return Ok(Some((record, true)));
        }
        let record = self.bucket(name).await?;
        if let Some(record) = &record {
            cache_put(
                &mut self.request_cache.lock().expect("not poisoned").buckets,
                name,
                record.clone(),
                now_ms,
            );
        }
        Ok(record.map(|record| (record, false)))
    }

    /// An access key for an S3 request's signature check, cached like buckets.
    pub async fn access_key_for_request(self: &Arc<Self>, key_id: &str) -> Result<Option<AccessKeyRecord>, DataError> {
        let now_ms = self.env.now_ms();
        let cached = cache_get(
            &self.request_cache.lock().expect("not poisoned").access_keys,
            key_id,
            now_ms,
        );
        if cached.is_some() {
            return Ok(cached);
        }
        let record = self.access_key(key_id).await?;
        if let Some(record) = &record {
            cache_put(
                &mut self.request_cache.lock().expect("not poisoned").access_keys,
                key_id,
                record.clone(),
                now_ms,
            );
        }
        Ok(record)
    }

    /// Drops this gateway's cached record of a bucket it changes.
    pub(crate) fn forget_cached_bucket(&self, name: &str) {
        self.request_cache.lock().expect("not poisoned").buckets.remove(name);
    }

    pub async fn bucket(self: &Arc<Self>, name: &str) -> Result<Option<BucketRecord>, DataError> {
        validate_bucket_name(name)?;
        match self.meta_get(Table::Buckets, &bucket_row(name)).await? {
            Some(Lww {
                value: Some(Record::Bucket(bucket)),
                ..
            }) => Ok(Some(bucket)),
            _ => Ok(None),
        }
    }

    /// Stores an object read from `body`; returns its record once it is durable.
    pub async fn put_object<R: AsyncBufRead + Unpin + Send>(
        self: &Arc<Self>,
        write: ObjectWrite,
        mut body: R,
    ) -> Result<ObjectVersionRecord, DataError> {
        validate_key(&write.key)?;
        let keys = self.data_keys()?.clone();
        let bucket = match write.bucket_record.clone() {
            Some(record) if record.name == write.bucket => record,
            _ => self.existing_bucket(&write.bucket).await?,
        };
        let lock = self.lock_for_new_version(&bucket, write.lock)?;
        let slot = self.version_slot(&bucket, &write.key).await?;
        let version_id = slot.version_id.clone();
        let started_at_ms = self.env.now_ms();
        let mut md5 = Md5::new();

        // Small objects: read one byte past the inline limit to know which path to take.
        let inline_limit = bucket.inline_threshold_bytes as usize;
        let mut first = Vec::with_capacity(inline_limit + 1);
        fill(&mut body, &mut first, inline_limit + 1).await?;
        let (data, size_bytes) = if first.len() <= inline_limit {
            md5.update(&first);
            let binding = inline_binding(&write.bucket, &write.key, &version_id);
            let sealed = envelope::seal(&keys.inline_data, self.random_nonce(), &binding, &first);
            (ObjectData::Inline { sealed }, first.len() as u64)
        } else {
            let owner = StripeOwner::Object {
                bucket: write.bucket.clone(),
                key: write.key.clone(),
                version_id: version_id.clone(),
            };
            let (manifest, size_bytes) = self
                .write_stripes(&bucket, &owner, started_at_ms, &mut body, first, &mut md5)
                .await?;
            (ObjectData::Striped(manifest), size_bytes)
        };
        // The body has been read to its end (both paths stop only at end of stream), so
        // a trailing checksum is in. A mismatch leaves written stripes to garbage
        // collection, like any write that never commits.
        let checksums = write.body_check.run()?;
        self.check_write_deadline(started_at_ms)?;
        let record = ObjectVersionRecord {
            bucket: write.bucket.clone(),
            key: write.key.clone(),
            version_id,
            version_stamp: slot.stamp,
            created_at_ms: self.env.now_ms(),
            size_bytes,
            etag: format!("\"{}\"", hex::encode(md5.finalize())),
            content_type: write.content_type,
            headers: write.headers,
            user_metadata: write.user_metadata,
            checksums,
            data,
            lock,
            bucket_created_at_ms: bucket.created_at_ms,
            lock_changes: LockChanges::at(slot.stamp),
        };
        self.commit_version(&record).await?;
        Ok(record)
    }

    /// Reads the body stripe by stripe, with a bounded number of stripes in flight.
    async fn write_stripes<R: AsyncBufRead + Unpin + Send>(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        owner: &StripeOwner,
        started_at_ms: u64,
        body: &mut R,
        first: Vec<u8>,
        md5: &mut Md5,
    ) -> Result<(Manifest, u64), DataError> {
        let stripe_length = bucket.stripe_length_bytes as usize;
        let stripes_in_flight_max = units_within(PUT_BYTES_IN_FLIGHT_MAX, u64::from(bucket.stripe_length_bytes));
        let codec = bucket.codec;
        let mut in_flight: std::collections::VecDeque<oneshot::Receiver<Result<StripeRef, DataError>>> =
            std::collections::VecDeque::new();
        let mut stripes = Vec::new();
        let mut size_bytes = 0u64;
        let mut carry = first;
        loop {
            // Read behind room for the envelope's header: the stripe is sealed where it lies.
            let mut buffer = envelope::sealing_buffer(stripe_length);
            buffer.append(&mut carry);
            fill(body, &mut buffer, envelope::HEADER_LENGTH_BYTES + stripe_length).await?;
            let plaintext = &buffer[envelope::HEADER_LENGTH_BYTES..];
            if plaintext.is_empty() {
                break;
            }
            md5.update(plaintext);
            size_bytes += plaintext.len() as u64;
            let end_of_body = plaintext.len() < stripe_length;
            if in_flight.len() >= stripes_in_flight_max {
                stripes.push(Self::stripe_result(in_flight.pop_front().expect("non-empty")).await?);
            }
            let (sender, receiver) = oneshot::channel();
            let node = Arc::clone(self);
            let owner = owner.clone();
            self.env.spawn(
                "write-stripe",
                Box::pin(async move {
                    let _ = sender.send(node.write_stripe(codec, owner, started_at_ms, buffer).await);
                }),
            );
            in_flight.push_back(receiver);
            if end_of_body {
                break;
            }
        }
        while let Some(receiver) = in_flight.pop_front() {
            stripes.push(Self::stripe_result(receiver).await?);
        }
        // Key epoch 0 until key rotation exists; `write_stripe` seals under the same epoch.
        Ok((
            Manifest {
                codec,
                key_epoch: 0,
                stripes,
            },
            size_bytes,
        ))
    }

    /// A write must commit its owner record within the write deadline: garbage collection
    /// treats the stripes of older uncommitted writes as abandoned.
    fn check_write_deadline(&self, started_at_ms: u64) -> Result<(), DataError> {
        let elapsed_ms = self.env.now_ms().saturating_sub(started_at_ms);
        let deadline_ms = self.maintenance_config.write_deadline_ms;
        if elapsed_ms > deadline_ms {
            return Err(DataError::NotDurable(format!(
                "the write took {elapsed_ms} ms, longer than the {deadline_ms} ms write deadline"
            )));
        }
        Ok(())
    }

    async fn stripe_result(receiver: oneshot::Receiver<Result<StripeRef, DataError>>) -> Result<StripeRef, DataError> {
        receiver
            .await
            .unwrap_or_else(|_| Err(DataError::NotDurable("stripe writer stopped".into())))
    }

    fn zone_of(layout: &Layout, node: &NodeId) -> Option<ZoneName> {
        layout.get(node).map(|entry| entry.zone.clone())
    }

    /// Hashes, seals, encodes and stores one stripe durably: its plaintext is in
    /// `sealing_buffer` after room for the envelope's header ([`envelope::sealing_buffer`]).
    async fn write_stripe(
        self: Arc<Self>,
        codec: StripeCodec,
        owner: StripeOwner,
        started_at_ms: u64,
        sealing_buffer: Vec<u8>,
    ) -> Result<StripeRef, DataError> {
        let keys = self.data_keys()?;
        let nonce = self.random_nonce();
        let plaintext = &sealing_buffer[envelope::HEADER_LENGTH_BYTES..];
        let plaintext_length_bytes = plaintext.len() as u64;
        let stripe_id = StripeId::for_sealed_write(&keys.stripe_naming, &nonce, plaintext);
        let sealed = envelope::seal_in_place(
            &keys.stripe_data,
            nonce,
            &envelope::stripe_binding(&stripe_id),
            sealing_buffer,
        );
        let sealed_length_bytes = sealed.len() as u64;
        let shards = codec
            .encode(stripe_id, &sealed)
            .map_err(|error| DataError::NotDurable(error.to_string()))?;
        // Only the shards stay while they travel: a put's memory is its shards in flight.
        drop(sealed);
        let layout = self.layout();
        let (k, m) = (codec.data_shards, codec.parity_shards);
        let canonical = place(&layout, &stripe_id, k, m).map_err(|error| DataError::NotDurable(error.to_string()))?;
        // The stripe record goes first: no shard ever exists without a record naming its
        // owner, which is what lets garbage collection delete a shard whose record is gone.
        // Every write of this stripe (record, shards, holders) is sent only within the
        // write deadline: garbage collection may remove the stripe after it.
        self.check_write_deadline(started_at_ms)?;
        let mut stripe_record = StripeRecord {
            owner,
            codec,
            sealed_length_bytes,
            started_at_ms,
            holders: canonical.holders.clone(),
        };
        self.meta_put_fresh(
            Table::Stripes,
            &stripe_row(&stripe_id),
            Record::Stripe(stripe_record.clone()),
        )
        .await?;

        let attempts = shards.into_iter().map(|shard| {
            let node = Arc::clone(&self);
            let layout = layout.clone();
            async move { node.store_shard_with_fallback(&layout, shard, started_at_ms).await }
        });
        let results: Vec<Result<NodeId, String>> = futures::future::join_all(attempts).await;
        let failures: Vec<String> = results
            .iter()
            .enumerate()
            .filter_map(|(index, result)| result.as_ref().err().map(|reason| format!("shard {index}: {reason}")))
            .collect();
        let durable: Vec<(usize, NodeId)> = results
            .iter()
            .enumerate()
            .filter_map(|(index, result)| result.as_ref().ok().map(|node| (index, *node)))
            .collect();
        // Failed indexes are recorded at their canonical holder, where repair puts them.
        let holders: Vec<NodeId> = results
            .iter()
            .enumerate()
            .map(|(index, result)| *result.as_ref().unwrap_or(&canonical.holders[index]))
            .collect();
        let mut per_zone: BTreeMap<ZoneName, usize> = BTreeMap::new();
        let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (_, node) in &durable {
            if let Some(zone) = Self::zone_of(&layout, node) {
                *per_zone.entry(zone).or_default() += 1;
            }
            *per_node.entry(*node).or_default() += 1;
        }
        let zones_tolerated = failures_tolerated(per_zone.into_values().collect(), k);
        let nodes_tolerated = failures_tolerated(per_node.into_values().collect(), k);
        let zones_required = canonical.zone_failures_tolerated.min(1);
        let nodes_required = canonical.node_failures_tolerated.min(1);
        let enough =
            durable.len() >= usize::from(k) && zones_tolerated >= zones_required && nodes_tolerated >= nodes_required;
        if !enough {
            return Err(DataError::NotDurable(format!(
                "stripe {}: {} of {} shards stored, surviving {zones_tolerated} zone and {nodes_tolerated} node losses \
                 where {zones_required} and {nodes_required} are required ({})",
                stripe_id.short(),
                durable.len(),
                k + m,
                failures.join("; ")
            )));
        }
        if !failures.is_empty() {
            tracing::warn!(stripe = %stripe_id.short(), failures = %failures.join("; "), "stripe written degraded");
        }
        if holders != stripe_record.holders {
            // Some shards went to fallback nodes: say so, or repair would not find them.
            self.check_write_deadline(started_at_ms)?;
            stripe_record.holders = holders.clone();
            self.meta_put(
                Table::Stripes,
                &stripe_row(&stripe_id),
                Some(Record::Stripe(stripe_record)),
            )
            .await?;
        }
        Ok(StripeRef {
            stripe_id,
            plaintext_length_bytes,
            sealed_length_bytes,
            holders,
        })
    }

    /// Stores one shard on its placement holder, falling back to the next candidates
    /// (same zone first, by placement) when holders fail. Returns the node that has it.
    async fn store_shard_with_fallback(
        self: &Arc<Self>,
        layout: &Layout,
        shard: Shard,
        started_at_ms: u64,
    ) -> Result<NodeId, String> {
        let header = shard.header().clone();
        let index = usize::from(header.index);
        let now_ms = self.env.now_ms();
        let mut failed: BTreeSet<NodeId> = BTreeSet::new();
        let mut last_error = String::from("no attempt made");
        for _ in 0..SHARD_WRITE_ATTEMPTS_MAX {
            if let Err(error) = self.check_write_deadline(started_at_ms) {
                return Err(error.to_string());
            }
            let placement = {
                let membership = self.membership.lock().expect("not poisoned");
                place_with(
                    layout,
                    &header.stripe_id,
                    header.data_shards,
                    header.parity_shards,
                    |node| !failed.contains(node) && membership.liveness(node, now_ms) != Liveness::Down,
                )
            };
            let Ok(placement) = placement else { break };
            let target = placement.holders[index];
            match self.put_shard_on(target, &shard).await {
                Ok(()) => return Ok(target),
                Err(error) => {
                    last_error = format!("{}: {error}", target.short());
                    failed.insert(target);
                }
            }
        }
        Err(last_error)
    }

    /// Sends a shard request, given up as soon as this node sees `to` down: a peer that
    /// died mid-request (a QUIC connection has no FIN) must not hold a repair or a read
    /// for the whole shard timeout once the failure detector has spoken.
    pub(crate) async fn shard_request(
        &self,
        to: NodeId,
        request: Request,
        timeout_ms: u64,
    ) -> Result<Response, NetworkError> {
        let answer = self.env.request(to, request, timeout_ms);
        let down = async {
            loop {
                self.env.sleep(PEER_DOWN_POLL_MS).await;
                if self.liveness(&to) == Liveness::Down {
                    return;
                }
            }
        };
        futures::pin_mut!(down);
        match futures::future::select(answer, down).await {
            futures::future::Either::Left((answer, _)) => answer,
            futures::future::Either::Right(((), _)) => Err(NetworkError::Unreachable(
                to.short(),
                "reported down while the request was in flight".into(),
            )),
        }
    }

    pub(crate) async fn put_shard_on(&self, target: NodeId, shard: &Shard) -> Result<(), String> {
        if target == self.env.node_id() {
            return self
                .env
                .shard_store()
                .put(shard.clone())
                .await
                .map_err(|error| error.to_string());
        }
        let request = Request::PutShard {
            shard: shard.shared_bytes(),
        };
        match self.shard_request(target, request, SHARD_WRITE_TIMEOUT_MS).await {
            Ok(Response::ShardStored) => Ok(()),
            Ok(Response::Error { message, .. }) => Err(message),
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(error) => Err(error.to_string()),
        }
    }

    /// Storage side of PutShard / GetShard / DeleteShard.
    pub(crate) async fn serve_shard_request(&self, request: Request) -> Response {
        let store = self.env.shard_store();
        let store_error = |error: StoreError| match error {
            StoreError::NotFound => Response::error(RemoteErrorKind::NotFound, "no such shard"),
            StoreError::Corrupt(reason) => Response::error(RemoteErrorKind::Corrupt, reason),
            StoreError::DiskFull { .. } => Response::error(RemoteErrorKind::DiskFull, error.to_string()),
            StoreError::Io(reason) => Response::error(RemoteErrorKind::Internal, reason),
        };
        match request {
            // Made (and checksummed) by the sender; a shard damaged since is found by this
            // holder's reads, which verify, and repaired.
            Request::PutShard { shard } => match Shard::from_authenticated_transport(shard) {
                Ok(shard) => match store.put(shard).await {
                    Ok(()) => Response::ShardStored,
                    Err(error) => store_error(error),
                },
                Err(error) => Response::error(RemoteErrorKind::BadRequest, error.to_string()),
            },
            Request::GetShard { stripe_id, index } => match store.get(ShardKey { stripe_id, index }).await {
                // The store's buffer goes out as it is (a direct read's aligned buffer
                // would be copied to become a vector).
                Ok(shard) => Response::Shard {
                    shard: shard.shared_bytes(),
                },
                Err(error) => store_error(error),
            },
            Request::DeleteShard { stripe_id, index } => match store.delete(ShardKey { stripe_id, index }).await {
                Ok(_) => Response::Deleted,
                Err(error) => store_error(error),
            },
            _ => Response::error(RemoteErrorKind::BadRequest, "not a shard request"),
        }
    }

    pub(crate) async fn existing_bucket(self: &Arc<Self>, name: &str) -> Result<BucketRecord, DataError> {
        self.bucket(name)
            .await?
            .ok_or_else(|| DataError::NoSuchBucket(name.to_string()))
    }

    /// The current version of an object by bucket name (NoSuchKey for a delete marker).
    pub async fn head_object(self: &Arc<Self>, bucket: &str, key: &str) -> Result<ObjectVersionRecord, DataError> {
        let bucket = self.existing_bucket(bucket).await?;
        match self.object_version(&bucket, key, None).await? {
            record if record.is_delete_marker() => Err(DataError::NoSuchKey),
            record => Ok(record),
        }
    }

    /// Deletes an object by bucket name (see [`ClusterNode::delete_object_version`]);
    /// its shards are collected later.
    pub async fn delete_object(self: &Arc<Self>, bucket: &str, key: &str) -> Result<(), DataError> {
        let bucket = self.existing_bucket(bucket).await?;
        self.delete_object_version(&bucket, key, None, false).await?;
        Ok(())
    }

    /// Lists current objects of a bucket by name (see
    /// [`ClusterNode::list_current_objects`]).
    pub async fn list_objects(
        self: &Arc<Self>,
        bucket: &str,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ObjectListing, DataError> {
        let bucket = self.existing_bucket(bucket).await?;
        self.list_current_objects(&bucket, prefix, after, limit).await
    }

    /// Every bucket, in name order (up to [`BUCKETS_LISTED_MAX`]; more is an error, not
    /// a silently short list). Paged: deleted buckets' tombstones share the partition
    /// for the tombstone grace, so one page could end before the live buckets do.
    pub async fn list_buckets(self: &Arc<Self>) -> Result<Vec<BucketRecord>, DataError> {
        let mut buckets = Vec::new();
        self.meta_scan_pages(
            Table::Buckets,
            b"buckets",
            b"",
            BUCKETS_PAGE_ROWS,
            ReplicasRead::Quorum,
            |page| {
                buckets.extend(page.into_iter().filter_map(|(_, register)| match register.value {
                    Some(Record::Bucket(bucket)) => Some(bucket),
                    _ => None,
                }));
                match buckets.len() as u64 > BUCKETS_LISTED_MAX {
                    true => ControlFlow::Break(DataError::TooManyBuckets(BUCKETS_LISTED_MAX)),
                    false => ControlFlow::Continue(()),
                }
            },
        )
        .await?
        .map_or(Ok(buckets), Err)
    }

    /// Deletes a bucket if it holds nothing of its generation: no object version, delete
    /// marker or multipart upload (BucketNotEmpty otherwise).
    ///
    /// A write racing the deletion must either be seen by the emptiness check or fail,
    /// never be acknowledged into a bucket that then goes. Without a compare-and-set, the
    /// two sides each write first and read second: the deletion writes its own row (a
    /// [`BucketIntentRecord`]) and then checks that the bucket is empty; a write
    /// commits its version and then reads the bucket and its deletion rows
    /// ([`ClusterNode::commit_version`]). Quorums intersect, so at least one side sees
    /// the other: the deletion refuses, or the write waits for the deletion's outcome
    /// (and fails if the bucket went). Each deletion removes only its own row when it
    /// ends, so concurrent deletions cannot hide one another (a single mark in the bucket
    /// record could be cleared by one deletion while another was about to succeed).
    ///
    /// A deletion that cannot remove the bucket within [`BUCKET_INTENT_DEADLINE_MS`]
    /// of starting gives up, which is what lets writes treat an older row (one left by a
    /// crashed gateway) as expired.
    pub async fn delete_bucket(self: &Arc<Self>, name: &str) -> Result<(), DataError> {
        let bucket = self.existing_bucket(name).await?;
        self.delete_bucket_generation(&bucket).await
    }

    /// [`ClusterNode::delete_bucket`] of one generation of a bucket: the one a request's
    /// access check read (NoSuchBucket if it was deleted, or replaced, since).
    pub async fn delete_bucket_generation(self: &Arc<Self>, bucket: &BucketRecord) -> Result<(), DataError> {
        let owned = bucket.clone();
        self.run_bucket_request(
            "bucket-delete",
            &bucket.name,
            bucket_deletions_partition(&bucket.name),
            bucket.created_at_ms,
            move |node, _own_row, started_at_ms| async move {
                node.delete_announced_bucket(&owned, started_at_ms).await?;
                let tombstone = node.bucket_tombstone(&owned.name, owned.created_at_ms).await?;
                Ok(((), tombstone))
            },
        )
        .await
    }

    /// Writes a bucket's record (a creation's) or tombstone (a deletion's) to a quorum
    /// of its replicas. A write that reached fewer may still have landed on one, and
    /// anti-entropy would spread it later: a tombstone would take the bucket from under
    /// writes acknowledged once the deletion's row was withdrawn (simulator bucket-churn
    /// 33087), a record would replace a bucket another creation made meanwhile. So it is
    /// written again every [`BUCKET_REGISTER_RETRY_MS`] while the request's row
    /// (`intent`, held all along) holds writes and creations back, until it reaches a
    /// quorum. Past the request's deadline the caller is answered (through `answer`) with
    /// an error saying the request may still complete; attempts go on until half the
    /// clock-skew allowance past it, while the row still holds back writers whose
    /// clocks run less than that half ahead of this node's.
    async fn settle_bucket_register<T>(
        self: &Arc<Self>,
        name: &str,
        register: &Lww<Record>,
        intent: &BucketIntent<'_>,
        answer: &mut Option<oneshot::Sender<Result<T, DataError>>>,
    ) -> Result<(), DataError> {
        let deadline_ms = intent.started_at_ms.saturating_add(BUCKET_INTENT_DEADLINE_MS);
        let give_up_at_ms = deadline_ms.saturating_add(CLOCK_SKEW_ALLOWANCE_MS / 2);
        let mut attempt = 0u64;
        loop {
            attempt += 1;
            self.forget_cached_bucket(name);
            let written = self
                .meta_write_register(Table::Buckets, &bucket_row(name), register)
                .await;
            self.forget_cached_bucket(name);
            let error = match written {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
            let unsettled = || {
                DataError::NotDurable(format!(
                    "bucket {name}: its record reached too few replicas ({error}); the request may still \
                     complete"
                ))
            };
            let now_ms = self.env.now_ms();
            if now_ms >= deadline_ms {
                let _ = answer.take().map(|answer| answer.send(Err(unsettled())));
            }
            if now_ms >= give_up_at_ms {
                tracing::error!(bucket = name, attempts = attempt, %error, "a bucket record never reached a quorum; if it landed on a replica, anti-entropy may still spread it");
                return Err(unsettled());
            }
            tracing::warn!(bucket = name, attempt, %error, "a bucket record reached too few replicas; writing it again");
            self.env.sleep(BUCKET_REGISTER_RETRY_MS).await;
        }
    }

    /// Takes an intent slot and writes a creation's or deletion's own row in
    /// `partition` (see [`BucketIntentRecord`]): the row of this node and that slot,
    /// written over whatever an earlier request of the slot left there.
    pub(crate) async fn announce_bucket_intent(
        self: &Arc<Self>,
        partition: Vec<u8>,
        bucket_created_at_ms: u64,
    ) -> Result<BucketIntent<'_>, DataError> {
        let slot = {
            let mut slots = self.bucket_intent_slots.lock().expect("not poisoned");
            let free = (0..BUCKET_INTENT_SLOTS_MAX).find(|slot| !slots.contains_key(slot));
            let Some(slot) = free else {
                return Err(DataError::BucketRequestsBusy(BUCKET_INTENT_SLOTS_MAX));
            };
            slots.insert(slot, partition.clone());
            slot
        };
        let started_at_ms = self.env.now_ms();
        let intent = BucketIntent {
            row: RowKey::new(
                partition,
                intent_sort_key(self.env.node_id(), self.bucket_intent_incarnation, slot),
            ),
            started_at_ms,
            slots: &self.bucket_intent_slots,
            slot,
        };
        let record = BucketIntentRecord {
            bucket_created_at_ms,
            started_at_ms,
        };
        // Stamped above what the row holds (an earlier request's row or tombstone).
        self.meta_put(Table::Buckets, &intent.row, Some(Record::BucketIntent(record)))
            .await?;
        Ok(intent)
    }

    /// Whether `row` is this node's and not of a request in progress (of an earlier
    /// run, or of a slot not held for the row's partition): the row of an attempt that
    /// ended (a failed withdrawal, or a restart), which can create or delete nothing
    /// any more.
    fn is_dead_own_intent(&self, row: &RowKey) -> bool {
        let Some(rest) = row.sort_key.strip_prefix(self.env.node_id().as_bytes().as_slice()) else {
            return false;
        };
        let incarnation = self.bucket_intent_incarnation.to_be_bytes();
        let Some(slot) = rest
            .strip_prefix(incarnation.as_slice())
            .and_then(|slot| Some(u32::from_be_bytes(slot.try_into().ok()?)))
        else {
            return true;
        };
        let slots = self.bucket_intent_slots.lock().expect("not poisoned");
        slots.get(&slot) != Some(&row.partition_key)
    }

    /// Writes a deletion's own row.
    #[cfg(test)]
    pub(crate) async fn announce_bucket_deletion(
        self: &Arc<Self>,
        bucket: &BucketRecord,
    ) -> Result<BucketIntent<'_>, DataError> {
        self.announce_bucket_intent(bucket_deletions_partition(&bucket.name), bucket.created_at_ms)
            .await
    }

    /// The deletion proper, once announced: the emptiness checks, then grants and the
    /// bucket's record, within the deadline.
    async fn delete_announced_bucket(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        started_at_ms: u64,
    ) -> Result<(), DataError> {
        let name = bucket.name.as_str();
        if !self.bucket_is_empty(bucket).await? {
            return Err(DataError::BucketNotEmpty(format!("bucket {name} is not empty")));
        }
        // Uploads in progress count too: they could otherwise complete into the next
        // bucket of the name. Those an earlier bucket left behind do not (they can never
        // complete); a full page of them is taken as uploads in progress.
        let uploads = self
            .list_multipart_uploads(name, "", None, BUCKET_DELETION_UPLOADS_SCANNED_MAX)
            .await?;
        if uploads.uploads.iter().any(|upload| upload.belongs_to(bucket)) || uploads.next_after.is_some() {
            return Err(DataError::BucketNotEmpty(format!(
                "bucket {name} has multipart uploads in progress: complete or abort them first"
            )));
        }
        // Grants go before the record: a failure leaves the bucket for a retry rather
        // than grants behind (grants also name their generation, so a successor
        // ignores any left anyway).
        for (row, _) in self.grant_rows(name).await? {
            self.meta_put(Table::BucketGrants, &row, None).await?;
        }
        // Right before the bucket goes: writes trust a deletion row only this long.
        if self.env.now_ms().saturating_sub(started_at_ms) > BUCKET_INTENT_DEADLINE_MS {
            return Err(DataError::NotDurable(format!(
                "deleting bucket {name} took longer than {BUCKET_INTENT_DEADLINE_MS} ms; retry"
            )));
        }
        Ok(())
    }

    /// Whether a creation of bucket `name` may be in progress (a row of one is there).
    #[cfg(test)]
    pub(crate) async fn bucket_creation_in_progress(self: &Arc<Self>, name: &str) -> Result<bool, DataError> {
        let (intents, too_many) = self
            .bucket_intents_in_progress(bucket_creations_partition(name))
            .await?;
        Ok(too_many || !intents.is_empty())
    }

    /// Whether a deletion of generation `generation` of bucket `name` may be in progress:
    /// one of its rows has not expired, or there are too many rows to tell.
    pub(crate) async fn bucket_deletion_in_progress(
        self: &Arc<Self>,
        name: &str,
        generation: u64,
    ) -> Result<bool, DataError> {
        let (intents, too_many) = self
            .bucket_intents_in_progress(bucket_deletions_partition(name))
            .await?;
        Ok(too_many
            || intents
                .iter()
                .any(|(_, deletion)| deletion.bucket_created_at_ms == generation))
    }

    /// The rows of `partition` (one bucket's creations or deletions) whose request may
    /// still be in progress, and whether there were too many rows to tell.
    async fn bucket_intents_in_progress(
        self: &Arc<Self>,
        partition: Vec<u8>,
    ) -> Result<(Vec<(RowKey, BucketIntentRecord)>, bool), DataError> {
        let rows = self
            .meta_scan(Table::Buckets, &partition, b"", None, BUCKET_INTENTS_SCANNED_MAX)
            .await?;
        let too_many = rows.len() as u32 >= BUCKET_INTENTS_SCANNED_MAX;
        let now_ms = self.env.now_ms();
        let intents = rows
            .into_iter()
            .filter_map(|(row, register)| match register.value {
                Some(Record::BucketIntent(intent)) if intent.in_progress(now_ms) => Some((row, intent)),
                _ => None,
            })
            .collect();
        Ok((intents, too_many))
    }

    /// Tombstones a bucket's register, stamped above what it holds, only while it still
    /// holds generation `generation`: a bucket deleted and created again meanwhile is not
    /// overwritten (NoSuchBucket).
    /// Deletes generation `generation` of bucket `name` without the deletion's checks
    /// and retries: for tests of what a deletion racing a write leaves.
    #[cfg(test)]
    pub(crate) async fn tombstone_bucket_generation(
        self: &Arc<Self>,
        name: &str,
        generation: u64,
    ) -> Result<(), DataError> {
        let tombstone = self.bucket_tombstone(name, generation).await?;
        self.forget_cached_bucket(name);
        self.meta_write_register(Table::Buckets, &bucket_row(name), &tombstone)
            .await?;
        self.forget_cached_bucket(name);
        Ok(())
    }

    /// The tombstone that deletes generation `generation` of bucket `name`, stamped
    /// above its record (NoSuchBucket if that generation is not the bucket's now).
    async fn bucket_tombstone(self: &Arc<Self>, name: &str, generation: u64) -> Result<Lww<Record>, DataError> {
        let row = bucket_row(name);
        let current = self.meta_get(Table::Buckets, &row).await?;
        let Some(current) = current else {
            return Err(DataError::NoSuchBucket(name.to_string()));
        };
        if !matches!(&current.value, Some(Record::Bucket(bucket)) if bucket.created_at_ms == generation) {
            return Err(DataError::NoSuchBucket(name.to_string()));
        }
        Ok(Lww::tombstone(self.stamp_after(current.timestamp)))
    }

    /// Deletes a bucket's grants and record without checking anything: what a deletion
    /// racing a write would leave if it were not checked, for tests of what follows.
    #[cfg(test)]
    pub(crate) async fn delete_bucket_unchecked(self: &Arc<Self>, name: &str) -> Result<(), DataError> {
        validate_bucket_name(name)?;
        for (row, _) in self.grant_rows(name).await? {
            self.meta_put(Table::BucketGrants, &row, None).await?;
        }
        self.forget_cached_bucket(name);
        self.meta_put(Table::Buckets, &bucket_row(name), None).await?;
        self.forget_cached_bucket(name);
        Ok(())
    }

    /// Every grant row of `bucket` (one per access key ever granted, revoked ones as
    /// tombstones for the tombstone grace), paged: a single page could end before the
    /// live grants do.
    async fn grant_rows(self: &Arc<Self>, bucket: &str) -> Result<Vec<(RowKey, BucketGrant)>, DataError> {
        let mut grants = Vec::new();
        self.meta_scan_pages(
            Table::BucketGrants,
            bucket.as_bytes(),
            b"",
            GRANTS_PAGE_ROWS,
            ReplicasRead::Quorum,
            |page| {
                grants.extend(page.into_iter().filter_map(|(row, register)| match register.value {
                    Some(Record::BucketGrant(grant)) => Some((row, grant)),
                    _ => None,
                }));
                ControlFlow::<()>::Continue(())
            },
        )
        .await?;
        Ok(grants)
    }

    /// Gives `key_id` read and/or write rights on `bucket`, replacing what it had; both
    /// false takes every right away. The owner's rights cannot be changed.
    pub async fn grant_bucket(
        self: &Arc<Self>,
        bucket: &str,
        key_id: &str,
        read: bool,
        write: bool,
    ) -> Result<BucketGrant, DataError> {
        let bucket_record = self.existing_bucket(bucket).await?;
        if key_id == bucket_record.owner_key_id {
            return Err(DataError::OwnerRights(key_id.to_string()));
        }
        if self.access_key(key_id).await?.is_none() {
            return Err(DataError::NoSuchAccessKey(key_id.to_string()));
        }
        let grant = BucketGrant {
            read,
            write,
            bucket_created_at_ms: bucket_record.created_at_ms,
            granted_at_ms: self.env.now_ms(),
        };
        let value = (read || write).then_some(Record::BucketGrant(grant));
        self.meta_put(Table::BucketGrants, &grant_row(bucket, key_id), value)
            .await?;
        Ok(grant)
    }

    /// Every key's grant on `bucket` (not the owner's), in key id order.
    pub async fn bucket_grants(self: &Arc<Self>, bucket: &str) -> Result<Vec<(String, BucketGrant)>, DataError> {
        validate_bucket_name(bucket)?;
        Ok(self
            .grant_rows(bucket)
            .await?
            .into_iter()
            .map(|(row, grant)| (String::from_utf8_lossy(&row.sort_key).into_owned(), grant))
            .collect())
    }

    /// What `key_id` may do with `bucket`.
    pub async fn bucket_rights(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        key_id: &str,
    ) -> Result<BucketRights, DataError> {
        if bucket.owner_key_id == key_id {
            return Ok(BucketRights::OWNER);
        }
        if key_id.is_empty() || key_id.len() > ACCESS_KEY_ID_BYTES_MAX {
            return Ok(BucketRights::default());
        }
        match self
            .meta_get(Table::BucketGrants, &grant_row(&bucket.name, key_id))
            .await?
        {
            Some(Lww {
                value: Some(Record::BucketGrant(grant)),
                ..
            }) if grant.bucket_created_at_ms == bucket.created_at_ms => Ok(BucketRights {
                read: grant.read,
                write: grant.write,
                owner: false,
            }),
            _ => Ok(BucketRights::default()),
        }
    }

    fn random_text(&self, alphabet: &[u8], length: usize) -> String {
        (0..length)
            .map(|_| alphabet[(self.env.random_u64() % alphabet.len() as u64) as usize] as char)
            .collect()
    }

    /// Creates an S3 access key (id and secret) named `name`.
    pub async fn create_access_key(
        self: &Arc<Self>,
        name: &str,
        allow_create_bucket: bool,
    ) -> Result<AccessKeyRecord, DataError> {
        let record = AccessKeyRecord {
            key_id: format!("BDR{}", self.random_text(ACCESS_KEY_ALPHABET, 17)),
            name: name.to_string(),
            secret_key: self.random_text(SECRET_KEY_ALPHABET, 40),
            allow_create_bucket,
            created_at_ms: self.env.now_ms(),
        };
        self.meta_put(
            Table::AccessKeys,
            &access_key_row(&record.key_id),
            Some(Record::AccessKey(record.clone())),
        )
        .await?;
        Ok(record)
    }

    pub async fn access_key(self: &Arc<Self>, key_id: &str) -> Result<Option<AccessKeyRecord>, DataError> {
        if key_id.is_empty() || key_id.len() > ACCESS_KEY_ID_BYTES_MAX {
            return Ok(None);
        }
        match self.meta_get(Table::AccessKeys, &access_key_row(key_id)).await? {
            Some(Lww {
                value: Some(Record::AccessKey(record)),
                ..
            }) => Ok(Some(record)),
            _ => Ok(None),
        }
    }

    /// Streams `range` of an object's bytes, verified, with up to [`READ_AHEAD_BYTES_MAX`]
    /// of stripes read ahead.
    pub fn read_object(
        self: &Arc<Self>,
        record: ObjectVersionRecord,
        range: Range<u64>,
    ) -> Result<impl Stream<Item = Result<Vec<u8>, DataError>> + Send + 'static, DataError> {
        if range.start > range.end || range.end > record.size_bytes {
            return Err(DataError::InvalidRange {
                start: range.start,
                end: range.end,
                size: record.size_bytes,
            });
        }
        let keys = self.data_keys()?.clone();
        // Pieces to produce: (stripe to read, or the inline object) and the slice of it.
        let mut pieces: Vec<(Option<StripeRef>, Range<usize>)> = Vec::new();
        let mut codec = None;
        match &record.data {
            ObjectData::Inline { .. } => pieces.push((None, range.start as usize..range.end as usize)),
            ObjectData::Striped(manifest) => {
                codec = Some(manifest.codec);
                let mut offset = 0u64;
                for stripe in &manifest.stripes {
                    let stripe_range = offset..offset + stripe.plaintext_length_bytes;
                    offset = stripe_range.end;
                    let start = range.start.max(stripe_range.start);
                    let end = range.end.min(stripe_range.end);
                    if start < end {
                        let slice = (start - stripe_range.start) as usize..(end - stripe_range.start) as usize;
                        pieces.push((Some(stripe.clone()), slice));
                    }
                }
            }
            ObjectData::DeleteMarker => return Err(DataError::NoSuchKey),
        }
        let stripe_length_bytes_max = pieces
            .iter()
            .filter_map(|(stripe, _)| stripe.as_ref().map(|stripe| stripe.plaintext_length_bytes))
            .max()
            .unwrap_or(1);
        let read_ahead = units_within(READ_AHEAD_BYTES_MAX, stripe_length_bytes_max);
        let node = Arc::clone(self);
        let record = Arc::new(record);
        let fetch = move |piece: (Option<StripeRef>, Range<usize>)| {
            let (node, keys, record) = (Arc::clone(&node), keys.clone(), Arc::clone(&record));
            let (sender, receiver) = oneshot::channel();
            let env = Arc::clone(node.env());
            env.spawn(
                "read-stripe",
                Box::pin(async move {
                    let bytes = match (&piece.0, &record.data, codec) {
                        (None, ObjectData::Inline { sealed }, _) => {
                            let binding = inline_binding(&record.bucket, &record.key, &record.version_id);
                            envelope::open(&keys.inline_data, &binding, sealed)
                                .map_err(|error| DataError::Corrupt(error.to_string()))
                        }
                        (Some(stripe), _, Some(codec)) => node.read_stripe(&keys, codec, stripe).await,
                        _ => Err(DataError::Corrupt("manifest and piece disagree".into())),
                    };
                    let sliced = bytes.and_then(|mut bytes| {
                        if piece.1.end > bytes.len() {
                            return Err(DataError::Corrupt("stripe shorter than its manifest says".into()));
                        }
                        // A whole stripe (the usual case) is handed on without a copy.
                        bytes.truncate(piece.1.end);
                        if piece.1.start > 0 {
                            bytes.drain(..piece.1.start);
                        }
                        Ok(bytes)
                    });
                    let _ = sender.send(sliced);
                }),
            );
            receiver
        };
        // Stripes fetched ahead of the reader, in order: each stripe is a few round trips,
        // so several overlap; the bound keeps a read's memory at READ_AHEAD_BYTES_MAX.
        let mut pieces = pieces.into_iter();
        let started: std::collections::VecDeque<_> = pieces.by_ref().take(read_ahead).map(&fetch).collect();
        let state = (started, pieces, fetch);
        Ok(futures::stream::unfold(
            state,
            |(mut started, mut pieces, fetch)| async move {
                let current = started.pop_front()?;
                if let Some(piece) = pieces.next() {
                    started.push_back(fetch(piece));
                }
                let result = current
                    .await
                    .unwrap_or_else(|_| Err(DataError::Corrupt("stripe reader stopped".into())));
                Some((result, (started, pieces, fetch)))
            },
        ))
    }

    /// Where shard `index` of `stripe` may be, best first: where it was written, where
    /// placement puts it now, and where placement puts it with down nodes excluded.
    fn shard_candidates(&self, layout: &Layout, codec: StripeCodec, stripe: &StripeRef) -> Vec<Vec<NodeId>> {
        let (k, m) = (codec.data_shards, codec.parity_shards);
        let canonical = place(layout, &stripe.stripe_id, k, m).ok();
        let available = self.placement_without_down(layout, &stripe.stripe_id, k, m, canonical.as_ref());
        (0..usize::from(k + m))
            .map(|index| {
                let mut candidates = Vec::new();
                let sources = [
                    stripe.holders.get(index).copied(),
                    canonical.as_ref().map(|placement| placement.holders[index]),
                    available.as_ref().map(|placement| placement.holders[index]),
                ];
                for node in sources.into_iter().flatten() {
                    if !candidates.contains(&node) {
                        candidates.push(node);
                    }
                }
                candidates
            })
            .collect()
    }

    pub(crate) async fn fetch_shard(
        &self,
        node: NodeId,
        stripe_id: StripeId,
        index: u8,
        check: ChecksumCheck,
    ) -> Result<Shard, FetchError> {
        if node == self.env.node_id() {
            return match self.env.shard_store().get(ShardKey { stripe_id, index }).await {
                Ok(shard) => Ok(shard),
                Err(StoreError::Corrupt(reason)) => Err(FetchError::Corrupt(reason)),
                Err(error) => Err(FetchError::Unavailable(error.to_string())),
            };
        }
        match self
            .shard_request(node, Request::GetShard { stripe_id, index }, SHARD_READ_TIMEOUT_MS)
            .await
        {
            // A shard found damaged after its holder's check is as bad as one damaged on disk.
            Ok(Response::Shard { shard }) => {
                Shard::parse(shard, check).map_err(|error| FetchError::Corrupt(error.to_string()))
            }
            Ok(Response::Error {
                kind: RemoteErrorKind::Corrupt,
                message,
            }) => Err(FetchError::Corrupt(message)),
            Ok(Response::Error { kind, message }) => Err(FetchError::Unavailable(format!("{kind:?}: {message}"))),
            Ok(other) => Err(FetchError::Unavailable(format!("unexpected answer {other:?}"))),
            Err(error) => Err(FetchError::Unavailable(error.to_string())),
        }
    }

    /// Reads one stripe from any k shards, nearest first, and checks it end to end (its
    /// AEAD and its id). Shards from other nodes are taken as their holders verified them
    /// (see [`Shard::from_authenticated_transport`]); should the stripe then fail its
    /// check, it is read again with every shard's checksum verified, which finds and goes
    /// around a shard damaged after its holder's check.
    async fn read_stripe(&self, keys: &DataKeys, codec: StripeCodec, stripe: &StripeRef) -> Result<Vec<u8>, DataError> {
        let shards = self.gather_shards(codec, stripe, ChecksumCheck::TrustTransport).await?;
        match Self::open_stripe(keys, codec, stripe, &shards) {
            Ok(plaintext) => Ok(plaintext),
            Err(error) => {
                tracing::warn!(stripe = %stripe.stripe_id.short(), %error, "stripe failed its end-to-end check; reading it again with every shard verified");
                drop(shards);
                // Should the second pass fail too, its error says what the first found.
                let with_first = |second: DataError| match second {
                    DataError::StripeUnreadable { stripe, reason } => DataError::StripeUnreadable {
                        stripe,
                        reason: format!("{reason}; before that: {error}"),
                    },
                    other => other,
                };
                let shards = self
                    .gather_shards(codec, stripe, ChecksumCheck::Verify)
                    .await
                    .map_err(with_first)?;
                Self::open_stripe(keys, codec, stripe, &shards)
            }
        }
    }

    /// Any k shards of a stripe, nearest first, hedged around slow holders.
    async fn gather_shards(
        &self,
        codec: StripeCodec,
        stripe: &StripeRef,
        check: ChecksumCheck,
    ) -> Result<Vec<Shard>, DataError> {
        let layout = self.layout();
        let me = self.env.node_id();
        let my_zone = Self::zone_of(&layout, &me);
        let candidates = self.shard_candidates(&layout, codec, stripe);
        let rank = |node: &NodeId| -> u8 {
            let liveness = self.liveness(node);
            match () {
                _ if *node == me => 0,
                _ if liveness == Liveness::Down => 3,
                _ if Self::zone_of(&layout, node) == my_zone => 1,
                _ => 2,
            }
        };
        // Attempts in order: indexes by their best candidate's rank (data shards first on
        // ties: decoding from data shards alone is a copy), then the other candidates.
        let mut order: Vec<(u8, u8, usize, NodeId)> = Vec::new();
        for (index, nodes) in candidates.iter().enumerate() {
            for (position, node) in nodes.iter().enumerate() {
                order.push((rank(node), position as u8, index, *node));
            }
        }
        order.sort_by_key(|(rank, position, index, _)| (*position, *rank, *index));
        let mut queue: std::collections::VecDeque<(usize, NodeId)> =
            order.into_iter().map(|(_, _, index, node)| (index, node)).collect();

        let needed = usize::from(codec.data_shards);
        // Extra fetches started because the ones in flight were slow, at most m.
        let (mut hedges, hedges_max) = (0usize, usize::from(codec.parity_shards));
        let mut obtained: BTreeMap<usize, Shard> = BTreeMap::new();
        let mut pending_indexes: BTreeSet<usize> = BTreeSet::new();
        // Candidates for an index that was being fetched elsewhere when their turn came:
        // they come back if that fetch fails (after a move, the recorded holder may no
        // longer have the shard that its new holder has).
        let mut waiting_behind: Vec<(usize, NodeId)> = Vec::new();
        let mut in_flight = FuturesUnordered::new();
        let mut errors = Vec::new();
        loop {
            while obtained.len() + in_flight.len() < needed + hedges {
                let Some((index, node)) = queue.pop_front() else { break };
                if obtained.contains_key(&index) {
                    continue;
                }
                if pending_indexes.contains(&index) {
                    waiting_behind.push((index, node));
                    continue;
                }
                pending_indexes.insert(index);
                let stripe_id = stripe.stripe_id;
                in_flight
                    .push(async move { (index, node, self.fetch_shard(node, stripe_id, index as u8, check).await) });
            }
            let arrived = {
                let next = in_flight.next();
                let hedge = self.env.sleep(SHARD_READ_HEDGE_AFTER_MS);
                match futures::future::select(next, hedge).await {
                    futures::future::Either::Left((arrived, _)) => Some(arrived),
                    futures::future::Either::Right(((), _)) => None,
                }
            };
            let Some(arrived) = arrived else {
                // Nothing came for a while: ask one more holder, keeping the slow ones.
                hedges = (hedges + 1).min(hedges_max);
                continue;
            };
            let Some((index, node, result)) = arrived else {
                break;
            };
            pending_indexes.remove(&index);
            let failed = !matches!(&result, Ok(shard)
                if shard.header().stripe_id == stripe.stripe_id
                    && usize::from(shard.header().index) == index
                    && shard.header().codec == codec.codec);
            if failed {
                // The index's other candidates go next, in their order.
                let (retry, still_waiting): (Vec<_>, Vec<_>) =
                    waiting_behind.drain(..).partition(|(waiting, _)| *waiting == index);
                waiting_behind = still_waiting;
                for candidate in retry.into_iter().rev() {
                    queue.push_front(candidate);
                }
            }
            match result {
                Ok(shard) if !failed => {
                    obtained.insert(index, shard);
                    if obtained.len() >= needed {
                        break;
                    }
                }
                Ok(_) => errors.push(format!("{}: shard {index} is not the one asked for", node.short())),
                Err(FetchError::Corrupt(reason)) => {
                    // Found by the holder's read (which quarantined it, for the stripe's
                    // maintainer to rebuild) or, on a verified re-read, by this reader.
                    tracing::warn!(stripe = %stripe.stripe_id.short(), index, node = %node.short(), %reason, "corrupt shard skipped");
                    errors.push(format!("{} shard {index} corrupt: {reason}", node.short()));
                }
                Err(FetchError::Unavailable(reason)) => {
                    errors.push(format!("{} shard {index}: {reason}", node.short()))
                }
            }
        }
        if obtained.len() < needed {
            return Err(DataError::StripeUnreadable {
                stripe: stripe.stripe_id.to_string(),
                reason: format!(
                    "{} of {needed} shards available ({})",
                    obtained.len(),
                    errors.join("; ")
                ),
            });
        }
        Ok(obtained.into_values().collect())
    }

    /// Decodes, opens and checks a stripe from k of its shards.
    fn open_stripe(
        keys: &DataKeys,
        codec: StripeCodec,
        stripe: &StripeRef,
        shards: &[Shard],
    ) -> Result<Vec<u8>, DataError> {
        let sealed = codec
            .decode(stripe.stripe_id, shards)
            .map_err(|error| DataError::StripeUnreadable {
                stripe: stripe.stripe_id.to_string(),
                reason: error.to_string(),
            })?;
        let nonce = envelope::sealed_nonce(&sealed)
            .map_err(|error| DataError::Corrupt(format!("stripe {}: {error}", stripe.stripe_id.short())))?;
        let plaintext = envelope::open_owned(&keys.stripe_data, &envelope::stripe_binding(&stripe.stripe_id), sealed)
            .map_err(|error| DataError::Corrupt(format!("stripe {}: {error}", stripe.stripe_id.short())))?;
        if StripeId::for_sealed_write(&keys.stripe_naming, &nonce, &plaintext) != stripe.stripe_id
            || plaintext.len() as u64 != stripe.plaintext_length_bytes
        {
            return Err(DataError::Corrupt(format!(
                "stripe {} does not match its id",
                stripe.stripe_id.short()
            )));
        }
        Ok(plaintext)
    }
}

impl<E: Env> ClusterNode<E> {
    /// Starts a multipart upload; returns its id.
    pub async fn create_multipart_upload(self: &Arc<Self>, write: ObjectWrite) -> Result<String, DataError> {
        validate_key(&write.key)?;
        self.data_keys()?;
        let bucket = self.existing_bucket(&write.bucket).await?;
        // Checked now (a lock on a bucket without Object Lock fails here, not at the
        // end); the default retention is applied when the upload completes.
        self.lock_for_new_version(&bucket, write.lock)?;
        let upload_id = format!("{:016x}{:016x}", self.env.random_u64(), self.env.random_u64());
        let record = MultipartUploadRecord {
            bucket: write.bucket.clone(),
            key: write.key.clone(),
            upload_id: upload_id.clone(),
            created_at_ms: self.env.now_ms(),
            content_type: write.content_type,
            headers: write.headers,
            user_metadata: write.user_metadata,
            lock: write.lock,
            checksum_algorithm: write.checksum_algorithm,
            bucket_created_at_ms: bucket.created_at_ms,
        };
        self.meta_put(
            Table::MultipartUploads,
            &upload_row(&write.bucket, &write.key, &upload_id),
            Some(Record::MultipartUpload(record)),
        )
        .await?;
        Ok(upload_id)
    }

    /// Uploads in progress in `bucket` whose keys start with `prefix`, in (key, upload id)
    /// order, strictly after the row `after` (a key, and optionally the upload id within
    /// it: without one, every upload of that key is skipped). At most `limit` rows are
    /// scanned; `next_after` says where a truncated scan goes on.
    pub async fn list_multipart_uploads(
        self: &Arc<Self>,
        bucket: &str,
        prefix: &str,
        after: Option<(&str, Option<&str>)>,
        limit: u32,
    ) -> Result<UploadListing, DataError> {
        let after_sort_key = after.map(|(key, upload_id)| marker_sort_key(key, upload_id));
        let rows = self
            .meta_scan(
                Table::MultipartUploads,
                bucket.as_bytes(),
                prefix.as_bytes(),
                after_sort_key.as_deref(),
                limit,
            )
            .await?;
        let full_page = rows.len() as u32 >= limit;
        let next_after = full_page
            .then(|| rows.last())
            .flatten()
            .and_then(|(row, _)| split_marker_sort_key(&row.sort_key));
        let uploads = rows
            .into_iter()
            .filter_map(|(_, register)| match register.value {
                Some(Record::MultipartUpload(record)) => Some(record),
                _ => None,
            })
            .collect();
        Ok(UploadListing { uploads, next_after })
    }

    async fn multipart_upload(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<MultipartUploadRecord, DataError> {
        if upload_id.is_empty() || upload_id.len() > 128 {
            return Err(DataError::NoSuchUpload);
        }
        match self
            .meta_get(Table::MultipartUploads, &upload_row(bucket, key, upload_id))
            .await?
        {
            Some(Lww {
                value: Some(Record::MultipartUpload(record)),
                ..
            }) => Ok(record),
            _ => Err(DataError::NoSuchUpload),
        }
    }

    /// Stores one part (always striped, never inline: parts are concatenated later).
    pub async fn upload_part<R: AsyncBufRead + Unpin + Send>(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        upload_id: &str,
        part_number: u32,
        mut body: R,
        body_check: BodyCheck,
    ) -> Result<MultipartPartRecord, DataError> {
        if part_number == 0 || part_number > PART_NUMBER_MAX {
            return Err(DataError::InvalidPart(format!(
                "part number must be 1..={PART_NUMBER_MAX}"
            )));
        }
        self.data_keys()?;
        let bucket_record = self.existing_bucket(bucket).await?;
        if !self
            .multipart_upload(bucket, key, upload_id)
            .await?
            .belongs_to(&bucket_record)
        {
            return Err(DataError::NoSuchUpload);
        }
        let started_at_ms = self.env.now_ms();
        let owner = StripeOwner::Part {
            bucket: bucket.to_string(),
            key: key.to_string(),
            upload_id: upload_id.to_string(),
            part_number,
        };
        let mut md5 = Md5::new();
        let (manifest, size_bytes) = self
            .write_stripes(&bucket_record, &owner, started_at_ms, &mut body, Vec::new(), &mut md5)
            .await?;
        // Stored: the object's composite checksum is made of its parts'.
        let checksums = body_check.run()?;
        self.check_write_deadline(started_at_ms)?;
        let record = MultipartPartRecord {
            upload_id: upload_id.to_string(),
            part_number,
            size_bytes,
            etag: format!("\"{}\"", hex::encode(md5.finalize())),
            checksums,
            data: ObjectData::Striped(manifest),
        };
        self.meta_put(
            Table::MultipartParts,
            &part_row(upload_id, part_number),
            Some(Record::MultipartPart(record.clone())),
        )
        .await?;
        Ok(record)
    }

    /// The parts uploaded so far, by part number.
    pub async fn list_parts(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<MultipartPartRecord>, DataError> {
        self.multipart_upload(bucket, key, upload_id).await?;
        let rows = self.live_part_rows(upload_id).await?;
        Ok(rows
            .into_iter()
            .filter_map(|(_, record)| match record {
                Record::MultipartPart(part) => Some(part),
                _ => None,
            })
            .collect())
    }

    /// The live (not tombstoned) rows of an upload's parts table, read from a quorum.
    pub(crate) async fn live_part_rows(self: &Arc<Self>, upload_id: &str) -> Result<Vec<(RowKey, Record)>, MetaError> {
        let mut rows = Vec::new();
        self.meta_scan_pages(
            Table::MultipartParts,
            upload_id.as_bytes(),
            b"",
            bdr_protocol::wire::SCAN_ROWS_MAX,
            ReplicasRead::Quorum,
            |page| {
                rows.extend(
                    page.into_iter()
                        .filter_map(|(row, register)| register.value.map(|record| (row, record))),
                );
                ControlFlow::<()>::Continue(())
            },
        )
        .await?;
        Ok(rows)
    }

    /// Assembles the listed parts into the object and ends the upload.
    pub async fn complete_multipart_upload(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        upload_id: &str,
        listed: &[(u32, String)],
    ) -> Result<ObjectVersionRecord, DataError> {
        self.complete_multipart_upload_with(bucket, key, upload_id, listed, &|_, _| None)
            .await
    }

    /// Completes an upload; when it declared a checksum algorithm and every listed part
    /// carries that checksum, the object gets `combine`'s composite of them.
    pub async fn complete_multipart_upload_with(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        upload_id: &str,
        listed: &[(u32, String)],
        combine: &ChecksumCombine,
    ) -> Result<ObjectVersionRecord, DataError> {
        let bucket_record = self.existing_bucket(bucket).await?;
        let upload = self.multipart_upload(bucket, key, upload_id).await?;
        // Started in an earlier bucket of this name (deleted while it was being started).
        if !upload.belongs_to(&bucket_record) {
            return Err(DataError::NoSuchUpload);
        }
        if listed.is_empty() {
            return Err(DataError::InvalidPart("no parts listed".into()));
        }
        if listed.windows(2).any(|pair| pair[0].0 >= pair[1].0) {
            return Err(DataError::InvalidPartOrder);
        }
        let stored: BTreeMap<u32, MultipartPartRecord> = self
            .list_parts(bucket, key, upload_id)
            .await?
            .into_iter()
            .map(|part| (part.part_number, part))
            .collect();
        let mut stripes = Vec::new();
        let mut codec = None;
        let mut size_bytes = 0u64;
        let mut md5_of_md5s = Md5::new();
        let mut part_checksums: Option<Vec<String>> = upload.checksum_algorithm.map(|_| Vec::new());
        for (position, (part_number, etag)) in listed.iter().enumerate() {
            let part = stored
                .get(part_number)
                .ok_or_else(|| DataError::InvalidPart(format!("part {part_number} was not uploaded")))?;
            if part.etag.trim_matches('"') != etag.trim_matches('"') {
                return Err(DataError::InvalidPart(format!("part {part_number} has another ETag")));
            }
            let last = position + 1 == listed.len();
            let size_bytes_min = self.part_bytes_min.load(Ordering::Relaxed);
            if !last && part.size_bytes < size_bytes_min {
                return Err(DataError::EntityTooSmall {
                    part_number: *part_number,
                    size_bytes: part.size_bytes,
                    size_bytes_min,
                });
            }
            let ObjectData::Striped(manifest) = &part.data else {
                return Err(DataError::Corrupt(format!("part {part_number} is not striped")));
            };
            if *codec.get_or_insert(manifest.codec) != manifest.codec {
                return Err(DataError::Corrupt("parts use different erasure codes".into()));
            }
            stripes.extend(manifest.stripes.iter().cloned());
            size_bytes += part.size_bytes;
            md5_of_md5s.update(hex::decode(part.etag.trim_matches('"')).unwrap_or_default());
            // One part without the upload's checksum: no composite for the object.
            let part_checksum = upload
                .checksum_algorithm
                .and_then(|algorithm| part.checksums.get(&algorithm).cloned());
            match (part_checksum, part_checksums.as_mut()) {
                (Some(checksum), Some(checksums)) => checksums.push(checksum),
                _ => part_checksums = None,
            }
        }
        let checksums: Checksums = upload
            .checksum_algorithm
            .zip(part_checksums)
            .and_then(|(algorithm, parts)| combine(algorithm, &parts).map(|value| (algorithm, value)))
            .into_iter()
            .collect();
        let lock = self.lock_for_new_version(&bucket_record, upload.lock)?;
        let slot = self.version_slot(&bucket_record, key).await?;
        let record = ObjectVersionRecord {
            bucket: bucket.to_string(),
            key: key.to_string(),
            version_id: slot.version_id,
            version_stamp: slot.stamp,
            created_at_ms: self.env.now_ms(),
            size_bytes,
            etag: format!("\"{}-{}\"", hex::encode(md5_of_md5s.finalize()), listed.len()),
            content_type: upload.content_type,
            headers: upload.headers,
            user_metadata: upload.user_metadata,
            checksums,
            data: ObjectData::Striped(Manifest {
                codec: codec.expect("at least one part"),
                key_epoch: 0,
                stripes,
            }),
            lock,
            bucket_created_at_ms: bucket_record.created_at_ms,
            lock_changes: LockChanges::at(slot.stamp),
        };
        self.commit_version(&record).await?;
        // The upload is over; its part records and unlisted parts' shards are garbage.
        self.meta_put(Table::MultipartUploads, &upload_row(bucket, key, upload_id), None)
            .await?;
        self.forget_parts(upload_id);
        Ok(record)
    }

    /// Tombstones the part records of an upload that is over (completed or aborted: its
    /// row is a tombstone already, so no part can be listed or completed any more), in
    /// a task of its own: an upload may have up to [`PART_NUMBER_MAX`] parts, and one
    /// quorum read and write each, even [`PART_RECORDS_FORGOTTEN_IN_FLIGHT_MAX`] at a
    /// time, is no wait to put before the answer. Best effort: a row left by a failure
    /// here (or a part that lands after it) only takes space; its shards are collected
    /// either way, since a part without its upload references nothing. Before, every
    /// part record stayed forever: a daily multipart backup grew the metadata without
    /// bound.
    fn forget_parts(self: &Arc<Self>, upload_id: &str) {
        let node = Arc::clone(self);
        let upload_id = upload_id.to_string();
        self.env.spawn(
            "forget-parts",
            Box::pin(async move {
                let rows = match node.live_part_rows(&upload_id).await {
                    Ok(rows) => rows,
                    Err(error) => {
                        tracing::warn!(upload = upload_id, %error, "cannot list the parts of a finished upload; their records stay");
                        return;
                    }
                };
                futures::stream::iter(rows)
                    .for_each_concurrent(PART_RECORDS_FORGOTTEN_IN_FLIGHT_MAX, |(row, _)| {
                        let node = Arc::clone(&node);
                        let upload_id = upload_id.as_str();
                        async move {
                            if let Err(error) = node.meta_put(Table::MultipartParts, &row, None).await {
                                tracing::warn!(upload = upload_id, %error, "cannot remove a part record of a finished upload");
                            }
                        }
                    })
                    .await;
            }),
        );
    }

    pub async fn abort_multipart_upload(
        self: &Arc<Self>,
        bucket: &str,
        key: &str,
        upload_id: &str,
    ) -> Result<(), DataError> {
        self.multipart_upload(bucket, key, upload_id).await?;
        self.meta_put(Table::MultipartUploads, &upload_row(bucket, key, upload_id), None)
            .await?;
        self.forget_parts(upload_id);
        Ok(())
    }
}
