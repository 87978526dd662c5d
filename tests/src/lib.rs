//! Helpers for integration tests that start real `bdr-node` processes on loopback and
//! drive them the way an operator would: config files, the CLI, signals.

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

/// A loopback port free right now (TCP and UDP separately).
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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
    child: Option<Child>,
}

pub struct NodeSettings<'a> {
    pub zone: &'a str,
    pub secret_file: &'a Path,
    pub bootstrap: Vec<String>,
    pub down_after: &'a str,
    pub gossip_interval: &'a str,
}

impl NodeProcess {
    pub fn new(root: &Path, name: &str, settings: &NodeSettings) -> NodeProcess {
        let folder = root.join(name);
        std::fs::create_dir_all(&folder).unwrap();
        let tcp_port = free_tcp_port();
        let quic_port = free_udp_port();
        let admin_port = free_tcp_port();
        let bootstrap: Vec<String> = settings
            .bootstrap
            .iter()
            .map(|address| format!("{address:?}"))
            .collect();
        let config = format!(
            "data_dir = \"data\"\nzone = \"{zone}\"\ncapacity = \"10 GiB\"\n\
             listen = [\"/ip4/127.0.0.1/tcp/{tcp_port}\", \"/ip4/127.0.0.1/udp/{quic_port}/quic-v1\"]\n\
             bootstrap = [{bootstrap}]\ncluster_secret_file = {secret:?}\n\
             down_after = \"{down_after}\"\ngossip_interval = \"{gossip_interval}\"\n\
             [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n",
            zone = settings.zone,
            bootstrap = bootstrap.join(", "),
            secret = settings.secret_file.display().to_string(),
            down_after = settings.down_after,
            gossip_interval = settings.gossip_interval,
        );
        let config_path = folder.join("node.toml");
        std::fs::write(&config_path, config).unwrap();
        NodeProcess {
            name: name.to_string(),
            folder,
            config_path,
            tcp_port,
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
            .env("RUST_LOG", "info,libp2p=warn,yamux=error")
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

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.folder.join("node.log")).unwrap_or_default()
    }

    /// `bdr-node admin status --json`, or None while the node is not answering.
    pub fn status(&self) -> Option<serde_json::Value> {
        let output = run_bounded(
            Command::new(binary("bdr-node"))
                .args(["admin", "--endpoint"])
                .arg(format!("http://127.0.0.1:{}", self.admin_port))
                .arg("--token-file")
                .arg(self.folder.join("data").join("admin.token"))
                .args(["status", "--json"]),
            Duration::from_secs(15),
        );
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill_hard();
    }
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
