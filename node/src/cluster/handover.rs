//! Metadata handover: a layout change gives metadata partitions new replicas, and a new
//! replica must not answer reads until it holds everything the old replicas acknowledged.
//!
//! Quorum reads and writes are only sound while coordinators agree on the replica set.
//! When a layout change swaps a replica (a node joins, is drained or removed), a write
//! acknowledged by two old replicas may sit on just one of the new ones, and a read from
//! the new replica plus the other would miss it. So, per node:
//!
//! 1. Every layout change (a new layout digest) clears the node's set of *ready*
//!    partitions: under the new layout it must pull each partition it replicates again.
//!    (Readiness cannot be kept across changes: a node that slept through an intermediate
//!    layout cannot tell which writes went to replica sets it never saw.)
//! 2. It waits until every live node announces (in its heartbeat) that it uses the new
//!    layout. From then on no live coordinator places writes with the old replica sets:
//!    replicas refuse metadata requests stamped with another layout digest
//!    ([`RemoteErrorKind::LayoutMismatch`](bdr_protocol::wire::RemoteErrorKind)).
//! 3. It pulls each of its partitions from every live node holding rows of it (old
//!    replicas and new ones alike), flushes, and only then marks the partition ready.
//!    Any acknowledged write sits on a quorum of some replica set, so on at least one live
//!    node as long as failures stay within budget; after the pull this replica holds it.
//! 4. Until then it accepts writes (they are durable and count towards a write quorum) but
//!    refuses reads with `NotReady`, so reads go to replicas that hold everything.
//!
//! Once every replica of a partition announces a complete copy under the current layout,
//! former replicas drop their rows of it: stale rows left behind could otherwise bring
//! back rows whose tombstones were collected, at the next handover that pulls from them.
//!
//! Residual risk, written down on purpose: a node the others consider down is not waited
//! for in step 2. If a network partition isolates two old replicas of a partition together
//! with a writer for longer than `down_after`, across a layout change, writes acknowledged
//! on that side are only merged when anti-entropy reaches them.

use std::collections::BTreeSet;
use std::sync::Arc;

use bdr_protocol::ids::NodeId;
use bdr_protocol::layout::{Layout, NodeStatus};
use bdr_protocol::records::METADATA_PARTITIONS;
use bdr_protocol::wire::{Request, Response, Table};

use super::anti_entropy::empty_partition_root;
use super::membership::Liveness;
use super::metadata::METADATA_TIMEOUT_MS;
use super::ClusterNode;
use crate::env::{Env, Tree};

/// Which partitions this node holds completely, under which layout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HandoverState {
    /// The layout digest `ready_partitions` refers to.
    pub layout_digest: [u8; 32],
    /// Partitions this node replicates under that layout and has pulled completely.
    pub ready_partitions: BTreeSet<u32>,
    /// Derived and cached (placing 256 partitions every round is not free): the
    /// partitions this node replicates under `layout_digest`, once computed.
    replicated_partitions: Option<BTreeSet<u32>>,
    /// Whether rows of partitions this node no longer replicates may still be here. No
    /// new ones arrive under the same layout (replicas refuse other layouts' writes).
    former_partitions_checked: bool,
}

impl HandoverState {
    pub fn restored(layout_digest: [u8; 32], ready_partitions: BTreeSet<u32>) -> HandoverState {
        HandoverState {
            layout_digest,
            ready_partitions,
            ..HandoverState::default()
        }
    }
}

/// What one handover round did (for tests and logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandoverRound {
    /// Partitions this node replicates and had not yet pulled, before the round.
    pub partitions_waiting: u32,
    /// Of those, how many became ready in this round.
    pub partitions_made_ready: u32,
    /// Rows merged from other holders.
    pub rows_pulled: u64,
    /// Former partitions whose local rows were dropped.
    pub partitions_dropped: u32,
}

impl<E: Env> ClusterNode<E> {
    /// The metadata partitions this node replicates under `layout`.
    fn replicated_partitions(&self, layout: &Arc<Layout>) -> BTreeSet<u32> {
        let me = self.env.node_id();
        (0..METADATA_PARTITIONS)
            .filter(|partition| {
                self.partition_replicas(layout, *partition)
                    .is_ok_and(|placement| placement.replicas.contains(&me))
            })
            .collect()
    }

    /// Whether this replica holds `partition` completely under the current layout.
    pub fn metadata_partition_ready(&self, partition: u32) -> bool {
        let digest = self.layout_digest();
        let handover = self.handover.lock().expect("not poisoned");
        handover.layout_digest == digest && handover.ready_partitions.contains(&partition)
    }

    /// Whether this node holds every partition it replicates completely, under the
    /// current layout: what its heartbeat announces (set by the handover round).
    pub fn metadata_synced(&self) -> bool {
        let membership = self.membership.lock().expect("not poisoned");
        membership.metadata_synced_digest(&membership.me()) == Some(membership.layout_digest())
    }

    /// The handover state for the current layout (reset if the layout changed), with
    /// the partitions this node replicates under it.
    fn current_handover(&self, layout: &Arc<Layout>, digest: [u8; 32]) -> (BTreeSet<u32>, BTreeSet<u32>, bool) {
        let mut handover = self.handover.lock().expect("not poisoned");
        if handover.layout_digest != digest {
            *handover = HandoverState::restored(digest, BTreeSet::new());
        }
        let mine = handover
            .replicated_partitions
            .get_or_insert_with(|| self.replicated_partitions(layout))
            .clone();
        (
            mine,
            handover.ready_partitions.clone(),
            handover.former_partitions_checked,
        )
    }

    pub(crate) async fn handover_loop(self: Arc<Self>) {
        let interval_ms = self.membership_config().gossip_interval_ms;
        loop {
            let round = self.handover_round().await;
            if round.partitions_made_ready > 0 || round.partitions_dropped > 0 {
                tracing::info!(
                    made_ready = round.partitions_made_ready,
                    waiting = round.partitions_waiting,
                    rows_pulled = round.rows_pulled,
                    dropped = round.partitions_dropped,
                    "metadata handover"
                );
            }
            self.env.sleep(interval_ms).await;
        }
    }

    /// One step of the handover (see the module comment).
    pub async fn handover_round(self: &Arc<Self>) -> HandoverRound {
        let mut round = HandoverRound::default();
        if !self.is_joined() {
            return round;
        }
        let now_ms = self.env.now_ms();
        let (layout, digest, everyone_uses_it) = {
            let membership = self.membership.lock().expect("not poisoned");
            let digest = membership.layout_digest();
            (
                membership.shared_layout(),
                digest,
                membership.all_live_nodes_use_layout(&digest, now_ms),
            )
        };
        let (mine, ready, former_partitions_checked) = self.current_handover(&layout, digest);
        let waiting: BTreeSet<u32> = mine.difference(&ready).copied().collect();
        round.partitions_waiting = waiting.len() as u32;
        if waiting.is_empty() {
            self.membership
                .lock()
                .expect("not poisoned")
                .set_metadata_synced_digest(digest);
            if !former_partitions_checked {
                let (dropped, all_gone) = self.drop_former_partitions(&layout, &digest, &mine).await;
                round.partitions_dropped = dropped;
                let mut handover = self.handover.lock().expect("not poisoned");
                if handover.layout_digest == digest {
                    handover.former_partitions_checked = all_gone;
                }
            }
            return round;
        }
        self.membership
            .lock()
            .expect("not poisoned")
            .set_metadata_synced_digest([0; 32]);
        if !everyone_uses_it {
            return round;
        }

        let me = self.env.node_id();
        let sources: Vec<NodeId> = layout
            .entries()
            .filter(|entry| entry.node != me && entry.status != NodeStatus::Removed)
            .map(|entry| entry.node)
            .filter(|node| self.liveness(node) != Liveness::Down)
            .collect();
        let empty_root = empty_partition_root();
        let mut failed: BTreeSet<u32> = BTreeSet::new();
        let partitions: Vec<u32> = waiting.iter().copied().collect();
        for source in sources {
            let request = Request::MetaPartitionRoots {
                partitions: partitions.clone(),
                roots: Vec::new(),
            };
            let roots = match self.env.request(source, request, METADATA_TIMEOUT_MS).await {
                Ok(Response::MetaPartitionRoots { roots }) if roots.len() == partitions.len() => roots,
                other => {
                    // Without this holder's rows no waiting partition is known complete.
                    tracing::debug!(source = %source.short(), ?other, "handover: cannot list a holder's partitions");
                    return round;
                }
            };
            for (partition, their_root) in partitions.iter().zip(roots) {
                if their_root == empty_root || self.partition_root(*partition).ok() == Some(their_root) {
                    continue;
                }
                match self.sync_partition_from(source, *partition).await {
                    Ok(rows) => round.rows_pulled += rows,
                    Err(error) => {
                        tracing::debug!(partition, source = %source.short(), %error, "handover pull failed");
                        failed.insert(*partition);
                    }
                }
            }
        }
        // The pulled rows must be durable before the partition is declared complete.
        if let Err(error) = self.env.meta_store().flush().await {
            tracing::error!(%error, "cannot flush metadata pulled in a handover");
            return round;
        }
        let state = {
            let mut handover = self.handover.lock().expect("not poisoned");
            if handover.layout_digest != digest || self.layout_digest() != digest {
                // The layout changed while we pulled: start over under the new one.
                return round;
            }
            for partition in waiting.difference(&failed) {
                handover.ready_partitions.insert(*partition);
                round.partitions_made_ready += 1;
            }
            handover.clone()
        };
        if let Err(error) = self.persist_handover_state(state).await {
            tracing::error!(%error, "cannot persist the metadata handover state");
        }
        round
    }

    /// Drops the local rows of partitions this node no longer replicates, once every
    /// replica of each announced a complete copy under the current layout. Returns how
    /// many partitions it dropped and whether none is left.
    async fn drop_former_partitions(
        &self,
        layout: &Arc<Layout>,
        digest: &[u8; 32],
        mine: &BTreeSet<u32>,
    ) -> (u32, bool) {
        let empty_root = empty_partition_root();
        let (mut dropped, mut all_gone) = (0u32, true);
        for partition in (0..METADATA_PARTITIONS).filter(|partition| !mine.contains(partition)) {
            if self.partition_root(partition).map_or(true, |root| root == empty_root) {
                continue;
            }
            let Ok(replicas) = self.partition_replicas(layout, partition) else {
                all_gone = false;
                continue;
            };
            let all_complete = {
                let membership = self.membership.lock().expect("not poisoned");
                replicas
                    .replicas
                    .iter()
                    .all(|replica| membership.metadata_synced_digest(replica) == Some(*digest))
            };
            if !all_complete {
                all_gone = false;
                continue;
            }
            let store = self.env.meta_store();
            for table in Table::ALL {
                let mut keys = Vec::new();
                let scanned = self.for_each_local_row(table, partition, |key, _| keys.push(key.to_vec()));
                if let Err(error) = scanned {
                    tracing::warn!(%error, partition, "cannot scan a former partition");
                    all_gone = false;
                    continue;
                }
                for key in keys {
                    if let Err(error) = store.delete(Tree::Table(table), &key) {
                        tracing::warn!(%error, partition, "cannot drop a former partition's row");
                        all_gone = false;
                    }
                }
            }
            self.invalidate_partition_digest(partition);
            dropped += 1;
        }
        if dropped > 0 {
            if let Err(error) = self.env.meta_store().flush().await {
                tracing::error!(%error, "cannot flush after dropping former partitions");
                all_gone = false;
            }
        }
        (dropped, all_gone)
    }
}
