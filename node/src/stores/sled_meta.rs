//! Metadata in sled: one sled tree per [`Tree`]. Shard payloads never go here.

use std::path::Path;

use crate::env::{BoxFuture, KeyValue, MetaStore, StoreError, Tree};

pub struct SledMetaStore {
    database: sled::Db,
}

fn sled_error(error: sled::Error) -> StoreError {
    match error {
        sled::Error::Corruption { .. } => StoreError::Corrupt(error.to_string()),
        other => StoreError::Io(other.to_string()),
    }
}

impl SledMetaStore {
    pub fn open(path: &Path) -> Result<SledMetaStore, StoreError> {
        let database = sled::Config::new().path(path).open().map_err(sled_error)?;
        Ok(SledMetaStore { database })
    }

    fn tree(&self, tree: Tree) -> Result<sled::Tree, StoreError> {
        self.database.open_tree(tree.name()).map_err(sled_error)
    }
}

impl MetaStore for SledMetaStore {
    fn get(&self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree(tree)?
            .get(key)
            .map_err(sled_error)?
            .map(|value| value.to_vec()))
    }

    fn put(&self, tree: Tree, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        self.tree(tree)?.insert(key, value).map_err(sled_error)?;
        Ok(())
    }

    fn delete(&self, tree: Tree, key: &[u8]) -> Result<(), StoreError> {
        self.tree(tree)?.remove(key).map_err(sled_error)?;
        Ok(())
    }

    fn scan(&self, tree: Tree, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Vec<KeyValue>, StoreError> {
        let tree = self.tree(tree)?;
        let start = match after {
            Some(after) => std::ops::Bound::Excluded(after.to_vec()),
            None => std::ops::Bound::Included(prefix.to_vec()),
        };
        let mut entries = Vec::new();
        for entry in tree.range::<Vec<u8>, _>((start, std::ops::Bound::Unbounded)) {
            let (key, value) = entry.map_err(sled_error)?;
            if !key.starts_with(prefix) || entries.len() >= limit {
                break;
            }
            entries.push((key.to_vec(), value.to_vec()));
        }
        Ok(entries)
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), StoreError>> {
        // sled's `flush_async` can hang when many flushes overlap (seen with 10 concurrent
        // S3 uploads); the blocking flush on the blocking pool does not.
        let database = self.database.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || database.flush())
                .await
                .map_err(|error| StoreError::Io(format!("flush task failed: {error}")))?
                .map_err(sled_error)?;
            Ok(())
        })
    }
}
