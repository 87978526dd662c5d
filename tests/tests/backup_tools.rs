//! Backup tools, unmodified and as users run them, against `bdr-node dev`: restic (init,
//! two backups, restore, `check --read-data`, forget --prune), rclone (sync, check, sync
//! back), s3cmd (sync both ways) and duplicity (full backup, restore), each with small
//! (inline), striped and multipart-sized files. Every restored tree must be
//! byte-identical to the original. The tools come from Debian's packages
//! (scripts/test-all installs them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use bdr_tests::{
    assert_same_files, files_under, free_tcp_port, pattern, run_bounded, start_dev, write_tree, DevProcess,
};

const TOOL_TIMEOUT: Duration = Duration::from_secs(300);

/// Runs a tool with the dev cluster's AWS_* variables (and `extra`), without the machine's
/// CA bundle override (some tools refuse a bundle they cannot read for plain HTTP).
fn run_tool(dev: &DevProcess, program: &str, arguments: &[&str], extra: &[(&str, &str)]) -> Output {
    let mut command = Command::new(program);
    command.args(arguments).env_remove("AWS_CA_BUNDLE");
    for (key, value) in &dev.credentials {
        command.env(key, value);
    }
    for (key, value) in extra {
        command.env(key, value);
    }
    run_bounded(&mut command, TOOL_TIMEOUT)
}

fn tool(dev: &DevProcess, program: &str, arguments: &[&str], extra: &[(&str, &str)]) -> String {
    let output = run_tool(dev, program, arguments, extra);
    assert!(
        output.status.success(),
        "{program} {arguments:?} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn require(program: &str) {
    let present = Command::new("which")
        .arg(program)
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        present,
        "{program} is required (scripts/test-all installs it from Debian's packages)"
    );
}

/// A tree of small files (stored inline in metadata) plus a 100 KB file (erasure-coded)
/// and a 13 MiB one (several stripes; multipart for the tools told to cut at 5 MiB).
fn backup_tree(root: &Path, files: usize, seed: u64) -> Vec<PathBuf> {
    let mut paths = write_tree(root, files, seed);
    std::fs::create_dir_all(root.join("big")).unwrap();
    for (name, length) in [("big/medium.bin", 100_000), ("big/large.bin", 13 * 1024 * 1024 + 7)] {
        std::fs::write(root.join(name), pattern(length, seed + 1_000)).unwrap();
        paths.push(PathBuf::from(name));
    }
    paths.sort();
    paths
}

fn restic(dev: &DevProcess, root: &Path) {
    let endpoint = &dev.credentials["AWS_ENDPOINT_URL"];
    let repository = format!("s3:{endpoint}/restic-backups/repo");
    let cache = root.join("restic-cache");
    let environment = [
        ("RESTIC_REPOSITORY", repository.as_str()),
        ("RESTIC_PASSWORD", "correct horse battery staple"),
        ("RESTIC_CACHE_DIR", cache.to_str().unwrap()),
    ];
    let tree = root.join("restic-tree");
    let files = backup_tree(&tree, 30, 100);
    tool(dev, "restic", &["init"], &environment);
    tool(dev, "restic", &["backup", tree.to_str().unwrap()], &environment);
    // A second backup after a change, so forget --prune has something to remove.
    std::fs::write(tree.join("sub0/file-0.bin"), b"changed after the first backup").unwrap();
    tool(dev, "restic", &["backup", tree.to_str().unwrap()], &environment);
    let snapshots = tool(dev, "restic", &["snapshots", "--json"], &environment);
    let snapshots: serde_json::Value = serde_json::from_str(&snapshots).unwrap();
    assert_eq!(snapshots.as_array().map(Vec::len), Some(2), "{snapshots}");

    let restored = root.join("restic-restored");
    tool(
        dev,
        "restic",
        &["restore", "latest", "--target", restored.to_str().unwrap()],
        &environment,
    );
    // restic restores under the absolute path it backed up.
    let restored_tree = restored.join(tree.strip_prefix("/").unwrap());
    assert_same_files(&tree, &restored_tree, &files, "restic restore");
    assert_eq!(files_under(&restored_tree), files, "restic restored other files");

    tool(dev, "restic", &["check", "--read-data"], &environment);
    tool(dev, "restic", &["forget", "--keep-last", "1", "--prune"], &environment);
    let snapshots = tool(dev, "restic", &["snapshots", "--json"], &environment);
    let snapshots: serde_json::Value = serde_json::from_str(&snapshots).unwrap();
    assert_eq!(snapshots.as_array().map(Vec::len), Some(1), "{snapshots}");
    tool(dev, "restic", &["check", "--read-data"], &environment);
}

fn rclone(dev: &DevProcess, root: &Path) {
    let environment = [
        ("RCLONE_CONFIG_BDR_TYPE", "s3"),
        ("RCLONE_CONFIG_BDR_PROVIDER", "Other"),
        (
            "RCLONE_CONFIG_BDR_ACCESS_KEY_ID",
            dev.credentials["AWS_ACCESS_KEY_ID"].as_str(),
        ),
        (
            "RCLONE_CONFIG_BDR_SECRET_ACCESS_KEY",
            dev.credentials["AWS_SECRET_ACCESS_KEY"].as_str(),
        ),
        (
            "RCLONE_CONFIG_BDR_ENDPOINT",
            dev.credentials["AWS_ENDPOINT_URL"].as_str(),
        ),
        (
            "RCLONE_CONFIG_BDR_REGION",
            dev.credentials["AWS_DEFAULT_REGION"].as_str(),
        ),
        ("RCLONE_CONFIG", "/dev/null"),
        // Multipart above 5 MiB, so the 13 MiB file goes up in three parts.
        ("RCLONE_S3_UPLOAD_CUTOFF", "5M"),
        ("RCLONE_S3_CHUNK_SIZE", "5M"),
    ];
    let tree = root.join("rclone-tree");
    let files = backup_tree(&tree, 20, 200);
    tool(dev, "rclone", &["mkdir", "bdr:rclone-backups"], &environment);
    tool(
        dev,
        "rclone",
        &["sync", tree.to_str().unwrap(), "bdr:rclone-backups/tree"],
        &environment,
    );
    tool(
        dev,
        "rclone",
        &["check", tree.to_str().unwrap(), "bdr:rclone-backups/tree"],
        &environment,
    );
    // A deleted file goes from the remote on the next sync.
    std::fs::remove_file(tree.join("sub1/file-1.bin")).unwrap();
    tool(
        dev,
        "rclone",
        &["sync", tree.to_str().unwrap(), "bdr:rclone-backups/tree"],
        &environment,
    );
    let back = root.join("rclone-back");
    tool(
        dev,
        "rclone",
        &["sync", "bdr:rclone-backups/tree", back.to_str().unwrap()],
        &environment,
    );
    let remaining: Vec<_> = files
        .into_iter()
        .filter(|path| !path.ends_with("sub1/file-1.bin"))
        .collect();
    assert_same_files(&tree, &back, &remaining, "rclone sync back");
    assert_eq!(files_under(&back), remaining, "rclone synced other files back");
}

fn s3cmd(dev: &DevProcess, root: &Path) {
    let host = dev.credentials["AWS_ENDPOINT_URL"]
        .trim_start_matches("http://")
        .to_string();
    let config = root.join("s3cmd.cfg");
    std::fs::write(
        &config,
        format!(
            "[default]\naccess_key = {}\nsecret_key = {}\nhost_base = {host}\nhost_bucket = {host}\n\
             use_https = False\nbucket_location = {}\nsignature_v2 = False\nmultipart_chunk_size_mb = 5\n",
            dev.credentials["AWS_ACCESS_KEY_ID"],
            dev.credentials["AWS_SECRET_ACCESS_KEY"],
            dev.credentials["AWS_DEFAULT_REGION"],
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let tree = root.join("s3cmd-tree");
    let files = backup_tree(&tree, 15, 300);
    tool(dev, "s3cmd", &["-c", config, "mb", "s3://s3cmd-backups"], &[]);
    tool(
        dev,
        "s3cmd",
        &[
            "-c",
            config,
            "sync",
            &format!("{}/", tree.display()),
            "s3://s3cmd-backups/tree/",
        ],
        &[],
    );
    let listing = tool(
        dev,
        "s3cmd",
        &["-c", config, "ls", "--recursive", "s3://s3cmd-backups/"],
        &[],
    );
    assert_eq!(listing.lines().count(), files.len(), "{listing}");
    let back = root.join("s3cmd-back");
    tool(
        dev,
        "s3cmd",
        &[
            "-c",
            config,
            "sync",
            "s3://s3cmd-backups/tree/",
            &format!("{}/", back.display()),
        ],
        &[],
    );
    assert_same_files(&tree, &back, &files, "s3cmd sync back");
}

fn duplicity(dev: &DevProcess, root: &Path) {
    let endpoint = dev.credentials["AWS_ENDPOINT_URL"].clone();
    let archive = root.join("duplicity-archive");
    let environment = [("PASSPHRASE", "duplicity test passphrase")];
    let common = [
        "--s3-endpoint-url",
        endpoint.as_str(),
        "--archive-dir",
        archive.to_str().unwrap(),
        "--no-print-statistics",
    ];
    let tree = root.join("duplicity-tree");
    let files = backup_tree(&tree, 15, 400);
    let target = "boto3+s3://duplicity-backups/host1";
    // duplicity wants its bucket to exist (its own create call names us-east-1).
    tool(
        dev,
        "s3cmd",
        &[
            "-c",
            root.join("s3cmd.cfg").to_str().unwrap(),
            "mb",
            "s3://duplicity-backups",
        ],
        &[],
    );
    let duplicity = |action: &str, from: &str, to: &str| {
        let mut arguments: Vec<&str> = vec![action];
        arguments.extend(common);
        arguments.extend([from, to]);
        tool(dev, "duplicity", &arguments, &environment);
    };
    duplicity("full", tree.to_str().unwrap(), target);
    let restored = root.join("duplicity-restored");
    duplicity("restore", target, restored.to_str().unwrap());
    assert_same_files(&tree, &restored, &files, "duplicity restore");
    assert_eq!(files_under(&restored), files, "duplicity restored other files");
}

#[test]
fn restic_rclone_s3cmd_and_duplicity_back_up_and_restore_through_bdr_node_dev() {
    for program in ["restic", "rclone", "s3cmd", "duplicity"] {
        require(program);
    }
    let root = tempfile::tempdir().unwrap();
    let dev = start_dev(&root.path().join("dev"), free_tcp_port(), free_tcp_port());
    restic(&dev, root.path());
    rclone(&dev, root.path());
    s3cmd(&dev, root.path());
    duplicity(&dev, root.path());
}
