//! `prog`: per-packet cost of the XDP programs alone, with BPF_PROG_TEST_RUN (the kernel
//! reports the mean duration of one run over `repeat` runs).

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use nsfail::{Dataplane, XdpMode};
use nsfail_common::xdp_reason;
use nsfail_tests::{Entered, PinDir};

use crate::{
    chain,
    object::{self, BenchObject},
    report::{Figure, Goal, Ratio, Report},
    sys,
};

/// Test runs per sample, and runs per test run (one chain walk).
const CALLS: usize = 400;
const REPEAT: u32 = chain::MAX_WALK;

pub const HIT: &str = "nsfail hit";
pub const MISS: &str = "nsfail miss";
pub const PASS: &str = "XDP_PASS";
pub const BARE: &str = "bare redirect";
pub const MAC: &str = "redirect + MAC rewrite";
pub const MIN: &str = "minimal rewrite";
pub const MIN_MISS: &str = "minimal rewrite, miss";

/// The per-packet budget: (variant, program, what it adds to or takes from the minimal
/// rewrite). Each is measured on the hit frames; its difference from the minimal rewrite in
/// the same repetition is that part's cost.
const BUDGET: [(&str, &str, &str); 8] = [
    ("parse only", object::PARSE, "parse, no lookup, XDP_PASS"),
    (
        "minimal, no checksums",
        object::MIN_NO_CSUM,
        "minus the checksum updates",
    ),
    (
        "minimal + clock",
        object::MIN_CLOCK,
        "plus bpf_ktime_get_coarse_ns",
    ),
    (
        "minimal + jiffies clock",
        object::MIN_JIFFIES,
        "plus bpf_jiffies64 scaled to ns (inlined by the verifier)",
    ),
    (
        "minimal + clock + counters",
        object::MIN_COUNTERS,
        "plus clock and 3 per-CPU counters",
    ),
    (
        "minimal + source check",
        object::MIN_LEARN,
        "plus the per-CPU last-source compare",
    ),
    (
        "minimal + DEVMAP lookup",
        object::MIN_DEVCHECK,
        "plus a DEVMAP lookup",
    ),
    (
        "minimal + get_buff_len",
        object::MIN_BUFLEN,
        "plus bpf_xdp_get_buff_len",
    ),
];

/// (group, frame length): a 64-byte frame, and a frame with a 1316-byte UDP payload (seven
/// MPEG-TS packets, the usual payload of a contribution stream).
const SIZES: [(&str, usize); 2] = [("64 B frame", 64), ("1316 B payload", 42 + 1316)];

pub fn run(reps: usize) -> Result<Report> {
    let ns = sys::namespace("nbp")?;
    for (a, b) in [
        ("ing", "ingp"),
        ("enc", "encp"),
        ("pas", "pasp"),
        ("rdr", "rdrp"),
        ("mac", "macp"),
        ("min", "minp"),
    ] {
        sys::veth(&ns, a, b, None)?;
    }
    for i in 0..BUDGET.len() {
        sys::veth(&ns, &format!("bud{i}"), &format!("budp{i}"), None)?;
    }
    let link = |name: &str| sys::link(&ns, name);
    let (enc, encp) = (link("enc")?, link("encp")?);
    let entered = Entered::new(&ns);
    let pins = PinDir::new();
    let mut dp = Dataplane::open(pins.pins.clone()).context("opening a data plane")?;
    dp.attach_ingest("ing", XdpMode::Native)?;
    // Two channels forwarding to each other: every run is a complete hit.
    chain::build(&mut dp, &pins.pins, "enc", encp.mac, 2, 2)?;
    let mut obj = BenchObject::load()?;
    obj.attach(object::PASS, link("pas")?.ifindex)?;
    obj.attach(object::REDIRECT, link("rdr")?.ifindex)?;
    obj.attach(object::MAC_REDIRECT, link("mac")?.ifindex)?;
    obj.attach(object::MINIMAL, link("min")?.ifindex)?;
    for (i, (_, prog, _)) in BUDGET.iter().enumerate() {
        obj.attach(prog, link(&format!("bud{i}"))?.ifindex)?;
    }
    obj.set_redirect_port(enc.ifindex)?;
    obj.set_redirect_mac(encp.mac)?;
    let v4 = |a: std::net::SocketAddr| match a {
        std::net::SocketAddr::V4(a) => a,
        std::net::SocketAddr::V6(_) => unreachable!("the chain is IPv4"),
    };
    obj.set_minimal(
        &[
            (v4(chain::listen(0)), v4(chain::listen(1))),
            (v4(chain::listen(1)), v4(chain::listen(0))),
        ],
        encp.mac,
        enc.mac,
    )?;

    let mut report = Report::new(
        "prog",
        "per-packet cost of the XDP program alone, BPF_PROG_TEST_RUN",
        reps,
    );
    report.method = vec![
        format!(
            "each sample: {CALLS} test runs x repeat {REPEAT}, mean of the kernel's per-run \
             duration (whole ns per test run); programs attached (native XDP) to spare veths"
        ),
        "hit: two channels forwarding to each other's ingest address, so the frame stays a \
         complete hit (parse, lookup, rewrite, checksums, counters, redirect) on every run; \
         miss: UDP to a port that is no channel; bare redirect: DEVMAP redirect, no parsing; \
         redirect + MAC rewrite: the same plus writes to both ends of the headers; minimal \
         rewrite: parse, one hash lookup of (daddr, dport), MACs, address, port, TTL, \
         incremental checksums, DEVMAP redirect, nothing else (its miss: the same parse and \
         lookup, then XDP_PASS)"
            .into(),
        "variants interleaved within each repetition, order rotated".into(),
    ];
    let mut variants = vec![HIT, MISS, PASS, BARE, MAC, MIN, MIN_MISS];
    variants.extend(BUDGET.iter().map(|(v, _, _)| *v));
    for (group, _) in SIZES {
        for v in &variants {
            report.figures.push(Figure::new(group, v, "ns/packet"));
        }
    }
    let mut frames = Vec::new();
    for (_, len) in SIZES {
        let payload = len - 42;
        frames.push((
            vec![chain::frame(0, payload), chain::frame(1, payload)],
            vec![chain::miss_frame(payload)],
        ));
    }
    let ingress = dp.ingress_program();
    let pass = obj.program(object::PASS)?;
    let bare = obj.program(object::REDIRECT)?;
    let mac = obj.program(object::MAC_REDIRECT)?;
    let min = obj.program(object::MINIMAL)?;
    let budget: Vec<&Xdp> = BUDGET
        .iter()
        .map(|(_, prog, _)| obj.program(prog))
        .collect::<Result<_>>()?;
    for rep in 0..reps {
        for (s, (group, _)) in SIZES.iter().enumerate() {
            let (hits, misses) = &frames[s];
            for k in 0..variants.len() {
                let variant = variants[(k + rep) % variants.len()];
                let before = dp.xdp_stats()?;
                let value = match variant {
                    HIT => sample(ingress, hits, object::XDP_REDIRECT)?,
                    MISS => sample(ingress, misses, object::XDP_PASS)?,
                    PASS => sample(pass, hits, object::XDP_PASS)?,
                    BARE => sample(bare, hits, object::XDP_REDIRECT)?,
                    MIN => sample(min, hits, object::XDP_REDIRECT)?,
                    MIN_MISS => sample(min, misses, object::XDP_PASS)?,
                    MAC => sample(mac, hits, object::XDP_REDIRECT)?,
                    v => {
                        let i = BUDGET
                            .iter()
                            .position(|(b, _, _)| *b == v)
                            .expect("variant");
                        let expect = if BUDGET[i].1 == object::PARSE {
                            object::XDP_PASS
                        } else {
                            object::XDP_REDIRECT
                        };
                        sample(budget[i], hits, expect)?
                    }
                };
                let after = dp.xdp_stats()?;
                check_counts(variant, &before, &after)?;
                report
                    .figures
                    .iter_mut()
                    .find(|f| f.group == *group && f.variant == variant)
                    .expect("figure")
                    .samples
                    .push(value);
            }
        }
    }
    for (group, _) in SIZES {
        let fig = |v: &str| report.figure(group, v).expect("figure").clone();
        let ratios = [
            Ratio::of(
                &format!("hit / bare redirect, {group}"),
                &fig(HIT),
                &fig(BARE),
                Some(Goal::AtMost(1.6)),
            ),
            Ratio::of(
                &format!("miss / XDP_PASS, {group}"),
                &fig(MISS),
                &fig(PASS),
                Some(Goal::AtMost(1.1)),
            ),
            Ratio::of(
                &format!("hit / redirect + MAC rewrite, {group}"),
                &fig(HIT),
                &fig(MAC),
                None,
            ),
            Ratio::of(
                &format!("hit / minimal rewrite, {group}"),
                &fig(HIT),
                &fig(MIN),
                Some(Goal::AtMost(1.1)),
            ),
            Ratio::of(
                &format!("miss / minimal rewrite's miss (XDP_PASS + parse), {group}"),
                &fig(MISS),
                &fig(MIN_MISS),
                Some(Goal::AtMost(1.5)),
            ),
            Ratio::of(
                &format!("minimal rewrite / bare redirect, {group}"),
                &fig(MIN),
                &fig(BARE),
                None,
            ),
        ];
        report.ratios.extend(ratios);
    }
    for (group, _) in SIZES {
        let fig = |v: &str| report.figure(group, v).expect("figure").summary().median;
        report.notes.push(format!(
            "{group}: hit costs {:.1} ns more than the bare redirect and {:.1} ns more than \
             the minimal rewrite, miss {:.1} ns more than XDP_PASS (medians)",
            fig(HIT) - fig(BARE),
            fig(HIT) - fig(MIN),
            fig(MISS) - fig(PASS)
        ));
    }
    for (group, _) in SIZES {
        let fig = |v: &str| report.figure(group, v).expect("figure").clone();
        let min = fig(MIN);
        let diff = |v: &str| {
            let f = fig(v);
            let d: Vec<f64> = f
                .samples
                .iter()
                .zip(&min.samples)
                .map(|(a, b)| a - b)
                .collect();
            crate::report::summarize(&d).median
        };
        let mut parts = vec![
            format!("XDP_PASS {:.1}", fig(PASS).summary().median),
            format!(
                "parse {:+.1}",
                fig("parse only").summary().median - fig(PASS).summary().median
            ),
            format!(
                "lookup (miss) {:+.1}",
                fig(MIN_MISS).summary().median - fig("parse only").summary().median
            ),
        ];
        for (v, _, what) in BUDGET.iter().skip(1) {
            parts.push(format!("{what}: {:+.1}", diff(v)));
        }
        parts.push(format!("nsfail hit over minimal: {:+.1}", diff(HIT)));
        report.notes.push(format!(
            "budget, {group} (ns, medians of per-repetition differences from the minimal \
             rewrite): {}",
            parts.join("; ")
        ));
    }
    drop(obj);
    drop(dp);
    drop(pins);
    drop(entered);
    drop(ns);
    Ok(report)
}

/// Mean ns per run over `CALLS` test runs of `REPEAT` runs, cycling through `frames`; every
/// test run must end with `expect`.
fn sample(prog: &Xdp, frames: &[Vec<u8>], expect: u32) -> Result<f64> {
    let mut total_ns = 0u128;
    for c in 0..CALLS {
        let opts = TestRunOptions {
            data_in: Some(&frames[c % frames.len()]),
            repeat: REPEAT,
            ..Default::default()
        };
        let r = prog.test_run(opts).context("test run")?;
        if r.return_value != expect {
            bail!("test run returned {}, expected {expect}", r.return_value);
        }
        total_ns += r.duration.as_nanos();
    }
    Ok(total_ns as f64 / CALLS as f64)
}

/// The nsfail variants really took the path they are named after, on every run.
fn check_counts(variant: &str, before: &[(&str, u64)], after: &[(&str, u64)]) -> Result<()> {
    let delta = |name: &str| {
        let get = |v: &[(&str, u64)]| v.iter().find(|(n, _)| *n == name).map_or(0, |(_, c)| *c);
        get(after) - get(before)
    };
    let runs = (CALLS as u64) * u64::from(REPEAT);
    let (reason, want) = match variant {
        HIT => (xdp_reason::NAMES[xdp_reason::REDIRECTED as usize], runs),
        MISS => (
            xdp_reason::NAMES[xdp_reason::PASS_NO_CHANNEL as usize],
            runs,
        ),
        _ => (xdp_reason::NAMES[xdp_reason::REDIRECTED as usize], 0),
    };
    let got = delta(reason);
    if got != want {
        bail!("{variant}: nsfail counted {got} {reason}, expected {want}");
    }
    Ok(())
}
