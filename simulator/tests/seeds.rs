//! The simulator in CI: many seeds of every built-in scenario must pass, every
//! regression seed must pass, and the same seed must give the same trace, bit for bit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bdr_sim::{load_scenario, run, Outcome, Timers, BUILTIN_SCENARIOS, PRODUCTION_SETTLE_MS};

/// Seeds per CI run, spread over the scenarios (the issue asks for at least 200).
const SEEDS_TOTAL: u64 = 200;

fn run_in_parallel(jobs: Vec<(String, u64)>) -> Vec<Outcome> {
    let next = AtomicU64::new(0);
    let outcomes = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some((scenario, seed)) = jobs.get(index) else {
                    return;
                };
                let outcome = run(*seed, &load_scenario(scenario).unwrap());
                outcomes.lock().unwrap().push(outcome);
            });
        }
    });
    outcomes.into_inner().unwrap()
}

fn assert_all_pass(outcomes: &[Outcome]) {
    let failures: Vec<String> = outcomes
        .iter()
        .filter(|outcome| !outcome.ok())
        .map(|outcome| {
            format!(
                "bdr-sim run --seed {} --scenario {}: {:?}",
                outcome.seed, outcome.scenario, outcome.failures
            )
        })
        .collect();
    assert!(failures.is_empty(), "failing seeds:\n{}", failures.join("\n"));
}

#[test]
fn many_seeds_of_every_scenario_pass() {
    let per_scenario = SEEDS_TOTAL.div_ceil(BUILTIN_SCENARIOS.len() as u64);
    // Bucket churn runs twice the seeds: how often a seed deletes its scratch bucket
    // varies widely from seed to seed (0 to 6), so its figures below need the sample.
    let seeds_of = |name: &str| match name {
        "bucket-churn" => 2 * per_scenario,
        _ => per_scenario,
    };
    let jobs: Vec<(String, u64)> = BUILTIN_SCENARIOS
        .iter()
        .flat_map(|(name, _)| (1000..1000 + seeds_of(name)).map(move |seed| (name.to_string(), seed)))
        .collect();
    let jobs_total = jobs.len();
    let outcomes = run_in_parallel(jobs);
    assert_eq!(outcomes.len(), jobs_total);
    assert!(outcomes.len() as u64 >= SEEDS_TOTAL);
    let acknowledged: u64 = outcomes.iter().map(|outcome| outcome.acknowledged_writes).sum();
    let faults: usize = outcomes.iter().map(|outcome| outcome.faults_injected.len()).sum();
    assert!(
        acknowledged > 1000,
        "the workload did too little: {acknowledged} acknowledged writes"
    );
    assert!(faults > 100, "too few faults were injected: {faults}");
    let versions_checked: u64 = outcomes.iter().map(|outcome| outcome.versions_checked).sum();
    assert!(
        versions_checked > 100,
        "too few old versions were read back: {versions_checked}"
    );
    // Every disk fault kind did something somewhere (each is its own fault kind).
    let mut disk = bdr_sim::disk::DiskFaultCounters::default();
    for outcome in &outcomes {
        disk.add(&outcome.disk_faults);
    }
    assert!(disk.torn_files_left > 0, "no torn write was left by a crash: {disk:?}");
    assert!(disk.writes_lost > 0, "no acknowledged write was lost: {disk:?}");
    assert!(
        disk.read_errors_returned > 0,
        "no latent read error was returned: {disk:?}"
    );
    assert!(disk.puts_refused_disk_full > 0, "no put met a full disk: {disk:?}");
    // Multipart uploads completed and aborted; nodes joined, and replaced nodes removed.
    let multipart_completed: u64 = outcomes.iter().map(|outcome| outcome.multipart_completed).sum();
    let multipart_multiple: u64 = outcomes
        .iter()
        .map(|outcome| outcome.multipart_completed_multiple_parts)
        .sum();
    let multipart_aborted: u64 = outcomes.iter().map(|outcome| outcome.multipart_aborted).sum();
    assert!(
        multipart_completed > 10 && multipart_multiple > 5 && multipart_aborted > 0,
        "too few multipart uploads: {multipart_completed} completed ({multipart_multiple} of several parts), \
         {multipart_aborted} aborted"
    );
    let lock_versions: u64 = outcomes.iter().map(|outcome| outcome.lock_versions_checked).sum();
    let deletes_won: u64 = outcomes.iter().map(|outcome| outcome.lock_races_delete_won).sum();
    let locks_won: u64 = outcomes.iter().map(|outcome| outcome.lock_races_lock_won).sum();
    assert!(
        lock_versions > 20 && deletes_won > 0 && locks_won > 0,
        "too little Object Lock work: {lock_versions} versions checked, races won by deletes \
         {deletes_won} and by locks {locks_won}"
    );
    let joined: u64 = outcomes.iter().map(|outcome| outcome.nodes_joined).sum();
    let removed: u64 = outcomes.iter().map(|outcome| outcome.nodes_removed).sum();
    let replacements = outcomes
        .iter()
        .filter(|outcome| outcome.scenario == "node-replacement")
        .count() as u64;
    assert_eq!(removed, replacements, "every replaced node must be removed");
    assert!(joined > replacements, "no node joined a growing layout");
    // Beyond the budget, losses happen: they must be seen (failed reads) and reported
    // (maintenance counts lost stripes); wrong bytes fail the seed like anywhere else.
    let beyond: Vec<&Outcome> = outcomes
        .iter()
        .filter(|outcome| outcome.scenario == "beyond-budget")
        .collect();
    let destroyed: u64 = beyond.iter().map(|outcome| outcome.stripes_destroyed).sum();
    let detected: u64 = beyond.iter().map(|outcome| outcome.detected_losses).sum();
    let reported: u64 = beyond.iter().map(|outcome| outcome.lost_stripes_reported).sum();
    assert!(destroyed > 0 && detected > 0 && reported > 0,
        "beyond the budget: {destroyed} stripes destroyed, {detected} losses detected by reads, {reported} reported lost");
    // Buckets deleted under load (some with objects still in them, as a DeleteBucket
    // racing a put leaves them): their versions must be collected (each seed's final
    // checks fail otherwise), and some must have been there to collect.
    let churn: Vec<&Outcome> = outcomes
        .iter()
        .filter(|outcome| outcome.scenario == "bucket-churn")
        .collect();
    let buckets_deleted: u64 = churn.iter().map(|outcome| outcome.scratch_buckets_deleted).sum();
    let stale_versions: u64 = churn.iter().map(|outcome| outcome.stale_versions_at_heal).sum();
    let stale_versions_written: u64 = churn.iter().map(|outcome| outcome.stale_versions_written).sum();
    // More than one deletion per two seeds, and versions written into deleted buckets.
    assert!(
        buckets_deleted > churn.len() as u64 / 2 && stale_versions_written > 0,
        "bucket churn: {buckets_deleted} buckets deleted, {stale_versions_written} versions written into deleted \
         buckets to collect"
    );
    println!(
        "{} seeds, {acknowledged} acknowledged writes, {faults} faults, disk faults {disk:?}, beyond budget: \
         {destroyed} stripes destroyed, {detected} failed reads, {reported} reported lost; multipart: \
         {multipart_completed} completed ({multipart_multiple} of several parts), {multipart_aborted} aborted; \
         bucket churn: {buckets_deleted} buckets deleted, {stale_versions_written} versions written into deleted buckets, {stale_versions} still there at the heal (all collected)",
        outcomes.len()
    );
    assert_all_pass(&outcomes);
}

#[test]
fn regression_seeds_pass() {
    let text = include_str!("../regression-seeds.txt");
    let jobs: Vec<(String, u64)> = text
        .lines()
        .map(|line| line.split('#').next().unwrap().trim())
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (scenario, seed) = line.split_once(' ').expect("`scenario seed` per line");
            (scenario.to_string(), seed.trim().parse().expect("a seed number"))
        })
        .collect();
    assert!(!jobs.is_empty());
    assert_all_pass(&run_in_parallel(jobs));
}

#[test]
fn the_same_seed_gives_the_same_trace() {
    // Disk faults (their own store and timers) and layout changes (joins, multipart
    // uploads) are covered too.
    for (scenario, seed) in [
        ("swarm", 7u64),
        ("rolling-restart", 3),
        ("partition-and-heal", 11),
        ("disk-faults", 5),
        ("layout-growth", 2),
        ("bucket-churn", 4),
    ] {
        let scenario = load_scenario(scenario).unwrap();
        let first = run(seed, &scenario);
        let second = run(seed, &scenario);
        assert_eq!(
            first.trace, second.trace,
            "seed {seed} of {} is not deterministic",
            scenario.name
        );
        assert!(first.events > 1000, "the run recorded too few events to mean anything");
        let other = run(seed + 1, &scenario);
        assert_ne!(first.trace, other.trace, "different seeds gave the same trace");
    }
}

#[test]
fn unknown_scenarios_are_refused_clearly() {
    let error = load_scenario("no-such-scenario").unwrap_err().to_string();
    assert!(error.contains("no-such-scenario") && error.contains("swarm"), "{error}");
}

#[test]
fn a_cluster_on_bdr_nodes_default_timers_passes_every_check() {
    // The seeds compress maintenance; a deployment's timers must pass the same checks
    // (here crashes and restarts under load, then hours healed until GC's grace ends).
    let scenario = load_scenario("rolling-restart").unwrap().at_production_timers();
    assert_eq!(scenario.timers, Timers::Production);
    let outcome = run(3, &scenario);
    assert_all_pass(std::slice::from_ref(&outcome));
    assert!(outcome.acknowledged_writes > 0, "the workload wrote nothing");
    assert!(
        outcome.virtual_ms > PRODUCTION_SETTLE_MS,
        "the run stopped before its settle phase ended"
    );
}

#[test]
fn a_scenario_file_with_unknown_timers_is_refused_clearly() {
    let folder = std::env::temp_dir().join(format!("bdr-sim-timers-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    let path = folder.join("fast.toml");
    let text =
        include_str!("../scenarios/production-timers.toml").replace("timers = \"production\"", "timers = \"fast\"");
    assert!(text.contains("timers = \"fast\""));
    std::fs::write(&path, text).unwrap();
    let error = load_scenario(path.to_str().unwrap()).unwrap_err().to_string();
    std::fs::remove_dir_all(&folder).unwrap();
    assert!(
        error.contains("fast.toml") && error.contains("unknown variant `fast`"),
        "{error}"
    );
    // Both spellings the file format knows are accepted.
    assert_eq!(
        load_scenario("scenarios/production-timers.toml").unwrap().timers,
        Timers::Production
    );
    assert_eq!(load_scenario("swarm").unwrap().timers, Timers::Compressed);
}
