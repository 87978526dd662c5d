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
//!
//! Large shards are written around the page cache (`O_DIRECT`) where the filesystem
//! allows it. Backup data is written once and seldom read, so caching it only evicts what
//! is read; and the put fsyncs anyway, so the cache would not make it return sooner.
//! Measured on this workplace's VM: buffered writes plus fsync of 1 GiB spent 0.9-2.6 s
//! of kernel CPU copying into fresh page-cache pages, direct writes 0.2-0.3 s. A
//! filesystem that refuses direct I/O (EINVAL: tmpfs, some FUSE mounts) turns it off for
//! the store's lifetime and the put is written buffered.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bdr_protocol::erasure::Shard;
use bdr_protocol::ids::StripeId;
use bytes::Bytes;

use crate::env::{BoxFuture, ShardKey, ShardStore, StoreError, StoreUsage};

const SHARDS_DIRECTORY: &str = "shards";
const TEMPORARY_DIRECTORY: &str = "tmp";
const QUARANTINE_DIRECTORY: &str = "quarantine";

/// The open flag for direct I/O: Linux's. Elsewhere shards go through the page cache.
#[cfg(target_os = "linux")]
const DIRECT_IO_OPEN_FLAG: Option<i32> = Some(libc::O_DIRECT);
#[cfg(not(target_os = "linux"))]
const DIRECT_IO_OPEN_FLAG: Option<i32> = None;
/// Offset, length and memory alignment direct I/O needs: the largest logical block size
/// of common devices, so it suits 512-byte devices too.
const DIRECT_IO_ALIGNMENT_BYTES: usize = 4096;
/// Shards smaller than this are written and read through the page cache: a direct write
/// pads its last block and truncates the padding off, a syscall and a block of zeros that
/// only pay off against a large copy (the threshold is a judgement, not a measurement).
const DIRECT_IO_BYTES_MIN: usize = 64 * 1024;
/// A direct write goes through an aligned buffer of this size, one piece at a time.
const DIRECT_WRITE_PIECE_BYTES: usize = 1024 * 1024;
/// Aligned buffers kept for reuse between puts; puts beyond it allocate their own.
const DIRECT_WRITE_BUFFERS_KEPT_MAX: usize = 4;

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
    /// Cleared for good when the filesystem refuses direct I/O (never set where the
    /// platform has none).
    direct_writes: AtomicBool,
    /// Aligned scratch buffers for direct writes, kept between puts.
    direct_write_buffers: Mutex<Vec<Vec<u8>>>,
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

enum DirectWrite {
    Done,
    Unsupported,
}

/// The body of `Inner::write_direct`: `buffer` is scratch space of at least one piece
/// plus one alignment's worth of bytes.
fn write_direct_through(path: &Path, bytes: &[u8], buffer: &mut [u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(DIRECT_IO_OPEN_FLAG.unwrap_or(0))
        .open(path)?;
    let start = buffer.as_ptr().align_offset(DIRECT_IO_ALIGNMENT_BYTES);
    let window = &mut buffer[start..start + DIRECT_WRITE_PIECE_BYTES];
    for piece in bytes.chunks(DIRECT_WRITE_PIECE_BYTES) {
        // Only the last piece can be short; every piece before it is whole, so every write
        // starts at an aligned offset.
        let padded_length = piece.len().next_multiple_of(DIRECT_IO_ALIGNMENT_BYTES);
        window[..piece.len()].copy_from_slice(piece);
        window[piece.len()..padded_length].fill(0);
        file.write_all(&window[..padded_length])?;
    }
    file.set_len(bytes.len() as u64)?;
    file.sync_all()
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
            direct_writes: AtomicBool::new(DIRECT_IO_OPEN_FLAG.is_some()),
            direct_write_buffers: Mutex::new(Vec::new()),
        };
        let (count, bytes) = inner.walk(|_, _| {})?;
        *inner.used_bytes.lock().expect("not poisoned") = bytes;
        inner.shard_count.store(count, Ordering::Relaxed);
        Ok(FileShardStore { inner: Arc::new(inner) })
    }

    /// Turns direct I/O off, as a filesystem that refuses it would.
    #[cfg(test)]
    fn turn_direct_io_off(&self) {
        self.inner.direct_writes.store(false, Ordering::Relaxed);
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
        let result = self.write_direct(&path, bytes).and_then(|written| match written {
            DirectWrite::Done => Ok(()),
            DirectWrite::Unsupported => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .and_then(|mut file| {
                        file.write_all(bytes)?;
                        file.sync_all()
                    })
            }
        });
        if let Err(error) = result {
            let _ = fs::remove_file(&path);
            return Err(io_error("write", &path, error));
        }
        Ok(path)
    }

    /// Writes and fsyncs `bytes` as a new file at `path` with direct I/O, padding the last
    /// block and truncating the padding off. `Unsupported` (no file left behind) when the
    /// shard is small, direct writes are off, or the filesystem refuses them now.
    fn write_direct(&self, path: &Path, bytes: &[u8]) -> std::io::Result<DirectWrite> {
        if bytes.len() < DIRECT_IO_BYTES_MIN || !self.direct_writes.load(Ordering::Relaxed) {
            return Ok(DirectWrite::Unsupported);
        }
        let mut buffer = self
            .direct_write_buffers
            .lock()
            .expect("not poisoned")
            .pop()
            .unwrap_or_else(|| vec![0u8; DIRECT_WRITE_PIECE_BYTES + DIRECT_IO_ALIGNMENT_BYTES]);
        let result = write_direct_through(path, bytes, &mut buffer);
        let mut kept = self.direct_write_buffers.lock().expect("not poisoned");
        if kept.len() < DIRECT_WRITE_BUFFERS_KEPT_MAX {
            kept.push(buffer);
        }
        drop(kept);
        match result {
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                let _ = fs::remove_file(path);
                self.turn_direct_io_off_after(path, &error);
                Ok(DirectWrite::Unsupported)
            }
            other => other.map(|()| DirectWrite::Done),
        }
    }

    /// A shard file's bytes. Large files are read with direct I/O (while direct writes are
    /// on) straight into an aligned buffer the shard then keeps: their bytes are seldom
    /// read twice, and a read that fills the page cache spends more kernel CPU than it
    /// saves. The file is opened once, with the flag its length (from `stat`) calls for.
    fn read_file(&self, path: &Path) -> std::io::Result<Bytes> {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let length = fs::metadata(path)?.len() as usize;
        if length >= DIRECT_IO_BYTES_MIN && self.direct_writes.load(Ordering::Relaxed) {
            match OpenOptions::new()
                .read(true)
                .custom_flags(DIRECT_IO_OPEN_FLAG.unwrap_or(0))
                .open(path)
            {
                Ok(direct) => return read_direct_from(&direct, length),
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => self.turn_direct_io_off_after(path, &error),
                Err(error) => return Err(error),
            }
        }
        let mut bytes = Vec::with_capacity(length);
        File::open(path)?.read_to_end(&mut bytes)?;
        Ok(Bytes::from(bytes))
    }

    /// Turns direct I/O off for the store's lifetime (reads and writes), saying so once.
    fn turn_direct_io_off_after(&self, path: &Path, error: &std::io::Error) {
        if self.direct_writes.swap(false, Ordering::Relaxed) {
            tracing::warn!(path = %path.display(), %error,
                "the filesystem refuses direct I/O; shards go through the page cache");
        }
    }
}

/// Page-aligned memory that a direct read fills and a shard then keeps as its buffer.
/// It is neither zeroed before the read nor moved after it: on a 1 MiB shard those were
/// a memset and a memmove of the whole shard, together about a twentieth of a large
/// GET's CPU. Only the bytes the kernel wrote are ever exposed.
struct AlignedReadBuffer {
    pointer: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
    /// Bytes from the start that the kernel has written.
    filled: usize,
}

// SAFETY: the buffer owns its allocation outright (like a `Vec<u8>`) and is never written
// once shared: `Bytes` hands out only shared slices of it.
unsafe impl Send for AlignedReadBuffer {}
unsafe impl Sync for AlignedReadBuffer {}

impl AlignedReadBuffer {
    fn new(capacity: usize) -> AlignedReadBuffer {
        assert!(capacity > 0, "a direct read buffer holds at least one block");
        let layout = std::alloc::Layout::from_size_align(capacity, DIRECT_IO_ALIGNMENT_BYTES)
            .expect("a shard-sized, block-aligned layout is valid");
        // SAFETY: the layout's size is not zero (asserted above).
        let pointer = unsafe { std::alloc::alloc(layout) };
        let Some(pointer) = std::ptr::NonNull::new(pointer) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedReadBuffer {
            pointer,
            layout,
            filled: 0,
        }
    }

    /// Reads from `file`'s current position into the unfilled rest of the buffer; returns
    /// how many bytes came (0 at the end of the file).
    fn read_more(&mut self, file: &File) -> std::io::Result<usize> {
        use std::os::fd::AsRawFd;
        let length = self.layout.size() - self.filled;
        // SAFETY: the destination lies inside the allocation (`filled + length <= size`),
        // and the kernel only writes to it; nothing reads those bytes until counted.
        let count = unsafe {
            libc::read(
                file.as_raw_fd(),
                self.pointer.as_ptr().add(self.filled).cast::<libc::c_void>(),
                length,
            )
        };
        if count < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let count = count as usize;
        assert!(count <= length, "read(2) returned more than asked for");
        self.filled += count;
        Ok(count)
    }

    fn truncate(&mut self, length: usize) {
        self.filled = self.filled.min(length);
    }
}

impl AsRef<[u8]> for AlignedReadBuffer {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the first `filled` bytes were written by read(2) and are not written again.
        unsafe { std::slice::from_raw_parts(self.pointer.as_ptr(), self.filled) }
    }
}

impl Drop for AlignedReadBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed only here.
        unsafe { std::alloc::dealloc(self.pointer.as_ptr(), self.layout) }
    }
}

/// The body of `Inner::read_file` for a file opened with direct I/O, `length` bytes long
/// when it was stat'ed.
fn read_direct_from(file: &File, length: usize) -> std::io::Result<Bytes> {
    let padded_length = length.next_multiple_of(DIRECT_IO_ALIGNMENT_BYTES);
    let mut buffer = AlignedReadBuffer::new(padded_length);
    // Every read but one that reaches the end of the file returns whole blocks, so
    // each next read starts aligned.
    while buffer.filled < padded_length {
        match buffer.read_more(file) {
            Ok(0) => break,
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) => return Err(error),
        }
    }
    // A file that changed length since the stat reads as what was there; the shard's
    // checksum judges it.
    buffer.truncate(length);
    Ok(Bytes::from_owner(buffer))
}

impl Inner {
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
        let bytes = match self.read_file(&path) {
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
        let shard = Shard::from_shared(bytes).map_err(|error| corrupt(error.to_string()))?;
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

    /// Shards below, at and above the direct-I/O size, across piece boundaries and not a
    /// multiple of the alignment, each written and read back with direct I/O on and off:
    /// the file holds exactly the shard's bytes (padding truncated off), reads give the
    /// shard back, and a flipped bit is still caught.
    #[tokio::test]
    async fn shards_of_every_size_round_trip_with_and_without_direct_io() {
        let data_lengths = [
            0,
            1000,
            2 * DIRECT_IO_BYTES_MIN - 300,
            2 * DIRECT_IO_BYTES_MIN + 8192,
            2 * DIRECT_WRITE_PIECE_BYTES + 2 * DIRECT_IO_ALIGNMENT_BYTES + 6,
            5 * DIRECT_WRITE_PIECE_BYTES + 77,
        ];
        let shard_lengths: Vec<usize> = data_lengths
            .iter()
            .map(|&length| shards(0, length)[0].as_bytes().len())
            .collect();
        assert!(shard_lengths.iter().any(|&length| length < DIRECT_IO_BYTES_MIN));
        assert!(shard_lengths
            .iter()
            .any(|&length| (DIRECT_IO_BYTES_MIN..DIRECT_WRITE_PIECE_BYTES).contains(&length)));
        assert!(shard_lengths
            .iter()
            .any(|&length| length > DIRECT_WRITE_PIECE_BYTES && length % DIRECT_IO_ALIGNMENT_BYTES != 0));
        for direct_io in [true, false] {
            let directory = tempfile::tempdir().unwrap();
            let store = FileShardStore::open(directory.path(), 1 << 30).unwrap();
            if !direct_io {
                store.turn_direct_io_off();
            }
            let mut expected_bytes = 0;
            for (seed, &length) in data_lengths.iter().enumerate() {
                let stripe = shards(seed as u8 + 10, length);
                for shard in &stripe {
                    store.put(shard.clone()).await.unwrap();
                    expected_bytes += shard.encoded_length_bytes();
                    let path = store.shard_path(key_of(shard));
                    assert_eq!(fs::read(&path).unwrap(), shard.as_bytes(), "direct {direct_io}");
                    assert_eq!(&store.get(key_of(shard)).await.unwrap(), shard, "direct {direct_io}");
                }
                let path = store.shard_path(key_of(&stripe[0]));
                let mut bytes = fs::read(&path).unwrap();
                let last = bytes.len() - 1;
                bytes[last] ^= 0x80;
                fs::write(&path, &bytes).unwrap();
                assert!(matches!(
                    store.get(key_of(&stripe[0])).await,
                    Err(StoreError::Corrupt(_))
                ));
                expected_bytes -= stripe[0].encoded_length_bytes();
            }
            assert_eq!(store.usage().used_bytes, expected_bytes);
            // The temporary directory's filesystem took direct I/O, so its path was tested.
            assert_eq!(
                store.inner.direct_writes.load(Ordering::Relaxed),
                direct_io && DIRECT_IO_OPEN_FLAG.is_some()
            );
            assert!(fs::read_dir(directory.path().join(TEMPORARY_DIRECTORY))
                .unwrap()
                .next()
                .is_none());
        }
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
