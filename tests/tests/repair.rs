//! Repair, scrub and garbage collection with real `bdr-node` processes: a SIGKILLed node's
//! shards are rebuilt elsewhere until `admin status` shows every stripe healthy; when it
//! returns, the stand-in copies go; rotten shard files are found by scrub and rebuilt.

use std::time::Duration;

use bdr_tests::{pattern, wait_for, AdminClient, ProcessCluster};

const ZONES: [&str; 6] = ["zone-a", "zone-a", "zone-b", "zone-b", "zone-c", "zone-c"];
/// Fast maintenance so the test sees it within seconds (30 s is the shortest grace).
const MAINTENANCE: &str = "[maintenance]\nrepair_interval = \"1s\"\ngc_grace = \"30s\"\n\
                           write_deadline = \"10s\"\nscrub_interval = \"1h\"\n";
const OBJECTS: usize = 200;

/// Waits until the cluster holds exactly one file per shard of the objects.
fn wait_for_one_file_per_shard(cluster: &ProcessCluster, what: &str) {
    let settled = wait_for(Duration::from_secs(180), || {
        (cluster.shard_file_count() == OBJECTS * 6).then_some(())
    });
    assert!(
        settled.is_some(),
        "{what}: {} shard files on disk, {} expected\n{}",
        cluster.shard_file_count(),
        OBJECTS * 6,
        cluster.logs()
    );
}

#[test]
fn a_killed_node_is_rebuilt_elsewhere_its_return_tidies_up_and_scrub_finds_rot() {
    let mut cluster = ProcessCluster::start_with(&ZONES, "3s", MAINTENANCE);
    let writer = AdminClient::new(&cluster.nodes[0]);
    assert_eq!(writer.create_bucket("backups").unwrap().status, 201);
    // Striped objects (above the 64 KiB inline threshold), one stripe each.
    let objects: Vec<(String, Vec<u8>)> = (0..OBJECTS)
        .map(|index| (format!("object-{index:03}"), pattern(70_000 + index * 97, index as u64)))
        .collect();
    for (key, data) in &objects {
        let answer = writer.put("backups", key, data).unwrap();
        assert_eq!(
            answer.status,
            200,
            "PUT {key}: {}",
            String::from_utf8_lossy(&answer.body)
        );
    }
    let total = OBJECTS as u64;
    cluster.wait_until_healthy(0, total, "after the writes");
    assert_eq!(cluster.shard_file_count(), OBJECTS * 6);

    // SIGKILL a node: its shards are rebuilt on the other node of its zone.
    let lost_shards = cluster.shard_files(2).len();
    assert!(lost_shards > 0);
    cluster.nodes[2].kill_hard();
    let healing = cluster.wait_until_healthy(0, total, "after node 2 was killed");
    println!("{lost_shards} shards of a killed node rebuilt; full redundancy after {healing:?} (down_after 3 s)");
    let reader = AdminClient::new(&cluster.nodes[5]);
    reader.assert_reads("backups", &objects);
    let repair = cluster.nodes[0].admin_json(&["repair", "status"]).unwrap();
    assert!(
        repair["summary"]["repair"]["repaired_stripes"].as_u64().unwrap() >= lost_shards as u64 / 2,
        "{repair}"
    );

    // It comes back with its disk: the stand-in copies are deleted after the grace.
    cluster.nodes[2].start();
    cluster.wait_until_all_up(Duration::from_secs(60));
    wait_for_one_file_per_shard(&cluster, "after node 2 returned");
    cluster.wait_until_healthy(1, total, "after node 2 returned");
    reader.assert_reads("backups", &objects);

    // Rot 1% of the shard files; a scrub finds every one and repair rewrites them.
    // Every 100th shard file of the cluster, at most one per stripe (within budget).
    let mut all_files: Vec<std::path::PathBuf> = (0..cluster.nodes.len())
        .flat_map(|index| cluster.shard_files(index))
        .collect();
    all_files.sort_by_key(|path| path.file_name().map(|name| name.to_owned()));
    let mut rotten = Vec::new();
    let mut stripes_hit = std::collections::BTreeSet::new();
    for file in all_files.iter().skip(7).step_by(100) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let stripe = name.split('.').next().unwrap().to_string();
        if !stripes_hit.insert(stripe) {
            continue;
        }
        let mut bytes = std::fs::read(file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x40;
        std::fs::write(file, bytes).unwrap();
        rotten.push(file.clone());
    }
    assert!(rotten.len() >= OBJECTS * 6 / 100, "{} rotten", rotten.len());
    cluster.nodes[3].admin_json(&["scrub", "start"]).unwrap();
    let found = wait_for(Duration::from_secs(120), || {
        let view = cluster.nodes[3].admin_json(&["scrub", "status"]).ok()?;
        let corrupt = view["summary"]["scrub"]["corrupt_found"].as_u64()?;
        (corrupt >= rotten.len() as u64).then_some(corrupt)
    });
    assert_eq!(
        found.map(|(corrupt, _)| corrupt),
        Some(rotten.len() as u64),
        "{}",
        cluster.logs()
    );
    // Every rotten file is rewritten with a good shard (health reports come from the last
    // survey, which may predate the scrub: count the files).
    wait_for_one_file_per_shard(&cluster, "after scrub");
    cluster.wait_until_healthy(4, total, "after scrub");
    AdminClient::new(&cluster.nodes[1]).assert_reads("backups", &objects);

    // Every object write through node 0's admin API is in its audit log.
    let audit = std::fs::read_to_string(cluster.nodes[0].folder.join("data").join("audit").join("audit.log")).unwrap();
    let writes = audit
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|entry| {
            entry["who"] == "admin"
                && entry["operation"]
                    .as_str()
                    .is_some_and(|operation| operation.starts_with("PUT /v1/objects/backups/"))
                && entry["status"] == 200
        })
        .count();
    assert_eq!(writes, OBJECTS, "audit log of node 0:\n{audit}");

    // The same figures in Prometheus form on the admin listener.
    let node = &cluster.nodes[1];
    let mut response = ureq::get(node.admin_url("/metrics"))
        .header("Authorization", &format!("Bearer {}", node.admin_token()))
        .call()
        .unwrap();
    let text = response.body_mut().read_to_string().unwrap();
    for expected in [
        format!("bdr_stripes{{health=\"healthy\"}} {OBJECTS}"),
        "bdr_stripes{health=\"lost\"} 0".to_string(),
        "bdr_peers{state=\"up\"} 6".to_string(),
        "# TYPE bdr_repaired_stripes_total counter".to_string(),
        "bdr_s3_requests_total".to_string(),
    ] {
        assert!(text.contains(&expected), "{expected:?} missing from /metrics:\n{text}");
    }
}
