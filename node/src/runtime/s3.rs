//! The S3 gateway: the `s3s` crate (operations, XML, SigV4 including presigned URLs and
//! aws-chunked payloads) mounted in axum, backed by the cluster's data path.
//!
//! Implemented: buckets (list, create with or without Object Lock, head, delete, location,
//! versioning, Object Lock configuration); objects (put, get and head with ranges,
//! conditions, versions and checksums, delete with versions and delete markers,
//! DeleteObjects, CopyObject, retention and legal hold); listings (ListObjects v1 and v2,
//! ListObjectVersions, ListMultipartUploads, ListParts) and multipart uploads (create,
//! upload part, upload part copy, complete, abort). Anonymous requests are refused: s3s
//! denies unsigned requests once an auth provider is set, and ours knows only keys from
//! the cluster's access key table; [`ClusterAccess`] decides what each key may do.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::error_handling::HandleError;
use bdr_protocol::records::{
    BucketRecord, ChecksumAlgorithm, DefaultRetention, MultipartPartRecord, ObjectLock, ObjectVersionRecord, Retention,
    RetentionMode, StandardHeaders, VersioningState,
};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use s3s::dto::{self, ETag, ETagCondition, StreamingBlob, Timestamp};
use s3s::service::S3ServiceBuilder;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};

use crate::cluster::data::{BodyCheck, BucketOptions, BucketRights, Checksums, DataError, ObjectWrite};
use crate::cluster::versions::{ListedVersion, LockChange};
use crate::cluster::ClusterNode;
use crate::env::Env;
use base64::Engine as _;

/// Connections the S3 listener serves at once; more wait in the kernel's accept backlog.
pub const S3_CONNECTIONS_MAX: usize = 1_024;
/// Requests served at once (a streamed response counts until its last byte); more are
/// answered 503 SlowDown at once, which S3 clients back off from and retry.
pub const S3_REQUESTS_IN_FLIGHT_MAX: usize = 256;
/// A client must send a request's head within this long (no slow-header hold-outs).
pub const S3_HEADER_READ_TIMEOUT_MS: u64 = 30_000;
/// Longest request head (request line and headers) read before the request is refused.
pub const S3_HEAD_BYTES_MAX: usize = 64 * 1024;
/// A response the client reads nothing of for this long ends its connection.
pub const S3_WRITE_STALL_TIMEOUT_MS: u64 = 60_000;
/// A request body that sends nothing for this long fails with RequestTimeout.
pub const S3_BODY_IDLE_TIMEOUT_MS: u64 = 60_000;

/// Keys listed per ListObjects page at most (S3's limit).
pub const LIST_KEYS_MAX: i32 = 1000;

pub struct Gateway<E: Env> {
    cluster: Arc<ClusterNode<E>>,
    region: String,
}

fn timestamp_of(ms: u64) -> Timestamp {
    Timestamp::from(UNIX_EPOCH + Duration::from_millis(ms))
}

fn etag_of(record: &ObjectVersionRecord) -> ETag {
    ETag::Strong(record.etag.trim_matches('"').to_string())
}

fn part_etag(part: &MultipartPartRecord) -> ETag {
    ETag::Strong(part.etag.trim_matches('"').to_string())
}

fn s3_error_of(error: DataError) -> S3Error {
    let code = match &error {
        DataError::NoSuchBucket(_) => S3ErrorCode::NoSuchBucket,
        DataError::NoSuchKey => S3ErrorCode::NoSuchKey,
        DataError::BucketExists(_) => S3ErrorCode::BucketAlreadyOwnedByYou,
        DataError::BucketNotEmpty(_) => S3ErrorCode::BucketNotEmpty,
        // S3's answer to a request that met a conflicting one in progress (409); retrying
        // learns whether the bucket went.
        DataError::BucketBeingDeleted(_) | DataError::BucketBusy(_) | DataError::VersionBusy(_) => {
            S3ErrorCode::OperationAborted
        }
        DataError::InvalidBucketName(_) => S3ErrorCode::InvalidBucketName,
        DataError::InvalidKey(_) => S3ErrorCode::KeyTooLongError,
        DataError::InvalidBucketOptions => S3ErrorCode::InvalidArgument,
        DataError::InvalidRange { .. } => S3ErrorCode::InvalidRange,
        DataError::Body(_) => S3ErrorCode::IncompleteBody,
        DataError::BodyTimeout(_) => S3ErrorCode::RequestTimeout,
        DataError::NoSuchUpload => S3ErrorCode::NoSuchUpload,
        DataError::NoSuchAccessKey(_) => S3ErrorCode::InvalidAccessKeyId,
        DataError::BadDigest(_) => S3ErrorCode::BadDigest,
        DataError::OwnerRights(_) => S3ErrorCode::InvalidArgument,
        DataError::InvalidPart(_) => S3ErrorCode::InvalidPart,
        DataError::InvalidPartOrder => S3ErrorCode::InvalidPartOrder,
        DataError::EntityTooSmall { .. } => S3ErrorCode::EntityTooSmall,
        DataError::NoSuchVersion => S3ErrorCode::NoSuchVersion,
        DataError::InvalidVersionId(_) => S3ErrorCode::InvalidArgument,
        // S3 answers a delete or overwrite refused by Object Lock with AccessDenied.
        DataError::ObjectLocked(_) => S3ErrorCode::AccessDenied,
        DataError::InvalidBucketState(_) => S3ErrorCode::InvalidBucketState,
        DataError::InvalidLockRequest(_) => S3ErrorCode::InvalidRequest,
        DataError::NoDataKeys | DataError::NotDurable(_) | DataError::Meta(_) => S3ErrorCode::ServiceUnavailable,
        // S3's 503 for "reduce your request rate".
        DataError::BucketRequestsBusy(_) => S3ErrorCode::SlowDown,
        DataError::StripeUnreadable { .. } | DataError::Corrupt(_) | DataError::TooManyBuckets(_) => {
            S3ErrorCode::InternalError
        }
    };
    let mut s3_error = S3Error::with_message(code, error.to_string());
    if matches!(
        error,
        DataError::NoDataKeys | DataError::NotDurable(_) | DataError::Meta(_) | DataError::BucketRequestsBusy(_)
    ) {
        s3_error.set_status_code(http::StatusCode::SERVICE_UNAVAILABLE);
    }
    s3_error
}

fn condition_matches(condition: &ETagCondition, etag: &ETag) -> bool {
    match condition {
        ETagCondition::Any => true,
        ETagCondition::ETag(wanted) => wanted.value() == etag.value(),
    }
}

fn seconds_of(timestamp: &Timestamp) -> i64 {
    time::OffsetDateTime::from(timestamp.clone()).unix_timestamp()
}

fn ms_of(timestamp: &Timestamp) -> u64 {
    let nanos = time::OffsetDateTime::from(timestamp.clone()).unix_timestamp_nanos();
    u64::try_from(nanos / 1_000_000).unwrap_or(0)
}

fn retention_mode_of(text: &str) -> S3Result<RetentionMode> {
    match text.to_ascii_uppercase().as_str() {
        dto::ObjectLockMode::GOVERNANCE => Ok(RetentionMode::Governance),
        dto::ObjectLockMode::COMPLIANCE => Ok(RetentionMode::Compliance),
        other => Err(s3_error!(InvalidArgument, "unknown Object Lock mode {other:?}")),
    }
}

fn retention_mode_text(mode: RetentionMode) -> &'static str {
    match mode {
        RetentionMode::Governance => dto::ObjectLockMode::GOVERNANCE,
        RetentionMode::Compliance => dto::ObjectLockMode::COMPLIANCE,
    }
}

fn legal_hold_of(status: Option<&dto::ObjectLockLegalHoldStatus>) -> S3Result<bool> {
    match status.map(|status| status.as_str().to_ascii_uppercase()) {
        None => Ok(false),
        Some(status) if status == dto::ObjectLockLegalHoldStatus::ON => Ok(true),
        Some(status) if status == dto::ObjectLockLegalHoldStatus::OFF => Ok(false),
        Some(status) => Err(s3_error!(InvalidArgument, "unknown legal hold status {status:?}")),
    }
}

fn legal_hold_status(on: bool) -> dto::ObjectLockLegalHoldStatus {
    dto::ObjectLockLegalHoldStatus::from_static(match on {
        true => dto::ObjectLockLegalHoldStatus::ON,
        false => dto::ObjectLockLegalHoldStatus::OFF,
    })
}

/// The lock a write asks for with its `x-amz-object-lock-*` headers.
fn requested_lock(
    mode: Option<&dto::ObjectLockMode>,
    retain_until: Option<&Timestamp>,
    legal_hold: Option<&dto::ObjectLockLegalHoldStatus>,
) -> S3Result<ObjectLock> {
    let retention = match (mode, retain_until) {
        (Some(mode), Some(until)) => Some(Retention {
            mode: retention_mode_of(mode.as_str())?,
            retain_until_ms: ms_of(until),
        }),
        (None, None) => None,
        _ => {
            return Err(s3_error!(
                InvalidArgument,
                "x-amz-object-lock-mode and x-amz-object-lock-retain-until-date must be given together"
            ))
        }
    };
    Ok(ObjectLock {
        retention,
        legal_hold: legal_hold_of(legal_hold)?,
    })
}

fn http_date(timestamp: &Timestamp) -> Option<String> {
    let mut text = Vec::new();
    timestamp.format(dto::TimestampFormat::HttpDate, &mut text).ok()?;
    String::from_utf8(text).ok()
}

/// The standard headers a write stores. `aws-chunked` is how the body was sent, not
/// how the object is encoded: S3 drops it from Content-Encoding, and so do we.
fn standard_headers(
    cache_control: Option<String>,
    content_disposition: Option<String>,
    content_encoding: Option<String>,
    content_language: Option<String>,
    expires: Option<&Timestamp>,
) -> StandardHeaders {
    let content_encoding = content_encoding
        .map(|encoding| {
            encoding
                .split(',')
                .map(str::trim)
                .filter(|token| !token.is_empty() && !token.eq_ignore_ascii_case("aws-chunked"))
                .collect::<Vec<_>>()
                .join(",")
        })
        .filter(|encoding| !encoding.is_empty());
    StandardHeaders {
        cache_control,
        content_disposition,
        content_encoding,
        content_language,
        expires: expires.and_then(http_date),
    }
}

fn expires_of(headers: &StandardHeaders) -> Option<Timestamp> {
    headers
        .expires
        .as_deref()
        .and_then(|text| Timestamp::parse(dto::TimestampFormat::HttpDate, text).ok())
}

/// The `x-amz-version-id` to answer with: none in a bucket that never had versioning.
fn version_answer(bucket: &BucketRecord, version_id: &str) -> Option<String> {
    (bucket.versioning != VersioningState::Unversioned).then(|| version_id.to_string())
}

/// A version's Object Lock as GET and HEAD answer it.
struct LockAnswer {
    mode: Option<dto::ObjectLockMode>,
    retain_until: Option<Timestamp>,
    legal_hold: Option<dto::ObjectLockLegalHoldStatus>,
}

fn lock_answer(bucket: &BucketRecord, record: &ObjectVersionRecord) -> LockAnswer {
    let retention = record.lock.retention;
    LockAnswer {
        mode: retention.map(|retention| dto::ObjectLockMode::from_static(retention_mode_text(retention.mode))),
        retain_until: retention.map(|retention| timestamp_of(retention.retain_until_ms)),
        legal_hold: bucket
            .object_lock_enabled
            .then(|| legal_hold_status(record.lock.legal_hold)),
    }
}

/// The answer to reading a key whose current version (or the named version) is a
/// delete marker: 404 NoSuchKey, or 405 when the marker was asked for by id; either
/// way with the marker's headers, as S3 gives them.
fn delete_marker_error(record: &ObjectVersionRecord, by_version: bool) -> S3Error {
    let mut error = match by_version {
        true => {
            let mut error = s3_error!(MethodNotAllowed, "the version is a delete marker");
            error.set_status_code(http::StatusCode::METHOD_NOT_ALLOWED);
            error
        }
        false => s3_error!(NoSuchKey, "no such key (its current version is a delete marker)"),
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("x-amz-delete-marker", http::HeaderValue::from_static("true"));
    if let Ok(version) = http::HeaderValue::from_str(&record.version_id) {
        headers.insert("x-amz-version-id", version);
    }
    error.set_headers(headers);
    error
}

/// The conditional headers of a GET, HEAD or copy source.
#[derive(Default)]
struct Conditions {
    if_match: Option<ETagCondition>,
    if_none_match: Option<ETagCondition>,
    if_modified_since: Option<Timestamp>,
    if_unmodified_since: Option<Timestamp>,
}

enum ConditionOutcome {
    Proceed,
    NotModified,
    PreconditionFailed,
}

impl Conditions {
    /// RFC 9110's order: If-Match, else If-Unmodified-Since; then If-None-Match, else
    /// If-Modified-Since. HTTP dates have whole seconds, so the object's time is too.
    fn evaluate(&self, record: &ObjectVersionRecord) -> ConditionOutcome {
        let etag = etag_of(record);
        let modified_s = (record.created_at_ms / 1000) as i64;
        let precondition_holds = match (&self.if_match, &self.if_unmodified_since) {
            (Some(condition), _) => condition_matches(condition, &etag),
            (None, Some(since)) => modified_s <= seconds_of(since),
            (None, None) => true,
        };
        if !precondition_holds {
            return ConditionOutcome::PreconditionFailed;
        }
        let modified = match (&self.if_none_match, &self.if_modified_since) {
            (Some(condition), _) => !condition_matches(condition, &etag),
            (None, Some(since)) => modified_s > seconds_of(since),
            (None, None) => true,
        };
        if modified {
            ConditionOutcome::Proceed
        } else {
            ConditionOutcome::NotModified
        }
    }

    /// For GET and HEAD: 412 or 304.
    fn check_read(&self, record: &ObjectVersionRecord) -> S3Result<()> {
        match self.evaluate(record) {
            ConditionOutcome::Proceed => Ok(()),
            ConditionOutcome::NotModified => Err(S3Error::new(S3ErrorCode::NotModified)),
            ConditionOutcome::PreconditionFailed => Err(s3_error!(PreconditionFailed, "precondition failed")),
        }
    }

    /// For a copy source: any failed condition is a 412.
    fn check_copy_source(&self, record: &ObjectVersionRecord) -> S3Result<()> {
        match self.evaluate(record) {
            ConditionOutcome::Proceed => Ok(()),
            _ => Err(s3_error!(PreconditionFailed, "copy source precondition failed")),
        }
    }
}

/// Bytes of an object, as the data path reads them, for a copy's writer.
fn io_chunk(chunk: Result<Vec<u8>, DataError>) -> std::io::Result<Vec<u8>> {
    chunk.map_err(|error| std::io::Error::other(error.to_string()))
}

/// Grant lookups a ListBuckets keeps in flight.
pub const LIST_BUCKETS_LOOKUPS_IN_FLIGHT_MAX: usize = 16;
/// Keys a DeleteObjects request may name at most (S3's limit).
pub const DELETE_OBJECTS_KEYS_MAX: usize = 1000;
/// Uploads listed per ListMultipartUploads page at most (S3's limit).
pub const LIST_UPLOADS_MAX: i32 = 1000;

/// One page of a listing: keys and common prefixes in order, and where to go on.
struct ListingPage {
    objects: Vec<ObjectVersionRecord>,
    common_prefixes: Vec<String>,
    /// The key (or prefix) to continue after, when the page is truncated.
    next_after: Option<String>,
}

impl<E: Env> Gateway<E> {
    pub fn new(cluster: Arc<ClusterNode<E>>, region: String) -> Gateway<E> {
        Gateway { cluster, region }
    }

    /// A version of an object (the current one without an id); delete markers answer as
    /// S3 does ([`delete_marker_error`]).
    async fn read_version(
        &self,
        bucket: &BucketRecord,
        key: &str,
        version_id: Option<&str>,
    ) -> S3Result<ObjectVersionRecord> {
        let record = self
            .cluster
            .object_version(bucket, key, version_id)
            .await
            .map_err(s3_error_of)?;
        if record.is_delete_marker() {
            return Err(delete_marker_error(&record, version_id.is_some()));
        }
        Ok(record)
    }

    /// The record of a copy source (bucket, key and optionally version), checked against
    /// the copy's conditions.
    async fn copy_source_record(
        &self,
        source: &dto::CopySource,
        conditions: &Conditions,
    ) -> S3Result<ObjectVersionRecord> {
        let dto::CopySource::Bucket {
            bucket,
            key,
            version_id,
        } = source
        else {
            return Err(s3_error!(
                NotImplemented,
                "copy sources other than bucket/key are not supported"
            ));
        };
        let source_bucket = self.existing_bucket(bucket).await?;
        let record = self.read_version(&source_bucket, key, version_id.as_deref()).await?;
        conditions.check_copy_source(&record)?;
        Ok(record)
    }

    /// `range` of an object's bytes as a reader (for copies: streamed, never whole).
    fn object_reader(
        &self,
        record: ObjectVersionRecord,
        range: std::ops::Range<u64>,
    ) -> S3Result<impl futures::AsyncBufRead + Unpin + Send + 'static> {
        let stream = self.cluster.read_object(record, range).map_err(s3_error_of)?;
        Ok(Box::pin(stream.map(io_chunk)).into_async_read())
    }

    /// The bucket an operation works on: as its access check read it moments ago, or
    /// read now.
    async fn request_bucket(&self, extensions: &http::Extensions, name: &str) -> S3Result<BucketRecord> {
        match extensions.get::<CheckedBucket>() {
            Some(CheckedBucket { record, .. }) if record.name == name => Ok(record.clone()),
            _ => self.existing_bucket(name).await,
        }
    }

    /// The bucket a write works on: the access check's record if it was read fresh, else
    /// read now (a cached record's versioning state or Object Lock may be a second old,
    /// and a write must not overwrite a version it should have kept). A bucket deleted and
    /// created again since the access check is refused: the check was for the old one.
    async fn write_bucket(&self, extensions: &http::Extensions, name: &str) -> S3Result<BucketRecord> {
        match extensions.get::<CheckedBucket>() {
            Some(CheckedBucket { record, cached: false }) if record.name == name => Ok(record.clone()),
            Some(CheckedBucket { record, cached: true }) if record.name == name => {
                let fresh = self.existing_bucket(name).await?;
                if fresh.created_at_ms != record.created_at_ms || fresh.owner_key_id != record.owner_key_id {
                    return Err(access_denied());
                }
                Ok(fresh)
            }
            _ => self.existing_bucket(name).await,
        }
    }

    /// Whether a request that asks to bypass GOVERNANCE retention may: only the bucket's
    /// owner may (S3's s3:BypassGovernanceRetention permission; grants never give it).
    async fn bypasses_governance(
        &self,
        credentials: &Option<s3s::auth::Credentials>,
        extensions: &http::Extensions,
        bucket: &str,
        asked: Option<bool>,
    ) -> S3Result<bool> {
        if !asked.unwrap_or(false) {
            return Ok(false);
        }
        let key_id = request_key_id(credentials)?;
        let bucket = self.write_bucket(extensions, bucket).await?;
        Ok(bucket.owner_key_id == key_id)
    }

    async fn existing_bucket(&self, name: &str) -> S3Result<BucketRecord> {
        self.cluster
            .bucket(name)
            .await
            .map_err(s3_error_of)?
            .ok_or_else(|| s3_error!(NoSuchBucket, "no such bucket: {name}"))
    }

    /// One page of a marker-paginated listing (ListObjects v1): the
    /// keys after `marker`, and the page size used (S3's default and limit, 1000).
    async fn marker_page(
        &self,
        extensions: &http::Extensions,
        bucket: &str,
        prefix: Option<&str>,
        delimiter: Option<&str>,
        marker: Option<&str>,
        max_keys: Option<i32>,
    ) -> S3Result<(ListingPage, i32)> {
        let bucket = self.request_bucket(extensions, bucket).await?;
        let max_keys = max_keys.unwrap_or(LIST_KEYS_MAX).clamp(0, LIST_KEYS_MAX);
        let after = marker.filter(|marker| !marker.is_empty()).map(str::to_string);
        let page = self
            .list_page(&bucket, prefix.unwrap_or_default(), delimiter, after, max_keys as usize)
            .await?;
        Ok((page, max_keys))
    }

    /// Lists `max_keys` entries after `after`, folding keys into common prefixes at
    /// `delimiter`.
    async fn list_page(
        &self,
        bucket: &BucketRecord,
        prefix: &str,
        delimiter: Option<&str>,
        mut after: Option<String>,
        max_keys: usize,
    ) -> S3Result<ListingPage> {
        let mut page = ListingPage {
            objects: Vec::new(),
            common_prefixes: Vec::new(),
            next_after: None,
        };
        loop {
            let listing = self
                .cluster
                .list_current_objects(bucket, prefix, after.as_deref(), LIST_KEYS_MAX as u32)
                .await
                .map_err(s3_error_of)?;
            let mut skip_until: Option<String> = None;
            for record in listing.records {
                if skip_until
                    .as_ref()
                    .is_some_and(|common| record.key.starts_with(common.as_str()))
                {
                    continue;
                }
                if page.objects.len() + page.common_prefixes.len() >= max_keys {
                    page.next_after = after;
                    return Ok(page);
                }
                let rest = &record.key[prefix.len()..];
                match delimiter
                    .filter(|delimiter| !delimiter.is_empty())
                    .and_then(|delimiter| {
                        rest.find(delimiter)
                            .map(|position| format!("{prefix}{}", &rest[..position + delimiter.len()]))
                    }) {
                    Some(common) => {
                        after = Some(format!("{common}\u{10ffff}"));
                        skip_until = Some(common.clone());
                        page.common_prefixes.push(common);
                    }
                    None => {
                        after = Some(record.key.clone());
                        page.objects.push(record);
                    }
                }
            }
            match listing.next_after {
                // A full page of rows was scanned: go on from its last key.
                Some(next) => {
                    if after.as_ref().is_none_or(|current| *current < next) {
                        after = Some(next);
                    }
                }
                None => return Ok(page),
            }
        }
    }
}

/// An S3 request body as a stream of io results (what `into_async_read` wants), fed
/// through the request's checksum verifier if it declared a checksum. A named type rather
/// than a `map_err` closure: closures here trip a higher-ranked lifetime limitation of the
/// compiler inside `async_trait` methods. Stalls are cut by [`IdleTimeoutBody`] under
/// every request body; its error arrives here as `TimedOut` (RequestTimeout to S3).
struct IoBody {
    body: StreamingBlob,
    verifier: Option<Arc<ChecksumVerifier>>,
}

impl IoBody {
    fn new(body: StreamingBlob, verifier: Option<Arc<ChecksumVerifier>>) -> IoBody {
        IoBody { body, verifier }
    }
}

/// A body error as an io error, `TimedOut` if [`IdleTimeoutBody`] cut the body.
fn io_error_of_body(error: s3s::StdError) -> std::io::Error {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error.as_ref());
    while let Some(current) = cause {
        if current.downcast_ref::<BodyIdleTimeout>().is_some() {
            return std::io::Error::new(std::io::ErrorKind::TimedOut, current.to_string());
        }
        cause = current.source();
    }
    std::io::Error::other(error.to_string())
}

impl futures::Stream for IoBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let polled = self.body.poll_next_unpin(context);
        if let (std::task::Poll::Ready(Some(Ok(chunk))), Some(verifier)) = (&polled, &self.verifier) {
            verifier.update(chunk);
        }
        polled.map(|item| item.map(|chunk| chunk.map_err(io_error_of_body)))
    }
}

/// What a request body that stalled fails with.
#[derive(Debug, thiserror::Error)]
#[error("no body bytes for {S3_BODY_IDLE_TIMEOUT_MS} ms")]
struct BodyIdleTimeout;

/// Every request body, bounded in idleness: one that sends nothing for
/// [`S3_BODY_IDLE_TIMEOUT_MS`] fails, whoever reads it (the object data path, or s3s
/// reading the XML of DeleteObjects or CompleteMultipartUpload). The timer measures only
/// continuous waiting for the client: it starts when a read finds nothing and stops at
/// the next frame, so a slow but steady upload, or a reader busy storing what came, is
/// never cut.
struct IdleTimeoutBody<B> {
    inner: B,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Whether the last read found nothing (the timer is armed).
    waiting: bool,
}

impl<B> IdleTimeoutBody<B> {
    fn new(inner: B) -> IdleTimeoutBody<B> {
        IdleTimeoutBody {
            inner,
            idle: Box::pin(tokio::time::sleep(Duration::from_millis(S3_BODY_IDLE_TIMEOUT_MS))),
            waiting: false,
        }
    }
}

impl<B> http_body::Body for IdleTimeoutBody<B>
where
    B: http_body::Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(context) {
            std::task::Poll::Pending => {
                if !this.waiting {
                    this.waiting = true;
                    let deadline = tokio::time::Instant::now() + Duration::from_millis(S3_BODY_IDLE_TIMEOUT_MS);
                    this.idle.as_mut().reset(deadline);
                }
                if this.idle.as_mut().poll(context).is_ready() {
                    return std::task::Poll::Ready(Some(Err(Box::new(BodyIdleTimeout))));
                }
                std::task::Poll::Pending
            }
            std::task::Poll::Ready(frame) => {
                this.waiting = false;
                std::task::Poll::Ready(frame.map(|result| result.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Puts every request body under [`IdleTimeoutBody`].
async fn bound_body_idleness(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    next.run(request.map(|body| axum::body::Body::new(IdleTimeoutBody::new(body))))
        .await
}

/// The checksum headers S3 clients send, by algorithm.
const CHECKSUM_HEADERS: [(ChecksumAlgorithm, &str); 5] = [
    (ChecksumAlgorithm::Crc32, "x-amz-checksum-crc32"),
    (ChecksumAlgorithm::Crc32c, "x-amz-checksum-crc32c"),
    (ChecksumAlgorithm::Sha1, "x-amz-checksum-sha1"),
    (ChecksumAlgorithm::Sha256, "x-amz-checksum-sha256"),
    (ChecksumAlgorithm::Crc64Nvme, "x-amz-checksum-crc64nvme"),
];

/// Where the client's checksum of a body comes from.
enum ExpectedChecksum {
    Header(String),
    /// Sent after the last chunk of an aws-chunked body (current AWS SDKs' default).
    Trailer {
        name: &'static str,
        trailers: Option<s3s::TrailingHeaders>,
    },
}

/// Hashes a request body as it streams by and, once it has ended, compares the
/// client's checksum with what arrived.
struct ChecksumVerifier {
    algorithm: ChecksumAlgorithm,
    expected: ExpectedChecksum,
    hasher: std::sync::Mutex<Option<s3s::checksum::ChecksumHasher>>,
    /// What `verify` found to match.
    verified: std::sync::Mutex<Checksums>,
}

impl ChecksumVerifier {
    /// The verifier for a request that declares a checksum (a header with the value, or
    /// `x-amz-trailer` naming one); `None` when it declares none.
    fn for_request(
        headers: &http::HeaderMap,
        trailers: Option<s3s::TrailingHeaders>,
    ) -> S3Result<Option<Arc<ChecksumVerifier>>> {
        let header_value = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
        let declared = CHECKSUM_HEADERS.iter().find_map(|(algorithm, name)| {
            header_value(name).map(|value| (*algorithm, ExpectedChecksum::Header(value.to_string())))
        });
        let declared = match (declared, header_value("x-amz-trailer")) {
            (Some(declared), _) => Some(declared),
            (None, Some(trailer)) => {
                let trailer = trailer.trim().to_ascii_lowercase();
                let (algorithm, name) = CHECKSUM_HEADERS
                    .iter()
                    .find(|(_, name)| *name == trailer)
                    .ok_or_else(|| s3_error!(InvalidArgument, "unsupported trailer {trailer:?}"))?;
                Some((*algorithm, ExpectedChecksum::Trailer { name, trailers }))
            }
            (None, None) => None,
        };
        Ok(declared.map(|(algorithm, expected)| {
            Arc::new(ChecksumVerifier {
                algorithm,
                expected,
                hasher: std::sync::Mutex::new(Some(hasher_for(algorithm))),
                verified: std::sync::Mutex::new(Checksums::new()),
            })
        }))
    }

    fn update(&self, chunk: &[u8]) {
        if let Some(hasher) = self.hasher.lock().expect("checksum hasher lock").as_mut() {
            hasher.update(chunk);
        }
    }

    /// Called once the body has ended: the checksum that arrived, if it matches.
    fn verify(&self) -> Result<Checksums, String> {
        let hasher = self
            .hasher
            .lock()
            .expect("checksum hasher lock")
            .take()
            .ok_or("the body was checked twice")?;
        let computed = checksum_value(&hasher.finalize(), self.algorithm).ok_or("no checksum computed")?;
        let expected = match &self.expected {
            ExpectedChecksum::Header(value) => value.clone(),
            ExpectedChecksum::Trailer { name, trailers } => trailers
                .as_ref()
                .and_then(|trailers| {
                    trailers.read(|headers| {
                        headers
                            .get(*name)
                            .and_then(|value| value.to_str().ok())
                            .map(str::to_string)
                    })
                })
                .flatten()
                .ok_or_else(|| format!("the body ended without its {name} trailer"))?,
        };
        if expected.trim() != computed {
            return Err(format!(
                "{:?} checksum {expected} was sent, {computed} was received",
                self.algorithm
            ));
        }
        let verified = Checksums::from([(self.algorithm, computed)]);
        *self.verified.lock().expect("checksum lock") = verified.clone();
        Ok(verified)
    }

    fn verified(&self) -> Checksums {
        self.verified.lock().expect("checksum lock").clone()
    }

    fn body_check(self: &Arc<Self>) -> BodyCheck {
        let verifier = Arc::clone(self);
        BodyCheck::new(move || verifier.verify())
    }
}

fn hasher_for(algorithm: ChecksumAlgorithm) -> s3s::checksum::ChecksumHasher {
    use s3s::crypto::Checksum as _;
    let mut hasher = s3s::checksum::ChecksumHasher::default();
    match algorithm {
        ChecksumAlgorithm::Crc32 => hasher.crc32 = Some(s3s::crypto::Crc32::new()),
        ChecksumAlgorithm::Crc32c => hasher.crc32c = Some(s3s::crypto::Crc32c::new()),
        ChecksumAlgorithm::Sha1 => hasher.sha1 = Some(s3s::crypto::Sha1::new()),
        ChecksumAlgorithm::Sha256 => hasher.sha256 = Some(s3s::crypto::Sha256::new()),
        ChecksumAlgorithm::Crc64Nvme => hasher.crc64nvme = Some(s3s::crypto::Crc64Nvme::new()),
    }
    hasher
}

/// S3's composite checksum of a multipart object: the checksum of the concatenated
/// (decoded) part checksums, then `-N` for N parts.
fn composite_checksum(algorithm: ChecksumAlgorithm, parts: &[String]) -> Option<String> {
    let mut hasher = hasher_for(algorithm);
    for part in parts {
        hasher.update(&base64::engine::general_purpose::STANDARD.decode(part.trim()).ok()?);
    }
    let value = checksum_value(&hasher.finalize(), algorithm)?;
    Some(format!("{value}-{}", parts.len()))
}

fn checksum_algorithm_of(algorithm: Option<&dto::ChecksumAlgorithm>) -> S3Result<Option<ChecksumAlgorithm>> {
    let Some(algorithm) = algorithm else { return Ok(None) };
    match algorithm.as_str().to_ascii_uppercase().as_str() {
        dto::ChecksumAlgorithm::CRC32 => Ok(Some(ChecksumAlgorithm::Crc32)),
        dto::ChecksumAlgorithm::CRC32C => Ok(Some(ChecksumAlgorithm::Crc32c)),
        dto::ChecksumAlgorithm::SHA1 => Ok(Some(ChecksumAlgorithm::Sha1)),
        dto::ChecksumAlgorithm::SHA256 => Ok(Some(ChecksumAlgorithm::Sha256)),
        dto::ChecksumAlgorithm::CRC64NVME => Ok(Some(ChecksumAlgorithm::Crc64Nvme)),
        other => Err(s3_error!(InvalidArgument, "unknown checksum algorithm {other:?}")),
    }
}

fn checksum_value(checksum: &dto::Checksum, algorithm: ChecksumAlgorithm) -> Option<String> {
    match algorithm {
        ChecksumAlgorithm::Crc32 => checksum.checksum_crc32.clone(),
        ChecksumAlgorithm::Crc32c => checksum.checksum_crc32c.clone(),
        ChecksumAlgorithm::Sha1 => checksum.checksum_sha1.clone(),
        ChecksumAlgorithm::Sha256 => checksum.checksum_sha256.clone(),
        ChecksumAlgorithm::Crc64Nvme => checksum.checksum_crc64nvme.clone(),
    }
}

/// The stored checksums, when the client asked for them (`x-amz-checksum-mode: ENABLED`)
/// and reads the whole object (a range's bytes do not match a whole-object checksum).
fn checksums_if_enabled(mode: Option<&dto::ChecksumMode>, record: &ObjectVersionRecord, ranged: bool) -> dto::Checksum {
    let enabled = mode.is_some_and(|mode| mode.as_str().eq_ignore_ascii_case(dto::ChecksumMode::ENABLED));
    match enabled && !ranged {
        true => checksum_fields(&record.checksums),
        false => dto::Checksum::default(),
    }
}

/// The stored checksums as S3 answers them.
fn checksum_fields(checksums: &Checksums) -> dto::Checksum {
    let value = |algorithm| checksums.get(&algorithm).cloned();
    dto::Checksum {
        checksum_crc32: value(ChecksumAlgorithm::Crc32),
        checksum_crc32c: value(ChecksumAlgorithm::Crc32c),
        checksum_sha1: value(ChecksumAlgorithm::Sha1),
        checksum_sha256: value(ChecksumAlgorithm::Sha256),
        checksum_crc64nvme: value(ChecksumAlgorithm::Crc64Nvme),
        // Composite values (multipart objects) end in `-N`.
        checksum_type: checksums
            .values()
            .next()
            .map(|value| match value.contains('-') {
                true => dto::ChecksumType::COMPOSITE,
                false => dto::ChecksumType::FULL_OBJECT,
            })
            .map(dto::ChecksumType::from_static),
    }
}

/// `key_id`'s rights on `bucket`, as an owned future (closures borrowing here trip the
/// compiler's higher-ranked lifetime limits inside `async_trait` methods).
async fn rights_lookup<E: Env>(
    cluster: Arc<ClusterNode<E>>,
    bucket: BucketRecord,
    key_id: String,
) -> Result<BucketRights, DataError> {
    cluster.bucket_rights(&bucket, &key_id).await
}

/// What a PutObject, CopyObject (with REPLACE) or CreateMultipartUpload asks to store
/// besides the bytes.
struct WriteRequest {
    content_type: Option<String>,
    headers: StandardHeaders,
    metadata: Option<dto::Metadata>,
    lock: ObjectLock,
}

/// Builds a [`WriteRequest`] from the S3 input fields of the same names (the three
/// write inputs share them but no trait).
macro_rules! write_request {
    ($input:expr) => {
        WriteRequest {
            content_type: $input.content_type.take(),
            headers: standard_headers(
                $input.cache_control.take(),
                $input.content_disposition.take(),
                $input.content_encoding.take(),
                $input.content_language.take(),
                $input.expires.as_ref(),
            ),
            metadata: $input.metadata.take(),
            lock: requested_lock(
                $input.object_lock_mode.as_ref(),
                $input.object_lock_retain_until_date.as_ref(),
                $input.object_lock_legal_hold_status.as_ref(),
            )?,
        }
    };
}

fn object_write(bucket: String, key: String, request: WriteRequest) -> ObjectWrite {
    ObjectWrite {
        bucket,
        key,
        content_type: request.content_type,
        headers: request.headers,
        user_metadata: request
            .metadata
            .map(|metadata| metadata.into_iter().collect())
            .unwrap_or_default(),
        lock: request.lock,
        checksum_algorithm: None,
        body_check: BodyCheck::none(),
        bucket_record: None,
    }
}

/// What `encoding-type=url` leaves as it is in listed keys: RFC 3986's unreserved
/// characters and the slash (as S3 does); every other byte is percent-encoded.
const KEY_ENCODE_SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// S3's `encoding-type=url`: the keys, prefixes, delimiter and markers of a listing are
/// percent-encoded, so any key survives XML; clients decode them (the aws cli asks so).
#[derive(Clone, Copy)]
struct KeyEncoding {
    url: bool,
}

impl KeyEncoding {
    fn of(encoding_type: Option<&dto::EncodingType>) -> KeyEncoding {
        KeyEncoding {
            url: encoding_type.is_some_and(|encoding| encoding.as_str().eq_ignore_ascii_case(dto::EncodingType::URL)),
        }
    }

    fn text(self, text: String) -> String {
        match self.url {
            true => percent_encoding::utf8_percent_encode(&text, KEY_ENCODE_SET).to_string(),
            false => text,
        }
    }

    fn option(self, text: Option<String>) -> Option<String> {
        text.map(|text| self.text(text))
    }
}

fn common_prefix_entries(prefixes: Vec<String>, encoding: KeyEncoding) -> Option<Vec<dto::CommonPrefix>> {
    Some(
        prefixes
            .into_iter()
            .map(|prefix| dto::CommonPrefix {
                prefix: Some(encoding.text(prefix)),
            })
            .collect(),
    )
}

fn object_entry(record: &ObjectVersionRecord, encoding: KeyEncoding) -> dto::Object {
    dto::Object {
        key: Some(encoding.text(record.key.clone())),
        size: Some(record.size_bytes as i64),
        e_tag: Some(etag_of(record)),
        last_modified: Some(timestamp_of(record.created_at_ms)),
        storage_class: Some(dto::ObjectStorageClass::from_static(dto::ObjectStorageClass::STANDARD)),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl<E: Env> S3 for Gateway<E> {
    async fn list_buckets(
        &self,
        request: S3Request<dto::ListBucketsInput>,
    ) -> S3Result<S3Response<dto::ListBucketsOutput>> {
        let key_id = request_key_id(&request.credentials)?;
        let buckets = self.cluster.list_buckets().await.map_err(s3_error_of)?;
        // Owned buckets need no lookup; grants are read a bounded number at a time.
        let lookups: Vec<_> = buckets
            .iter()
            .cloned()
            .map(|bucket| rights_lookup(Arc::clone(&self.cluster), bucket, key_id.clone()))
            .collect();
        let rights: Vec<BucketRights> = futures::stream::iter(lookups)
            .buffered(LIST_BUCKETS_LOOKUPS_IN_FLIGHT_MAX)
            .try_collect()
            .await
            .map_err(s3_error_of)?;
        let visible: Vec<BucketRecord> = buckets
            .into_iter()
            .zip(rights)
            .filter(|(_, rights)| rights.read || rights.write)
            .map(|(bucket, _)| bucket)
            .collect();
        Ok(S3Response::new(dto::ListBucketsOutput {
            buckets: Some(
                visible
                    .into_iter()
                    .map(|bucket| dto::Bucket {
                        name: Some(bucket.name),
                        creation_date: Some(timestamp_of(bucket.created_at_ms)),
                        bucket_region: Some(self.region.clone()),
                    })
                    .collect(),
            ),
            owner: Some(dto::Owner {
                display_name: Some("bdr".into()),
                id: Some("bdr".into()),
            }),
            ..Default::default()
        }))
    }

    async fn create_bucket(
        &self,
        request: S3Request<dto::CreateBucketInput>,
    ) -> S3Result<S3Response<dto::CreateBucketOutput>> {
        let owner = request_key_id(&request.credentials)?;
        let options = BucketOptions {
            object_lock_enabled: request.input.object_lock_enabled_for_bucket.unwrap_or(false),
            ..BucketOptions::default()
        };
        self.cluster
            .create_bucket_with(&request.input.bucket, &owner, options)
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::CreateBucketOutput {
            location: Some(format!("/{}", request.input.bucket)),
        }))
    }

    async fn head_bucket(
        &self,
        request: S3Request<dto::HeadBucketInput>,
    ) -> S3Result<S3Response<dto::HeadBucketOutput>> {
        self.request_bucket(&request.extensions, &request.input.bucket).await?;
        Ok(S3Response::new(dto::HeadBucketOutput {
            bucket_region: Some(self.region.clone()),
            ..Default::default()
        }))
    }

    async fn get_bucket_location(
        &self,
        request: S3Request<dto::GetBucketLocationInput>,
    ) -> S3Result<S3Response<dto::GetBucketLocationOutput>> {
        self.request_bucket(&request.extensions, &request.input.bucket).await?;
        Ok(S3Response::new(dto::GetBucketLocationOutput {
            location_constraint: Some(dto::BucketLocationConstraint::from(self.region.clone())),
        }))
    }

    async fn delete_bucket(
        &self,
        request: S3Request<dto::DeleteBucketInput>,
    ) -> S3Result<S3Response<dto::DeleteBucketOutput>> {
        let bucket = &request.input.bucket;
        // Owners only (checked before this is called); every version, delete marker and
        // multipart upload of the bucket counts, as in S3.
        let record = self.write_bucket(&request.extensions, bucket).await?;
        self.cluster
            .delete_bucket_generation(&record)
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::DeleteBucketOutput::default()))
    }

    async fn put_object(&self, request: S3Request<dto::PutObjectInput>) -> S3Result<S3Response<dto::PutObjectOutput>> {
        let verifier = ChecksumVerifier::for_request(&request.headers, request.trailing_headers.clone())?;
        let mut input = request.input;
        let body = input
            .body
            .take()
            .ok_or_else(|| s3_error!(IncompleteBody, "a PUT needs a body"))?;
        let bucket = self.write_bucket(&request.extensions, &input.bucket).await?;
        // Errors inside the stream (client gone, bad chunk signature, payload hash
        // mismatch at the end) fail the whole put, and so does a checksum that does not
        // match: no manifest is committed.
        let mut write = object_write(input.bucket.clone(), input.key.clone(), write_request!(input));
        write.bucket_record = Some(bucket.clone());
        write.body_check = verifier
            .as_ref()
            .map_or_else(BodyCheck::none, ChecksumVerifier::body_check);
        let reader = IoBody::new(body, verifier).into_async_read();
        let record = self.cluster.put_object(write, reader).await.map_err(s3_error_of)?;
        let checksums = checksum_fields(&record.checksums);
        Ok(S3Response::new(dto::PutObjectOutput {
            e_tag: Some(etag_of(&record)),
            version_id: version_answer(&bucket, &record.version_id),
            checksum_crc32: checksums.checksum_crc32,
            checksum_crc32c: checksums.checksum_crc32c,
            checksum_sha1: checksums.checksum_sha1,
            checksum_sha256: checksums.checksum_sha256,
            checksum_crc64nvme: checksums.checksum_crc64nvme,
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        request: S3Request<dto::HeadObjectInput>,
    ) -> S3Result<S3Response<dto::HeadObjectOutput>> {
        let input = request.input;
        let bucket = self.request_bucket(&request.extensions, &input.bucket).await?;
        let record = self
            .read_version(&bucket, &input.key, input.version_id.as_deref())
            .await?;
        Conditions {
            if_match: input.if_match,
            if_none_match: input.if_none_match,
            if_modified_since: input.if_modified_since,
            if_unmodified_since: input.if_unmodified_since,
        }
        .check_read(&record)?;
        let checksums = checksums_if_enabled(input.checksum_mode.as_ref(), &record, false);
        let lock = lock_answer(&bucket, &record);
        Ok(S3Response::new(dto::HeadObjectOutput {
            version_id: version_answer(&bucket, &record.version_id),
            cache_control: record.headers.cache_control.clone(),
            content_disposition: record.headers.content_disposition.clone(),
            content_encoding: record.headers.content_encoding.clone(),
            content_language: record.headers.content_language.clone(),
            expires: expires_of(&record.headers),
            object_lock_mode: lock.mode,
            object_lock_retain_until_date: lock.retain_until,
            object_lock_legal_hold_status: lock.legal_hold,
            checksum_crc32: checksums.checksum_crc32,
            checksum_crc32c: checksums.checksum_crc32c,
            checksum_sha1: checksums.checksum_sha1,
            checksum_sha256: checksums.checksum_sha256,
            checksum_crc64nvme: checksums.checksum_crc64nvme,
            content_length: Some(record.size_bytes as i64),
            content_type: record.content_type.clone(),
            e_tag: Some(etag_of(&record)),
            last_modified: Some(timestamp_of(record.created_at_ms)),
            accept_ranges: Some("bytes".into()),
            metadata: Some(record.user_metadata.clone().into_iter().collect()),
            ..Default::default()
        }))
    }

    async fn get_object(&self, request: S3Request<dto::GetObjectInput>) -> S3Result<S3Response<dto::GetObjectOutput>> {
        let input = request.input;
        let bucket = self.request_bucket(&request.extensions, &input.bucket).await?;
        let record = self
            .read_version(&bucket, &input.key, input.version_id.as_deref())
            .await?;
        let etag = etag_of(&record);
        Conditions {
            if_match: input.if_match,
            if_none_match: input.if_none_match,
            if_modified_since: input.if_modified_since,
            if_unmodified_since: input.if_unmodified_since,
        }
        .check_read(&record)?;
        let size = record.size_bytes;
        let (range, content_range) = match &input.range {
            None => (0..size, None),
            Some(requested) => {
                let range = requested
                    .check(size)
                    .map_err(|_| s3_error!(InvalidRange, "range not satisfiable for {size} bytes"))?;
                let content_range = format!("bytes {}-{}/{size}", range.start, range.end.saturating_sub(1));
                (range, Some(content_range))
            }
        };
        let length = range.end - range.start;
        let checksums = checksums_if_enabled(input.checksum_mode.as_ref(), &record, content_range.is_some());
        let lock = lock_answer(&bucket, &record);
        let output = dto::GetObjectOutput {
            version_id: version_answer(&bucket, &record.version_id),
            cache_control: record.headers.cache_control.clone(),
            content_disposition: record.headers.content_disposition.clone(),
            content_encoding: record.headers.content_encoding.clone(),
            content_language: record.headers.content_language.clone(),
            expires: expires_of(&record.headers),
            object_lock_mode: lock.mode,
            object_lock_retain_until_date: lock.retain_until,
            object_lock_legal_hold_status: lock.legal_hold,
            checksum_crc32: checksums.checksum_crc32,
            checksum_crc32c: checksums.checksum_crc32c,
            checksum_sha1: checksums.checksum_sha1,
            checksum_sha256: checksums.checksum_sha256,
            checksum_crc64nvme: checksums.checksum_crc64nvme,
            content_length: Some(length as i64),
            content_range,
            content_type: record.content_type.clone(),
            e_tag: Some(etag),
            last_modified: Some(timestamp_of(record.created_at_ms)),
            accept_ranges: Some("bytes".into()),
            metadata: Some(record.user_metadata.clone().into_iter().collect()),
            body: None,
            ..Default::default()
        };
        let stream = self.cluster.read_object(record, range).map_err(s3_error_of)?;
        let stream = stream.map(|chunk| chunk.map(Bytes::from).map_err(std::io::Error::other));
        let body = StreamingBlob::wrap(sync_wrapper::SyncStream::new(stream));
        Ok(S3Response::new(dto::GetObjectOutput {
            body: Some(body),
            ..output
        }))
    }

    async fn delete_object(
        &self,
        request: S3Request<dto::DeleteObjectInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectOutput>> {
        let bypass_governance = self
            .bypasses_governance(
                &request.credentials,
                &request.extensions,
                &request.input.bucket,
                request.input.bypass_governance_retention,
            )
            .await?;
        let input = request.input;
        let bucket = self.write_bucket(&request.extensions, &input.bucket).await?;
        let outcome = self
            .cluster
            .delete_object_version(&bucket, &input.key, input.version_id.as_deref(), bypass_governance)
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::DeleteObjectOutput {
            delete_marker: outcome.delete_marker.then_some(true),
            version_id: outcome.version_id,
            ..Default::default()
        }))
    }

    async fn delete_objects(
        &self,
        request: S3Request<dto::DeleteObjectsInput>,
    ) -> S3Result<S3Response<dto::DeleteObjectsOutput>> {
        let input = request.input;
        let objects = input.delete.objects;
        if objects.len() > DELETE_OBJECTS_KEYS_MAX {
            return Err(s3_error!(
                MalformedXML,
                "at most {DELETE_OBJECTS_KEYS_MAX} keys per DeleteObjects request"
            ));
        }
        let bucket = self.write_bucket(&request.extensions, &input.bucket).await?;
        let bypass_governance = self
            .bypasses_governance(
                &request.credentials,
                &request.extensions,
                &input.bucket,
                input.bypass_governance_retention,
            )
            .await?;
        let quiet = input.delete.quiet.unwrap_or(false);
        let mut deleted = Vec::new();
        let mut errors = Vec::new();
        // One after another: each is a metadata quorum write, and a request of 1000 keys
        // must not become 1000 writes in flight from one client.
        for object in objects {
            let result = self
                .cluster
                .delete_object_version(&bucket, &object.key, object.version_id.as_deref(), bypass_governance)
                .await
                .map_err(s3_error_of);
            match result {
                Ok(_) if quiet => {}
                Ok(outcome) => deleted.push(dto::DeletedObject {
                    key: Some(object.key),
                    delete_marker: outcome.delete_marker.then_some(true),
                    delete_marker_version_id: outcome.version_id.clone().filter(|_| outcome.delete_marker),
                    version_id: object.version_id,
                }),
                Err(error) => errors.push(dto::Error {
                    code: Some(error.code().as_str().to_string()),
                    message: error.message().map(str::to_string),
                    key: Some(object.key),
                    version_id: object.version_id,
                }),
            }
        }
        Ok(S3Response::new(dto::DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: Some(errors),
            ..Default::default()
        }))
    }

    async fn copy_object(
        &self,
        request: S3Request<dto::CopyObjectInput>,
    ) -> S3Result<S3Response<dto::CopyObjectOutput>> {
        let mut input = request.input;
        let conditions = Conditions {
            if_match: input.copy_source_if_match.take(),
            if_none_match: input.copy_source_if_none_match.take(),
            if_modified_since: input.copy_source_if_modified_since.take(),
            if_unmodified_since: input.copy_source_if_unmodified_since.take(),
        };
        let source = self.copy_source_record(&input.copy_source, &conditions).await?;
        let bucket = self.write_bucket(&request.extensions, &input.bucket).await?;
        let replace = input
            .metadata_directive
            .as_ref()
            .is_some_and(|directive| directive.as_str() == dto::MetadataDirective::REPLACE);
        // Copying an older version onto its own key is how S3 restores it: not a self-copy.
        let same_object = matches!(&input.copy_source,
            dto::CopySource::Bucket { bucket, key, version_id: None } if **bucket == *input.bucket && **key == *input.key);
        if same_object && !replace {
            return Err(s3_error!(
                InvalidRequest,
                "copying an object onto itself needs the REPLACE metadata directive"
            ));
        }
        let mut request_fields = write_request!(input);
        // COPY keeps the source's metadata and headers; the lock is the request's own.
        if !replace {
            request_fields.content_type = source.content_type.clone();
            request_fields.headers = source.headers.clone();
            request_fields.metadata = Some(source.user_metadata.clone().into_iter().collect());
        }
        let mut write = object_write(input.bucket.clone(), input.key.clone(), request_fields);
        write.bucket_record = Some(bucket.clone());
        let size = source.size_bytes;
        let source_version = source.version_id.clone();
        let reader = self.object_reader(source, 0..size)?;
        let record = self.cluster.put_object(write, reader).await.map_err(s3_error_of)?;
        Ok(S3Response::new(dto::CopyObjectOutput {
            version_id: version_answer(&bucket, &record.version_id),
            copy_source_version_id: Some(source_version).filter(|_| {
                matches!(
                    &input.copy_source,
                    dto::CopySource::Bucket {
                        version_id: Some(_),
                        ..
                    }
                )
            }),
            copy_object_result: Some(dto::CopyObjectResult {
                e_tag: Some(etag_of(&record)),
                last_modified: Some(timestamp_of(record.created_at_ms)),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn upload_part_copy(
        &self,
        request: S3Request<dto::UploadPartCopyInput>,
    ) -> S3Result<S3Response<dto::UploadPartCopyOutput>> {
        let input = request.input;
        let conditions = Conditions {
            if_match: input.copy_source_if_match,
            if_none_match: input.copy_source_if_none_match,
            if_modified_since: input.copy_source_if_modified_since,
            if_unmodified_since: input.copy_source_if_unmodified_since,
        };
        let source = self.copy_source_record(&input.copy_source, &conditions).await?;
        let size = source.size_bytes;
        let range = match &input.copy_source_range {
            None => 0..size,
            Some(text) => dto::Range::parse(text)
                .ok()
                .and_then(|range| range.check(size).ok())
                .ok_or_else(|| {
                    s3_error!(
                        InvalidRange,
                        "copy source range {text:?} not satisfiable for {size} bytes"
                    )
                })?,
        };
        let part_number =
            u32::try_from(input.part_number).map_err(|_| s3_error!(InvalidArgument, "bad part number"))?;
        let reader = self.object_reader(source, range)?;
        let part = self
            .cluster
            .upload_part(
                &input.bucket,
                &input.key,
                &input.upload_id,
                part_number,
                reader,
                BodyCheck::none(),
            )
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::UploadPartCopyOutput {
            copy_part_result: Some(dto::CopyPartResult {
                e_tag: Some(part_etag(&part)),
                last_modified: Some(timestamp_of(self.cluster.env().now_ms())),
                ..Default::default()
            }),
            ..Default::default()
        }))
    }

    async fn list_multipart_uploads(
        &self,
        request: S3Request<dto::ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<dto::ListMultipartUploadsOutput>> {
        let input = request.input;
        let bucket = self.request_bucket(&request.extensions, &input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_uploads = input.max_uploads.unwrap_or(LIST_UPLOADS_MAX).clamp(0, LIST_UPLOADS_MAX) as usize;
        let delimiter = input.delimiter.clone().filter(|delimiter| !delimiter.is_empty());
        // Where the scan stands: a (key, upload id) row, or a whole key (or common prefix
        // followed by U+10FFFF) to skip.
        let mut after: Option<(String, Option<String>)> = input
            .key_marker
            .clone()
            .filter(|marker| !marker.is_empty())
            .map(|key| (key, input.upload_id_marker.clone().filter(|id| !id.is_empty())));
        let mut uploads = Vec::new();
        let mut common_prefixes: Vec<String> = Vec::new();
        let mut next: Option<(String, Option<String>)> = None;
        'pages: loop {
            let listing = self
                .cluster
                .list_multipart_uploads(
                    &input.bucket,
                    &prefix,
                    after.as_ref().map(|(key, id)| (key.as_str(), id.as_deref())),
                    LIST_UPLOADS_MAX as u32,
                )
                .await
                .map_err(s3_error_of)?;
            for upload in listing.uploads {
                if !upload.belongs_to(&bucket) {
                    continue;
                }
                if common_prefixes
                    .last()
                    .is_some_and(|common| upload.key.starts_with(common.as_str()))
                {
                    continue;
                }
                if uploads.len() + common_prefixes.len() >= max_uploads {
                    next = after.clone();
                    break 'pages;
                }
                let rest = &upload.key[prefix.len()..];
                let common = delimiter.as_deref().and_then(|delimiter| {
                    rest.find(delimiter)
                        .map(|position| format!("{prefix}{}", &rest[..position + delimiter.len()]))
                });
                match common {
                    Some(common) => {
                        after = Some((format!("{common}\u{10ffff}"), None));
                        common_prefixes.push(common);
                    }
                    None => {
                        after = Some((upload.key.clone(), Some(upload.upload_id.clone())));
                        uploads.push(upload);
                    }
                }
            }
            match listing.next_after {
                Some((key, upload_id)) => {
                    let scanned = (key, Some(upload_id));
                    if after.as_ref().is_none_or(|current| *current < scanned) {
                        after = Some(scanned);
                    }
                }
                None => break,
            }
        }
        let (next_key_marker, next_upload_id_marker) = match next {
            Some((key, upload_id)) => (Some(key), upload_id),
            None => (None, None),
        };
        let encoding = KeyEncoding::of(input.encoding_type.as_ref());
        Ok(S3Response::new(dto::ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: encoding.option(input.prefix),
            delimiter: encoding.option(input.delimiter),
            key_marker: encoding.option(input.key_marker),
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(max_uploads as i32),
            is_truncated: Some(next_key_marker.is_some()),
            next_key_marker: encoding.option(next_key_marker),
            next_upload_id_marker,
            encoding_type: input.encoding_type,
            common_prefixes: common_prefix_entries(common_prefixes, encoding),
            uploads: Some(
                uploads
                    .into_iter()
                    .map(|upload| dto::MultipartUpload {
                        key: Some(encoding.text(upload.key)),
                        upload_id: Some(upload.upload_id),
                        initiated: Some(timestamp_of(upload.created_at_ms)),
                        storage_class: Some(dto::StorageClass::from_static(dto::StorageClass::STANDARD)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    /// Versions and delete markers, keys in order; a key's versions newest first, except
    /// that its "null" version (written while versioning was off or suspended) comes
    /// after the others, where its row is. `IsLatest` marks the current version.
    async fn list_object_versions(
        &self,
        request: S3Request<dto::ListObjectVersionsInput>,
    ) -> S3Result<S3Response<dto::ListObjectVersionsOutput>> {
        let input = request.input;
        let bucket = self.request_bucket(&request.extensions, &input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(LIST_KEYS_MAX).clamp(0, LIST_KEYS_MAX) as usize;
        let delimiter = input.delimiter.clone().filter(|delimiter| !delimiter.is_empty());
        // Where the scan stands: a (key, version id) row, or a whole key (or common prefix
        // followed by U+10FFFF) to skip.
        let mut after: Option<(String, Option<String>)> = input
            .key_marker
            .clone()
            .filter(|marker| !marker.is_empty())
            .map(|key| (key, input.version_id_marker.clone().filter(|id| !id.is_empty())));
        let mut versions: Vec<ListedVersion> = Vec::new();
        let mut common_prefixes: Vec<String> = Vec::new();
        let mut next: Option<(String, Option<String>)> = None;
        'pages: loop {
            let listing = self
                .cluster
                .list_versions(
                    &bucket,
                    &prefix,
                    after.as_ref().map(|(key, id)| (key.as_str(), id.as_deref())),
                    LIST_KEYS_MAX as u32,
                )
                .await
                .map_err(s3_error_of)?;
            for version in listing.versions {
                let key = &version.record.key;
                if common_prefixes
                    .last()
                    .is_some_and(|common| key.starts_with(common.as_str()))
                {
                    continue;
                }
                if versions.len() + common_prefixes.len() >= max_keys {
                    next = after.clone();
                    break 'pages;
                }
                let rest = &key[prefix.len()..];
                let common = delimiter.as_deref().and_then(|delimiter| {
                    rest.find(delimiter)
                        .map(|position| format!("{prefix}{}", &rest[..position + delimiter.len()]))
                });
                match common {
                    Some(common) => {
                        after = Some((format!("{common}\u{10ffff}"), None));
                        common_prefixes.push(common);
                    }
                    None => {
                        after = Some((key.clone(), Some(version.record.version_id.clone())));
                        versions.push(version);
                    }
                }
            }
            match listing.next_after {
                Some((key, version_id)) => {
                    let scanned = (key, Some(version_id));
                    if after.as_ref().is_none_or(|current| *current < scanned) {
                        after = Some(scanned);
                    }
                }
                None => break,
            }
        }
        let (next_key_marker, next_version_id_marker) = match next {
            Some((key, version_id)) => (Some(key), version_id),
            None => (None, None),
        };
        let encoding = KeyEncoding::of(input.encoding_type.as_ref());
        let (markers, objects): (Vec<ListedVersion>, Vec<ListedVersion>) = versions
            .into_iter()
            .partition(|version| version.record.is_delete_marker());
        Ok(S3Response::new(dto::ListObjectVersionsOutput {
            name: Some(input.bucket),
            prefix: encoding.option(input.prefix),
            delimiter: encoding.option(input.delimiter),
            key_marker: encoding.option(input.key_marker),
            version_id_marker: input.version_id_marker,
            max_keys: Some(max_keys as i32),
            is_truncated: Some(next_key_marker.is_some()),
            next_key_marker: encoding.option(next_key_marker),
            next_version_id_marker,
            encoding_type: input.encoding_type,
            versions: Some(
                objects
                    .iter()
                    .map(|version| dto::ObjectVersion {
                        key: Some(encoding.text(version.record.key.clone())),
                        version_id: Some(version.record.version_id.clone()),
                        is_latest: Some(version.is_latest),
                        size: Some(version.record.size_bytes as i64),
                        e_tag: Some(etag_of(&version.record)),
                        last_modified: Some(timestamp_of(version.record.created_at_ms)),
                        storage_class: Some(dto::ObjectVersionStorageClass::from_static(
                            dto::ObjectVersionStorageClass::STANDARD,
                        )),
                        ..Default::default()
                    })
                    .collect(),
            ),
            delete_markers: Some(
                markers
                    .iter()
                    .map(|marker| dto::DeleteMarkerEntry {
                        key: Some(encoding.text(marker.record.key.clone())),
                        version_id: Some(marker.record.version_id.clone()),
                        is_latest: Some(marker.is_latest),
                        last_modified: Some(timestamp_of(marker.record.created_at_ms)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            common_prefixes: common_prefix_entries(common_prefixes, encoding),
            ..Default::default()
        }))
    }

    async fn put_bucket_versioning(
        &self,
        request: S3Request<dto::PutBucketVersioningInput>,
    ) -> S3Result<S3Response<dto::PutBucketVersioningOutput>> {
        let input = request.input;
        let configuration = input.versioning_configuration;
        if configuration
            .mfa_delete
            .as_ref()
            .is_some_and(|mfa| mfa.as_str().eq_ignore_ascii_case(dto::MFADelete::ENABLED))
        {
            return Err(s3_error!(NotImplemented, "MFA delete is not supported"));
        }
        let versioning = match configuration.status.as_ref().map(|status| status.as_str()) {
            Some(dto::BucketVersioningStatus::ENABLED) => VersioningState::Enabled,
            Some(dto::BucketVersioningStatus::SUSPENDED) => VersioningState::Suspended,
            other => {
                return Err(s3_error!(
                    MalformedXML,
                    "versioning status must be Enabled or Suspended, not {other:?}"
                ))
            }
        };
        self.cluster
            .set_bucket_versioning(&input.bucket, versioning)
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::PutBucketVersioningOutput::default()))
    }

    async fn get_bucket_versioning(
        &self,
        request: S3Request<dto::GetBucketVersioningInput>,
    ) -> S3Result<S3Response<dto::GetBucketVersioningOutput>> {
        let bucket = self.request_bucket(&request.extensions, &request.input.bucket).await?;
        let status = match bucket.versioning {
            VersioningState::Unversioned => None,
            VersioningState::Enabled => Some(dto::BucketVersioningStatus::ENABLED),
            VersioningState::Suspended => Some(dto::BucketVersioningStatus::SUSPENDED),
        };
        Ok(S3Response::new(dto::GetBucketVersioningOutput {
            status: status.map(dto::BucketVersioningStatus::from_static),
            ..Default::default()
        }))
    }

    async fn put_object_lock_configuration(
        &self,
        request: S3Request<dto::PutObjectLockConfigurationInput>,
    ) -> S3Result<S3Response<dto::PutObjectLockConfigurationOutput>> {
        let input = request.input;
        let configuration = input
            .object_lock_configuration
            .ok_or_else(|| s3_error!(MalformedXML, "an Object Lock configuration is needed"))?;
        if configuration
            .object_lock_enabled
            .as_ref()
            .is_none_or(|enabled| enabled.as_str() != dto::ObjectLockEnabled::ENABLED)
        {
            return Err(s3_error!(MalformedXML, "ObjectLockEnabled must be Enabled"));
        }
        let default_retention = match configuration.rule.and_then(|rule| rule.default_retention) {
            None => None,
            Some(default) => {
                let mode = default
                    .mode
                    .as_ref()
                    .ok_or_else(|| s3_error!(MalformedXML, "a default retention needs a mode"))?;
                let days = match (default.days, default.years) {
                    (Some(days), None) => days,
                    (None, Some(years)) => years.saturating_mul(365),
                    _ => {
                        return Err(s3_error!(
                            MalformedXML,
                            "a default retention needs either Days or Years"
                        ))
                    }
                };
                Some(DefaultRetention {
                    mode: retention_mode_of(mode.as_str())?,
                    days: u32::try_from(days)
                        .map_err(|_| s3_error!(InvalidArgument, "retention period must be positive"))?,
                })
            }
        };
        self.cluster
            .set_object_lock_configuration(&input.bucket, default_retention)
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::PutObjectLockConfigurationOutput::default()))
    }

    async fn get_object_lock_configuration(
        &self,
        request: S3Request<dto::GetObjectLockConfigurationInput>,
    ) -> S3Result<S3Response<dto::GetObjectLockConfigurationOutput>> {
        let bucket = self.request_bucket(&request.extensions, &request.input.bucket).await?;
        if !bucket.object_lock_enabled {
            return Err(s3_error!(
                ObjectLockConfigurationNotFoundError,
                "bucket {} has no Object Lock configuration",
                bucket.name
            ));
        }
        let rule = bucket.default_retention.map(|default| dto::ObjectLockRule {
            default_retention: Some(dto::DefaultRetention {
                days: Some(default.days as i32),
                mode: Some(dto::ObjectLockRetentionMode::from_static(retention_mode_text(
                    default.mode,
                ))),
                years: None,
            }),
        });
        Ok(S3Response::new(dto::GetObjectLockConfigurationOutput {
            object_lock_configuration: Some(dto::ObjectLockConfiguration {
                object_lock_enabled: Some(dto::ObjectLockEnabled::from_static(dto::ObjectLockEnabled::ENABLED)),
                rule,
            }),
        }))
    }

    async fn put_object_retention(
        &self,
        request: S3Request<dto::PutObjectRetentionInput>,
    ) -> S3Result<S3Response<dto::PutObjectRetentionOutput>> {
        let bypass_governance = self
            .bypasses_governance(
                &request.credentials,
                &request.extensions,
                &request.input.bucket,
                request.input.bypass_governance_retention,
            )
            .await?;
        let input = request.input;
        let bucket = self.write_bucket(&request.extensions, &input.bucket).await?;
        let retention = match input.retention {
            Some(dto::ObjectLockRetention {
                mode: Some(mode),
                retain_until_date: Some(until),
            }) => Some(Retention {
                mode: retention_mode_of(mode.as_str())?,
                retain_until_ms: ms_of(&until),
            }),
            Some(dto::ObjectLockRetention {
                mode: None,
                retain_until_date: None,
            })
            | None => None,
            Some(_) => {
                return Err(s3_error!(
                    MalformedXML,
                    "a retention needs both a mode and a retain-until date"
                ))
            }
        };
        self.cluster
            .change_object_lock(
                &bucket,
                &input.key,
                input.version_id.as_deref(),
                LockChange::Retention(retention),
                bypass_governance,
            )
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::PutObjectRetentionOutput::default()))
    }

    async fn get_object_retention(
        &self,
        request: S3Request<dto::GetObjectRetentionInput>,
    ) -> S3Result<S3Response<dto::GetObjectRetentionOutput>> {
        let input = request.input;
        let bucket = self.request_bucket(&request.extensions, &input.bucket).await?;
        let record = self
            .read_version(&bucket, &input.key, input.version_id.as_deref())
            .await?;
        let retention = record
            .lock
            .retention
            .ok_or_else(|| s3_error!(NoSuchObjectLockConfiguration, "the object has no retention"))?;
        Ok(S3Response::new(dto::GetObjectRetentionOutput {
            retention: Some(dto::ObjectLockRetention {
                mode: Some(dto::ObjectLockRetentionMode::from_static(retention_mode_text(
                    retention.mode,
                ))),
                retain_until_date: Some(timestamp_of(retention.retain_until_ms)),
            }),
        }))
    }

    async fn put_object_legal_hold(
        &self,
        request: S3Request<dto::PutObjectLegalHoldInput>,
    ) -> S3Result<S3Response<dto::PutObjectLegalHoldOutput>> {
        let key_id = request_key_id(&request.credentials)?;
        let input = request.input;
        let bucket = self.write_bucket(&request.extensions, &input.bucket).await?;
        let on = legal_hold_of(input.legal_hold.as_ref().and_then(|hold| hold.status.as_ref()))?;
        // Placing a hold protects data: a write grant may. Lifting one exposes it to
        // deletion: only the owner may (S3 needs s3:PutObjectLegalHold, which backup
        // keys do not get).
        if !on && bucket.owner_key_id != key_id {
            return Err(s3_error!(AccessDenied, "only the bucket's owner may lift a legal hold"));
        }
        self.cluster
            .change_object_lock(
                &bucket,
                &input.key,
                input.version_id.as_deref(),
                LockChange::LegalHold(on),
                false,
            )
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::PutObjectLegalHoldOutput::default()))
    }

    async fn get_object_legal_hold(
        &self,
        request: S3Request<dto::GetObjectLegalHoldInput>,
    ) -> S3Result<S3Response<dto::GetObjectLegalHoldOutput>> {
        let input = request.input;
        let bucket = self.request_bucket(&request.extensions, &input.bucket).await?;
        if !bucket.object_lock_enabled {
            return Err(s3_error!(
                InvalidRequest,
                "bucket {} does not have Object Lock enabled",
                bucket.name
            ));
        }
        let record = self
            .read_version(&bucket, &input.key, input.version_id.as_deref())
            .await?;
        Ok(S3Response::new(dto::GetObjectLegalHoldOutput {
            legal_hold: Some(dto::ObjectLockLegalHold {
                status: Some(legal_hold_status(record.lock.legal_hold)),
            }),
        }))
    }

    async fn list_objects_v2(
        &self,
        request: S3Request<dto::ListObjectsV2Input>,
    ) -> S3Result<S3Response<dto::ListObjectsV2Output>> {
        let input = request.input;
        let bucket = self.request_bucket(&request.extensions, &input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(LIST_KEYS_MAX).clamp(0, LIST_KEYS_MAX);
        let after = match &input.continuation_token {
            Some(token) => Some(
                hex::decode(token)
                    .ok()
                    .and_then(|bytes| String::from_utf8(bytes).ok())
                    .ok_or_else(|| s3_error!(InvalidArgument, "bad continuation token"))?,
            ),
            None => input.start_after.clone().filter(|start| !start.is_empty()),
        };
        let page = self
            .list_page(&bucket, &prefix, input.delimiter.as_deref(), after, max_keys as usize)
            .await?;
        let key_count = (page.objects.len() + page.common_prefixes.len()) as i32;
        let encoding = KeyEncoding::of(input.encoding_type.as_ref());
        Ok(S3Response::new(dto::ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: encoding.option(input.prefix),
            delimiter: encoding.option(input.delimiter),
            max_keys: Some(max_keys),
            key_count: Some(key_count),
            is_truncated: Some(page.next_after.is_some()),
            next_continuation_token: page.next_after.map(hex::encode),
            continuation_token: input.continuation_token,
            start_after: encoding.option(input.start_after),
            encoding_type: input.encoding_type,
            contents: Some(
                page.objects
                    .iter()
                    .map(|record| object_entry(record, encoding))
                    .collect(),
            ),
            common_prefixes: common_prefix_entries(page.common_prefixes, encoding),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        request: S3Request<dto::CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CreateMultipartUploadOutput>> {
        let mut input = request.input;
        let mut write = object_write(input.bucket.clone(), input.key.clone(), write_request!(input));
        // Only composite checksums can be made of part checksums (a full-object CRC needs
        // CRC combination, not supported): an upload asking for one gets none.
        let composite = input
            .checksum_type
            .as_ref()
            .is_none_or(|kind| kind.as_str().eq_ignore_ascii_case(dto::ChecksumType::COMPOSITE));
        write.checksum_algorithm = checksum_algorithm_of(input.checksum_algorithm.as_ref())?.filter(|_| composite);
        let upload_id = self.cluster.create_multipart_upload(write).await.map_err(s3_error_of)?;
        Ok(S3Response::new(dto::CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(upload_id),
            ..Default::default()
        }))
    }

    async fn upload_part(
        &self,
        request: S3Request<dto::UploadPartInput>,
    ) -> S3Result<S3Response<dto::UploadPartOutput>> {
        let verifier = ChecksumVerifier::for_request(&request.headers, request.trailing_headers.clone())?;
        let input = request.input;
        let body = input
            .body
            .ok_or_else(|| s3_error!(IncompleteBody, "a part needs a body"))?;
        let part_number =
            u32::try_from(input.part_number).map_err(|_| s3_error!(InvalidArgument, "bad part number"))?;
        let body_check = verifier
            .as_ref()
            .map_or_else(BodyCheck::none, ChecksumVerifier::body_check);
        let part = self
            .cluster
            .upload_part(
                &input.bucket,
                &input.key,
                &input.upload_id,
                part_number,
                IoBody::new(body, verifier.clone()).into_async_read(),
                body_check,
            )
            .await
            .map_err(s3_error_of)?;
        let checksums = checksum_fields(&verifier.map(|verifier| verifier.verified()).unwrap_or_default());
        Ok(S3Response::new(dto::UploadPartOutput {
            e_tag: Some(part_etag(&part)),
            checksum_crc32: checksums.checksum_crc32,
            checksum_crc32c: checksums.checksum_crc32c,
            checksum_sha1: checksums.checksum_sha1,
            checksum_sha256: checksums.checksum_sha256,
            checksum_crc64nvme: checksums.checksum_crc64nvme,
            ..Default::default()
        }))
    }

    async fn complete_multipart_upload(
        &self,
        request: S3Request<dto::CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CompleteMultipartUploadOutput>> {
        let input = request.input;
        let listed: Vec<(u32, String)> = input
            .multipart_upload
            .and_then(|upload| upload.parts)
            .unwrap_or_default()
            .into_iter()
            .map(|part| {
                let number = part
                    .part_number
                    .and_then(|number| u32::try_from(number).ok())
                    .unwrap_or(0);
                let etag = part.e_tag.map(|etag| etag.value().to_string()).unwrap_or_default();
                (number, etag)
            })
            .collect();
        let record = self
            .cluster
            .complete_multipart_upload_with(
                &input.bucket,
                &input.key,
                &input.upload_id,
                &listed,
                &composite_checksum,
            )
            .await
            .map_err(s3_error_of)?;
        let bucket = self.request_bucket(&request.extensions, &input.bucket).await?;
        let checksums = checksum_fields(&record.checksums);
        Ok(S3Response::new(dto::CompleteMultipartUploadOutput {
            checksum_crc32: checksums.checksum_crc32,
            checksum_crc32c: checksums.checksum_crc32c,
            checksum_sha1: checksums.checksum_sha1,
            checksum_sha256: checksums.checksum_sha256,
            checksum_crc64nvme: checksums.checksum_crc64nvme,
            checksum_type: checksums.checksum_type,
            version_id: version_answer(&bucket, &record.version_id),
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            e_tag: Some(etag_of(&record)),
            location: Some(format!("/{}/{}", input.bucket, input.key)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        request: S3Request<dto::AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::AbortMultipartUploadOutput>> {
        let input = request.input;
        self.cluster
            .abort_multipart_upload(&input.bucket, &input.key, &input.upload_id)
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::AbortMultipartUploadOutput::default()))
    }

    async fn list_parts(&self, request: S3Request<dto::ListPartsInput>) -> S3Result<S3Response<dto::ListPartsOutput>> {
        let input = request.input;
        let parts = self
            .cluster
            .list_parts(&input.bucket, &input.key, &input.upload_id)
            .await
            .map_err(s3_error_of)?;
        let marker = input.part_number_marker.unwrap_or(0).max(0) as u32;
        let max_parts = input.max_parts.unwrap_or(1000).clamp(1, 1000) as usize;
        let selected: Vec<_> = parts
            .iter()
            .filter(|part| part.part_number > marker)
            .take(max_parts)
            .collect();
        let truncated = parts.iter().filter(|part| part.part_number > marker).count() > selected.len();
        Ok(S3Response::new(dto::ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            is_truncated: Some(truncated),
            max_parts: Some(max_parts as i32),
            next_part_number_marker: selected.last().map(|part| part.part_number as i32),
            parts: Some(
                selected
                    .iter()
                    .map(|part| dto::Part {
                        part_number: Some(part.part_number as i32),
                        size: Some(part.size_bytes as i64),
                        e_tag: Some(part_etag(part)),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }))
    }

    async fn list_objects(
        &self,
        request: S3Request<dto::ListObjectsInput>,
    ) -> S3Result<S3Response<dto::ListObjectsOutput>> {
        let input = request.input;
        let (page, max_keys) = self
            .marker_page(
                &request.extensions,
                &input.bucket,
                input.prefix.as_deref(),
                input.delimiter.as_deref(),
                input.marker.as_deref(),
                input.max_keys,
            )
            .await?;
        let truncated = page.next_after.is_some();
        let next_marker = truncated
            .then(|| page.next_after.clone())
            .flatten()
            .filter(|_| input.delimiter.is_some());
        let encoding = KeyEncoding::of(input.encoding_type.as_ref());
        Ok(S3Response::new(dto::ListObjectsOutput {
            name: Some(input.bucket),
            prefix: encoding.option(input.prefix),
            marker: encoding.option(input.marker),
            delimiter: encoding.option(input.delimiter),
            max_keys: Some(max_keys),
            is_truncated: Some(truncated),
            next_marker: encoding.option(next_marker),
            encoding_type: input.encoding_type,
            contents: Some(
                page.objects
                    .iter()
                    .map(|record| object_entry(record, encoding))
                    .collect(),
            ),
            common_prefixes: common_prefix_entries(page.common_prefixes, encoding),
            ..Default::default()
        }))
    }
}

/// What an S3 operation needs from the caller's access key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needed {
    /// Any valid key (the handler shows only what the key may see).
    AnyKey,
    /// A key created with the right to create buckets.
    CreateBucket,
    Read,
    Write,
    /// The bucket's owner: its settings, and deleting it.
    Owner,
}

fn needed_for(operation: &str) -> Needed {
    match operation {
        "ListBuckets" => Needed::AnyKey,
        "CreateBucket" => Needed::CreateBucket,
        "HeadBucket"
        | "GetBucketLocation"
        | "GetObject"
        | "HeadObject"
        | "GetObjectAttributes"
        | "ListObjects"
        | "ListObjectsV2"
        | "ListObjectVersions"
        | "ListParts"
        | "ListMultipartUploads"
        | "GetBucketVersioning"
        | "GetObjectLockConfiguration"
        | "GetObjectRetention"
        | "GetObjectLegalHold" => Needed::Read,
        "PutObject"
        | "DeleteObject"
        | "DeleteObjects"
        | "CopyObject"
        | "CreateMultipartUpload"
        | "UploadPart"
        | "UploadPartCopy"
        | "CompleteMultipartUpload"
        | "AbortMultipartUpload"
        | "PutObjectRetention"
        | "PutObjectLegalHold" => Needed::Write,
        // Everything else changes or reveals bucket settings: owners only.
        _ => Needed::Owner,
    }
}

fn access_denied() -> S3Error {
    s3_error!(AccessDenied, "access denied")
}

/// Decides, before any input is read, whether the request's access key may run the
/// operation on the bucket: its owner may do anything, others what `admin bucket allow`
/// granted them, and only keys allowed to may create buckets. Anonymous requests never
/// get here with rights: they are refused.
pub struct ClusterAccess<E: Env> {
    cluster: Arc<ClusterNode<E>>,
}

impl<E: Env> ClusterAccess<E> {
    /// Whether the request's key may read the source object of CopyObject or
    /// UploadPartCopy (the operation's own check covers only the destination).
    async fn check_copy_source(
        &self,
        credentials: &Option<s3s::auth::Credentials>,
        source: &dto::CopySource,
    ) -> S3Result<()> {
        let key_id = request_key_id(credentials)?;
        match source {
            dto::CopySource::Bucket { bucket, .. } => {
                self.check_bucket(bucket, &key_id, Needed::Read).await.map(|_| ())
            }
            dto::CopySource::AccessPoint { .. } | dto::CopySource::Outpost { .. } => Err(s3_error!(
                NotImplemented,
                "copy sources other than bucket/key are not supported"
            )),
        }
    }
}

#[async_trait::async_trait]
impl<E: Env> s3s::access::S3Access for ClusterAccess<E> {
    async fn check(&self, cx: &mut s3s::access::S3AccessContext<'_>) -> S3Result<()> {
        let key_id = cx
            .credentials()
            .map(|credentials| credentials.access_key.clone())
            .ok_or_else(access_denied)?;
        let needed = needed_for(cx.s3_op().name());
        if needed == Needed::AnyKey {
            return Ok(());
        }
        if needed == Needed::CreateBucket {
            let key = self.cluster.access_key(&key_id).await.map_err(s3_error_of)?;
            return match key {
                Some(key) if key.allow_create_bucket => Ok(()),
                _ => Err(s3_error!(AccessDenied, "this access key may not create buckets")),
            };
        }
        let bucket = match cx.s3_path() {
            s3s::path::S3Path::Bucket { bucket } | s3s::path::S3Path::Object { bucket, .. } => bucket.to_string(),
            s3s::path::S3Path::Root => return Err(access_denied()),
        };
        let (record, cached) = self.check_bucket(&bucket, &key_id, needed).await?;
        cx.extensions_mut().insert(CheckedBucket { record, cached });
        Ok(())
    }

    async fn copy_object(&self, request: &mut S3Request<dto::CopyObjectInput>) -> S3Result<()> {
        self.check_copy_source(&request.credentials, &request.input.copy_source)
            .await
    }

    async fn upload_part_copy(&self, request: &mut S3Request<dto::UploadPartCopyInput>) -> S3Result<()> {
        self.check_copy_source(&request.credentials, &request.input.copy_source)
            .await
    }
}

impl<E: Env> ClusterAccess<E> {
    /// The bucket's record once `key_id` may do what `needed` says with it.
    /// The bucket's record if the key may do what `needed` says, and whether the record
    /// came from the request cache.
    async fn check_bucket(&self, bucket: &str, key_id: &str, needed: Needed) -> S3Result<(BucketRecord, bool)> {
        // A missing bucket answers NoSuchBucket here, so a bucket created by someone else
        // between this check and the handler can never be written through this request.
        let (record, cached) = self
            .cluster
            .bucket_for_request(bucket)
            .await
            .map_err(s3_error_of)?
            .ok_or_else(|| s3_error!(NoSuchBucket, "no such bucket: {bucket}"))?;
        let rights = self.cluster.bucket_rights(&record, key_id).await.map_err(s3_error_of)?;
        let allowed = match needed {
            Needed::Read => rights.read,
            Needed::Write => rights.write,
            Needed::Owner => rights.owner,
            Needed::AnyKey | Needed::CreateBucket => unreachable!("decided before the bucket is read"),
        };
        allowed.then_some((record, cached)).ok_or_else(access_denied)
    }
}

/// The bucket record the access check read, handed to the operation (in the request's
/// extensions) so it is not read again.
#[derive(Clone)]
struct CheckedBucket {
    record: BucketRecord,
    /// Read from the gateway's request cache rather than a metadata quorum just now.
    cached: bool,
}

fn request_key_id(credentials: &Option<s3s::auth::Credentials>) -> S3Result<String> {
    credentials
        .as_ref()
        .map(|credentials| credentials.access_key.clone())
        .ok_or_else(access_denied)
}

/// Resolves SigV4 access keys against the cluster's access key table.
pub struct ClusterAuth<E: Env> {
    cluster: Arc<ClusterNode<E>>,
}

#[async_trait::async_trait]
impl<E: Env> s3s::auth::S3Auth for ClusterAuth<E> {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<s3s::auth::SecretKey> {
        match self.cluster.access_key_for_request(access_key).await {
            Ok(Some(record)) => Ok(s3s::auth::SecretKey::from(record.secret_key)),
            Ok(None) => Err(s3_error!(InvalidAccessKeyId, "unknown access key")),
            Err(error) => Err(s3_error_of(error)),
        }
    }
}

async fn internal_error(error: s3s::HttpError) -> http::Response<s3s::Body> {
    tracing::error!(?error, "S3 request failed inside the gateway");
    let mut response = http::Response::new(s3s::Body::from("internal error".to_string()));
    *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
    response
}

/// Binds the S3 listener and serves in the background; returns the bound address.
pub async fn serve<E: Env>(
    listen: SocketAddr,
    region: String,
    cluster: Arc<ClusterNode<E>>,
    observer: Arc<super::metrics::S3Observer>,
) -> Result<SocketAddr, String> {
    let mut builder = S3ServiceBuilder::new(Gateway::new(Arc::clone(&cluster), region));
    builder.set_auth(ClusterAuth {
        cluster: Arc::clone(&cluster),
    });
    builder.set_access(ClusterAccess { cluster });
    let service = builder.build();
    let requests = Arc::new(tokio::sync::Semaphore::new(S3_REQUESTS_IN_FLIGHT_MAX));
    let app = axum::Router::new()
        .fallback_service(HandleError::new(service, internal_error))
        .layer(axum::middleware::from_fn_with_state(
            observer,
            super::metrics::observe_s3,
        ))
        .layer(axum::middleware::from_fn(bound_body_idleness))
        .layer(axum::middleware::from_fn_with_state(requests, limit_requests));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| format!("cannot listen on {listen}: {error}"))?;
    let address = listener.local_addr().map_err(|error| error.to_string())?;
    tokio::spawn(accept_loop(listener, app));
    Ok(address)
}

/// Serves connections with the limits `axum::serve` does not set: a bound on open
/// connections, a deadline for the request head and a bound on its size.
async fn accept_loop(listener: tokio::net::TcpListener, app: axum::Router) {
    let connections = Arc::new(tokio::sync::Semaphore::new(S3_CONNECTIONS_MAX));
    loop {
        let Ok(permit) = Arc::clone(&connections).acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                // A response is a head and then body chunks: with Nagle's algorithm a small
                // body waits for the client's delayed ACK of the head (~25 ms per GET).
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::debug!(%error, "cannot set TCP_NODELAY on an S3 connection");
                }
                stream
            }
            Err(error) => {
                // Out of file descriptors and the like: wait rather than spin.
                tracing::warn!(%error, "S3 listener cannot accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_millis(S3_HEADER_READ_TIMEOUT_MS))
                .max_buf_size(S3_HEAD_BYTES_MAX);
            let io = hyper_util::rt::TokioIo::new(WriteDeadlineStream {
                inner: stream,
                stalled: None,
            });
            if let Err(error) = builder.serve_connection(io, service).await {
                tracing::debug!(%error, "S3 connection ended with an error");
            }
            drop(permit);
        });
    }
}

/// A connection whose writes must make progress: a client that stops reading its response
/// (a zero TCP window, which the kernel never times out) would otherwise hold its request
/// slot, and with enough of them every slot, forever.
struct WriteDeadlineStream {
    inner: tokio::net::TcpStream,
    /// Started when a write could not proceed; cleared by any progress.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteDeadlineStream {
    /// Passes a write's result through, or fails it once writes stalled too long.
    fn bounded<T>(
        &mut self,
        context: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
    ) -> std::task::Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(S3_WRITE_STALL_TIMEOUT_MS))));
        match stalled.as_mut().poll(context) {
            std::task::Poll::Ready(()) => std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {S3_WRITE_STALL_TIMEOUT_MS} ms"),
            ))),
            std::task::Poll::Pending => std::task::Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for WriteDeadlineStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(context, buffer)
    }
}

impl tokio::io::AsyncWrite for WriteDeadlineStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffer: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(context, buffer);
        self.bounded(context, polled)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buffers: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write_vectored(context, buffers);
        self.bounded(context, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_flush(context);
        self.bounded(context, polled)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(context)
    }
}

/// Answers 503 SlowDown when [`S3_REQUESTS_IN_FLIGHT_MAX`] requests are being served; the
/// permit lives until the response body's last byte (GET bodies stream after this returns).
async fn limit_requests(
    axum::extract::State(requests): axum::extract::State<Arc<tokio::sync::Semaphore>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Ok(permit) = requests.try_acquire_owned() else {
        let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown</Code>\
                    <Message>Please reduce your request rate.</Message></Error>";
        let mut response = axum::response::Response::new(axum::body::Body::from(body));
        *response.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/xml"),
        );
        return response;
    };
    let response = next.run(request).await;
    let (parts, body) = response.into_parts();
    let body = body.into_data_stream().map(move |chunk| {
        let _held_until_the_body_ends = &permit;
        chunk
    });
    axum::response::Response::from_parts(parts, axum::body::Body::from_stream(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks of "chunk" sent every `gap_ms`, `count` of them, then a stall for good.
    fn chunks_then_stall(
        count: u32,
        gap_ms: u64,
    ) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static {
        futures::stream::unfold(0u32, move |sent| async move {
            if sent == count {
                futures::future::pending::<()>().await;
            }
            tokio::time::sleep(Duration::from_millis(gap_ms)).await;
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"chunk")), sent + 1))
        })
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_with_a_timeout_and_a_slow_one_does_not() {
        // A chunk every half timeout, then a stall, under the wrapper every request
        // body gets, read the way the data path reads it.
        let idle_bounded = IdleTimeoutBody::new(axum::body::Body::from_stream(chunks_then_stall(
            3,
            S3_BODY_IDLE_TIMEOUT_MS / 2,
        )));
        let mut body = IoBody::new(
            StreamingBlob::wrap(sync_wrapper::SyncStream::new(
                axum::body::Body::new(idle_bounded).into_data_stream(),
            )),
            None,
        );
        for _ in 0..3 {
            assert_eq!(body.next().await.unwrap().unwrap(), Bytes::from_static(b"chunk"));
        }
        let started = tokio::time::Instant::now();
        let error = body.next().await.unwrap().unwrap_err();
        // TimedOut is what the data path turns into S3's RequestTimeout.
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_millis(S3_BODY_IDLE_TIMEOUT_MS));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reader_busy_longer_than_the_timeout_is_not_taken_for_a_stalled_client() {
        use http_body_util::BodyExt;
        let mut body = IdleTimeoutBody::new(axum::body::Body::from_stream(chunks_then_stall(2, 10)));
        assert!(body.frame().await.unwrap().is_ok());
        // The reader stores what came for twice the timeout; the client meanwhile sent on.
        tokio::time::sleep(Duration::from_millis(2 * S3_BODY_IDLE_TIMEOUT_MS)).await;
        assert!(body.frame().await.unwrap().is_ok());
        let started = tokio::time::Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(error.downcast_ref::<BodyIdleTimeout>().is_some(), "{error}");
        assert_eq!(started.elapsed(), Duration::from_millis(S3_BODY_IDLE_TIMEOUT_MS));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_xml_body_ends_its_request_through_the_router() {
        // What s3s sees for DeleteObjects: the body under the middleware fails once idle.
        use tower::ServiceExt;
        let app = axum::Router::new()
            .route(
                "/",
                axum::routing::post(|body: axum::body::Body| async move {
                    match axum::body::to_bytes(body, 1 << 20).await {
                        Ok(_) => "complete".to_string(),
                        Err(error) => format!("failed: {}", io_error_of_body(Box::new(error)).kind()),
                    }
                }),
            )
            .layer(axum::middleware::from_fn(bound_body_idleness));
        let request = http::Request::post("/")
            .body(axum::body::Body::from_stream(chunks_then_stall(1, 10)))
            .unwrap();
        let started = tokio::time::Instant::now();
        let response = app.oneshot(request).await.unwrap();
        let text = axum::body::to_bytes(response.into_body(), 1024).await.unwrap();
        assert_eq!(&text[..], b"failed: timed out");
        assert_eq!(started.elapsed(), Duration::from_millis(10 + S3_BODY_IDLE_TIMEOUT_MS));
    }

    #[tokio::test]
    async fn requests_beyond_the_bound_get_slow_down_until_a_streamed_body_ends() {
        use tower::ServiceExt;
        let requests = Arc::new(tokio::sync::Semaphore::new(1));
        let app = axum::Router::new()
            .route("/", axum::routing::get(|| async { "body" }))
            .layer(axum::middleware::from_fn_with_state(
                Arc::clone(&requests),
                limit_requests,
            ));
        let get = || http::Request::get("/").body(axum::body::Body::empty()).unwrap();
        let first = app.clone().oneshot(get()).await.unwrap();
        assert_eq!(first.status(), http::StatusCode::OK);
        // The first response's body has not been read: its permit is still held.
        let refused = app.clone().oneshot(get()).await.unwrap();
        assert_eq!(refused.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        let text = axum::body::to_bytes(refused.into_body(), 1024).await.unwrap();
        assert!(String::from_utf8_lossy(&text).contains("<Code>SlowDown</Code>"));
        let body = axum::body::to_bytes(first.into_body(), 1024).await.unwrap();
        assert_eq!(&body[..], b"body");
        let again = app.oneshot(get()).await.unwrap();
        assert_eq!(again.status(), http::StatusCode::OK);
    }
}
