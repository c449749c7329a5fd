//! Health probes: one module per probe kind behind the [`Probe`] trait, the pure rise/fall
//! [`Counter`], and the runner that probes one encoder on its own task ([`spawn`]).
//!
//! A probe attempt is cancelled by dropping its future, and every probe cleans up when dropped
//! (an exec probe's processes are killed), so the runner's timeout is the only deadline a probe
//! needs. `flow` health is not a network probe: [`flow`] judges it from data-plane counters,
//! and [`probe_for`] has nothing to run for it.
//!
//! Must not: act on what it finds (the controller decides).

mod exec;
pub mod flow;
mod http;
mod tcp;
mod udp;

use std::{future::Future, io, net::SocketAddr, pin::Pin, process::ExitStatus, time::Duration};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::MissedTickBehavior,
};

pub use self::{exec::ExecProbe, http::HttpProbe, tcp::TcpProbe, udp::UdpProbe};
use crate::config::{Encoder, Health, HealthKind};

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
    /// The health check lacks what its kind needs (a config that skipped validation).
    #[error("health check misconfigured: {0}")]
    Config(String),
}

/// The probe that checks `encoder`'s health, or `None` for `flow`, which the controller
/// judges from data-plane counters.
///
/// A health check missing what its kind needs (which [`crate::config::Config::validate`]
/// rejects) still gets a probe: one that always fails and says why, so the encoder is never
/// trusted unchecked.
pub fn probe_for(encoder: &Encoder) -> Option<Box<dyn Probe>> {
    let health = &encoder.health;
    let kind = health.kind;
    let unusable = |why: String| -> Box<dyn Probe> { Box::new(Misconfigured { kind, why }) };
    let probe: Box<dyn Probe> = match kind {
        HealthKind::Udp | HealthKind::Tcp => match health.port {
            Some(port) => {
                let target = SocketAddr::new(encoder.address, port);
                if kind == HealthKind::Udp {
                    Box::new(UdpProbe::new(target))
                } else {
                    Box::new(TcpProbe::new(target))
                }
            }
            None => unusable(format!("health kind \"{kind}\" needs a port")),
        },
        HealthKind::Http => match health.url.as_deref().map(HttpProbe::new) {
            Some(Ok(probe)) => Box::new(probe),
            Some(Err(why)) => unusable(why),
            None => unusable("health kind \"http\" needs a url".into()),
        },
        HealthKind::Exec => match health.command.as_deref() {
            Some([program, args @ ..]) if !program.is_empty() => Box::new(ExecProbe::new(
                program.clone(),
                args.to_vec(),
                encoder.netns.clone(),
                encoder.env.clone(),
            )),
            _ => unusable("health kind \"exec\" needs a non-empty command".into()),
        },
        HealthKind::Flow => return None,
    };
    Some(probe)
}

/// A health check that cannot run; every attempt fails with the reason.
struct Misconfigured {
    kind: HealthKind,
    why: String,
}

impl Probe for Misconfigured {
    fn probe(&self) -> ProbeFuture<'_> {
        Box::pin(async { Err(ProbeError::Config(self.why.clone())) })
    }

    fn kind(&self) -> &'static str {
        self.kind.as_str()
    }
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
}

/// One probe result of one encoder, as the runner reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthUpdate {
    pub encoder: String,
    /// This attempt succeeded.
    pub ok: bool,
    /// Round-trip time of a successful attempt.
    pub latency: Option<Duration>,
    /// `Some(new state)` when this result changed the encoder's health (rise/fall reached).
    pub transition: Option<bool>,
    /// Why the attempt failed.
    pub error: Option<String>,
}

/// Starts the task that probes encoder `name`: one attempt every `health.interval_ms`, each
/// bounded by `health.timeout_ms`, counted with `health.rise`/`health.fall` from a healthy
/// start (so a dead encoder is reported down after `fall` intervals), and one
/// [`HealthUpdate`] on `tx` per attempt.
///
/// Ticks missed behind a slow probe are delayed, never bunched. The task ends when `cancel`
/// becomes `true` or its sender is dropped (promptly, even mid-probe), or when `tx` is closed.
pub fn spawn(
    name: String,
    probe: Box<dyn Probe>,
    health: &Health,
    tx: mpsc::Sender<HealthUpdate>,
    mut cancel: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let period = Duration::from_millis(health.interval_ms.max(1));
    let timeout = Duration::from_millis(health.timeout_ms);
    let mut counter = Counter::new(health.rise, health.fall, true);
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = cancelled(&mut cancel) => return,
                _ = ticker.tick() => {}
            }
            let result = tokio::select! {
                biased;
                () = cancelled(&mut cancel) => return,
                result = probe_once(probe.as_ref(), timeout) => result,
            };
            let ok = result.is_ok();
            let update = HealthUpdate {
                encoder: name.clone(),
                ok,
                transition: counter.record(ok),
                latency: result.as_ref().ok().copied(),
                error: result.err().map(|e| e.to_string()),
            };
            tokio::select! {
                biased;
                () = cancelled(&mut cancel) => return,
                sent = tx.send(update) => if sent.is_err() { return },
            }
        }
    })
}

/// Resolves once cancellation is requested or can no longer be (the sender is gone).
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    // Either outcome means stop: `true` was sent, or nobody is left to send it.
    let _ = cancel.wait_for(|stop| *stop).await;
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
