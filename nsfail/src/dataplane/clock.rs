//! The data plane's clock. The XDP program stamps last-seen times with the kernel's jiffies
//! (`bpf_jiffies64`, which the verifier inlines to one load, where `bpf_ktime_get_coarse_ns`
//! is a helper call: about 2.5 ns per packet here), scaled to CLOCK_MONOTONIC nanoseconds by
//! two constants set in the object when it is loaded: the length of a tick and the monotonic
//! time of jiffy 0. The timekeeping code advances jiffies from monotonic time, one tick at a
//! time, so the two stay in step for the whole boot: what the program writes is the
//! monotonic time of the current tick's start, as `bpf_ktime_get_coarse_ns` gives it, within
//! the error of the calibration below (a few reads of `/proc/timer_list`, tens of µs).

use std::{
    fs::File,
    io::{BufRead, BufReader},
    thread,
    time::{Duration, Instant},
};

/// `CONFIG_HZ` values the kernel can be built with.
const HZ: [u64; 4] = [100, 250, 300, 1000];
/// How many tick edges the calibration reads, how far apart, and how long it waits for one.
const EDGES: usize = 4;
const APART: Duration = Duration::from_millis(30);
const EDGE_WITHIN: Duration = Duration::from_millis(50);
/// How much later than the earliest one an edge may be seen beyond a tick (a tick's
/// interrupt, or the reading of the file, late by a few ms in a busy VM).
const LATE_NS: u64 = 20_000_000;
/// Two readings this close bracket an edge between them.
const CLOSE_NS: u64 = 200_000;

/// The constants of the jiffies-to-monotonic scale: `ns = jiffies * tick_ns + jiffy0_ns`
/// (wrapping: `jiffy0_ns` is usually "negative", jiffies starting 5 minutes before zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JiffyClock {
    pub tick_ns: u64,
    pub jiffy0_ns: u64,
}

impl JiffyClock {
    /// The CLOCK_MONOTONIC time at which jiffy `jiffies` began (what the program computes).
    #[cfg(test)]
    fn at(&self, jiffies: u64) -> u64 {
        jiffies
            .wrapping_mul(self.tick_ns)
            .wrapping_add(self.jiffy0_ns)
    }
}

/// One reading of jiffies (from `/proc/timer_list`), between two monotonic times.
#[derive(Clone, Copy, Debug)]
struct Sample {
    before_ns: u64,
    jiffies: u64,
    after_ns: u64,
}

/// Reads the kernel's jiffies against CLOCK_MONOTONIC at `EDGES` tick edges about
/// `APART` apart and derives the scale: about 100 ms, once per load of the object.
pub fn calibrate() -> Result<JiffyClock, String> {
    // A tick edge seen very late (a stalled VM) fails one attempt; three failing is an error.
    attempt().or_else(|_| attempt()).or_else(|_| attempt())
}

fn attempt() -> Result<JiffyClock, String> {
    let mut edges = Vec::with_capacity(EDGES);
    for i in 0..EDGES {
        if i > 0 {
            thread::sleep(APART);
        }
        edges.push(edge()?);
    }
    scale(&edges)
}

/// A tick edge: (a new jiffy, a time at or after it began), read by polling the file until
/// jiffies advance. The jiffy began at the latest when it was read; when it is one more than
/// the reading just before, taken within `CLOSE_NS`, the middle of the two is closer.
fn edge() -> Result<(u64, u64), String> {
    let deadline = Instant::now() + EDGE_WITHIN;
    let mut prev = sample()?;
    while Instant::now() < deadline {
        let cur = sample()?;
        if cur.jiffies > prev.jiffies {
            let close = cur.before_ns.saturating_sub(prev.after_ns) <= CLOSE_NS;
            let seen = if cur.jiffies == prev.jiffies + 1 && close {
                prev.after_ns / 2 + cur.before_ns / 2
            } else {
                cur.after_ns
            };
            return Ok((cur.jiffies, seen));
        }
        prev = cur;
    }
    Err(format!(
        "jiffies did not advance within {} ms",
        EDGE_WITHIN.as_millis()
    ))
}

/// The scale through tick edges: the tick from the first and last (matched to a
/// `CONFIG_HZ`), then jiffy 0. Jiffies advance in the tick's interrupt, which can run late:
/// an edge is seen at its ideal time or after it, never before, so the earliest one gives
/// jiffy 0.
fn scale(edges: &[(u64, u64)]) -> Result<JiffyClock, String> {
    let (Some(&a), Some(&b)) = (edges.first(), edges.last()) else {
        return Err("no tick edges".into());
    };
    let ticks = b.0.saturating_sub(a.0);
    if ticks == 0 || b.1 <= a.1 {
        return Err("jiffies did not advance between the edges".into());
    }
    let measured = (b.1 - a.1) as f64 / ticks as f64;
    let tick_ns = HZ
        .iter()
        .map(|hz| (1_000_000_000 + hz / 2) / hz)
        .find(|t| (measured - *t as f64).abs() < 0.1 * *t as f64)
        .ok_or_else(|| format!("a tick of {measured:.0} ns is no known HZ"))?;
    // Each edge's jiffy 0, as a signed offset from the first edge's.
    let zero = |(j, t): (u64, u64)| t.wrapping_sub(j.wrapping_mul(tick_ns));
    let base = zero(a);
    let offsets: Vec<i64> = edges
        .iter()
        .map(|e| zero(*e).wrapping_sub(base) as i64)
        .collect();
    let earliest = offsets.iter().copied().min().unwrap_or(0);
    let latest = offsets.iter().copied().max().unwrap_or(0);
    if latest.abs_diff(earliest) > tick_ns + LATE_NS {
        return Err(format!(
            "tick edges disagree by {} µs (jiffies not in step with CLOCK_MONOTONIC?)",
            latest.abs_diff(earliest) / 1000
        ));
    }
    Ok(JiffyClock {
        tick_ns,
        jiffy0_ns: base.wrapping_add(earliest as u64),
    })
}

fn sample() -> Result<Sample, String> {
    const SOURCE: &str = "/proc/timer_list";
    let before_ns = monotonic_ns();
    let file = File::open(SOURCE).map_err(|e| format!("cannot read {SOURCE}: {e}"))?;
    // The first `jiffies:` line is a few lines in; stop reading there.
    for line in BufReader::new(file).lines() {
        let line = line.map_err(|e| format!("cannot read {SOURCE}: {e}"))?;
        if let Some(v) = line.strip_prefix("jiffies:") {
            let after_ns = monotonic_ns();
            let jiffies = v
                .trim()
                .parse()
                .map_err(|e| format!("{SOURCE}: jiffies {v:?}: {e}"))?;
            return Ok(Sample {
                before_ns,
                jiffies,
                after_ns,
            });
        }
    }
    Err(format!("{SOURCE} has no jiffies line"))
}

fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The edge of jiffy `j` on a kernel with `hz` whose jiffy 0 is at `jiffy0`, seen
    /// `late` ns after its ideal time.
    fn edge_of(hz: u64, jiffy0: i128, j: u64, late: i128) -> (u64, u64) {
        let tick = i128::from((1_000_000_000 + hz / 2) / hz);
        (j, (i128::from(j) * tick + jiffy0 + late) as u64)
    }

    #[test]
    fn the_scale_puts_each_jiffy_at_its_tick_start() {
        for hz in HZ {
            let tick = (1_000_000_000 + hz / 2) / hz;
            // Jiffies start 300 s before zero: jiffy 0 is far in the past.
            let j = 4_294_967_296 - 300 * hz + 1234;
            let jiffy0 = 2_000_000_000_i128 - i128::from(j) * i128::from(tick);
            let step = 30 * hz / 1000 + 1;
            let edges: Vec<(u64, u64)> = [900_000, 20_000, 2_500_000, 400_000]
                .iter()
                .enumerate()
                .map(|(i, late)| edge_of(hz, jiffy0, j + i as u64 * step, *late))
                .collect();
            let c = scale(&edges).unwrap();
            assert_eq!(c.tick_ns, tick, "HZ {hz}");
            let want = (i128::from(j + 99) * i128::from(tick) + jiffy0) as u64;
            // The earliest edge was seen 20 µs late: so is the scale.
            assert_eq!(c.at(j + 99), want + 20_000, "HZ {hz}");
        }
    }

    #[test]
    fn edges_that_cannot_be_a_clock_are_refused() {
        let a = edge_of(1000, 0, 5000, 0);
        assert!(scale(&[]).is_err());
        assert!(scale(&[a, a]).unwrap_err().contains("did not advance"));
        // 30 ticks in 45 ms: 1.5 ms a tick is no HZ.
        let b = (5030, a.1 + 45_000_000);
        assert!(scale(&[a, b]).unwrap_err().contains("no known HZ"));
        // The right tick, but one edge 50 ms off.
        let b = edge_of(1000, 0, 5030, 0);
        let c = edge_of(1000, 50_000_000, 5060, 0);
        assert!(scale(&[a, c, b]).unwrap_err().contains("disagree"));
    }

    #[test]
    fn this_kernel_calibrates() {
        let c = calibrate().unwrap();
        for _ in 0..3 {
            let (j, seen) = edge().unwrap();
            // Seen at the tick's start or after it, by the interrupt's lateness at most (and
            // the reading's error, a few µs either way).
            let late = seen.wrapping_sub(c.at(j)) as i64;
            assert!(
                (-100_000..LATE_NS as i64).contains(&late),
                "jiffy {j} seen {late} ns after the scale says it began"
            );
        }
    }
}
