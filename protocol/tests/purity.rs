//! The protocol crate must stay pure: no async runtime, networking, storage engine, web
//! framework or OS randomness in its dependency tree, and no clock, file, network or
//! environment access in its source. The simulator's determinism rests on this.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

/// Crates that would bring IO, time or OS randomness into the pure core.
const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "mio",
    "libp2p",
    "sled",
    "axum",
    "hyper",
    "reqwest",
    "getrandom",
    "rand",
    "async-std",
    "smol",
];

/// Crates whose own dependencies are not walked, each with the reason it is harmless.
/// `ahash` seeds its hashers from OS randomness; reed-solomon-erasure uses it only for an
/// internal LRU cache of decode matrices, which changes speed, never results. `ring`
/// (the envelope's AEAD) needs `getrandom` only for `ring::rand::SystemRandom`, which the
/// source check below forbids naming; its AEADs are pure functions of key, nonce and input.
const OPAQUE_CRATES: &[&str] = &["ahash", "ring"];

/// Source patterns that read the clock, the OS, the network or the environment.
const FORBIDDEN_SOURCE_PATTERNS: &[&str] = &[
    "SystemTime",
    "Instant::now",
    "std::fs",
    "std::net",
    "std::env",
    "std::thread",
    "std::process",
    "thread_rng",
    "OsRng",
    "getrandom",
    "ring::rand",
    "SystemRandom",
    "HashMap",
    "HashSet",
];

#[test]
fn protocol_dependency_tree_has_no_io_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).expect("metadata is JSON");

    let names: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|package| (package["id"].as_str().unwrap(), package["name"].as_str().unwrap()))
        .collect();
    let nodes: BTreeMap<&str, &serde_json::Value> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| (node["id"].as_str().unwrap(), node))
        .collect();
    let root = names
        .iter()
        .find(|(_, name)| **name == "bdr-protocol")
        .map(|(id, _)| *id)
        .unwrap();

    // Walk normal (non-dev, non-build) dependency edges only.
    let mut seen = BTreeSet::new();
    let mut pending = vec![root];
    while let Some(id) = pending.pop() {
        if !seen.insert(id) || OPAQUE_CRATES.contains(&names[id]) {
            continue;
        }
        for dependency in nodes[id]["deps"].as_array().unwrap() {
            let normal = dependency["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|kind| kind["kind"].is_null());
            if normal {
                pending.push(dependency["pkg"].as_str().unwrap());
            }
        }
    }
    let reached: BTreeSet<&str> = seen.iter().map(|id| names[id]).collect();
    assert!(
        reached.contains("blake3"),
        "walk found the real dependency tree: {reached:?}"
    );
    let forbidden: Vec<&&str> = reached
        .iter()
        .filter(|name| {
            FORBIDDEN_CRATES
                .iter()
                .any(|bad| name == &bad || name.starts_with(&format!("{bad}-")))
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "bdr-protocol must stay pure but depends on {forbidden:?}"
    );
}

#[test]
fn protocol_source_reads_no_clock_os_or_environment() {
    let source_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offences = Vec::new();
    for entry in std::fs::read_dir(&source_dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // Unit tests inside the files may use anything; only the code above them counts.
        let code = text.split("#[cfg(test)]").next().unwrap();
        for pattern in FORBIDDEN_SOURCE_PATTERNS {
            if code.contains(pattern) {
                offences.push(format!("{}: {pattern}", path.display()));
            }
        }
    }
    assert!(offences.is_empty(), "impure code in bdr-protocol: {offences:#?}");
}
