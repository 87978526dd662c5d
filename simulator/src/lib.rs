//! bdr-sim: runs the real cluster logic of `bdr-node` (the `ClusterNode` in
//! `node/src/cluster/`) in one thread with virtual time, a simulated network and
//! crashable in-memory disks, injects faults, and checks that no acknowledged write is
//! lost and no read returns wrong bytes. Same seed and build, same trace hash.
//! [`durability`] is separate: a failure-and-repair model of clusters far larger than a
//! run can hold (`bdr-sim durability`).

pub mod disk;
pub mod durability;
pub mod executor;
pub mod plots;
pub mod sim;
pub mod world;

use std::path::Path;

pub use sim::{run, Outcome, Scenario, Timers, PRODUCTION_SETTLE_MS};

/// The scenarios shipped in `simulator/scenarios/`, built in so `bdr-sim` works from
/// any folder.
pub const BUILTIN_SCENARIOS: [(&str, &str); 10] = [
    ("swarm", include_str!("../scenarios/swarm.toml")),
    ("zone-outage", include_str!("../scenarios/zone-outage.toml")),
    ("rolling-restart", include_str!("../scenarios/rolling-restart.toml")),
    ("bit-rot-storm", include_str!("../scenarios/bit-rot-storm.toml")),
    (
        "partition-and-heal",
        include_str!("../scenarios/partition-and-heal.toml"),
    ),
    ("disk-faults", include_str!("../scenarios/disk-faults.toml")),
    ("beyond-budget", include_str!("../scenarios/beyond-budget.toml")),
    ("node-replacement", include_str!("../scenarios/node-replacement.toml")),
    ("layout-growth", include_str!("../scenarios/layout-growth.toml")),
    ("bucket-churn", include_str!("../scenarios/bucket-churn.toml")),
];

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("no scenario named {0:?} and no such file (built in: swarm, zone-outage, rolling-restart, bit-rot-storm, partition-and-heal, disk-faults, beyond-budget, node-replacement, layout-growth)")]
    Unknown(String),
    #[error("scenario {0}: {1}")]
    Invalid(String, String),
}

/// A built-in scenario by name, or a scenario file by path.
pub fn load_scenario(name_or_path: &str) -> Result<Scenario, ScenarioError> {
    let text = match BUILTIN_SCENARIOS.iter().find(|(name, _)| *name == name_or_path) {
        Some((_, text)) => text.to_string(),
        None if Path::new(name_or_path).is_file() => std::fs::read_to_string(name_or_path)
            .map_err(|error| ScenarioError::Invalid(name_or_path.into(), error.to_string()))?,
        None => return Err(ScenarioError::Unknown(name_or_path.into())),
    };
    let scenario: Scenario = toml::from_str(&text)
        .map_err(|error| ScenarioError::Invalid(name_or_path.into(), error.message().to_string()))?;
    if scenario.nodes < 1 || scenario.nodes > 64 || scenario.zones < 1 || scenario.zones > scenario.nodes {
        return Err(ScenarioError::Invalid(
            name_or_path.into(),
            "need 1..=64 nodes and 1..=nodes zones".into(),
        ));
    }
    Ok(scenario)
}
