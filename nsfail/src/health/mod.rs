//! Health probes: one module per probe kind behind the [`Probe`] trait, the pure rise/fall
//! [`Counter`], the runner that probes one encoder on its own task ([`spawn`]), and the
//! [`judge`] that turns probe results, data-plane counters and the kernel's refusals of a
//! stream into health transitions.
//!
//! A probe attempt is cancelled by dropping its future, and every probe cleans up when dropped
//! (an exec probe's processes are killed), so the runner's timeout is the only deadline a probe
//! needs. `flow` health, and `srt` health while a session is live, are judged from data-plane
//! counters by [`judge`].
//!
//! Must not: act on what it finds (the controller decides).

pub mod batch;
mod exec;
mod http;
pub mod judge;
mod mmsg;
mod srt;
mod tcp;
mod udp;

use std::{future::Future, io, net::SocketAddr, pin::Pin, process::ExitStatus, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle, time::MissedTickBehavior};
use tokio_util::sync::CancellationToken;

pub use self::{exec::ExecProbe, http::HttpProbe, srt::SrtProbe, tcp::TcpProbe, udp::UdpProbe};
use crate::config::{Check, HealthCheck};

/// What a probe attempt resolves to: the latency of a healthy answer, or why there was none.
pub type ProbeFuture<'a> = Pin<Box<dyn Future<Output = Result<Duration, ProbeError>> + Send + 'a>>;

/// One kind of health check against one encoder.
pub trait Probe: Send + Sync {
    /// One attempt. It has no deadline of its own: bound it with [`probe_once`] (or drop the
    /// future), which cleans up whatever the attempt started.
    fn probe(&self) -> ProbeFuture<'_>;

    /// The config's name for this kind (`"udp"`, `"tcp"`, ...).
    fn kind(&self) -> &'static str;
}

/// Why a probe attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{op}: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    /// ICMP port unreachable: the encoder's host is up and nothing listens on the port.
    #[error("refused: nothing listens on the health port")]
    Refused,
    #[error("echo from {from} does not match the probe ({len} bytes)")]
    WrongEcho { from: SocketAddr, len: usize },
    #[error("HTTP status {0}")]
    HttpStatus(u16),
    #[error("not an HTTP response: {0}")]
    BadResponse(String),
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("command failed: {0}")]
    Exit(ExitStatus),
    #[error("network namespace {name}: {source}")]
    Netns {
        name: String,
        #[source]
        source: io::Error,
    },
    /// The probe's request could not be formed from its (validated) URL.
    #[error("cannot form the request: {0}")]
    Request(String),
    /// A datagram on the SRT probe socket that is not the answer to its induction request.
    #[error("not an SRT induction answer ({len} bytes; {count} such datagrams so far)")]
    NotInduction { len: usize, count: u64 },
}

/// The network probe of a health check, or `None` when nothing is probed over the network
/// (`flow` without an SRT standby; the controller judges it from data-plane counters).
pub fn probe_for(check: &HealthCheck) -> Option<Box<dyn Probe>> {
    let probe: Box<dyn Probe> = match &check.check {
        Check::Udp(at) => Box::new(UdpProbe::new(*at)),
        Check::Tcp(at) => Box::new(TcpProbe::new(*at)),
        Check::Http(url) => Box::new(HttpProbe::from_url(url.clone())),
        Check::Exec {
            program,
            args,
            netns,
            env,
        } => Box::new(ExecProbe::new(
            program.clone(),
            args.clone(),
            netns.clone(),
            env.clone(),
        )),
        Check::Srt(_) | Check::Flow { .. } => {
            Box::new(SrtProbe::new(check.check.induction_target()?))
        }
    };
    Some(probe)
}

/// One attempt of `probe`, failing with [`ProbeError::Timeout`] if it has not finished
/// within `timeout` (the attempt is dropped, which cleans up after it).
pub async fn probe_once(probe: &dyn Probe, timeout: Duration) -> Result<Duration, ProbeError> {
    tokio::time::timeout(timeout, probe.probe())
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

/// Rise/fall counting: turns a series of probe results into a health state with hysteresis.
///
/// A healthy encoder becomes unhealthy after `fall` consecutive failures, an unhealthy one
/// healthy after `rise` consecutive successes; a result that agrees with the current state
/// resets the count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counter {
    rise: u32,
    fall: u32,
    healthy: bool,
    /// Consecutive results disagreeing with `healthy`.
    streak: u32,
}

impl Counter {
    /// A count of zero is taken as one: a single result is the least that can change state.
    pub fn new(rise: u32, fall: u32, initially_healthy: bool) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            healthy: initially_healthy,
            streak: 0,
        }
    }

    /// Counts one probe result; `Some(new state)` when it changes the state.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.healthy { self.fall } else { self.rise };
        if self.streak < needed {
            return None;
        }
        self.healthy = ok;
        self.streak = 0;
        Some(ok)
    }

    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Makes the state unhealthy at once (the kernel refused the encoder's stream); `Some(false)`
    /// when that is a change. Coming back takes `rise` successes as after any fall.
    pub fn force_down(&mut self) -> Option<bool> {
        self.streak = 0;
        let was = std::mem::replace(&mut self.healthy, false);
        was.then_some(false)
    }
}

/// One probe result of one encoder, as the runner reports it. The controller's [`judge`]
/// counts it (rise/fall), or sets it aside while the data plane judges the encoder.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthUpdate {
    pub encoder: String,
    /// This attempt succeeded.
    pub ok: bool,
    /// Round-trip time of a successful attempt.
    pub latency: Option<Duration>,
    /// Why the attempt failed.
    pub error: Option<String>,
    /// The attempt was refused (ICMP port unreachable): nothing listens.
    pub refused: bool,
}

/// Starts the task that probes encoder `name`: one attempt every `check.interval`, each
/// bounded by `check.timeout`, and one [`HealthUpdate`] on `tx` per attempt.
///
/// Ticks missed behind a slow probe are delayed, never bunched. The task ends when `cancel` is
/// cancelled (promptly, even mid-probe), or when `tx` is closed.
pub fn spawn(
    name: String,
    probe: Box<dyn Probe>,
    check: &HealthCheck,
    tx: mpsc::Sender<HealthUpdate>,
    cancel: CancellationToken,
) -> JoinHandle<()> {
    let period = check.interval.max(Duration::from_millis(1));
    let timeout = check.timeout;
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let result = tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                result = probe_once(probe.as_ref(), timeout) => result,
            };
            let update = HealthUpdate {
                encoder: name.clone(),
                ok: result.is_ok(),
                latency: result.as_ref().ok().copied(),
                refused: matches!(result, Err(ProbeError::Refused)),
                error: result.err().map(|e| e.to_string()),
            };
            tokio::select! {
                biased;
                () = cancel.cancelled() => return,
                sent = tx.send(update) => if sent.is_err() { return },
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::Counter;

    /// Feeds `results` ('+' ok, '-' failure) and returns the transitions as a string of the
    /// same length: '.' none, 'U' became healthy, 'D' became unhealthy.
    fn run(counter: &mut Counter, results: &str) -> String {
        results
            .chars()
            .map(|c| match counter.record(c == '+') {
                None => '.',
                Some(true) => 'U',
                Some(false) => 'D',
            })
            .collect()
    }

    #[test]
    fn falls_after_fall_consecutive_failures() {
        let mut c = Counter::new(2, 3, true);
        assert_eq!(run(&mut c, "++--"), "....");
        assert!(c.healthy());
        assert_eq!(run(&mut c, "-"), "D");
        assert!(!c.healthy());
        assert_eq!(run(&mut c, "---"), "...");
        assert!(!c.healthy());
    }

    #[test]
    fn rises_after_rise_consecutive_successes() {
        let mut c = Counter::new(2, 3, false);
        assert_eq!(run(&mut c, "--+"), "...");
        assert!(!c.healthy());
        assert_eq!(run(&mut c, "+"), "U");
        assert!(c.healthy());
        assert_eq!(run(&mut c, "+++"), "...");
    }

    #[test]
    fn an_opposite_result_resets_the_streak() {
        let mut c = Counter::new(3, 3, true);
        // Two failures, a success, two failures: never three in a row.
        assert_eq!(run(&mut c, "--+--+"), "......");
        assert!(c.healthy());
        assert_eq!(run(&mut c, "---"), "..D");
        // Down: two successes, a failure, then three successes.
        assert_eq!(run(&mut c, "++-+++"), ".....U");
    }

    #[test]
    fn flapping_never_changes_state() {
        let mut up = Counter::new(2, 2, true);
        assert_eq!(run(&mut up, &"-+".repeat(50)), ".".repeat(100));
        assert!(up.healthy());
        let mut down = Counter::new(2, 2, false);
        assert_eq!(run(&mut down, &"+-".repeat(50)), ".".repeat(100));
        assert!(!down.healthy());
    }

    #[test]
    fn a_transition_starts_a_fresh_count() {
        let mut c = Counter::new(2, 2, true);
        assert_eq!(run(&mut c, "--++--++"), ".D.U.D.U");
    }

    #[test]
    fn counts_of_one_follow_every_result_and_zero_means_one() {
        let mut one = Counter::new(1, 1, true);
        assert_eq!(run(&mut one, "-+--++"), "DUD.U.");
        let mut zero = Counter::new(0, 0, true);
        assert_eq!(run(&mut zero, "-+"), "DU");
    }
}
