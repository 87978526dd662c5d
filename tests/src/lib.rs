//! Helpers for integration tests that start real `bdr-node` processes on loopback and
//! drive them the way an operator would: config files, the CLI, signals.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Path of a workspace binary, built once per test process (a no-op when up to date), so
/// `cargo test -p bdr-tests` works on its own.
pub fn binary(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the workspace");
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "--bins", "--quiet"])
            .current_dir(workspace)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the workspace binaries failed");
    });
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"));
    let path = target.join("debug").join(name);
    assert!(path.exists(), "{} was not built", path.display());
    path
}

/// Ports handed out for test servers: below Linux's ephemeral range (32768..=60999),
/// so no outgoing connection or port-0 listener can take one between the moment a test
/// picks it and the moment its server binds it.
const TEST_PORTS: std::ops::Range<u32> = 20_000..32_000;

fn next_candidate_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Spread processes apart by pid, then walk the range.
    let offset = NEXT.fetch_add(7919, Ordering::Relaxed) + std::process::id() * 104_729;
    (TEST_PORTS.start + offset % (TEST_PORTS.end - TEST_PORTS.start)) as u16
}

/// A loopback TCP port that is free right now and outside the ephemeral range.
pub fn free_tcp_port() -> u16 {
    loop {
        let port = next_candidate_port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A loopback UDP port that is free right now and outside the ephemeral range.
pub fn free_udp_port() -> u16 {
    loop {
        let port = next_candidate_port();
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `check` until it returns `Some` or `timeout` passes; returns the value and the
/// time it took.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return Some((value, start.elapsed()));
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a command to completion with a bound on its run time.
pub fn run_bounded(command: &mut Command, timeout: Duration) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("command starts");
    let start = Instant::now();
    while child.try_wait().expect("wait works").is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("command {command:?} ran longer than {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output is read")
}

/// One `bdr-node run` process with its own folder, ports and config file.
pub struct NodeProcess {
    pub name: String,
    pub folder: PathBuf,
    pub config_path: PathBuf,
    pub tcp_port: u16,
    pub admin_port: u16,
    pub s3_port: u16,
    child: Option<Child>,
}

pub struct NodeSettings<'a> {
    pub zone: &'a str,
    pub secret_file: &'a Path,
    /// Gateways get the data key; storage-only nodes must not.
    pub data_key_file: Option<&'a Path>,
    pub bootstrap: Vec<String>,
    pub down_after: &'a str,
    pub gossip_interval: &'a str,
    /// Appended to the config (e.g. a `[maintenance]` section).
    pub extra_config: &'a str,
}

impl NodeProcess {
    pub fn new(root: &Path, name: &str, settings: &NodeSettings) -> NodeProcess {
        let folder = root.join(name);
        std::fs::create_dir_all(&folder).unwrap();
        let tcp_port = free_tcp_port();
        let quic_port = free_udp_port();
        let admin_port = free_tcp_port();
        let s3_port = free_tcp_port();
        let bootstrap: Vec<String> = settings
            .bootstrap
            .iter()
            .map(|address| format!("{address:?}"))
            .collect();
        let config = format!(
            "data_dir = \"data\"\nzone = \"{zone}\"\ncapacity = \"10 GiB\"\n\
             listen = [\"/ip4/127.0.0.1/tcp/{tcp_port}\", \"/ip4/127.0.0.1/udp/{quic_port}/quic-v1\"]\n\
             bootstrap = [{bootstrap}]\ncluster_secret_file = {secret:?}\n{data_key}\
             down_after = \"{down_after}\"\ngossip_interval = \"{gossip_interval}\"\n\
             [s3]\nlisten = \"127.0.0.1:{s3_port}\"\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n{extra}",
            zone = settings.zone,
            bootstrap = bootstrap.join(", "),
            secret = settings.secret_file.display().to_string(),
            data_key = settings
                .data_key_file
                .map(|path| format!("data_key_file = {:?}\n", path.display().to_string()))
                .unwrap_or_default(),
            down_after = settings.down_after,
            gossip_interval = settings.gossip_interval,
            extra = settings.extra_config,
        );
        let config_path = folder.join("node.toml");
        std::fs::write(&config_path, config).unwrap();
        NodeProcess {
            name: name.to_string(),
            folder,
            config_path,
            tcp_port,
            s3_port,
            admin_port,
            child: None,
        }
    }

    pub fn tcp_address(&self) -> String {
        format!("/ip4/127.0.0.1/tcp/{}", self.tcp_port)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none(), "{} already running", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.folder.join("node.log"))
            .unwrap();
        let child = Command::new(binary("bdr-node"))
            .args(["run", "--config"])
            .arg(&self.config_path)
            // BDR_TEST_NODE_LOG overrides the nodes' log filter when a test is debugged.
            .env(
                "RUST_LOG",
                std::env::var("BDR_TEST_NODE_LOG").unwrap_or_else(|_| "info,libp2p=warn,yamux=error".to_string()),
            )
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("bdr-node starts");
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.folder.join("data").join("admin.token"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(child) => child.try_wait().map(|status| status.is_none()).unwrap_or(false),
            None => false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.folder.join("node.log")).unwrap_or_default()
    }

    /// `bdr-node admin status --json`, or None while the node is not answering.
    pub fn status(&self) -> Option<serde_json::Value> {
        self.admin_json(&["status"]).ok()
    }

    /// Runs `bdr-node admin ARGS --json` against this node: its JSON answer, or the
    /// command's stderr.
    pub fn admin_json(&self, args: &[&str]) -> Result<serde_json::Value, String> {
        let output = run_bounded(
            Command::new(binary("bdr-node"))
                .args(["admin", "--endpoint"])
                .arg(format!("http://127.0.0.1:{}", self.admin_port))
                .arg("--token-file")
                .arg(self.folder.join("data").join("admin.token"))
                .args(args)
                .arg("--json"),
            Duration::from_secs(180),
        );
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        serde_json::from_slice(&output.stdout).map_err(|error| error.to_string())
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill_hard();
    }
}

/// The last lines of each node's log, for failure messages.
pub fn log_tails(nodes: &[NodeProcess]) -> String {
    nodes
        .iter()
        .map(|node| {
            let log = node.log();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            format!(
                "--- {} ---\n{}\n",
                node.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect()
}

/// (node id, zone, state) of every node in a status document, sorted by id.
pub fn nodes_of(status: &serde_json::Value) -> Vec<(String, String, String)> {
    let mut nodes: Vec<(String, String, String)> = status["nodes"]
        .as_array()
        .map(|nodes| {
            nodes
                .iter()
                .map(|node| {
                    (
                        node["id"].as_str().unwrap_or_default().to_string(),
                        node["zone"].as_str().unwrap_or_default().to_string(),
                        node["state"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    nodes.sort();
    nodes
}

/// A minimal client for the admin API's internal object endpoints.
pub struct AdminClient {
    agent: ureq::Agent,
    base: String,
    token: String,
}

/// An HTTP answer: status and body.
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

impl AdminClient {
    pub fn new(node: &NodeProcess) -> AdminClient {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(120)))
            .http_status_as_error(false)
            .build()
            .into();
        AdminClient {
            agent,
            base: node.admin_url(""),
            token: node.admin_token(),
        }
    }

    fn answer(result: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Result<Answer, String> {
        let mut response = result.map_err(|error| error.to_string())?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(u64::MAX)
            .read_to_vec()
            .map_err(|error| error.to_string())?;
        Ok(Answer { status, body })
    }

    pub fn create_bucket(&self, bucket: &str) -> Result<Answer, String> {
        Self::answer(
            self.agent
                .put(format!("{}/v1/buckets/{bucket}", self.base))
                .header("Authorization", &format!("Bearer {}", self.token))
                .send_empty(),
        )
    }

    pub fn put(&self, bucket: &str, key: &str, data: &[u8]) -> Result<Answer, String> {
        Self::answer(
            self.agent
                .put(format!("{}/v1/objects/{bucket}/{key}", self.base))
                .header("Authorization", &format!("Bearer {}", self.token))
                .send(data),
        )
    }

    pub fn delete(&self, bucket: &str, key: &str) -> Result<Answer, String> {
        Self::answer(
            self.agent
                .delete(format!("{}/v1/objects/{bucket}/{key}", self.base))
                .header("Authorization", &format!("Bearer {}", self.token))
                .call(),
        )
    }

    /// Reads every object back and asserts it is there with exactly these bytes.
    pub fn assert_reads(&self, bucket: &str, objects: &[(String, Vec<u8>)]) {
        for (key, data) in objects {
            let answer = self.get(bucket, key, None).unwrap();
            assert_eq!(
                answer.status,
                200,
                "GET {key}: {}",
                String::from_utf8_lossy(&answer.body)
            );
            assert!(answer.body == *data, "GET {key}: wrong bytes");
        }
    }

    pub fn get(&self, bucket: &str, key: &str, range: Option<&str>) -> Result<Answer, String> {
        let mut request = self
            .agent
            .get(format!("{}/v1/objects/{bucket}/{key}", self.base))
            .header("Authorization", &format!("Bearer {}", self.token));
        if let Some(range) = range {
            request = request.header("Range", range);
        }
        Self::answer(request.call())
    }
}

/// (total, healthy, degraded, at_risk, lost) stripes in an `admin status` document.
pub fn stripe_counts(status: &serde_json::Value) -> (u64, u64, u64, u64, u64) {
    let stripes = &status["maintenance"]["stripes"];
    let count = |name: &str| stripes[name].as_u64().unwrap_or(u64::MAX);
    (
        count("total"),
        count("healthy"),
        count("degraded"),
        count("at_risk"),
        count("lost"),
    )
}

/// Deterministic test content for object `seed`.
pub fn pattern(length: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Whether the long forms of the cluster suites should run (CI sets BDR_SLOW_TESTS=1).
pub fn slow_tests() -> bool {
    std::env::var("BDR_SLOW_TESTS").is_ok_and(|value| value == "1")
}

/// A cluster of `bdr-node run` processes: node i is in `zones[i]`; every node is a
/// gateway holding the same data key. Returns once every node sees every node up.
pub struct ProcessCluster {
    pub root: tempfile::TempDir,
    pub nodes: Vec<NodeProcess>,
    down_after: String,
    extra_config: String,
}

impl ProcessCluster {
    pub fn start(zones: &[&str], down_after: &str) -> ProcessCluster {
        ProcessCluster::start_with(zones, down_after, "")
    }

    /// Like `start`, with `extra_config` appended to every node's config.
    pub fn start_with(zones: &[&str], down_after: &str, extra_config: &str) -> ProcessCluster {
        let root = tempfile::tempdir().unwrap();
        for path in [root.path().join("cluster.secret"), root.path().join("data.key")] {
            let output = run_bounded(
                Command::new(binary("bdr-node")).arg("gen-secret"),
                Duration::from_secs(10),
            );
            assert!(output.status.success());
            std::fs::write(path, output.stdout).unwrap();
        }
        let mut cluster = ProcessCluster {
            root,
            nodes: Vec::new(),
            down_after: down_after.to_string(),
            extra_config: extra_config.to_string(),
        };
        for zone in zones {
            let bootstrap = cluster.nodes.iter().take(2).map(NodeProcess::tcp_address).collect();
            let node = cluster.new_node(zone, bootstrap);
            cluster.nodes.push(node);
        }
        for node in &mut cluster.nodes {
            node.start();
        }
        cluster.wait_until_all_up(Duration::from_secs(60));
        cluster
    }

    /// A node configured like the others (not started).
    fn new_node(&self, zone: &str, bootstrap: Vec<String>) -> NodeProcess {
        let secret = self.root.path().join("cluster.secret");
        let data_key = self.root.path().join("data.key");
        let settings = NodeSettings {
            zone,
            secret_file: &secret,
            data_key_file: Some(&data_key),
            bootstrap,
            down_after: &self.down_after,
            gossip_interval: "200ms",
            extra_config: &self.extra_config,
        };
        NodeProcess::new(self.root.path(), &format!("node{}", self.nodes.len()), &settings)
    }

    /// Starts one more node in `zone`, bootstrapping from the first two running nodes;
    /// returns its index. Does not wait for it.
    pub fn add_node(&mut self, zone: &str) -> usize {
        let bootstrap: Vec<String> = self
            .nodes
            .iter_mut()
            .filter_map(|node| node.is_running().then(|| node.tcp_address()))
            .take(2)
            .collect();
        let mut node = self.new_node(zone, bootstrap);
        node.start();
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// Shard files on the disks of every node, running or not.
    pub fn shard_file_count(&self) -> usize {
        (0..self.nodes.len()).map(|index| self.shard_files(index).len()).sum()
    }

    /// Waits until `admin status` on `node` counts `total` stripes, all healthy, with
    /// every live node answering; returns how long that took.
    pub fn wait_until_healthy(&self, node: usize, total: u64, what: &str) -> Duration {
        let started = Instant::now();
        let mut last = None;
        let healed = wait_for(Duration::from_secs(180), || {
            let status = self.nodes[node].status()?;
            let unreachable = status["maintenance"]["nodes_unreachable"]
                .as_array()
                .map_or(1, Vec::len);
            let counts = stripe_counts(&status);
            last = Some(status);
            (unreachable == 0 && counts == (total, total, 0, 0, 0)).then_some(())
        });
        assert!(
            healed.is_some(),
            "{what}: not healed in time; last status {}\n{}",
            serde_json::to_string_pretty(&last).unwrap_or_default(),
            self.logs()
        );
        started.elapsed()
    }

    /// Waits until every running node reports every node `up` and holding its metadata
    /// partitions completely (the handover after the last layout change is over).
    pub fn wait_until_all_up(&self, timeout: Duration) {
        let count = self.nodes.len();
        let converged = wait_for(timeout, || {
            self.nodes
                .iter()
                .all(|node| {
                    node.status().is_some_and(|status| {
                        let nodes = nodes_of(&status);
                        let synced = status["nodes"]
                            .as_array()
                            .is_some_and(|nodes| nodes.iter().all(|node| node["metadata_synced"] == true));
                        nodes.len() == count && nodes.iter().all(|(_, _, state)| state == "up") && synced
                    })
                })
                .then_some(())
        });
        assert!(converged.is_some(), "cluster did not converge:\n{}", self.logs());
    }

    pub fn logs(&self) -> String {
        log_tails(&self.nodes)
    }

    /// Every regular file under every node's data folder.
    pub fn data_files(&self) -> Vec<PathBuf> {
        fn walk(path: &Path, files: &mut Vec<PathBuf>) {
            let Ok(entries) = std::fs::read_dir(path) else { return };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, files);
                } else {
                    files.push(path);
                }
            }
        }
        let mut files = Vec::new();
        for node in &self.nodes {
            walk(&node.folder.join("data"), &mut files);
        }
        files
    }

    /// Shard files of one node.
    pub fn shard_files(&self, index: usize) -> Vec<PathBuf> {
        self.data_files()
            .into_iter()
            .filter(|path| path.starts_with(self.nodes[index].folder.join("data").join("shards").join("shards")))
            .collect()
    }
}

/// `bdr-node dev` running in a folder, with the credentials it wrote.
pub struct DevProcess {
    child: Child,
    /// `credentials.env`: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION,
    /// AWS_ENDPOINT_URL, BDR_ADMIN_ENDPOINT, BDR_ADMIN_TOKEN, BDR_ADMIN_TOKEN_FILE.
    pub credentials: BTreeMap<String, String>,
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `bdr-node dev` in `folder` and waits until it prints `ready`.
pub fn start_dev(folder: &Path, s3_port: u16, admin_port: u16) -> DevProcess {
    std::fs::create_dir_all(folder).unwrap();
    let log_path = folder.join("dev.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .unwrap();
    let mut child = Command::new(binary("bdr-node"))
        .args(["dev", "--data"])
        .arg(folder)
        .args(["--s3-listen", &format!("127.0.0.1:{s3_port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("bdr-node dev starts");
    let stdout = child.stdout.take().unwrap();
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if sender.send(line).is_err() {
                return;
            }
        }
    });
    let mut printed = Vec::new();
    loop {
        match receiver.recv_timeout(Duration::from_secs(90)) {
            Ok(line) if line.starts_with("ready") => break,
            Ok(line) => printed.push(line),
            Err(_) => panic!(
                "bdr-node dev did not become ready; it printed {printed:?} and logged:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
    }
    assert!(printed.iter().any(|line| line.contains("S3 endpoint")), "{printed:?}");
    let credentials = std::fs::read_to_string(folder.join("credentials.env"))
        .unwrap()
        .lines()
        .filter_map(|line| {
            let (key, value) = line.strip_prefix("export ")?.split_once('=')?;
            Some((key.to_string(), value.to_string()))
        })
        .collect();
    DevProcess { child, credentials }
}

/// Writes a tree of `files` files under `root`, in three subfolders, of sizes from 1 byte
/// to about `files` KB (file i holds `pattern(…, seed + i)`); returns the relative paths,
/// sorted.
pub fn write_tree(root: &Path, files: usize, seed: u64) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = (0..files)
        .map(|index| {
            let relative = PathBuf::from(format!("sub{}/file-{index}.bin", index % 3));
            let path = root.join(&relative);
            std::fs::create_dir_all(path.parent().expect("has a parent")).expect("creates folders");
            std::fs::write(&path, pattern(1000 * index + 1, seed + index as u64)).expect("writes a file");
            relative
        })
        .collect();
    paths.sort();
    paths
}

/// Panics unless every file of `relative_paths` is byte-identical under both roots.
pub fn assert_same_files(expected_root: &Path, actual_root: &Path, relative_paths: &[PathBuf], what: &str) {
    for relative in relative_paths {
        let expected = std::fs::read(expected_root.join(relative)).expect("the original exists");
        let actual = std::fs::read(actual_root.join(relative))
            .unwrap_or_else(|error| panic!("{what}: {} missing: {error}", relative.display()));
        assert!(expected == actual, "{what}: {} differs", relative.display());
    }
}

/// Every file under `root`, relative to it, sorted.
pub fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).into_iter().flatten().flatten() {
            let path = entry.path();
            match path.is_dir() {
                true => folders.push(path),
                false => files.push(path.strip_prefix(root).expect("under root").to_path_buf()),
            }
        }
    }
    files.sort();
    files
}
