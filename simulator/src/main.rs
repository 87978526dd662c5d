//! `bdr-sim`: parses the command line and calls the simulator library.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use bdr_sim::durability::{self, run_durability, DurabilityArguments};
use bdr_sim::world::MessageKindCount;
use bdr_sim::{load_scenario, plots, run, Outcome, Scenario, Timers};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bdr-sim",
    version,
    about = "Deterministic fault simulation of the bdr cluster logic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one seed; the last line is `seed=N trace=<hash> result=ok|FAIL`.
    Run {
        #[arg(long)]
        seed: u64,
        /// A built-in scenario name or a scenario TOML file.
        #[arg(long, default_value = "swarm")]
        scenario: String,
        /// Write the outcome as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Write SVG plots here: redundancy.svg (stripes by health over virtual time) and
        /// repair-queue.svg.
        #[arg(long)]
        plots: Option<PathBuf>,
    },
    /// Simulation speed: one run of a cluster under client load and crashes, printed as
    /// virtual seconds per wall second (use a release build).
    Bench {
        #[arg(long, default_value_t = 20)]
        nodes: u32,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Runs to time (different seeds from --seed on); the figure is their total.
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// Run many seeds; on failure print the seed and the command that replays it.
    Explore {
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Stop starting new seeds after this long (e.g. "60s").
        #[arg(long)]
        time_budget: Option<String>,
        #[arg(long, default_value = "swarm")]
        scenario: String,
    },
    /// Monte Carlo model of node failures, zone outages and repair at scale: annual loss
    /// probability and nines, beside the analytic MTTDL.
    // Negative numbers reach the model's range checks, which say what is allowed.
    #[command(allow_negative_numbers = true)]
    Durability {
        #[arg(long, default_value_t = 1000)]
        nodes: u32,
        #[arg(long, default_value_t = 5)]
        zones: u32,
        /// Data shards per stripe.
        #[arg(long, default_value_t = 4)]
        k: u32,
        /// Parity shards per stripe.
        #[arg(long, default_value_t = 2)]
        m: u32,
        /// Node failures per node-year.
        #[arg(long, default_value_t = 0.02)]
        afr: f64,
        /// Temporary outages per zone-year (the zone's data comes back).
        #[arg(long, default_value_t = 0.0)]
        zone_afr: f64,
        #[arg(long, default_value_t = durability::ZONE_OUTAGE_HOURS_DEFAULT)]
        zone_outage_hours: f64,
        /// Data stored per node (the node is assumed full).
        #[arg(long, default_value_t = durability::NODE_CAPACITY_TIB_DEFAULT)]
        node_capacity_tib: f64,
        /// Data bytes per stripe, e.g. 4MiB [default: the node's default stripe length].
        #[arg(long)]
        stripe_size: Option<String>,
        /// Rebuild rate of one failed node's data, e.g. 100MiB/s or 1.5GB/s.
        #[arg(long, default_value = durability::REPAIR_BANDWIDTH_DEFAULT)]
        repair_bandwidth: String,
        /// From a node's failure until its rebuild starts.
        #[arg(long, default_value_t = durability::DETECT_DELAY_MINUTES_DEFAULT)]
        detect_minutes: f64,
        /// Length of each simulated history.
        #[arg(long, default_value_t = durability::YEARS_DEFAULT)]
        years: u32,
        /// Simulated histories of --years each [default: about 20 million simulated
        /// failures, fewer when failures overlap heavily: a few seconds].
        #[arg(long)]
        trials: Option<u32>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Write durability-vs-repair-bandwidth.svg here: the model run again at 1/8 to 8
        /// times --repair-bandwidth (the same seed and trials each time).
        #[arg(long)]
        plots: Option<PathBuf>,
    },
}

/// The durability plot runs the model at these multiples of --repair-bandwidth.
const DURABILITY_PLOT_BANDWIDTH_FACTORS: [f64; 7] = [0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0];

fn write_plot(folder: &std::path::Path, name: &str, svg: &str) -> Result<(), String> {
    std::fs::create_dir_all(folder).map_err(|error| format!("cannot create {}: {error}", folder.display()))?;
    let path = folder.join(name);
    std::fs::write(&path, svg).map_err(|error| format!("cannot write {}: {error}", path.display()))?;
    println!("plot: {}", path.display());
    Ok(())
}

fn summary(outcome: &Outcome) -> String {
    format!(
        "seed={} trace={} result={}",
        outcome.seed,
        outcome.trace,
        if outcome.ok() { "ok" } else { "FAIL" }
    )
}

/// Times `runs` runs of the benchmark scenario and prints the figure; false if a run
/// failed its checks.
fn bench(nodes: u32, seed: u64, runs: u32, timers: Timers) -> bool {
    let scenario = Scenario {
        name: format!("bench-{nodes}-nodes"),
        nodes,
        zones: 4.min(nodes),
        swarm: false,
        crashes: true,
        partitions: false,
        message_loss: false,
        clock_skew: false,
        bit_rot: false,
        disk_faults: false,
        ..Scenario::default()
    };
    let scenario = match timers {
        Timers::Production => scenario.at_production_timers(),
        Timers::Compressed => scenario,
    };
    let started = Instant::now();
    let mut virtual_ms = 0u64;
    let mut messages = 0u64;
    let mut message_mix: BTreeMap<&'static str, MessageKindCount> = BTreeMap::new();
    let mut failed = false;
    for run_seed in seed..seed + u64::from(runs) {
        let outcome = run(run_seed, &scenario);
        if !outcome.ok() {
            failed = true;
            println!("seed {run_seed} failed: {:?}", outcome.failures);
        }
        virtual_ms += outcome.virtual_ms;
        messages += outcome.messages;
        for (kind, count) in &outcome.message_mix {
            let total = message_mix.entry(kind).or_default();
            total.requests += count.requests;
            total.request_bytes += count.request_bytes;
        }
    }
    let wall_s = started.elapsed().as_secs_f64();
    let timers_name = match timers {
        Timers::Production => "bdr-node's default timers",
        Timers::Compressed => "the seeds' compressed timers",
    };
    println!(
        "{nodes} nodes, {runs} runs, {timers_name}: {:.0} virtual s in {wall_s:.2} wall s = {:.0} virtual s per wall s ({:.0} messages per wall s)",
        virtual_ms as f64 / 1000.0,
        virtual_ms as f64 / 1000.0 / wall_s,
        messages as f64 / wall_s
    );
    let virtual_s = (virtual_ms as f64 / 1000.0).max(f64::MIN_POSITIVE);
    println!("requests per virtual second, by kind (request bytes per virtual second):");
    for (kind, count) in &message_mix {
        println!(
            "  {kind:<20} {:>8.1}  ({:.0} B)",
            count.requests as f64 / virtual_s,
            count.request_bytes as f64 / virtual_s
        );
    }
    !failed
}

fn main() -> ExitCode {
    // The node logic's logs, when asked for (RUST_LOG=bdr_node=debug): they go to stderr
    // and never into the trace, so they do not change the trace hash.
    if let Ok(filter) = std::env::var("RUST_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .without_time()
            .init();
    }
    match Cli::parse().command {
        Command::Durability {
            nodes,
            zones,
            k,
            m,
            afr,
            zone_afr,
            zone_outage_hours,
            node_capacity_tib,
            stripe_size,
            repair_bandwidth,
            detect_minutes,
            years,
            trials,
            seed,
            json,
            plots,
        } => {
            let arguments = DurabilityArguments {
                nodes,
                zones,
                data_shards: k,
                parity_shards: m,
                node_failures_per_year: afr,
                zone_outages_per_year: zone_afr,
                zone_outage_hours,
                node_capacity_tib,
                stripe_length: stripe_size,
                repair_bandwidth,
                detect_delay_minutes: detect_minutes,
                years,
                trials,
                seed,
            };
            let started = Instant::now();
            let report = match run_durability(&arguments) {
                Ok(report) => report,
                Err(error) => {
                    eprintln!("bdr-sim durability: {error}");
                    return ExitCode::FAILURE;
                }
            };
            println!("{}", report.render_text());
            println!("wall={:.2}s", started.elapsed().as_secs_f64());
            if let Some(path) = json {
                let json = serde_json::to_string_pretty(&report).expect("report serialises");
                if let Err(error) = std::fs::write(&path, json) {
                    eprintln!("bdr-sim: cannot write {}: {error}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            if let Some(folder) = plots {
                let base = report.model.repair_bandwidth_bytes_per_second;
                let mut points = Vec::new();
                for factor in DURABILITY_PLOT_BANDWIDTH_FACTORS {
                    let bandwidth = base * factor;
                    let arguments = DurabilityArguments {
                        repair_bandwidth: format!("{}B/s", bandwidth.round() as u64),
                        ..arguments.clone()
                    };
                    match run_durability(&arguments) {
                        Ok(report) => {
                            println!(
                                "repair bandwidth {:.1} MiB/s: nines {:?} (analytic {:?})",
                                bandwidth / (1024.0 * 1024.0),
                                report.monte_carlo.nines,
                                report.analytic.nines
                            );
                            points.push((bandwidth, report.monte_carlo.nines, report.analytic.nines));
                        }
                        Err(error) => {
                            eprintln!("bdr-sim durability: {error}");
                            return ExitCode::FAILURE;
                        }
                    }
                }
                let svg = plots::durability_chart(&points);
                if let Err(error) = write_plot(&folder, "durability-vs-repair-bandwidth.svg", &svg) {
                    eprintln!("bdr-sim: {error}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Bench { nodes, seed, runs } => {
            // A deployment's timers first: what the simulator does with a cluster's
            // virtual seconds. Then the seeds' compressed timers, for comparison.
            let mut failed = false;
            for timers in [Timers::Production, Timers::Compressed] {
                failed |= !bench(nodes, seed, runs, timers);
            }
            // A speed figure of a run that broke an invariant is no figure.
            if failed {
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Command::Run {
            seed,
            scenario,
            report,
            plots,
        } => {
            let scenario = match load_scenario(&scenario) {
                Ok(scenario) => scenario,
                Err(error) => {
                    eprintln!("bdr-sim: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let started = Instant::now();
            let outcome = run(seed, &scenario);
            for failure in &outcome.failures {
                println!("failure: {failure}");
            }
            println!(
                "scenario={} operations={} acknowledged={} unavailable={} faults={} messages={} virtual={}s wall={:.2}s",
                outcome.scenario,
                outcome.operations,
                outcome.acknowledged_writes,
                outcome.unavailable_operations,
                outcome.faults_injected.len(),
                outcome.messages,
                outcome.virtual_ms / 1000,
                started.elapsed().as_secs_f64()
            );
            if let Some(path) = report {
                let json = serde_json::to_string_pretty(&outcome).expect("outcome serialises");
                if let Err(error) = std::fs::write(&path, json) {
                    eprintln!("bdr-sim: cannot write {}: {error}", path.display());
                    return ExitCode::FAILURE;
                }
            }
            if let Some(folder) = plots {
                for (name, svg) in [
                    ("redundancy.svg", plots::redundancy_chart(&outcome.samples)),
                    ("repair-queue.svg", plots::repair_queue_chart(&outcome.samples)),
                ] {
                    if let Err(error) = write_plot(&folder, name, &svg) {
                        eprintln!("bdr-sim: {error}");
                        return ExitCode::FAILURE;
                    }
                }
            }
            println!("{}", summary(&outcome));
            if outcome.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Explore {
            seeds,
            first_seed,
            jobs,
            time_budget,
            scenario: scenario_name,
        } => {
            let scenario = match load_scenario(&scenario_name) {
                Ok(scenario) => scenario,
                Err(error) => {
                    eprintln!("bdr-sim: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let budget = match time_budget.as_deref().map(humantime::parse_duration).transpose() {
                Ok(budget) => budget,
                Err(error) => {
                    eprintln!("bdr-sim: --time-budget: {error}");
                    return ExitCode::FAILURE;
                }
            };
            let started = Instant::now();
            let next = AtomicU64::new(first_seed);
            let failed = AtomicBool::new(false);
            let failures: Mutex<Vec<Outcome>> = Mutex::new(Vec::new());
            let completed = AtomicU64::new(0);
            let virtual_ms = AtomicU64::new(0);
            std::thread::scope(|scope| {
                for _ in 0..jobs.max(1) {
                    scope.spawn(|| loop {
                        if budget.is_some_and(|budget| started.elapsed() > budget) {
                            return;
                        }
                        let seed = next.fetch_add(1, Ordering::Relaxed);
                        if seed >= first_seed + seeds {
                            return;
                        }
                        let outcome = run(seed, &scenario);
                        completed.fetch_add(1, Ordering::Relaxed);
                        virtual_ms.fetch_add(outcome.virtual_ms, Ordering::Relaxed);
                        if !outcome.ok() {
                            failed.store(true, Ordering::Relaxed);
                            failures.lock().expect("not poisoned").push(outcome);
                        }
                    });
                }
            });
            let wall = started.elapsed().as_secs_f64();
            let completed = completed.load(Ordering::Relaxed);
            println!(
                "explored {completed} seeds of scenario {} in {wall:.1}s ({:.0}x real time per core)",
                scenario.name,
                virtual_ms.load(Ordering::Relaxed) as f64 / 1000.0 / wall / jobs.max(1) as f64
            );
            let mut failures = failures.into_inner().expect("not poisoned");
            failures.sort_by_key(|outcome| outcome.seed);
            for outcome in &failures {
                for failure in &outcome.failures {
                    println!("seed {}: {failure}", outcome.seed);
                }
                println!("{}", summary(outcome));
                println!("replay: bdr-sim run --seed {} --scenario {scenario_name}", outcome.seed);
            }
            if failed.load(Ordering::Relaxed) {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
    }
}
