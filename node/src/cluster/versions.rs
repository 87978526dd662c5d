//! Object versions, delete markers and Object Lock.
//!
//! Every version of a key is a row `bucket / key NUL version_id`. Versions written while
//! versioning is enabled get ids from their stamps ([`version_id_of`]) that sort newest
//! first; versions written while it is off or suspended share the id "null" (one row per
//! bucket generation, overwritten), which sorts after every other id. A version's `version_stamp` orders
//! it among the others: the current version of a key is the greater-stamped of its
//! newest versioned row and its "null" row. A writer takes its stamp above every version
//! it saw (as `meta_put` does for single rows), so a version written after another was
//! acknowledged is always the newer one, whatever the two gateways' clocks say.
//!
//! Deleting without a version id writes a delete marker (a version with no data) when
//! versioning is on, and a tombstone on the "null" row when it is off. Deleting a version
//! by id writes its row's tombstone; Object Lock refuses that while the version is under
//! retention or legal hold. Versions are never overwritten while versioning is enabled,
//! and a bucket with Object Lock cannot suspend versioning, so a locked version is
//! neither deleted nor overwritten by anyone until its retention ends.
//!
//! Rows are keyed by bucket name, and a bucket may be deleted and created again (by
//! someone else) while a write to the old one is still in flight. Every version records
//! the generation (`created_at_ms`) of the bucket it was written in, and everything here
//! that serves a bucket's versions skips those of another generation: they are garbage
//! that the maintainers collect, never objects of the new bucket. No row is shared across
//! generations (the "null" row's address carries the generation), so a late write to a
//! deleted bucket never replaces a version of the new one, whatever its stamp.

use std::sync::Arc;

use bdr_protocol::hlc::HlcTimestamp;
use bdr_protocol::records::{
    version_id_of, BucketRecord, DefaultRetention, DeletionMark, LockChanges, Lww, ObjectData, ObjectLock,
    ObjectVersionRecord, Record, Retention, RetentionMode, StandardHeaders, VersioningState, DELETION_MARK_DEADLINE_MS,
};
use bdr_protocol::wire::Table;

use super::data::{
    bucket_row, is_row_of, marker_sort_key, object_row, object_row_of, split_marker_sort_key, validate_key,
    version_id_of_row, DataError, ObjectListing, COMMIT_DELETION_POLL_MS, COMMIT_DELETION_WAIT_MS, NULL_VERSION,
};
use super::metadata::{ReplicasRead, LAYOUT_MISMATCH_RETRIES_MAX, METADATA_TIMEOUT_MS};
use super::ClusterNode;
use crate::env::Env;
use bdr_protocol::records::RowKey;

/// Rows read per page while looking for a key's newest live version (deleted versions'
/// tombstones are skipped until they are purged).
pub const VERSION_SCAN_ROWS: u32 = 8;
/// Rows read per page while checking whether a bucket holds any version.
pub const EMPTINESS_SCAN_ROWS: u32 = 1_000;
/// Longest default retention a bucket may set (S3 allows 100 years).
pub const DEFAULT_RETENTION_DAYS_MAX: u32 = 36_500;
const DAY_MS: u64 = 86_400_000;

/// Where a new version of a key goes: its id and its stamp.
#[derive(Debug, Clone)]
pub(crate) struct VersionSlot {
    pub version_id: String,
    pub stamp: HlcTimestamp,
}

/// What a delete did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeleteOutcome {
    /// The version deleted or the delete marker written; None in an unversioned bucket.
    pub version_id: Option<String>,
    /// A delete marker was written, or the version deleted by id was one.
    pub delete_marker: bool,
}

/// One listed version (or delete marker).
#[derive(Debug, Clone)]
pub struct ListedVersion {
    pub record: ObjectVersionRecord,
    pub is_latest: bool,
}

/// One page of ListObjectVersions rows.
pub struct VersionListing {
    /// Keys in order; a key's versioned rows newest first, then its "null" version.
    pub versions: Vec<ListedVersion>,
    /// The (key, version id) of the last row scanned, when the scan was cut at its limit.
    pub next_after: Option<(String, String)>,
}

/// What PutObjectRetention and PutObjectLegalHold change.
#[derive(Debug, Clone, Copy)]
pub enum LockChange {
    Retention(Option<Retention>),
    LegalHold(bool),
}

/// How long a lock change that finds a live [`DeletionMark`] waits for its delete at
/// most: the delete's deadline, then as long as its tombstone's replica writes may take
/// (each try bounded by the metadata timeout, retried once after a layout change), and
/// a margin for the last of them to be applied.
pub const DELETION_MARK_WAIT_MS: u64 = DELETION_MARK_DEADLINE_MS
    + (LAYOUT_MISMATCH_RETRIES_MAX as u64 + 1) * METADATA_TIMEOUT_MS
    + DELETION_MARK_LANDING_MARGIN_MS;
const DELETION_MARK_LANDING_MARGIN_MS: u64 = 5_000;
/// How often a lock change waiting for a delete reads the version again.
pub const DELETION_MARK_POLL_MS: u64 = 100;

/// A version id is "null" or one of ours (40 lowercase hex digits).
pub fn validate_version_id(version_id: &str) -> Result<(), DataError> {
    let ours = version_id.len() == 40 && version_id.bytes().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f'));
    if version_id == NULL_VERSION || ours {
        return Ok(());
    }
    Err(DataError::InvalidVersionId(version_id.to_string()))
}

fn object_of(register: Option<&Lww<Record>>) -> Option<&ObjectVersionRecord> {
    match register.and_then(|register| register.value.as_ref()) {
        Some(Record::ObjectVersion(record)) => Some(record),
        _ => None,
    }
}

/// The version in `register` if it is one of `bucket`'s (not left by an earlier bucket of
/// the same name).
fn bucket_object_of<'a>(register: Option<&'a Lww<Record>>, bucket: &BucketRecord) -> Option<&'a ObjectVersionRecord> {
    object_of(register).filter(|record| record.belongs_to(bucket))
}

/// [`bucket_object_of`] with its register's timestamp, which lock changes and deletion
/// marks are written at.
fn bucket_version_at<'a>(
    register: Option<&'a Lww<Record>>,
    bucket: &BucketRecord,
) -> Option<(HlcTimestamp, &'a ObjectVersionRecord)> {
    let record = bucket_object_of(register, bucket)?;
    Some((register?.timestamp, record))
}

/// The greater-stamped of two candidates for a key's current version.
fn newer(a: Option<ObjectVersionRecord>, b: Option<ObjectVersionRecord>) -> Option<ObjectVersionRecord> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if a.version_stamp > b.version_stamp { a } else { b }),
        (a, b) => a.or(b),
    }
}

/// The key of an object row's sort key (`key NUL version`).
fn key_of_sort_key(sort_key: &[u8]) -> Option<&[u8]> {
    sort_key.split(|byte| *byte == 0).next()
}

/// The version a scanned row holds if it is one of `bucket`'s, in its own row.
fn bucket_object_in_row<'a>(
    row: &RowKey,
    register: &'a Lww<Record>,
    bucket: &BucketRecord,
) -> Option<&'a ObjectVersionRecord> {
    bucket_object_of(Some(register), bucket).filter(|record| is_row_of(&row.sort_key, record))
}

/// The live versions (and delete markers) of `bucket` among scanned rows, grouped by key
/// in key order.
fn group_by_key(rows: Vec<(RowKey, Lww<Record>)>, bucket: &BucketRecord) -> Vec<(String, Vec<ObjectVersionRecord>)> {
    let mut groups: Vec<(String, Vec<ObjectVersionRecord>)> = Vec::new();
    for (row, register) in &rows {
        let Some(record) = bucket_object_in_row(row, register, bucket) else {
            continue;
        };
        let record = record.clone();
        match groups.last_mut() {
            Some((key, group)) if *key == record.key => group.push(record),
            _ => groups.push((record.key.clone(), vec![record])),
        }
    }
    groups
}

/// The current version among one key's rows as scanned (newest versioned row first,
/// "null" last): the first live versioned row against the "null" row.
fn current_in_group(group: &[ObjectVersionRecord]) -> Option<ObjectVersionRecord> {
    let newest_versioned = group.iter().find(|record| record.version_id != NULL_VERSION).cloned();
    let null = group.iter().find(|record| record.version_id == NULL_VERSION).cloned();
    newer(newest_versioned, null)
}

impl<E: Env> ClusterNode<E> {
    /// The newest live version of `key` other than "null", skipping deleted versions and
    /// those of earlier buckets of the name.
    async fn newest_versioned(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        key: &str,
    ) -> Result<Option<ObjectVersionRecord>, DataError> {
        let mut sort_prefix = key.as_bytes().to_vec();
        sort_prefix.push(0);
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .meta_scan(
                    Table::Objects,
                    bucket.name.as_bytes(),
                    &sort_prefix,
                    after.as_deref(),
                    VERSION_SCAN_ROWS,
                )
                .await?;
            if let Some(record) = page
                .iter()
                .filter_map(|(row, register)| bucket_object_in_row(row, register, bucket))
                .find(|record| record.version_id != NULL_VERSION)
            {
                return Ok(Some(record.clone()));
            }
            match page.last() {
                Some((row, _)) if page.len() == VERSION_SCAN_ROWS as usize => after = Some(row.sort_key.clone()),
                _ => return Ok(None),
            }
        }
    }

    /// This generation's "null" row's register (live, delete marker or tombstone) and the
    /// newest versioned record of `key` in this bucket.
    /// Only the "null" row can exist in a bucket that never had versioning, so that is all
    /// it reads.
    async fn version_heads(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        key: &str,
    ) -> Result<(Option<Lww<Record>>, Option<ObjectVersionRecord>), DataError> {
        let null_row = object_row(&bucket.name, bucket.created_at_ms, key, NULL_VERSION);
        if bucket.versioning == VersioningState::Unversioned {
            return Ok((self.meta_get(Table::Objects, &null_row).await?, None));
        }
        let (null, newest) = futures::join!(
            self.meta_get(Table::Objects, &null_row),
            self.newest_versioned(bucket, key)
        );
        Ok((null?, newest?))
    }

    /// The current version of `key` (possibly a delete marker), or None.
    pub async fn current_version(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        key: &str,
    ) -> Result<Option<ObjectVersionRecord>, DataError> {
        let (null, newest) = self.version_heads(bucket, key).await?;
        Ok(newer(bucket_object_of(null.as_ref(), bucket).cloned(), newest))
    }

    /// A version by id, or the current version (possibly a delete marker).
    pub async fn object_version(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<ObjectVersionRecord, DataError> {
        validate_key(key)?;
        let Some(version_id) = version_id else {
            return self.current_version(bucket, key).await?.ok_or(DataError::NoSuchKey);
        };
        validate_version_id(version_id)?;
        let register = self
            .meta_get(
                Table::Objects,
                &object_row(&bucket.name, bucket.created_at_ms, key, version_id),
            )
            .await?;
        bucket_object_of(register.as_ref(), bucket)
            .cloned()
            .ok_or(DataError::NoSuchVersion)
    }

    /// Where the next version of `key` goes: a fresh id when versioning is enabled, the
    /// "null" row otherwise (refused while the "null" version is locked); stamped above
    /// every version seen, and above the "null" row's register (even a tombstone), so the
    /// write wins over everything acknowledged before it.
    pub(crate) async fn version_slot(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        key: &str,
    ) -> Result<VersionSlot, DataError> {
        let (null, newest) = self.version_heads(bucket, key).await?;
        let null_record = object_of(null.as_ref());
        let floor = [
            newest.as_ref().map(|record| record.version_stamp),
            null.as_ref().map(|register| register.timestamp),
            null_record.map(|record| record.version_stamp),
        ]
        .into_iter()
        .max()
        .flatten();
        let versioned = bucket.versioning == VersioningState::Enabled;
        // Only this generation's version is in the row; the check is a second guard.
        if let Some(null_record) = null_record.filter(|record| !versioned && record.belongs_to(bucket)) {
            if null_record.lock.forbids_delete(self.env.now_ms(), false) {
                return Err(DataError::ObjectLocked(format!(
                    "the null version of {key:?} is locked and cannot be overwritten"
                )));
            }
        }
        let stamp = self.stamp_after(floor.unwrap_or(HlcTimestamp::ZERO));
        let version_id = match versioned {
            true => version_id_of(&stamp),
            false => NULL_VERSION.to_string(),
        };
        Ok(VersionSlot { version_id, stamp })
    }

    /// Commits a version to its row, stamped with its version stamp, and answers whether
    /// its bucket is still the one the write began in: a write that took long (a large
    /// body) may have outlived its bucket, and one of the same name created since must
    /// not be told its object was stored (readers and garbage collection compare
    /// generations too, so such a version is never served and is collected). A bucket
    /// being deleted is waited for, up to [`COMMIT_DELETION_WAIT_MS`].
    pub(crate) async fn commit_version(self: &Arc<Self>, record: &ObjectVersionRecord) -> Result<(), DataError> {
        // Written first, then the bucket read: see `ClusterNode::delete_bucket` for why
        // this order means a bucket never goes from under an acknowledged version. A
        // version written into a bucket that went is collected by maintenance.
        self.write_version(record).await?;
        let waited_from_ms = self.env.now_ms();
        loop {
            let (bucket, deleting) = futures::future::join(
                self.bucket(&record.bucket),
                self.bucket_deletion_in_progress(&record.bucket, record.bucket_created_at_ms),
            )
            .await;
            let still_there = bucket?.is_some_and(|bucket| bucket.created_at_ms == record.bucket_created_at_ms);
            if !still_there {
                return Err(DataError::NoSuchBucket(record.bucket.clone()));
            }
            if !deleting? {
                return Ok(());
            }
            if self.env.now_ms().saturating_sub(waited_from_ms) >= COMMIT_DELETION_WAIT_MS {
                return Err(DataError::BucketBeingDeleted(record.bucket.clone()));
            }
            self.env.sleep(COMMIT_DELETION_POLL_MS).await;
        }
    }

    /// Writes a version to its row, stamped with its version stamp, unchecked.
    pub(crate) async fn write_version(self: &Arc<Self>, record: &ObjectVersionRecord) -> Result<(), DataError> {
        let register = Lww::new(record.version_stamp, Record::ObjectVersion(record.clone()));
        self.meta_write_register(Table::Objects, &object_row_of(record), &register)
            .await?;
        Ok(())
    }

    /// The lock a new version gets: what the request asked for (only in a bucket with
    /// Object Lock, and only with a future date), with the bucket's default retention
    /// where it asked for none.
    pub(crate) fn lock_for_new_version(
        &self,
        bucket: &BucketRecord,
        requested: ObjectLock,
    ) -> Result<ObjectLock, DataError> {
        let now_ms = self.env.now_ms();
        if requested != ObjectLock::default() && !bucket.object_lock_enabled {
            return Err(DataError::InvalidLockRequest(format!(
                "bucket {:?} does not have Object Lock enabled",
                bucket.name
            )));
        }
        if let Some(retention) = requested.retention {
            if retention.retain_until_ms <= now_ms {
                return Err(DataError::InvalidLockRequest(
                    "the retain-until date must be in the future".into(),
                ));
            }
        }
        let default_retention = bucket
            .default_retention
            .filter(|_| bucket.object_lock_enabled)
            .map(|default| Retention {
                mode: default.mode,
                retain_until_ms: now_ms.saturating_add(u64::from(default.days).saturating_mul(DAY_MS)),
            });
        Ok(ObjectLock {
            retention: requested.retention.or(default_retention),
            legal_hold: requested.legal_hold,
        })
    }

    /// Deletes the current object (a delete marker when versioning is on, the "null"
    /// row's tombstone when it is off) or one version by id (refused while it is
    /// locked; GOVERNANCE retention yields to `bypass_governance`). Deleting a version
    /// that does not exist succeeds, as in S3.
    ///
    /// In a bucket with Object Lock, a delete by id first marks the version (see
    /// [`DeletionMark`]) and reads its lock again before writing the tombstone, so a
    /// lock placed meanwhile either stops the delete or learns it came too late.
    pub async fn delete_object_version(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        key: &str,
        version_id: Option<&str>,
        bypass_governance: bool,
    ) -> Result<DeleteOutcome, DataError> {
        validate_key(key)?;
        if let Some(version_id) = version_id {
            validate_version_id(version_id)?;
            let row = object_row(&bucket.name, bucket.created_at_ms, key, version_id);
            let deleted = |delete_marker| DeleteOutcome {
                version_id: Some(version_id.to_string()),
                delete_marker,
            };
            let register = self.meta_get(Table::Objects, &row).await?;
            // A version an earlier bucket of the name left behind (at a versioned id) is
            // not this bucket's: like a missing one, there is nothing to delete (garbage
            // collection takes it).
            let Some((timestamp, existing)) = bucket_version_at(register.as_ref(), bucket) else {
                return Ok(deleted(false));
            };
            if existing.lock.forbids_delete(self.env.now_ms(), bypass_governance) {
                return Err(DataError::ObjectLocked(format!(
                    "version {version_id} of {key:?} is under retention or legal hold"
                )));
            }
            let delete_marker = existing.is_delete_marker();
            // Only a version in a bucket with Object Lock can be locked meanwhile (delete
            // markers never are).
            if bucket.object_lock_enabled && !delete_marker {
                self.delete_marked_version(bucket, &row, timestamp, existing, bypass_governance)
                    .await?;
                return Ok(deleted(false));
            }
            self.meta_put(Table::Objects, &row, None).await?;
            return Ok(deleted(delete_marker));
        }
        if bucket.versioning == VersioningState::Unversioned {
            self.meta_put(
                Table::Objects,
                &object_row(&bucket.name, bucket.created_at_ms, key, NULL_VERSION),
                None,
            )
            .await?;
            return Ok(DeleteOutcome {
                version_id: None,
                delete_marker: false,
            });
        }
        let slot = self.version_slot(bucket, key).await?;
        let marker = ObjectVersionRecord {
            bucket: bucket.name.clone(),
            key: key.to_string(),
            version_id: slot.version_id,
            version_stamp: slot.stamp,
            created_at_ms: self.env.now_ms(),
            size_bytes: 0,
            etag: String::new(),
            content_type: None,
            headers: StandardHeaders::default(),
            user_metadata: Default::default(),
            checksums: Default::default(),
            data: ObjectData::DeleteMarker,
            lock: ObjectLock::default(),
            bucket_created_at_ms: bucket.created_at_ms,
            lock_changes: LockChanges::at(slot.stamp),
        };
        self.commit_version(&marker).await?;
        Ok(DeleteOutcome {
            version_id: Some(marker.version_id),
            delete_marker: true,
        })
    }

    /// Deletes a version by id in a bucket with Object Lock: marks it, reads its lock
    /// again and writes the tombstone only if the version is still unlocked, is still the
    /// same version at the same register timestamp, still holds the mark, and the delete
    /// is within its deadline. Every other way out withdraws the mark (best effort), so
    /// lock changes need not wait it out; none does once the tombstone may have been sent.
    async fn delete_marked_version(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        row: &RowKey,
        timestamp: HlcTimestamp,
        existing: &ObjectVersionRecord,
        bypass_governance: bool,
    ) -> Result<(), DataError> {
        let name = format!("version {} of {:?}", existing.version_id, existing.key);
        let mut mark = DeletionMark {
            stamp: self.stamp_after(timestamp.max(existing.lock_changes.newest_stamp())),
            began_at_ms: self.env.now_ms(),
            withdrawn: false,
        };
        let mut marked = existing.clone();
        marked.lock_changes.add_deletion(mark);
        // A mark write that failed may still have reached a replica: it is withdrawn too.
        let marked = self
            .meta_write_register(Table::Objects, row, &Lww::new(timestamp, Record::ObjectVersion(marked)))
            .await;
        let read_again = match marked {
            Ok(()) => self.meta_get(Table::Objects, row).await,
            Err(error) => Err(error),
        };
        let refusal = match read_again {
            Err(error) => DataError::from(error),
            Ok(register) => {
                let Some((read_at, now_existing)) = bucket_version_at(register.as_ref(), bucket) else {
                    return Ok(());
                };
                let now_ms = self.env.now_ms();
                let same_version = read_at == timestamp && now_existing.version_stamp == existing.version_stamp;
                let mark_kept = now_existing
                    .lock_changes
                    .deletions
                    .iter()
                    .any(|kept| kept.stamp == mark.stamp);
                if now_existing.lock.forbids_delete(now_ms, bypass_governance) {
                    DataError::ObjectLocked(format!("{name} is under retention or legal hold"))
                } else if !same_version || !mark_kept {
                    // A lock change may not have seen this delete: newer deletes pushed
                    // its mark out, or the row holds another version now.
                    DataError::VersionBusy(format!("{name} changed while it was being deleted; retry"))
                } else if now_ms.saturating_sub(mark.began_at_ms) > DELETION_MARK_DEADLINE_MS {
                    // Lock changes that saw the mark wait for the tombstone only so long.
                    DataError::VersionBusy(format!(
                        "deleting {name} took longer than {DELETION_MARK_DEADLINE_MS} ms; retry"
                    ))
                } else {
                    // Written at once, stamped after what was just read.
                    let tombstone = Lww::tombstone(self.stamp_after(read_at));
                    self.meta_write_register(Table::Objects, row, &tombstone).await?;
                    return Ok(());
                }
            }
        };
        mark.withdrawn = true;
        let mut withdrawn = existing.clone();
        withdrawn.lock_changes.add_deletion(mark);
        // Should this write fail, lock changes wait for the mark to expire instead.
        let _ = self
            .meta_write_register(
                Table::Objects,
                row,
                &Lww::new(timestamp, Record::ObjectVersion(withdrawn)),
            )
            .await;
        Err(refusal)
    }

    /// Sets a version's retention or legal hold. Retention under COMPLIANCE can only be
    /// extended; under GOVERNANCE, shortening or removing it needs `bypass_governance`.
    ///
    /// The change keeps the version's register timestamp and stamps only its own field
    /// ([`LockChanges`]): a concurrent change of the other field stays, and a delete's
    /// tombstone always wins, so no change writes a deleted version back. Written, the
    /// lock is read again: a delete that marked the version meanwhile may not have seen
    /// it, so the change waits for that delete to finish or to run out of time, and
    /// answers NoSuchVersion if the version went.
    pub async fn change_object_lock(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        key: &str,
        version_id: Option<&str>,
        change: LockChange,
        bypass_governance: bool,
    ) -> Result<ObjectVersionRecord, DataError> {
        if !bucket.object_lock_enabled {
            return Err(DataError::InvalidLockRequest(format!(
                "bucket {:?} does not have Object Lock enabled",
                bucket.name
            )));
        }
        validate_key(key)?;
        // Only a version of this bucket is found, and the write keeps its generation.
        let version_id = match version_id {
            Some(version_id) => version_id.to_string(),
            None => self.object_version(bucket, key, None).await?.version_id,
        };
        validate_version_id(&version_id)?;
        let row = object_row(&bucket.name, bucket.created_at_ms, key, &version_id);
        let register = self.meta_get(Table::Objects, &row).await?;
        let Some((timestamp, record)) = bucket_version_at(register.as_ref(), bucket) else {
            return Err(DataError::NoSuchVersion);
        };
        let mut record = record.clone();
        if record.is_delete_marker() {
            return Err(DataError::InvalidLockRequest("a delete marker cannot be locked".into()));
        }
        let now_ms = self.env.now_ms();
        let stamp = self.stamp_after(timestamp.max(record.lock_changes.newest_stamp()));
        match change {
            LockChange::LegalHold(on) => {
                record.lock.legal_hold = on;
                record.lock_changes.legal_hold_stamp = stamp;
            }
            LockChange::Retention(wanted) => {
                if let Some(current) = record.lock.retention.filter(|current| current.retain_until_ms > now_ms) {
                    let weakens = match wanted {
                        None => true,
                        Some(wanted) => {
                            wanted.retain_until_ms < current.retain_until_ms
                                || (current.mode == RetentionMode::Compliance
                                    && wanted.mode == RetentionMode::Governance)
                        }
                    };
                    if weakens && (current.mode == RetentionMode::Compliance || !bypass_governance) {
                        return Err(DataError::ObjectLocked(format!(
                            "the {:?} retention of {key:?} can only be extended",
                            current.mode
                        )));
                    }
                }
                if wanted.is_some_and(|wanted| wanted.retain_until_ms <= now_ms) {
                    return Err(DataError::InvalidLockRequest(
                        "the retain-until date must be in the future".into(),
                    ));
                }
                record.lock.retention = wanted;
                record.lock_changes.retention_stamp = stamp;
            }
        }
        self.meta_write_register(
            Table::Objects,
            &row,
            &Lww::new(timestamp, Record::ObjectVersion(record)),
        )
        .await?;
        // Two changes of one setting race last-writer-wins: the one that lost learns it
        // here, unless it read before the other landed.
        let still_ours = |now_record: &ObjectVersionRecord| {
            let field_stamp = match change {
                LockChange::LegalHold(_) => now_record.lock_changes.legal_hold_stamp,
                LockChange::Retention(_) => now_record.lock_changes.retention_stamp,
            };
            match field_stamp == stamp {
                true => Ok(now_record.clone()),
                false => Err(DataError::VersionBusy(format!(
                    "a later change of the same setting of version {version_id} of {key:?} replaced this one"
                ))),
            }
        };
        // A delete that missed this change began before now, so it writes its tombstone
        // within DELETION_MARK_DEADLINE_MS of now or never; the wait allows as much again
        // for that write to land.
        let written_at_ms = self.env.now_ms();
        loop {
            let register = self.meta_get(Table::Objects, &row).await?;
            let Some(now_record) = bucket_object_of(register.as_ref(), bucket) else {
                return Err(DataError::NoSuchVersion);
            };
            let now_ms = self.env.now_ms();
            if !now_record.lock_changes.delete_may_be_in_progress(now_ms) {
                return still_ours(now_record);
            }
            if now_ms.saturating_sub(written_at_ms) > DELETION_MARK_WAIT_MS {
                // The delete is over, but its tombstone may have reached only some
                // replicas (its writer failed or crashed), and anti-entropy would spread
                // it: every replica must answer.
                let register = self
                    .meta_get_from(Table::Objects, &row, ReplicasRead::All)
                    .await
                    .map_err(|error| {
                        DataError::VersionBusy(format!(
                            "a delete of version {version_id} of {key:?} raced this change and not every \
                             replica can say whether it went ({error}); retry"
                        ))
                    })?;
                return match bucket_object_of(register.as_ref(), bucket) {
                    Some(now_record) => still_ours(now_record),
                    None => Err(DataError::NoSuchVersion),
                };
            }
            self.env.sleep(DELETION_MARK_POLL_MS).await;
        }
    }

    /// Turns versioning on or suspends it (a bucket never returns to unversioned, and one
    /// with Object Lock never suspends).
    pub async fn set_bucket_versioning(
        self: &Arc<Self>,
        name: &str,
        versioning: VersioningState,
    ) -> Result<BucketRecord, DataError> {
        let mut bucket = self.existing_bucket(name).await?;
        if versioning == VersioningState::Unversioned {
            return Err(DataError::InvalidBucketState(
                "versioning can be enabled or suspended, not turned off".into(),
            ));
        }
        if bucket.object_lock_enabled && versioning != VersioningState::Enabled {
            return Err(DataError::InvalidBucketState(
                "versioning cannot be suspended on a bucket with Object Lock".into(),
            ));
        }
        bucket.versioning = versioning;
        self.forget_cached_bucket(name);
        self.meta_put(Table::Buckets, &bucket_row(name), Some(Record::Bucket(bucket.clone())))
            .await?;
        self.forget_cached_bucket(name);
        Ok(bucket)
    }

    /// Enables Object Lock on a bucket (it must have versioning enabled) and sets its
    /// default retention. Object Lock, once on, stays on.
    pub async fn set_object_lock_configuration(
        self: &Arc<Self>,
        name: &str,
        default_retention: Option<DefaultRetention>,
    ) -> Result<BucketRecord, DataError> {
        let mut bucket = self.existing_bucket(name).await?;
        if !bucket.object_lock_enabled && bucket.versioning != VersioningState::Enabled {
            return Err(DataError::InvalidBucketState(
                "Object Lock needs versioning enabled on the bucket first".into(),
            ));
        }
        if let Some(default) = default_retention {
            if default.days == 0 || default.days > DEFAULT_RETENTION_DAYS_MAX {
                return Err(DataError::InvalidLockRequest(format!(
                    "default retention must be 1..={DEFAULT_RETENTION_DAYS_MAX} days"
                )));
            }
        }
        bucket.object_lock_enabled = true;
        bucket.default_retention = default_retention;
        self.forget_cached_bucket(name);
        self.meta_put(Table::Buckets, &bucket_row(name), Some(Record::Bucket(bucket.clone())))
            .await?;
        self.forget_cached_bucket(name);
        Ok(bucket)
    }

    /// Whether the bucket holds no version and no delete marker. Versions an earlier
    /// bucket of the name left behind do not count: they are garbage, not its objects.
    pub async fn bucket_is_empty(self: &Arc<Self>, bucket: &BucketRecord) -> Result<bool, DataError> {
        let mut after: Option<Vec<u8>> = None;
        loop {
            let page = self
                .meta_scan(
                    Table::Objects,
                    bucket.name.as_bytes(),
                    b"",
                    after.as_deref(),
                    EMPTINESS_SCAN_ROWS,
                )
                .await?;
            let holds_any = page.iter().any(|(row, register)| match &register.value {
                Some(Record::ObjectVersion(record)) => record.belongs_to(bucket) && is_row_of(&row.sort_key, record),
                // Not an object version: unexpected here, so it counts (never drop data).
                Some(_) => true,
                None => false,
            });
            if holds_any {
                return Ok(false);
            }
            match page.last() {
                Some((row, _)) if page.len() == EMPTINESS_SCAN_ROWS as usize => after = Some(row.sort_key.clone()),
                _ => return Ok(true),
            }
        }
    }

    /// Lists current objects (not delete markers) of a bucket in key order: up to
    /// `limit` rows scanned after the key `after`. Deleted objects and older versions
    /// count towards the page but are not returned.
    pub async fn list_current_objects(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<ObjectListing, DataError> {
        let after_sort_key = after.map(|key| marker_sort_key(key, None));
        let rows = self
            .meta_scan(
                Table::Objects,
                bucket.name.as_bytes(),
                prefix.as_bytes(),
                after_sort_key.as_deref(),
                limit,
            )
            .await?;
        let full_page = rows.len() as u32 >= limit;
        // (sort key, whether it is this bucket's "null" row) of the last row scanned.
        let last_row = rows.last().map(|(row, register)| {
            let own_null = bucket_object_in_row(row, register, bucket).is_some_and(|record| {
                record.version_id == NULL_VERSION && record.bucket_created_at_ms == bucket.created_at_ms
            });
            (row.sort_key.clone(), own_null)
        });
        let next_after = full_page
            .then_some(last_row.as_ref())
            .flatten()
            .and_then(|(sort_key, _)| key_of_sort_key(sort_key).map(<[u8]>::to_vec))
            .and_then(|key| String::from_utf8(key).ok());
        let groups = group_by_key(rows, bucket);
        // The last key of a cut page may have versions past the cut ("null" rows sort
        // last): its current version is read whole, unless the cut fell on this
        // generation's "null" row (only other generations' rows may follow it).
        let cut_mid_key = full_page && last_row.as_ref().is_some_and(|(_, own_null)| !own_null);
        // A cut inside a key is resolved by reading the key's current version directly,
        // even when the page held only tombstones of it (its live versions lie past the
        // cut, and the next page starts after the whole key).
        let cut_key = next_after.clone().filter(|_| cut_mid_key);
        let mut records = Vec::with_capacity(groups.len() + 1);
        for (key, group) in groups {
            if cut_key.as_deref() == Some(key.as_str()) {
                continue;
            }
            records.extend(current_in_group(&group).filter(|record| !record.is_delete_marker()));
        }
        if let Some(key) = cut_key {
            let current = self.current_version(bucket, &key).await?;
            records.extend(current.filter(|record| !record.is_delete_marker()));
        }
        Ok(ObjectListing { records, next_after })
    }

    /// Lists versions and delete markers of a bucket: keys in order, a key's versioned
    /// rows newest first and its "null" version after them; up to `limit` rows scanned
    /// strictly after the row `after` (a key, and a version id within it or none to
    /// start after all of the key's versions).
    pub async fn list_versions(
        self: &Arc<Self>,
        bucket: &BucketRecord,
        prefix: &str,
        after: Option<(&str, Option<&str>)>,
        limit: u32,
    ) -> Result<VersionListing, DataError> {
        // Every generation's "null" row sorts after the key's versioned rows: after "null"
        // is after the whole key.
        let after_sort_key = after
            .map(|(key, version_id)| marker_sort_key(key, version_id.filter(|version_id| *version_id != NULL_VERSION)));
        let rows = self
            .meta_scan(
                Table::Objects,
                bucket.name.as_bytes(),
                prefix.as_bytes(),
                after_sort_key.as_deref(),
                limit,
            )
            .await?;
        let full_page = rows.len() as u32 >= limit;
        let next_after = full_page
            .then(|| rows.last())
            .flatten()
            .and_then(|(row, _)| split_marker_sort_key(&row.sort_key))
            .map(|(key, row_id)| (key, version_id_of_row(&row_id).to_string()));
        let first_key_cut = after.is_some_and(|(_, version_id)| version_id.is_some());
        let groups = group_by_key(rows, bucket);
        let group_count = groups.len();
        let mut versions = Vec::new();
        for (position, (key, group)) in groups.into_iter().enumerate() {
            // A key whose versions the page does not hold whole (begun on an earlier
            // page, or going on past this one) has its current version read directly.
            let partial = (position == 0 && first_key_cut && after.is_some_and(|(after_key, _)| after_key == key))
                || (full_page && position + 1 == group_count);
            let current = match partial {
                true => self.current_version(bucket, &key).await?,
                false => current_in_group(&group),
            };
            let latest_id = current.map(|record| record.version_id);
            versions.extend(group.into_iter().map(|record| ListedVersion {
                is_latest: latest_id.as_deref() == Some(record.version_id.as_str()),
                record,
            }));
        }
        Ok(VersionListing { versions, next_after })
    }
}
