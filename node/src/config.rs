//! `bdr-node run --config FILE`: the node's TOML configuration.
//!
//! ```toml
//! data_dir = "/var/lib/bdr"                 # required
//! zone = "office-berlin"                    # required: [a-z0-9._-], 1..=64 bytes
//! capacity = "500 GiB"                      # required, > 0: bytes this node offers for shards
//! roles = ["storage", "gateway"]            # default: both
//! listen = ["/ip4/0.0.0.0/tcp/3901", "/ip4/0.0.0.0/udp/3901/quic-v1"]   # default
//! bootstrap = ["/ip4/10.0.0.2/tcp/3901/p2p/12D3KooW..."]              # default: none
//! cluster_secret_file = "/etc/bdr/cluster.secret"                      # required
//! data_key_file = "/etc/bdr/data.key"       # gateways: the key that encrypts object data
//! down_after = "10m"                        # default; silent this long = down
//! gossip_interval = "1s"                    # default
//! anti_entropy_interval = "60s"             # default; metadata replicas compared this often
//! tombstone_grace = "24h"                   # default; deleted metadata kept this long
//!
//! [s3]
//! listen = "127.0.0.1:9000"                 # default
//! region = "bdr"                            # default
//!
//! [admin]
//! listen = "127.0.0.1:9001"                 # default
//! token_file = "admin.token"                # default: <data_dir>/admin.token, created if missing
//!
//! [maintenance]
//! repair_interval = "60s"                   # default; time between repair passes
//! repair_rate = "64 MiB"                    # default; repair writes at most this per second ("0": unpaced)
//! scrub_interval = "7d"                     # default; every shard re-verified this often
//! scrub_rate = "16 MiB"                     # default; scrub reads at most this per second ("0": unpaced)
//! gc_grace = "1h"                           # default; garbage waits this long before deletion
//! write_deadline = "1h"                     # default; one PUT or part must commit within this long
//! ```
//!
//! Relative paths are relative to the config file's directory. Every error names its key
//! in one line; nothing here panics on bad input.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use bdr_protocol::ids::ZoneName;
use bdr_protocol::layout::NodeRoles;

use crate::cluster::maintenance::MaintenanceConfig;
use libp2p::Multiaddr;
use serde::Deserialize;

pub const DEFAULT_LISTEN: [&str; 2] = ["/ip4/0.0.0.0/tcp/3901", "/ip4/0.0.0.0/udp/3901/quic-v1"];
pub const DEFAULT_DOWN_AFTER_MS: u64 = 10 * 60 * 1000;
pub const DEFAULT_GOSSIP_INTERVAL_MS: u64 = 1000;
pub const DEFAULT_ANTI_ENTROPY_INTERVAL_MS: u64 = 60 * 1000;
pub const DEFAULT_TOMBSTONE_GRACE_MS: u64 = 24 * 60 * 60 * 1000;
pub const ANTI_ENTROPY_INTERVAL_MS_MIN: u64 = 100;
pub const DEFAULT_S3_LISTEN: &str = "127.0.0.1:9000";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9001";
pub const DEFAULT_REGION: &str = "bdr";
/// Gossip more often than this would only burn CPU; less often than `down_after` / 4 would
/// make failure detection flap.
pub const GOSSIP_INTERVAL_MS_MIN: u64 = 50;
pub const BOOTSTRAP_PEERS_MAX: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Unreadable { path: String, reason: String },
    #[error("config error at line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("config error: `{key}` {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    data_dir: Option<PathBuf>,
    zone: Option<String>,
    capacity: Option<String>,
    roles: Option<Vec<String>>,
    listen: Option<Vec<String>>,
    bootstrap: Option<Vec<String>>,
    cluster_secret_file: Option<PathBuf>,
    data_key_file: Option<PathBuf>,
    down_after: Option<String>,
    gossip_interval: Option<String>,
    anti_entropy_interval: Option<String>,
    tombstone_grace: Option<String>,
    #[serde(default)]
    s3: RawS3,
    #[serde(default)]
    admin: RawAdmin,
    #[serde(default)]
    maintenance: RawMaintenance,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaintenance {
    repair_interval: Option<String>,
    repair_rate: Option<String>,
    scrub_interval: Option<String>,
    scrub_rate: Option<String>,
    gc_grace: Option<String>,
    write_deadline: Option<String>,
}

/// Below these, maintenance would spin or delete faster than views converge.
pub const REPAIR_INTERVAL_MS_MIN: u64 = 1_000;
pub const SCRUB_INTERVAL_MS_MIN: u64 = 60_000;
pub const WRITE_DEADLINE_MS_MIN: u64 = 10_000;
/// The longest a node request may take (shard writes time out after 30 s).
pub const GC_GRACE_MS_MIN: u64 = crate::cluster::data::SHARD_WRITE_TIMEOUT_MS;

fn parse_maintenance(raw: RawMaintenance, down_after_ms: u64) -> Result<MaintenanceConfig, ConfigError> {
    let defaults = MaintenanceConfig::DEFAULT;
    let duration = |key: &'static str, text: Option<String>, default: u64, minimum: u64| {
        let value = match text {
            Some(text) => parse_duration_ms(&text).map_err(|message| invalid(key, message))?,
            None => default,
        };
        if value < minimum {
            return Err(invalid(key, format!("must be at least {minimum} ms")));
        }
        Ok(value)
    };
    let rate = |key: &'static str, text: Option<String>, default: u64| match text {
        Some(text) => parse_size_bytes(&text).map_err(|message| invalid(key, message)),
        None => Ok(default),
    };
    let config = MaintenanceConfig {
        repair_interval_ms: duration(
            "maintenance.repair_interval",
            raw.repair_interval,
            defaults.repair_interval_ms,
            REPAIR_INTERVAL_MS_MIN,
        )?,
        repair_rate_bytes_per_s: rate(
            "maintenance.repair_rate",
            raw.repair_rate,
            defaults.repair_rate_bytes_per_s,
        )?,
        scrub_interval_ms: duration(
            "maintenance.scrub_interval",
            raw.scrub_interval,
            defaults.scrub_interval_ms,
            SCRUB_INTERVAL_MS_MIN,
        )?,
        scrub_rate_bytes_per_s: rate(
            "maintenance.scrub_rate",
            raw.scrub_rate,
            defaults.scrub_rate_bytes_per_s,
        )?,
        // Deleting garbage before every node agrees on who is down would race, and so would
        // deleting a stripe whose writer's last request (sent within the write deadline)
        // may still be in flight.
        gc_grace_ms: duration(
            "maintenance.gc_grace",
            raw.gc_grace,
            defaults.gc_grace_ms,
            down_after_ms.max(GC_GRACE_MS_MIN),
        )?,
        write_deadline_ms: duration(
            "maintenance.write_deadline",
            raw.write_deadline,
            defaults.write_deadline_ms,
            WRITE_DEADLINE_MS_MIN,
        )?,
    };
    Ok(config)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawS3 {
    listen: Option<String>,
    region: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub zone: ZoneName,
    pub capacity_bytes: u64,
    pub roles: NodeRoles,
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub cluster_secret_file: PathBuf,
    /// The root of the data key ring; gateway nodes only.
    pub data_key_file: Option<PathBuf>,
    pub down_after_ms: u64,
    pub gossip_interval_ms: u64,
    pub anti_entropy_interval_ms: u64,
    pub tombstone_grace_ms: u64,
    pub s3_listen: SocketAddr,
    pub s3_region: String,
    pub admin_listen: SocketAddr,
    pub admin_token_file: PathBuf,
    pub maintenance: MaintenanceConfig,
}

/// Parses "500 GiB", "1.5TB", "1048576" into bytes.
pub fn parse_size_bytes(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|error| format!("{text:?} is not a size like \"500 GiB\": {error}"))
}

/// Parses "10m", "3s", "1h 30m", "250ms" into milliseconds.
pub fn parse_duration_ms(text: &str) -> Result<u64, String> {
    humantime::parse_duration(text.trim())
        .map(|duration| duration.as_millis().min(u128::from(u64::MAX)) as u64)
        .map_err(|error| format!("{text:?} is not a duration like \"10m\" or \"3s\": {error}"))
}

fn parse_multiaddrs(key: &'static str, texts: Vec<String>) -> Result<Vec<Multiaddr>, ConfigError> {
    texts
        .into_iter()
        .map(|text| {
            text.parse::<Multiaddr>()
                .map_err(|error| invalid(key, format!("has a bad multiaddr {text:?}: {error}")))
        })
        .collect()
}

fn parse_socket_address(key: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse()
        .map_err(|error| invalid(key, format!("{text:?} is not an address like 127.0.0.1:9000: {error}")))
}

impl NodeConfig {
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Unreadable {
            path: path.display().to_string(),
            reason: error.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        NodeConfig::parse(&text, base)
    }

    /// Parses config text; relative paths are resolved against `base`.
    pub fn parse(text: &str, base: &Path) -> Result<NodeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| {
            let line = error
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
                .unwrap_or(0);
            ConfigError::Syntax {
                line,
                message: error.message().replace('\n', " "),
            }
        })?;
        let resolve = |path: PathBuf| if path.is_absolute() { path } else { base.join(path) };

        let data_dir = resolve(raw.data_dir.ok_or_else(|| invalid("data_dir", "is required"))?);
        let zone_text = raw.zone.ok_or_else(|| invalid("zone", "is required"))?;
        let zone = ZoneName::new(zone_text).map_err(|error| invalid("zone", error.to_string()))?;
        let capacity_text = raw
            .capacity
            .ok_or_else(|| invalid("capacity", "is required, like \"500 GiB\""))?;
        let capacity_bytes = parse_size_bytes(&capacity_text).map_err(|message| invalid("capacity", message))?;
        if capacity_bytes == 0 {
            return Err(invalid("capacity", "must be greater than zero"));
        }
        let roles = match raw.roles {
            None => NodeRoles::STORAGE_AND_GATEWAY,
            Some(names) => {
                let mut roles = NodeRoles {
                    storage: false,
                    gateway: false,
                };
                for name in &names {
                    match name.as_str() {
                        "storage" => roles.storage = true,
                        "gateway" => roles.gateway = true,
                        other => {
                            return Err(invalid(
                                "roles",
                                format!("has unknown role {other:?} (storage, gateway)"),
                            ))
                        }
                    }
                }
                if !roles.storage && !roles.gateway {
                    return Err(invalid("roles", "must name at least one of storage, gateway"));
                }
                roles
            }
        };
        let listen = parse_multiaddrs(
            "listen",
            raw.listen
                .unwrap_or_else(|| DEFAULT_LISTEN.iter().map(|text| text.to_string()).collect()),
        )?;
        if listen.is_empty() {
            return Err(invalid("listen", "must have at least one address"));
        }
        let bootstrap = parse_multiaddrs("bootstrap", raw.bootstrap.unwrap_or_default())?;
        if bootstrap.len() > BOOTSTRAP_PEERS_MAX {
            return Err(invalid(
                "bootstrap",
                format!("has more than {BOOTSTRAP_PEERS_MAX} addresses"),
            ));
        }
        let cluster_secret_file = resolve(raw.cluster_secret_file.ok_or_else(|| {
            invalid(
                "cluster_secret_file",
                "is required (create one with `bdr-node gen-secret`)",
            )
        })?);
        let data_key_file = raw.data_key_file.map(resolve);
        if data_key_file.is_some() && !roles.gateway {
            return Err(invalid(
                "data_key_file",
                "must not be set on a storage-only node: storage nodes never hold data keys",
            ));
        }
        let down_after_ms = match raw.down_after {
            Some(text) => parse_duration_ms(&text).map_err(|message| invalid("down_after", message))?,
            None => DEFAULT_DOWN_AFTER_MS,
        };
        let gossip_interval_ms = match raw.gossip_interval {
            Some(text) => parse_duration_ms(&text).map_err(|message| invalid("gossip_interval", message))?,
            None => DEFAULT_GOSSIP_INTERVAL_MS
                .min(down_after_ms / 4)
                .max(GOSSIP_INTERVAL_MS_MIN),
        };
        if gossip_interval_ms < GOSSIP_INTERVAL_MS_MIN {
            return Err(invalid(
                "gossip_interval",
                format!("must be at least {GOSSIP_INTERVAL_MS_MIN} ms"),
            ));
        }
        if down_after_ms < gossip_interval_ms * 4 {
            return Err(invalid(
                "down_after",
                format!("must be at least 4 gossip intervals ({} ms)", gossip_interval_ms * 4),
            ));
        }
        let anti_entropy_interval_ms = match raw.anti_entropy_interval {
            Some(text) => parse_duration_ms(&text).map_err(|message| invalid("anti_entropy_interval", message))?,
            None => DEFAULT_ANTI_ENTROPY_INTERVAL_MS,
        };
        if anti_entropy_interval_ms < ANTI_ENTROPY_INTERVAL_MS_MIN {
            return Err(invalid(
                "anti_entropy_interval",
                format!("must be at least {ANTI_ENTROPY_INTERVAL_MS_MIN} ms"),
            ));
        }
        let tombstone_grace_ms = match raw.tombstone_grace {
            Some(text) => parse_duration_ms(&text).map_err(|message| invalid("tombstone_grace", message))?,
            None => DEFAULT_TOMBSTONE_GRACE_MS,
        };
        if tombstone_grace_ms < down_after_ms {
            return Err(invalid("tombstone_grace", "must be at least down_after"));
        }
        let maintenance = parse_maintenance(raw.maintenance, down_after_ms)?;
        let s3_listen = parse_socket_address("s3.listen", raw.s3.listen.as_deref().unwrap_or(DEFAULT_S3_LISTEN))?;
        let s3_region = raw.s3.region.unwrap_or_else(|| DEFAULT_REGION.to_string());
        if s3_region.is_empty() || s3_region.len() > 64 {
            return Err(invalid("s3.region", "must be 1..=64 characters"));
        }
        let admin_listen = parse_socket_address(
            "admin.listen",
            raw.admin.listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        )?;
        let admin_token_file = raw
            .admin
            .token_file
            .map(resolve)
            .unwrap_or_else(|| data_dir.join("admin.token"));
        Ok(NodeConfig {
            data_dir,
            zone,
            capacity_bytes,
            roles,
            listen,
            bootstrap,
            cluster_secret_file,
            data_key_file,
            down_after_ms,
            gossip_interval_ms,
            anti_entropy_interval_ms,
            tombstone_grace_ms,
            s3_listen,
            s3_region,
            admin_listen,
            admin_token_file,
            maintenance,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
data_dir = "data"
zone = "a"
capacity = "500 GiB"
cluster_secret_file = "/etc/bdr/secret"
"#;

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let config = NodeConfig::parse(MINIMAL, Path::new("/etc/bdr")).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/etc/bdr/data"));
        assert_eq!(config.capacity_bytes, 500 * 1024 * 1024 * 1024);
        assert_eq!(config.roles, NodeRoles::STORAGE_AND_GATEWAY);
        assert_eq!(config.listen.len(), 2);
        assert!(config.bootstrap.is_empty());
        assert_eq!(config.down_after_ms, DEFAULT_DOWN_AFTER_MS);
        assert_eq!(config.gossip_interval_ms, DEFAULT_GOSSIP_INTERVAL_MS);
        assert_eq!(config.admin_token_file, PathBuf::from("/etc/bdr/data/admin.token"));
        assert_eq!(config.s3_region, "bdr");
        assert_eq!(config.maintenance, MaintenanceConfig::DEFAULT);
    }

    #[test]
    fn full_config_parses() {
        let text = r#"
data_dir = "/var/lib/bdr"
zone = "office-berlin"
capacity = "1.5 TiB"
roles = ["storage"]
listen = ["/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/udp/0/quic-v1"]
bootstrap = ["/ip4/127.0.0.1/tcp/4001", "/dns4/node2.example/tcp/4001/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"]
cluster_secret_file = "secret"
down_after = "3s"
gossip_interval = "200ms"
[s3]
listen = "0.0.0.0:9000"
region = "eu-1"
[admin]
listen = "127.0.0.1:9101"
token_file = "/run/token"
[maintenance]
repair_interval = "5s"
repair_rate = "0"
scrub_interval = "1h"
scrub_rate = "1 MiB"
gc_grace = "40s"
write_deadline = "30s"
"#;
        let config = NodeConfig::parse(text, Path::new("/cfg")).unwrap();
        assert_eq!(config.roles, NodeRoles::STORAGE_ONLY);
        assert_eq!(config.bootstrap.len(), 2);
        assert_eq!(config.down_after_ms, 3000);
        assert_eq!(config.gossip_interval_ms, 200);
        assert_eq!(config.cluster_secret_file, PathBuf::from("/cfg/secret"));
        assert_eq!(config.admin_token_file, PathBuf::from("/run/token"));
        assert_eq!(
            config.maintenance,
            MaintenanceConfig {
                repair_interval_ms: 5_000,
                repair_rate_bytes_per_s: 0,
                scrub_interval_ms: 3_600_000,
                scrub_rate_bytes_per_s: 1 << 20,
                gc_grace_ms: 40_000,
                write_deadline_ms: 30_000,
            }
        );
    }

    /// Each bad config must fail with one line naming the offending key.
    #[test]
    fn bad_configs_name_the_key() {
        let cases: &[(&str, &str)] = &[
            ("unknown_key = 1", "unknown_key"),
            ("zone = \"Bad Zone\"", "`zone`"),
            ("capacity = \"0 GiB\"", "`capacity`"),
            ("capacity = \"lots\"", "`capacity`"),
            ("listen = [\"not-a-multiaddr\"]", "`listen`"),
            ("bootstrap = [\"/ip4/1.2.3.4/tcp/notaport\"]", "`bootstrap`"),
            ("down_after = \"soon\"", "`down_after`"),
            ("down_after = \"100ms\"", "`down_after`"),
            ("roles = [\"archer\"]", "`roles`"),
            ("roles = [\"storage\"]\ndata_key_file = \"k\"", "`data_key_file`"),
            ("[s3]\nlisten = \"nowhere\"", "`s3.listen`"),
            ("[admin]\nsurprise = true", "surprise"),
            (
                "[maintenance]\nrepair_interval = \"10ms\"",
                "`maintenance.repair_interval`",
            ),
            ("[maintenance]\nrepair_rate = \"fast\"", "`maintenance.repair_rate`"),
            ("[maintenance]\ngc_grace = \"1s\"", "`maintenance.gc_grace`"),
            ("[maintenance]\nwrite_deadline = \"1s\"", "`maintenance.write_deadline`"),
        ];
        for (line, expected) in cases {
            // Later keys override earlier ones in our test by replacing the minimal line.
            let key = line.split([' ', '\n']).next().unwrap();
            let mut text: String = MINIMAL
                .lines()
                .filter(|l| !l.starts_with(&format!("{key} ")))
                .collect::<Vec<_>>()
                .join("\n");
            text.push('\n');
            text.push_str(line);
            let error = NodeConfig::parse(&text, Path::new("/")).unwrap_err().to_string();
            assert!(error.contains(expected), "{line:?} gave {error:?}");
            assert!(!error.contains('\n'), "multi-line error: {error:?}");
        }
        for (missing, expected) in [
            ("zone", "`zone` is required"),
            ("capacity", "`capacity` is required"),
            ("cluster_secret_file", "`cluster_secret_file` is required"),
        ] {
            let text: String = MINIMAL
                .lines()
                .filter(|l| !l.starts_with(missing))
                .collect::<Vec<_>>()
                .join("\n");
            let error = NodeConfig::parse(&text, Path::new("/")).unwrap_err().to_string();
            assert!(error.contains(expected), "{error}");
        }
        assert!(matches!(
            NodeConfig::load(Path::new("/nonexistent/bdr.toml")),
            Err(ConfigError::Unreadable { .. })
        ));
    }

    #[test]
    fn the_example_config_in_deploy_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/node.example.toml");
        let config = NodeConfig::load(&path).unwrap();
        assert_eq!(config.zone.as_str(), "office-berlin");
        assert_eq!(config.bootstrap.len(), 2);
    }

    #[test]
    fn sizes_and_durations_parse_human_forms() {
        assert_eq!(parse_size_bytes("500 GiB").unwrap(), 500 << 30);
        assert_eq!(parse_size_bytes("1024").unwrap(), 1024);
        assert_eq!(parse_size_bytes("2 MB").unwrap(), 2_000_000);
        assert!(parse_size_bytes("-1 GiB").is_err());
        assert_eq!(parse_duration_ms("10m").unwrap(), 600_000);
        assert_eq!(parse_duration_ms("250ms").unwrap(), 250);
        assert!(parse_duration_ms("ten minutes").is_err());
    }
}
