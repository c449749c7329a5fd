//! nsfail's benchmarks (issue 7), run by `cargo xtask bench [NAME]`:
//!
//! - `prog`: per-packet cost of the XDP program alone (BPF_PROG_TEST_RUN): nsfail hit and miss
//!   against an `XDP_PASS` program and a bare DEVMAP redirect.
//! - `scale`: per-packet cost with 1 to 100,000 channels, and the latency of one failover.
//! - `forward`: packets per second through a veth lab with one router core, and that core's
//!   CPU time per packet: nsfail, bare redirect, nftables DNAT, a userspace relay, plain
//!   kernel forwarding.
//! - `controller`: the daemon's CPU and memory with 100 encoders probed every 100 ms, and its
//!   start-up series: 1,000 to 100,000 channels from `nsfail run` to the first packet
//!   forwarded on the last channel, with memory, status, scrape, remap and add-channel times
//!   (`controller-startup` runs that series alone).
//! - `failover`: kill-and-failover trials through the daemon (udp probes, flow check, SRT).
//!
//! ```text
//! nsfail-bench [prog|scale|forward|controller|failover|all] [--reps N] [--out DIR]
//! ```
//!
//! Each benchmark prints a table and writes `NAME.json` and `NAME.svg` to DIR (default
//! `target/bench`). Every figure is the median of N >= 5 repetitions (default 7) with min and
//! max; variants are interleaved within each repetition; ratios are taken repetition by
//! repetition. Targets are reported as met or not met; they never decide the exit status,
//! which is 1 only when a benchmark could not run. Everything runs inside namespaces the
//! bench creates (uniquely named, removed on every path out), and every loop is bounded in
//! count and time.

mod chain;
mod chart;
mod controller;
mod failover;
mod forward;
mod object;
mod prog;
mod report;
mod scale;
mod startup;
mod sys;

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Context as _, Result, bail};

const BENCHES: [&str; 5] = ["prog", "scale", "forward", "controller", "failover"];
const MIN_REPS: usize = 5;

struct Args {
    benches: Vec<&'static str>,
    reps: usize,
    out: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut benches = Vec::new();
    let mut reps = 7;
    let mut out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--reps" => {
                reps = args
                    .next()
                    .context("--reps needs a number")?
                    .parse()
                    .context("--reps")?;
                if reps < MIN_REPS {
                    bail!("--reps must be at least {MIN_REPS}");
                }
            }
            "--out" => out = args.next().context("--out needs a directory")?.into(),
            "all" => benches.extend(BENCHES),
            "controller-startup" => benches.push("controller-startup"),
            name => match BENCHES.iter().find(|b| **b == name) {
                Some(b) => benches.push(*b),
                None => bail!(
                    "unknown benchmark {name:?} (known: {}, all)",
                    BENCHES.join(", ")
                ),
            },
        }
    }
    if benches.is_empty() {
        benches.extend(BENCHES);
    }
    Ok(Args { benches, reps, out })
}

fn main() -> ExitCode {
    match try_main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn try_main() -> Result<()> {
    let args = parse_args()?;
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks load BPF programs and create namespaces: run them as root");
    }
    if sys::online_cpus() < 2 {
        bail!("the benchmarks need two CPUs (a generator core and a router core)");
    }
    let mut failed = Vec::new();
    for name in &args.benches {
        eprintln!("running benchmark {name} ({} repetitions)...", args.reps);
        let result = match *name {
            "prog" => prog::run(args.reps),
            "scale" => scale::run(args.reps),
            "forward" => forward::run(args.reps),
            "controller" => controller::run(args.reps.min(5)),
            "controller-startup" => controller::startup_only(),
            // The issue asks for 20 kill-and-failover trials per detector.
            _ => failover::run(20, 5),
        };
        match result.and_then(|r| {
            print!("{}", r.table());
            r.write(&args.out)
        }) {
            Ok(()) => {}
            Err(e) => {
                eprintln!("benchmark {name} failed: {e:#}");
                failed.push(*name);
            }
        }
    }
    if !failed.is_empty() {
        bail!("could not run: {}", failed.join(", "));
    }
    Ok(())
}
