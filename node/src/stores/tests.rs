//! The same contract tests for every `MetaStore` and `ShardStore` implementation.

use std::sync::Arc;

use bdr_protocol::erasure::{CodecId, StripeCodec};
use bdr_protocol::ids::StripeId;
use bdr_protocol::wire::Table;

use super::file_shards::FileShardStore;
use super::memory::{MemoryMetaStore, MemoryShardStore};
use super::sled_meta::SledMetaStore;
use crate::env::{MetaStore, ShardKey, ShardStore, StoreError, Tree};

async fn check_meta_store_contract(store: &dyn MetaStore) {
    let objects = Tree::Table(Table::Objects);
    assert_eq!(store.get(objects, b"a").unwrap(), None);
    for key in [b"b/2".as_slice(), b"a/1", b"b/1", b"b/3", b"c"] {
        store.put(objects, key, key).unwrap();
    }
    // Trees are separate namespaces.
    store.put(Tree::System, b"a/1", b"system").unwrap();
    assert_eq!(store.get(objects, b"a/1").unwrap().as_deref(), Some(b"a/1".as_slice()));
    assert_eq!(
        store.get(Tree::System, b"a/1").unwrap().as_deref(),
        Some(b"system".as_slice())
    );

    let keys = |entries: Vec<(Vec<u8>, Vec<u8>)>| entries.into_iter().map(|(key, _)| key).collect::<Vec<_>>();
    assert_eq!(
        keys(store.scan(objects, b"b/", None, 10).unwrap()),
        vec![b"b/1".to_vec(), b"b/2".to_vec(), b"b/3".to_vec()]
    );
    assert_eq!(
        keys(store.scan(objects, b"b/", None, 2).unwrap()),
        vec![b"b/1".to_vec(), b"b/2".to_vec()]
    );
    assert_eq!(
        keys(store.scan(objects, b"b/", Some(b"b/2"), 10).unwrap()),
        vec![b"b/3".to_vec()]
    );
    assert_eq!(keys(store.scan(objects, b"", None, 100).unwrap()).len(), 5);

    store.delete(objects, b"b/2").unwrap();
    store.delete(objects, b"missing").unwrap();
    assert_eq!(store.get(objects, b"b/2").unwrap(), None);
    store.put(objects, b"c", b"overwritten").unwrap();
    assert_eq!(
        store.get(objects, b"c").unwrap().as_deref(),
        Some(b"overwritten".as_slice())
    );
    store.flush().await.unwrap();
}

#[tokio::test]
async fn memory_meta_store_meets_the_contract() {
    check_meta_store_contract(&MemoryMetaStore::new()).await;
}

#[tokio::test]
async fn sled_meta_store_meets_the_contract_and_persists() {
    let directory = tempfile::tempdir().unwrap();
    {
        let store = SledMetaStore::open(&directory.path().join("meta")).unwrap();
        check_meta_store_contract(&store).await;
    }
    let reopened = SledMetaStore::open(&directory.path().join("meta")).unwrap();
    assert_eq!(
        reopened.get(Tree::Table(Table::Objects), b"c").unwrap().as_deref(),
        Some(b"overwritten".as_slice())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sled_flushes_share_rounds_and_all_complete() {
    let directory = tempfile::tempdir().unwrap();
    let store = Arc::new(SledMetaStore::open(&directory.path().join("meta")).unwrap());
    let callers = 200u64;
    let tasks: Vec<_> = (0..callers)
        .map(|index| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .put(Tree::Table(Table::Objects), &index.to_be_bytes(), b"value")
                    .unwrap();
                store.flush().await
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let rounds = store.flush_rounds_run();
    assert!(
        rounds >= 1 && rounds < callers,
        "{rounds} flushes for {callers} callers"
    );
    // Once the flusher went idle, a new caller starts it again.
    for expected in rounds + 1..=rounds + 3 {
        store.flush().await.unwrap();
        assert_eq!(store.flush_rounds_run(), expected);
    }
    // Dropping the store waits for the flusher, so its directory opens again at once.
    drop(store);
    let reopened = SledMetaStore::open(&directory.path().join("meta")).unwrap();
    assert_eq!(
        reopened
            .scan(Tree::Table(Table::Objects), b"", None, 1000)
            .unwrap()
            .len() as u64,
        callers
    );
}

/// A flush whose flusher task the runtime drops unrun (it is shutting down) fails
/// instead of waiting forever, and the store still closes at once.
#[test]
fn a_flush_on_a_runtime_shutting_down_fails_and_the_store_still_closes() {
    let directory = tempfile::tempdir().unwrap();
    let store = SledMetaStore::open(&directory.path().join("meta")).unwrap();
    store.put(Tree::System, b"key", b"value").unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let handle = runtime.handle().clone();
    runtime.shutdown_background();
    let started = std::time::Instant::now();
    {
        let _context = handle.enter();
        let outcome = futures::executor::block_on(store.flush());
        assert!(outcome.is_err(), "{outcome:?}");
    }
    drop(store);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "closing waited for a flusher that never ran"
    );
    let reopened = SledMetaStore::open(&directory.path().join("meta")).unwrap();
    assert_eq!(
        reopened.get(Tree::System, b"key").unwrap().as_deref(),
        Some(b"value".as_slice())
    );
}

async fn check_shard_store_contract(store: Arc<dyn ShardStore>) {
    let codec = StripeCodec::new(CodecId::DEFAULT, 2, 2).unwrap();
    let shards = codec.encode(StripeId([8; 32]), &[5u8; 3000]).unwrap();
    for shard in &shards {
        store.put(shard.clone()).await.unwrap();
    }
    let keys: Vec<ShardKey> = shards
        .iter()
        .map(|shard| ShardKey {
            stripe_id: shard.header().stripe_id,
            index: shard.header().index,
        })
        .collect();
    assert_eq!(store.list().await.unwrap(), keys);
    for (key, shard) in keys.iter().zip(&shards) {
        assert_eq!(&store.get(*key).await.unwrap(), shard);
    }
    assert_eq!(store.contains(keys.clone()).await.unwrap(), vec![true; 4]);
    assert!(store.delete(keys[0]).await.unwrap());
    assert!(matches!(store.get(keys[0]).await, Err(StoreError::NotFound)));
    assert_eq!(
        store.contains(keys.clone()).await.unwrap(),
        vec![false, true, true, true]
    );
    let usage = store.usage();
    assert_eq!(usage.shard_count, 3);
    assert_eq!(
        usage.used_bytes,
        shards[1..]
            .iter()
            .map(|shard| shard.encoded_length_bytes())
            .sum::<u64>()
    );
    let huge = StripeCodec::new(CodecId::DEFAULT, 1, 0)
        .unwrap()
        .encode(StripeId([9; 32]), &vec![1u8; 2 << 20])
        .unwrap();
    assert!(matches!(
        store.put(huge[0].clone()).await,
        Err(StoreError::DiskFull { .. })
    ));
}

#[tokio::test]
async fn memory_shard_store_meets_the_contract() {
    check_shard_store_contract(Arc::new(MemoryShardStore::new(1 << 20))).await;
}

#[tokio::test]
async fn file_shard_store_meets_the_contract() {
    let directory = tempfile::tempdir().unwrap();
    check_shard_store_contract(Arc::new(FileShardStore::open(directory.path(), 1 << 20).unwrap())).await;
}

#[tokio::test]
async fn memory_shard_store_reports_injected_rot() {
    let store = MemoryShardStore::new(1 << 20);
    let shard = StripeCodec::new(CodecId::DEFAULT, 1, 1)
        .unwrap()
        .encode(StripeId([1; 32]), b"data")
        .unwrap()
        .remove(0);
    store.put(shard).await.unwrap();
    let key = ShardKey {
        stripe_id: StripeId([1; 32]),
        index: 0,
    };
    assert!(store.damage(key, |bytes| bytes[100] ^= 4));
    assert!(matches!(store.get(key).await, Err(StoreError::Corrupt(_))));
    assert_eq!(store.usage().corrupt_reads, 1);
    // Quarantined: it now reads as missing, so repair rebuilds it.
    assert!(matches!(store.get(key).await, Err(StoreError::NotFound)));
    assert_eq!(store.contains(vec![key]).await.unwrap(), vec![false]);
    assert_eq!(store.usage().shard_count, 0);
    assert_eq!(store.usage().used_bytes, 0);
}

#[tokio::test]
async fn file_shard_store_quarantines_rotten_files() {
    let directory = tempfile::tempdir().unwrap();
    let store = FileShardStore::open(directory.path(), 1 << 20).unwrap();
    let shards = StripeCodec::new(CodecId::DEFAULT, 1, 1)
        .unwrap()
        .encode(StripeId([1; 32]), b"data")
        .unwrap();
    for shard in &shards {
        store.put(shard.clone()).await.unwrap();
    }
    let rotten = ShardKey {
        stripe_id: StripeId([1; 32]),
        index: 0,
    };
    let path = store.shard_path(rotten);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 0x20;
    std::fs::write(&path, bytes).unwrap();

    assert!(matches!(store.get(rotten).await, Err(StoreError::Corrupt(_))));
    assert!(!path.exists());
    assert_eq!(
        std::fs::read_dir(directory.path().join("quarantine")).unwrap().count(),
        1
    );
    assert!(matches!(store.get(rotten).await, Err(StoreError::NotFound)));
    let usage = store.usage();
    assert_eq!((usage.shard_count, usage.corrupt_reads), (1, 1));
    assert_eq!(usage.used_bytes, shards[1].encoded_length_bytes());
    // The store reopens with the quarantined file left out of its counts.
    drop(store);
    let reopened = FileShardStore::open(directory.path(), 1 << 20).unwrap();
    assert_eq!(reopened.usage().shard_count, 1);
    assert_eq!(reopened.list().await.unwrap().len(), 1);
}
