//! Real S3 clients against `bdr-node dev`: the aws cli creates a bucket, copies and syncs
//! files both ways, reads ranges and deletes; anonymous and wrongly signed requests are
//! refused; keys see and touch only buckets they own or were granted; a restart with the
//! same folder keeps data and credentials.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use bdr_tests::{assert_same_files, binary, free_tcp_port, pattern, run_bounded, start_dev, write_tree, DevProcess};

/// Runs the aws cli with the dev cluster's credentials (plus `overrides`).
fn run_aws(dev: &DevProcess, arguments: &[&str], overrides: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new("aws");
    command
        .args(arguments)
        .env_remove("AWS_CA_BUNDLE")
        .env("AWS_CONFIG_FILE", "/dev/null");
    for (key, value) in &dev.credentials {
        command.env(key, value);
    }
    for (key, value) in overrides {
        command.env(key, value);
    }
    run_bounded(&mut command, Duration::from_secs(120))
}

fn aws(dev: &DevProcess, arguments: &[&str]) -> String {
    aws_as(dev, arguments, &[])
}

/// Runs the aws cli with `overrides` (another key's credentials) and expects success.
fn aws_as(dev: &DevProcess, arguments: &[&str], overrides: &[(&str, &str)]) -> String {
    let output = run_aws(dev, arguments, overrides);
    assert!(
        output.status.success(),
        "aws {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Runs `bdr-node admin ARGS` with the dev cluster's endpoint and token file.
fn bdr_admin(dev: &DevProcess, arguments: &[&str]) -> String {
    let mut command = Command::new(binary("bdr-node"));
    command.arg("admin").args(arguments);
    for (key, value) in &dev.credentials {
        command.env(key, value);
    }
    let output = run_bounded(&mut command, Duration::from_secs(60));
    assert!(
        output.status.success(),
        "bdr-node admin {arguments:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn aws_fails(dev: &DevProcess, arguments: &[&str], overrides: &[(&str, &str)]) -> String {
    let output = run_aws(dev, arguments, overrides);
    assert!(!output.status.success(), "aws {arguments:?} should have failed");
    String::from_utf8_lossy(&output.stderr).to_string()
}

#[test]
fn aws_cli_round_trips_through_bdr_node_dev_and_survives_a_restart() {
    let aws_present = Command::new("aws")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        aws_present,
        "the aws cli is required (scripts/test-all installs it with pip)"
    );
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("dev");
    let (s3_port, admin_port) = (free_tcp_port(), free_tcp_port());
    let dev = start_dev(&folder, s3_port, admin_port);

    aws(&dev, &["s3", "mb", "s3://backups"]);
    let file = root.path().join("five-mib");
    let data = pattern(5 * 1024 * 1024 + 3, 11);
    std::fs::write(&file, &data).unwrap();
    aws(&dev, &["s3", "cp", file.to_str().unwrap(), "s3://backups/dir/five-mib"]);

    // Above 8 MiB the aws cli uploads in parts: multipart both ways, S3-style ETag.
    let big_file = root.path().join("twenty-mib");
    let big = pattern(20 * 1024 * 1024 + 5, 12);
    std::fs::write(&big_file, &big).unwrap();
    aws(
        &dev,
        &["s3", "cp", big_file.to_str().unwrap(), "s3://backups/dir/twenty-mib"],
    );
    let big_back = root.path().join("twenty-mib.back");
    aws(
        &dev,
        &["s3", "cp", "s3://backups/dir/twenty-mib", big_back.to_str().unwrap()],
    );
    assert!(
        std::fs::read(&big_back).unwrap() == big,
        "multipart object reads back different"
    );
    let head = aws(
        &dev,
        &["s3api", "head-object", "--bucket", "backups", "--key", "dir/twenty-mib"],
    );
    assert!(head.contains("-3\\\""), "multipart ETag has the part count: {head}");

    // The audit log names the access key behind every upload.
    let audit = std::fs::read_to_string(folder.join("audit").join("audit.log")).unwrap();
    let puts: Vec<serde_json::Value> = audit
        .lines()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|entry| entry["operation"] == "PutObject" && entry["key"] == "dir/five-mib")
        .collect();
    assert_eq!(puts.len(), 1, "audit log:\n{audit}");
    assert_eq!(puts[0]["bucket"], "backups");
    assert_eq!(puts[0]["status"], 200);
    assert!(
        puts[0]["who"]
            .as_str()
            .is_some_and(|who| who.len() >= 16 && who != "anonymous"),
        "{audit}"
    );
    assert!(audit.contains("\"operation\":\"CreateMultipartUpload\""), "{audit}");

    // A tree both ways with sync.
    let tree = root.path().join("tree");
    let mut tree_files = write_tree(&tree, 12, 0);
    // Keys that only survive a listing if it honours encoding-type=url (the aws cli asks
    // for it and decodes): a literal "%41", a plus, spaces, non-ASCII.
    for (name, seed) in [("odd/literal%41 and+plus.bin", 50), ("odd/ünïcödé naïve.txt", 51)] {
        std::fs::create_dir_all(tree.join("odd")).unwrap();
        std::fs::write(tree.join(name), pattern(3_000, seed)).unwrap();
        tree_files.push(name.into());
    }
    aws(&dev, &["s3", "sync", tree.to_str().unwrap(), "s3://backups/tree"]);
    let listing = aws(&dev, &["s3", "ls", "--recursive", "s3://backups/tree/"]);
    assert_eq!(listing.lines().count(), 14, "{listing}");
    assert!(listing.contains("tree/odd/literal%41 and+plus.bin"), "{listing}");
    let top = aws(&dev, &["s3", "ls", "s3://backups/"]);
    assert!(top.contains("PRE dir/") && top.contains("PRE tree/"), "{top}");
    let restored = root.path().join("restored");
    aws(&dev, &["s3", "sync", "s3://backups/tree", restored.to_str().unwrap()]);
    assert_same_files(&tree, &restored, &tree_files, "aws s3 sync");

    // Ranged read and metadata through s3api.
    let range_file = root.path().join("range");
    aws(
        &dev,
        &[
            "s3api",
            "get-object",
            "--bucket",
            "backups",
            "--key",
            "dir/five-mib",
            "--range",
            "bytes=4194300-4194400",
            range_file.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&range_file).unwrap(), data[4194300..=4194400]);
    let head = aws(
        &dev,
        &["s3api", "head-object", "--bucket", "backups", "--key", "dir/five-mib"],
    );
    assert!(head.contains("\"ContentLength\": 5242883"), "{head}");

    // Refusals: missing objects, a wrong secret, and anonymous requests.
    let missing = aws_fails(
        &dev,
        &["s3api", "head-object", "--bucket", "backups", "--key", "nope"],
        &[],
    );
    assert!(missing.contains("404") || missing.contains("Not Found"), "{missing}");
    let wrong = aws_fails(
        &dev,
        &["s3", "ls", "s3://backups"],
        &[("AWS_SECRET_ACCESS_KEY", "wrong-secret")],
    );
    assert!(wrong.contains("SignatureDoesNotMatch"), "{wrong}");
    let anonymous = ureq::get(format!("http://127.0.0.1:{s3_port}/backups/dir/five-mib"))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 403);
    // Garbage on the socket and an oversized head get an HTTP error, never a hang.
    for garbage in [
        b"\x00\x01GARBAGE \xff\r\n\r\n".to_vec(),
        format!(
            "GET /backups HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
            "a".repeat(100_000)
        )
        .into_bytes(),
    ] {
        use std::io::{Read, Write};
        let mut socket = std::net::TcpStream::connect(("127.0.0.1", s3_port)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = socket.write_all(&garbage);
        let mut answer = Vec::new();
        let _ = socket.read_to_end(&mut answer);
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 4"), "garbage got {answer:?}");
    }

    // Access: a second key may not create buckets, and neither sees nor touches another
    // key's bucket until `admin bucket allow` grants it; `deny` takes rights back.
    let created: serde_json::Value =
        serde_json::from_str(&bdr_admin(&dev, &["key", "create", "reader", "--json"])).unwrap();
    let reader_id = created["key_id"].as_str().unwrap().to_string();
    let reader_secret = created["secret_key"].as_str().unwrap().to_string();
    let as_reader = [
        ("AWS_ACCESS_KEY_ID", reader_id.as_str()),
        ("AWS_SECRET_ACCESS_KEY", reader_secret.as_str()),
    ];
    let denied = aws_fails(&dev, &["s3", "mb", "s3://readers-own"], &as_reader);
    assert!(denied.contains("AccessDenied"), "{denied}");
    let denied = aws_fails(&dev, &["s3", "ls", "s3://backups/"], &as_reader);
    assert!(denied.contains("AccessDenied"), "{denied}");
    assert_eq!(aws_as(&dev, &["s3", "ls"], &as_reader).trim(), "", "no visible buckets");
    bdr_admin(&dev, &["bucket", "allow", "backups", "--key", &reader_id, "--read"]);
    assert!(aws_as(&dev, &["s3", "ls"], &as_reader).contains("backups"));
    let read_back = root.path().join("read-back");
    aws_as(
        &dev,
        &["s3", "cp", "s3://backups/dir/five-mib", read_back.to_str().unwrap()],
        &as_reader,
    );
    assert!(std::fs::read(&read_back).unwrap() == data);
    let denied = aws_fails(
        &dev,
        &["s3", "cp", file.to_str().unwrap(), "s3://backups/from-reader"],
        &as_reader,
    );
    assert!(denied.contains("AccessDenied"), "{denied}");
    let denied = aws_fails(&dev, &["s3", "rm", "s3://backups/dir/five-mib"], &as_reader);
    assert!(denied.contains("AccessDenied"), "{denied}");
    let denied = aws_fails(&dev, &["s3", "rb", "s3://backups"], &as_reader);
    assert!(denied.contains("AccessDenied"), "{denied}");
    bdr_admin(
        &dev,
        &["bucket", "allow", "backups", "--key", &reader_id, "--read", "--write"],
    );
    aws_as(
        &dev,
        &["s3", "cp", file.to_str().unwrap(), "s3://backups/from-reader"],
        &as_reader,
    );
    let grants: serde_json::Value =
        serde_json::from_str(&bdr_admin(&dev, &["bucket", "grants", "backups", "--json"])).unwrap();
    assert_eq!(grants["owner_key_id"], dev.credentials["AWS_ACCESS_KEY_ID"]);
    assert_eq!(
        grants["grants"],
        serde_json::json!([{"key_id": reader_id, "read": true, "write": true}])
    );
    bdr_admin(&dev, &["bucket", "deny", "backups", "--key", &reader_id]);
    let denied = aws_fails(&dev, &["s3", "ls", "s3://backups/"], &as_reader);
    assert!(denied.contains("AccessDenied"), "{denied}");
    aws(&dev, &["s3", "rm", "s3://backups/from-reader"]);

    // Versioning and Object Lock through s3api.
    aws(&dev, &["s3api", "create-bucket", "--bucket", "history"]);
    aws(
        &dev,
        &[
            "s3api",
            "put-bucket-versioning",
            "--bucket",
            "history",
            "--versioning-configuration",
            "Status=Enabled",
        ],
    );
    let versioning = aws(&dev, &["s3api", "get-bucket-versioning", "--bucket", "history"]);
    assert!(versioning.contains("\"Enabled\""), "{versioning}");
    let version_of = |answer: String| -> String {
        let parsed: serde_json::Value = serde_json::from_str(&answer).unwrap();
        parsed["VersionId"].as_str().unwrap().to_string()
    };
    let small = root.path().join("small");
    std::fs::write(&small, b"first").unwrap();
    let first = version_of(aws(
        &dev,
        &[
            "s3api",
            "put-object",
            "--bucket",
            "history",
            "--key",
            "doc",
            "--body",
            small.to_str().unwrap(),
        ],
    ));
    std::fs::write(&small, b"second").unwrap();
    aws(&dev, &["s3", "cp", small.to_str().unwrap(), "s3://history/doc"]);
    let old = root.path().join("old");
    aws(
        &dev,
        &[
            "s3api",
            "get-object",
            "--bucket",
            "history",
            "--key",
            "doc",
            "--version-id",
            &first,
            old.to_str().unwrap(),
        ],
    );
    assert_eq!(std::fs::read(&old).unwrap(), b"first");
    aws(&dev, &["s3", "rm", "s3://history/doc"]);
    let versions: serde_json::Value =
        serde_json::from_str(&aws(&dev, &["s3api", "list-object-versions", "--bucket", "history"])).unwrap();
    assert_eq!(versions["Versions"].as_array().unwrap().len(), 2, "{versions}");
    assert_eq!(versions["DeleteMarkers"][0]["IsLatest"], true, "{versions}");

    aws(
        &dev,
        &[
            "s3api",
            "create-bucket",
            "--bucket",
            "vault",
            "--object-lock-enabled-for-bucket",
        ],
    );
    aws(
        &dev,
        &[
            "s3api",
            "put-object-lock-configuration",
            "--bucket",
            "vault",
            "--object-lock-configuration",
            r#"{"ObjectLockEnabled":"Enabled","Rule":{"DefaultRetention":{"Mode":"COMPLIANCE","Days":1}}}"#,
        ],
    );
    let locked = version_of(aws(
        &dev,
        &[
            "s3api",
            "put-object",
            "--bucket",
            "vault",
            "--key",
            "db.dump",
            "--body",
            small.to_str().unwrap(),
        ],
    ));
    let retention = aws(
        &dev,
        &[
            "s3api",
            "get-object-retention",
            "--bucket",
            "vault",
            "--key",
            "db.dump",
            "--version-id",
            &locked,
        ],
    );
    assert!(retention.contains("COMPLIANCE"), "{retention}");
    aws(
        &dev,
        &[
            "s3api",
            "put-object-legal-hold",
            "--bucket",
            "vault",
            "--key",
            "db.dump",
            "--legal-hold",
            "Status=ON",
        ],
    );
    let hold = aws(
        &dev,
        &[
            "s3api",
            "get-object-legal-hold",
            "--bucket",
            "vault",
            "--key",
            "db.dump",
        ],
    );
    assert!(hold.contains("\"ON\""), "{hold}");
    let refused = aws_fails(
        &dev,
        &[
            "s3api",
            "delete-object",
            "--bucket",
            "vault",
            "--key",
            "db.dump",
            "--version-id",
            &locked,
        ],
        &[],
    );
    assert!(refused.contains("AccessDenied"), "{refused}");

    // Delete, then restart with the same folder: the rest is still there, same key.
    aws(&dev, &["s3", "rm", "s3://backups/tree/sub0/file-0.bin"]);
    let key_before = dev.credentials["AWS_ACCESS_KEY_ID"].clone();
    drop(dev);
    let dev = start_dev(&folder, s3_port, admin_port);
    assert_eq!(dev.credentials["AWS_ACCESS_KEY_ID"], key_before);
    let back = root.path().join("back");
    aws(&dev, &["s3", "cp", "s3://backups/dir/five-mib", back.to_str().unwrap()]);
    assert!(std::fs::read(&back).unwrap() == data);
    let listing = aws(&dev, &["s3", "ls", "--recursive", "s3://backups/tree/"]);
    assert_eq!(listing.lines().count(), 13, "{listing}");
    // Versions and locks survive the restart too.
    let versions: serde_json::Value =
        serde_json::from_str(&aws(&dev, &["s3api", "list-object-versions", "--bucket", "history"])).unwrap();
    assert_eq!(versions["Versions"].as_array().unwrap().len(), 2, "{versions}");
    let refused = aws_fails(
        &dev,
        &[
            "s3api",
            "delete-object",
            "--bucket",
            "vault",
            "--key",
            "db.dump",
            "--version-id",
            &locked,
        ],
        &[],
    );
    assert!(refused.contains("AccessDenied"), "{refused}");
}

#[test]
fn boto3_with_default_settings_passes_its_smoke_script() {
    let boto3_present = Command::new("python3")
        .args(["-c", "import boto3"])
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        boto3_present,
        "boto3 is required (scripts/test-all installs it with pip)"
    );
    let root = tempfile::tempdir().unwrap();
    let dev = start_dev(&root.path().join("dev"), free_tcp_port(), free_tcp_port());
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients")
        .join("boto3_smoke.py");
    let mut command = Command::new("python3");
    command
        .arg(&script)
        .env_remove("AWS_CA_BUNDLE")
        .env("AWS_CONFIG_FILE", "/dev/null");
    for (key, value) in &dev.credentials {
        command.env(key, value);
    }
    let output = run_bounded(&mut command, Duration::from_secs(300));
    assert!(
        output.status.success(),
        "boto3 smoke script failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
