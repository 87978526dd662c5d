//! Cluster membership with real `bdr-node` processes on loopback: six nodes in three
//! zones form a cluster, an intruder with the wrong secret is kept out, a SIGKILLed node
//! is reported down by everyone after `down_after`, and comes back with the same id.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use bdr_tests::{binary, log_tails, nodes_of, run_bounded, wait_for, NodeProcess, NodeSettings};

const DOWN_AFTER_MS: u64 = 3000;
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);

fn write_secret(path: &std::path::Path) {
    let output = run_bounded(
        Command::new(binary("bdr-node")).arg("gen-secret"),
        Duration::from_secs(10),
    );
    assert!(output.status.success());
    let secret = String::from_utf8(output.stdout).unwrap();
    assert_eq!(secret.trim().len(), 64, "gen-secret prints 32 bytes of hex: {secret:?}");
    std::fs::write(path, secret).unwrap();
}

fn node_id(node: &NodeProcess) -> String {
    let output = run_bounded(
        Command::new(binary("bdr-node"))
            .args(["init", "--data"])
            .arg(node.folder.join("data")),
        Duration::from_secs(10),
    );
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap().trim().to_string()
}

/// Every node in `observers` sees exactly `expected` (id, zone) pairs, all in `state`
/// except those listed in `exceptions` with their own state.
fn all_agree(observers: &[&NodeProcess], expected: &BTreeSet<(String, String)>, exceptions: &[(&str, &str)]) -> bool {
    observers.iter().all(|observer| {
        let Some(status) = observer.status() else { return false };
        let nodes = nodes_of(&status);
        let seen: BTreeSet<(String, String)> = nodes.iter().map(|(id, zone, _)| (id.clone(), zone.clone())).collect();
        seen == *expected
            && nodes.iter().all(|(id, _, state)| {
                let wanted = exceptions
                    .iter()
                    .find(|(exception, _)| exception == id)
                    .map_or("up", |(_, state)| state);
                state == wanted
            })
    })
}

#[test]
fn six_nodes_converge_keep_an_intruder_out_and_detect_a_dead_node() {
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("cluster.secret");
    let wrong_secret = root.path().join("wrong.secret");
    write_secret(&secret);
    write_secret(&wrong_secret);

    let zones = ["zone-a", "zone-a", "zone-b", "zone-b", "zone-c", "zone-c"];
    let mut nodes: Vec<NodeProcess> = Vec::new();
    for (index, zone) in zones.iter().enumerate() {
        // Nodes bootstrap from the first two (the first two from each other).
        let bootstrap: Vec<String> = nodes.iter().take(2).map(NodeProcess::tcp_address).collect();
        let settings = NodeSettings {
            zone,
            secret_file: &secret,
            data_key_file: None,
            bootstrap,
            down_after: "3s",
            gossip_interval: "200ms",
            extra_config: "",
        };
        nodes.push(NodeProcess::new(root.path(), &format!("node{index}"), &settings));
    }
    // Node 0 also bootstraps from node 1, so either can come up first.
    let node1_address = nodes[1].tcp_address();
    let node0_config = std::fs::read_to_string(&nodes[0].config_path).unwrap();
    std::fs::write(
        &nodes[0].config_path,
        node0_config.replace("bootstrap = []", &format!("bootstrap = [{node1_address:?}]")),
    )
    .unwrap();
    let mut intruder = NodeProcess::new(
        root.path(),
        "intruder",
        &NodeSettings {
            zone: "zone-a",
            secret_file: &wrong_secret,
            data_key_file: None,
            bootstrap: vec![nodes[0].tcp_address(), nodes[1].tcp_address()],
            down_after: "3s",
            gossip_interval: "200ms",
            extra_config: "",
        },
    );

    let ids: Vec<String> = nodes.iter().map(node_id).collect();
    let intruder_id = node_id(&intruder);
    let expected: BTreeSet<(String, String)> = ids
        .iter()
        .cloned()
        .zip(zones.iter().map(|zone| zone.to_string()))
        .collect();

    for node in &mut nodes {
        node.start();
    }
    intruder.start();
    let everyone: Vec<&NodeProcess> = nodes.iter().collect();
    let (_, converged_in) = wait_for(CONVERGE_TIMEOUT, || all_agree(&everyone, &expected, &[]).then_some(()))
        .unwrap_or_else(|| panic!("cluster did not converge:\n{}", log_tails(&nodes)));
    println!("membership converged in {converged_in:?} (6 nodes, gossip every 200 ms)");

    // The intruder appears nowhere and learned nothing: its layout holds only itself.
    let intruder_status = wait_for(Duration::from_secs(20), || intruder.status()).unwrap().0;
    let intruder_view: Vec<String> = nodes_of(&intruder_status).into_iter().map(|(id, _, _)| id).collect();
    assert_eq!(intruder_view, vec![intruder_id.clone()], "the intruder got answers");
    for node in &nodes {
        let status = node.status().unwrap();
        assert!(
            nodes_of(&status).iter().all(|(id, _, _)| *id != intruder_id),
            "{} lists the intruder",
            node.name
        );
    }
    let refused = wait_for(Duration::from_secs(20), || {
        nodes[..2]
            .iter()
            .any(|node| node.log().contains("did not prove cluster membership"))
            .then_some(())
    });
    assert!(refused.is_some(), "no bootstrap node logged refusing the intruder");

    // SIGKILL node 5: every other node reports it down after down_after.
    nodes[5].kill_hard();
    let survivors: Vec<&NodeProcess> = nodes[..5].iter().collect();
    let dead = ids[5].clone();
    let (_, detected_in) = wait_for(Duration::from_millis(DOWN_AFTER_MS) + CONVERGE_TIMEOUT, || {
        all_agree(&survivors, &expected, &[(&dead, "down")]).then_some(())
    })
    .expect("the killed node was not reported down by everyone");
    println!("dead node reported down by all 5 survivors after {detected_in:?} (down_after = {DOWN_AFTER_MS} ms)");
    assert!(
        detected_in >= Duration::from_millis(DOWN_AFTER_MS / 2),
        "reported down after {detected_in:?}, before it could have been silent for down_after"
    );

    // Restart it with the same data: same id, same place, up again everywhere.
    nodes[5].start();
    let everyone: Vec<&NodeProcess> = nodes.iter().collect();
    let (_, back_in) = wait_for(CONVERGE_TIMEOUT, || all_agree(&everyone, &expected, &[]).then_some(()))
        .expect("the restarted node did not come back up everywhere");
    println!("restarted node up everywhere after {back_in:?}");
    assert_eq!(node_id(&nodes[5]), ids[5]);
    let status = nodes[5].status().unwrap();
    assert_eq!(status["node_id"].as_str().unwrap(), ids[5]);
}

#[test]
fn bad_configs_exit_non_zero_with_one_line_naming_the_key() {
    let root = tempfile::tempdir().unwrap();
    let secret = root.path().join("secret");
    write_secret(&secret);
    let cases = [
        ("capacity = \"0 B\"", "`capacity`"),
        ("bootstrap = [\"/ip4/999.1.1.1/tcp/1\"]", "`bootstrap`"),
        ("zone = \"\"", "`zone`"),
        ("colour = \"blue\"", "colour"),
    ];
    for (line, key) in cases {
        let config_key = line.split(' ').next().unwrap();
        let base = format!(
            "data_dir = \"data\"\nzone = \"a\"\ncapacity = \"1 GiB\"\ncluster_secret_file = {:?}\n",
            secret.display().to_string()
        );
        let text: String = base
            .lines()
            .filter(|existing| !existing.starts_with(&format!("{config_key} ")))
            .map(|existing| format!("{existing}\n"))
            .collect::<String>()
            + line
            + "\n";
        let path = root.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let output = run_bounded(
            Command::new(binary("bdr-node")).args(["run", "--config"]).arg(&path),
            Duration::from_secs(20),
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{line}: exited 0");
        assert_eq!(stderr.trim().lines().count(), 1, "{line}: not one line: {stderr}");
        assert!(stderr.contains(key), "{line}: {stderr}");
        assert!(!stderr.contains("panicked"), "{line}: {stderr}");
    }
    // An unreadable secret is named too.
    let path = root.path().join("nosecret.toml");
    std::fs::write(
        &path,
        "data_dir = \"data\"\nzone = \"a\"\ncapacity = \"1 GiB\"\ncluster_secret_file = \"/nonexistent/secret\"\n",
    )
    .unwrap();
    let output = run_bounded(
        Command::new(binary("bdr-node")).args(["run", "--config"]).arg(&path),
        Duration::from_secs(20),
    );
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/secret"));
}

#[test]
fn init_twice_keeps_the_key() {
    let root = tempfile::tempdir().unwrap();
    let init = || {
        let output = run_bounded(
            Command::new(binary("bdr-node"))
                .args(["init", "--data"])
                .arg(root.path()),
            Duration::from_secs(10),
        );
        assert!(output.status.success());
        String::from_utf8(output.stdout).unwrap()
    };
    let first = init();
    assert_eq!(first.trim().len(), 64);
    assert_eq!(init(), first);
}
