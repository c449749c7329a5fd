//! Switchover timing: from the failed encoder's last sign of life to the first packet the
//! new one is given.

use super::*;

impl Controller {
    /// The start of a switchover: the failed encoder's last sign of life. The data plane
    /// forwards to a dead encoder until the switch, so its forwarded-packet time says nothing
    /// about when it died; its last reply through the return path (SRT ACKs, any answer) or
    /// its last successful probe, whichever is later, does. With neither, the last packet
    /// forwarded to it is used, and with none of these the moment of the switch. Read once per (from, to) pair of a batch: a failover of many
    /// channels reads two encoders' counters, not two per channel.
    pub(super) fn switch_baseline(
        &self,
        channel: &str,
        from: &str,
        to: &str,
        batch: &mut Batch,
    ) -> Option<PendingSwitch> {
        let (last_old_ns, new_packets) = *batch
            .baselines
            .entry((from.to_owned(), to.to_owned()))
            .or_insert_with(|| {
                let old = self.dp.encoder_stats(from).ok()?;
                let new = self.dp.encoder_stats(to).ok()?;
                let alive = old
                    .tx
                    .last_seen_ns
                    .max(self.alive_ns.get(from).copied().unwrap_or(0));
                // An encoder that never showed a sign of life (it failed before its first
                // packet, reply or probe answer): the switchover starts now.
                let last_old = if alive > 0 {
                    alive
                } else if old.rx.last_seen_ns > 0 {
                    old.rx.last_seen_ns
                } else {
                    monotonic_ns()
                };
                Some((last_old, new.rx.packets))
            })
            .as_ref()?;
        Some(PendingSwitch {
            channel: channel.to_owned(),
            from: from.to_owned(),
            to: to.to_owned(),
            last_old_ns,
            new_packets,
            started: Instant::now(),
        })
    }

    /// Switchover time: the old encoder's last sign of life to the new encoder's first packet
    /// (data-plane timestamps and probe times, all CLOCK_MONOTONIC). The new encoder's first packet is taken as its last-seen
    /// time when its count first moves, so the figure is at most one tick (plus one packet
    /// interval) late.
    pub(super) fn measure_switchovers(&mut self, now: Instant) -> Vec<Switchover> {
        let mut done = Vec::new();
        let mut keep = Vec::new();
        if self.pending.is_empty() {
            return done;
        }
        // One read per encoder, however many channels moved to it.
        let mut stats: HashMap<String, Option<nsfail_common::EncoderStats>> = HashMap::new();
        for p in std::mem::take(&mut self.pending) {
            let new = *stats
                .entry(p.to.clone())
                .or_insert_with(|| self.dp.encoder_stats(&p.to).ok());
            let Some(new) = new else {
                continue;
            };
            if new.rx.packets > p.new_packets {
                let gap = Duration::from_nanos(new.rx.last_seen_ns.saturating_sub(p.last_old_ns));
                let ev = Event {
                    time: String::new(),
                    channel: Some(p.channel.clone()),
                    from: Some(p.from.clone()),
                    to: Some(p.to.clone()),
                    reason: "switchover complete".into(),
                    switchover_ms: Some(gap.as_secs_f64() * 1e3),
                    srt_reconnects: None,
                };
                self.record(ev);
                done.push(Switchover {
                    channel: p.channel,
                    gap,
                });
            } else if now.duration_since(p.started) < SWITCH_MEASURE_FOR {
                keep.push(p);
            }
        }
        self.pending = keep;
        done
    }

    /// A successful probe of `encoder`: a sign of life, for switchover measurement.
    pub fn note_alive(&mut self, encoder: &str) {
        self.alive_ns.insert(encoder.to_owned(), monotonic_ns());
    }
}

/// A failover waiting for the new encoder's first packet.
#[derive(Clone, Debug)]
pub(super) struct PendingSwitch {
    channel: String,
    from: String,
    to: String,
    /// The old encoder's last sign of life (CLOCK_MONOTONIC ns).
    last_old_ns: u64,
    /// The new encoder's packet count at the switch.
    new_packets: u64,
    started: Instant,
}
