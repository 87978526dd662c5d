//! Membership state: the layout CRDT plus a gossip-based failure detector.
//!
//! Each node bumps its own heartbeat (generation, sequence) every gossip round and
//! gossips the heartbeats it knows to a few random peers (push-pull). A peer whose
//! heartbeat has not advanced for `down_after` is down; after half of that it is suspect.
//! Because heartbeats travel through any peer, a node need not talk to every other node
//! to know it is alive, and one slow link does not make a healthy node look dead.
//!
//! Pure state, no IO: time comes in as `now_ms`, randomness as a `u64`.

use std::collections::{btree_map::Entry, BTreeMap};
use std::sync::Arc;

use bdr_protocol::hlc::{HlcTimestamp, HybridClock};
use bdr_protocol::ids::NodeId;
use bdr_protocol::layout::{Layout, LayoutError, NodeSpec, NodeStatus};
use bdr_protocol::wire::{GossipLayout, PeerHeartbeat, LAYOUT_HEARTBEATS_MAX};
use serde::{Deserialize, Serialize};

/// How many peers each gossip round talks to.
pub const GOSSIP_FANOUT: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipConfig {
    pub down_after_ms: u64,
    pub gossip_interval_ms: u64,
    /// How often each metadata partition is compared with another replica.
    pub anti_entropy_interval_ms: u64,
    /// How long metadata tombstones are kept before removal.
    pub tombstone_grace_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    Up,
    Suspect,
    Down,
}

#[derive(Debug, Clone)]
struct HeartbeatView {
    heartbeat: PeerHeartbeat,
    /// Our local time when we last saw this heartbeat advance.
    advanced_at_ms: u64,
}

pub struct Membership {
    me: NodeId,
    config: MembershipConfig,
    /// Shared, so readers take it without copying; changes copy it first (rare).
    layout: Arc<Layout>,
    /// `layout.digest()`, kept current by every change (metadata requests carry it).
    layout_digest: [u8; 32],
    clock: HybridClock,
    own_heartbeat: PeerHeartbeat,
    heartbeats: BTreeMap<NodeId, HeartbeatView>,
    /// Local time at start: peers we have not heard from yet are given until
    /// `started_at_ms + down_after_ms` before they count as down.
    started_at_ms: u64,
}

impl Membership {
    /// `layout` is what was persisted before a restart (or empty); `own_spec` is this
    /// node's entry from its config; `generation` must exceed every earlier run's.
    pub fn new(
        me: NodeId,
        config: MembershipConfig,
        layout: Layout,
        mut own_spec: NodeSpec,
        generation: u64,
        now_ms: u64,
    ) -> Result<Membership, LayoutError> {
        // Status is the operator's intent (drain, remove), set through the admin API and
        // spread by gossip; a restart with the node's config must not undo it.
        if let Some(existing) = layout.get(&me) {
            own_spec.status = existing.status;
        }
        let mut membership = Membership {
            me,
            config,
            layout_digest: layout.digest(),
            layout: Arc::new(layout),
            clock: HybridClock::new(me),
            own_heartbeat: PeerHeartbeat {
                node: me,
                generation,
                sequence: 0,
                used_bytes: 0,
                addresses: Vec::new(),
                layout_digest: [0; 32],
                metadata_synced_digest: [0; 32],
            },
            heartbeats: BTreeMap::new(),
            started_at_ms: now_ms,
        };
        let stamp = membership.clock.now(now_ms);
        Arc::make_mut(&mut membership.layout).set_node(me, own_spec, stamp)?;
        membership.layout_digest = membership.layout.digest();
        membership.own_heartbeat.layout_digest = membership.layout_digest;
        Ok(membership)
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The layout, shared: the same allocation until the layout next changes.
    pub fn shared_layout(&self) -> Arc<Layout> {
        Arc::clone(&self.layout)
    }

    pub fn layout_digest(&self) -> [u8; 32] {
        self.layout_digest
    }

    /// Whether every node that is in the layout, not removed and not down (as far as we
    /// know) has announced that it uses the layout with `digest`.
    pub fn all_live_nodes_use_layout(&self, digest: &[u8; 32], now_ms: u64) -> bool {
        self.layout
            .entries()
            .filter(|entry| entry.node != self.me && entry.status != NodeStatus::Removed)
            .filter(|entry| self.liveness(&entry.node, now_ms) != Liveness::Down)
            .all(|entry| {
                self.heartbeats
                    .get(&entry.node)
                    .is_some_and(|view| view.heartbeat.layout_digest == *digest)
            })
    }

    /// The layout digest under which `node` last announced a complete metadata copy.
    pub fn metadata_synced_digest(&self, node: &NodeId) -> Option<[u8; 32]> {
        if *node == self.me {
            return Some(self.own_heartbeat.metadata_synced_digest);
        }
        self.heartbeats
            .get(node)
            .map(|view| view.heartbeat.metadata_synced_digest)
    }

    /// Records (for the next heartbeats) under which layout this node's metadata copy is
    /// complete.
    pub fn set_metadata_synced_digest(&mut self, digest: [u8; 32]) {
        self.own_heartbeat.metadata_synced_digest = digest;
    }

    pub fn config(&self) -> MembershipConfig {
        self.config
    }

    /// A fresh HLC timestamp for a local event.
    pub fn timestamp(&mut self, now_ms: u64) -> HlcTimestamp {
        self.clock.now(now_ms)
    }

    /// A fresh HLC timestamp above `floor` (see [`HybridClock::now_after`]).
    pub fn timestamp_after(&mut self, now_ms: u64, floor: &HlcTimestamp) -> HlcTimestamp {
        self.clock.now_after(now_ms, floor)
    }

    /// Sets another (or this) node's status, as an operator's command; returns whether
    /// the layout changed.
    pub fn set_status(&mut self, node: NodeId, status: NodeStatus, now_ms: u64) -> Result<bool, LayoutError> {
        let Some(entry) = self.layout.get(&node) else {
            return Ok(false);
        };
        let spec = NodeSpec {
            zone: entry.zone.clone(),
            capacity_bytes: entry.capacity_bytes,
            roles: entry.roles,
            status,
        };
        let stamp = self.clock.now(now_ms);
        let changed = Arc::make_mut(&mut self.layout).set_node(node, spec, stamp)?;
        self.layout_digest = self.layout.digest();
        Ok(changed)
    }

    /// Starts a gossip round: bumps our heartbeat with current usage and addresses.
    pub fn beat(&mut self, used_bytes: u64, addresses: Vec<String>) {
        self.own_heartbeat.sequence += 1;
        self.own_heartbeat.used_bytes = used_bytes;
        self.own_heartbeat.addresses = addresses;
        self.own_heartbeat.layout_digest = self.layout_digest;
    }

    /// What we send to `peer` in a gossip exchange: our layout digest, the whole layout
    /// only if `peer` may not have it, and every heartbeat we know.
    pub fn gossip_payload_for(&self, peer: &NodeId) -> (GossipLayout, Vec<PeerHeartbeat>) {
        let peer_digest = self.heartbeats.get(peer).map(|view| view.heartbeat.layout_digest);
        (
            self.gossip_layout(peer_digest != Some(self.layout_digest)),
            self.known_heartbeats(),
        )
    }

    /// What we answer a gossip whose sender's layout digest was `sender_digest` and whose
    /// heartbeats were `sent` (our layout already merged with whatever it sent): the
    /// whole layout unless the digests match, and only the heartbeats newer than the
    /// sender's. The sender holds what it sent, so the rest would tell it nothing; this
    /// halves what gossip carries and decodes.
    pub fn gossip_answer(
        &self,
        sender_digest: &[u8; 32],
        sent: &[PeerHeartbeat],
    ) -> (GossipLayout, Vec<PeerHeartbeat>) {
        let sender_knows: BTreeMap<NodeId, (u64, u64)> = sent
            .iter()
            .take(LAYOUT_HEARTBEATS_MAX)
            .map(|heartbeat| (heartbeat.node, (heartbeat.generation, heartbeat.sequence)))
            .collect();
        let is_news = |heartbeat: &PeerHeartbeat| {
            sender_knows
                .get(&heartbeat.node)
                .is_none_or(|known| *known < (heartbeat.generation, heartbeat.sequence))
        };
        let mut heartbeats: Vec<PeerHeartbeat> = Vec::new();
        if is_news(&self.own_heartbeat) {
            heartbeats.push(self.own_heartbeat.clone());
        }
        heartbeats.extend(
            self.heartbeats
                .values()
                .filter(|view| is_news(&view.heartbeat))
                .map(|view| view.heartbeat.clone()),
        );
        (self.gossip_layout(*sender_digest != self.layout_digest), heartbeats)
    }

    /// What we send to a peer known to have another layout (it refused a request for
    /// that): the whole layout, whatever its last heartbeat said.
    pub fn gossip_payload_whole(&self) -> (GossipLayout, Vec<PeerHeartbeat>) {
        (self.gossip_layout(true), self.known_heartbeats())
    }

    fn gossip_layout(&self, whole: bool) -> GossipLayout {
        GossipLayout {
            digest: self.layout_digest,
            layout: whole.then(|| Layout::clone(&self.layout)),
        }
    }

    fn known_heartbeats(&self) -> Vec<PeerHeartbeat> {
        let mut heartbeats = vec![self.own_heartbeat.clone()];
        heartbeats.extend(self.heartbeats.values().map(|view| view.heartbeat.clone()));
        heartbeats
    }

    /// Merges a peer's gossip message. A layout whose digest matches ours is not merged:
    /// merging copies the shared layout, and a new allocation costs every cache keyed
    /// by it a recomputation.
    pub fn absorb_gossip<'a>(
        &mut self,
        gossip: &GossipLayout,
        heartbeats: &'a [PeerHeartbeat],
        now_ms: u64,
    ) -> (bool, Vec<&'a PeerHeartbeat>) {
        let layout = gossip.layout.as_ref().filter(|_| gossip.digest != self.layout_digest);
        self.absorb(layout, heartbeats, now_ms)
    }

    /// Merges a peer's gossip (its layout, when it sent one). Returns whether our layout
    /// changed (so it must be persisted) and the heartbeats that advanced (so their
    /// addresses can be learned).
    pub fn absorb<'a>(
        &mut self,
        layout: Option<&Layout>,
        heartbeats: &'a [PeerHeartbeat],
        now_ms: u64,
    ) -> (bool, Vec<&'a PeerHeartbeat>) {
        let layout_changed = layout.is_some_and(|layout| Arc::make_mut(&mut self.layout).merge(layout));
        if layout_changed {
            self.layout_digest = self.layout.digest();
        }
        let mut advanced = Vec::new();
        for heartbeat in heartbeats.iter().take(LAYOUT_HEARTBEATS_MAX) {
            // Only nodes in the layout are tracked: an unknown id in a heartbeat does not
            // make anything exist, the layout does.
            if heartbeat.node == self.me || !heartbeat.is_well_formed() || self.layout.get(&heartbeat.node).is_none() {
                continue;
            }
            match self.heartbeats.entry(heartbeat.node) {
                Entry::Occupied(mut known) => {
                    let view = known.get_mut();
                    let newer = (heartbeat.generation, heartbeat.sequence)
                        > (view.heartbeat.generation, view.heartbeat.sequence);
                    if !newer {
                        continue;
                    }
                    copy_heartbeat(&mut view.heartbeat, heartbeat);
                    view.advanced_at_ms = now_ms;
                }
                Entry::Vacant(unknown) => {
                    unknown.insert(HeartbeatView {
                        heartbeat: heartbeat.clone(),
                        advanced_at_ms: now_ms,
                    });
                }
            }
            advanced.push(heartbeat);
        }
        (layout_changed, advanced)
    }

    /// Whether `node` is up, suspect or down as of `now_ms`.
    pub fn liveness(&self, node: &NodeId, now_ms: u64) -> Liveness {
        if *node == self.me {
            return Liveness::Up;
        }
        let last_sign_of_life_ms = self
            .heartbeats
            .get(node)
            .map_or(self.started_at_ms, |view| view.advanced_at_ms);
        let silent_ms = now_ms.saturating_sub(last_sign_of_life_ms);
        if silent_ms >= self.config.down_after_ms {
            Liveness::Down
        } else if silent_ms >= self.config.down_after_ms / 2 {
            Liveness::Suspect
        } else {
            Liveness::Up
        }
    }

    pub fn used_bytes(&self, node: &NodeId) -> Option<u64> {
        if *node == self.me {
            return Some(self.own_heartbeat.used_bytes);
        }
        self.heartbeats.get(node).map(|view| view.heartbeat.used_bytes)
    }

    /// Peers to gossip with this round: up to [`GOSSIP_FANOUT`] live ones chosen at random
    /// plus, now and then, one that looks down, so a recovered node is noticed even if it
    /// does not reach out itself.
    pub fn gossip_targets(&self, now_ms: u64, mut random: impl FnMut() -> u64) -> Vec<NodeId> {
        let (mut alive, down): (Vec<NodeId>, Vec<NodeId>) = self
            .layout
            .entries()
            .filter(|entry| entry.node != self.me && entry.status != NodeStatus::Removed)
            .map(|entry| entry.node)
            .partition(|node| self.liveness(node, now_ms) != Liveness::Down);
        // Partial Fisher-Yates over a deterministic (id-ordered) list.
        let mut targets = Vec::with_capacity(GOSSIP_FANOUT + 1);
        for slot in 0..GOSSIP_FANOUT.min(alive.len()) {
            let pick = slot + (random() % (alive.len() - slot) as u64) as usize;
            alive.swap(slot, pick);
            targets.push(alive[slot]);
        }
        if !down.is_empty() && random().is_multiple_of(4) {
            targets.push(down[(random() % down.len() as u64) as usize]);
        }
        targets
    }
}

/// `*into = from.clone()`, reusing `into`'s allocations (its addresses): every gossip
/// round advances every live node's heartbeat on every node, and allocating their
/// addresses anew each time was a large share of absorbing gossip. Every field is named,
/// so a new one cannot be forgotten here.
fn copy_heartbeat(into: &mut PeerHeartbeat, from: &PeerHeartbeat) {
    let PeerHeartbeat {
        node,
        generation,
        sequence,
        used_bytes,
        addresses,
        layout_digest,
        metadata_synced_digest,
    } = from;
    into.node = *node;
    into.generation = *generation;
    into.sequence = *sequence;
    into.used_bytes = *used_bytes;
    into.addresses.clone_from(addresses);
    into.layout_digest = *layout_digest;
    into.metadata_synced_digest = *metadata_synced_digest;
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdr_protocol::ids::ZoneName;
    use bdr_protocol::layout::NodeRoles;

    const CONFIG: MembershipConfig = MembershipConfig {
        down_after_ms: 1000,
        gossip_interval_ms: 100,
        anti_entropy_interval_ms: 1000,
        tombstone_grace_ms: 10_000,
    };

    fn spec(zone: &str) -> NodeSpec {
        NodeSpec {
            zone: ZoneName::new(zone).unwrap(),
            capacity_bytes: 1 << 30,
            roles: NodeRoles::STORAGE_AND_GATEWAY,
            status: NodeStatus::Active,
        }
    }

    fn member(index: u8, zone: &str) -> Membership {
        Membership::new(NodeId([index; 32]), CONFIG, Layout::new(), spec(zone), 1, 0).unwrap()
    }

    /// One push-pull exchange as the node runs it; returns how many whole layouts travelled.
    fn exchange(a: &mut Membership, b: &mut Membership, now_ms: u64) -> u32 {
        let (request_layout, heartbeats) = a.gossip_payload_for(&b.me());
        b.absorb_gossip(&request_layout, &heartbeats, now_ms);
        let (answer_layout, answer) = b.gossip_answer(&request_layout.digest, &heartbeats);
        a.absorb_gossip(&answer_layout, &answer, now_ms);
        u32::from(request_layout.layout.is_some()) + u32::from(answer_layout.layout.is_some())
    }

    #[test]
    fn a_gossip_answer_carries_only_the_heartbeats_the_sender_lacks() {
        let mut a = member(1, "a");
        let mut b = member(2, "b");
        let mut c = member(3, "c");
        for now_ms in [10, 20, 30] {
            for member in [&mut a, &mut b, &mut c] {
                member.beat(0, vec![]);
            }
            exchange(&mut a, &mut b, now_ms);
            exchange(&mut b, &mut c, now_ms);
            exchange(&mut c, &mut a, now_ms);
        }
        let sequence_of = |member: &Membership, node: NodeId| {
            member
                .known_heartbeats()
                .iter()
                .find(|heartbeat| heartbeat.node == node)
                .map(|heartbeat| heartbeat.sequence)
        };
        assert_eq!(sequence_of(&a, c.me()), Some(3));
        // c beats and tells b; b has not beaten since a last heard from it.
        c.beat(0, vec![]);
        exchange(&mut c, &mut b, 40);
        let (request_layout, request) = a.gossip_payload_for(&b.me());
        b.absorb_gossip(&request_layout, &request, 40);
        let (_, answer) = b.gossip_answer(&request_layout.digest, &request);
        let answered: Vec<NodeId> = answer.iter().map(|heartbeat| heartbeat.node).collect();
        assert_eq!(answered, vec![c.me()], "only c's newer beat is news to a");
        a.absorb(None, &answer, 40);
        assert_eq!(sequence_of(&a, c.me()), Some(4));
        // A sender that knows nothing gets everything.
        let stranger = member(4, "d");
        let (_, everything) = b.gossip_answer(&stranger.layout_digest(), &[]);
        assert_eq!(everything.len(), 3);
    }

    #[test]
    fn the_whole_layout_travels_only_while_digests_differ() {
        let mut a = member(1, "a");
        let mut b = member(2, "b");
        // Strangers: both layouts travel.
        assert_eq!(exchange(&mut a, &mut b, 10), 2);
        assert_eq!(a.layout_digest(), b.layout_digest());
        // a has not seen b beat since b merged, so a's belief is stale: a sends once more.
        a.beat(0, vec![]);
        b.beat(0, vec![]);
        assert_eq!(exchange(&mut a, &mut b, 20), 1);
        // Now each has seen the other's beat after the merge.
        assert_eq!(exchange(&mut b, &mut a, 30), 0, "agreeing nodes send digests only");
        assert_eq!(exchange(&mut a, &mut b, 30), 0, "agreeing nodes send digests only");
        // b changes the layout behind a's back; a still believes they agree, so a sends
        // no layout, and b's answer carries the change.
        b.set_status(b.me(), NodeStatus::Draining, 40).unwrap();
        assert_ne!(a.layout_digest(), b.layout_digest());
        assert_eq!(exchange(&mut a, &mut b, 50), 1);
        assert_eq!(a.layout_digest(), b.layout_digest());
        // Changes on both sides (neither has seen the other's beat since): converge too.
        a.set_status(a.me(), NodeStatus::Draining, 60).unwrap();
        let c = member(3, "c");
        let (c_layout, c_heartbeats) = c.gossip_payload_whole();
        b.absorb(c_layout.layout.as_ref(), &c_heartbeats, 60);
        exchange(&mut a, &mut b, 70);
        assert_eq!(a.layout_digest(), b.layout_digest());
        assert_eq!(a.layout().len(), 3);
    }

    #[test]
    fn gossip_spreads_the_layout_and_heartbeats_transitively() {
        let mut nodes = [member(1, "a"), member(2, "b"), member(3, "c")];
        let [a, b, c] = &mut nodes;
        exchange(a, b, 10);
        exchange(b, c, 20);
        // a never talked to c, yet after one more exchange through b it knows c is up.
        exchange(a, b, 30);
        assert_eq!(a.layout().len(), 3);
        assert_eq!(a.liveness(&c.me(), 40), Liveness::Up);
        assert_eq!(a.layout().digest(), b.layout().digest());
    }

    #[test]
    fn a_silent_node_becomes_suspect_then_down_and_comes_back() {
        let mut a = member(1, "a");
        let mut b = member(2, "b");
        exchange(&mut a, &mut b, 0);
        assert_eq!(a.liveness(&b.me(), 400), Liveness::Up);
        assert_eq!(a.liveness(&b.me(), 600), Liveness::Suspect);
        assert_eq!(a.liveness(&b.me(), 1000), Liveness::Down);
        // b restarts with a higher generation and gossips again.
        let mut restarted = Membership::new(b.me(), CONFIG, b.layout().clone(), spec("b"), 2, 1100).unwrap();
        restarted.beat(0, vec![]);
        exchange(&mut a, &mut restarted, 1100);
        assert_eq!(a.liveness(&b.me(), 1150), Liveness::Up);
    }

    #[test]
    fn an_advanced_heartbeat_replaces_the_stored_one_exactly() {
        let mut a = member(1, "a");
        let mut b = member(2, "b");
        let b_id = b.me();
        let stored_for_b = |a: &Membership| {
            let (_, known) = a.gossip_payload_whole();
            known.into_iter().find(|heartbeat| heartbeat.node == b_id)
        };
        // Addresses shrink, grow and change: the stored copy reuses its buffers.
        for (used_bytes, addresses) in [
            (
                5,
                vec!["/ip4/10.0.0.2/tcp/1".to_string(), "/ip4/10.0.0.2/udp/1".to_string()],
            ),
            (7, vec!["/ip4/10.0.0.9/tcp/2".to_string()]),
            (
                9,
                vec![
                    "/dns4/b/tcp/3".to_string(),
                    "/ip4/10.0.0.3/tcp/3".to_string(),
                    "x".repeat(40),
                ],
            ),
        ] {
            b.beat(used_bytes, addresses);
            let (layout, sent) = b.gossip_payload_whole();
            let (_, advanced) = a.absorb(layout.layout.as_ref(), &sent, 0);
            let own = sent
                .iter()
                .find(|heartbeat| heartbeat.node == b.me())
                .expect("b sends its own");
            assert_eq!(advanced, vec![own]);
            assert_eq!(stored_for_b(&a).as_ref(), Some(own));
            // The same heartbeat again is not news.
            assert!(a.absorb(None, &sent, 0).1.is_empty());
        }
    }

    #[test]
    fn stale_heartbeats_do_not_revive_a_node() {
        let mut a = member(1, "a");
        let mut b = member(2, "b");
        b.beat(0, vec![]);
        let (layout, stale) = b.gossip_payload_whole();
        a.absorb(layout.layout.as_ref(), &stale, 0);
        a.absorb(layout.layout.as_ref(), &stale, 900);
        assert_eq!(a.liveness(&b.me(), 1000), Liveness::Down);
    }

    #[test]
    fn heartbeats_of_nodes_outside_the_layout_and_oversized_ones_are_ignored() {
        let mut a = member(1, "a");
        let stranger = PeerHeartbeat {
            node: NodeId([9; 32]),
            generation: 1,
            sequence: 1,
            used_bytes: 0,
            addresses: vec![],
            layout_digest: [0; 32],
            metadata_synced_digest: [0; 32],
        };
        assert!(a.absorb(Some(&Layout::new()), &[stranger], 0).1.is_empty());
        let b = member(2, "b");
        let mut oversized = b.gossip_payload_whole().1.remove(0);
        oversized.addresses = vec!["x".repeat(10_000)];
        assert!(a.absorb(Some(b.layout()), &[oversized], 0).1.is_empty());
    }

    #[test]
    fn gossip_targets_are_distinct_live_peers() {
        let mut hub = member(0, "a");
        for index in 1..=8u8 {
            let mut other = member(index, "b");
            exchange(&mut hub, &mut other, 0);
        }
        let mut state = 7u64;
        let targets = hub.gossip_targets(10, || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            state >> 11
        });
        assert!(targets.len() >= GOSSIP_FANOUT);
        let mut distinct = targets.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), targets.len());
        assert!(!targets.contains(&hub.me()));
    }
}
