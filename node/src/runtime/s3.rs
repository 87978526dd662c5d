//! The S3 gateway: the `s3s` crate (operations, XML, SigV4 including presigned URLs and
//! aws-chunked payloads) mounted in axum, backed by the cluster's data path.
//!
//! Implemented so far: ListBuckets, CreateBucket, HeadBucket, DeleteBucket,
//! GetBucketLocation, PutObject, GetObject (Range, If-Match, If-None-Match), HeadObject,
//! DeleteObject, ListObjects (v1) and ListObjectsV2 (prefix, delimiter, pagination,
//! start-after), and multipart uploads (create, upload part, complete, abort, list parts). Anonymous requests are refused: s3s denies unsigned requests once an
//! auth provider is set, and ours knows only keys from the cluster's access key table.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::error_handling::HandleError;
use bdr_protocol::records::{BucketRecord, ObjectVersionRecord};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use s3s::dto::{self, ETag, ETagCondition, StreamingBlob, Timestamp};
use s3s::service::S3ServiceBuilder;
use s3s::{s3_error, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, S3};

use crate::cluster::data::{DataError, ObjectWrite};
use crate::cluster::ClusterNode;
use crate::env::Env;

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

fn s3_error_of(error: DataError) -> S3Error {
    let code = match &error {
        DataError::NoSuchBucket(_) => S3ErrorCode::NoSuchBucket,
        DataError::NoSuchKey => S3ErrorCode::NoSuchKey,
        DataError::BucketExists(_) => S3ErrorCode::BucketAlreadyOwnedByYou,
        DataError::InvalidBucketName(_) => S3ErrorCode::InvalidBucketName,
        DataError::InvalidKey(_) => S3ErrorCode::KeyTooLongError,
        DataError::InvalidBucketOptions => S3ErrorCode::InvalidArgument,
        DataError::InvalidRange { .. } => S3ErrorCode::InvalidRange,
        DataError::Body(_) => S3ErrorCode::IncompleteBody,
        DataError::NoSuchUpload => S3ErrorCode::NoSuchUpload,
        DataError::InvalidPart(_) => S3ErrorCode::InvalidPart,
        DataError::InvalidPartOrder => S3ErrorCode::InvalidPartOrder,
        DataError::EntityTooSmall { .. } => S3ErrorCode::EntityTooSmall,
        DataError::NoDataKeys | DataError::NotDurable(_) | DataError::Meta(_) => S3ErrorCode::ServiceUnavailable,
        DataError::StripeUnreadable { .. } | DataError::Corrupt(_) => S3ErrorCode::InternalError,
    };
    let mut s3_error = S3Error::with_message(code, error.to_string());
    if matches!(
        error,
        DataError::NoDataKeys | DataError::NotDurable(_) | DataError::Meta(_)
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

    /// The current record of an object; a miss says whether the bucket or the key is
    /// missing (the bucket is looked up only on the miss path, not on every read).
    async fn object_record(&self, bucket: &str, key: &str) -> S3Result<ObjectVersionRecord> {
        match self.cluster.head_object(bucket, key).await {
            Ok(record) => Ok(record),
            Err(DataError::NoSuchKey) => {
                self.existing_bucket(bucket).await?;
                Err(s3_error!(NoSuchKey, "no such key"))
            }
            Err(error) => Err(s3_error_of(error)),
        }
    }

    async fn existing_bucket(&self, name: &str) -> S3Result<BucketRecord> {
        self.cluster
            .bucket(name)
            .await
            .map_err(s3_error_of)?
            .ok_or_else(|| s3_error!(NoSuchBucket, "no such bucket: {name}"))
    }

    /// Lists `max_keys` entries after `after`, folding keys into common prefixes at
    /// `delimiter`.
    async fn list_page(
        &self,
        bucket: &str,
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
                .list_objects(bucket, prefix, after.as_deref(), LIST_KEYS_MAX as u32)
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

/// An S3 request body as a stream of io results (what `into_async_read` wants). A named
/// type rather than a `map_err` closure: closures here trip a higher-ranked lifetime
/// limitation of the compiler inside `async_trait` methods.
struct IoBody(StreamingBlob);

impl futures::Stream for IoBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0
            .poll_next_unpin(context)
            .map(|item| item.map(|chunk| chunk.map_err(|error| std::io::Error::other(error.to_string()))))
    }
}

/// What a PutObject or CreateMultipartUpload asks to store besides the bytes.
fn object_write(
    bucket: String,
    key: String,
    content_type: Option<String>,
    metadata: Option<dto::Metadata>,
) -> ObjectWrite {
    ObjectWrite {
        bucket,
        key,
        content_type,
        user_metadata: metadata
            .map(|metadata| metadata.into_iter().collect())
            .unwrap_or_default(),
    }
}

fn common_prefix_entries(prefixes: Vec<String>) -> Option<Vec<dto::CommonPrefix>> {
    Some(
        prefixes
            .into_iter()
            .map(|prefix| dto::CommonPrefix { prefix: Some(prefix) })
            .collect(),
    )
}

fn object_entry(record: &ObjectVersionRecord) -> dto::Object {
    dto::Object {
        key: Some(record.key.clone()),
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
        _request: S3Request<dto::ListBucketsInput>,
    ) -> S3Result<S3Response<dto::ListBucketsOutput>> {
        let buckets = self.cluster.list_buckets().await.map_err(s3_error_of)?;
        Ok(S3Response::new(dto::ListBucketsOutput {
            buckets: Some(
                buckets
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
        let owner = request
            .credentials
            .as_ref()
            .map(|credentials| credentials.access_key.clone())
            .unwrap_or_default();
        self.cluster
            .create_bucket(&request.input.bucket, &owner)
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
        self.existing_bucket(&request.input.bucket).await?;
        Ok(S3Response::new(dto::HeadBucketOutput {
            bucket_region: Some(self.region.clone()),
            ..Default::default()
        }))
    }

    async fn get_bucket_location(
        &self,
        request: S3Request<dto::GetBucketLocationInput>,
    ) -> S3Result<S3Response<dto::GetBucketLocationOutput>> {
        self.existing_bucket(&request.input.bucket).await?;
        Ok(S3Response::new(dto::GetBucketLocationOutput {
            location_constraint: Some(dto::BucketLocationConstraint::from(self.region.clone())),
        }))
    }

    async fn delete_bucket(
        &self,
        request: S3Request<dto::DeleteBucketInput>,
    ) -> S3Result<S3Response<dto::DeleteBucketOutput>> {
        let bucket = &request.input.bucket;
        self.existing_bucket(bucket).await?;
        let page = self.list_page(bucket, "", None, None, 1).await?;
        if !page.objects.is_empty() {
            return Err(s3_error!(BucketNotEmpty, "bucket {bucket} is not empty"));
        }
        self.cluster.delete_bucket(bucket).await.map_err(s3_error_of)?;
        Ok(S3Response::new(dto::DeleteBucketOutput::default()))
    }

    async fn put_object(&self, request: S3Request<dto::PutObjectInput>) -> S3Result<S3Response<dto::PutObjectOutput>> {
        let input = request.input;
        let body = input
            .body
            .ok_or_else(|| s3_error!(IncompleteBody, "a PUT needs a body"))?;
        self.existing_bucket(&input.bucket).await?;
        // Errors inside the stream (client gone, bad chunk signature, payload hash
        // mismatch at the end) fail the whole put: no manifest is committed.
        let reader = IoBody(body).into_async_read();
        let write = object_write(input.bucket, input.key, input.content_type, input.metadata);
        let record = self.cluster.put_object(write, reader).await.map_err(s3_error_of)?;
        Ok(S3Response::new(dto::PutObjectOutput {
            e_tag: Some(etag_of(&record)),
            ..Default::default()
        }))
    }

    async fn head_object(
        &self,
        request: S3Request<dto::HeadObjectInput>,
    ) -> S3Result<S3Response<dto::HeadObjectOutput>> {
        let input = request.input;
        let record = self.object_record(&input.bucket, &input.key).await?;
        Ok(S3Response::new(dto::HeadObjectOutput {
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
        let record = self.object_record(&input.bucket, &input.key).await?;
        let etag = etag_of(&record);
        if let Some(condition) = &input.if_match {
            if !condition_matches(condition, &etag) {
                return Err(s3_error!(PreconditionFailed, "If-Match does not match"));
            }
        }
        if let Some(condition) = &input.if_none_match {
            if condition_matches(condition, &etag) {
                return Err(S3Error::new(S3ErrorCode::NotModified));
            }
        }
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
        let output = dto::GetObjectOutput {
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
        let input = request.input;
        self.existing_bucket(&input.bucket).await?;
        self.cluster
            .delete_object(&input.bucket, &input.key)
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::DeleteObjectOutput::default()))
    }

    async fn list_objects_v2(
        &self,
        request: S3Request<dto::ListObjectsV2Input>,
    ) -> S3Result<S3Response<dto::ListObjectsV2Output>> {
        let input = request.input;
        self.existing_bucket(&input.bucket).await?;
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
            .list_page(
                &input.bucket,
                &prefix,
                input.delimiter.as_deref(),
                after,
                max_keys as usize,
            )
            .await?;
        let key_count = (page.objects.len() + page.common_prefixes.len()) as i32;
        Ok(S3Response::new(dto::ListObjectsV2Output {
            name: Some(input.bucket),
            prefix: input.prefix,
            delimiter: input.delimiter,
            max_keys: Some(max_keys),
            key_count: Some(key_count),
            is_truncated: Some(page.next_after.is_some()),
            next_continuation_token: page.next_after.map(hex::encode),
            continuation_token: input.continuation_token,
            start_after: input.start_after,
            encoding_type: input.encoding_type,
            contents: Some(page.objects.iter().map(object_entry).collect()),
            common_prefixes: common_prefix_entries(page.common_prefixes),
            ..Default::default()
        }))
    }

    async fn create_multipart_upload(
        &self,
        request: S3Request<dto::CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<dto::CreateMultipartUploadOutput>> {
        let input = request.input;
        let write = object_write(
            input.bucket.clone(),
            input.key.clone(),
            input.content_type,
            input.metadata,
        );
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
        let input = request.input;
        let body = input
            .body
            .ok_or_else(|| s3_error!(IncompleteBody, "a part needs a body"))?;
        let part_number =
            u32::try_from(input.part_number).map_err(|_| s3_error!(InvalidArgument, "bad part number"))?;
        let part = self
            .cluster
            .upload_part(
                &input.bucket,
                &input.key,
                &input.upload_id,
                part_number,
                IoBody(body).into_async_read(),
            )
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::UploadPartOutput {
            e_tag: Some(ETag::Strong(part.etag.trim_matches('"').to_string())),
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
            .complete_multipart_upload(&input.bucket, &input.key, &input.upload_id, &listed)
            .await
            .map_err(s3_error_of)?;
        Ok(S3Response::new(dto::CompleteMultipartUploadOutput {
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
                        e_tag: Some(ETag::Strong(part.etag.trim_matches('"').to_string())),
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
        self.existing_bucket(&input.bucket).await?;
        let prefix = input.prefix.clone().unwrap_or_default();
        let max_keys = input.max_keys.unwrap_or(LIST_KEYS_MAX).clamp(0, LIST_KEYS_MAX);
        let after = input.marker.clone().filter(|marker| !marker.is_empty());
        let page = self
            .list_page(
                &input.bucket,
                &prefix,
                input.delimiter.as_deref(),
                after,
                max_keys as usize,
            )
            .await?;
        let truncated = page.next_after.is_some();
        let next_marker = truncated
            .then(|| page.next_after.clone())
            .flatten()
            .filter(|_| input.delimiter.is_some());
        Ok(S3Response::new(dto::ListObjectsOutput {
            name: Some(input.bucket),
            prefix: input.prefix,
            marker: input.marker,
            delimiter: input.delimiter,
            max_keys: Some(max_keys),
            is_truncated: Some(truncated),
            next_marker,
            encoding_type: input.encoding_type,
            contents: Some(page.objects.iter().map(object_entry).collect()),
            common_prefixes: common_prefix_entries(page.common_prefixes),
            ..Default::default()
        }))
    }
}

/// Resolves SigV4 access keys against the cluster's access key table.
pub struct ClusterAuth<E: Env> {
    cluster: Arc<ClusterNode<E>>,
}

#[async_trait::async_trait]
impl<E: Env> s3s::auth::S3Auth for ClusterAuth<E> {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<s3s::auth::SecretKey> {
        match self.cluster.access_key(access_key).await {
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
    builder.set_auth(ClusterAuth { cluster });
    let service = builder.build();
    let app = axum::Router::new()
        .fallback_service(HandleError::new(service, internal_error))
        .layer(axum::middleware::from_fn_with_state(
            observer,
            super::metrics::observe_s3,
        ));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|error| format!("cannot listen on {listen}: {error}"))?;
    let address = listener.local_addr().map_err(|error| error.to_string())?;
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "S3 gateway stopped");
        }
    });
    Ok(address)
}
