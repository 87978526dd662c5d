//! `bdr-sim durability`: how likely is the cluster to lose data in a year, at a scale
//! (thousands of nodes, billions of stripes) no run of the real node logic can reach.
//!
//! Pure computation, deterministic from the seed: the same arguments and seed give the
//! same report, bit for bit.
//!
//! # The Monte Carlo model
//!
//! * `nodes` nodes are dealt round-robin over `zones` zones (zone sizes differ by at most
//!   one). Each node stores `node_data_bytes` of shards (it is assumed full).
//! * A stripe is `stripe_length_bytes` of data cut into k data shards plus m parity shards,
//!   so the cluster holds `stripes = nodes × node_data_bytes / shard_bytes / (k+m)`.
//! * Placement follows `bdr_protocol::placement`: a stripe's shards are dealt round-robin
//!   over the zones in a per-stripe random order, so each zone gets floor or
//!   ceil((k+m)/zones) shards (which zones get the extra one is uniformly random), and
//!   inside a zone each shard goes to a distinct node. Rendezvous hashing over equal
//!   capacities makes that node choice uniform, so the model draws it uniformly.
//! * Node failures are a Poisson process: every healthy node fails at `afr` per year (the
//!   rate, not 1-exp(-rate)). A failed node's shards are gone; after the detection delay
//!   they are rebuilt onto the other nodes at `repair_bandwidth_bytes_per_second`, each
//!   failed node independently and in parallel, so its data is unavailable-and-unrepaired
//!   for `detect + node_data_bytes / bandwidth`.
//! * Zone outages (optional) are a Poisson process per zone, each lasting
//!   `zone_outage_hours`; the zone's shards come back afterwards. An outage loses nothing by
//!   itself, but if a zone holds m or more shards of some stripe, a stripe that also lost a
//!   shard on a failed node has fewer than k shards left to rebuild it from, so rebuilds are
//!   paused until the zone returns (conservative: in reality the other stripes progress).
//!   Outages and failures together can make data temporarily unreadable; that is reported
//!   apart from loss.
//! * Data is lost when some stripe has more than m shards on failed, not yet rebuilt nodes.
//!
//! # Approximations
//!
//! There are far too many stripes to simulate one by one, so the model tracks only the
//! set of failed, not yet rebuilt nodes. Whenever a failure joins that set, the chance
//! that one stripe placed by the rule above has more than m shards on the failed set is
//! computed exactly from the zone counts ([`stripe_loss_probability`]); the stripes newly
//! lost by this failure are those over the line now but not before. Treating the
//! `stripes` stripes as independent placements, the arrival loses data with probability
//! `1 - (1 - p_new)^stripes`, and the year's loss probability is one minus the product of
//! the survivals of its arrivals. Averaging that conditional probability over the
//! simulated years (rather than counting years with a loss) estimates the annual loss
//! probability with far less variance, since a year with an overlap of failures
//! contributes its exact risk whether or not the dice then came up "lost".
//!
//! Further simplifications, each named so its direction is clear:
//! * Repair is per failed node, all of its data, in one stretch. The real maintainer
//!   rebuilds the stripes with the fewest survivors first, which shortens the window in
//!   which a stripe can reach m+1 lost shards: this model is pessimistic about that.
//! * A stripe lost twice (lost, then its other shards' nodes fail again) is counted twice;
//!   that needs 2m+2 overlapping failures and is negligible.
//! * Every stripe's placement is drawn afresh (stripes are independent); the rebuilt data
//!   of a failed node is spread like new data.
//! * Failures are independent: no correlated disk batches, no failures caused by repair
//!   load.
//!
//! # The analytic MTTDL
//!
//! The classic Markov chain for one group of n = k+m nodes: state i = failed nodes, a
//! failure moves i → i+1 at rate (n-i)·λ, a repair moves i → i-1 at rate i·μ (each failed
//! node is rebuilt independently, as in the Monte Carlo model), data is lost on reaching
//! m+1. For μ ≫ λ:
//!
//! ```text
//! MTTDL_group ≈ m! · μ^m / (λ^(m+1) · n·(n-1)···(n-m))
//! ```
//!
//! with λ = afr per node-year and μ = 1 / (detect + node_data_bytes / bandwidth). (The
//! textbook form without the m! assumes one repair at a time; with parallel rebuilds it
//! would overstate the loss rate m!-fold.)
//!
//! A cluster is not a set of disjoint groups: every (m+1)-node set that shares a stripe
//! can lose data, and one such set lies in many overlapping (k+m)-sets, so multiplying by
//! the number of (k+m)-sets holding stripes counts each loss many times over (at 1000
//! nodes, hundreds of times). The formula is therefore scaled by the number of
//! *equivalent independent groups*:
//!
//! ```text
//! groups = Σ over (m+1)-node sets F of P(some stripe has m+1 shards on F) / C(n, m+1)
//! rate   = groups / MTTDL_group          (losses per year)
//! P_year = 1 - exp(-rate)
//! ```
//!
//! The sum runs over zone patterns of F (sets entirely inside one zone cannot hold m+1
//! shards of a stripe when zones allow spreading), with the same per-stripe probability
//! the Monte Carlo uses. It holds to first order in (nodes · λ · repair time) and ignores
//! zone outages. With inflated rates the two agree within 2x; the Monte Carlo additionally
//! covers more than m+1 overlapping failures, outages and the finite horizon.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use bdr_node::cluster::data::STRIPE_LENGTH_BYTES_DEFAULT;
use bdr_node::cluster::maintenance::MaintenanceConfig;
use bdr_node::config::DEFAULT_DOWN_AFTER_MS;

const SECONDS_PER_YEAR: f64 = 365.25 * 24.0 * 3600.0;
const HOURS_PER_YEAR: f64 = 365.25 * 24.0;
const BYTES_PER_TIB: f64 = (1u64 << 40) as f64;

pub const NODE_CAPACITY_TIB_DEFAULT: f64 = 16.0;
pub const REPAIR_BANDWIDTH_DEFAULT: &str = "100MiB/s";
/// A node is declared down after `down_after`, and the next repair pass (at most one
/// interval later) starts rebuilding: the real cluster's defaults.
pub const DETECT_DELAY_MINUTES_DEFAULT: f64 =
    (DEFAULT_DOWN_AFTER_MS + MaintenanceConfig::DEFAULT.repair_interval_ms) as f64 / 60_000.0;
pub const ZONE_OUTAGE_HOURS_DEFAULT: f64 = 24.0;
pub const YEARS_DEFAULT: u32 = 10;
/// Without `--trials`, enough histories for about this many simulated failures and
/// outages: a few seconds even in a debug build, whatever the cluster's size (1000 nodes
/// at 2% for 10 years: 100,000 histories, a million years). An event that finds m or more
/// nodes already down costs about [`OVERLAPPING_EVENT_COST`] ordinary ones (it computes
/// the placement odds), so heavily overlapping models get proportionally fewer.
pub const SIMULATED_EVENTS_DEFAULT: f64 = 2e7;
const OVERLAPPING_EVENT_COST: f64 = 20.0;
const TRIALS_DEFAULT_RANGE: std::ops::RangeInclusive<u32> = 10..=1_000_000;
/// Shard indexes are a `u8` in the shard header.
const SHARDS_PER_STRIPE_MAX: u32 = 255;
/// Beyond this the model's per-year arithmetic (and any real cluster) stops making sense.
const NODE_FAILURES_PER_YEAR_MAX: f64 = 100.0;

/// The command line's view of the model: human units still as text, as typed.
#[derive(Debug, Clone, PartialEq)]
pub struct DurabilityArguments {
    pub nodes: u32,
    pub zones: u32,
    pub data_shards: u32,
    pub parity_shards: u32,
    /// Node failures per node-year (the Poisson rate).
    pub node_failures_per_year: f64,
    /// Outages per zone-year.
    pub zone_outages_per_year: f64,
    pub zone_outage_hours: f64,
    pub node_capacity_tib: f64,
    /// e.g. "4MiB"; `None` means the node's default stripe length.
    pub stripe_length: Option<String>,
    /// e.g. "100MiB/s": the rebuild rate of one failed node's data.
    pub repair_bandwidth: String,
    pub detect_delay_minutes: f64,
    pub years: u32,
    /// Histories of `years` years; `None`: about [`SIMULATED_EVENTS_DEFAULT`] events' worth.
    pub trials: Option<u32>,
    pub seed: u64,
}

impl Default for DurabilityArguments {
    fn default() -> Self {
        DurabilityArguments {
            nodes: 1000,
            zones: 5,
            data_shards: 4,
            parity_shards: 2,
            node_failures_per_year: 0.02,
            zone_outages_per_year: 0.0,
            zone_outage_hours: ZONE_OUTAGE_HOURS_DEFAULT,
            node_capacity_tib: NODE_CAPACITY_TIB_DEFAULT,
            stripe_length: None,
            repair_bandwidth: REPAIR_BANDWIDTH_DEFAULT.into(),
            detect_delay_minutes: DETECT_DELAY_MINUTES_DEFAULT,
            years: YEARS_DEFAULT,
            trials: None,
            seed: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DurabilityError {
    #[error("--{flag}: {value:?} is not {expected}")]
    Unparsable {
        flag: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("--{flag}: {reason}")]
    OutOfRange { flag: &'static str, reason: String },
    #[error(
        "{nodes} nodes over {zones} zones leave {smallest_zone_nodes} nodes in the smallest zone, \
         but placement puts up to {shards_per_zone_max} shards of a {shards_per_stripe}-shard stripe \
         in one zone, each on its own node: use fewer zones or more nodes"
    )]
    ZonesTooSmall {
        nodes: u32,
        zones: u32,
        smallest_zone_nodes: u32,
        shards_per_zone_max: u32,
        shards_per_stripe: u32,
    },
}

/// The validated model, in base units.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DurabilityModel {
    pub nodes: u32,
    pub zones: u32,
    pub data_shards: u32,
    pub parity_shards: u32,
    pub node_failures_per_year: f64,
    pub zone_outages_per_year: f64,
    pub zone_outage_ms: u64,
    pub node_data_bytes: u64,
    pub stripe_length_bytes: u64,
    pub repair_bandwidth_bytes_per_second: f64,
    pub detect_delay_ms: u64,
    pub years: u32,
    pub trials: u32,
    pub seed: u64,
}

fn out_of_range(flag: &'static str, reason: impl Into<String>) -> DurabilityError {
    DurabilityError::OutOfRange {
        flag,
        reason: reason.into(),
    }
}

fn finite_in(flag: &'static str, value: f64, minimum: f64, maximum: f64) -> Result<f64, DurabilityError> {
    if value.is_finite() && value >= minimum && value <= maximum {
        Ok(value)
    } else {
        Err(out_of_range(flag, format!("{value} is outside {minimum}..={maximum}")))
    }
}

impl DurabilityModel {
    pub fn from_arguments(arguments: &DurabilityArguments) -> Result<Self, DurabilityError> {
        if arguments.nodes == 0 {
            return Err(out_of_range("nodes", "need at least one node"));
        }
        if arguments.zones == 0 || arguments.zones > arguments.nodes {
            return Err(out_of_range(
                "zones",
                format!("need 1..={} zones (at most one per node)", arguments.nodes),
            ));
        }
        if arguments.data_shards == 0 {
            return Err(out_of_range("k", "need at least one data shard"));
        }
        let shards_per_stripe = arguments.data_shards + arguments.parity_shards;
        if shards_per_stripe > SHARDS_PER_STRIPE_MAX {
            return Err(out_of_range(
                "m",
                format!("k+m = {shards_per_stripe}, but a stripe has at most {SHARDS_PER_STRIPE_MAX} shards"),
            ));
        }
        let smallest_zone_nodes = arguments.nodes / arguments.zones;
        let shards_per_zone_max = shards_per_stripe.div_ceil(arguments.zones);
        if smallest_zone_nodes < shards_per_zone_max {
            return Err(DurabilityError::ZonesTooSmall {
                nodes: arguments.nodes,
                zones: arguments.zones,
                smallest_zone_nodes,
                shards_per_zone_max,
                shards_per_stripe,
            });
        }
        let node_failures_per_year =
            finite_in("afr", arguments.node_failures_per_year, 0.0, NODE_FAILURES_PER_YEAR_MAX)?;
        if node_failures_per_year == 0.0 {
            return Err(out_of_range("afr", "must be above 0 (nothing would ever fail)"));
        }
        let zone_outages_per_year = finite_in("zone-afr", arguments.zone_outages_per_year, 0.0, 1000.0)?;
        let zone_outage_hours = finite_in("zone-outage-hours", arguments.zone_outage_hours, 0.0, HOURS_PER_YEAR)?;
        let node_capacity_tib = finite_in("node-capacity-tib", arguments.node_capacity_tib, 0.0, 1e6)?;
        let node_data_bytes = (node_capacity_tib * BYTES_PER_TIB).round() as u64;
        let stripe_length_bytes = match &arguments.stripe_length {
            Some(text) => parse_bytes(text).ok_or_else(|| DurabilityError::Unparsable {
                flag: "stripe-size",
                value: text.clone(),
                expected: "a size such as 4MiB, 1MB or 65536",
            })?,
            None => u64::from(STRIPE_LENGTH_BYTES_DEFAULT),
        };
        let shard_bytes = stripe_length_bytes.div_ceil(u64::from(arguments.data_shards));
        if stripe_length_bytes == 0 || shard_bytes > node_data_bytes {
            return Err(out_of_range(
                "stripe-size",
                "need a stripe of at least one byte whose shards fit on a node (see --node-capacity-tib)",
            ));
        }
        let repair_bandwidth_bytes_per_second =
            parse_bytes_per_second(&arguments.repair_bandwidth).ok_or_else(|| DurabilityError::Unparsable {
                flag: "repair-bandwidth",
                value: arguments.repair_bandwidth.clone(),
                expected: "a positive rate such as 100MiB/s, 1.5GB/s or 250000000 (bytes per second; \
                           units B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)",
            })?;
        let detect_delay_minutes = finite_in("detect-minutes", arguments.detect_delay_minutes, 0.0, 525_960.0)?;
        if arguments.years == 0 {
            return Err(out_of_range("years", "need at least one year"));
        }
        let events_per_trial = f64::from(arguments.years)
            * (f64::from(arguments.nodes) * node_failures_per_year
                + f64::from(arguments.zones) * zone_outages_per_year);
        let trials = match arguments.trials {
            Some(0) => return Err(out_of_range("trials", "need at least one trial")),
            Some(trials) => trials,
            None => {
                let repair_years = (detect_delay_minutes * 60.0
                    + node_data_bytes as f64 / repair_bandwidth_bytes_per_second)
                    / SECONDS_PER_YEAR;
                let mean_nodes_down = f64::from(arguments.nodes) * node_failures_per_year * repair_years;
                let overlapping = poisson_at_least(mean_nodes_down, arguments.parity_shards);
                let cost_per_event = 1.0 + OVERLAPPING_EVENT_COST * overlapping;
                ((SIMULATED_EVENTS_DEFAULT / cost_per_event / events_per_trial).round() as u32)
                    .clamp(*TRIALS_DEFAULT_RANGE.start(), *TRIALS_DEFAULT_RANGE.end())
            }
        };
        Ok(DurabilityModel {
            nodes: arguments.nodes,
            zones: arguments.zones,
            data_shards: arguments.data_shards,
            parity_shards: arguments.parity_shards,
            node_failures_per_year,
            zone_outages_per_year,
            zone_outage_ms: (zone_outage_hours * 3_600_000.0).round() as u64,
            node_data_bytes,
            stripe_length_bytes,
            repair_bandwidth_bytes_per_second,
            detect_delay_ms: (detect_delay_minutes * 60_000.0).round() as u64,
            years: arguments.years,
            trials,
            seed: arguments.seed,
        })
    }

    fn shards_per_stripe(&self) -> u32 {
        self.data_shards + self.parity_shards
    }

    pub fn shard_bytes(&self) -> u64 {
        self.stripe_length_bytes.div_ceil(u64::from(self.data_shards))
    }

    /// Stripes in the whole cluster (a float: billions, and only ever a factor).
    pub fn stripes(&self) -> f64 {
        f64::from(self.nodes) * (self.node_data_bytes / self.shard_bytes()) as f64 / f64::from(self.shards_per_stripe())
    }

    pub fn rebuild_seconds(&self) -> f64 {
        self.node_data_bytes as f64 / self.repair_bandwidth_bytes_per_second
    }

    /// How long a failed node's data stays unavailable-and-unrepaired, in years.
    pub fn repair_years(&self) -> f64 {
        (self.detect_delay_ms as f64 / 1000.0 + self.rebuild_seconds()) / SECONDS_PER_YEAR
    }

    fn zone_size(&self, zone: u32) -> u32 {
        self.nodes / self.zones + u32::from(zone < self.nodes % self.zones)
    }

    /// Whether an outage of one zone stalls rebuilds: some stripe has m or more shards in
    /// the zone, so with one more shard on a failed node fewer than k remain.
    fn zone_outage_stalls_repair(&self) -> bool {
        self.shards_per_stripe().div_ceil(self.zones) >= self.parity_shards
    }
}

/// P(X >= at_least) for X Poisson with this mean.
fn poisson_at_least(mean: f64, at_least: u32) -> f64 {
    let mut term = (-mean).exp();
    let mut below = 0.0;
    for count in 0..at_least {
        below += term;
        term *= mean / f64::from(count + 1);
    }
    (1.0 - below).clamp(0.0, 1.0)
}

/// Parses a byte count such as "4MiB", "1.5 GB", "512kB" or "65536".
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|character: char| !(character.is_ascii_digit() || character == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => BYTES_PER_TIB,
        _ => return None,
    };
    let bytes = number * multiplier;
    (bytes.is_finite() && bytes < u64::MAX as f64).then(|| bytes.round() as u64)
}

/// Parses a positive byte rate such as "100MiB/s" (the "/s" is optional).
pub fn parse_bytes_per_second(text: &str) -> Option<f64> {
    let text = text.trim();
    let bytes_text = text.strip_suffix("/s").unwrap_or(text);
    let bytes = parse_bytes(bytes_text)?;
    (bytes > 0).then_some(bytes as f64)
}

/// ln C(total, chosen); -inf when chosen > total (no way to choose).
fn ln_binomial(total: u32, chosen: u32) -> f64 {
    if chosen > total {
        return f64::NEG_INFINITY;
    }
    let chosen = chosen.min(total - chosen);
    (0..chosen)
        .map(|index| (f64::from(total - index) / f64::from(index + 1)).ln())
        .sum()
}

/// P(exactly `hits` of `drawn` distinct nodes, drawn from a zone of `zone_nodes`, are among
/// its `marked_nodes`): the hypergeometric distribution.
fn hypergeometric(zone_nodes: u32, marked_nodes: u32, drawn: u32, hits: u32) -> f64 {
    if hits > marked_nodes || hits > drawn || drawn - hits > zone_nodes - marked_nodes {
        return 0.0;
    }
    (ln_binomial(marked_nodes, hits) + ln_binomial(zone_nodes - marked_nodes, drawn - hits)
        - ln_binomial(zone_nodes, drawn))
    .exp()
}

/// The probability that one stripe, placed by the placement rule (zones round-robin in a
/// random order, distinct uniform nodes inside a zone), has more than m shards on the
/// marked nodes. `marked_by_zone` lists (nodes in the zone, marked nodes in it) for every
/// zone with a marked node; unlisted zones have none.
///
/// Exact: a dynamic programme over the listed zones on (how many of them got the extra
/// shard, shards on marked nodes so far, capped at m+1), weighted at the end by the
/// chance that exactly that many of the `extra` zones fall among the listed ones.
pub fn stripe_loss_probability(zones: u32, data_shards: u32, parity_shards: u32, marked_by_zone: &[(u32, u32)]) -> f64 {
    PlacementOdds::new(zones, data_shards, parity_shards).stripe_loss_probability(marked_by_zone)
}

/// [`stripe_loss_probability`] for one code and zone count, remembering its
/// hypergeometric terms and zone weights: they take only a few distinct inputs, but cost
/// dozens of logarithms each, which dominated the Monte Carlo when many nodes are down at
/// once. The remembered values are the same arithmetic, so results do not change.
pub struct PlacementOdds {
    zones: u32,
    parity_shards: u32,
    shards_per_zone_base: u32,
    zones_with_extra_shard: u32,
    /// (zone nodes, marked nodes, shards in the zone) → P(hits) for hits = 0..
    hits_distributions: BTreeMap<(u32, u32, u32), Vec<f64>>,
    /// (listed zones, extra-shard zones among them) → that subset's probability.
    extra_subset_weights: BTreeMap<(u32, u32), f64>,
    /// The dynamic programme's two tables, kept to avoid allocating per call.
    probabilities: Vec<f64>,
    next_probabilities: Vec<f64>,
}

impl PlacementOdds {
    pub fn new(zones: u32, data_shards: u32, parity_shards: u32) -> Self {
        let shards_per_stripe = data_shards + parity_shards;
        PlacementOdds {
            zones,
            parity_shards,
            shards_per_zone_base: shards_per_stripe / zones,
            zones_with_extra_shard: shards_per_stripe % zones,
            hits_distributions: BTreeMap::new(),
            extra_subset_weights: BTreeMap::new(),
            probabilities: Vec::new(),
            next_probabilities: Vec::new(),
        }
    }

    fn remember_hits_distribution(&mut self, zone_nodes: u32, marked_nodes: u32, shards_in_zone: u32) {
        self.hits_distributions
            .entry((zone_nodes, marked_nodes, shards_in_zone))
            .or_insert_with(|| {
                (0..=shards_in_zone.min(marked_nodes))
                    .map(|hits| hypergeometric(zone_nodes, marked_nodes, shards_in_zone, hits))
                    .collect()
            });
    }

    /// See [`stripe_loss_probability`].
    pub fn stripe_loss_probability(&mut self, marked_by_zone: &[(u32, u32)]) -> f64 {
        let threshold = self.parity_shards as usize + 1;
        let row = threshold + 1;
        let listed_zones = marked_by_zone.len() as u32;
        let extra_among_listed_max = listed_zones.min(self.zones_with_extra_shard) as usize;
        let cells = (extra_among_listed_max + 1) * row;
        // probabilities[extra_zones_so_far * row + shards_on_marked_so_far (capped)]
        let mut probabilities = std::mem::take(&mut self.probabilities);
        let mut next = std::mem::take(&mut self.next_probabilities);
        probabilities.clear();
        probabilities.resize(cells, 0.0);
        probabilities[0] = 1.0;
        for &(zone_nodes, marked_nodes) in marked_by_zone {
            let base = self.shards_per_zone_base;
            self.remember_hits_distribution(zone_nodes, marked_nodes, base);
            self.remember_hits_distribution(zone_nodes, marked_nodes, base + 1);
            let base_hits = &self.hits_distributions[&(zone_nodes, marked_nodes, base)];
            let extra_hits = &self.hits_distributions[&(zone_nodes, marked_nodes, base + 1)];
            next.clear();
            next.resize(cells, 0.0);
            for extra_so_far in 0..=extra_among_listed_max {
                for hits_so_far in 0..=threshold {
                    let probability = probabilities[extra_so_far * row + hits_so_far];
                    if probability == 0.0 {
                        continue;
                    }
                    for (hits, hits_probability) in base_hits.iter().enumerate() {
                        next[extra_so_far * row + (hits_so_far + hits).min(threshold)] +=
                            probability * hits_probability;
                    }
                    if extra_so_far < extra_among_listed_max {
                        for (hits, hits_probability) in extra_hits.iter().enumerate() {
                            next[(extra_so_far + 1) * row + (hits_so_far + hits).min(threshold)] +=
                                probability * hits_probability;
                        }
                    }
                }
            }
            std::mem::swap(&mut probabilities, &mut next);
        }
        let mut loss_probability = 0.0;
        for extra_among_listed in 0..=extra_among_listed_max as u32 {
            let (zones, zones_with_extra_shard) = (self.zones, self.zones_with_extra_shard);
            // Each particular subset of j listed zones is exactly the listed zones' share of
            // the extra-shard zones with probability C(zones - listed, extra - j) / C(zones, extra).
            let weight = *self
                .extra_subset_weights
                .entry((listed_zones, extra_among_listed))
                .or_insert_with(|| {
                    (ln_binomial(zones - listed_zones, zones_with_extra_shard - extra_among_listed)
                        - ln_binomial(zones, zones_with_extra_shard))
                    .exp()
                });
            loss_probability += weight * probabilities[extra_among_listed as usize * row + threshold];
        }
        self.probabilities = probabilities;
        self.next_probabilities = next;
        loss_probability.min(1.0)
    }
}

/// What the Monte Carlo found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MonteCarloEstimate {
    pub simulated_years: u64,
    pub annual_loss_probability: f64,
    /// 95% normal interval of the mean; [0, 3/years] (rule of three) when no year held
    /// any risk.
    pub annual_loss_probability_low: f64,
    pub annual_loss_probability_high: f64,
    /// -log10(annual loss probability); `None` when it is 0 (no risk seen).
    pub nines: Option<f64>,
    pub nines_low: Option<f64>,
    pub nines_high: Option<f64>,
    /// P(any loss within `years`), over the trials.
    pub horizon_loss_probability: f64,
    pub expected_lost_bytes_per_year: f64,
    /// Years in which more than m failures overlapped on stripes that share them.
    pub years_with_risk: u64,
    pub node_failures: u64,
    pub zone_outages: u64,
    /// P(some data is temporarily unreadable in a year): failures plus zone outages.
    pub annual_unavailability_probability: f64,
}

/// The Markov-chain formula, scaled to the cluster.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnalyticEstimate {
    pub group_mttdl_years: f64,
    pub equivalent_groups: f64,
    pub mttdl_years: f64,
    pub annual_loss_probability: f64,
    pub nines: Option<f64>,
    pub horizon_loss_probability: f64,
    pub expected_lost_bytes_per_year: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DurabilityReport {
    pub model: DurabilityModel,
    pub stripes: f64,
    pub shard_bytes: u64,
    pub repair_hours: f64,
    pub monte_carlo: MonteCarloEstimate,
    pub analytic: AnalyticEstimate,
    /// Monte Carlo over analytic annual loss probability.
    pub monte_carlo_over_analytic: Option<f64>,
}

fn nines_of(probability: f64) -> Option<f64> {
    // 0.0 - x rather than -x: a certain loss has 0 nines, not "-0.00".
    (probability > 0.0).then(|| 0.0 - probability.log10())
}

/// The analytic MTTDL (see the module documentation for the formula and its terms).
pub fn analytic_estimate(model: &DurabilityModel) -> AnalyticEstimate {
    let failure_rate_per_year = model.node_failures_per_year;
    let repair_years = model.repair_years();
    let group_nodes = model.shards_per_stripe();
    let parity = model.parity_shards;
    // m! μ^m / (λ^(m+1) n(n-1)..(n-m)), in logs: the powers overflow easily.
    let ln_group_loss_rate = (0..=parity)
        .map(|index| f64::from(group_nodes - index).ln())
        .sum::<f64>()
        + f64::from(parity + 1) * failure_rate_per_year.ln()
        + f64::from(parity) * repair_years.ln()
        - (1..=parity).map(|index| f64::from(index).ln()).sum::<f64>();
    let group_mttdl_years = (-ln_group_loss_rate).exp();

    // Σ over (m+1)-node sets of P(loss), by zone pattern. Zones come in (at most) two
    // sizes; patterns are partitions of m+1 over the big and the small zones.
    let stripes = model.stripes();
    let big_zone_count = model.nodes % model.zones;
    let small_zone_count = model.zones - big_zone_count;
    let small_zone_nodes = model.nodes / model.zones;
    let big_zone_nodes = small_zone_nodes + 1;
    let set_size = parity + 1;
    let mut odds = PlacementOdds::new(model.zones, model.data_shards, model.parity_shards);
    let mut covered_sets = 0.0f64;
    let mut expected_lost_stripes_over_sets = 0.0f64;
    for in_big_zones in 0..=set_size {
        for big_parts in partitions(in_big_zones, big_zone_count, big_zone_nodes) {
            for small_parts in partitions(set_size - in_big_zones, small_zone_count, small_zone_nodes) {
                let ln_sets = ln_ways(&big_parts, big_zone_count, big_zone_nodes)
                    + ln_ways(&small_parts, small_zone_count, small_zone_nodes);
                let marked_by_zone: Vec<(u32, u32)> = big_parts
                    .iter()
                    .map(|part| (big_zone_nodes, *part))
                    .chain(small_parts.iter().map(|part| (small_zone_nodes, *part)))
                    .collect();
                let per_stripe = odds.stripe_loss_probability(&marked_by_zone);
                let sets = ln_sets.exp();
                covered_sets += sets * -(stripes * (-per_stripe).ln_1p()).exp_m1();
                expected_lost_stripes_over_sets += sets * stripes * per_stripe;
            }
        }
    }
    let equivalent_groups = covered_sets / ln_binomial(group_nodes, set_size).exp();
    let losses_per_year = equivalent_groups / group_mttdl_years;
    // One particular (m+1)-set's rate of all being down at once: (m+1) λ^(m+1) T^m.
    let set_loss_rate_per_year =
        f64::from(set_size) * failure_rate_per_year.powi(set_size as i32) * repair_years.powi(parity as i32);
    AnalyticEstimate {
        group_mttdl_years,
        equivalent_groups,
        mttdl_years: 1.0 / losses_per_year,
        annual_loss_probability: -(-losses_per_year).exp_m1(),
        nines: nines_of(-(-losses_per_year).exp_m1()),
        horizon_loss_probability: -(-losses_per_year * f64::from(model.years)).exp_m1(),
        expected_lost_bytes_per_year: set_loss_rate_per_year
            * expected_lost_stripes_over_sets
            * model.stripe_length_bytes as f64,
    }
}

/// Partitions of `total` into at most `parts_max` parts, each at most `part_max`, in
/// non-increasing order.
fn partitions(total: u32, parts_max: u32, part_max: u32) -> Vec<Vec<u32>> {
    fn extend(remaining: u32, parts_left: u32, largest: u32, current: &mut Vec<u32>, found: &mut Vec<Vec<u32>>) {
        if remaining == 0 {
            found.push(current.clone());
            return;
        }
        if parts_left == 0 {
            return;
        }
        for part in (1..=largest.min(remaining)).rev() {
            current.push(part);
            extend(remaining - part, parts_left - 1, part, current, found);
            current.pop();
        }
    }
    let mut found = Vec::new();
    extend(total, parts_max, part_max, &mut Vec::new(), &mut found);
    found
}

/// ln of the number of node sets with this pattern: the parts go to distinct zones of a
/// class of `zone_count` zones of `zone_nodes` nodes (equal parts are interchangeable),
/// and each part picks its nodes inside its zone.
fn ln_ways(parts: &[u32], zone_count: u32, zone_nodes: u32) -> f64 {
    let ln_zone_choices: f64 = (0..parts.len() as u32)
        .map(|index| f64::from(zone_count - index).ln())
        .sum();
    let mut ln_equal_parts_orders = 0.0;
    let mut index = 0;
    while index < parts.len() {
        let run = parts[index..].iter().take_while(|part| **part == parts[index]).count();
        ln_equal_parts_orders += (1..=run as u32).map(|factor| f64::from(factor).ln()).sum::<f64>();
        index += run;
    }
    let ln_node_choices: f64 = parts.iter().map(|part| ln_binomial(zone_nodes, *part)).sum();
    ln_zone_choices - ln_equal_parts_orders + ln_node_choices
}

struct FailedNode {
    node: u32,
    zone: u32,
    /// On the repair clock, which stops while rebuilds are stalled by a zone outage.
    rebuilt_at_repair_clock_years: f64,
}

struct ZoneOutage {
    zone: u32,
    ends_at_years: f64,
}

/// Sums over the simulated years, in simulation order (so the result is deterministic).
#[derive(Default)]
struct YearSums {
    years: u64,
    loss_probability: f64,
    loss_probability_squared: f64,
    expected_lost_stripes: f64,
    unavailability_probability: f64,
    years_with_risk: u64,
}

/// One year's tallies, as log survival so many small risks combine exactly.
#[derive(Default)]
struct YearTally {
    ln_no_loss: f64,
    ln_no_unavailability: f64,
    expected_lost_stripes: f64,
    risky: bool,
}

fn marked_by_zone(model: &DurabilityModel, marked: impl Iterator<Item = (u32, u32)>) -> Vec<(u32, u32)> {
    // (zone, marked count) pairs merged per zone; at most a handful of entries.
    let mut by_zone: Vec<(u32, u32)> = Vec::new();
    for (zone, count) in marked {
        match by_zone.iter_mut().find(|(listed, _)| *listed == zone) {
            Some((_, listed_count)) => *listed_count += count,
            None => by_zone.push((zone, count)),
        }
    }
    by_zone
        .into_iter()
        .map(|(zone, count)| {
            let zone_nodes = model.zone_size(zone);
            (zone_nodes, count.min(zone_nodes))
        })
        .collect()
}

/// One history's state (reused from trial to trial, with what it remembers).
struct Trial<'a> {
    model: &'a DurabilityModel,
    odds: PlacementOdds,
    stripes: f64,
    repair_years: f64,
    failed: Vec<FailedNode>,
    outages: Vec<ZoneOutage>,
    /// (loss, unavailability) probability of the current state, kept from the last arrival
    /// until something changes: with many nodes down at once, computing them dominates.
    probabilities_now: Option<(f64, f64)>,
}

impl Trial<'_> {
    fn loss_probability(&mut self) -> f64 {
        if self.failed.len() <= self.model.parity_shards as usize {
            return 0.0;
        }
        let marked = marked_by_zone(self.model, self.failed.iter().map(|failed| (failed.zone, 1)));
        self.odds.stripe_loss_probability(&marked)
    }

    fn unavailability_probability(&mut self) -> f64 {
        let model = self.model;
        let failed_outside_outages = self
            .failed
            .iter()
            .filter(|failed| !self.outages.iter().any(|outage| outage.zone == failed.zone));
        let unavailable = failed_outside_outages.map(|failed| (failed.zone, 1)).chain(
            self.outages
                .iter()
                .map(|outage| (outage.zone, model.zone_size(outage.zone))),
        );
        let marked = marked_by_zone(model, unavailable);
        if marked.iter().map(|(_, count)| count).sum::<u32>() <= model.parity_shards {
            return 0.0;
        }
        self.odds.stripe_loss_probability(&marked)
    }

    fn probabilities(&mut self) -> (f64, f64) {
        match self.probabilities_now {
            Some(probabilities) => probabilities,
            None => {
                let loss = self.loss_probability();
                // Without outages the unavailable nodes are the failed ones: same answer.
                let unavailability = if self.outages.is_empty() {
                    loss
                } else {
                    self.unavailability_probability()
                };
                (loss, unavailability)
            }
        }
    }

    /// Adds the stripes newly over the line (now but not before) to the year's tally.
    fn record(&mut self, tally: &mut YearTally, (loss_before, unavailability_before): (f64, f64)) {
        self.probabilities_now = None;
        let (loss_now, unavailability_now) = self.probabilities();
        self.probabilities_now = Some((loss_now, unavailability_now));
        let newly_lost_per_stripe = (loss_now - loss_before).max(0.0);
        if newly_lost_per_stripe > 0.0 {
            tally.ln_no_loss += self.stripes * (-newly_lost_per_stripe).ln_1p();
            tally.expected_lost_stripes += self.stripes * newly_lost_per_stripe;
            tally.risky = true;
        }
        let newly_unavailable_per_stripe = (unavailability_now - unavailability_before).max(0.0);
        tally.ln_no_unavailability += self.stripes * (-newly_unavailable_per_stripe).ln_1p();
    }
}

/// Runs the Monte Carlo: `trials` independent histories of `years` years each.
pub fn monte_carlo_estimate(model: &DurabilityModel) -> MonteCarloEstimate {
    let mut rng = ChaCha8Rng::seed_from_u64(model.seed);
    let stalls_repair = model.zone_outage_stalls_repair();
    let horizon_years = f64::from(model.years);
    let mut sums = YearSums::default();
    let mut horizon_loss_probability_sum = 0.0;
    let mut node_failures = 0u64;
    let mut zone_outages = 0u64;
    let mut trial = Trial {
        model,
        odds: PlacementOdds::new(model.zones, model.data_shards, model.parity_shards),
        stripes: model.stripes(),
        repair_years: model.repair_years(),
        failed: Vec::new(),
        outages: Vec::new(),
        probabilities_now: None,
    };
    for _ in 0..model.trials {
        // Every history starts with the whole cluster healthy.
        trial.failed.clear();
        trial.outages.clear();
        trial.probabilities_now = None;
        let mut now_years = 0.0f64;
        let mut repair_clock_years = 0.0f64;
        let mut year = 0u32;
        let mut tally = YearTally::default();
        let mut ln_no_loss_in_horizon = 0.0;
        loop {
            let node_rate = f64::from(model.nodes - trial.failed.len() as u32) * model.node_failures_per_year;
            let zone_rate = f64::from(model.zones - trial.outages.len() as u32) * model.zone_outages_per_year;
            // Memoryless: redrawing the next arrival after every event is exact.
            let next_arrival_years = now_years + -(1.0 - rng.random::<f64>()).ln() / (node_rate + zone_rate);
            let repairs_paused = stalls_repair && !trial.outages.is_empty();
            let next_rebuilt = trial
                .failed
                .iter()
                .enumerate()
                .min_by(|a, b| {
                    a.1.rebuilt_at_repair_clock_years
                        .total_cmp(&b.1.rebuilt_at_repair_clock_years)
                })
                .filter(|_| !repairs_paused)
                .map(|(index, failed)| {
                    (
                        index,
                        now_years + failed.rebuilt_at_repair_clock_years - repair_clock_years,
                    )
                });
            let next_outage_end = trial
                .outages
                .iter()
                .enumerate()
                .min_by(|a, b| a.1.ends_at_years.total_cmp(&b.1.ends_at_years))
                .map(|(index, outage)| (index, outage.ends_at_years));
            let next_event_years = next_arrival_years
                .min(next_rebuilt.map_or(f64::INFINITY, |(_, at)| at))
                .min(next_outage_end.map_or(f64::INFINITY, |(_, at)| at));
            while next_event_years >= f64::from(year + 1) && year < model.years {
                let loss_probability = -tally.ln_no_loss.exp_m1();
                sums.years += 1;
                sums.loss_probability += loss_probability;
                sums.loss_probability_squared += loss_probability * loss_probability;
                sums.expected_lost_stripes += tally.expected_lost_stripes;
                sums.unavailability_probability += -tally.ln_no_unavailability.exp_m1();
                sums.years_with_risk += u64::from(tally.risky);
                ln_no_loss_in_horizon += tally.ln_no_loss;
                tally = YearTally::default();
                year += 1;
            }
            if next_event_years >= horizon_years {
                break;
            }
            if !repairs_paused {
                repair_clock_years += next_event_years - now_years;
            }
            now_years = next_event_years;
            if let Some((index, _)) = next_rebuilt.filter(|(_, at)| *at == next_event_years) {
                trial.failed.swap_remove(index);
                trial.probabilities_now = None;
            } else if let Some((index, _)) = next_outage_end.filter(|(_, at)| *at == next_event_years) {
                trial.outages.swap_remove(index);
                trial.probabilities_now = None;
            } else {
                let probabilities_before = trial.probabilities();
                if rng.random::<f64>() * (node_rate + zone_rate) < node_rate {
                    node_failures += 1;
                    // Uniform over healthy nodes; the failed set is tiny, so redraws are rare.
                    let node = loop {
                        let node = rng.random_range(0..model.nodes);
                        if !trial.failed.iter().any(|failed| failed.node == node) {
                            break node;
                        }
                    };
                    trial.failed.push(FailedNode {
                        node,
                        zone: node % model.zones,
                        rebuilt_at_repair_clock_years: repair_clock_years + trial.repair_years,
                    });
                } else {
                    zone_outages += 1;
                    let zone = loop {
                        let zone = rng.random_range(0..model.zones);
                        if !trial.outages.iter().any(|outage| outage.zone == zone) {
                            break zone;
                        }
                    };
                    trial.outages.push(ZoneOutage {
                        zone,
                        ends_at_years: now_years + model.zone_outage_ms as f64 / 1000.0 / SECONDS_PER_YEAR,
                    });
                }
                trial.record(&mut tally, probabilities_before);
            }
        }
        horizon_loss_probability_sum += -ln_no_loss_in_horizon.exp_m1();
    }

    let years = sums.years as f64;
    let mean = sums.loss_probability / years;
    let (low, high) = if sums.years_with_risk == 0 {
        (0.0, 3.0 / years)
    } else {
        let variance = ((sums.loss_probability_squared - years * mean * mean) / (years - 1.0).max(1.0)).max(0.0);
        let half_width = 1.96 * (variance / years).sqrt();
        ((mean - half_width).max(0.0), (mean + half_width).min(1.0))
    };
    MonteCarloEstimate {
        simulated_years: sums.years,
        annual_loss_probability: mean,
        annual_loss_probability_low: low,
        annual_loss_probability_high: high,
        nines: nines_of(mean),
        // More nines at the low end of the probability, fewer at the high end.
        nines_low: nines_of(high),
        nines_high: nines_of(low),
        horizon_loss_probability: horizon_loss_probability_sum / f64::from(model.trials),
        expected_lost_bytes_per_year: sums.expected_lost_stripes / years * model.stripe_length_bytes as f64,
        years_with_risk: sums.years_with_risk,
        node_failures,
        zone_outages,
        annual_unavailability_probability: sums.unavailability_probability / years,
    }
}

/// Validates the arguments, runs the Monte Carlo and the formula, and compares them.
pub fn run_durability(arguments: &DurabilityArguments) -> Result<DurabilityReport, DurabilityError> {
    let model = DurabilityModel::from_arguments(arguments)?;
    let monte_carlo = monte_carlo_estimate(&model);
    let analytic = analytic_estimate(&model);
    let monte_carlo_over_analytic = (analytic.annual_loss_probability > 0.0)
        .then(|| monte_carlo.annual_loss_probability / analytic.annual_loss_probability);
    Ok(DurabilityReport {
        stripes: model.stripes(),
        shard_bytes: model.shard_bytes(),
        repair_hours: model.repair_years() * HOURS_PER_YEAR,
        model,
        monte_carlo,
        analytic,
        monte_carlo_over_analytic,
    })
}

fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = bytes;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn human_nines(nines: Option<f64>) -> String {
    nines.map_or_else(|| "inf".into(), |nines| format!("{nines:.2}"))
}

impl DurabilityReport {
    /// A compact human summary (the JSON has everything).
    pub fn render_text(&self) -> String {
        let model = &self.model;
        let monte_carlo = &self.monte_carlo;
        let analytic = &self.analytic;
        let mut lines = vec![
            format!(
                "model: {} nodes in {} zones, {}+{}, {} per node, {:.3e} stripes of {}, node afr {}/year, zone outages {}/zone-year of {:.1} h",
                model.nodes,
                model.zones,
                model.data_shards,
                model.parity_shards,
                human_bytes(model.node_data_bytes as f64),
                self.stripes,
                human_bytes(model.stripe_length_bytes as f64),
                model.node_failures_per_year,
                model.zone_outages_per_year,
                model.zone_outage_ms as f64 / 3_600_000.0,
            ),
            format!(
                "repair: {:.1} min detection + {:.1} h rebuild at {}/s = {:.1} h per failed node",
                model.detect_delay_ms as f64 / 60_000.0,
                model.rebuild_seconds() / 3600.0,
                human_bytes(model.repair_bandwidth_bytes_per_second),
                self.repair_hours,
            ),
        ];
        let confidence = if monte_carlo.years_with_risk == 0 {
            format!(
                "no overlap of more than m failures seen; 95% bound < {:.2e}",
                monte_carlo.annual_loss_probability_high
            )
        } else {
            format!(
                "95% CI {:.2e}..{:.2e}",
                monte_carlo.annual_loss_probability_low, monte_carlo.annual_loss_probability_high
            )
        };
        lines.push(format!(
            "monte carlo ({} years, seed {}): P(loss)/year {:.3e} ({confidence}), nines {} ({}..{}), P(loss in {} years) {:.3e}, expected loss {}/year, {} risky years, {} node failures, {} zone outages, P(unreadable)/year {:.3e}",
            monte_carlo.simulated_years,
            model.seed,
            monte_carlo.annual_loss_probability,
            human_nines(monte_carlo.nines),
            human_nines(monte_carlo.nines_low),
            human_nines(monte_carlo.nines_high),
            model.years,
            monte_carlo.horizon_loss_probability,
            human_bytes(monte_carlo.expected_lost_bytes_per_year),
            monte_carlo.years_with_risk,
            monte_carlo.node_failures,
            monte_carlo.zone_outages,
            monte_carlo.annual_unavailability_probability,
        ));
        lines.push(format!(
            "analytic MTTDL (m!·μ^m / (λ^(m+1)·n(n-1)..(n-m)) per group × {:.3e} equivalent groups{}): group {:.3e} years, cluster {:.3e} years, P(loss)/year {:.3e}, nines {}, P(loss in {} years) {:.3e}, expected loss {}/year",
            analytic.equivalent_groups,
            if model.zone_outages_per_year > 0.0 { ", ignores zone outages" } else { "" },
            analytic.group_mttdl_years,
            analytic.mttdl_years,
            analytic.annual_loss_probability,
            human_nines(analytic.nines),
            model.years,
            analytic.horizon_loss_probability,
            human_bytes(analytic.expected_lost_bytes_per_year),
        ));
        lines.push(match self.monte_carlo_over_analytic {
            Some(ratio) => format!("monte carlo / analytic: {ratio:.2}"),
            None => "monte carlo / analytic: n/a (analytic loss probability is 0)".into(),
        });
        lines.join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inflated_arguments() -> DurabilityArguments {
        // 12 nodes over 3 zones, 4+2; every node fails once a year on average and a
        // rebuild takes ~93 hours: about one overlap of three failures every 15 years.
        DurabilityArguments {
            nodes: 12,
            zones: 3,
            node_failures_per_year: 1.0,
            repair_bandwidth: "50MiB/s".into(),
            years: 1,
            trials: Some(20_000),
            ..DurabilityArguments::default()
        }
    }

    fn assert_agree_within_two_fold(arguments: &DurabilityArguments) {
        let report = run_durability(arguments).unwrap();
        let ratio = report.monte_carlo_over_analytic.unwrap();
        assert!(
            (0.5..=2.0).contains(&ratio),
            "monte carlo and analytic disagree ({ratio}):\n{}",
            report.render_text()
        );
        assert!(report.monte_carlo.years_with_risk > 100, "{}", report.render_text());
    }

    #[test]
    fn monte_carlo_and_analytic_agree_within_two_fold_at_inflated_rates() {
        assert_agree_within_two_fold(&inflated_arguments());
        // More zones than shards per stripe, three parities, and a zone size that differs.
        assert_agree_within_two_fold(&DurabilityArguments {
            nodes: 23,
            zones: 7,
            data_shards: 3,
            parity_shards: 3,
            node_failures_per_year: 2.0,
            repair_bandwidth: "100MiB/s".into(),
            node_capacity_tib: 16.0,
            years: 2,
            trials: Some(10_000),
            ..DurabilityArguments::default()
        });
    }

    #[test]
    fn the_same_seed_gives_the_same_report_and_another_seed_another() {
        let arguments = DurabilityArguments {
            zone_outages_per_year: 2.0,
            trials: Some(3_000),
            ..inflated_arguments()
        };
        let first = run_durability(&arguments).unwrap();
        let second = run_durability(&arguments).unwrap();
        assert_eq!(
            serde_json::to_string(&first).unwrap(),
            serde_json::to_string(&second).unwrap()
        );
        assert_eq!(first.render_text(), second.render_text());
        let other = run_durability(&DurabilityArguments { seed: 2, ..arguments }).unwrap();
        assert_ne!(first.monte_carlo, other.monte_carlo);
        assert!(first.monte_carlo.zone_outages > 0);
    }

    #[test]
    fn bad_arguments_give_clear_errors() {
        let base = DurabilityArguments::default;
        let error = |arguments: DurabilityArguments| run_durability(&arguments).unwrap_err().to_string();
        let message = error(DurabilityArguments {
            repair_bandwidth: "fast".into(),
            ..base()
        });
        assert!(
            message.starts_with("--repair-bandwidth: \"fast\" is not a positive rate"),
            "{message}"
        );
        let message = error(DurabilityArguments {
            repair_bandwidth: "100Mbit/s".into(),
            ..base()
        });
        assert!(message.contains("--repair-bandwidth"), "{message}");
        let message = error(DurabilityArguments {
            repair_bandwidth: "0MiB/s".into(),
            ..base()
        });
        assert!(message.contains("--repair-bandwidth"), "{message}");
        let message = error(DurabilityArguments {
            stripe_length: Some("4 parsecs".into()),
            ..base()
        });
        assert!(message.starts_with("--stripe-size"), "{message}");
        let message = error(DurabilityArguments {
            node_failures_per_year: -0.1,
            ..base()
        });
        assert!(message.starts_with("--afr: -0.1 is outside"), "{message}");
        let message = error(DurabilityArguments {
            node_failures_per_year: f64::NAN,
            ..base()
        });
        assert!(message.starts_with("--afr"), "{message}");
        let message = error(DurabilityArguments { zones: 2000, ..base() });
        assert!(message.starts_with("--zones: need 1..=1000 zones"), "{message}");
        let message = error(DurabilityArguments {
            nodes: 10,
            zones: 5,
            data_shards: 8,
            parity_shards: 4,
            ..base()
        });
        assert!(message.contains("2 nodes in the smallest zone"), "{message}");
        assert!(message.contains("up to 3 shards"), "{message}");
        let message = error(DurabilityArguments {
            data_shards: 0,
            ..base()
        });
        assert!(message.starts_with("--k:"), "{message}");
        let message = error(DurabilityArguments {
            parity_shards: 300,
            ..base()
        });
        assert!(message.starts_with("--m:"), "{message}");
        let message = error(DurabilityArguments {
            trials: Some(0),
            ..base()
        });
        assert!(message.starts_with("--trials"), "{message}");
    }

    #[test]
    fn human_units_parse() {
        assert_eq!(parse_bytes_per_second("100MiB/s"), Some(100.0 * 1024.0 * 1024.0));
        assert_eq!(parse_bytes_per_second("1.5 GB/s"), Some(1.5e9));
        assert_eq!(parse_bytes_per_second("250000000"), Some(2.5e8));
        assert_eq!(parse_bytes_per_second("10kib"), Some(10240.0));
        assert_eq!(parse_bytes("4MiB"), Some(4 << 20));
        assert_eq!(parse_bytes("-4MiB"), None);
        assert_eq!(parse_bytes("MiB"), None);
        assert_eq!(parse_bytes("1.2.3MB"), None);
    }

    #[test]
    fn the_detection_default_follows_the_node_defaults() {
        assert_eq!(
            DETECT_DELAY_MINUTES_DEFAULT * 60_000.0,
            (DEFAULT_DOWN_AFTER_MS + MaintenanceConfig::DEFAULT.repair_interval_ms) as f64
        );
    }

    /// The placement rule drawn literally: zones in a random order dealt round-robin,
    /// distinct random nodes inside each zone. Returns shards on marked nodes.
    fn sampled_marked_shards(rng: &mut ChaCha8Rng, zone_nodes: &[u32], marked: &[u32], shards_per_stripe: u32) -> u32 {
        let zones = zone_nodes.len();
        let mut order: Vec<usize> = (0..zones).collect();
        for index in (1..zones).rev() {
            order.swap(index, rng.random_range(0..=index));
        }
        let mut shards_in_zone = vec![0u32; zones];
        for slot in 0..shards_per_stripe as usize {
            shards_in_zone[order[slot % zones]] += 1;
        }
        let mut hits = 0;
        for zone in 0..zones {
            // Marked nodes are the zone's first `marked[zone]`; draw distinct nodes.
            let mut nodes: Vec<u32> = (0..zone_nodes[zone]).collect();
            for draw in 0..shards_in_zone[zone] as usize {
                let pick = rng.random_range(draw..nodes.len());
                nodes.swap(draw, pick);
                hits += u32::from(nodes[draw] < marked[zone]);
            }
        }
        hits
    }

    #[test]
    fn stripe_loss_probability_matches_sampled_placements() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // (zone sizes, marked per zone, k, m)
        let cases: [(&[u32], &[u32], u32, u32); 4] = [
            (&[4, 4, 4], &[2, 1, 0], 4, 2),
            (&[3, 3, 2, 2, 2], &[1, 1, 1, 1, 0], 4, 2),
            (&[2, 2, 2, 2, 2, 2, 2], &[1, 1, 0, 1, 1, 0, 0], 3, 3),
            (&[6, 5], &[3, 1], 5, 3),
        ];
        for (zone_nodes, marked, data_shards, parity_shards) in cases {
            let marked_by_zone: Vec<(u32, u32)> = zone_nodes
                .iter()
                .zip(marked)
                .filter(|(_, marked)| **marked > 0)
                .map(|(nodes, marked)| (*nodes, *marked))
                .collect();
            let exact = stripe_loss_probability(zone_nodes.len() as u32, data_shards, parity_shards, &marked_by_zone);
            let samples = 40_000;
            let lost = (0..samples)
                .filter(|_| {
                    sampled_marked_shards(&mut rng, zone_nodes, marked, data_shards + parity_shards) > parity_shards
                })
                .count();
            let sampled = lost as f64 / f64::from(samples);
            let tolerance = 4.0 * (exact * (1.0 - exact) / f64::from(samples)).sqrt() + 1e-3;
            assert!(
                (sampled - exact).abs() < tolerance,
                "{zone_nodes:?} {marked:?} {data_shards}+{parity_shards}: exact {exact}, sampled {sampled}"
            );
        }
    }

    #[test]
    fn sets_inside_one_zone_cannot_lose_a_zone_spread_stripe() {
        // 4+2 over 3 zones puts 2 shards per zone: 3 failures in one zone are harmless.
        assert_eq!(stripe_loss_probability(3, 4, 2, &[(4, 3)]), 0.0);
        assert!(stripe_loss_probability(3, 4, 2, &[(4, 2), (4, 1)]) > 0.0);
    }

    #[test]
    fn partitions_and_pattern_counts_cover_every_set() {
        assert_eq!(partitions(3, 5, 4), vec![vec![3], vec![2, 1], vec![1, 1, 1]]);
        assert_eq!(partitions(3, 2, 4), vec![vec![3], vec![2, 1]]);
        assert_eq!(partitions(3, 5, 1), vec![vec![1, 1, 1]]);
        // All 3-node sets of 5 zones of 4 nodes: C(20, 3) = 1140.
        let total: f64 = partitions(3, 5, 4).iter().map(|parts| ln_ways(parts, 5, 4).exp()).sum();
        assert!((total - 1140.0).abs() < 1e-6, "{total}");
    }
}
