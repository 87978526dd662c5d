//! bdr-node: the storage node daemon.
//!
//! * [`cluster`] — the cluster logic (membership, failure detection; later the data path,
//!   repair and rebalance), written only against [`env::Env`] so the simulator can run it.
//! * [`env`] — the environment traits: network, clock and timers, stores, RNG.
//! * [`stores`] — shard store (files) and metadata store (sled), plus in-memory versions.
//! * [`runtime`] — the production environment (libp2p, tokio, files, sled) and the admin API.
//! * [`config`], [`identity`] — the node's TOML config and its ed25519 identity.

pub mod cluster;
pub mod config;
pub mod env;
pub mod identity;
pub mod runtime;
pub mod stores;
