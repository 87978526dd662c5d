//! The admin HTTP API (axum) and its client (`bdr-node admin …`).
//!
//! Every endpoint requires `Authorization: Bearer <token>`; the token lives in a file
//! (mode 0600) that is created with a random token if missing.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use serde::Deserialize;

use bdr_protocol::layout::NodeStatus;
use bdr_protocol::wire::MaintenanceCommand;

use super::audit::{AuditEntry, AuditLog};
use super::metrics::GatewayMetrics;
use crate::cluster::data::{DataError, ObjectWrite};
use crate::cluster::maintenance::{MaintenanceSummary, MaintenanceView, RemoveError, REMOVE_CHECK_TIMEOUT_MS};
use crate::cluster::{ClusterNode, ClusterStatus, LayoutView};
use crate::env::Env;

/// Longest admin token accepted from a file.
pub const TOKEN_LENGTH_BYTES_MAX: usize = 1024;
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

pub fn load_or_create_token(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => return parse_token(path, &text),
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("cannot read admin token {}: {error}", path.display()))
        }
        Err(_) => {}
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
    }
    let token = hex::encode(rand::random::<[u8; 32]>());
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|error| format!("cannot create admin token {}: {error}", path.display()))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|_| file.sync_all())
        .map_err(|error| format!("cannot write admin token {}: {error}", path.display()))?;
    tracing::info!(path = %path.display(), "created an admin token");
    Ok(token)
}

pub fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read admin token {}: {error}", path.display()))?;
    parse_token(path, &text)
}

fn parse_token(path: &Path, text: &str) -> Result<String, String> {
    let token = text.trim();
    if token.is_empty() || token.len() > TOKEN_LENGTH_BYTES_MAX || !token.bytes().all(|byte| byte.is_ascii_graphic()) {
        return Err(format!(
            "admin token in {} must be 1..={TOKEN_LENGTH_BYTES_MAX} printable characters",
            path.display()
        ));
    }
    Ok(token.to_string())
}

struct AdminState<E: Env> {
    token: String,
    cluster: Arc<ClusterNode<E>>,
    /// The S3 gateway's request metrics, when this process serves S3.
    gateway_metrics: Option<Arc<GatewayMetrics>>,
    audit: Arc<AuditLog>,
}

/// Audits every admin request that changes something (reads are not audited: status
/// polling would drown the log).
async fn audit_admin<E: Env>(State(state): State<Arc<AdminState<E>>>, request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    if method != axum::http::Method::GET && method != axum::http::Method::HEAD {
        let status = response.status().as_u16();
        state.audit.record(AuditEntry {
            at_ms: super::metrics::now_ms(),
            who: if status == 401 { "unauthenticated" } else { "admin" }.into(),
            operation: format!("{method} {path}"),
            bucket: None,
            key: None,
            version_id: None,
            status,
            result: if status < 400 { "ok" } else { "refused_or_failed" },
        });
    }
    response
}

async fn require_token<E: Env>(State(state): State<Arc<AdminState<E>>>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    // Compare hashes so the comparison time does not depend on the token's bytes.
    let matches =
        presented.is_some_and(|presented| blake3::hash(presented.as_bytes()) == blake3::hash(state.token.as_bytes()));
    if !matches {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": "missing or wrong bearer token"})),
        )
            .into_response();
    }
    next.run(request).await
}

async fn status<E: Env>(State(state): State<Arc<AdminState<E>>>) -> Json<ClusterStatus> {
    let mut status = state.cluster.status();
    status.maintenance = Some(state.cluster.maintenance_view().await.summary);
    Json(status)
}

/// `GET /metrics`: Prometheus text format.
async fn metrics<E: Env>(State(state): State<Arc<AdminState<E>>>) -> Response {
    let status = state.cluster.status();
    let summary = state.cluster.maintenance_view().await.summary;
    let usage = state.cluster.env().shard_store().usage();
    let text = super::metrics::render(&status, &summary, usage, state.gateway_metrics.as_deref());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn maintenance<E: Env>(State(state): State<Arc<AdminState<E>>>) -> Json<MaintenanceView> {
    Json(state.cluster.maintenance_view().await)
}

async fn control_maintenance<E: Env>(
    State(state): State<Arc<AdminState<E>>>,
    UrlPath(command): UrlPath<String>,
) -> Response {
    let command = match command.as_str() {
        "repair-start" => MaintenanceCommand::RepairStart,
        "repair-pause" => MaintenanceCommand::RepairPause,
        "scrub-start" => MaintenanceCommand::ScrubStart,
        other => {
            return error_response(
                StatusCode::NOT_FOUND,
                format!("no maintenance command {other:?} (repair-start, repair-pause, scrub-start)"),
            )
        }
    };
    let reports = state.cluster.control_cluster_maintenance(command).await;
    Json(MaintenanceView::from_reports(reports)).into_response()
}

async fn layout<E: Env>(State(state): State<Arc<AdminState<E>>>) -> Json<LayoutView> {
    Json(state.cluster.layout_view())
}

fn error_response(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

/// `POST /v1/nodes/{id}/drain` and `POST /v1/nodes/{id}/remove?force=true`.
async fn node_action<E: Env>(
    State(state): State<Arc<AdminState<E>>>,
    UrlPath((id, action)): UrlPath<(String, String)>,
    Query(query): Query<RemoveQuery>,
) -> Response {
    let node = match state.cluster.resolve_node(&id) {
        Ok(node) => node,
        Err(error) => return error_response(StatusCode::NOT_FOUND, error.to_string()),
    };
    let result = match action.as_str() {
        "drain" => state
            .cluster
            .set_node_status(node, NodeStatus::Draining)
            .await
            .map(|()| None)
            .map_err(RemoveError::from),
        "remove" => state.cluster.remove_node(node, query.force).await.map(Some),
        other => {
            return error_response(
                StatusCode::NOT_FOUND,
                format!("no node action {other:?} (drain, remove)"),
            )
        }
    };
    match result {
        Ok(health) => Json(serde_json::json!({
            "node": node.to_string(),
            "action": action,
            "stripes": health,
            "layout": state.cluster.layout_view(),
        }))
        .into_response(),
        Err(error @ (RemoveError::StillActive(_) | RemoveError::NotSafe(_))) => {
            error_response(StatusCode::CONFLICT, error.to_string())
        }
        Err(error @ RemoveError::Timeout(_)) => error_response(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
        Err(error) => error_response(StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

fn data_error_response(error: DataError) -> Response {
    let status = match &error {
        DataError::NoSuchBucket(_)
        | DataError::NoSuchKey
        | DataError::NoSuchVersion
        | DataError::NoSuchUpload
        | DataError::NoSuchAccessKey(_) => StatusCode::NOT_FOUND,
        DataError::ObjectLocked(_) => StatusCode::FORBIDDEN,
        DataError::InvalidBucketState(_) => StatusCode::CONFLICT,
        DataError::InvalidPart(_) | DataError::InvalidPartOrder | DataError::EntityTooSmall { .. } => {
            StatusCode::BAD_REQUEST
        }
        DataError::BucketExists(_)
        | DataError::BucketNotEmpty(_)
        | DataError::BucketBeingDeleted(_)
        | DataError::BucketBusy(_)
        | DataError::VersionBusy(_) => StatusCode::CONFLICT,
        DataError::InvalidBucketName(_)
        | DataError::InvalidBucketOptions
        | DataError::InvalidKey(_)
        | DataError::BadDigest(_)
        | DataError::OwnerRights(_)
        | DataError::InvalidVersionId(_)
        | DataError::InvalidLockRequest(_)
        | DataError::BodyTimeout(_)
        | DataError::Body(_) => StatusCode::BAD_REQUEST,
        DataError::InvalidRange { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
        DataError::NoDataKeys | DataError::NotDurable(_) | DataError::Meta(_) | DataError::BucketRequestsBusy(_) => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        DataError::StripeUnreadable { .. } | DataError::Corrupt(_) | DataError::TooManyBuckets(_) => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    (status, Json(serde_json::json!({ "error": error.to_string() }))).into_response()
}

async fn create_bucket<E: Env>(State(state): State<Arc<AdminState<E>>>, UrlPath(bucket): UrlPath<String>) -> Response {
    match state.cluster.create_bucket(&bucket, "admin").await {
        Ok(record) => (StatusCode::CREATED, Json(serde_json::json!({ "bucket": record.name }))).into_response(),
        Err(error) => data_error_response(error),
    }
}

/// `PUT /v1/objects/{bucket}/{key}`: the internal data path, streamed (the S3 gateway
/// is the public way in; this one exists for operators and tests).
async fn put_object<E: Env>(
    State(state): State<Arc<AdminState<E>>>,
    UrlPath((bucket, key)): UrlPath<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let body = body.into_data_stream().map_err(std::io::Error::other).into_async_read();
    let write = ObjectWrite {
        bucket,
        key,
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string),
        ..ObjectWrite::default()
    };
    match state.cluster.put_object(write, body).await {
        Ok(record) => Json(serde_json::json!({ "etag": record.etag, "size_bytes": record.size_bytes })).into_response(),
        Err(error) => data_error_response(error),
    }
}

/// Parses `bytes=a-b`, `bytes=a-` and `bytes=-n` against an object size.
fn parse_range(header: &str, size: u64) -> Option<std::ops::Range<u64>> {
    let spec = header.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    match (start.is_empty(), end.is_empty()) {
        (false, false) => Some(start.parse().ok()?..end.parse::<u64>().ok()?.saturating_add(1).min(size)),
        (false, true) => Some(start.parse().ok()?..size),
        (true, false) => Some(size.saturating_sub(end.parse().ok()?)..size),
        (true, true) => None,
    }
}

async fn get_object<E: Env>(
    State(state): State<Arc<AdminState<E>>>,
    UrlPath((bucket, key)): UrlPath<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let record = match state.cluster.head_object(&bucket, &key).await {
        Ok(record) => record,
        Err(error) => return data_error_response(error),
    };
    let size = record.size_bytes;
    let range_header = headers.get(header::RANGE).and_then(|value| value.to_str().ok());
    let (status, range) = match range_header {
        Some(text) => match parse_range(text, size) {
            Some(range) if range.start < range.end => (StatusCode::PARTIAL_CONTENT, range),
            _ => return data_error_response(DataError::InvalidRange { start: 0, end: 0, size }),
        },
        None => (StatusCode::OK, 0..size),
    };
    let length = range.end - range.start;
    let etag = record.etag.clone();
    match state.cluster.read_object(record, range) {
        Ok(stream) => {
            let body = Body::from_stream(stream.map(|chunk| chunk.map_err(std::io::Error::other)));
            (
                status,
                [(header::CONTENT_LENGTH, length.to_string()), (header::ETAG, etag)],
                body,
            )
                .into_response()
        }
        Err(error) => data_error_response(error),
    }
}

async fn delete_object<E: Env>(
    State(state): State<Arc<AdminState<E>>>,
    UrlPath((bucket, key)): UrlPath<(String, String)>,
) -> Response {
    match state.cluster.delete_object(&bucket, &key).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(error) => data_error_response(error),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<u32>,
}

async fn list_objects<E: Env>(
    State(state): State<Arc<AdminState<E>>>,
    UrlPath(bucket): UrlPath<String>,
    Query(query): Query<ListQuery>,
) -> Response {
    let limit = query.limit.unwrap_or(1000).min(bdr_protocol::wire::SCAN_ROWS_MAX);
    match state
        .cluster
        .list_objects(&bucket, &query.prefix, query.after.as_deref(), limit)
        .await
    {
        Ok(listing) => Json(serde_json::json!({
            "objects": listing.records.iter().map(|record| serde_json::json!({
                "key": record.key, "size_bytes": record.size_bytes, "etag": record.etag,
            })).collect::<Vec<_>>()
        }))
        .into_response(),
        Err(error) => data_error_response(error),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct CreatedKey {
    pub key_id: String,
    pub secret_key: String,
    pub name: String,
    pub allow_create_bucket: bool,
}

#[derive(Deserialize)]
struct CreateKeyRequest {
    name: String,
    #[serde(default)]
    allow_create_bucket: bool,
}

/// Longest access key name.
pub const KEY_NAME_BYTES_MAX: usize = 256;

async fn serve_create_key<E: Env>(
    State(state): State<Arc<AdminState<E>>>,
    Json(request): Json<CreateKeyRequest>,
) -> Response {
    if request.name.is_empty() || request.name.len() > KEY_NAME_BYTES_MAX {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": format!("name must be 1..={KEY_NAME_BYTES_MAX} bytes")})),
        )
            .into_response();
    }
    match state
        .cluster
        .create_access_key(&request.name, request.allow_create_bucket)
        .await
    {
        Ok(record) => (
            StatusCode::CREATED,
            Json(CreatedKey {
                key_id: record.key_id,
                secret_key: record.secret_key,
                name: record.name,
                allow_create_bucket: record.allow_create_bucket,
            }),
        )
            .into_response(),
        Err(error) => data_error_response(error),
    }
}

/// One key's rights on a bucket, as the admin API shows and sets them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct GrantView {
    pub key_id: String,
    pub read: bool,
    pub write: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct BucketGrantsView {
    pub bucket: String,
    pub owner_key_id: String,
    pub grants: Vec<GrantView>,
}

async fn bucket_grants_view<E: Env>(
    cluster: &Arc<ClusterNode<E>>,
    bucket: &str,
) -> Result<BucketGrantsView, DataError> {
    let record = cluster
        .bucket(bucket)
        .await?
        .ok_or_else(|| DataError::NoSuchBucket(bucket.to_string()))?;
    let grants = cluster
        .bucket_grants(bucket)
        .await?
        .into_iter()
        .filter(|(_, grant)| grant.bucket_created_at_ms == record.created_at_ms)
        .map(|(key_id, grant)| GrantView {
            key_id,
            read: grant.read,
            write: grant.write,
        })
        .collect();
    Ok(BucketGrantsView {
        bucket: record.name,
        owner_key_id: record.owner_key_id,
        grants,
    })
}

/// `GET /v1/buckets/{bucket}/grants`: the owner and every granted key.
async fn serve_bucket_grants<E: Env>(
    State(state): State<Arc<AdminState<E>>>,
    UrlPath(bucket): UrlPath<String>,
) -> Response {
    match bucket_grants_view(&state.cluster, &bucket).await {
        Ok(view) => Json(view).into_response(),
        Err(error) => data_error_response(error),
    }
}

/// `POST /v1/buckets/{bucket}/grants` with `{key_id, read, write}`: sets that key's rights
/// (both false revokes them); answers with every grant of the bucket.
async fn serve_grant_bucket<E: Env>(
    State(state): State<Arc<AdminState<E>>>,
    UrlPath(bucket): UrlPath<String>,
    Json(request): Json<GrantView>,
) -> Response {
    let granted = state
        .cluster
        .grant_bucket(&bucket, &request.key_id, request.read, request.write)
        .await;
    match granted {
        Ok(_) => match bucket_grants_view(&state.cluster, &bucket).await {
            Ok(view) => Json(view).into_response(),
            Err(error) => data_error_response(error),
        },
        Err(error) => data_error_response(error),
    }
}

pub fn router<E: Env>(
    token: String,
    cluster: Arc<ClusterNode<E>>,
    gateway_metrics: Option<Arc<GatewayMetrics>>,
    audit: Arc<AuditLog>,
) -> Router {
    let state = Arc::new(AdminState {
        token,
        cluster,
        gateway_metrics,
        audit,
    });
    Router::new()
        .route("/v1/status", get(status::<E>))
        .route("/metrics", get(metrics::<E>))
        .route("/v1/maintenance", get(maintenance::<E>))
        .route(
            "/v1/maintenance/{command}",
            axum::routing::post(control_maintenance::<E>),
        )
        .route("/v1/layout", get(layout::<E>))
        .route("/v1/nodes/{id}/{action}", axum::routing::post(node_action::<E>))
        .route("/v1/keys", axum::routing::post(serve_create_key::<E>))
        .route("/v1/buckets/{bucket}", put(create_bucket::<E>).get(list_objects::<E>))
        .route(
            "/v1/buckets/{bucket}/grants",
            get(serve_bucket_grants::<E>).post(serve_grant_bucket::<E>),
        )
        .route(
            "/v1/objects/{bucket}/{*key}",
            put(put_object::<E>).get(get_object::<E>).delete(delete_object::<E>),
        )
        .layer(axum::extract::DefaultBodyLimit::disable())
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), require_token::<E>))
        .route_layer(middleware::from_fn_with_state(Arc::clone(&state), audit_admin::<E>))
        .with_state(state)
}

/// Binds the admin listener and serves in the background; returns the bound address.
pub async fn serve<E: Env>(
    listen: SocketAddr,
    token: String,
    cluster: Arc<ClusterNode<E>>,
    gateway_metrics: Option<Arc<GatewayMetrics>>,
    audit: Arc<AuditLog>,
) -> Result<SocketAddr, String> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| format!("cannot listen on {listen}: {error}"))?;
    let address = listener.local_addr().map_err(|error| error.to_string())?;
    let app = router(token, cluster, gateway_metrics, audit);
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "admin API stopped");
        }
    });
    Ok(address)
}

#[derive(Debug, thiserror::Error)]
pub enum AdminClientError {
    #[error("cannot reach the admin API at {endpoint}: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("the admin API refused the token (HTTP 401): check --token-file")]
    Unauthorized,
    #[error("the admin API answered HTTP {status}: {body}")]
    Failed { status: u16, body: String },
    #[error("the admin API sent an answer we cannot read: {0}")]
    BadAnswer(String),
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

/// Calls the admin API and decodes a JSON answer that comes with `expected_status`.
fn call<T: serde::de::DeserializeOwned>(
    endpoint: &str,
    token: &str,
    path: &str,
    body: Option<serde_json::Value>,
    expected_status: u16,
) -> Result<T, AdminClientError> {
    call_with_timeout(endpoint, token, path, body, expected_status, CLIENT_TIMEOUT)
}

fn call_with_timeout<T: serde::de::DeserializeOwned>(
    endpoint: &str,
    token: &str,
    path: &str,
    body: Option<serde_json::Value>,
    expected_status: u16,
    timeout: Duration,
) -> Result<T, AdminClientError> {
    let url = format!("{}{path}", endpoint.trim_end_matches('/'));
    let unreachable = |reason: String| AdminClientError::Unreachable {
        endpoint: endpoint.to_string(),
        reason,
    };
    let authorization = format!("Bearer {token}");
    let result = match body {
        Some(body) => agent(timeout)
            .post(&url)
            .header("Authorization", &authorization)
            .send_json(body),
        None => agent(timeout).get(&url).header("Authorization", &authorization).call(),
    };
    let mut response = result.map_err(|error| unreachable(error.to_string()))?;
    let status = response.status().as_u16();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|error| unreachable(error.to_string()))?;
    match status {
        _ if status == expected_status => {
            serde_json::from_str(&text).map_err(|error| AdminClientError::BadAnswer(error.to_string()))
        }
        401 => Err(AdminClientError::Unauthorized),
        _ => Err(AdminClientError::Failed { status, body: text }),
    }
}

/// `GET {endpoint}/v1/status`.
pub fn fetch_status(endpoint: &str, token: &str) -> Result<ClusterStatus, AdminClientError> {
    call(endpoint, token, "/v1/status", None, 200)
}

/// `POST {endpoint}/v1/keys`.
pub fn create_key(
    endpoint: &str,
    token: &str,
    name: &str,
    allow_create_bucket: bool,
) -> Result<CreatedKey, AdminClientError> {
    let body = serde_json::json!({ "name": name, "allow_create_bucket": allow_create_bucket });
    call(endpoint, token, "/v1/keys", Some(body), 201)
}

/// `GET {endpoint}/v1/buckets/{bucket}/grants`.
pub fn fetch_bucket_grants(endpoint: &str, token: &str, bucket: &str) -> Result<BucketGrantsView, AdminClientError> {
    call(endpoint, token, &format!("/v1/buckets/{bucket}/grants"), None, 200)
}

/// `POST {endpoint}/v1/buckets/{bucket}/grants`.
pub fn grant_bucket_remote(
    endpoint: &str,
    token: &str,
    bucket: &str,
    grant: &GrantView,
) -> Result<BucketGrantsView, AdminClientError> {
    let body = serde_json::to_value(grant).map_err(|error| AdminClientError::BadAnswer(error.to_string()))?;
    call(
        endpoint,
        token,
        &format!("/v1/buckets/{bucket}/grants"),
        Some(body),
        200,
    )
}

/// The grants of a bucket as a table for humans.
pub fn format_bucket_grants(view: &BucketGrantsView) -> String {
    let mut text = format!(
        "bucket {} (owner {})\n\n{:<24} {:<5} {:<5}\n",
        view.bucket, view.owner_key_id, "KEY", "READ", "WRITE"
    );
    for grant in &view.grants {
        text.push_str(&format!("{:<24} {:<5} {:<5}\n", grant.key_id, grant.read, grant.write));
    }
    text
}

/// `GET {endpoint}/v1/maintenance`.
pub fn fetch_maintenance(endpoint: &str, token: &str) -> Result<MaintenanceView, AdminClientError> {
    call(endpoint, token, "/v1/maintenance", None, 200)
}

/// `POST {endpoint}/v1/maintenance/{command}` (repair-start, repair-pause, scrub-start).
pub fn control_maintenance_remote(
    endpoint: &str,
    token: &str,
    command: &str,
) -> Result<MaintenanceView, AdminClientError> {
    call(
        endpoint,
        token,
        &format!("/v1/maintenance/{command}"),
        Some(serde_json::json!({})),
        200,
    )
}

/// `GET {endpoint}/v1/layout`.
pub fn fetch_layout(endpoint: &str, token: &str) -> Result<LayoutView, AdminClientError> {
    call(endpoint, token, "/v1/layout", None, 200)
}

/// `POST {endpoint}/v1/nodes/{id}/{action}` (drain, remove); a removal may wait for a
/// fresh survey of every node.
pub fn node_action_remote(
    endpoint: &str,
    token: &str,
    id: &str,
    action: &str,
    force: bool,
) -> Result<serde_json::Value, AdminClientError> {
    let path = format!("/v1/nodes/{id}/{action}?force={force}");
    let timeout = Duration::from_millis(REMOVE_CHECK_TIMEOUT_MS) + CLIENT_TIMEOUT;
    call_with_timeout(endpoint, token, &path, Some(serde_json::json!({})), 200, timeout)
}

fn human_bytes(bytes: u64) -> String {
    bytesize::ByteSize::b(bytes).display().iec().to_string()
}

/// The status as a table for humans.
pub fn format_status_table(status: &ClusterStatus) -> String {
    let mut text = format!(
        "node {} (zone {}), layout version {}\n\n{:<16} {:<16} {:<8} {:<9} {:>12} {:>12}\n",
        &status.node_id[..16.min(status.node_id.len())],
        status.zone,
        status.layout_version,
        "NODE",
        "ZONE",
        "STATE",
        "STATUS",
        "USED",
        "CAPACITY"
    );
    for node in &status.nodes {
        let state = serde_json::to_value(node.state)
            .ok()
            .and_then(|value| value.as_str().map(str::to_string))
            .unwrap_or_default();
        let marker = if node.id == status.node_id { "*" } else { "" };
        text.push_str(&format!(
            "{:<16} {:<16} {:<8} {:<9} {:>12} {:>12}\n",
            format!("{}{marker}", &node.id[..12.min(node.id.len())]),
            node.zone,
            state,
            node.status,
            node.used_bytes.map(human_bytes).unwrap_or_else(|| "?".into()),
            human_bytes(node.capacity_bytes)
        ));
    }
    if let Some(summary) = &status.maintenance {
        text.push('\n');
        text.push_str(&format_maintenance_summary(summary));
    }
    text
}

/// Stripes by health, repair and scrub, for humans.
pub fn format_maintenance_summary(summary: &MaintenanceSummary) -> String {
    let stripes = &summary.stripes;
    let repair = &summary.repair;
    let scrub = &summary.scrub;
    let mut text = format!(
        "stripes: {} total, {} healthy, {} misplaced, {} degraded, {} at risk, {} lost, {} unknown\n",
        stripes.total,
        stripes.healthy,
        stripes.misplaced,
        stripes.degraded,
        stripes.at_risk,
        stripes.lost,
        stripes.unknown
    );
    text.push_str(&format!(
        "repair:  {} queued ({}), {} repaired, {} shards moved, {}/s, eta {}{}\n",
        repair.queued_stripes,
        human_bytes(repair.queued_bytes),
        repair.repaired_stripes,
        repair.moved_shards,
        human_bytes(repair.bytes_per_s),
        repair
            .eta_s
            .map(|eta| format!("{eta} s"))
            .unwrap_or_else(|| "unknown".into()),
        if repair.paused_nodes > 0 {
            format!(" (paused on {} nodes)", repair.paused_nodes)
        } else {
            String::new()
        }
    ));
    text.push_str(&format!(
        "scrub:   {}/{} shards checked, {} corrupt found, {} passes on every node\n",
        scrub.shards_checked, scrub.shards_total, scrub.corrupt_found, scrub.passes_completed_min
    ));
    text.push_str(&format!(
        "shards:  {} stored, {} deleted as garbage or moved\n",
        summary.shards_stored, summary.gc_deleted_shards
    ));
    if !summary.nodes_unreachable.is_empty() {
        text.push_str(&format!(
            "not counted (no answer): {}\n",
            summary.nodes_unreachable.join(", ")
        ));
    }
    text
}

/// The layout, for humans.
pub fn format_layout(layout: &LayoutView) -> String {
    let mut text = format!(
        "layout version {} (digest {})\n\n{:<16} {:<16} {:<9} {:<16} {:>12} {:>9}\n",
        layout.version,
        &layout.digest[..16.min(layout.digest.len())],
        "NODE",
        "ZONE",
        "STATUS",
        "ROLES",
        "CAPACITY",
        "REVISION"
    );
    for node in &layout.nodes {
        text.push_str(&format!(
            "{:<16} {:<16} {:<9} {:<16} {:>12} {:>9}\n",
            &node.id[..12.min(node.id.len())],
            node.zone,
            node.status,
            node.roles.join(","),
            human_bytes(node.capacity_bytes),
            node.revision
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::parse_range;

    #[test]
    fn ranges_parse_like_http() {
        assert_eq!(parse_range("bytes=0-0", 10), Some(0..1));
        assert_eq!(parse_range("bytes=2-4", 10), Some(2..5));
        assert_eq!(parse_range("bytes=5-", 10), Some(5..10));
        assert_eq!(parse_range("bytes=-3", 10), Some(7..10));
        assert_eq!(parse_range("bytes=8-100", 10), Some(8..10));
        assert_eq!(parse_range("bytes=-", 10), None);
        assert_eq!(parse_range("items=1-2", 10), None);
        assert_eq!(parse_range("bytes=x-2", 10), None);
    }
}
