//! Hybrid logical clock (Kulkarni et al.): timestamps that follow physical time when
//! clocks agree and still order causally related events when they do not.
//!
//! The clock never reads time itself: callers pass the physical time in milliseconds,
//! from the real clock in production or the virtual one in the simulator.

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// How far ahead of our own physical clock a remote timestamp may be before we refuse it.
/// A peer with a clock an hour fast would otherwise drag every HLC in the cluster along.
pub const REMOTE_CLOCK_AHEAD_MS_MAX: u64 = 10 * 60 * 1000;

/// A point in hybrid logical time. Totally ordered: wall time, then the logical counter,
/// then the node id, so two nodes never produce equal timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HlcTimestamp {
    pub wall_ms: u64,
    pub logical: u32,
    pub node: NodeId,
}

impl HlcTimestamp {
    pub const ZERO: HlcTimestamp = HlcTimestamp {
        wall_ms: 0,
        logical: 0,
        node: NodeId([0; 32]),
    };
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClockError {
    #[error("remote timestamp is {ahead_ms} ms ahead of our clock (limit {REMOTE_CLOCK_AHEAD_MS_MAX} ms)")]
    RemoteTooFarAhead { ahead_ms: u64 },
}

/// One node's hybrid logical clock.
#[derive(Debug, Clone)]
pub struct HybridClock {
    node: NodeId,
    last_wall_ms: u64,
    last_logical: u32,
}

impl HybridClock {
    pub fn new(node: NodeId) -> HybridClock {
        HybridClock {
            node,
            last_wall_ms: 0,
            last_logical: 0,
        }
    }

    fn advance_to(&mut self, wall_ms: u64, logical: u64) -> HlcTimestamp {
        // A logical counter overflow moves wall time one millisecond on instead.
        let (wall_ms, logical) = match u32::try_from(logical) {
            Ok(logical) => (wall_ms, logical),
            Err(_) => (wall_ms + 1, 0),
        };
        self.last_wall_ms = wall_ms;
        self.last_logical = logical;
        HlcTimestamp {
            wall_ms,
            logical,
            node: self.node,
        }
    }

    /// A timestamp for a local event, strictly greater than every timestamp this clock
    /// has produced or observed.
    pub fn now(&mut self, physical_ms: u64) -> HlcTimestamp {
        if physical_ms > self.last_wall_ms {
            self.advance_to(physical_ms, 0)
        } else {
            self.advance_to(self.last_wall_ms, u64::from(self.last_logical) + 1)
        }
    }

    /// A timestamp for a local write that must order after `floor` (the newest value the
    /// writer read). Unlike [`HybridClock::observe`] this accepts a floor far in the
    /// future: refusing would leave the key unwritable until our clock caught up, while
    /// "a later acknowledged write wins" must hold whatever the clocks say.
    pub fn now_after(&mut self, physical_ms: u64, floor: &HlcTimestamp) -> HlcTimestamp {
        if (floor.wall_ms, floor.logical) > (self.last_wall_ms, self.last_logical) {
            self.last_wall_ms = floor.wall_ms;
            self.last_logical = floor.logical;
        }
        self.now(physical_ms)
    }

    /// Takes a remote timestamp into account, so that later local timestamps exceed it.
    pub fn observe(&mut self, remote: &HlcTimestamp, physical_ms: u64) -> Result<(), ClockError> {
        let ahead_ms = remote.wall_ms.saturating_sub(physical_ms);
        if ahead_ms > REMOTE_CLOCK_AHEAD_MS_MAX {
            return Err(ClockError::RemoteTooFarAhead { ahead_ms });
        }
        let remote_position = (remote.wall_ms, remote.logical);
        if remote_position > (self.last_wall_ms, self.last_logical) {
            self.last_wall_ms = remote.wall_ms;
            self.last_logical = remote.logical;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn timestamps_are_strictly_increasing_even_when_physical_time_stalls_or_goes_back() {
        let mut clock = HybridClock::new(NodeId([1; 32]));
        let mut previous = HlcTimestamp::ZERO;
        for physical_ms in [5, 5, 5, 3, 10, 1, 10, 11] {
            let next = clock.now(physical_ms);
            assert!(next > previous, "{next:?} <= {previous:?}");
            previous = next;
        }
    }

    #[test]
    fn a_node_with_a_slow_clock_still_writes_after_what_it_has_seen() {
        let mut fast = HybridClock::new(NodeId([1; 32]));
        let mut slow = HybridClock::new(NodeId([2; 32]));
        let first = fast.now(1_000_000 + 5 * 60 * 1000);
        slow.observe(&first, 1_000_000).unwrap();
        assert!(slow.now(1_000_000) > first);
    }

    #[test]
    fn remote_timestamps_far_in_the_future_are_refused() {
        let mut clock = HybridClock::new(NodeId([1; 32]));
        let remote = HlcTimestamp {
            wall_ms: 1_000 + REMOTE_CLOCK_AHEAD_MS_MAX + 1,
            logical: 0,
            node: NodeId([2; 32]),
        };
        assert!(clock.observe(&remote, 1_000).is_err());
        assert_eq!(clock.now(1_000).wall_ms, 1_000);
    }

    #[test]
    fn now_after_orders_after_a_floor_from_a_clock_far_ahead() {
        let mut clock = HybridClock::new(NodeId([1; 32]));
        let floor = HlcTimestamp {
            wall_ms: 1_000 + 3 * REMOTE_CLOCK_AHEAD_MS_MAX,
            logical: 7,
            node: NodeId([2; 32]),
        };
        let stamp = clock.now_after(1_000, &floor);
        assert!(stamp > floor);
        assert!(clock.now(1_000) > stamp);
    }

    #[test]
    fn logical_overflow_moves_wall_time() {
        let mut clock = HybridClock::new(NodeId([1; 32]));
        clock.last_wall_ms = 7;
        clock.last_logical = u32::MAX;
        let next = clock.now(7);
        assert_eq!((next.wall_ms, next.logical), (8, 0));
    }

    proptest! {
        #[test]
        fn causality_holds_across_random_message_exchanges(
            steps in proptest::collection::vec((0usize..3, 0u64..50, any::<bool>()), 1..100)
        ) {
            let mut clocks: Vec<HybridClock> = (0..3u8).map(|i| HybridClock::new(NodeId([i; 32]))).collect();
            let mut physical = [0u64; 3];
            let mut last_sent: Option<HlcTimestamp> = None;
            for (node, tick, receive) in steps {
                physical[node] += tick;
                if receive {
                    if let Some(message) = last_sent {
                        // Skew stays within the limit here; refusal is tested above.
                        let _ = clocks[node].observe(&message, physical[node]);
                        let stamp = clocks[node].now(physical[node]);
                        if message.wall_ms <= physical[node] + REMOTE_CLOCK_AHEAD_MS_MAX {
                            prop_assert!(stamp > message);
                        }
                    }
                }
                last_sent = Some(clocks[node].now(physical[node]));
            }
        }
    }
}
