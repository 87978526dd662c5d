//! bdr-protocol: the pure core of bdr.
//!
//! Everything here is deterministic computation on values: no IO, no tokio, no clock
//! reads and no OS randomness. Time and random bytes come in as arguments. That is what
//! lets the node logic built on top run unchanged in the deterministic simulator, and
//! `tests/purity.rs` enforces it.

pub mod admission;
pub mod envelope;
pub mod erasure;
pub mod hlc;
pub mod ids;
pub mod layout;
pub mod placement;
pub mod records;
pub mod wire;

pub use erasure::{CodecId, Shard, StripeCodec};
pub use hlc::{HlcTimestamp, HybridClock};
pub use ids::{ChunkId, NodeId, StripeId, ZoneName};
pub use layout::Layout;
