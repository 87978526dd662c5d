//! The data path with real `bdr-node` processes: objects of every size go in through one
//! node and come out through others after a whole zone is SIGKILLed; rotten shard files
//! are read around; no plaintext reaches any disk; and SIGKILLs in the middle of a stream
//! of writes never leave a torn object.

use std::collections::BTreeMap;
use std::time::Duration;

use bdr_tests::{pattern, slow_tests, AdminClient, ProcessCluster};

const ZONES: [&str; 6] = ["zone-a", "zone-a", "zone-b", "zone-b", "zone-c", "zone-c"];

fn read_back(client: &AdminClient, key: &str, expected: &[u8]) {
    let answer = client
        .get("backups", key, None)
        .unwrap_or_else(|error| panic!("GET {key}: {error}"));
    assert_eq!(
        answer.status,
        200,
        "GET {key}: {}",
        String::from_utf8_lossy(&answer.body)
    );
    assert!(
        answer.body == expected,
        "GET {key}: {} bytes differ from the {} written",
        answer.body.len(),
        expected.len()
    );
}

#[test]
fn objects_survive_a_zone_loss_and_rotten_shards_and_no_plaintext_reaches_disk() {
    let mut cluster = ProcessCluster::start(&ZONES, "3s");
    let writer = AdminClient::new(&cluster.nodes[0]);
    assert_eq!(writer.create_bucket("backups").unwrap().status, 201);

    let mut objects: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut sizes = vec![0usize, 1, 64 * 1024, 64 * 1024 + 1, 10 * 1024 * 1024];
    if slow_tests() {
        sizes.push(100 * 1024 * 1024);
    }
    let marker = b"BDR-PLAINTEXT-MARKER-0f1e2d3c-never-on-disk";
    for (index, size) in sizes.iter().enumerate() {
        let mut data = pattern(*size, index as u64);
        // Plant the marker throughout the content (and as a whole small object below).
        for chunk in data.chunks_mut(4096) {
            if chunk.len() >= marker.len() {
                chunk[..marker.len()].copy_from_slice(marker);
            }
        }
        objects.insert(format!("sized/{size}"), data);
    }
    objects.insert("marker".into(), marker.to_vec());
    let small_count = if slow_tests() { 1000 } else { 200 };
    for index in 0..small_count {
        objects.insert(
            format!("small/{index:04}"),
            pattern(100 + index % 900, 1000 + index as u64),
        );
    }
    // Writes go through different nodes (every node is a gateway).
    let clients: Vec<AdminClient> = cluster.nodes.iter().map(AdminClient::new).collect();
    std::thread::scope(|scope| {
        let chunks: Vec<Vec<(&String, &Vec<u8>)>> = {
            let all: Vec<(&String, &Vec<u8>)> = objects.iter().collect();
            all.chunks(all.len().div_ceil(4)).map(<[_]>::to_vec).collect()
        };
        for (worker, chunk) in chunks.into_iter().enumerate() {
            let client = &clients[worker % clients.len()];
            scope.spawn(move || {
                for (key, data) in chunk {
                    let answer = client
                        .put("backups", key, data)
                        .unwrap_or_else(|error| panic!("PUT {key}: {error}"));
                    assert_eq!(
                        answer.status,
                        200,
                        "PUT {key}: {}",
                        String::from_utf8_lossy(&answer.body)
                    );
                }
            });
        }
    });

    // No file under any node's data folder contains the plaintext marker.
    for path in cluster.data_files() {
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            !bytes.windows(marker.len()).any(|window| window == marker),
            "plaintext marker found in {}",
            path.display()
        );
    }

    // Flip bytes in node 0's shard files: reads through other nodes stay correct.
    let shard_files = cluster.shard_files(0);
    assert!(!shard_files.is_empty(), "node 0 holds no shards");
    for path in &shard_files {
        let mut bytes = std::fs::read(path).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        std::fs::write(path, bytes).unwrap();
    }
    let reader = AdminClient::new(&cluster.nodes[2]);
    for (key, data) in objects.iter().filter(|(key, _)| key.starts_with("sized/")) {
        read_back(&reader, key, data);
    }
    // Ranges read only what they ask for.
    let big = &objects["sized/10485760"];
    let answer = reader
        .get("backups", "sized/10485760", Some("bytes=4194300-4194310"))
        .unwrap();
    assert_eq!(answer.status, 206);
    assert_eq!(answer.body, big[4194300..=4194310]);

    // SIGKILL both nodes of zone a (node 0's rotten shards go with it): everything reads
    // back byte-identical through the nodes of the other zones.
    cluster.nodes[0].kill_hard();
    cluster.nodes[1].kill_hard();
    for (position, (key, data)) in objects.iter().enumerate() {
        let client = &clients[2 + position % 4];
        read_back(client, key, data);
    }
}

#[test]
fn sigkill_during_a_stream_of_writes_never_leaves_a_torn_object() {
    let kills = if slow_tests() { 20 } else { 4 };
    let mut cluster = ProcessCluster::start(&ZONES, "2s");
    assert_eq!(
        AdminClient::new(&cluster.nodes[0])
            .create_bucket("backups")
            .unwrap()
            .status,
        201
    );

    let stop = std::sync::atomic::AtomicBool::new(false);
    let clients: Vec<AdminClient> = cluster.nodes.iter().map(AdminClient::new).collect();
    let (acknowledged, attempted) = std::thread::scope(|scope| {
        let writer = scope.spawn(|| {
            let mut acknowledged = Vec::new();
            let mut attempted = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let index = attempted;
                attempted += 1;
                let size = if index.is_multiple_of(3) {
                    5 * 1024 * 1024 + 123
                } else {
                    70_000 + (index as usize % 5000)
                };
                let client = &clients[(index % 6) as usize];
                if let Ok(answer) = client.put("backups", &format!("w/{index:05}"), &pattern(size, index)) {
                    if answer.status == 200 {
                        acknowledged.push((index, size));
                    }
                }
            }
            (acknowledged, attempted)
        });
        for kill in 0..kills {
            std::thread::sleep(Duration::from_millis(700 + (kill as u64 * 137) % 600));
            let victim = (kill * 5 + 1) % 6;
            cluster.nodes[victim].kill_hard();
            std::thread::sleep(Duration::from_millis(500));
            cluster.nodes[victim].start();
        }
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap()
    });
    assert!(
        acknowledged.len() >= 5,
        "too few writes succeeded: {} of {attempted}",
        acknowledged.len()
    );
    cluster.wait_until_all_up(Duration::from_secs(60));

    // Every acknowledged write reads back intact; every other attempt is intact or absent.
    let reader = AdminClient::new(&cluster.nodes[3]);
    let acknowledged: BTreeMap<u64, usize> = acknowledged.into_iter().collect();
    for index in 0..attempted {
        let key = format!("w/{index:05}");
        let answer = reader.get("backups", &key, None).unwrap();
        match acknowledged.get(&index) {
            Some(size) => {
                assert_eq!(
                    answer.status,
                    200,
                    "acknowledged {key} lost: {}",
                    String::from_utf8_lossy(&answer.body)
                );
                assert!(
                    answer.body == pattern(*size, index),
                    "acknowledged {key} reads back wrong"
                );
            }
            None => assert!(
                answer.status == 404
                    || (answer.status == 200 && !answer.body.is_empty() && {
                        let size = answer.body.len();
                        answer.body == pattern(size, index)
                    }),
                "unacknowledged {key}: status {} with {} bytes is torn",
                answer.status,
                answer.body.len()
            ),
        }
    }
    println!(
        "{} of {attempted} writes acknowledged across {kills} SIGKILLs",
        acknowledged.len()
    );
}
