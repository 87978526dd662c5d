//! Production runtime: the real environment (libp2p, tokio, files, sled) and the code
//! that assembles a running node from its config.

pub mod admin;
pub mod audit;
pub mod dev;
pub mod metrics;
pub mod network;
pub mod s3;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bdr_protocol::admission::ClusterSecret;
use bdr_protocol::ids::NodeId;
use bdr_protocol::layout::{NodeSpec, NodeStatus};
use bdr_protocol::wire::{Request, Response};
use rand::{RngCore, SeedableRng};

use crate::cluster::data::DataKeys;
use crate::cluster::membership::MembershipConfig;
use crate::cluster::{ClusterInbound, ClusterNode};
use crate::config::NodeConfig;
use crate::env::{BoxFuture, Env, MetaStore, NetworkError, ShardStore};
use crate::identity::NodeIdentity;
use crate::stores::file_shards::FileShardStore;
use crate::stores::sled_meta::SledMetaStore;
use bdr_protocol::envelope::RootKey;
use network::{NetworkHandle, NetworkSettings};

/// Keeps the megabyte buffers of the data path (stripes, shards, frames) in the process
/// between uses. glibc serves allocations above its mmap threshold (128 KiB, adapting up
/// to 32 MiB) with fresh mappings and unmaps them on free, so every stripe paid page
/// faults and kernel zeroing for each of its buffers: 6-11% of a node's CPU during a put
/// in profiles. Served from the heap and trimmed only above 256 MiB free, they are reused.
/// Call once at start, before the runtime's threads exist.
pub fn tune_allocator_for_large_buffers() {
    /// Allocations up to this size come from the heap (reused) instead of fresh mappings;
    /// glibc's own ceiling for it on 64-bit, and well above a stripe's buffers.
    const MMAP_THRESHOLD_BYTES: i32 = 32 * 1024 * 1024;
    /// Free heap memory kept before it is handed back to the kernel.
    const TRIM_THRESHOLD_BYTES: i32 = 256 * 1024 * 1024;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (parameter, name, value) in [
        (libc::M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD", MMAP_THRESHOLD_BYTES),
        (libc::M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD", TRIM_THRESHOLD_BYTES),
    ] {
        // SAFETY: mallopt only sets allocator parameters; called before other threads start.
        if unsafe { libc::mallopt(parameter, value) } == 0 {
            tracing::warn!(
                parameter = name,
                value,
                "the allocator refused a setting; buffers are mapped anew"
            );
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES);
}

pub struct ProductionEnv {
    node_id: NodeId,
    network: NetworkHandle,
    shard_store: Arc<dyn ShardStore>,
    meta_store: Arc<dyn MetaStore>,
    rng: Mutex<rand_chacha::ChaCha12Rng>,
}

impl Env for ProductionEnv {
    fn node_id(&self) -> NodeId {
        self.node_id
    }

    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|elapsed| elapsed.as_millis() as u64)
            .unwrap_or(0)
    }

    fn sleep(&self, duration_ms: u64) -> BoxFuture<'static, ()> {
        Box::pin(tokio::time::sleep(std::time::Duration::from_millis(duration_ms)))
    }

    fn spawn(&self, name: &'static str, task: BoxFuture<'static, ()>) {
        tracing::trace!(task = name, "spawn");
        tokio::spawn(task);
    }

    fn random_u64(&self) -> u64 {
        self.rng.lock().expect("not poisoned").next_u64()
    }

    fn request(
        &self,
        to: NodeId,
        request: Request,
        timeout_ms: u64,
    ) -> BoxFuture<'static, Result<Response, NetworkError>> {
        let network = self.network.clone();
        Box::pin(async move {
            tokio::time::timeout(
                std::time::Duration::from_millis(timeout_ms),
                network.request(to, request),
            )
            .await
            .unwrap_or_else(|_| Err(NetworkError::Timeout(to.short())))
        })
    }

    fn remember_addresses(&self, node: NodeId, addresses: &[String]) {
        self.network.remember_addresses(node, addresses);
    }

    fn local_addresses(&self) -> Vec<String> {
        self.network.local_addresses()
    }

    fn shard_store(&self) -> Arc<dyn ShardStore> {
        Arc::clone(&self.shard_store)
    }

    fn meta_store(&self) -> Arc<dyn MetaStore> {
        Arc::clone(&self.meta_store)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Identity(#[from] crate::identity::IdentityError),
    #[error("cannot read the key file {path}: {reason}")]
    Secret { path: String, reason: String },
    #[error("cannot open the {what} store: {reason}")]
    Store { what: &'static str, reason: String },
    #[error("{0}")]
    Network(#[from] network::NetworkStartError),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("admin API: {0}")]
    Admin(String),
    #[error("S3 gateway: {0}")]
    S3(String),
}

pub fn read_cluster_secret(path: &Path) -> Result<ClusterSecret, StartError> {
    let secret_error = |reason: String| StartError::Secret {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|error| secret_error(error.to_string()))?;
    ClusterSecret::from_hex(&text).map_err(|error| secret_error(error.to_string()))
}

/// A running node: its cluster logic and the addresses it serves on.
pub struct RunningNode {
    pub cluster: Arc<ClusterNode<ProductionEnv>>,
    pub admin_address: std::net::SocketAddr,
    /// Where S3 is served (gateway nodes with a data key only).
    pub s3_address: Option<std::net::SocketAddr>,
}

/// Starts a node from its config: identity, stores, network, cluster logic, admin API.
pub async fn start_node(config: &NodeConfig) -> Result<RunningNode, StartError> {
    let cluster = start_cluster_node(config).await?;
    let token = admin::load_or_create_token(&config.admin_token_file).map_err(StartError::Admin)?;
    let serves_s3 = config.roles.gateway && config.data_key_file.is_some();
    let gateway_metrics = serves_s3.then(|| Arc::new(metrics::GatewayMetrics::default()));
    let audit = Arc::new(audit::AuditLog::open(&config.data_dir.join("audit")).map_err(StartError::Admin)?);
    let admin_address = admin::serve(
        config.admin_listen,
        token,
        Arc::clone(&cluster),
        gateway_metrics.clone(),
        Arc::clone(&audit),
    )
    .await
    .map_err(StartError::Admin)?;
    let s3_address = match gateway_metrics {
        Some(gateway_metrics) => Some(
            s3::serve(
                config.s3_listen,
                config.s3_region.clone(),
                Arc::clone(&cluster),
                Arc::new(metrics::S3Observer {
                    metrics: gateway_metrics,
                    audit,
                }),
            )
            .await
            .map_err(StartError::S3)?,
        ),
        None => None,
    };
    tracing::info!(
        node = %cluster.env().node_id(),
        zone = %config.zone,
        admin = %admin_address,
        s3 = ?s3_address,
        "node started"
    );
    Ok(RunningNode {
        cluster,
        admin_address,
        s3_address,
    })
}

/// Starts a node's cluster side (identity, stores, network, cluster logic) without its
/// HTTP servers.
pub async fn start_cluster_node(config: &NodeConfig) -> Result<Arc<ClusterNode<ProductionEnv>>, StartError> {
    let secret = read_cluster_secret(&config.cluster_secret_file)?;
    let (identity, created) = NodeIdentity::load_or_create(&config.data_dir)?;
    if created {
        tracing::info!(node = %identity.node_id, "created a new node identity");
    }
    let shard_store =
        FileShardStore::open(&config.data_dir.join("shards"), config.capacity_bytes).map_err(|error| {
            StartError::Store {
                what: "shard",
                reason: error.to_string(),
            }
        })?;
    let meta_store = SledMetaStore::open(&config.data_dir.join("meta")).map_err(|error| StartError::Store {
        what: "metadata",
        reason: error.to_string(),
    })?;
    let data_keys = match &config.data_key_file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|error| StartError::Secret {
                path: path.display().to_string(),
                reason: error.to_string(),
            })?;
            let root = RootKey::from_hex(&text).ok_or_else(|| StartError::Secret {
                path: path.display().to_string(),
                reason: "must hold 64 hex characters (make one with `bdr-node gen-secret`)".into(),
            })?;
            Some(DataKeys::from_root(&root))
        }
        None => {
            if config.roles.gateway {
                tracing::warn!("no data_key_file: this gateway cannot read or write object data");
            }
            None
        }
    };
    let network = network::start(
        &identity,
        NetworkSettings {
            listen: config.listen.clone(),
            bootstrap: config.bootstrap.clone(),
            secret,
        },
    )?;
    let env = Arc::new(ProductionEnv {
        node_id: identity.node_id,
        network: network.clone(),
        shard_store: Arc::new(shard_store),
        meta_store: Arc::new(meta_store),
        rng: Mutex::new(rand_chacha::ChaCha12Rng::from_os_rng()),
    });
    let cluster = ClusterNode::start(
        env,
        MembershipConfig {
            down_after_ms: config.down_after_ms,
            gossip_interval_ms: config.gossip_interval_ms,
            anti_entropy_interval_ms: config.anti_entropy_interval_ms,
            tombstone_grace_ms: config.tombstone_grace_ms,
        },
        config.maintenance,
        NodeSpec {
            zone: config.zone.clone(),
            capacity_bytes: config.capacity_bytes,
            roles: config.roles,
            status: NodeStatus::Active,
        },
        data_keys,
    )
    .await?;
    network
        .bind_handler(Arc::new(ClusterInbound(Arc::clone(&cluster))))
        .await;
    tracing::info!(node = %identity.node_id, peer = %identity.peer_id, zone = %config.zone, "cluster node started");
    Ok(cluster)
}
