//! The cluster changes shape under real `bdr-node` processes, and nothing is lost:
//!
//! 1. a node is SIGKILLed, the cluster heals, the operator removes it (its metadata
//!    partitions are handed over to live nodes);
//! 2. a second node, in another zone, is SIGKILLed: everything still reads and heals;
//! 3. a seventh node joins: shards move to it by copy, close to what placement requires;
//! 4. a node is drained and then removed;
//! 5. a multipart upload through the S3 gateway (by a key granted write on the bucket) is
//!    aborted and objects are deleted (some re-uploaded under the same key at once); the
//!    operator removes the dead node of step 2: after the grace period the garbage's
//!    shards are gone from every disk and the re-uploads read back intact.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use bdr_tests::{pattern, run_bounded, wait_for, AdminClient, ProcessCluster};

const ZONES: [&str; 6] = ["zone-a", "zone-a", "zone-b", "zone-b", "zone-c", "zone-c"];
/// Fast maintenance so the test sees it within seconds (30 s is the shortest grace).
const MAINTENANCE: &str = "[maintenance]\nrepair_interval = \"1s\"\ngc_grace = \"30s\"\n\
                           write_deadline = \"10s\"\nscrub_interval = \"1h\"\n";
const OBJECTS: usize = 60;
/// Shards per stripe (the default 4+2 code).
const SHARDS: usize = 6;

fn node_id(cluster: &ProcessCluster, index: usize) -> String {
    cluster.nodes[index].status().expect("node answers")["node_id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until every node in `running` reports every node in `running` up and holding
/// its metadata partitions completely.
fn wait_until_settled(cluster: &ProcessCluster, running: &[usize], what: &str) {
    let ids: BTreeSet<String> = running.iter().map(|index| node_id(cluster, *index)).collect();
    let settled = wait_for(Duration::from_secs(60), || {
        running
            .iter()
            .all(|index| {
                cluster.nodes[*index].status().is_some_and(|status| {
                    let nodes = status["nodes"].as_array().cloned().unwrap_or_default();
                    let live: Vec<&serde_json::Value> = nodes
                        .iter()
                        .filter(|node| ids.contains(node["id"].as_str().unwrap_or_default()))
                        .collect();
                    live.len() == ids.len()
                        && live
                            .iter()
                            .all(|node| node["state"] == "up" && node["metadata_synced"] == true)
                })
            })
            .then_some(())
    });
    assert!(settled.is_some(), "{what}: not settled\n{}", cluster.logs());
}

/// Shard files on the disks of the nodes in `running`.
fn shard_files_on(cluster: &ProcessCluster, running: &[usize]) -> usize {
    running.iter().map(|index| cluster.shard_files(*index).len()).sum()
}

fn wait_for_shard_files(cluster: &ProcessCluster, running: &[usize], expected: usize, what: &str) {
    let settled = wait_for(Duration::from_secs(180), || {
        (shard_files_on(cluster, running) == expected).then_some(())
    });
    assert!(
        settled.is_some(),
        "{what}: {} shard files on running nodes, {expected} expected\n{}",
        shard_files_on(cluster, running),
        cluster.logs()
    );
}

fn admin(cluster: &ProcessCluster, node: usize, args: &[&str]) -> serde_json::Value {
    cluster.nodes[node]
        .admin_json(args)
        .unwrap_or_else(|error| panic!("admin {args:?}: {error}\n{}", cluster.logs()))
}

/// `admin node remove`, retried as its refusal says while repair finishes (the
/// status a test waited on comes from each node's last survey; remove surveys afresh).
fn remove_node(cluster: &ProcessCluster, id: &str) {
    let mut last_error = String::new();
    let removed = wait_for(Duration::from_secs(60), || {
        match cluster.nodes[0].admin_json(&["node", "remove", id]) {
            Ok(_) => Some(()),
            Err(error) if error.contains("409") => {
                last_error = error;
                None
            }
            Err(error) => panic!("admin node remove: {error}\n{}", cluster.logs()),
        }
    });
    assert!(
        removed.is_some(),
        "node {id} not removable: {last_error}\n{}",
        cluster.logs()
    );
}

/// The aws cli against node `node`'s S3 gateway as access key (id, secret).
fn aws(cluster: &ProcessCluster, node: usize, key: &(String, String), args: &[&str]) -> String {
    let mut command = Command::new("aws");
    command
        .args(args)
        .env_remove("AWS_CA_BUNDLE")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", cluster.nodes[node].s3_port),
        )
        .env("AWS_ACCESS_KEY_ID", &key.0)
        .env("AWS_SECRET_ACCESS_KEY", &key.1)
        .env("AWS_DEFAULT_REGION", "bdr");
    let output = run_bounded(&mut command, Duration::from_secs(120));
    assert!(
        output.status.success(),
        "aws {args:?}: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.logs()
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn moved_shards(cluster: &ProcessCluster, node: usize) -> u64 {
    cluster.nodes[node].status().unwrap()["maintenance"]["repair"]["moved_shards"]
        .as_u64()
        .unwrap()
}

#[test]
fn nodes_die_join_drain_and_leave_and_deleted_data_goes_while_nothing_is_lost() {
    let mut cluster = ProcessCluster::start_with(&ZONES, "3s", MAINTENANCE);
    let writer = AdminClient::new(&cluster.nodes[0]);
    assert_eq!(writer.create_bucket("backups").unwrap().status, 201);
    // Striped objects (above the 64 KiB inline threshold), one stripe each.
    let mut objects: Vec<(String, Vec<u8>)> = (0..OBJECTS)
        .map(|index| (format!("object-{index:03}"), pattern(70_000 + index * 89, index as u64)))
        .collect();
    for (key, data) in &objects {
        assert_eq!(writer.put("backups", key, data).unwrap().status, 200, "PUT {key}");
    }
    let total = OBJECTS as u64;
    cluster.wait_until_healthy(0, total, "after the writes");

    // 1. Node 2 (zone b) dies; once healed, the operator removes it.
    let removed = node_id(&cluster, 2);
    cluster.nodes[2].kill_hard();
    cluster.wait_until_healthy(0, total, "after node 2 was killed");
    remove_node(&cluster, &removed);
    let mut running = vec![0, 1, 3, 4, 5];
    wait_until_settled(&cluster, &running, "after node 2 was removed");

    // 2. Node 4 (zone c) dies too: with node 2's metadata handed over, every object still
    //    reads, and the cluster heals again (zone c's shards go to node 5).
    let dead = node_id(&cluster, 4);
    cluster.nodes[4].kill_hard();
    running.retain(|index| *index != 4);
    let reader = AdminClient::new(&cluster.nodes[1]);
    reader.assert_reads("backups", &objects);
    cluster.wait_until_healthy(0, total, "after node 4 was killed");
    reader.assert_reads("backups", &objects);

    // 3. A seventh node joins zone b: shards move to it, by copy, close to the minimum.
    let moved_before = moved_shards(&cluster, 0);
    let joined = cluster.add_node("zone-b");
    running.push(joined);
    wait_until_settled(&cluster, &running, "after node 6 joined");
    reader.assert_reads("backups", &objects);
    cluster.wait_until_healthy(0, total, "after node 6 joined");
    wait_for_shard_files(&cluster, &running, OBJECTS * SHARDS, "after node 6 joined");
    let on_new_node = cluster.shard_files(joined).len() as u64;
    let moved = moved_shards(&cluster, 0) - moved_before;
    println!("growth: {moved} shards moved, {on_new_node} now on the new node");
    assert!(on_new_node > 0, "no shard moved to the new node");
    assert!(
        moved * 2 <= on_new_node * 3,
        "moved {moved} shards, placement needs {on_new_node} (limit 1.5x)"
    );
    reader.assert_reads("backups", &objects);

    // 4. Node 3 is drained, empties, and may then be removed.
    let drained = node_id(&cluster, 3);
    admin(&cluster, 0, &["node", "drain", &drained]);
    let emptied = wait_for(Duration::from_secs(180), || {
        cluster.shard_files(3).is_empty().then_some(())
    });
    assert!(emptied.is_some(), "node 3 did not empty\n{}", cluster.logs());
    cluster.wait_until_healthy(0, total, "after node 3 was drained");
    remove_node(&cluster, &drained);
    running.retain(|index| *index != 3);
    wait_until_settled(&cluster, &running, "after node 3 was removed");
    reader.assert_reads("backups", &objects);

    // 5. A key granted write on the bucket uploads two 5 MiB parts through the S3
    //    gateway and aborts; a third of the objects are deleted, half of those uploaded
    //    again at once under the same key. After write deadline + grace, exactly the live
    //    objects' shards remain: none of the aborted parts', none of the deleted objects'.
    let created = admin(&cluster, 0, &["key", "create", "uploader"]);
    let key = (
        created["key_id"].as_str().unwrap().to_string(),
        created["secret_key"].as_str().unwrap().to_string(),
    );
    admin(&cluster, 0, &["bucket", "allow", "backups", "--key", &key.0, "--write"]);
    let started = aws(
        &cluster,
        0,
        &key,
        &[
            "s3api",
            "create-multipart-upload",
            "--bucket",
            "backups",
            "--key",
            "abandoned",
        ],
    );
    let started: serde_json::Value = serde_json::from_str(&started).unwrap();
    let upload_id = started["UploadId"].as_str().unwrap().to_string();
    let scratch = tempfile::tempdir().unwrap();
    let part_file = scratch.path().join("part");
    std::fs::write(&part_file, pattern(5 * 1024 * 1024, 77)).unwrap();
    for part_number in ["1", "2"] {
        aws(
            &cluster,
            0,
            &key,
            &[
                "s3api",
                "upload-part",
                "--bucket",
                "backups",
                "--key",
                "abandoned",
                "--upload-id",
                &upload_id,
                "--part-number",
                part_number,
                "--body",
                part_file.to_str().unwrap(),
            ],
        );
    }
    assert!(
        shard_files_on(&cluster, &running) > objects.len() * SHARDS,
        "parts left no shards"
    );
    aws(
        &cluster,
        0,
        &key,
        &[
            "s3api",
            "abort-multipart-upload",
            "--bucket",
            "backups",
            "--key",
            "abandoned",
            "--upload-id",
            &upload_id,
        ],
    );
    let deleted: Vec<(String, Vec<u8>)> = objects.drain(..OBJECTS / 3).collect();
    for (index, (key, _)) in deleted.iter().enumerate() {
        assert_eq!(writer.delete("backups", key).unwrap().status, 204, "DELETE {key}");
        if index % 2 == 0 {
            let data = pattern(75_000 + index, 1_000 + index as u64);
            assert_eq!(writer.put("backups", key, &data).unwrap().status, 200, "PUT {key}");
            objects.push((key.clone(), data));
        }
    }
    // Garbage whose owner's metadata has a replica on a down node waits for that node
    // (it may hold a version the others lack): the operator removes the dead node 4.
    remove_node(&cluster, &dead);
    wait_until_settled(&cluster, &running, "after node 4 was removed");
    let live = objects.len() as u64;
    wait_for_shard_files(&cluster, &running, objects.len() * SHARDS, "after the deletes");
    cluster.wait_until_healthy(0, live, "after the deletes");
    reader.assert_reads("backups", &objects);
    for (index, (key, _)) in deleted.iter().enumerate() {
        if index % 2 == 1 {
            assert_eq!(reader.get("backups", key, None).unwrap().status, 404, "GET {key}");
        }
    }
}
