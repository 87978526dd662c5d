//! Metadata in sled: one sled tree per [`Tree`]. Shard payloads never go here.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::env::{BoxFuture, KeyValue, MetaStore, StoreError, Tree};

pub struct SledMetaStore {
    database: sled::Db,
    flushes: Arc<FlushGroup>,
}

/// Group commit. Every quorum write flushes its replica's store before it answers, and
/// with many writes in flight each flush used to take a blocking thread and an fsync of
/// its own. Now one flush runs at a time per store, and it covers every caller that
/// asked before it began (their writes came before their ask): callers that arrive
/// while one runs wait for the next, which they share.
#[derive(Default)]
struct FlushGroup {
    state: Mutex<FlushState>,
    /// Signalled when a flusher stops (its handle on the database already let go).
    flusher_stopped: Condvar,
    /// Flushes run so far.
    rounds_run: AtomicU64,
}

/// How long dropping the store waits for a flush in progress to end.
const FLUSH_WAIT_ON_DROP_MAX: Duration = Duration::from_secs(60);

#[derive(Default)]
struct FlushState {
    /// The round not begun yet, which new callers join; it reports its outcome once.
    next_round: Option<watch::Sender<Option<Result<(), String>>>>,
    /// Whether a flusher (a blocking task running rounds until none is left) is on.
    flusher_running: bool,
}

/// The one flusher of a store while it runs: a blocking task running rounds until no
/// caller waits. Each round takes its callers first, then flushes, so every write made
/// before a caller joined is in the flush.
struct Flusher {
    group: Arc<FlushGroup>,
    /// Let go (None) exactly when the flusher stopped by itself.
    database: Option<sled::Db>,
}

impl Flusher {
    fn run_rounds(mut self) {
        loop {
            let round = {
                let mut state = self.group.state.lock().expect("not poisoned");
                match state.next_round.take() {
                    Some(round) => round,
                    None => {
                        // In the same critical section that found no round: a caller
                        // that saw a flusher running and joined a round would otherwise
                        // be left with a round nobody runs. The handle goes first, so a
                        // store waiting in its drop for this finds the database free.
                        state.flusher_running = false;
                        self.database = None;
                        self.group.flusher_stopped.notify_all();
                        return;
                    }
                }
            };
            let database = self.database.as_ref().expect("held until the flusher stops");
            let outcome = database
                .flush()
                .map(|_| ())
                .map_err(|error| sled_error(error).to_string());
            self.group.rounds_run.fetch_add(1, Ordering::Relaxed);
            round.send_replace(Some(outcome));
        }
    }
}

impl Drop for Flusher {
    /// A flusher that did not stop by itself (a panic in sled, or a runtime shutting
    /// down that dropped the task before it ran) must not leave `flusher_running` set
    /// with nobody flushing: every later caller, and the store's drop, would wait.
    /// Callers of the round not run get an error (its sender goes), and the next caller
    /// starts a flusher again.
    fn drop(&mut self) {
        if self.database.take().is_none() {
            return;
        }
        let mut state = self.group.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        state.flusher_running = false;
        state.next_round = None;
        self.group.flusher_stopped.notify_all();
    }
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
        Ok(SledMetaStore {
            database,
            flushes: Arc::default(),
        })
    }

    /// Flushes run so far (each covering every caller waiting when it began).
    pub fn flush_rounds_run(&self) -> u64 {
        self.flushes.rounds_run.load(Ordering::Relaxed)
    }

    fn tree(&self, tree: Tree) -> Result<sled::Tree, StoreError> {
        self.database.open_tree(tree.name()).map_err(sled_error)
    }
}

impl Drop for SledMetaStore {
    /// Waits for a flush in progress, so that when the store is gone the database is
    /// closed and its directory can be opened again (a restart in the same process).
    fn drop(&mut self) {
        let state = self
            .flushes
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let (_state, waited) = self
            .flushes
            .flusher_stopped
            .wait_timeout_while(state, FLUSH_WAIT_ON_DROP_MAX, |state| state.flusher_running)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if waited.timed_out() {
            tracing::warn!("a metadata flush still runs as its store closes");
        }
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
        // A flush on the blocking pool: sled's `flush_async` can hang when many flushes
        // overlap (seen with 10 concurrent S3 uploads). Concurrent callers share one
        // (see `FlushGroup`).
        let database = self.database.clone();
        let flushes = Arc::clone(&self.flushes);
        Box::pin(async move {
            let (mut outcome, start_flusher) = {
                let mut state = flushes.state.lock().expect("not poisoned");
                let receiver = state
                    .next_round
                    .get_or_insert_with(|| watch::channel(None).0)
                    .subscribe();
                let start_flusher = !state.flusher_running;
                state.flusher_running = true;
                (receiver, start_flusher)
            };
            // Outside the lock: a task the runtime drops unrun drops its flusher here,
            // and the flusher's drop takes the lock.
            if start_flusher {
                let flusher = Flusher {
                    group: Arc::clone(&flushes),
                    database: Some(database),
                };
                tokio::task::spawn_blocking(move || flusher.run_rounds());
            }
            let reported = outcome
                .wait_for(Option::is_some)
                .await
                .map_err(|_| StoreError::Io("the flush task ended without flushing".into()))?
                .clone()
                .expect("waited for an outcome");
            reported.map_err(StoreError::Io)
        })
    }
}
