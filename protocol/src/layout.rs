//! The cluster layout: which nodes exist, in which zone, with what capacity and roles.
//!
//! The layout is a state-based CRDT so it can spread by gossip with no coordinator: a map
//! from node id to an entry, each entry carrying a revision counter and the hybrid
//! timestamp of its last change. Merging keeps, per node, the entry with the greater
//! (revision, timestamp), which is commutative, associative and idempotent, so every node
//! that has heard the same changes holds the same layout whatever order they arrived in.
//! Nodes are never deleted from the map: removal is a status, so a stale gossip message
//! cannot bring a removed node back.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::hlc::HlcTimestamp;
use crate::ids::{NodeId, ZoneName};

pub const LAYOUT_FORMAT_VERSION: u16 = 1;
/// Bound on the number of nodes a layout holds, so a gossip message has a bounded size.
pub const LAYOUT_NODES_MAX: usize = 4096;

/// What a node does. A storage-only node holds shards and metadata but never data keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeRoles {
    pub storage: bool,
    pub gateway: bool,
}

impl NodeRoles {
    pub const STORAGE_AND_GATEWAY: NodeRoles = NodeRoles {
        storage: true,
        gateway: true,
    };
    pub const STORAGE_ONLY: NodeRoles = NodeRoles {
        storage: true,
        gateway: false,
    };
}

/// The operator's intent for a node (liveness is separate: failure detection, not layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeStatus {
    /// Receives shards according to placement.
    Active,
    /// Receives no new shards; its shards move elsewhere.
    Draining,
    /// Gone for good; never placed on again.
    Removed,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LayoutEntry {
    pub node: NodeId,
    pub zone: ZoneName,
    pub capacity_bytes: u64,
    pub roles: NodeRoles,
    pub status: NodeStatus,
    /// Bumped on every change to this entry.
    pub revision: u64,
    pub updated_at: HlcTimestamp,
}

impl LayoutEntry {
    /// Whether placement may put new shards on this node.
    pub fn is_placement_candidate(&self) -> bool {
        self.status == NodeStatus::Active && self.roles.storage && self.capacity_bytes > 0
    }

    fn supersedes(&self, other: &LayoutEntry) -> bool {
        // Revision first, then time; equal (revision, time) can only come from the same
        // node writing twice in one tick, which the HLC rules out, but compare the whole
        // entry so the merge is total either way.
        (self.revision, self.updated_at, self) > (other.revision, other.updated_at, other)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("layout would exceed {LAYOUT_NODES_MAX} nodes")]
    TooManyNodes,
    #[error("capacity must be greater than zero")]
    ZeroCapacity,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    entries: BTreeMap<NodeId, LayoutEntry>,
}

/// A change an operator or a joining node makes to its own entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub zone: ZoneName,
    pub capacity_bytes: u64,
    pub roles: NodeRoles,
    pub status: NodeStatus,
}

impl Layout {
    pub fn new() -> Layout {
        Layout::default()
    }

    /// A number that grows with every change anyone makes: the sum of entry revisions.
    /// Two layouts with the same version may still differ; compare [`Layout::digest`].
    pub fn version(&self) -> u64 {
        self.entries.values().map(|entry| entry.revision).sum()
    }

    /// blake3 of the canonical encoding: equal digests mean equal layouts.
    pub fn digest(&self) -> [u8; 32] {
        let encoded = postcard::to_allocvec(self).expect("layout encodes");
        *blake3::hash(&encoded).as_bytes()
    }

    pub fn get(&self, node: &NodeId) -> Option<&LayoutEntry> {
        self.entries.get(node)
    }

    pub fn entries(&self) -> impl Iterator<Item = &LayoutEntry> {
        self.entries.values()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sets `node`'s entry to `spec` if that changes anything; returns whether it did.
    pub fn set_node(&mut self, node: NodeId, spec: NodeSpec, now: HlcTimestamp) -> Result<bool, LayoutError> {
        if spec.capacity_bytes == 0 && spec.status == NodeStatus::Active && spec.roles.storage {
            return Err(LayoutError::ZeroCapacity);
        }
        let revision = match self.entries.get(&node) {
            Some(existing) => {
                let unchanged = existing.zone == spec.zone
                    && existing.capacity_bytes == spec.capacity_bytes
                    && existing.roles == spec.roles
                    && existing.status == spec.status;
                if unchanged {
                    return Ok(false);
                }
                existing.revision + 1
            }
            None if self.entries.len() >= LAYOUT_NODES_MAX => return Err(LayoutError::TooManyNodes),
            None => 1,
        };
        self.entries.insert(
            node,
            LayoutEntry {
                node,
                zone: spec.zone,
                capacity_bytes: spec.capacity_bytes,
                roles: spec.roles,
                status: spec.status,
                revision,
                updated_at: now,
            },
        );
        Ok(true)
    }

    /// Merges another replica of the layout into this one; returns whether this changed.
    pub fn merge(&mut self, other: &Layout) -> bool {
        let mut changed = false;
        for (node, theirs) in &other.entries {
            let take = match self.entries.get(node) {
                Some(ours) => theirs.supersedes(ours),
                None => self.entries.len() < LAYOUT_NODES_MAX,
            };
            if take {
                self.entries.insert(*node, theirs.clone());
                changed = true;
            }
        }
        changed
    }

    /// Distinct zones of the nodes placement may use, in name order.
    pub fn candidate_zones(&self) -> Vec<&ZoneName> {
        let mut zones: Vec<&ZoneName> = self
            .entries
            .values()
            .filter(|entry| entry.is_placement_candidate())
            .map(|entry| &entry.zone)
            .collect();
        zones.sort();
        zones.dedup();
        zones
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn node_id(index: u16) -> NodeId {
        let mut bytes = [0u8; 32];
        bytes[..2].copy_from_slice(&index.to_le_bytes());
        bytes[31] = 0xAA;
        NodeId(bytes)
    }

    pub fn stamp(wall_ms: u64, node: u16) -> HlcTimestamp {
        HlcTimestamp {
            wall_ms,
            logical: 0,
            node: node_id(node),
        }
    }

    pub fn spec(zone: &str, capacity_bytes: u64) -> NodeSpec {
        NodeSpec {
            zone: ZoneName::new(zone).unwrap(),
            capacity_bytes,
            roles: NodeRoles::STORAGE_AND_GATEWAY,
            status: NodeStatus::Active,
        }
    }

    #[test]
    fn set_node_bumps_revision_only_on_change() {
        let mut layout = Layout::new();
        assert!(layout.set_node(node_id(1), spec("a", 10), stamp(1, 1)).unwrap());
        assert!(!layout.set_node(node_id(1), spec("a", 10), stamp(2, 1)).unwrap());
        assert_eq!(layout.version(), 1);
        assert!(layout.set_node(node_id(1), spec("a", 20), stamp(3, 1)).unwrap());
        assert_eq!(layout.version(), 2);
        assert_eq!(
            layout.set_node(node_id(2), spec("a", 0), stamp(3, 2)),
            Err(LayoutError::ZeroCapacity)
        );
    }

    #[test]
    fn stale_gossip_cannot_undo_a_removal() {
        let mut layout = Layout::new();
        layout.set_node(node_id(1), spec("a", 10), stamp(1, 1)).unwrap();
        let stale = layout.clone();
        let mut removed = spec("a", 10);
        removed.status = NodeStatus::Removed;
        layout.set_node(node_id(1), removed, stamp(2, 9)).unwrap();
        assert!(!layout.merge(&stale));
        assert_eq!(layout.get(&node_id(1)).unwrap().status, NodeStatus::Removed);
    }

    fn arbitrary_layout() -> impl Strategy<Value = Layout> {
        proptest::collection::vec((0u16..6, 0u64..4, 1u64..4, 0u64..3, 0u16..3), 0..12).prop_map(|changes| {
            let mut layout = Layout::new();
            for (node, revision, capacity, wall_ms, zone) in changes {
                layout.entries.insert(
                    node_id(node),
                    LayoutEntry {
                        node: node_id(node),
                        zone: ZoneName::new(format!("z{zone}")).unwrap(),
                        capacity_bytes: capacity,
                        roles: NodeRoles::STORAGE_AND_GATEWAY,
                        status: NodeStatus::Active,
                        revision,
                        updated_at: stamp(wall_ms, node),
                    },
                );
            }
            layout
        })
    }

    proptest! {
        #[test]
        fn layout_merge_is_commutative_associative_and_idempotent(
            a in arbitrary_layout(), b in arbitrary_layout(), c in arbitrary_layout()
        ) {
            let merged = |x: &Layout, y: &Layout| { let mut z = x.clone(); z.merge(y); z };
            prop_assert_eq!(merged(&a, &b), merged(&b, &a));
            prop_assert_eq!(merged(&merged(&a, &b), &c), merged(&a, &merged(&b, &c)));
            prop_assert_eq!(merged(&a, &a), a.clone());
            let ab = merged(&a, &b);
            prop_assert!(ab.version() >= a.version().max(b.version()));
            prop_assert_eq!(ab.digest(), merged(&b, &a).digest());
        }
    }
}
