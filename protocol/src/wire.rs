//! Node-to-node wire messages: serde + postcard, versioned, size-bounded.
//!
//! A frame on the wire is `[length u32 LE][body]` where the body is a postcard-encoded
//! [`RequestFrame`] or [`ResponseFrame`], each starting with the wire version. The length
//! prefix is checked against [`FRAME_BYTES_MAX`] before any allocation, and decoding
//! arbitrary bytes returns an error, never a panic (property-tested).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::admission::AdmissionProof;
use crate::erasure::STRIPE_LENGTH_BYTES_MAX;
use crate::ids::{NodeId, StripeId};
use crate::layout::Layout;

/// Version of the request/response schema below. Bump on any incompatible change.
pub const WIRE_VERSION: u16 = 5;
/// The libp2p stream protocol name; carries the major wire version. A stream carries
/// `Admit` first, then one request after another, each answered before the next.
pub const RPC_PROTOCOL_NAME: &str = "/bdr/rpc-stream/5";
/// Largest frame body: one shard of the largest stripe (k = 1) plus headers and slack.
pub const FRAME_BYTES_MAX: u64 = STRIPE_LENGTH_BYTES_MAX + 64 * 1024;
/// Longest error message carried in a response.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 1024;

/// The metadata tables. Each is one sled tree on every node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Table {
    Buckets,
    BucketGrants,
    AccessKeys,
    Objects,
    MultipartUploads,
    MultipartParts,
    Stripes,
}

impl Table {
    pub const ALL: [Table; 7] = [
        Table::Buckets,
        Table::BucketGrants,
        Table::AccessKeys,
        Table::Objects,
        Table::MultipartUploads,
        Table::MultipartParts,
        Table::Stripes,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Table::Buckets => "buckets",
            Table::BucketGrants => "bucket_grants",
            Table::AccessKeys => "access_keys",
            Table::Objects => "objects",
            Table::MultipartUploads => "multipart_uploads",
            Table::MultipartParts => "multipart_parts",
            Table::Stripes => "stripes",
        }
    }
}

/// Heartbeats one gossip message may carry (one per layout node).
pub const LAYOUT_HEARTBEATS_MAX: usize = crate::layout::LAYOUT_NODES_MAX;
/// Addresses one peer may announce, and the longest one: bounds a gossip message.
pub const ADDRESSES_PER_PEER_MAX: usize = 8;
pub const ADDRESS_LENGTH_BYTES_MAX: usize = 256;

/// A node's liveness beacon, spread by gossip. A node bumps `sequence` every gossip
/// round; `generation` grows on every restart, so (generation, sequence) only ever grows.
/// A node whose beacon stops advancing for `down_after` is down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerHeartbeat {
    #[serde(with = "byte_string_32")]
    pub node: NodeId,
    pub generation: u64,
    pub sequence: u64,
    pub used_bytes: u64,
    /// Where the node listens (multiaddrs as text; opaque to the cluster logic).
    pub addresses: Vec<String>,
    /// The digest of the layout the node uses (see [`crate::layout::Layout::digest`]):
    /// a new metadata replica waits until every live node uses the new layout.
    #[serde(with = "byte_string_32")]
    pub layout_digest: [u8; 32],
    /// The layout digest under which the node holds a complete copy of every metadata
    /// partition it replicates (all zeros until then): a former replica drops its copy
    /// once every new replica reports this.
    #[serde(with = "byte_string_32")]
    pub metadata_synced_digest: [u8; 32],
}

impl PeerHeartbeat {
    /// Whether the announced addresses stay within the bounds.
    pub fn is_well_formed(&self) -> bool {
        self.addresses.len() <= ADDRESSES_PER_PEER_MAX
            && self
                .addresses
                .iter()
                .all(|address| address.len() <= ADDRESS_LENGTH_BYTES_MAX)
    }
}

/// A 32-byte value in a gossip message as one byte string (a one-byte length, then the
/// bytes) instead of the derived form, postcard's fixed-size tuple, which is encoded and
/// decoded one byte at a time: every gossip round carries three such values per node,
/// and their encoding and decoding were a sixth of the simulator's instructions.
/// Persisted records keep the derived form (changing it would change every record).
mod byte_string_32 {
    use serde::{de, Deserializer, Serializer};
    use std::fmt;

    use crate::ids::NodeId;

    pub trait Bytes32: Sized {
        fn bytes(&self) -> &[u8; 32];
        fn from_bytes(bytes: [u8; 32]) -> Self;
    }

    impl Bytes32 for [u8; 32] {
        fn bytes(&self) -> &[u8; 32] {
            self
        }
        fn from_bytes(bytes: [u8; 32]) -> Self {
            bytes
        }
    }

    impl Bytes32 for NodeId {
        fn bytes(&self) -> &[u8; 32] {
            self.as_bytes()
        }
        fn from_bytes(bytes: [u8; 32]) -> Self {
            NodeId(bytes)
        }
    }

    pub fn serialize<T: Bytes32, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(value.bytes())
    }

    pub fn deserialize<'de, T: Bytes32, D: Deserializer<'de>>(deserializer: D) -> Result<T, D::Error> {
        deserializer.deserialize_bytes(Visitor).map(T::from_bytes)
    }

    struct Visitor;

    impl<'de> de::Visitor<'de> for Visitor {
        type Value = [u8; 32];

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("32 bytes")
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<[u8; 32], E> {
            bytes.try_into().map_err(|_| E::invalid_length(bytes.len(), &self))
        }

        // Self-describing formats (JSON) hand byte strings over as sequences.
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut sequence: A) -> Result<[u8; 32], A::Error> {
            let mut bytes = [0u8; 32];
            for (index, byte) in bytes.iter_mut().enumerate() {
                *byte = sequence
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(index, &self))?;
            }
            if sequence.next_element::<u8>()?.is_some() {
                return Err(de::Error::invalid_length(33, &self));
            }
            Ok(bytes)
        }
    }
}

/// Serde for a frame's large byte fields (shards). Decoded by [`decode_request_shared`] or
/// [`decode_response_shared`], such a field becomes a slice of the frame's own buffer
/// instead of a copy of a megabyte out of it (the copy was 2-3% of a node's CPU in large
/// GETs and PUTs); decoded any other way, it is copied. Encoded as plain bytes, exactly
/// as a `serde_bytes` vector.
pub mod frame_bytes {
    use std::cell::RefCell;

    use bytes::Bytes;
    use serde::{de, Deserializer, Serializer};

    thread_local! {
        /// The frame being decoded on this thread, if it is shared (postcard decodes
        /// synchronously, so nothing else runs on the thread meanwhile).
        static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    }

    /// Runs `decode` with `frame` as the buffer its byte fields may share.
    pub(super) fn sharing<T>(frame: &Bytes, decode: impl FnOnce() -> T) -> T {
        /// Forgets the frame however `decode` ends, so no buffer outlives its decode here.
        struct Forget;
        impl Drop for Forget {
            fn drop(&mut self) {
                FRAME.with(|slot| slot.borrow_mut().take());
            }
        }
        FRAME.with(|slot| *slot.borrow_mut() = Some(frame.clone()));
        let _forget = Forget;
        decode()
    }

    pub fn serialize<S: Serializer>(bytes: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        deserializer.deserialize_bytes(Visitor)
    }

    struct Visitor;

    impl<'de> de::Visitor<'de> for Visitor {
        type Value = Bytes;

        fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
            formatter.write_str("bytes")
        }

        fn visit_borrowed_bytes<E: de::Error>(self, bytes: &'de [u8]) -> Result<Bytes, E> {
            let shared = FRAME.with(|slot| {
                let slot = slot.borrow();
                let frame = slot.as_ref()?;
                let (start, end) = (frame.as_ptr() as usize, frame.as_ptr() as usize + frame.len());
                let within = start <= bytes.as_ptr() as usize && bytes.as_ptr() as usize + bytes.len() <= end;
                within.then(|| frame.slice_ref(bytes))
            });
            Ok(shared.unwrap_or_else(|| Bytes::copy_from_slice(bytes)))
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(bytes))
        }

        fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(bytes))
        }

        // Self-describing formats (JSON) hand byte strings over as sequences.
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut sequence: A) -> Result<Bytes, A::Error> {
            let mut bytes = Vec::with_capacity(sequence.size_hint().unwrap_or(0).min(4096));
            while let Some(byte) = sequence.next_element::<u8>()? {
                bytes.push(byte);
            }
            Ok(Bytes::from(bytes))
        }
    }
}

/// The layout part of a gossip message: always the sender's digest, and the whole layout
/// when the sender believes the receiver's digest differs (the receiver's last heartbeat
/// said so, or the sender has none). A receiver that finds the digest different from its
/// own answers with its whole layout, so a belief gone stale costs one round, not
/// convergence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GossipLayout {
    #[serde(with = "byte_string_32")]
    pub digest: [u8; 32],
    pub layout: Option<Layout>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Sent first on every new stream. Until it is verified, the peer gets no answer.
    Admit {
        proof: AdmissionProof,
    },
    /// Push-pull gossip: the sender's layout digest and heartbeats; the answer is the
    /// receiver's after merging. The whole layout travels only where the digests may
    /// differ (see [`GossipLayout`]): it grows with the cluster, and resending it every
    /// round cost most of the gossip's bytes and CPU.
    Gossip {
        layout: GossipLayout,
        heartbeats: Vec<PeerHeartbeat>,
    },
    /// Stores a shard (its [`crate::erasure::Shard::as_bytes`] form). Answered only after
    /// fsync. Shared bytes, so a sender keeps its shard for a retry without a copy, and a
    /// receiver keeps the frame's buffer (see [`frame_bytes`]); encoded as bytes exactly as
    /// a `serde_bytes` vector was.
    PutShard {
        #[serde(with = "frame_bytes")]
        shard: Bytes,
    },
    GetShard {
        stripe_id: StripeId,
        index: u8,
    },
    DeleteShard {
        stripe_id: StripeId,
        index: u8,
    },
    /// Merges a stored value (see [`crate::records::encode_stored_value`]) into a table.
    /// Metadata requests carry the coordinator's layout digest: a replica whose layout
    /// differs refuses with [`RemoteErrorKind::LayoutMismatch`], so no write lands under a
    /// replica set that a newer layout has replaced.
    MetaMerge {
        layout_digest: [u8; 32],
        table: Table,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    MetaGet {
        layout_digest: [u8; 32],
        table: Table,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Anti-entropy, first step: one root hash per listed partition (at most
    /// [`crate::records::METADATA_PARTITIONS`]), so a round costs one request per peer.
    /// `roots` holds the asker's own roots of those partitions (one each), or none (a
    /// handover, which only reads): a replica that finds a root equal to its own skips
    /// comparing with the asker while neither changes; one that finds it different
    /// compares with the asker on its next round.
    MetaPartitionRoots {
        partitions: Vec<u32>,
        roots: Vec<[u8; 32]>,
    },
    /// Anti-entropy: hashes of the rows of one metadata partition, per table and bucket.
    MetaDigest {
        partition: u32,
    },
    /// Anti-entropy: rows of one digest bucket, in key order, after `after`.
    MetaBucketRows {
        table: Table,
        partition: u32,
        bucket: u8,
        #[serde(with = "serde_bytes")]
        after: Option<Vec<u8>>,
        limit: u32,
    },
    /// Up to `limit` rows (at most [`SCAN_ROWS_MAX`]) whose keys start with `prefix`,
    /// after `after` if given, in key order.
    MetaScan {
        layout_digest: [u8; 32],
        table: Table,
        #[serde(with = "serde_bytes")]
        prefix: Vec<u8>,
        #[serde(with = "serde_bytes")]
        after: Option<Vec<u8>>,
        limit: u32,
    },
    /// Which of these shards the node holds (a directory lookup; contents are verified
    /// by scrub, not here). At most [`HAS_SHARDS_KEYS_MAX`] keys.
    HasShards {
        keys: Vec<ShardRef>,
    },
    /// The node's repair, scrub and GC progress (answered with `Maintenance`).
    MaintenanceReport,
    /// Changes the node's maintenance (answered with `Maintenance`).
    MaintenanceControl {
        command: MaintenanceCommand,
    },
}

/// Keys one HasShards request may carry.
pub const HAS_SHARDS_KEYS_MAX: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ShardRef {
    pub stripe_id: StripeId,
    pub index: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaintenanceCommand {
    /// Resume repair and start a pass now.
    RepairStart,
    /// Stop repairing (surveys, scrub and GC go on) until RepairStart.
    RepairPause,
    /// Start a scrub pass now.
    ScrubStart,
    /// Start a repair pass now without changing pause (a paused pass only surveys).
    SurveyNow,
}

/// Stripes by remaining redundancy, as seen by the nodes that maintain them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StripeHealth {
    pub total: u64,
    /// All k+m shards present where placement wants them.
    pub healthy: u64,
    /// All k+m shards exist but some are not yet where placement wants them.
    pub misplaced: u64,
    /// Some shards missing, at least k+1 left.
    pub degraded: u64,
    /// Exactly k left: one more loss and the stripe is gone.
    pub at_risk: u64,
    /// Fewer than k left: unreadable until a lost holder returns.
    pub lost: u64,
    /// Not surveyed (holders unreachable to ask), counted apart rather than guessed.
    pub unknown: u64,
}

impl StripeHealth {
    pub fn add(&mut self, other: &StripeHealth) {
        self.total += other.total;
        self.healthy += other.healthy;
        self.misplaced += other.misplaced;
        self.degraded += other.degraded;
        self.at_risk += other.at_risk;
        self.lost += other.lost;
        self.unknown += other.unknown;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceReport {
    /// Health of the stripes this node maintains, from its last complete survey.
    pub stripes: StripeHealth,
    pub repair_paused: bool,
    pub repair_queued_stripes: u64,
    /// Shard bytes the queued stripes still need written.
    pub repair_queued_bytes: u64,
    pub repaired_stripes_total: u64,
    pub repaired_bytes_total: u64,
    /// Shards copied to a new holder after a layout change.
    pub moved_shards_total: u64,
    pub repair_bytes_per_s: u64,
    pub repair_passes_completed: u64,
    pub repair_pass_in_progress: bool,
    /// Node clock when the last full repair pass ended (0: none yet).
    pub repair_last_pass_completed_at_ms: u64,
    pub scrub_shards_checked: u64,
    pub scrub_shards_total: u64,
    pub scrub_corrupt_found_total: u64,
    pub scrub_passes_completed: u64,
    pub scrub_last_pass_completed_at_ms: u64,
    /// Shards deleted as garbage or after they moved.
    pub gc_deleted_shards_total: u64,
    pub gc_deleted_stripe_records_total: u64,
    pub shards_stored: u64,
    pub used_bytes: u64,
}

/// Rows one scan answer may carry.
pub const SCAN_ROWS_MAX: u32 = 1000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaRow {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Buckets per table in a partition digest: a two-level hash tree (root and buckets).
pub const DIGEST_BUCKETS: usize = 16;

/// The bucket hashes of one table's rows in one partition; a row falls in bucket
/// `blake3(key)[0] >> 4`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableDigest {
    pub table: Table,
    pub buckets: Vec<[u8; 32]>,
}

/// Error kinds a peer reports; the message is for humans and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteErrorKind {
    NotFound,
    Corrupt,
    DiskFull,
    BadRequest,
    Unavailable,
    Internal,
    /// The replica uses another layout than the coordinator: exchange gossip and retry.
    LayoutMismatch,
    /// The replica took over this metadata partition in a layout change and has not yet
    /// pulled it from the other holders, so its answer could miss acknowledged writes.
    NotReady,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Admitted {
        proof: AdmissionProof,
    },
    Gossip {
        layout: GossipLayout,
        heartbeats: Vec<PeerHeartbeat>,
    },
    ShardStored,
    /// A shard's [`crate::erasure::Shard::as_bytes`] form: shared with the holder's store
    /// read when sent, with the frame's buffer when received (see [`frame_bytes`]);
    /// encoded as bytes exactly as the `serde_bytes` vector it was.
    Shard {
        #[serde(with = "frame_bytes")]
        shard: Bytes,
    },
    Deleted,
    MetaMerged,
    MetaValue {
        #[serde(with = "serde_bytes")]
        value: Option<Vec<u8>>,
    },
    MetaRows {
        rows: Vec<MetaRow>,
    },
    MetaDigest {
        tables: Vec<TableDigest>,
    },
    MetaPartitionRoots {
        roots: Vec<[u8; 32]>,
    },
    HasShards {
        present: Vec<bool>,
    },
    Maintenance(MaintenanceReport),
    Error {
        kind: RemoteErrorKind,
        message: String,
    },
}

impl Response {
    /// An error response with the message cut to [`ERROR_MESSAGE_BYTES_MAX`].
    pub fn error(kind: RemoteErrorKind, message: impl Into<String>) -> Response {
        let mut message = message.into();
        if message.len() > ERROR_MESSAGE_BYTES_MAX {
            let mut cut = ERROR_MESSAGE_BYTES_MAX;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Response::Error { kind, message }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestFrame {
    pub version: u16,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResponseFrame {
    pub version: u16,
    pub response: Response,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {length_bytes} bytes exceeds the {FRAME_BYTES_MAX}-byte maximum")]
    FrameTooLarge { length_bytes: u64 },
    #[error("peer speaks wire version {0}, we speak {WIRE_VERSION}")]
    UnsupportedVersion(u16),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

fn check_length(length_bytes: u64) -> Result<(), WireError> {
    if length_bytes > FRAME_BYTES_MAX {
        return Err(WireError::FrameTooLarge { length_bytes });
    }
    Ok(())
}

/// Reads the version first, so a peer on another version gets a clear error rather than
/// a confusing decode failure of a schema it does not share.
fn decode_versioned<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, WireError> {
    check_length(body.len() as u64)?;
    let (version, _) =
        postcard::take_from_bytes::<u16>(body).map_err(|error| WireError::Malformed(error.to_string()))?;
    if version != WIRE_VERSION {
        return Err(WireError::UnsupportedVersion(version));
    }
    postcard::from_bytes(body).map_err(|error| WireError::Malformed(error.to_string()))
}

/// Room reserved for a frame beyond its known large parts (version, tags, small fields).
const FRAME_OVERHEAD_BYTES: usize = 256;
/// Bytes reserved per heartbeat of a gossip message (an id, two digests, counters and
/// an address or two).
const HEARTBEAT_ENCODED_BYTES_ESTIMATE: usize = 192;

/// A postcard output that starts with room for the whole frame: postcard's own `Vec`
/// output starts empty and doubles, which copied a megabyte shard about twice over
/// and reallocated a gossip message ten times (a twentieth of the simulator's time).
struct ReservedVec(Vec<u8>);

impl postcard::ser_flavors::Flavor for ReservedVec {
    type Output = Vec<u8>;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Vec<u8>> {
        Ok(self.0)
    }
}

fn encode_bounded<T: Serialize>(frame: &T, size_bytes_estimate: usize) -> Result<Vec<u8>, WireError> {
    let reserved_bytes = size_bytes_estimate.saturating_add(FRAME_OVERHEAD_BYTES);
    let output = ReservedVec(Vec::with_capacity(reserved_bytes.min(FRAME_BYTES_MAX as usize)));
    let body =
        postcard::serialize_with_flavor(frame, output).map_err(|error| WireError::Malformed(error.to_string()))?;
    check_length(body.len() as u64)?;
    Ok(body)
}

/// A frame body in two parts, `head` then `tail`: the tail is a shard's bytes, shared
/// with the message instead of copied into the body (that copy was 2.3% of a node's CPU
/// in large PUTs). Their concatenation is exactly what [`encode_request`] or
/// [`encode_response`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameParts {
    pub head: Vec<u8>,
    pub tail: Bytes,
}

impl FrameParts {
    pub fn length_bytes(&self) -> u64 {
        (self.head.len() + self.tail.len()) as u64
    }

    /// The body in one buffer (copies the tail).
    pub fn concatenated(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(self.head.len() + self.tail.len());
        body.extend_from_slice(&self.head);
        body.extend_from_slice(&self.tail);
        body
    }
}

/// Shards shorter than this are copied into the head (a second write costs more), and
/// frames shorter than this are decoded by copying.
const FRAME_TAIL_BYTES_MIN: usize = 4096;

/// A postcard output that writes everything into a head, except one given shard's
/// bytes, which it keeps as the tail when they are the last thing written (postcard
/// hands a byte string's bytes over in one piece, after its length).
struct SplitOutput {
    head: Vec<u8>,
    shard: Option<Bytes>,
    tail: Option<Bytes>,
}

impl SplitOutput {
    /// Anything written after the tail means it was not the last: it joins the head.
    fn settle_tail(&mut self) {
        if let Some(tail) = self.tail.take() {
            self.head.extend_from_slice(&tail);
        }
    }
}

impl postcard::ser_flavors::Flavor for SplitOutput {
    type Output = FrameParts;

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.settle_tail();
        self.head.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.settle_tail();
        let is_shard = self
            .shard
            .as_ref()
            .is_some_and(|shard| shard.as_ptr() == data.as_ptr() && shard.len() == data.len());
        match self.shard.take_if(|_| is_shard) {
            Some(shard) => self.tail = Some(shard),
            None => self.head.extend_from_slice(data),
        }
        Ok(())
    }

    fn finalize(self) -> postcard::Result<FrameParts> {
        Ok(FrameParts {
            head: self.head,
            tail: self.tail.unwrap_or_default(),
        })
    }
}

/// `frame` in two parts, `shard`'s bytes as the tail when long enough.
fn encode_parts<T: Serialize>(frame: &T, shard: &Bytes) -> Result<FrameParts, WireError> {
    let output = SplitOutput {
        head: Vec::with_capacity(FRAME_OVERHEAD_BYTES),
        shard: Some(shard.clone()).filter(|shard| shard.len() >= FRAME_TAIL_BYTES_MIN),
        tail: None,
    };
    let parts =
        postcard::serialize_with_flavor(frame, output).map_err(|error| WireError::Malformed(error.to_string()))?;
    check_length(parts.length_bytes())?;
    Ok(parts)
}

/// A frame encoded whole, as parts with no tail.
fn whole(body: Vec<u8>) -> FrameParts {
    FrameParts {
        head: body,
        tail: Bytes::new(),
    }
}

/// [`encode_request`] in two parts, a shard's bytes shared rather than copied.
pub fn encode_request_parts(request: &Request) -> Result<FrameParts, WireError> {
    match request {
        Request::PutShard { shard } => encode_parts(
            &FrameRef {
                version: WIRE_VERSION,
                payload: request,
            },
            shard,
        ),
        _ => encode_request(request).map(whole),
    }
}

/// [`encode_response`] in two parts, a shard's bytes shared rather than copied.
pub fn encode_response_parts(response: &Response) -> Result<FrameParts, WireError> {
    match response {
        Response::Shard { shard } => encode_parts(
            &FrameRef {
                version: WIRE_VERSION,
                payload: response,
            },
            shard,
        ),
        _ => encode_response(response).map(whole),
    }
}

/// The bytes of a request's large parts (the rest fits [`FRAME_OVERHEAD_BYTES`] or
/// grows as needed).
fn request_size_bytes_estimate(request: &Request) -> usize {
    match request {
        Request::PutShard { shard } => shard.len(),
        Request::Gossip { heartbeats, .. } => heartbeats.len() * HEARTBEAT_ENCODED_BYTES_ESTIMATE,
        Request::MetaMerge { key, value, .. } => key.len() + value.len(),
        _ => 0,
    }
}

fn response_size_bytes_estimate(response: &Response) -> usize {
    match response {
        Response::Shard { shard } => shard.len(),
        Response::Gossip { heartbeats, .. } => heartbeats.len() * HEARTBEAT_ENCODED_BYTES_ESTIMATE,
        Response::MetaValue { value } => value.as_ref().map_or(0, Vec::len),
        // The rows' length prefixes are left out: an estimate a little short costs one
        // growth of the buffer, never a wrong frame.
        Response::MetaRows { rows } => rows.iter().map(|row| row.key.len() + row.value.len()).sum(),
        _ => 0,
    }
}

/// [`RequestFrame`] and [`ResponseFrame`] borrowing their payload: serde writes a
/// reference exactly as the value, so encoding a megabyte shard does not clone it first.
#[derive(Serialize)]
struct FrameRef<'a, T> {
    version: u16,
    payload: &'a T,
}

pub fn encode_request(request: &Request) -> Result<Vec<u8>, WireError> {
    encode_bounded(
        &FrameRef {
            version: WIRE_VERSION,
            payload: request,
        },
        request_size_bytes_estimate(request),
    )
}

pub fn decode_request(body: &[u8]) -> Result<Request, WireError> {
    decode_versioned::<RequestFrame>(body).map(|frame| frame.request)
}

/// [`decode_request`] of a frame that its shard may share (see [`frame_bytes`]).
pub fn decode_request_shared(body: &Bytes) -> Result<Request, WireError> {
    // A frame too short to hold a shard worth sharing is decoded by copying: sharing
    // costs the buffer a reference count, which a metadata message does not repay.
    match body.len() < FRAME_TAIL_BYTES_MIN {
        true => decode_request(body),
        false => frame_bytes::sharing(body, || decode_request(body)),
    }
}

pub fn encode_response(response: &Response) -> Result<Vec<u8>, WireError> {
    encode_bounded(
        &FrameRef {
            version: WIRE_VERSION,
            payload: response,
        },
        response_size_bytes_estimate(response),
    )
}

pub fn decode_response(body: &[u8]) -> Result<Response, WireError> {
    decode_versioned::<ResponseFrame>(body).map(|frame| frame.response)
}

/// [`decode_response`] of a frame that its shard may share (see [`frame_bytes`]).
pub fn decode_response_shared(body: &Bytes) -> Result<Response, WireError> {
    match body.len() < FRAME_TAIL_BYTES_MIN {
        true => decode_response(body),
        false => frame_bytes::sharing(body, || decode_response(body)),
    }
}

/// Checks a frame's length prefix before the body is read or allocated.
pub fn check_frame_length(length_prefix: [u8; 4]) -> Result<u32, WireError> {
    let length_bytes = u32::from_le_bytes(length_prefix);
    check_length(u64::from(length_bytes))?;
    Ok(length_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::ClusterSecret;
    use proptest::prelude::*;

    fn sample_heartbeat() -> PeerHeartbeat {
        PeerHeartbeat {
            node: NodeId([3; 32]),
            generation: 1,
            sequence: 2,
            used_bytes: 12,
            addresses: vec!["/ip4/127.0.0.1/tcp/1".into()],
            layout_digest: [6; 32],
            metadata_synced_digest: [0; 32],
        }
    }

    fn sample_requests() -> Vec<Request> {
        let heartbeat = sample_heartbeat();
        vec![
            Request::Admit {
                proof: ClusterSecret::from_bytes([1; 32]).prove(NodeId([1; 32]), NodeId([2; 32])),
            },
            Request::Gossip {
                layout: GossipLayout {
                    digest: Layout::new().digest(),
                    layout: Some(Layout::new()),
                },
                heartbeats: vec![heartbeat.clone()],
            },
            Request::Gossip {
                layout: GossipLayout {
                    digest: [9; 32],
                    layout: None,
                },
                heartbeats: vec![heartbeat],
            },
            Request::PutShard {
                shard: vec![1, 2, 3].into(),
            },
            Request::GetShard {
                stripe_id: StripeId([4; 32]),
                index: 5,
            },
            Request::MetaMerge {
                layout_digest: [7; 32],
                table: Table::Objects,
                key: b"bucket/key".to_vec(),
                value: vec![0; 10],
            },
        ]
    }

    /// Gossip's 32-byte values travel as byte strings of exactly 32 bytes: one byte
    /// short or long is an error, never a padded or truncated digest.
    #[test]
    fn gossip_digests_are_byte_strings_of_exactly_32_bytes() {
        #[derive(Serialize)]
        struct Forged<'a> {
            #[serde(with = "serde_bytes")]
            digest: &'a [u8],
            layout: Option<Layout>,
        }
        let digest = [5u8; 32];
        let encoded = postcard::to_allocvec(&GossipLayout { digest, layout: None }).unwrap();
        assert_eq!(encoded.len(), 1 + 32 + 1, "length, bytes, no layout");
        let decoded: GossipLayout = postcard::from_bytes(&encoded).unwrap();
        assert_eq!(decoded.digest, digest);
        for length in [0usize, 31, 33] {
            let forged = postcard::to_allocvec(&Forged {
                digest: &vec![5u8; length],
                layout: None,
            })
            .unwrap();
            assert!(
                postcard::from_bytes::<GossipLayout>(&forged).is_err(),
                "{length} bytes accepted"
            );
        }
        // A self-describing format hands byte strings over as sequences.
        let heartbeat = sample_heartbeat();
        let json = serde_json::to_string(&heartbeat).unwrap();
        assert_eq!(serde_json::from_str::<PeerHeartbeat>(&json).unwrap(), heartbeat);
    }

    fn sample_responses() -> Vec<Response> {
        vec![
            Response::ShardStored,
            Response::MetaValue { value: None },
            Response::MetaValue { value: Some(vec![1]) },
            Response::Shard {
                shard: vec![7; 3000].into(),
            },
            Response::MetaRows {
                rows: vec![MetaRow {
                    key: vec![1, 2],
                    value: vec![3; 40],
                }],
            },
            Response::error(RemoteErrorKind::DiskFull, "no space"),
        ]
    }

    #[test]
    fn requests_and_responses_round_trip() {
        for request in sample_requests() {
            let encoded = encode_request(&request).unwrap();
            assert_eq!(decode_request(&encoded).unwrap(), request);
            // The borrowing encoder writes exactly the owned frame's bytes.
            let owned = RequestFrame {
                version: WIRE_VERSION,
                request: request.clone(),
            };
            assert_eq!(encoded, postcard::to_allocvec(&owned).unwrap());
        }
        for response in sample_responses() {
            let encoded = encode_response(&response).unwrap();
            assert_eq!(decode_response(&encoded).unwrap(), response);
            let owned = ResponseFrame {
                version: WIRE_VERSION,
                response: response.clone(),
            };
            assert_eq!(encoded, postcard::to_allocvec(&owned).unwrap());
        }
    }

    #[test]
    fn other_versions_and_oversized_frames_are_refused_clearly() {
        let mut body = encode_request(&Request::GetShard {
            stripe_id: StripeId([0; 32]),
            index: 0,
        })
        .unwrap();
        // The previous version (whole layouts in every gossip) and the next are refused.
        for other_version in [WIRE_VERSION - 1, WIRE_VERSION + 1] {
            body[0] = other_version as u8;
            assert_eq!(decode_request(&body), Err(WireError::UnsupportedVersion(other_version)));
        }
        assert!(matches!(
            check_frame_length(u32::MAX.to_le_bytes()),
            Err(WireError::FrameTooLarge { .. })
        ));
        let huge = Request::PutShard {
            shard: vec![0; FRAME_BYTES_MAX as usize + 1].into(),
        };
        assert!(matches!(encode_request(&huge), Err(WireError::FrameTooLarge { .. })));
    }

    /// PutShard's shared bytes encode exactly as the `serde_bytes` vector they replaced
    /// (so the change needed no wire version), and decode back.
    #[test]
    fn a_put_shard_encodes_its_bytes_as_a_serde_bytes_vector_did() {
        #[derive(Serialize)]
        struct VectorForm {
            #[serde(with = "serde_bytes")]
            shard: Vec<u8>,
        }
        for length in [0usize, 1, 127, 128, 70_000] {
            let shard: Vec<u8> = (0..length).map(|index| (index * 7) as u8).collect();
            let request = Request::PutShard {
                shard: shard.clone().into(),
            };
            let encoded = postcard::to_allocvec(&request).unwrap();
            let vector_form = postcard::to_allocvec(&VectorForm { shard: shard.clone() }).unwrap();
            // One byte of variant index, then the same bytes.
            assert_eq!(encoded.len(), vector_form.len() + 1, "length {length}");
            assert_eq!(&encoded[1..], &vector_form[..], "length {length}");
            let Request::PutShard { shard: decoded } = decode_request(&encode_request(&request).unwrap()).unwrap()
            else {
                panic!("not a PutShard");
            };
            assert_eq!(decoded, shard);
        }
    }

    /// A shard decoded from a shared frame is a slice of that frame (no copy); decoded
    /// from a plain slice, or after its frame was decoded, it is a copy with the same bytes.
    #[test]
    fn shards_decoded_from_a_shared_frame_share_its_buffer() {
        let shard: Vec<u8> = (0..70_000u32).map(|index| (index * 13) as u8).collect();
        let within = |frame: &Bytes, bytes: &Bytes| {
            let start = frame.as_ptr() as usize;
            (start..start + frame.len()).contains(&(bytes.as_ptr() as usize))
        };
        let request = Bytes::from(
            encode_request(&Request::PutShard {
                shard: shard.clone().into(),
            })
            .unwrap(),
        );
        let Request::PutShard { shard: shared } = decode_request_shared(&request).unwrap() else {
            panic!("not a PutShard");
        };
        assert_eq!(shared, shard);
        assert!(
            within(&request, &shared),
            "the request's shard is not a slice of its frame"
        );
        let response = Bytes::from(
            encode_response(&Response::Shard {
                shard: shard.clone().into(),
            })
            .unwrap(),
        );
        let Response::Shard { shard: shared } = decode_response_shared(&response).unwrap() else {
            panic!("not a Shard");
        };
        assert_eq!(shared, shard);
        assert!(
            within(&response, &shared),
            "the response's shard is not a slice of its frame"
        );
        // The frame is forgotten after its decode: a later plain decode copies.
        let Response::Shard { shard: copied } = decode_response(&response).unwrap() else {
            panic!("not a Shard");
        };
        assert_eq!(copied, shard);
        assert!(!within(&response, &copied), "a plain decode shared a frame");
        // A frame that fails to decode is forgotten too.
        assert!(decode_response_shared(&response.slice(..response.len() - 1)).is_err());
        let Response::Shard { shard: copied } = decode_response(&response).unwrap() else {
            panic!("not a Shard");
        };
        assert!(
            !within(&response, &copied),
            "a failed shared decode left its frame behind"
        );
    }

    /// Frames encoded in parts are the frames encoded whole, for every kind of message and
    /// shards of every length around the tail's minimum; a shard's bytes become the tail
    /// (shared, not copied) from that minimum on.
    #[test]
    fn frames_encoded_in_parts_concatenate_to_the_whole_frame() {
        for request in sample_requests() {
            let parts = encode_request_parts(&request).unwrap();
            assert_eq!(parts.concatenated(), encode_request(&request).unwrap(), "{request:?}");
        }
        for response in sample_responses() {
            let parts = encode_response_parts(&response).unwrap();
            assert_eq!(
                parts.concatenated(),
                encode_response(&response).unwrap(),
                "{response:?}"
            );
        }
        for length in [
            0usize,
            1,
            127,
            128,
            FRAME_TAIL_BYTES_MIN - 1,
            FRAME_TAIL_BYTES_MIN,
            70_000,
            1 << 20,
        ] {
            let shard = Bytes::from((0..length).map(|index| (index * 7) as u8).collect::<Vec<u8>>());
            let request = Request::PutShard { shard: shard.clone() };
            let parts = encode_request_parts(&request).unwrap();
            assert_eq!(
                parts.concatenated(),
                encode_request(&request).unwrap(),
                "length {length}"
            );
            assert_eq!(parts.length_bytes(), encode_request(&request).unwrap().len() as u64);
            let response = Response::Shard { shard: shard.clone() };
            let response_parts = encode_response_parts(&response).unwrap();
            assert_eq!(
                response_parts.concatenated(),
                encode_response(&response).unwrap(),
                "length {length}"
            );
            for tail in [&parts.tail, &response_parts.tail] {
                match length >= FRAME_TAIL_BYTES_MIN {
                    true => assert_eq!(tail.as_ptr(), shard.as_ptr(), "length {length}: the shard was copied"),
                    false => assert!(tail.is_empty(), "length {length}"),
                }
            }
        }
        let huge = Request::PutShard {
            shard: Bytes::from(vec![0u8; FRAME_BYTES_MAX as usize + 1]),
        };
        assert!(matches!(
            encode_request_parts(&huge),
            Err(WireError::FrameTooLarge { .. })
        ));
    }

    /// The shard response's shared bytes encode exactly as the `serde_bytes` vector they
    /// replaced, so the change needed no wire version.
    #[test]
    fn a_shard_response_encodes_its_bytes_as_a_serde_bytes_vector_did() {
        #[derive(Serialize)]
        enum VectorForm {
            _Admitted,
            _Gossip,
            _ShardStored,
            Shard {
                #[serde(with = "serde_bytes")]
                shard: Vec<u8>,
            },
        }
        for length in [0usize, 1, 127, 128, 70_000] {
            let shard: Vec<u8> = (0..length).map(|index| (index * 7) as u8).collect();
            let encoded = postcard::to_allocvec(&Response::Shard {
                shard: shard.clone().into(),
            })
            .unwrap();
            let vector_form = postcard::to_allocvec(&VectorForm::Shard { shard }).unwrap();
            assert_eq!(encoded, vector_form, "length {length}");
        }
    }

    #[test]
    fn error_messages_are_bounded_on_a_char_boundary() {
        let Response::Error { message, .. } = Response::error(RemoteErrorKind::Internal, "é".repeat(2000)) else {
            panic!("not an error response");
        };
        assert!(message.len() <= ERROR_MESSAGE_BYTES_MAX);
    }

    proptest! {
        #[test]
        fn decoding_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }

        #[test]
        fn decoding_mutated_valid_frames_never_panics(
            which in 0usize..5,
            mutations in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
            truncate in any::<proptest::sample::Index>(),
        ) {
            let mut body = encode_request(&sample_requests()[which]).unwrap();
            for (position, byte) in mutations {
                let position = position.index(body.len());
                body[position] = byte;
            }
            let _ = decode_request(&body);
            let cut = truncate.index(body.len() + 1);
            let _ = decode_request(&body[..cut]);
        }
    }
}
