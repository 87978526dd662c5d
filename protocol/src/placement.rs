//! Zone-aware placement: which node holds which shard of a stripe.
//!
//! A pure function of (layout, stripe id, k, m), in two steps:
//!
//! 1. Zones: the stripe's shard indexes are dealt round-robin over the zones that have
//!    candidate nodes, in an order ranked per stripe by hash. Each zone thus gets
//!    floor or ceil((k+m) / zones) shards, so whenever zones × m ≥ k+m no zone holds more
//!    than m and the stripe survives the loss of a whole zone. With fewer zones the spread
//!    is as even as it can be, and [`Placement`] reports the real tolerance.
//! 2. Nodes: within its zone, each index goes to the node with the best weighted
//!    rendezvous score (highest random weight, weighted by capacity) for (stripe, index)
//!    that holds no shard of the stripe yet; a zone with fewer nodes than indexes doubles
//!    up (keeping the zone guarantee, which matters more than the node guarantee).
//!
//! Adding or removing a node changes only its own zone's choices, and there only the
//! indexes where it wins or held the slot (plus rare within-zone knock-on moves): about
//! (k+m)/N shards per stripe. Adding or removing a whole zone reshuffles, as it must.
//!
//! Scores use integer fixed-point logarithms, never floats: every node, whatever its CPU
//! or libm, must compute the same placement bit for bit.

use std::collections::BTreeMap;

use crate::ids::{NodeId, StripeId, ZoneName};
use crate::layout::{Layout, LayoutEntry};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    #[error("no storage node is available for placement")]
    NoNodes,
    #[error("k+m must be at least 1")]
    NoShards,
}

/// The holders of one stripe's shards, by shard index, and what the stripe survives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub holders: Vec<NodeId>,
    /// How many whole zones may be lost with the stripe still readable.
    pub zone_failures_tolerated: u32,
    /// How many nodes (any ones) may be lost with the stripe still readable.
    pub node_failures_tolerated: u32,
}

/// -log2(u) in Q32 fixed point for u = (hash + 1) / 2^64, in (0, 64].
fn negative_log2_q32(hash: u64) -> u128 {
    let Some(value) = hash.checked_add(1) else {
        return 0; // u = 1
    };
    let leading = value.leading_zeros();
    let integer_part = u128::from(63 - leading);
    // Mantissa in Q63: [2^63, 2^64). It stays below 2^64, so each square is one
    // 64 x 64 -> 128-bit multiply (a u128 x u128 multiply was most of the placement's
    // time: 32 of them per score, and every stripe's placement scores every candidate).
    let mut mantissa: u64 = value << leading;
    let mut fraction: u128 = 0;
    for bit in (0..32).rev() {
        let square_q63 = (u128::from(mantissa) * u128::from(mantissa)) >> 63; // [2^63, 2^65)
        if square_q63 >= 1 << 64 {
            mantissa = (square_q63 >> 1) as u64;
            fraction |= 1 << bit;
        } else {
            mantissa = square_q63 as u64;
        }
    }
    let log2_value = (integer_part << 32) | fraction;
    (64u128 << 32) - log2_value
}

fn mix64(mut value: u64) -> u64 {
    // splitmix64 finaliser: spreads one 64-bit hash into independent per-slot values.
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

struct Candidate<'a> {
    entry: &'a LayoutEntry,
    zone_index: usize,
    stripe_hash: u64,
}

impl Candidate<'_> {
    /// Weighted rendezvous score as a fraction (-log2 u, weight); smaller wins.
    fn score(&self, slot: u8) -> (u128, u128) {
        let slot_hash = mix64(self.stripe_hash ^ (u64::from(slot) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        (negative_log2_q32(slot_hash), u128::from(self.entry.capacity_bytes))
    }
}

fn wins(challenger: (u128, u128), holder: (u128, u128)) -> bool {
    // a/wa < b/wb  <=>  a*wb < b*wa  (no overflow: 2^38 * 2^64 < 2^128)
    challenger.0 * holder.1 < holder.0 * challenger.1
}

/// Places the k+m shards of `stripe_id` on the layout's active storage nodes.
pub fn place(
    layout: &Layout,
    stripe_id: &StripeId,
    data_shards: u8,
    parity_shards: u8,
) -> Result<Placement, PlacementError> {
    place_with(layout, stripe_id, data_shards, parity_shards, |_| true)
}

/// Like [`place`], but only on nodes for which `available` is true: used to find where a
/// shard goes while its preferred holder is down.
pub fn place_with(
    layout: &Layout,
    stripe_id: &StripeId,
    data_shards: u8,
    parity_shards: u8,
    available: impl Fn(&NodeId) -> bool,
) -> Result<Placement, PlacementError> {
    let total_shards = data_shards
        .checked_add(parity_shards)
        .filter(|total| *total > 0)
        .ok_or(PlacementError::NoShards)?;
    let entries: Vec<&LayoutEntry> = layout
        .entries()
        .filter(|entry| entry.is_placement_candidate() && available(&entry.node))
        .collect();
    if entries.is_empty() {
        return Err(PlacementError::NoNodes);
    }
    let mut zones: Vec<&ZoneName> = entries.iter().map(|entry| &entry.zone).collect();
    zones.sort();
    zones.dedup();
    let stripe_key = {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"bdr placement v1");
        hasher.update(stripe_id.as_bytes());
        *hasher.finalize().as_bytes()
    };
    let hash_with_stripe = |bytes: &[u8]| {
        let digest = blake3::keyed_hash(&stripe_key, bytes);
        u64::from_le_bytes(digest.as_bytes()[..8].try_into().expect("8 bytes"))
    };
    // Zones in this stripe's order; ties (astronomically unlikely) fall back to name order.
    let mut zone_order: Vec<(u64, usize)> = zones
        .iter()
        .enumerate()
        .map(|(zone_index, zone)| (hash_with_stripe(zone.as_str().as_bytes()), zone_index))
        .collect();
    zone_order.sort_unstable();
    let candidates: Vec<Candidate> = entries
        .iter()
        .map(|entry| Candidate {
            entry,
            zone_index: zones.binary_search(&&entry.zone).expect("zone listed"),
            stripe_hash: hash_with_stripe(entry.node.as_bytes()),
        })
        .collect();

    let mut shards_per_zone = vec![0usize; zones.len()];
    let mut used = vec![false; candidates.len()];
    let mut holders = Vec::with_capacity(usize::from(total_shards));
    for slot in 0..total_shards {
        let zone_index = zone_order[usize::from(slot) % zone_order.len()].1;
        let mut best: Option<(bool, usize, (u128, u128))> = None;
        for (index, candidate) in candidates.iter().enumerate() {
            if candidate.zone_index != zone_index {
                continue;
            }
            let score = candidate.score(slot);
            let better = match best {
                None => true,
                // An unused node beats a used one; then the better score wins.
                Some((best_used, _, best_score)) => {
                    (!used[index] && best_used) || (used[index] == best_used && wins(score, best_score))
                }
            };
            if better {
                best = Some((used[index], index, score));
            }
        }
        let (_, chosen, _) = best.expect("every listed zone has a candidate");
        used[chosen] = true;
        shards_per_zone[zone_index] += 1;
        holders.push(candidates[chosen].entry.node);
    }

    let shards_per_node = holders.iter().fold(BTreeMap::new(), |mut counts, node| {
        *counts.entry(*node).or_insert(0usize) += 1;
        counts
    });
    Ok(Placement {
        zone_failures_tolerated: failures_tolerated(shards_per_zone, data_shards),
        node_failures_tolerated: failures_tolerated(shards_per_node.into_values().collect(), data_shards),
        holders,
    })
}

/// How many of the groups (zones or nodes) holding `shard_counts` may be lost, worst case
/// (largest groups first), while at least `data_shards` shards remain.
pub fn failures_tolerated(mut shard_counts: Vec<usize>, data_shards: u8) -> u32 {
    shard_counts.sort_unstable_by(|a, b| b.cmp(a));
    let mut remaining: usize = shard_counts.iter().sum();
    let mut tolerated = 0u32;
    for count in shard_counts.into_iter().filter(|count| *count > 0) {
        remaining -= count;
        if remaining < usize::from(data_shards) {
            break;
        }
        tolerated += 1;
    }
    tolerated
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::tests::{node_id, spec, stamp};
    use proptest::prelude::*;

    /// The first implementation, all in u128: placement must never move, so the faster
    /// one must give exactly its answers.
    fn negative_log2_q32_reference(hash: u64) -> u128 {
        let value = u128::from(hash) + 1;
        if value == 1 << 64 {
            return 0;
        }
        let leading = (value as u64).leading_zeros();
        let integer_part = u128::from(63 - leading);
        let mut mantissa: u128 = value << leading;
        let mut fraction: u128 = 0;
        for bit in (0..32).rev() {
            mantissa = (mantissa * mantissa) >> 63;
            if mantissa >= 1 << 64 {
                mantissa >>= 1;
                fraction |= 1 << bit;
            }
        }
        let log2_value = (integer_part << 32) | fraction;
        (64u128 << 32) - log2_value
    }

    #[test]
    fn the_log_matches_the_first_implementation_at_the_edges() {
        let mut edges = vec![0, 1, 2, 3, u64::MAX, u64::MAX - 1, u64::MAX / 2, u64::MAX / 3];
        edges.extend((0..64).flat_map(|shift| [(1u64 << shift) - 1, 1u64 << shift, (1u64 << shift) + 1]));
        for hash in edges {
            assert_eq!(
                negative_log2_q32(hash),
                negative_log2_q32_reference(hash),
                "hash {hash:#x}"
            );
        }
    }

    #[test]
    fn the_log_matches_the_first_implementation_on_many_hashes() {
        for index in 0..200_000u64 {
            // Spread over every magnitude: a mixed value shifted right by 0 to 63 bits.
            let hash = mix64(index) >> (index % 64);
            assert_eq!(
                negative_log2_q32(hash),
                negative_log2_q32_reference(hash),
                "hash {hash:#x}"
            );
        }
    }

    fn layout_of(nodes: &[(u16, &str, u64)]) -> Layout {
        let mut layout = Layout::new();
        for (index, zone, capacity) in nodes {
            layout
                .set_node(node_id(*index), spec(zone, *capacity), stamp(1, *index))
                .unwrap();
        }
        layout
    }

    fn stripe(index: u32) -> StripeId {
        StripeId(*blake3::hash(&index.to_le_bytes()).as_bytes())
    }

    fn zone_of<'a>(layout: &'a Layout, node: &NodeId) -> &'a ZoneName {
        &layout.get(node).unwrap().zone
    }

    #[test]
    fn fixed_point_log_matches_float_log_closely() {
        for hash in [0u64, 1, 12345, 1 << 40, u64::MAX / 3, u64::MAX - 1, u64::MAX] {
            let fixed = negative_log2_q32(hash) as f64 / (1u64 << 32) as f64;
            let exact = -(((hash as f64) + 1.0) / 2f64.powi(64)).log2();
            assert!((fixed - exact).abs() < 1e-6, "{hash}: {fixed} vs {exact}");
        }
    }

    #[test]
    fn six_nodes_three_zones_four_plus_two_survives_any_zone() {
        let layout = layout_of(&[
            (1, "a", 10),
            (2, "a", 10),
            (3, "b", 10),
            (4, "b", 10),
            (5, "c", 10),
            (6, "c", 10),
        ]);
        for index in 0..500 {
            let placement = place(&layout, &stripe(index), 4, 2).unwrap();
            assert_eq!(placement.zone_failures_tolerated, 1);
            assert_eq!(placement.node_failures_tolerated, 2);
            let mut distinct = placement.holders.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), 6);
        }
    }

    #[test]
    fn too_few_zones_is_reported_honestly() {
        let layout = layout_of(&[
            (1, "a", 10),
            (2, "a", 10),
            (3, "a", 10),
            (4, "b", 10),
            (5, "b", 10),
            (6, "b", 10),
        ]);
        let placement = place(&layout, &stripe(1), 4, 2).unwrap();
        assert_eq!(placement.zone_failures_tolerated, 0);
        assert_eq!(placement.node_failures_tolerated, 2);
        let single = layout_of(&[(1, "a", 10)]);
        let placement = place(&single, &stripe(1), 4, 2).unwrap();
        assert_eq!(placement.holders, vec![node_id(1); 6]);
        assert_eq!(placement.node_failures_tolerated, 0);
        assert_eq!(place(&Layout::new(), &stripe(1), 4, 2), Err(PlacementError::NoNodes));
    }

    #[test]
    fn a_small_zone_doubles_up_rather_than_overloading_another_zone() {
        let layout = layout_of(&[
            (1, "a", 10),
            (2, "b", 10),
            (3, "b", 10),
            (4, "b", 10),
            (5, "c", 10),
            (6, "c", 10),
            (7, "c", 10),
        ]);
        for index in 0..200 {
            let placement = place(&layout, &stripe(index), 4, 2).unwrap();
            assert_eq!(placement.zone_failures_tolerated, 1, "stripe {index}");
        }
    }

    #[test]
    fn capacity_weights_the_share_of_shards() {
        let layout = layout_of(&[
            (1, "a", 30),
            (2, "a", 10),
            (3, "b", 10),
            (4, "b", 10),
            (5, "c", 10),
            (6, "c", 10),
        ]);
        let mut counts = BTreeMap::new();
        for index in 0..3000 {
            // k+m = 3 over 3 zones: one shard per zone, so node 1 vs node 2 is pure weighting.
            for holder in place(&layout, &stripe(index), 2, 1).unwrap().holders {
                *counts.entry(holder).or_insert(0u32) += 1;
            }
        }
        let heavy = f64::from(counts[&node_id(1)]);
        let light = f64::from(counts[&node_id(2)]);
        assert!((heavy / light - 3.0).abs() < 0.4, "ratio {}", heavy / light);
    }

    #[test]
    fn down_nodes_are_replaced_within_their_zone() {
        let layout = layout_of(&[
            (1, "a", 10),
            (2, "a", 10),
            (3, "a", 10),
            (4, "b", 10),
            (5, "b", 10),
            (6, "b", 10),
            (7, "c", 10),
            (8, "c", 10),
            (9, "c", 10),
        ]);
        for index in 0..200 {
            let normal = place(&layout, &stripe(index), 4, 2).unwrap();
            let down = normal.holders[0];
            let degraded = place_with(&layout, &stripe(index), 4, 2, |node| *node != down).unwrap();
            assert!(!degraded.holders.contains(&down));
            assert_eq!(degraded.zone_failures_tolerated, 1);
        }
    }

    fn arbitrary_layout() -> impl Strategy<Value = Vec<(u16, u8, u64)>> {
        // 4..=24 nodes over 3..=5 zones with capacities 1..=4 units.
        (3u8..=5)
            .prop_flat_map(|zones| proptest::collection::vec((0u8..zones, 1u64..=4), 4..=24))
            .prop_map(|nodes| {
                nodes
                    .into_iter()
                    .enumerate()
                    .map(|(index, (zone, capacity))| (index as u16 + 1, zone, capacity))
                    .collect()
            })
    }

    fn build(nodes: &[(u16, u8, u64)]) -> Layout {
        let mut layout = Layout::new();
        for (index, zone, capacity) in nodes {
            layout
                .set_node(
                    node_id(*index),
                    spec(&format!("z{zone}"), *capacity << 30),
                    stamp(1, *index),
                )
                .unwrap();
        }
        layout
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn placement_is_deterministic_and_keeps_the_zone_rule(nodes in arbitrary_layout(), k in 1u8..=8, m in 0u8..=4) {
            let layout = build(&nodes);
            let zone_count = layout.candidate_zones().len();
            for index in 0..40 {
                let placement = place(&layout, &stripe(index), k, m).unwrap();
                prop_assert_eq!(&placement, &place(&layout.clone(), &stripe(index), k, m).unwrap());
                prop_assert_eq!(placement.holders.len(), usize::from(k + m));
                let mut per_zone: BTreeMap<&ZoneName, usize> = BTreeMap::new();
                for holder in &placement.holders {
                    *per_zone.entry(zone_of(&layout, holder)).or_default() += 1;
                }
                let quota = usize::from(k + m).div_ceil(zone_count);
                let most = *per_zone.values().max().unwrap();
                prop_assert!(most <= quota, "zone holds {} > quota {}", most, quota);
                if zone_count * usize::from(m) >= usize::from(k + m) {
                    prop_assert!(most <= usize::from(m), "zone holds {} > m={}", most, m);
                    prop_assert!(placement.zone_failures_tolerated >= 1);
                }
            }
        }

        #[test]
        fn adding_or_removing_one_node_moves_few_shards(nodes in arbitrary_layout(), k in 2u8..=6, m in 1u8..=3) {
            let before = build(&nodes);
            let mut grown_nodes = nodes.clone();
            let newcomer = (nodes.len() as u16 + 1, nodes[0].1, 2);
            grown_nodes.push(newcomer);
            let after_join = build(&grown_nodes);
            // Remove a node whose zone keeps other nodes: losing a whole zone changes the
            // zone count and must reshuffle, which is a different (rarer) event.
            let leaver = (0..nodes.len()).find(|i| nodes.iter().filter(|n| n.1 == nodes[*i].1).count() >= 2);
            prop_assume!(leaver.is_some());
            let mut shrunk_nodes = nodes.clone();
            shrunk_nodes.remove(leaver.unwrap());
            let after_leave = build(&shrunk_nodes);
            let node_count = nodes.len() as f64;
            let stripes = 300u32;
            let total = f64::from(stripes) * f64::from(k + m);
            let newcomer_id = node_id(newcomer.0);
            let leaver_id = node_id(nodes[leaver.unwrap()].0);
            for (after, label, changed_node) in [(&after_join, "join", newcomer_id), (&after_leave, "leave", leaver_id)] {
                let mut moved = 0u32;
                let mut unavoidable = 0u32;
                for index in 0..stripes {
                    let old = place(&before, &stripe(index), k, m).unwrap().holders;
                    let new = place(after, &stripe(index), k, m).unwrap().holders;
                    moved += old.iter().zip(&new).filter(|(a, b)| a != b).count() as u32;
                    // Shards the joining node must receive or the leaving node must hand off.
                    unavoidable += old.iter().chain(&new).filter(|holder| **holder == changed_node).count() as u32;
                }
                let moved_fraction = f64::from(moved) / total;
                let unavoidable_fraction = f64::from(unavoidable) / total;
                // The bound the design asks for, always.
                prop_assert!(moved_fraction <= 2.0 * f64::from(k + m) / node_count);
                // What must move is what the changed node holds; knock-on moves inside its
                // zone add some (1.16x on average over these layouts). Where zones are too
                // small to give every shard its own node, nodes double up and knock-on can
                // exceed 2x, so the tighter bound is claimed only where every zone has a
                // spare node beyond its share of a stripe.
                let zone_count = before.candidate_zones().len();
                let share = usize::from(k + m).div_ceil(zone_count);
                let roomy = [&before, after].iter().all(|layout| {
                    layout.candidate_zones().iter().all(|zone| {
                        layout.entries().filter(|entry| &entry.zone == *zone).count() > share
                    })
                });
                if roomy {
                    let bound = 2.0 * unavoidable_fraction + 3.0 * (unavoidable_fraction / total).sqrt() + 0.01;
                    prop_assert!(moved_fraction <= bound, "{}: moved {:.3} > bound {:.3} (unavoidable {:.3}, N={})",
                        label, moved_fraction, bound, unavoidable_fraction, node_count);
                }
            }
        }
    }
}

#[cfg(test)]
mod golden {
    use super::*;
    use crate::layout::tests::{node_id, spec, stamp};

    /// Placement is part of the on-disk contract: every node of a cluster, old build or
    /// new, must compute the same holders. If this test fails, a change altered placement
    /// and would move every stripe of every running cluster; that needs a placement
    /// version, not a test update.
    #[test]
    fn placement_of_known_stripes_never_changes() {
        let mut layout = Layout::new();
        for (index, zone, capacity) in [
            (1u16, "a", 10u64),
            (2, "a", 20),
            (3, "b", 10),
            (4, "b", 10),
            (5, "c", 30),
            (6, "c", 10),
            (7, "c", 10),
        ] {
            layout
                .set_node(node_id(index), spec(zone, capacity << 30), stamp(1, index))
                .unwrap();
        }
        let observed: Vec<Vec<u8>> = (0u32..4)
            .map(|index| {
                let stripe_id = StripeId(*blake3::hash(&index.to_le_bytes()).as_bytes());
                place(&layout, &stripe_id, 4, 2)
                    .unwrap()
                    .holders
                    .iter()
                    .map(|node| node.0[0])
                    .collect()
            })
            .collect();
        let golden = [
            [4, 5, 1, 3, 7, 2],
            [5, 1, 4, 6, 2, 3],
            [4, 2, 7, 3, 1, 5],
            [4, 2, 5, 3, 1, 7],
        ];
        assert_eq!(observed, golden);
    }
}
