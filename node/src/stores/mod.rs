//! Shard and metadata stores: files and sled in production, memory for tests and the
//! simulator. All implement the traits in [`crate::env`].

pub mod file_shards;
pub mod memory;
pub mod sled_meta;

#[cfg(test)]
mod tests;
