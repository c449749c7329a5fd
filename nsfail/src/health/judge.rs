//! The judge: every encoder's rise/fall [`Counter`], fed by three witnesses.
//!
//! - Probe results (the runner tasks): counted, except while the data plane judges the encoder
//!   (a `flow` check while the encoder is active, an `srt` check while its session is live:
//!   an SRT listener with a session has closed its listening socket and leaves induction
//!   requests unanswered, so a timed-out induction then says nothing).
//! - The data plane, every `interval`: for `flow` and `srt` checks, an encoder active for a
//!   channel whose input moves must have replied within `timeout`. With no input, nothing is
//!   judged (input loss is not a failed encoder).
//! - The kernel's refusals of the stream (ICMP port unreachable quoting a channel packet, seen
//!   by the egress program): [`REFUSALS_TO_FAIL`] of them in a row take the encoder down at
//!   once, whatever its check.
//!
//! Switching between probe and session never fails by itself: a session counts as live for
//! [`SESSION_HOLD`] after the encoder's last reply (longer than SRT's 1 s keepalive), the
//! first induction failures after it ended are set aside for the same time, while the
//! listener reopens, and an encoder just made active is not judged by silence from before
//! (for up to [`SESSION_HOLD`], while its caller reconnects).

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use log::{info, warn};

use super::{Counter, HealthUpdate};
use crate::{
    config::{Check, HealthCheck},
    control::{self, Controller},
};

/// Refusals in a row that take an encoder down.
pub const REFUSALS_TO_FAIL: u32 = 3;
/// Refusals further apart than this are not "in a row".
const REFUSAL_WINDOW: Duration = Duration::from_secs(1);
/// How long after its last reply an encoder's session counts as live.
pub const SESSION_HOLD: Duration = Duration::from_millis(2000);

struct Judged {
    check: HealthCheck,
    counter: Counter,
    /// When the data plane last judged it.
    evaluated: Instant,
    /// Refusals in a row, and when the first of them came.
    refusals: (u32, Instant),
    /// When the session was last seen live (SRT checks).
    session_seen: Option<Instant>,
    /// Since when it has been active for a channel (it was not at the last judgement).
    active_since: Option<Instant>,
}

/// Every encoder's health state.
#[derive(Default)]
pub struct Judge {
    encoders: BTreeMap<String, Judged>,
}

/// What the judge concluded from one piece of evidence.
pub type Transition = Option<bool>;

impl Judge {
    /// Follows the configuration: encoders added, changed (their counter restarts healthy)
    /// or gone.
    pub fn sync(&mut self, checks: &[(String, HealthCheck)]) {
        let now = Instant::now();
        let wanted: BTreeMap<String, HealthCheck> = checks.iter().cloned().collect();
        self.encoders
            .retain(|n, j| wanted.get(n).is_some_and(|w| *w == j.check));
        for (name, check) in wanted {
            self.encoders.entry(name).or_insert_with(|| Judged {
                counter: Counter::new(check.rise, check.fall, true),
                check,
                evaluated: now,
                refusals: (0, now),
                session_seen: None,
                active_since: None,
            });
        }
    }

    /// A probe result; `Some(state)` when it changes the encoder's health.
    pub fn on_probe(&mut self, update: &HealthUpdate, c: &Controller) -> Transition {
        let now = Instant::now();
        let j = self.encoders.get_mut(&update.encoder)?;
        if update.ok {
            j.refusals.0 = 0;
        }
        let set_aside = match &j.check.check {
            Check::Flow { .. } => !c.channels_on(&update.encoder).is_empty(),
            Check::Srt(_) => {
                // Only an encoder that is active, or was live lately, can have a session: the
                // others are not read from the data plane (one map read per probe saved).
                let lately = j
                    .session_seen
                    .is_some_and(|t| now.duration_since(t) < SESSION_HOLD);
                let live =
                    (lately || c.is_active(&update.encoder)) && session_live(c, &update.encoder);
                if live {
                    j.session_seen = Some(now);
                }
                // A refusal is an answer whatever the session: nothing listens.
                live || (!update.ok
                    && !update.refused
                    && j.session_seen
                        .is_some_and(|t| now.duration_since(t) < SESSION_HOLD))
            }
            _ => false,
        };
        if set_aside {
            return None;
        }
        j.counter.record(update.ok)
    }

    /// `n` refusals of channel packets by `encoder`'s kernel; `Some(false)` when they take
    /// the encoder down.
    pub fn on_refusal(&mut self, encoder: &str, n: u32) -> Transition {
        let now = Instant::now();
        let j = self.encoders.get_mut(encoder)?;
        let (count, first) = &mut j.refusals;
        if *count == 0 || now.duration_since(*first) > REFUSAL_WINDOW {
            *count = 0;
            *first = now;
        }
        *count += n;
        if *count < REFUSALS_TO_FAIL {
            return None;
        }
        *count = 0;
        j.counter.force_down()
    }

    /// When [`Judge::run`] next has an encoder to judge (`None`: no `flow` or `srt` check).
    pub fn next_due(&self) -> Option<Instant> {
        self.encoders
            .values()
            .filter(|j| j.check.check.watches_replies())
            .map(|j| j.evaluated + j.check.interval)
            .min()
    }

    /// The data plane's judgement of `flow` and `srt` checks, each every `interval`; acts on
    /// the transitions.
    pub fn run(&mut self, c: &mut Controller) {
        let now = Instant::now();
        let mut transitions = Vec::new();
        for (name, j) in &mut self.encoders {
            if !j.check.check.watches_replies()
                || now.duration_since(j.evaluated) < j.check.interval
            {
                continue;
            }
            j.evaluated = now;
            let window = j.check.timeout;
            let channels = c.channels_on(name);
            if channels.is_empty() {
                j.active_since = None;
                continue;
            }
            let since = *j.active_since.get_or_insert(now);
            let fed = channels.iter().any(|ch| c.input_moving(ch, window));
            if !fed {
                continue;
            }
            let idle = reply_idle(c, name);
            // Just made active (a failover or failback to it): its caller is still being told
            // to reconnect, so silence since before then says nothing about it yet.
            if now.duration_since(since) < SESSION_HOLD && idle >= now.duration_since(since) {
                continue;
            }
            if matches!(j.check.check, Check::Srt(_)) {
                if idle >= SESSION_HOLD {
                    // No session: the induction probe judges it.
                    continue;
                }
                j.session_seen = Some(now);
            }
            let ok = idle < window;
            if ok {
                j.refusals.0 = 0;
            }
            if let Some(healthy) = j.counter.record(ok) {
                if !healthy {
                    info!(
                        "encoder {name}: no reply for {} ms while its channel's input moves \
                         (timeout {} ms)",
                        idle.as_millis().min(u128::from(u32::MAX)),
                        window.as_millis()
                    );
                }
                transitions.push((name.clone(), healthy));
            }
        }
        for (name, healthy) in transitions {
            if let Err(err) = c.on_health(&name, healthy) {
                warn!("acting on {name}'s health: {err}");
            }
        }
    }
}

/// How long since `encoder` last replied to a caller (`Duration::MAX` if never).
fn reply_idle(c: &Controller, encoder: &str) -> Duration {
    c.dataplane()
        .encoder_stats(encoder)
        .ok()
        .filter(|s| s.tx.packets > 0)
        .map(|s| Duration::from_nanos(control::monotonic_ns().saturating_sub(s.tx.last_seen_ns)))
        .unwrap_or(Duration::MAX)
}

/// Whether `encoder` has a live session: it replied to a caller within [`SESSION_HOLD`].
fn session_live(c: &Controller, encoder: &str) -> bool {
    reply_idle(c, encoder) < SESSION_HOLD
}
