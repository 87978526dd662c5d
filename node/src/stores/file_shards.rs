//! Shards as files: one file per shard at a content-addressed path.
//!
//! ```text
//! <root>/shards/<first two hex digits of the stripe id>/<stripe id hex>.<index>
//! <root>/tmp/<stripe id hex>.<index>.<nonce>.tmp
//! <root>/quarantine/<stripe id hex>.<index>.<nonce>   (shards that failed verification)
//! ```
//!
//! A put writes a temporary file, fsyncs it, renames it into place and fsyncs the
//! directory, so a crash leaves either the whole shard or none of it visible; leftover
//! temporary files are removed on open. Every read verifies the shard's blake3 checksum; a
//! shard that fails is moved to the quarantine folder (kept for inspection, no longer
//! served or counted), so it reads as missing and the stripe's maintainer rebuilds it.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bdr_protocol::erasure::Shard;
use bdr_protocol::ids::StripeId;

use crate::env::{BoxFuture, ShardKey, ShardStore, StoreError, StoreUsage};

const SHARDS_DIRECTORY: &str = "shards";
const TEMPORARY_DIRECTORY: &str = "tmp";
const QUARANTINE_DIRECTORY: &str = "quarantine";

pub struct FileShardStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    capacity_bytes: u64,
    /// Bytes of committed shards plus reservations of puts in flight. Guarded by a mutex
    /// so that the capacity check and the reservation are one step.
    used_bytes: Mutex<u64>,
    shard_count: AtomicU64,
    corrupt_reads: AtomicU64,
    temporary_nonce: AtomicU64,
}

fn io_error(context: &str, path: &Path, error: std::io::Error) -> StoreError {
    if error.kind() == ErrorKind::StorageFull {
        return StoreError::DiskFull {
            needed_bytes: 0,
            available_bytes: 0,
        };
    }
    StoreError::Io(format!("{context} {}: {error}", path.display()))
}

fn sync_directory(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|directory| directory.sync_all())
        .map_err(|error| io_error("fsync directory", path, error))
}

fn parse_shard_file_name(name: &str) -> Option<ShardKey> {
    let (stripe, index) = name.split_once('.')?;
    Some(ShardKey {
        stripe_id: stripe.parse::<StripeId>().ok()?,
        index: index.parse().ok()?,
    })
}

impl FileShardStore {
    /// Opens (creating if needed) the store under `root`, removes leftovers of interrupted
    /// puts and counts what is stored.
    pub fn open(root: &Path, capacity_bytes: u64) -> Result<FileShardStore, StoreError> {
        let shards = root.join(SHARDS_DIRECTORY);
        let temporary = root.join(TEMPORARY_DIRECTORY);
        let quarantine = root.join(QUARANTINE_DIRECTORY);
        for directory in [&shards, &temporary, &quarantine] {
            fs::create_dir_all(directory).map_err(|error| io_error("create", directory, error))?;
        }
        for entry in fs::read_dir(&temporary).map_err(|error| io_error("list", &temporary, error))? {
            let path = entry.map_err(|error| io_error("list", &temporary, error))?.path();
            fs::remove_file(&path).map_err(|error| io_error("remove leftover", &path, error))?;
        }
        let inner = Inner {
            root: root.to_path_buf(),
            capacity_bytes,
            used_bytes: Mutex::new(0),
            shard_count: AtomicU64::new(0),
            corrupt_reads: AtomicU64::new(0),
            temporary_nonce: AtomicU64::new(0),
        };
        let (count, bytes) = inner.walk(|_, _| {})?;
        *inner.used_bytes.lock().expect("not poisoned") = bytes;
        inner.shard_count.store(count, Ordering::Relaxed);
        Ok(FileShardStore { inner: Arc::new(inner) })
    }

    /// Path of a committed shard (for tests and tools that inspect the disk).
    pub fn shard_path(&self, key: ShardKey) -> PathBuf {
        self.inner.shard_path(key)
    }
}

impl Inner {
    fn shard_path(&self, key: ShardKey) -> PathBuf {
        let stripe = key.stripe_id.to_string();
        self.root
            .join(SHARDS_DIRECTORY)
            .join(&stripe[..2])
            .join(format!("{stripe}.{}", key.index))
    }

    /// Visits every committed shard file; returns (count, total bytes).
    fn walk(&self, mut visit: impl FnMut(ShardKey, u64)) -> Result<(u64, u64), StoreError> {
        let shards = self.root.join(SHARDS_DIRECTORY);
        let (mut count, mut bytes) = (0u64, 0u64);
        for prefix in fs::read_dir(&shards).map_err(|error| io_error("list", &shards, error))? {
            let prefix = prefix.map_err(|error| io_error("list", &shards, error))?.path();
            if !prefix.is_dir() {
                continue;
            }
            for file in fs::read_dir(&prefix).map_err(|error| io_error("list", &prefix, error))? {
                let file = file.map_err(|error| io_error("list", &prefix, error))?;
                let Some(key) = file.file_name().to_str().and_then(parse_shard_file_name) else {
                    continue;
                };
                let length = file
                    .metadata()
                    .map_err(|error| io_error("stat", &file.path(), error))?
                    .len();
                count += 1;
                bytes += length;
                visit(key, length);
            }
        }
        Ok((count, bytes))
    }

    fn reserve(&self, length_bytes: u64) -> Result<(), StoreError> {
        let mut used = self.used_bytes.lock().expect("not poisoned");
        let available_bytes = self.capacity_bytes.saturating_sub(*used);
        if length_bytes > available_bytes {
            return Err(StoreError::DiskFull {
                needed_bytes: length_bytes,
                available_bytes,
            });
        }
        *used += length_bytes;
        Ok(())
    }

    fn release(&self, length_bytes: u64) {
        let mut used = self.used_bytes.lock().expect("not poisoned");
        *used = used.saturating_sub(length_bytes);
    }

    /// First half of a put: the shard's bytes in a fsynced temporary file.
    fn write_temporary(&self, key: ShardKey, bytes: &[u8]) -> Result<PathBuf, StoreError> {
        let nonce = self.temporary_nonce.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join(TEMPORARY_DIRECTORY).join(format!(
            "{}.{}.{}-{nonce}.tmp",
            key.stripe_id,
            key.index,
            std::process::id()
        ));
        let result = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut file| {
                file.write_all(bytes)?;
                file.sync_all()
            });
        if let Err(error) = result {
            let _ = fs::remove_file(&path);
            return Err(io_error("write", &path, error));
        }
        Ok(path)
    }

    /// Second half of a put: rename into place and make the rename durable.
    fn commit_temporary(&self, temporary: &Path, key: ShardKey) -> Result<Option<u64>, StoreError> {
        let destination = self.shard_path(key);
        let directory = destination.parent().expect("shard paths have a parent");
        fs::create_dir_all(directory).map_err(|error| io_error("create", directory, error))?;
        let replaced_length = fs::metadata(&destination).ok().map(|metadata| metadata.len());
        fs::rename(temporary, &destination).map_err(|error| io_error("rename", &destination, error))?;
        sync_directory(directory)?;
        Ok(replaced_length)
    }

    fn put(&self, shard: &Shard) -> Result<(), StoreError> {
        let key = ShardKey {
            stripe_id: shard.header().stripe_id,
            index: shard.header().index,
        };
        let bytes = shard.as_bytes();
        let length_bytes = bytes.len() as u64;
        self.reserve(length_bytes)?;
        let committed =
            self.write_temporary(key, bytes)
                .and_then(|temporary| match self.commit_temporary(&temporary, key) {
                    Ok(replaced) => Ok(replaced),
                    Err(error) => {
                        let _ = fs::remove_file(&temporary);
                        Err(error)
                    }
                });
        match committed {
            Ok(Some(replaced_length)) => self.release(replaced_length),
            Ok(None) => {
                self.shard_count.fetch_add(1, Ordering::Relaxed);
            }
            Err(error) => {
                self.release(length_bytes);
                return Err(error);
            }
        }
        Ok(())
    }

    fn get(&self, key: ShardKey) -> Result<Shard, StoreError> {
        let path = self.shard_path(key);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == ErrorKind::NotFound => return Err(StoreError::NotFound),
            Err(error) => return Err(io_error("read", &path, error)),
        };
        let length_bytes = bytes.len();
        let corrupt = |reason: String| {
            self.corrupt_reads.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(path = %path.display(), %reason, "corrupt shard quarantined");
            if let Err(error) = self.quarantine(key, length_bytes as u64) {
                tracing::error!(%error, "cannot quarantine a corrupt shard");
            }
            StoreError::Corrupt(format!("{}: {reason}", path.display()))
        };
        // The file's buffer becomes the shard's: no copy of the megabyte.
        let shard = Shard::from_vec(bytes).map_err(|error| corrupt(error.to_string()))?;
        if shard.header().stripe_id != key.stripe_id || shard.header().index != key.index {
            return Err(corrupt("file holds a different shard than its name says".into()));
        }
        Ok(shard)
    }

    /// Moves a shard that failed verification out of the store.
    fn quarantine(&self, key: ShardKey, length_bytes: u64) -> Result<(), StoreError> {
        let path = self.shard_path(key);
        let nonce = self.temporary_nonce.fetch_add(1, Ordering::Relaxed);
        let destination = self.root.join(QUARANTINE_DIRECTORY).join(format!(
            "{}.{}.{}-{nonce}",
            key.stripe_id,
            key.index,
            std::process::id()
        ));
        match fs::rename(&path, &destination) {
            Ok(()) => {}
            // Another reader quarantined it first.
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(()),
            Err(error) => return Err(io_error("quarantine", &path, error)),
        }
        sync_directory(path.parent().expect("shard paths have a parent"))?;
        self.release(length_bytes);
        self.shard_count.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    fn delete(&self, key: ShardKey) -> Result<bool, StoreError> {
        let path = self.shard_path(key);
        let length = match fs::metadata(&path) {
            Ok(metadata) => metadata.len(),
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(io_error("stat", &path, error)),
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(false),
            Err(error) => return Err(io_error("remove", &path, error)),
        }
        sync_directory(path.parent().expect("shard paths have a parent"))?;
        self.release(length);
        self.shard_count.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }
}

/// Runs blocking file work off the async threads.
fn blocking<T: Send + 'static>(
    inner: &Arc<Inner>,
    work: impl FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
) -> BoxFuture<'static, Result<T, StoreError>> {
    let inner = Arc::clone(inner);
    Box::pin(async move {
        tokio::task::spawn_blocking(move || work(&inner))
            .await
            .map_err(|error| StoreError::Io(format!("store task failed: {error}")))?
    })
}

impl ShardStore for FileShardStore {
    fn put(&self, shard: Shard) -> BoxFuture<'static, Result<(), StoreError>> {
        blocking(&self.inner, move |inner| inner.put(&shard))
    }

    fn get(&self, key: ShardKey) -> BoxFuture<'static, Result<Shard, StoreError>> {
        blocking(&self.inner, move |inner| inner.get(key))
    }

    fn delete(&self, key: ShardKey) -> BoxFuture<'static, Result<bool, StoreError>> {
        blocking(&self.inner, move |inner| inner.delete(key))
    }

    fn list(&self) -> BoxFuture<'static, Result<Vec<ShardKey>, StoreError>> {
        blocking(&self.inner, |inner| {
            let mut keys = Vec::new();
            inner.walk(|key, _| keys.push(key))?;
            keys.sort();
            Ok(keys)
        })
    }

    fn contains(&self, keys: Vec<ShardKey>) -> BoxFuture<'static, Result<Vec<bool>, StoreError>> {
        blocking(&self.inner, move |inner| {
            Ok(keys.iter().map(|key| inner.shard_path(*key).is_file()).collect())
        })
    }

    fn usage(&self) -> StoreUsage {
        StoreUsage {
            capacity_bytes: self.inner.capacity_bytes,
            used_bytes: *self.inner.used_bytes.lock().expect("not poisoned"),
            shard_count: self.inner.shard_count.load(Ordering::Relaxed),
            corrupt_reads: self.inner.corrupt_reads.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdr_protocol::erasure::{CodecId, StripeCodec};

    fn shards(seed: u8, length: usize) -> Vec<Shard> {
        let data: Vec<u8> = (0..length).map(|i| (i as u8) ^ seed).collect();
        StripeCodec::new(CodecId::DEFAULT, 2, 1)
            .unwrap()
            .encode(StripeId([seed; 32]), &data)
            .unwrap()
    }

    fn key_of(shard: &Shard) -> ShardKey {
        ShardKey {
            stripe_id: shard.header().stripe_id,
            index: shard.header().index,
        }
    }

    #[tokio::test]
    async fn put_get_delete_and_usage_accounting() {
        let directory = tempfile::tempdir().unwrap();
        let store = FileShardStore::open(directory.path(), 1 << 20).unwrap();
        let stripe = shards(1, 1000);
        for shard in &stripe {
            store.put(shard.clone()).await.unwrap();
        }
        let usage = store.usage();
        assert_eq!(usage.shard_count, 3);
        assert_eq!(
            usage.used_bytes,
            stripe.iter().map(Shard::encoded_length_bytes).sum::<u64>()
        );
        assert_eq!(store.get(key_of(&stripe[1])).await.unwrap(), stripe[1]);
        // Overwriting the same shard does not double-count.
        store.put(stripe[1].clone()).await.unwrap();
        assert_eq!(store.usage().used_bytes, usage.used_bytes);
        assert!(store.delete(key_of(&stripe[1])).await.unwrap());
        assert!(!store.delete(key_of(&stripe[1])).await.unwrap());
        assert!(matches!(store.get(key_of(&stripe[1])).await, Err(StoreError::NotFound)));
        assert_eq!(
            store.list().await.unwrap(),
            vec![key_of(&stripe[0]), key_of(&stripe[2])]
        );

        // Reopening recounts from disk.
        drop(store);
        let reopened = FileShardStore::open(directory.path(), 1 << 20).unwrap();
        assert_eq!(reopened.usage().shard_count, 2);
        assert_eq!(
            reopened.usage().used_bytes,
            stripe[0].encoded_length_bytes() + stripe[2].encoded_length_bytes()
        );
    }

    #[tokio::test]
    async fn bit_rot_and_misplaced_files_are_typed_errors_and_counted() {
        let directory = tempfile::tempdir().unwrap();
        let store = FileShardStore::open(directory.path(), 1 << 20).unwrap();
        let stripe = shards(2, 500);
        for shard in &stripe {
            store.put(shard.clone()).await.unwrap();
        }
        let path = store.shard_path(key_of(&stripe[0]));
        let mut bytes = fs::read(&path).unwrap();
        bytes[200] ^= 0x01;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            store.get(key_of(&stripe[0])).await,
            Err(StoreError::Corrupt(_))
        ));
        // A valid shard under the wrong name is corruption too.
        fs::copy(
            store.shard_path(key_of(&stripe[2])),
            store.shard_path(key_of(&stripe[1])),
        )
        .unwrap();
        assert!(matches!(
            store.get(key_of(&stripe[1])).await,
            Err(StoreError::Corrupt(_))
        ));
        // Truncation (a torn write by something other than us) is caught as well.
        let path = store.shard_path(key_of(&stripe[2]));
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(matches!(
            store.get(key_of(&stripe[2])).await,
            Err(StoreError::Corrupt(_))
        ));
        assert_eq!(store.usage().corrupt_reads, 3);
    }

    #[tokio::test]
    async fn a_crash_between_write_and_rename_leaves_no_visible_partial_shard() {
        let directory = tempfile::tempdir().unwrap();
        let store = FileShardStore::open(directory.path(), 1 << 20).unwrap();
        let stripe = shards(3, 800);
        let key = key_of(&stripe[0]);
        // The first half of a put ran (temporary file written and fsynced), then the
        // process died before the rename. Also leave a half-written temporary file.
        let temporary = store.inner.write_temporary(key, &stripe[0].to_bytes()).unwrap();
        fs::write(temporary.with_extension("partial.tmp"), &stripe[0].to_bytes()[..50]).unwrap();
        drop(store);

        let reopened = FileShardStore::open(directory.path(), 1 << 20).unwrap();
        assert!(matches!(reopened.get(key).await, Err(StoreError::NotFound)));
        assert!(reopened.list().await.unwrap().is_empty());
        assert_eq!(reopened.usage().used_bytes, 0);
        assert_eq!(
            fs::read_dir(directory.path().join(TEMPORARY_DIRECTORY))
                .unwrap()
                .count(),
            0
        );
        // And the shard can then be written normally.
        reopened.put(stripe[0].clone()).await.unwrap();
        assert_eq!(reopened.get(key).await.unwrap(), stripe[0]);
    }

    #[tokio::test]
    async fn a_full_store_refuses_with_disk_full_and_keeps_its_accounting() {
        let directory = tempfile::tempdir().unwrap();
        let stripe = shards(4, 4000);
        let one_shard = stripe[0].encoded_length_bytes();
        let store = FileShardStore::open(directory.path(), one_shard * 2).unwrap();
        store.put(stripe[0].clone()).await.unwrap();
        store.put(stripe[1].clone()).await.unwrap();
        let error = store.put(stripe[2].clone()).await.unwrap_err();
        assert!(
            matches!(error, StoreError::DiskFull { needed_bytes, available_bytes: 0 } if needed_bytes == one_shard),
            "{error:?}"
        );
        assert_eq!(store.usage().used_bytes, one_shard * 2);
        assert_eq!(store.usage().shard_count, 2);
        assert!(matches!(store.get(key_of(&stripe[2])).await, Err(StoreError::NotFound)));
    }
}
