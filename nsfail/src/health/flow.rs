//! The `flow` check: the data plane as its own probe. An encoder is failing when a channel
//! it is active for has moving input but the encoder has sent nothing back (replies) for
//! `timeout_ms`. With no input, nothing is judged: that is input loss, not a failed encoder.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use log::warn;

use super::Counter;
use crate::{
    config::{Config, Health, HealthKind},
    control::{self, Controller},
};

/// The `flow` check: an encoder is failing when a channel it is active for has moving input
/// but the encoder has sent nothing back (replies) for `timeout_ms`. Judged every
/// `interval_ms` and counted with rise/fall like a probe. With no input, nothing is judged.
#[derive(Default)]
pub struct FlowChecks {
    /// Encoders with a flow check: their settings, counter and last evaluation.
    state: BTreeMap<String, (Health, Counter, Instant)>,
}

impl FlowChecks {
    /// Follows the configuration: flow-checked encoders added, changed or gone.
    pub fn sync(&mut self, cfg: &Config) {
        let now = Instant::now();
        let wanted: BTreeMap<&str, &Health> = cfg
            .encoders
            .iter()
            .filter(|e| e.health.kind == HealthKind::Flow)
            .map(|e| (e.name.as_str(), &e.health))
            .collect();
        self.state
            .retain(|n, (h, _, _)| wanted.get(n.as_str()).is_some_and(|w| *w == h));
        for (name, h) in wanted {
            self.state
                .entry(name.to_owned())
                .or_insert_with(|| (h.clone(), Counter::new(h.rise, h.fall, true), now));
        }
    }

    pub fn run(&mut self, c: &mut Controller) {
        let now = Instant::now();
        for (name, (h, counter, last)) in &mut self.state {
            if now.duration_since(*last) < Duration::from_millis(h.interval_ms) {
                continue;
            }
            *last = now;
            let window = Duration::from_millis(h.timeout_ms);
            let fed = c
                .channels_on(name)
                .iter()
                .any(|ch| c.input_moving(ch, window));
            if !fed {
                continue;
            }
            let idle_ns = c
                .dataplane()
                .encoder_stats(name)
                .map(|s| control::monotonic_ns().saturating_sub(s.tx.last_seen_ns))
                .unwrap_or(u64::MAX);
            let ok = idle_ns < window.as_nanos() as u64;
            if let Some(healthy) = counter.record(ok)
                && let Err(err) = c.on_health(name, healthy)
            {
                warn!("acting on {name}'s flow check: {err}");
            }
        }
    }
}
