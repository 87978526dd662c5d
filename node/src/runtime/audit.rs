//! The audit log: one JSON line per S3 request and per changing admin request, saying
//! who (access key id, or `admin`), what (operation), on which bucket and key, and the
//! result. One file per node (`<data_dir>/audit/audit.log`), rotated by size: the
//! current file is renamed `.1` (older ones shift up) once it passes
//! [`AUDIT_FILE_BYTES_MAX`], and at most [`AUDIT_FILES_KEPT`] old files are kept.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;

pub const AUDIT_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;
pub const AUDIT_FILES_KEPT: u32 = 4;
/// Longest bucket or key written to a line (S3 keys are at most 1024 bytes anyway).
pub const AUDIT_FIELD_BYTES_MAX: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub at_ms: u64,
    /// Access key id, `admin`, or `anonymous`.
    pub who: String,
    pub operation: String,
    pub bucket: Option<String>,
    pub key: Option<String>,
    pub version_id: Option<String>,
    pub status: u16,
    pub result: &'static str,
}

struct AuditFile {
    file: File,
    size_bytes: u64,
}

pub struct AuditLog {
    path: PathBuf,
    current: Mutex<Option<AuditFile>>,
    bytes_max: u64,
}

fn open_append(path: &Path) -> std::io::Result<AuditFile> {
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let size_bytes = file.metadata()?.len();
    Ok(AuditFile { file, size_bytes })
}

fn clip(text: &str) -> String {
    let mut end = text.len().min(AUDIT_FIELD_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

impl AuditLog {
    /// Opens (creating) `<folder>/audit.log` for appending.
    pub fn open(folder: &Path) -> Result<AuditLog, String> {
        AuditLog::open_with_limit(folder, AUDIT_FILE_BYTES_MAX)
    }

    pub fn open_with_limit(folder: &Path, bytes_max: u64) -> Result<AuditLog, String> {
        std::fs::create_dir_all(folder).map_err(|error| format!("cannot create {}: {error}", folder.display()))?;
        let path = folder.join("audit.log");
        let current = open_append(&path).map_err(|error| format!("cannot open {}: {error}", path.display()))?;
        Ok(AuditLog {
            path,
            current: Mutex::new(Some(current)),
            bytes_max,
        })
    }

    fn rotated(&self, generation: u32) -> PathBuf {
        self.path.with_extension(format!("log.{generation}"))
    }

    fn rotate(&self, current: &mut Option<AuditFile>) -> std::io::Result<()> {
        *current = None;
        let _ = std::fs::remove_file(self.rotated(AUDIT_FILES_KEPT));
        for generation in (1..AUDIT_FILES_KEPT).rev() {
            let from = self.rotated(generation);
            if from.exists() {
                std::fs::rename(&from, self.rotated(generation + 1))?;
            }
        }
        std::fs::rename(&self.path, self.rotated(1))?;
        *current = Some(open_append(&self.path)?);
        Ok(())
    }

    /// Appends one line. A failing audit log is reported, never fatal to the request.
    pub fn record(&self, mut entry: AuditEntry) {
        entry.bucket = entry.bucket.as_deref().map(clip);
        entry.key = entry.key.as_deref().map(clip);
        let mut line = serde_json::to_vec(&entry).expect("audit entries encode");
        line.push(b'\n');
        let mut current = self.current.lock().expect("not poisoned");
        let full = current
            .as_ref()
            .is_some_and(|file| file.size_bytes + line.len() as u64 > self.bytes_max);
        if full || current.is_none() {
            if let Err(error) = self.rotate(&mut current) {
                tracing::error!(%error, "cannot rotate the audit log");
            }
        }
        if let Some(file) = current.as_mut() {
            match file.file.write_all(&line) {
                Ok(()) => file.size_bytes += line.len() as u64,
                Err(error) => tracing::error!(%error, "cannot write the audit log"),
            }
        }
    }
}

/// The access key id of a SigV4 request (header or presigned query), if any.
pub fn access_key_of(authorization: Option<&str>, query: &str) -> Option<String> {
    let credential = match authorization {
        Some(header) => header.split("Credential=").nth(1)?.split('/').next()?.to_string(),
        None => {
            let value = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("X-Amz-Credential="))?;
            let decoded = value.replace("%2F", "/").replace("%2f", "/");
            decoded.split('/').next()?.to_string()
        }
    };
    (!credential.is_empty() && credential.len() <= 128).then_some(credential)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64) -> AuditEntry {
        AuditEntry {
            at_ms: index,
            who: "AKID".into(),
            operation: "PutObject".into(),
            bucket: Some("backups".into()),
            key: Some(format!("key-{index}")),
            version_id: None,
            status: 200,
            result: "ok",
        }
    }

    #[test]
    fn lines_are_json_and_files_rotate_keeping_a_bounded_number() {
        let folder = tempfile::tempdir().unwrap();
        let log = AuditLog::open_with_limit(folder.path(), 1000).unwrap();
        for index in 0..200 {
            log.record(entry(index));
        }
        let current = std::fs::read_to_string(folder.path().join("audit.log")).unwrap();
        let last: serde_json::Value = serde_json::from_str(current.lines().last().unwrap()).unwrap();
        assert_eq!(last["key"], "key-199");
        assert_eq!(last["who"], "AKID");
        assert!(current.len() <= 1000);
        let files = std::fs::read_dir(folder.path()).unwrap().count();
        assert_eq!(files, 1 + AUDIT_FILES_KEPT as usize);
    }

    #[test]
    fn access_keys_come_from_the_header_or_a_presigned_url() {
        let header = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260101/bdr/s3/aws4_request, SignedHeaders=host";
        assert_eq!(access_key_of(Some(header), ""), Some("AKIDEXAMPLE".into()));
        let query = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKID2%2F20260101%2Fbdr%2Fs3%2Faws4_request";
        assert_eq!(access_key_of(None, query), Some("AKID2".into()));
        assert_eq!(access_key_of(None, "list-type=2"), None);
    }
}
