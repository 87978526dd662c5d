//! `bdr-node dev`: a whole cluster in one process, for trying bdr and for tests.
//!
//! Real nodes (real libp2p on loopback, real file and sled stores under one folder) over
//! several zones; node 0 serves S3 and the admin API. The folder keeps everything: the
//! cluster secret, the data key, each node's identity and data, the admin token and the
//! S3 credentials, so restarting with the same folder brings back the same cluster.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bdr_protocol::ids::ZoneName;
use bdr_protocol::layout::NodeRoles;

use super::{admin, s3, start_cluster_node, ProductionEnv, StartError};
use crate::cluster::maintenance::MaintenanceConfig;
use crate::cluster::membership::Liveness;
use crate::cluster::ClusterNode;
use crate::config::{NodeConfig, DEFAULT_REGION, DEFAULT_TOMBSTONE_GRACE_MS};
use crate::env::Env;

pub const DEV_NODES_MAX: u32 = 32;
const DEV_CAPACITY_BYTES: u64 = 100 << 30;
/// How long start-up may take before `dev` gives up.
const DEV_START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct DevOptions {
    pub data_dir: PathBuf,
    pub nodes: u32,
    pub zones: u32,
    pub s3_listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

pub struct DevCluster {
    pub nodes: Vec<Arc<ClusterNode<ProductionEnv>>>,
    pub s3_endpoint: String,
    pub admin_endpoint: String,
    pub region: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub admin_token: String,
    pub credentials_file: PathBuf,
}

fn dev_error(message: impl Into<String>) -> StartError {
    StartError::Admin(message.into())
}

/// Writes `text` to `path` with mode 0600 unless the file exists.
fn create_private_file(path: &Path, text: &str) -> Result<(), StartError> {
    if path.exists() {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| dev_error(format!("cannot create {}: {error}", path.display())))?;
    file.write_all(text.as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|error| dev_error(format!("cannot write {}: {error}", path.display())))
}

fn write_private_file(path: &Path, text: &str) -> Result<(), StartError> {
    let temporary = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    create_private_file(&temporary, text)?;
    std::fs::rename(&temporary, path).map_err(|error| dev_error(format!("cannot write {}: {error}", path.display())))
}

/// Reads `KEY=value` or `export KEY=value` lines.
fn read_env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let line = line.trim().strip_prefix("export ").unwrap_or(line.trim());
            let (key, value) = line.split_once('=')?;
            Some((key.trim().to_string(), value.trim().trim_matches('\'').to_string()))
        })
        .collect()
}

async fn wait_until<F: Fn() -> bool>(what: &str, check: F) -> Result<(), StartError> {
    let deadline = tokio::time::Instant::now() + DEV_START_TIMEOUT;
    while !check() {
        if tokio::time::Instant::now() > deadline {
            return Err(dev_error(format!("dev cluster: timed out waiting for {what}")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

pub async fn start_dev(options: &DevOptions) -> Result<DevCluster, StartError> {
    if options.nodes == 0 || options.nodes > DEV_NODES_MAX {
        return Err(dev_error(format!("--nodes must be 1..={DEV_NODES_MAX}")));
    }
    if options.zones == 0 || options.zones > options.nodes {
        return Err(dev_error("--zones must be 1..=--nodes"));
    }
    let root = &options.data_dir;
    std::fs::create_dir_all(root).map_err(|error| dev_error(format!("cannot create {}: {error}", root.display())))?;
    let secret_file = root.join("cluster.secret");
    let data_key_file = root.join("data.key");
    create_private_file(&secret_file, &format!("{}\n", hex::encode(rand::random::<[u8; 32]>())))?;
    create_private_file(
        &data_key_file,
        &format!("{}\n", hex::encode(rand::random::<[u8; 32]>())),
    )?;
    let admin_token_file = root.join("admin.token");

    let mut nodes: Vec<Arc<ClusterNode<ProductionEnv>>> = Vec::new();
    let mut bootstrap = Vec::new();
    for index in 0..options.nodes {
        let config = NodeConfig {
            data_dir: root.join(format!("node-{index}")),
            zone: ZoneName::new(format!("zone-{}", index % options.zones)).expect("valid zone name"),
            capacity_bytes: DEV_CAPACITY_BYTES,
            roles: NodeRoles::STORAGE_AND_GATEWAY,
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr")],
            bootstrap: bootstrap.clone(),
            cluster_secret_file: secret_file.clone(),
            data_key_file: Some(data_key_file.clone()),
            down_after_ms: 10_000,
            gossip_interval_ms: 500,
            anti_entropy_interval_ms: 10_000,
            tombstone_grace_ms: DEFAULT_TOMBSTONE_GRACE_MS,
            s3_listen: options.s3_listen,
            s3_region: DEFAULT_REGION.to_string(),
            admin_listen: options.admin_listen,
            admin_token_file: admin_token_file.clone(),
            // A laptop cluster: heal and tidy up within a minute, scrub daily.
            maintenance: MaintenanceConfig {
                repair_interval_ms: 10_000,
                scrub_interval_ms: 24 * 3_600_000,
                gc_grace_ms: 60_000,
                write_deadline_ms: 3_600_000,
                ..MaintenanceConfig::DEFAULT
            },
        };
        let node = start_cluster_node(&config).await?;
        if index == 0 {
            // Everyone else bootstraps from node 0's (ephemeral) address.
            let first = Arc::clone(&node);
            wait_until("node 0 to listen", || !first.env().local_addresses().is_empty()).await?;
            bootstrap = node
                .env()
                .local_addresses()
                .iter()
                .filter_map(|address| address.parse().ok())
                .collect();
        }
        nodes.push(node);
    }
    let expected = options.nodes as usize;
    let all = nodes.clone();
    wait_until("every node to see every node up, holding its metadata", || {
        all.iter().all(|node| {
            let status = node.status();
            node.is_joined()
                && status.nodes.len() == expected
                && status
                    .nodes
                    .iter()
                    .all(|entry| entry.state == Liveness::Up && entry.metadata_synced)
        })
    })
    .await?;

    // S3 credentials: reuse the saved key if the cluster still knows it.
    let credentials_file = root.join("credentials.env");
    let saved = read_env_file(&credentials_file);
    let saved_value = |name: &str| {
        saved
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let gateway = Arc::clone(&nodes[0]);
    let known = match saved_value("AWS_ACCESS_KEY_ID") {
        Some(key_id) => gateway.access_key(&key_id).await.ok().flatten(),
        None => None,
    };
    let key = match known {
        Some(key) => key,
        None => gateway
            .create_access_key("dev", true)
            .await
            .map_err(|error| dev_error(format!("cannot create an access key: {error}")))?,
    };
    let admin_token = admin::load_or_create_token(&admin_token_file).map_err(StartError::Admin)?;
    let gateway_metrics = Arc::new(super::metrics::GatewayMetrics::default());
    let audit = Arc::new(super::audit::AuditLog::open(&root.join("audit")).map_err(StartError::Admin)?);
    let s3_address = s3::serve(
        options.s3_listen,
        DEFAULT_REGION.to_string(),
        Arc::clone(&gateway),
        Arc::new(super::metrics::S3Observer {
            metrics: Arc::clone(&gateway_metrics),
            audit: Arc::clone(&audit),
        }),
    )
    .await
    .map_err(StartError::S3)?;
    let admin_address = admin::serve(
        options.admin_listen,
        admin_token.clone(),
        Arc::clone(&gateway),
        Some(gateway_metrics),
        audit,
    )
    .await
    .map_err(StartError::Admin)?;
    let cluster = DevCluster {
        nodes,
        s3_endpoint: format!("http://{s3_address}"),
        admin_endpoint: format!("http://{admin_address}"),
        region: DEFAULT_REGION.to_string(),
        access_key_id: key.key_id,
        secret_access_key: key.secret_key,
        admin_token,
        credentials_file,
    };
    write_private_file(
        &cluster.credentials_file,
        &format!(
            "export AWS_ACCESS_KEY_ID={}\nexport AWS_SECRET_ACCESS_KEY={}\nexport AWS_DEFAULT_REGION={}\n\
             export AWS_ENDPOINT_URL={}\nexport BDR_ADMIN_ENDPOINT={}\nexport BDR_ADMIN_TOKEN={}\n\
             export BDR_ADMIN_TOKEN_FILE={}\n",
            cluster.access_key_id,
            cluster.secret_access_key,
            cluster.region,
            cluster.s3_endpoint,
            cluster.admin_endpoint,
            cluster.admin_token,
            admin_token_file.display()
        ),
    )?;
    Ok(cluster)
}
