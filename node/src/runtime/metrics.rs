//! `/metrics` on the admin listener, in the Prometheus text format.
//!
//! Gauges are read at scrape time from what the node already knows (membership, its
//! store, the maintenance reports of every live node); the S3 gateway's request counters
//! and latency histograms are kept here, fed by a middleware around the gateway. Written
//! by hand rather than through a metrics facade: a handful of families, no global
//! recorder (`bdr-node dev` runs several nodes in one process), no extra dependency.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;

use super::audit::{access_key_of, AuditEntry, AuditLog};
use crate::cluster::maintenance::MaintenanceSummary;
use crate::cluster::membership::Liveness;
use crate::cluster::ClusterStatus;
use crate::env::StoreUsage;

/// Upper bounds (seconds) of the S3 latency histogram buckets.
pub const LATENCY_BUCKETS_S: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Default, Clone)]
struct Histogram {
    /// Per bucket of `LATENCY_BUCKETS_S` (not cumulative; summed when rendered).
    counts: [u64; LATENCY_BUCKETS_S.len()],
    count: u64,
    sum_s: f64,
}

/// The S3 gateway's request metrics (one per gateway listener).
#[derive(Default)]
pub struct GatewayMetrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    latency: Mutex<BTreeMap<&'static str, Histogram>>,
    received_bytes: AtomicU64,
    sent_bytes: AtomicU64,
}

fn declared_length(headers: &HeaderMap) -> u64 {
    // aws-chunked bodies declare the payload apart from the framing around it.
    ["x-amz-decoded-content-length", "content-length"]
        .iter()
        .find_map(|name| headers.get(*name)?.to_str().ok()?.parse().ok())
        .unwrap_or(0)
}

/// The S3 operation a request is, from its method, path and query (for metrics only;
/// s3s does the real routing).
pub fn s3_operation(method: &Method, path: &str, query: &str, headers: &HeaderMap) -> &'static str {
    let path = path.trim_start_matches('/');
    let (bucket, key) = match path.split_once('/') {
        Some((bucket, key)) if !key.is_empty() => (bucket, Some(key)),
        Some((bucket, _)) => (bucket, None),
        None => (path, None),
    };
    let has = |name: &str| query.split('&').any(|pair| pair.split('=').next() == Some(name));
    let copy = headers.contains_key("x-amz-copy-source");
    match (bucket.is_empty(), key.is_some(), method.as_str()) {
        (true, _, "GET") => "ListBuckets",
        (false, false, "GET") if has("uploads") => "ListMultipartUploads",
        (false, false, "GET") if has("versions") => "ListObjectVersions",
        (false, false, "GET") if has("location") => "GetBucketLocation",
        (false, false, "GET") if has("versioning") => "GetBucketVersioning",
        (false, false, "GET") if has("object-lock") => "GetObjectLockConfiguration",
        (false, false, "GET") if query.contains("list-type=2") => "ListObjectsV2",
        (false, false, "GET") => "ListObjects",
        (false, false, "PUT") if has("versioning") => "PutBucketVersioning",
        (false, false, "PUT") if has("object-lock") => "PutObjectLockConfiguration",
        (false, false, "PUT") => "CreateBucket",
        (false, false, "HEAD") => "HeadBucket",
        (false, false, "DELETE") => "DeleteBucket",
        (false, false, "POST") if has("delete") => "DeleteObjects",
        (false, true, "GET") if has("uploadId") => "ListParts",
        (false, true, "GET") if has("retention") => "GetObjectRetention",
        (false, true, "GET") if has("legal-hold") => "GetObjectLegalHold",
        (false, true, "GET") => "GetObject",
        (false, true, "HEAD") => "HeadObject",
        (false, true, "PUT") if has("uploadId") && copy => "UploadPartCopy",
        (false, true, "PUT") if has("uploadId") => "UploadPart",
        (false, true, "PUT") if has("retention") => "PutObjectRetention",
        (false, true, "PUT") if has("legal-hold") => "PutObjectLegalHold",
        (false, true, "PUT") if copy => "CopyObject",
        (false, true, "PUT") => "PutObject",
        (false, true, "POST") if has("uploads") => "CreateMultipartUpload",
        (false, true, "POST") if has("uploadId") => "CompleteMultipartUpload",
        (false, true, "DELETE") if has("uploadId") => "AbortMultipartUpload",
        (false, true, "DELETE") => "DeleteObject",
        _ => "Other",
    }
}

impl GatewayMetrics {
    fn observe(&self, operation: &'static str, status: u16, elapsed_s: f64, received: u64, sent: u64) {
        *self
            .requests
            .lock()
            .expect("not poisoned")
            .entry((operation, status))
            .or_default() += 1;
        let mut latency = self.latency.lock().expect("not poisoned");
        let histogram = latency.entry(operation).or_default();
        if let Some(bucket) = LATENCY_BUCKETS_S.iter().position(|bound| elapsed_s <= *bound) {
            histogram.counts[bucket] += 1;
        }
        histogram.count += 1;
        histogram.sum_s += elapsed_s;
        self.received_bytes.fetch_add(received, Ordering::Relaxed);
        self.sent_bytes.fetch_add(sent, Ordering::Relaxed);
    }

    fn render(&self, text: &mut String) {
        family(
            text,
            "bdr_s3_requests_total",
            "counter",
            "S3 requests by operation and HTTP status.",
        );
        for ((operation, status), count) in self.requests.lock().expect("not poisoned").iter() {
            let _ = writeln!(
                text,
                "bdr_s3_requests_total{{operation=\"{operation}\",status=\"{status}\"}} {count}"
            );
        }
        family(
            text,
            "bdr_s3_request_duration_seconds",
            "histogram",
            "S3 request latency until the response head, by operation.",
        );
        for (operation, histogram) in self.latency.lock().expect("not poisoned").iter() {
            let mut cumulative = 0u64;
            for (bound, count) in LATENCY_BUCKETS_S.iter().zip(histogram.counts) {
                cumulative += count;
                let _ = writeln!(
                    text,
                    "bdr_s3_request_duration_seconds_bucket{{operation=\"{operation}\",le=\"{bound}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                text,
                "bdr_s3_request_duration_seconds_bucket{{operation=\"{operation}\",le=\"+Inf\"}} {}\n\
                 bdr_s3_request_duration_seconds_sum{{operation=\"{operation}\"}} {}\n\
                 bdr_s3_request_duration_seconds_count{{operation=\"{operation}\"}} {}",
                histogram.count, histogram.sum_s, histogram.count
            );
        }
        counter(
            text,
            "bdr_s3_received_bytes_total",
            "Request body bytes the S3 gateway accepted (as declared).",
            self.received_bytes.load(Ordering::Relaxed),
        );
        counter(
            text,
            "bdr_s3_sent_bytes_total",
            "Response body bytes the S3 gateway sent (as declared).",
            self.sent_bytes.load(Ordering::Relaxed),
        );
    }
}

/// What watches the S3 gateway's requests: the metrics and the audit log.
pub struct S3Observer {
    pub metrics: std::sync::Arc<GatewayMetrics>,
    pub audit: std::sync::Arc<AuditLog>,
}

/// Axum middleware around the S3 gateway: counts, times and audits every request.
pub async fn observe_s3(State(observer): State<std::sync::Arc<S3Observer>>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let query = request.uri().query().unwrap_or("").to_string();
    let operation = s3_operation(request.method(), &path, &query, request.headers());
    let who = access_key_of(
        request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok()),
        &query,
    );
    let received = declared_length(request.headers());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    let sent = declared_length(response.headers());
    observer
        .metrics
        .observe(operation, status, started.elapsed().as_secs_f64(), received, sent);
    let trimmed = path.trim_start_matches('/');
    let (bucket, key) = match trimmed.split_once('/') {
        Some((bucket, key)) => (bucket, (!key.is_empty()).then_some(key)),
        None => (trimmed, None),
    };
    let version_id = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("versionId="))
        .map(str::to_string);
    observer.audit.record(AuditEntry {
        at_ms: now_ms(),
        who: who.unwrap_or_else(|| "anonymous".into()),
        operation: operation.to_string(),
        bucket: (!bucket.is_empty()).then(|| bucket.to_string()),
        key: key.map(str::to_string),
        version_id,
        status,
        result: if status < 400 { "ok" } else { "refused_or_failed" },
    });
    response
}

/// Wall clock for audit lines (the runtime may read it; the cluster logic may not).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or(0)
}

fn family(text: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(text, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(text: &mut String, name: &str, help: &str, value: u64) {
    family(text, name, "gauge", help);
    let _ = writeln!(text, "{name} {value}");
}

fn counter(text: &mut String, name: &str, help: &str, value: u64) {
    family(text, name, "counter", help);
    let _ = writeln!(text, "{name} {value}");
}

/// Renders every metric family.
pub fn render(
    status: &ClusterStatus,
    maintenance: &MaintenanceSummary,
    usage: StoreUsage,
    gateway: Option<&GatewayMetrics>,
) -> String {
    let mut text = String::new();
    family(
        &mut text,
        "bdr_peers",
        "gauge",
        "Nodes of the layout by liveness, as this node sees them.",
    );
    for state in [Liveness::Up, Liveness::Suspect, Liveness::Down] {
        let count = status.nodes.iter().filter(|node| node.state == state).count();
        let name = serde_json::to_value(state)
            .ok()
            .and_then(|value| value.as_str().map(str::to_string))
            .unwrap_or_default();
        let _ = writeln!(text, "bdr_peers{{state=\"{name}\"}} {count}");
    }
    let mut zones: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for node in &status.nodes {
        let zone = zones.entry(node.zone.as_str()).or_default();
        zone.0 += node.capacity_bytes;
        zone.1 += node.used_bytes.unwrap_or(0);
    }
    family(
        &mut text,
        "bdr_zone_capacity_bytes",
        "gauge",
        "Shard capacity offered per zone.",
    );
    for (zone, (capacity, _)) in &zones {
        let _ = writeln!(text, "bdr_zone_capacity_bytes{{zone=\"{zone}\"}} {capacity}");
    }
    family(
        &mut text,
        "bdr_zone_used_bytes",
        "gauge",
        "Shard bytes stored per zone (as last announced).",
    );
    for (zone, (_, used)) in &zones {
        let _ = writeln!(text, "bdr_zone_used_bytes{{zone=\"{zone}\"}} {used}");
    }
    let stripes = &maintenance.stripes;
    family(
        &mut text,
        "bdr_stripes",
        "gauge",
        "Stripes by remaining redundancy, summed over the nodes that maintain them.",
    );
    for (health, count) in [
        ("healthy", stripes.healthy),
        ("misplaced", stripes.misplaced),
        ("degraded", stripes.degraded),
        ("at_risk", stripes.at_risk),
        ("lost", stripes.lost),
        ("unknown", stripes.unknown),
    ] {
        let _ = writeln!(text, "bdr_stripes{{health=\"{health}\"}} {count}");
    }
    let repair = &maintenance.repair;
    gauge(
        &mut text,
        "bdr_repair_queued_stripes",
        "Stripes waiting for repair.",
        repair.queued_stripes,
    );
    gauge(
        &mut text,
        "bdr_repair_queued_bytes",
        "Shard bytes repair still has to write.",
        repair.queued_bytes,
    );
    gauge(
        &mut text,
        "bdr_repair_rate_bytes_per_second",
        "Repair write rate over the current or last pass.",
        repair.bytes_per_s,
    );
    counter(
        &mut text,
        "bdr_repaired_stripes_total",
        "Stripes brought back to full redundancy.",
        repair.repaired_stripes,
    );
    counter(
        &mut text,
        "bdr_moved_shards_total",
        "Shards copied to a new holder after a layout change.",
        repair.moved_shards,
    );
    let scrub = &maintenance.scrub;
    gauge(
        &mut text,
        "bdr_scrub_checked_shards",
        "Shards verified in the current scrub pass.",
        scrub.shards_checked,
    );
    gauge(
        &mut text,
        "bdr_scrub_pass_shards",
        "Shards in the current scrub pass.",
        scrub.shards_total,
    );
    counter(
        &mut text,
        "bdr_scrub_corrupt_shards_total",
        "Corrupt shards scrub found (each quarantined and rebuilt).",
        scrub.corrupt_found,
    );
    counter(
        &mut text,
        "bdr_gc_deleted_shards_total",
        "Shards deleted as garbage or as old copies of moved shards.",
        maintenance.gc_deleted_shards,
    );
    gauge(
        &mut text,
        "bdr_shards_stored",
        "Shards stored on this node.",
        usage.shard_count,
    );
    gauge(
        &mut text,
        "bdr_store_used_bytes",
        "Shard bytes stored on this node.",
        usage.used_bytes,
    );
    gauge(
        &mut text,
        "bdr_store_capacity_bytes",
        "Shard capacity of this node.",
        usage.capacity_bytes,
    );
    counter(
        &mut text,
        "bdr_store_corrupt_reads_total",
        "Reads on this node that found a corrupt shard.",
        usage.corrupt_reads,
    );
    if let Some(gateway) = gateway {
        gateway.render(&mut text);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s3_operations_are_named_from_the_request_shape() {
        let none = HeaderMap::new();
        let mut copy = HeaderMap::new();
        copy.insert("x-amz-copy-source", "b/k".parse().unwrap());
        let cases = [
            (Method::GET, "/", "", &none, "ListBuckets"),
            (Method::GET, "/b", "list-type=2&prefix=a", &none, "ListObjectsV2"),
            (Method::GET, "/b/", "", &none, "ListObjects"),
            (Method::PUT, "/b", "", &none, "CreateBucket"),
            (Method::PUT, "/b/k/x", "", &none, "PutObject"),
            (Method::PUT, "/b/k", "", &copy, "CopyObject"),
            (Method::PUT, "/b/k", "partNumber=1&uploadId=u", &none, "UploadPart"),
            (Method::POST, "/b/k", "uploads", &none, "CreateMultipartUpload"),
            (Method::POST, "/b/k", "uploadId=u", &none, "CompleteMultipartUpload"),
            (Method::POST, "/b", "delete", &none, "DeleteObjects"),
            (Method::DELETE, "/b/k", "", &none, "DeleteObject"),
            (Method::GET, "/b/k", "", &none, "GetObject"),
        ];
        for (method, path, query, headers, expected) in cases {
            assert_eq!(
                s3_operation(&method, path, query, headers),
                expected,
                "{method} {path}?{query}"
            );
        }
    }

    #[test]
    fn the_exposition_has_help_type_and_cumulative_buckets() {
        let metrics = GatewayMetrics::default();
        metrics.observe("GetObject", 200, 0.003, 0, 10);
        metrics.observe("GetObject", 200, 0.2, 0, 10);
        metrics.observe("PutObject", 403, 100.0, 5, 0);
        let mut text = String::new();
        metrics.render(&mut text);
        assert!(text.contains("# TYPE bdr_s3_requests_total counter"));
        assert!(text.contains("bdr_s3_requests_total{operation=\"GetObject\",status=\"200\"} 2"));
        assert!(text.contains("bdr_s3_request_duration_seconds_bucket{operation=\"GetObject\",le=\"0.005\"} 1"));
        assert!(text.contains("bdr_s3_request_duration_seconds_bucket{operation=\"GetObject\",le=\"0.25\"} 2"));
        assert!(text.contains("bdr_s3_request_duration_seconds_bucket{operation=\"PutObject\",le=\"60\"} 0"));
        assert!(text.contains("bdr_s3_request_duration_seconds_bucket{operation=\"PutObject\",le=\"+Inf\"} 1"));
        assert!(text.contains("bdr_s3_sent_bytes_total 20"));
    }
}
