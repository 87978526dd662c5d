//! Erasure coding of stripes into k data + m parity shards, and back from any k.
//!
//! Two interchangeable backends sit behind [`CodecId`]: `reed-solomon-erasure` (GF(2^8),
//! classic Vandermonde matrices, pure-Rust build) and `reed-solomon-simd` (Leopard-style
//! O(n log n) with runtime SIMD detection). The shard bytes differ between them, so the
//! codec id is part of every shard header and of every manifest.
//!
//! A shard on disk or on the wire is a fixed 96-byte header followed by its payload:
//!
//! ```text
//! 0   magic "BDRS"            4 B
//! 4   version u8 = 1
//! 5   codec u8, 6 k u8, 7 m u8, 8 index u8, 9..12 reserved (zero)
//! 12  stripe id               32 B
//! 44  stripe length u64       (bytes of the encoded stripe, before padding)
//! 52  payload length u32
//! 56  reserved u64 (zero)
//! 64  blake3 of bytes 0..64 and the payload   32 B
//! 96  payload
//! ```
//!
//! The checksum covers the header too, so a flipped bit anywhere in a shard file is found.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use reed_solomon_simd::engine::{DefaultEngine, Engine, GfElement, ShardsRefMut, GF_ORDER};
use reed_solomon_simd::rate::{DefaultRateDecoder, RateDecoder};
use serde::{Deserialize, Serialize};

use crate::ids::StripeId;

/// Largest stripe the codec accepts. The gateway's default stripe is 4 MiB.
pub const STRIPE_LENGTH_BYTES_MAX: u64 = 16 * 1024 * 1024;
pub const DATA_SHARDS_MAX: u8 = 32;
pub const PARITY_SHARDS_MAX: u8 = 16;
/// Shard payloads are padded to a multiple of this: reed-solomon-simd needs even sizes and
/// is fastest on multiples of 64.
pub const SHARD_ALIGNMENT_BYTES: usize = 64;
pub const SHARD_HEADER_LENGTH_BYTES: usize = 96;
pub const SHARD_FORMAT_VERSION: u8 = 1;
const SHARD_MAGIC: &[u8; 4] = b"BDRS";
const CHECKSUM_OFFSET: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErasureError {
    #[error("invalid erasure parameters k={data_shards} m={parity_shards} (k 1..={DATA_SHARDS_MAX}, m 0..={PARITY_SHARDS_MAX})")]
    InvalidParameters { data_shards: u8, parity_shards: u8 },
    #[error("stripe of {length_bytes} bytes exceeds the {STRIPE_LENGTH_BYTES_MAX}-byte maximum")]
    StripeTooLarge { length_bytes: u64 },
    #[error("not enough shards to decode: {available} usable, {needed} needed")]
    NotEnoughShards { available: u32, needed: u32 },
    #[error("shard does not belong to this stripe: {0}")]
    Mismatch(String),
    #[error("erasure backend failed: {0}")]
    Backend(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardDecodeError {
    #[error("shard shorter than its {SHARD_HEADER_LENGTH_BYTES}-byte header: {length_bytes} bytes")]
    TooShort { length_bytes: u64 },
    #[error("not a bdr shard (bad magic)")]
    BadMagic,
    #[error("unsupported shard format version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown codec id {0}")]
    UnknownCodec(u8),
    #[error("shard header says {declared} payload bytes but {actual} are present (torn write?)")]
    LengthMismatch { declared: u64, actual: u64 },
    #[error("shard checksum mismatch (bit rot or tampering)")]
    ChecksumMismatch,
    #[error("shard header is inconsistent: {0}")]
    BadHeader(String),
}

thread_local! {
    /// One reed-solomon-simd encoder per thread, reset for each stripe. Not state that
    /// changes results: only the allocation is kept.
    static SIMD_ENCODER: std::cell::RefCell<Option<reed_solomon_simd::ReedSolomonEncoder>> =
        const { std::cell::RefCell::new(None) };
    /// The same for decoding: a fresh decoder allocated and zeroed a work buffer of
    /// about k + m shards per decode (1.7% of a large GET's CPU in one profile, where
    /// reads took a near parity shard).
    static SIMD_DECODER: std::cell::RefCell<Option<SimdDecoder>> = const { std::cell::RefCell::new(None) };
}

/// reed-solomon-simd's decoder (high or low rate, as the crate's own picks) on the engine
/// that remembers erasure-pattern evaluations.
type SimdDecoder = DefaultRateDecoder<ErasurePatternCachingEngine>;

/// How many erasure-pattern evaluations are kept, 128 KiB each (8 MiB in all): a 4+2 code
/// has 22 patterns of at most two missing shards. A larger code's degraded reads mostly
/// lack one shard (an 8+4 code: 12 such patterns); when the cache is full one entry makes
/// room, which costs only a recomputation when it is needed again.
const ERASURE_EVALUATIONS_CACHED_MAX: usize = 64;

/// Only patterns whose erasures all lie in the first this many positions of the decoder's
/// work are cached, keyed by a bitmask (the positions are shard slots, far fewer for any
/// code we write).
const ERASURE_PATTERN_POSITIONS_MAX: usize = 64;

/// The tail of an `eval_poly` input is checked for ones in pieces of this many elements:
/// small enough to stop early on an input that has them, large enough to vectorise.
const ERASURE_TAIL_PIECE_ELEMENTS: usize = 1024;

/// Evaluations of erasure patterns, keyed by (truncated size, bitmask of erased
/// positions): shared by every thread (a decode may run on any of them), behind a lock
/// held only to look up or insert.
type ErasureEvaluations = BTreeMap<(usize, u64), Arc<[GfElement]>>;
static ERASURE_EVALUATIONS: Mutex<ErasureEvaluations> = Mutex::new(BTreeMap::new());

/// reed-solomon-simd's default engine, except that the erasure-locator evaluation
/// (`eval_poly`) of a pattern already seen is copied from a cache. That evaluation runs
/// two Walsh-Hadamard transforms over the whole GF(2^16) field, about 3 M instructions
/// whatever the shard size: most of a small stripe's decode (8% of the simulator's
/// instructions, about a millisecond per degraded read of a small object). Its result
/// depends only on the pattern, of which a code has few.
struct ErasurePatternCachingEngine(DefaultEngine);

impl ErasurePatternCachingEngine {
    fn new() -> ErasurePatternCachingEngine {
        ErasurePatternCachingEngine(DefaultEngine::new())
    }
}

impl Engine for ErasurePatternCachingEngine {
    fn fft(&self, data: &mut ShardsRefMut, pos: usize, size: usize, truncated_size: usize, skew_delta: usize) {
        self.0.fft(data, pos, size, truncated_size, skew_delta);
    }

    fn ifft(&self, data: &mut ShardsRefMut, pos: usize, size: usize, truncated_size: usize, skew_delta: usize) {
        self.0.ifft(data, pos, size, truncated_size, skew_delta);
    }

    fn mul(&self, x: &mut [[u8; 64]], log_m: GfElement) {
        self.0.mul(x, log_m);
    }

    fn eval_poly(erasures: &mut [GfElement; GF_ORDER], truncated_size: usize) {
        let Some(pattern) = erasure_pattern(erasures, truncated_size) else {
            return DefaultEngine::eval_poly(erasures, truncated_size);
        };
        let cached = lock_erasure_evaluations().get(&pattern).cloned();
        if let Some(evaluation) = cached {
            erasures.copy_from_slice(&evaluation);
            return;
        }
        DefaultEngine::eval_poly(erasures, truncated_size);
        let mut evaluations = lock_erasure_evaluations();
        if evaluations.len() >= ERASURE_EVALUATIONS_CACHED_MAX {
            evaluations.pop_first();
        }
        evaluations.insert(pattern, Arc::from(&erasures[..]));
    }
}

/// The cache stays usable after a panic elsewhere: each entry is inserted whole.
fn lock_erasure_evaluations() -> std::sync::MutexGuard<'static, ErasureEvaluations> {
    ERASURE_EVALUATIONS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The cache key of an `eval_poly` input, when it is one the decoders build: zeros and
/// ones, the ones only in the first [`ERASURE_PATTERN_POSITIONS_MAX`] positions. With
/// the truncated size, that is the whole input, so equal keys give equal evaluations.
fn erasure_pattern(erasures: &[GfElement; GF_ORDER], truncated_size: usize) -> Option<(usize, u64)> {
    let (head, tail) = erasures.split_at(ERASURE_PATTERN_POSITIONS_MAX);
    // ORs over pieces of the tail, which vectorise, stopping at the first piece with a
    // one (the low-rate decoder's inputs have ones there: never cached).
    if tail
        .chunks(ERASURE_TAIL_PIECE_ELEMENTS)
        .any(|piece| piece.iter().fold(0, |all, element| all | element) != 0)
    {
        return None;
    }
    let mut mask = 0u64;
    for (position, element) in head.iter().enumerate() {
        match element {
            0 => {}
            1 => mask |= 1 << position,
            _ => return None,
        }
    }
    Some((truncated_size, mask))
}

/// The codec kept in `cached`, reset for the next stripe, or a new one when there is none
/// yet: reed-solomon-simd's encoder and decoder keep their work buffers between stripes.
fn reset_or_create<Codec>(
    cached: &mut Option<Codec>,
    reset: impl FnOnce(&mut Codec) -> Result<(), reed_solomon_simd::Error>,
    create: impl FnOnce() -> Result<Codec, reed_solomon_simd::Error>,
) -> Result<&mut Codec, reed_solomon_simd::Error> {
    match cached {
        Some(codec) => match reset(codec) {
            Ok(()) => Ok(cached.as_mut().expect("just matched")),
            // A refused reset may leave the codec without its inner state (the crate's
            // rate-switching reset takes it out first), so it is dropped, never reused.
            Err(error) => {
                *cached = None;
                Err(error)
            }
        },
        None => Ok(cached.insert(create()?)),
    }
}

/// Which Reed-Solomon implementation produced a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum CodecId {
    /// `reed-solomon-erasure`, GF(2^8) Vandermonde, pure Rust.
    ReedSolomonErasure,
    /// `reed-solomon-simd`, GF(2^16) Leopard-style FFT, runtime SIMD.
    ReedSolomonSimd,
}

impl CodecId {
    /// The codec new data is written with: the faster one in `cargo bench -p bdr-protocol`
    /// on the machines we measured (see ARCHITECTURE.md).
    pub const DEFAULT: CodecId = CodecId::ReedSolomonSimd;
    pub const ALL: [CodecId; 2] = [CodecId::ReedSolomonErasure, CodecId::ReedSolomonSimd];

    pub const fn to_byte(self) -> u8 {
        match self {
            CodecId::ReedSolomonErasure => 1,
            CodecId::ReedSolomonSimd => 2,
        }
    }

    pub fn from_byte(byte: u8) -> Option<CodecId> {
        CodecId::ALL.into_iter().find(|codec| codec.to_byte() == byte)
    }

    pub const fn name(self) -> &'static str {
        match self {
            CodecId::ReedSolomonErasure => "reed-solomon-erasure",
            CodecId::ReedSolomonSimd => "reed-solomon-simd",
        }
    }

    /// Computes `parity.len()` parity shards from `data` (all the same, non-zero, even
    /// length) into `parity` (the same length).
    fn encode_parity(self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), ErasureError> {
        let backend_error = |error: String| ErasureError::Backend(error);
        match self {
            CodecId::ReedSolomonErasure => {
                let codec = reed_solomon_erasure::galois_8::ReedSolomon::new(data.len(), parity.len())
                    .map_err(|error| backend_error(format!("{error:?}")))?;
                codec
                    .encode_sep(data, parity)
                    .map_err(|error| backend_error(format!("{error:?}")))
            }
            CodecId::ReedSolomonSimd => {
                let shard_length = data.first().map_or(0, |shard| shard.len());
                SIMD_ENCODER.with(|cell| {
                    let mut cached = cell.borrow_mut();
                    // The encoder's work buffers are reused: allocating megabytes per stripe
                    // cost page faults and zeroing on every write (seen in profiles).
                    let encoder = reset_or_create(
                        &mut cached,
                        |encoder| encoder.reset(data.len(), parity.len(), shard_length),
                        || reed_solomon_simd::ReedSolomonEncoder::new(data.len(), parity.len(), shard_length),
                    )
                    .map_err(|error| backend_error(error.to_string()))?;
                    for shard in data {
                        encoder
                            .add_original_shard(shard)
                            .map_err(|error| backend_error(error.to_string()))?;
                    }
                    let result = encoder.encode().map_err(|error| backend_error(error.to_string()))?;
                    for (slot, recovery) in parity.iter_mut().zip(result.recovery_iter()) {
                        slot.copy_from_slice(recovery);
                    }
                    Ok(())
                })
            }
        }
    }

    /// Hands the data shards (indexes `0..k`) of `shards` (length k+m, payloads
    /// borrowed) to `visit` in index order, the missing ones reconstructed first; each
    /// reconstructed shard is borrowed from the codec's buffers, not copied out.
    fn visit_data_shards(
        self,
        data_shards: usize,
        shards: &[Option<&[u8]>],
        visit: &mut dyn FnMut(&[u8]),
    ) -> Result<(), ErasureError> {
        let backend_error = |error: String| ErasureError::Backend(error);
        let not_restored = || ErasureError::Backend("data shard not restored".into());
        if shards[..data_shards].iter().all(Option::is_some) {
            // The usual read: nothing to reconstruct.
            for shard in shards[..data_shards].iter().flatten() {
                visit(shard);
            }
            return Ok(());
        }
        let parity_shards = shards.len() - data_shards;
        match self {
            CodecId::ReedSolomonErasure => {
                let codec = reed_solomon_erasure::galois_8::ReedSolomon::new(data_shards, parity_shards)
                    .map_err(|error| backend_error(format!("{error:?}")))?;
                let mut owned: Vec<Option<Vec<u8>>> = shards.iter().map(|shard| shard.map(<[u8]>::to_vec)).collect();
                codec
                    .reconstruct_data(&mut owned)
                    .map_err(|error| backend_error(format!("{error:?}")))?;
                for shard in &owned[..data_shards] {
                    visit(shard.as_deref().ok_or_else(not_restored)?);
                }
                Ok(())
            }
            CodecId::ReedSolomonSimd => {
                let shard_length = shards.iter().flatten().next().map_or(0, |shard| shard.len());
                SIMD_DECODER.with(|cell| {
                    let mut cached = cell.borrow_mut();
                    let decoder = reset_or_create(
                        &mut cached,
                        |decoder| decoder.reset(data_shards, parity_shards, shard_length),
                        || {
                            SimdDecoder::new(
                                data_shards,
                                parity_shards,
                                shard_length,
                                ErasurePatternCachingEngine::new(),
                                None,
                            )
                        },
                    )
                    .map_err(|error| backend_error(error.to_string()))?;
                    for (index, shard) in shards.iter().enumerate() {
                        let Some(shard) = shard else { continue };
                        let added = match index.checked_sub(data_shards) {
                            None => decoder.add_original_shard(index, shard),
                            Some(parity_index) => decoder.add_recovery_shard(parity_index, shard),
                        };
                        added.map_err(|error| backend_error(error.to_string()))?;
                    }
                    let result = decoder.decode().map_err(|error| backend_error(error.to_string()))?;
                    for (index, shard) in shards[..data_shards].iter().enumerate() {
                        let bytes = match shard {
                            Some(bytes) => *bytes,
                            None => result.restored_original(index).ok_or_else(not_restored)?,
                        };
                        visit(bytes);
                    }
                    Ok(())
                })
            }
        }
    }
}

/// The identity and integrity header of one shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardHeader {
    pub codec: CodecId,
    pub data_shards: u8,
    pub parity_shards: u8,
    pub index: u8,
    pub stripe_id: StripeId,
    /// Length of the stripe (the bytes that were encoded), before padding.
    pub stripe_length_bytes: u64,
    pub payload_length_bytes: u32,
    pub checksum: [u8; 32],
}

impl ShardHeader {
    fn encode_without_checksum(&self) -> [u8; CHECKSUM_OFFSET] {
        let mut bytes = [0u8; CHECKSUM_OFFSET];
        bytes[0..4].copy_from_slice(SHARD_MAGIC);
        bytes[4] = SHARD_FORMAT_VERSION;
        bytes[5] = self.codec.to_byte();
        bytes[6] = self.data_shards;
        bytes[7] = self.parity_shards;
        bytes[8] = self.index;
        bytes[12..44].copy_from_slice(self.stripe_id.as_bytes());
        bytes[44..52].copy_from_slice(&self.stripe_length_bytes.to_le_bytes());
        bytes[52..56].copy_from_slice(&self.payload_length_bytes.to_le_bytes());
        bytes
    }

    fn compute_checksum(&self, payload: &[u8]) -> [u8; 32] {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.encode_without_checksum());
        hasher.update(payload);
        *hasher.finalize().as_bytes()
    }
}

/// One shard: header plus payload. Constructed only by encoding, rebuilding, by
/// [`Shard::from_vec`], which verifies the checksum, so a `Shard` value is intact, or by
/// [`Shard::from_authenticated_transport`] for bytes that another node verified or made
/// and an authenticated transport carried.
///
/// It keeps its encoded form (header, then payload) in one shared, immutable buffer:
/// sending, storing and receiving a shard then moves or shares that buffer instead of
/// copying megabytes each time (a write sends each shard while keeping it for a retry
/// elsewhere).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    header: ShardHeader,
    /// [`SHARD_HEADER_LENGTH_BYTES`] of encoded header, then the payload.
    bytes: Bytes,
}

/// A buffer with room for a shard header in front of `payload_length` payload bytes.
fn shard_buffer(payload: &[u8], payload_length: usize) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SHARD_HEADER_LENGTH_BYTES + payload_length);
    bytes.resize(SHARD_HEADER_LENGTH_BYTES, 0);
    bytes.extend_from_slice(payload);
    bytes.resize(SHARD_HEADER_LENGTH_BYTES + payload_length, 0);
    bytes
}

impl Shard {
    /// Fills in the header of `bytes`, a [`shard_buffer`] whose payload is in place.
    fn new(codec: &StripeCodec, index: u8, stripe_id: StripeId, stripe_length_bytes: u64, mut bytes: Vec<u8>) -> Shard {
        assert!(
            bytes.len() >= SHARD_HEADER_LENGTH_BYTES,
            "shard buffer has room for the header"
        );
        let payload_length = bytes.len() - SHARD_HEADER_LENGTH_BYTES;
        let mut header = ShardHeader {
            codec: codec.codec,
            data_shards: codec.data_shards,
            parity_shards: codec.parity_shards,
            index,
            stripe_id,
            stripe_length_bytes,
            payload_length_bytes: u32::try_from(payload_length).expect("shard payload bounded by stripe maximum"),
            checksum: [0; 32],
        };
        header.checksum = header.compute_checksum(&bytes[SHARD_HEADER_LENGTH_BYTES..]);
        bytes[..CHECKSUM_OFFSET].copy_from_slice(&header.encode_without_checksum());
        bytes[CHECKSUM_OFFSET..SHARD_HEADER_LENGTH_BYTES].copy_from_slice(&header.checksum);
        Shard {
            header,
            bytes: Bytes::from(bytes),
        }
    }

    pub fn header(&self) -> &ShardHeader {
        &self.header
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes[SHARD_HEADER_LENGTH_BYTES..]
    }

    pub fn encoded_length_bytes(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The shard's on-disk and on-wire form.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The shard's on-disk and on-wire form; without a copy unless a clone of the shard
    /// still shares it.
    pub fn into_bytes(self) -> Vec<u8> {
        Vec::from(self.bytes)
    }

    /// A copy of the shard's on-disk and on-wire form.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.to_vec()
    }

    /// The shard's on-disk and on-wire form, shared with the shard (no copy).
    pub fn shared_bytes(&self) -> Bytes {
        self.bytes.clone()
    }

    /// Parses and verifies a shard. Never panics, whatever the bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Shard, ShardDecodeError> {
        Shard::from_vec(bytes.to_vec())
    }

    /// Parses and verifies a shard, keeping `bytes` as its buffer. Never panics.
    pub fn from_vec(bytes: Vec<u8>) -> Result<Shard, ShardDecodeError> {
        Shard::from_shared(Bytes::from(bytes))
    }

    /// Parses and verifies a shard, keeping (sharing) `bytes` as its buffer. Never panics.
    pub fn from_shared(bytes: Bytes) -> Result<Shard, ShardDecodeError> {
        Shard::parse(bytes, ChecksumCheck::Verify)
    }

    /// Parses a shard, keeping (sharing) `bytes` as its buffer, with its checksum checked
    /// or not as `check` says. Never panics.
    pub fn parse(bytes: Bytes, check: ChecksumCheck) -> Result<Shard, ShardDecodeError> {
        let header = Shard::checked_header(&bytes, check)?;
        Ok(Shard { header, bytes })
    }

    /// Parses a shard that another node verified (its store's read) or made (encoding),
    /// and that reached this one over a transport which authenticates every byte
    /// (libp2p's Noise): checks the header as [`Shard::from_shared`] does, but not the
    /// checksum, whose pass over the payload was a third of a large GET's blake3 work
    /// and a quarter of a PUT's. Damage on disk is found by the holder's read, damage in
    /// transit by the transport's AEAD, and a stripe's AEAD and id check end to end
    /// whatever a node in between did. Never panics.
    pub fn from_authenticated_transport(bytes: Bytes) -> Result<Shard, ShardDecodeError> {
        Shard::parse(bytes, ChecksumCheck::TrustTransport)
    }

    /// Whether `bytes` match their checksum (what [`Shard::from_shared`] checks beyond
    /// [`Shard::from_authenticated_transport`]).
    pub fn checksum_matches(&self) -> bool {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.bytes[..CHECKSUM_OFFSET]);
        hasher.update(self.payload());
        hasher.finalize().as_bytes() == &self.header.checksum
    }

    fn checked_header(bytes: &[u8], checksum_check: ChecksumCheck) -> Result<ShardHeader, ShardDecodeError> {
        if bytes.len() < SHARD_HEADER_LENGTH_BYTES {
            return Err(ShardDecodeError::TooShort {
                length_bytes: bytes.len() as u64,
            });
        }
        if &bytes[0..4] != SHARD_MAGIC {
            return Err(ShardDecodeError::BadMagic);
        }
        if bytes[4] != SHARD_FORMAT_VERSION {
            return Err(ShardDecodeError::UnsupportedVersion(bytes[4]));
        }
        let codec = CodecId::from_byte(bytes[5]).ok_or(ShardDecodeError::UnknownCodec(bytes[5]))?;
        let u64_at = |offset: usize| u64::from_le_bytes(bytes[offset..offset + 8].try_into().expect("8 bytes"));
        let payload_length_bytes = u32::from_le_bytes(bytes[52..56].try_into().expect("4 bytes"));
        let payload = &bytes[SHARD_HEADER_LENGTH_BYTES..];
        if payload.len() as u64 != u64::from(payload_length_bytes) {
            return Err(ShardDecodeError::LengthMismatch {
                declared: payload_length_bytes.into(),
                actual: payload.len() as u64,
            });
        }
        let header = ShardHeader {
            codec,
            data_shards: bytes[6],
            parity_shards: bytes[7],
            index: bytes[8],
            stripe_id: StripeId(bytes[12..44].try_into().expect("32 bytes")),
            stripe_length_bytes: u64_at(44),
            payload_length_bytes,
            checksum: bytes[CHECKSUM_OFFSET..SHARD_HEADER_LENGTH_BYTES]
                .try_into()
                .expect("32 bytes"),
        };
        // The checksum covers the header bytes as stored, reserved bytes included.
        if checksum_check == ChecksumCheck::Verify {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&bytes[..CHECKSUM_OFFSET]);
            hasher.update(payload);
            if hasher.finalize().as_bytes() != &header.checksum {
                return Err(ShardDecodeError::ChecksumMismatch);
            }
        }
        if bytes[9..12] != [0; 3] || bytes[56..64] != [0; 8] {
            return Err(ShardDecodeError::BadHeader("reserved bytes are not zero".into()));
        }
        let codec_for_header = StripeCodec::new(codec, header.data_shards, header.parity_shards)
            .map_err(|error| ShardDecodeError::BadHeader(error.to_string()))?;
        if header.index >= codec_for_header.total_shards() {
            return Err(ShardDecodeError::BadHeader(format!(
                "index {} out of range for k+m={}",
                header.index,
                codec_for_header.total_shards()
            )));
        }
        if header.stripe_length_bytes > STRIPE_LENGTH_BYTES_MAX
            || codec_for_header.shard_length_bytes(header.stripe_length_bytes) != payload.len()
        {
            return Err(ShardDecodeError::BadHeader(
                "payload length does not match stripe length".into(),
            ));
        }
        Ok(header)
    }
}

/// Whether parsing a shard hashes it against its checksum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumCheck {
    /// Hash it: for a store's reads, and for work that rewrites what it read (repair,
    /// moves), which must never give a damaged shard a fresh checksum.
    Verify,
    /// Its header only (see [`Shard::from_authenticated_transport`]): for shards another
    /// node sent, where the stripe is checked end to end or the holder's reads verify.
    TrustTransport,
}

/// (stripe length in bytes, one slot per shard index holding its payload if present)
type SlottedShards<'a> = (u64, Vec<Option<&'a [u8]>>);

/// Encodes and decodes stripes with one codec and one (k, m).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StripeCodec {
    pub codec: CodecId,
    pub data_shards: u8,
    pub parity_shards: u8,
}

impl StripeCodec {
    pub fn new(codec: CodecId, data_shards: u8, parity_shards: u8) -> Result<StripeCodec, ErasureError> {
        if data_shards == 0 || data_shards > DATA_SHARDS_MAX || parity_shards > PARITY_SHARDS_MAX {
            return Err(ErasureError::InvalidParameters {
                data_shards,
                parity_shards,
            });
        }
        Ok(StripeCodec {
            codec,
            data_shards,
            parity_shards,
        })
    }

    pub fn total_shards(&self) -> u8 {
        self.data_shards + self.parity_shards
    }

    /// Payload length of every shard of a stripe of `stripe_length_bytes`.
    pub fn shard_length_bytes(&self, stripe_length_bytes: u64) -> usize {
        let per_shard = stripe_length_bytes.div_ceil(u64::from(self.data_shards)) as usize;
        per_shard.div_ceil(SHARD_ALIGNMENT_BYTES).max(1) * SHARD_ALIGNMENT_BYTES
    }

    /// Cuts `stripe` into k data shards and computes m parity shards, in index order.
    pub fn encode(&self, stripe_id: StripeId, stripe: &[u8]) -> Result<Vec<Shard>, ErasureError> {
        let stripe_length_bytes = stripe.len() as u64;
        if stripe_length_bytes > STRIPE_LENGTH_BYTES_MAX {
            return Err(ErasureError::StripeTooLarge {
                length_bytes: stripe_length_bytes,
            });
        }
        let shard_length = self.shard_length_bytes(stripe_length_bytes);
        let data: Vec<Vec<u8>> = (0..usize::from(self.data_shards))
            .map(|index| {
                let start = (index * shard_length).min(stripe.len());
                let end = ((index + 1) * shard_length).min(stripe.len());
                shard_buffer(&stripe[start..end], shard_length)
            })
            .collect();
        let mut parity: Vec<Vec<u8>> = (0..self.parity_shards)
            .map(|_| shard_buffer(&[], shard_length))
            .collect();
        if self.parity_shards > 0 {
            let data_payloads: Vec<&[u8]> = data.iter().map(|bytes| &bytes[SHARD_HEADER_LENGTH_BYTES..]).collect();
            let mut parity_payloads: Vec<&mut [u8]> = parity
                .iter_mut()
                .map(|bytes| &mut bytes[SHARD_HEADER_LENGTH_BYTES..])
                .collect();
            self.codec.encode_parity(&data_payloads, &mut parity_payloads)?;
        }
        Ok(data
            .into_iter()
            .chain(parity)
            .enumerate()
            .map(|(index, bytes)| Shard::new(self, index as u8, stripe_id, stripe_length_bytes, bytes))
            .collect())
    }

    /// Checks that `shards` belong to `stripe_id` under this codec and agree with each
    /// other; returns them slotted by index (k+m slots), duplicates dropped.
    fn slot_shards<'a>(&self, stripe_id: StripeId, shards: &'a [Shard]) -> Result<SlottedShards<'a>, ErasureError> {
        let mut slots: Vec<Option<&[u8]>> = vec![None; usize::from(self.total_shards())];
        let mut stripe_length_bytes = None;
        for shard in shards {
            let header = &shard.header;
            if header.stripe_id != stripe_id
                || header.codec != self.codec
                || header.data_shards != self.data_shards
                || header.parity_shards != self.parity_shards
            {
                return Err(ErasureError::Mismatch(format!(
                    "shard {} of stripe {} ({} k={} m={}) offered for stripe {} ({} k={} m={})",
                    header.index,
                    header.stripe_id.short(),
                    header.codec.name(),
                    header.data_shards,
                    header.parity_shards,
                    stripe_id.short(),
                    self.codec.name(),
                    self.data_shards,
                    self.parity_shards
                )));
            }
            if *stripe_length_bytes.get_or_insert(header.stripe_length_bytes) != header.stripe_length_bytes {
                return Err(ErasureError::Mismatch("shards disagree on the stripe length".into()));
            }
            slots[usize::from(header.index)].get_or_insert_with(|| shard.payload());
        }
        let available = slots.iter().filter(|slot| slot.is_some()).count() as u32;
        if available < u32::from(self.data_shards) {
            return Err(ErasureError::NotEnoughShards {
                available,
                needed: self.data_shards.into(),
            });
        }
        Ok((stripe_length_bytes.unwrap_or(0), slots))
    }

    /// Rebuilds the stripe from any k distinct shards of it.
    pub fn decode(&self, stripe_id: StripeId, shards: &[Shard]) -> Result<Vec<u8>, ErasureError> {
        let (stripe_length_bytes, slots) = self.slot_shards(stripe_id, shards)?;
        // Each data shard, given or reconstructed, is copied once: into the stripe.
        let mut stripe = Vec::with_capacity(stripe_length_bytes as usize);
        self.codec
            .visit_data_shards(usize::from(self.data_shards), &slots, &mut |shard| {
                let wanted = (stripe_length_bytes as usize - stripe.len()).min(shard.len());
                stripe.extend_from_slice(&shard[..wanted]);
            })?;
        Ok(stripe)
    }

    /// Rebuilds the shards with the given indexes from any k distinct shards of the stripe.
    pub fn rebuild(
        &self,
        stripe_id: StripeId,
        shards: &[Shard],
        wanted_indexes: &[u8],
    ) -> Result<Vec<Shard>, ErasureError> {
        let (stripe_length_bytes, _) = self.slot_shards(stripe_id, shards)?;
        if let Some(index) = wanted_indexes.iter().find(|index| **index >= self.total_shards()) {
            return Err(ErasureError::Mismatch(format!(
                "no shard index {index} with k+m={}",
                self.total_shards()
            )));
        }
        // Decoding and re-encoding costs one extra encode over a targeted rebuild, but uses
        // only the backends' well-tested paths; repair is paced far below codec speed.
        let stripe = self.decode(stripe_id, shards)?;
        let all = self.encode(stripe_id, &stripe)?;
        debug_assert_eq!(all[0].header.stripe_length_bytes, stripe_length_bytes);
        Ok(all
            .into_iter()
            .filter(|shard| wanted_indexes.contains(&shard.header.index))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn stripe_bytes(length: usize, seed: u8) -> Vec<u8> {
        (0..length)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Every subset of `0..total` with at most `max_erased` members, as erased index sets.
    fn erasure_patterns(total: u8, max_erased: u8) -> Vec<Vec<u8>> {
        (0u64..(1 << total))
            .filter(|mask| mask.count_ones() <= u32::from(max_erased))
            .map(|mask| (0..total).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    #[test]
    fn every_erasure_pattern_of_up_to_m_shards_decodes_for_small_codes() {
        for codec in CodecId::ALL {
            for (k, m) in [
                (1, 0),
                (1, 1),
                (1, 2),
                (2, 1),
                (2, 3),
                (3, 2),
                (4, 2),
                (5, 3),
                (6, 3),
                (4, 4),
                (8, 4),
                (10, 4),
            ] {
                let stripe_codec = StripeCodec::new(codec, k, m).unwrap();
                for length in [0usize, 1, 63, 64 * k as usize + 1, 5000] {
                    let stripe = stripe_bytes(length, k ^ m);
                    let id = StripeId([k; 32]);
                    let shards = stripe_codec.encode(id, &stripe).unwrap();
                    assert_eq!(shards.len(), usize::from(k + m));
                    for erased in erasure_patterns(k + m, m) {
                        let survivors: Vec<Shard> = shards
                            .iter()
                            .filter(|s| !erased.contains(&s.header.index))
                            .cloned()
                            .collect();
                        let decoded = stripe_codec.decode(id, &survivors).unwrap();
                        assert_eq!(decoded, stripe, "{codec:?} k={k} m={m} len={length} erased={erased:?}");
                        let rebuilt = stripe_codec.rebuild(id, &survivors, &erased).unwrap();
                        for shard in rebuilt {
                            assert_eq!(shard, shards[usize::from(shard.header.index)]);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn cached_erasure_evaluations_equal_computed_ones_and_unusual_inputs_bypass_the_cache() {
        let mut inputs: Vec<(Box<[GfElement; GF_ORDER]>, usize)> = Vec::new();
        for (ones, truncated_size) in [
            (vec![0usize, 3], 8),
            (vec![1, 2, 4], 8),
            (vec![], 16),
            (vec![0, 63], 64),
            (vec![5], 12),
            (vec![5], GF_ORDER),
            // Past the keyed positions, and a value other than one: computed every time.
            (vec![64], 72),
        ] {
            let mut input = Box::new([0 as GfElement; GF_ORDER]);
            for position in ones {
                input[position] = 1;
            }
            inputs.push((input, truncated_size));
        }
        let mut not_a_pattern = Box::new([0 as GfElement; GF_ORDER]);
        not_a_pattern[2] = 7;
        inputs.push((not_a_pattern, 8));
        for (input, truncated_size) in &inputs {
            let mut expected = input.clone();
            DefaultEngine::eval_poly(&mut expected, *truncated_size);
            // The first evaluation may fill the cache, the second reads it back.
            for round in 0..2 {
                let mut evaluated = input.clone();
                ErasurePatternCachingEngine::eval_poly(&mut evaluated, *truncated_size);
                assert!(evaluated[..] == expected[..], "round {round}, size {truncated_size}");
            }
        }
        let keyed = |input: &[GfElement; GF_ORDER], size| erasure_pattern(input, size);
        assert_eq!(keyed(&inputs[0].0, 8), Some((8, 0b1001)));
        assert_eq!(keyed(&inputs[5].0, 12), Some((12, 1 << 5)));
        assert_eq!(keyed(&inputs[6].0, 72), None);
        assert_eq!(keyed(&inputs[7].0, 8), None);
    }

    #[test]
    fn a_reused_decoder_decodes_after_a_refused_reset() {
        let codec = StripeCodec::new(CodecId::ReedSolomonSimd, 4, 2).unwrap();
        let stripe = stripe_bytes(5000, 3);
        let id = StripeId([4; 32]);
        let shards = codec.encode(id, &stripe).unwrap();
        let survivors: Vec<Shard> = shards[2..].to_vec();
        assert_eq!(codec.decode(id, &survivors).unwrap(), stripe);
        // The kept decoder refuses impossible parameters, and stays usable.
        SIMD_DECODER.with(|cell| {
            let mut cached = cell.borrow_mut();
            let refused = reset_or_create(
                &mut cached,
                |decoder| decoder.reset(0, 0, 64),
                || SimdDecoder::new(0, 0, 64, ErasurePatternCachingEngine::new(), None),
            );
            assert!(refused.is_err());
        });
        assert_eq!(codec.decode(id, &survivors).unwrap(), stripe);
        let other = StripeCodec::new(CodecId::ReedSolomonSimd, 2, 1).unwrap();
        let small = stripe_bytes(63, 1);
        let small_shards = other.encode(id, &small).unwrap();
        assert_eq!(other.decode(id, &small_shards[1..]).unwrap(), small);
    }

    #[test]
    fn too_few_shards_is_a_typed_error_not_wrong_bytes() {
        for codec in CodecId::ALL {
            let stripe_codec = StripeCodec::new(codec, 4, 2).unwrap();
            let id = StripeId([3; 32]);
            let shards = stripe_codec.encode(id, &stripe_bytes(1000, 1)).unwrap();
            assert_eq!(
                stripe_codec.decode(id, &shards[..3]),
                Err(ErasureError::NotEnoughShards {
                    available: 3,
                    needed: 4
                })
            );
            let duplicated = vec![
                shards[0].clone(),
                shards[0].clone(),
                shards[1].clone(),
                shards[2].clone(),
            ];
            assert!(matches!(
                stripe_codec.decode(id, &duplicated),
                Err(ErasureError::NotEnoughShards { .. })
            ));
            assert!(matches!(
                stripe_codec.decode(StripeId([4; 32]), &shards),
                Err(ErasureError::Mismatch(_))
            ));
        }
    }

    #[test]
    fn invalid_parameters_and_oversized_stripes_are_refused() {
        assert!(StripeCodec::new(CodecId::DEFAULT, 0, 2).is_err());
        assert!(StripeCodec::new(CodecId::DEFAULT, 33, 2).is_err());
        assert!(StripeCodec::new(CodecId::DEFAULT, 4, 17).is_err());
        let codec = StripeCodec::new(CodecId::DEFAULT, 4, 2).unwrap();
        let oversized = vec![0u8; STRIPE_LENGTH_BYTES_MAX as usize + 1];
        assert!(matches!(
            codec.encode(StripeId([0; 32]), &oversized),
            Err(ErasureError::StripeTooLarge { .. })
        ));
    }

    #[test]
    fn shard_bytes_round_trip_and_any_flipped_bit_is_caught() {
        let codec = StripeCodec::new(CodecId::ReedSolomonSimd, 2, 1).unwrap();
        let shard = codec
            .encode(StripeId([5; 32]), &stripe_bytes(200, 9))
            .unwrap()
            .remove(2);
        let bytes = shard.to_bytes();
        assert_eq!(Shard::from_bytes(&bytes).unwrap(), shard);
        for position in 0..bytes.len() {
            let mut flipped = bytes.clone();
            flipped[position] ^= 0x10;
            assert!(Shard::from_bytes(&flipped).is_err(), "flip at {position} not detected");
        }
        assert!(matches!(
            Shard::from_bytes(&bytes[..bytes.len() - 1]),
            Err(ShardDecodeError::LengthMismatch { .. })
        ));
        assert!(matches!(
            Shard::from_bytes(&bytes[..10]),
            Err(ShardDecodeError::TooShort { .. })
        ));
    }

    /// A shard from an authenticated transport is parsed with the same header checks but
    /// no checksum pass: a payload flip gets through (and `checksum_matches` finds it),
    /// a header that makes no sense does not.
    #[test]
    fn shards_from_an_authenticated_transport_skip_only_the_checksum() {
        let codec = StripeCodec::new(CodecId::ReedSolomonSimd, 2, 1).unwrap();
        let shard = codec
            .encode(StripeId([5; 32]), &stripe_bytes(200, 9))
            .unwrap()
            .remove(1);
        let bytes = shard.to_bytes();
        let trusted = Shard::from_authenticated_transport(Bytes::from(bytes.clone())).unwrap();
        assert_eq!(trusted, shard);
        assert!(trusted.checksum_matches());
        let mut payload_flipped = bytes.clone();
        *payload_flipped.last_mut().unwrap() ^= 0x10;
        let garbled = Shard::from_authenticated_transport(Bytes::from(payload_flipped.clone())).unwrap();
        assert!(!garbled.checksum_matches());
        assert!(matches!(
            Shard::from_bytes(&payload_flipped),
            Err(ShardDecodeError::ChecksumMismatch)
        ));
        for (position, value) in [(0, b'X'), (4, 99), (5, 200), (8, 3), (9, 1), (52, 7), (56, 1)] {
            let mut broken = bytes.clone();
            broken[position] = value;
            assert!(
                Shard::from_authenticated_transport(Bytes::from(broken)).is_err(),
                "header byte {position} = {value} accepted"
            );
        }
        assert!(Shard::from_authenticated_transport(Bytes::from(bytes[..bytes.len() - 1].to_vec())).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(160))]

        /// k in 1..=16, m in 0..=8, odd lengths and empty input, random erasures of up to m.
        #[test]
        fn random_codes_lengths_and_erasures_round_trip(
            codec_index in 0usize..2,
            data_shards in 1u8..=16,
            parity_shards in 0u8..=8,
            length in prop_oneof![Just(0usize), 1usize..4096, 4096usize..70_000],
            erase_seed in any::<u64>(),
        ) {
            let codec = StripeCodec::new(CodecId::ALL[codec_index], data_shards, parity_shards).unwrap();
            let stripe = stripe_bytes(length, data_shards);
            let id = StripeId([parity_shards; 32]);
            let shards = codec.encode(id, &stripe).unwrap();
            // Erase up to m shards chosen by a small deterministic shuffle of erase_seed.
            let total = usize::from(codec.total_shards());
            let mut order: Vec<usize> = (0..total).collect();
            let mut state = erase_seed | 1;
            for i in (1..total).rev() {
                state ^= state << 13; state ^= state >> 7; state ^= state << 17;
                order.swap(i, (state % (i as u64 + 1)) as usize);
            }
            let erased_count = (erase_seed % (u64::from(parity_shards) + 1)) as usize;
            let erased: Vec<u8> = order[..erased_count].iter().map(|i| *i as u8).collect();
            let survivors: Vec<Shard> = shards.iter().filter(|s| !erased.contains(&s.header.index)).cloned().collect();
            prop_assert_eq!(codec.decode(id, &survivors).unwrap(), stripe);
            for shard in codec.rebuild(id, &survivors, &erased).unwrap() {
                prop_assert_eq!(&shard, &shards[usize::from(shard.header.index)]);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_shard_parser(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Shard::from_bytes(&bytes);
            let _ = Shard::from_authenticated_transport(Bytes::from(bytes.clone()));
            let mut with_magic = b"BDRS\x01\x02".to_vec();
            with_magic.extend_from_slice(&bytes);
            let _ = Shard::from_bytes(&with_magic);
            let _ = Shard::from_authenticated_transport(Bytes::from(with_magic));
        }
    }
}
