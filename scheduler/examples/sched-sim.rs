//! Scheduler at scale: runs the simulation (`shoal_scheduler::sim`) for
//! several cluster sizes and prints one markdown table row per size.
//!
//! ```text
//! cargo run --release -p shoal-scheduler --example sched-sim -- \
//!     [--nodes 100,1000,10000] [--seed 1] [--schedulers 3] [--leave 0.02] \
//!     [--liars 0] [--zones 4] [--cross-zone-gbit G] [--verbose]
//! ```
//!
//! Goals (issue 12, P9): origin/image ≤ 1.05, p99/p50 completion ≤ 1.5,
//! scheduler time per call flat in the number of nodes. "sched µs" columns
//! are wall time spent inside `State` calls on this machine.

use std::process::ExitCode;

use shoal_scheduler::sim::{self, SimConfig, SimReport};

struct Args {
    nodes: Vec<usize>,
    seed: u64,
    schedulers: usize,
    leave: f64,
    liars: f64,
    zones: usize,
    cross_zone_gbit: Option<f64>,
    verbose: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        nodes: vec![100, 1_000, 10_000],
        seed: 1,
        schedulers: 3,
        leave: 0.02,
        liars: 0.0,
        zones: 4,
        cross_zone_gbit: None,
        verbose: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--verbose" {
            a.verbose = true;
            continue;
        }
        if flag == "--help" || flag == "-h" {
            return Err(String::new());
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--nodes" => {
                a.nodes = value
                    .split(',')
                    .map(|s| s.trim().replace('_', "").parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| bad(&e))?;
            }
            "--seed" => a.seed = value.parse().map_err(|e| bad(&e))?,
            "--schedulers" => a.schedulers = value.parse().map_err(|e| bad(&e))?,
            "--leave" => a.leave = value.parse().map_err(|e| bad(&e))?,
            "--liars" => a.liars = value.parse().map_err(|e| bad(&e))?,
            "--zones" => a.zones = value.parse().map_err(|e| bad(&e))?,
            "--cross-zone-gbit" => {
                a.cross_zone_gbit = Some(value.parse().map_err(|e| bad(&e))?);
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("sched-sim: {e}");
            }
            eprintln!("usage: sched-sim [--nodes 100,1000,10000] [--seed N] [--schedulers N] [--leave F] [--liars F] [--zones N] [--cross-zone-gbit G] [--verbose]");
            return ExitCode::from(2);
        }
    };
    let base = SimConfig::default();
    println!(
        "image: {} blobs, {} MiB; origin {} Gbit/s, nodes {} Gbit/s up/down; {} schedulers, {} zones, seed {}, {:.1}% leave, {:.1}% liars",
        base.blob_sizes.len(),
        base.blob_sizes.iter().sum::<u64>() >> 20,
        base.origin_bytes_per_s * 8.0 / 1e9,
        base.node_up_bytes_per_s * 8.0 / 1e9,
        args.schedulers,
        args.zones,
        args.seed,
        args.leave * 100.0,
        args.liars * 100.0,
    );
    println!();
    println!("| nodes | origin/image | p50 s | p99 s | p99/p50 | sched µs/announce | sched µs/parents | announces | parents calls | leases granted | violations | wall s |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut ok = true;
    for &nodes in &args.nodes {
        let cfg = SimConfig {
            nodes,
            seed: args.seed,
            schedulers: args.schedulers,
            leave_fraction: args.leave,
            liar_fraction: args.liars,
            zones: args.zones,
            cross_zone_bytes_per_s: args.cross_zone_gbit.map(|g| g * 1e9 / 8.0),
            ..SimConfig::default()
        };
        let r = sim::run(cfg);
        row(&r);
        if args.verbose {
            details(&r);
        }
        ok &= r.incomplete == 0 && r.violation_total() == 0;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn row(r: &SimReport) {
    println!(
        "| {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.1} | {:.1} | {} | {} | {} | {} | {:.1} |",
        r.nodes,
        r.origin_ratio(),
        r.completion_quantile(0.5) as f64 / 1e3,
        r.completion_quantile(0.99) as f64 / 1e3,
        r.p99_over_p50(),
        r.announce_cpu_us(),
        r.parents_cpu_us(),
        r.announces,
        r.parents_calls,
        r.leases_granted,
        r.violation_total(),
        r.wall.as_secs_f64(),
    );
}

fn details(r: &SimReport) {
    println!(
        "  completed {} incomplete {} left {}; sim {:.1} s; min {:.2} s max {:.2} s",
        r.completed,
        r.incomplete,
        r.left,
        r.sim_ms as f64 / 1e3,
        r.completion_quantile(0.0) as f64 / 1e3,
        r.completion_quantile(1.0) as f64 / 1e3,
    );
    println!(
        "  origin {} MiB (held only by departed nodes {} MiB, hand-off gaps {} MiB), peers {} MiB, max flows {}; leases granted {} (adopted {}), ended {:?}; max leases/blob {}, max lease fetchers/blob {}",
        r.origin_bytes >> 20,
        r.departed_only_bytes >> 20,
        r.handoff_gap_bytes >> 20,
        r.peer_bytes >> 20,
        r.max_flows,
        r.leases_granted,
        r.leases_adopted,
        r.leases_ended,
        r.max_leases_per_blob,
        r.max_lease_fetchers_per_blob,
    );
    println!(
        "  origin fallbacks {:?}; failure reports {}; parents blamed at another replica {}; resyncs {}; expired {}; rejected {}; wrong scheduler {}",
        r.origin_fallbacks, r.failure_reports, r.blamed_elsewhere_parents, r.resyncs, r.expired, r.blobs_rejected, r.wrong_scheduler,
    );
    println!(
        "  sched time: announce {:.2} s, parents {:.2} s, failure {:.3} s, tick {:.3} s ({} ticks)",
        r.announce_cpu.as_secs_f64(),
        r.parents_cpu.as_secs_f64(),
        r.failure_cpu.as_secs_f64(),
        r.tick_cpu.as_secs_f64(),
        r.ticks,
    );
    for v in &r.violation_samples {
        println!("  violation: {v}");
    }
}
