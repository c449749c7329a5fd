//! Events: every decision and observation, logged, kept in a ring and appended to the
//! events file (by the writer thread); the clocks they are stamped with.

use super::*;

impl Controller {
    /// The events in the ring (call [`Controller::drain_events`] first for the pending ones).
    pub fn events(&self) -> Vec<Event> {
        self.events.iter().cloned().collect()
    }

    /// Records an event: logged, kept in the ring, appended to the events file.
    pub(super) fn event(
        &mut self,
        channel: Option<&str>,
        from: Option<String>,
        to: Option<String>,
        reason: &str,
    ) {
        self.record(Event {
            time: String::new(),
            channel: channel.map(str::to_owned),
            from,
            to,
            reason: reason.to_owned(),
            switchover_ms: None,
            srt_reconnects: None,
        });
    }

    /// Records an event: stamped now, then, by [`Controller::drain_events`], logged, kept in
    /// the ring and appended to the events file. An event without a time gets this one.
    pub(super) fn record(&mut self, ev: Event) {
        self.pending_events.push_back((SystemTime::now(), ev));
    }

    /// Events not yet logged, kept and written.
    pub fn events_pending(&self) -> usize {
        self.pending_events.len()
    }

    /// Logs, keeps and writes up to `max` pending events, oldest first. A failover of many
    /// channels records an event per channel: the actor drains them a few at a time between
    /// requests, so that a `status` is not kept waiting for the bookkeeping of a failover
    /// whose map writes are done.
    pub fn drain_events(&mut self, max: usize) {
        for _ in 0..max {
            let Some((at, mut ev)) = self.pending_events.pop_front() else {
                return;
            };
            if ev.time.is_empty() {
                ev.time = rfc3339(at);
            }
            info!(
                "event: channel={} from={} to={} reason={}",
                ev.channel.as_deref().unwrap_or("-"),
                ev.from.as_deref().unwrap_or("-"),
                ev.to.as_deref().unwrap_or("-"),
                ev.reason
            );
            // Appended by the writer thread, with whatever else is pending.
            self.writer.event(ev.clone());
            if self.events.len() == EVENT_RING {
                self.events.pop_front();
            }
            self.events.push_back(ev);
        }
    }

    /// Something about an encoder worth an event (its supervised process exiting, ...).
    pub fn encoder_event(&mut self, encoder: &str, reason: String) {
        self.event(None, None, Some(encoder.to_owned()), &reason);
    }
}

/// `2026-11-27T23:09:47.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    /// `2026-11-27T23:09:47.123Z`: UTC, milliseconds.
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from(t)
        .format(FORMAT)
        .expect("every SystemTime after 1970 has this form")
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the data plane's last-seen times.
pub fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}
