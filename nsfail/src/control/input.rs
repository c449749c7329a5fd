//! Input loss: a channel whose input stands still is the sender's problem, reported and
//! never failed over.

use super::*;

#[derive(Clone, Debug)]
pub(super) struct InputWatch {
    pub(super) packets: u64,
    pub(super) since: Instant,
    pub(super) lost: bool,
}

impl Controller {
    /// Input loss is the sender's problem, not the encoder's: reported, never failed over.
    pub(super) fn watch_input(&mut self, now: Instant) -> Result<()> {
        for ch in self.effective.channels.clone() {
            let packets = self
                .dp
                .channel_stats(ch.listen)
                .map(|s| s.packets)
                .unwrap_or(0);
            let w = self.input.entry(ch.name.clone()).or_insert(InputWatch {
                packets,
                since: now,
                lost: false,
            });
            if packets != w.packets {
                let restored = w.lost;
                *w = InputWatch {
                    packets,
                    since: now,
                    lost: false,
                };
                if restored {
                    self.event(Some(&ch.name), None, None, "input restored");
                }
            } else if packets > 0 && !w.lost && now.duration_since(w.since) >= INPUT_LOSS_AFTER {
                w.lost = true;
                let active = self.decider.active(&ch.name).map(str::to_owned);
                self.event(Some(&ch.name), active, None, "input loss (no failover)");
            }
        }
        Ok(())
    }

    /// Whether a channel's input moved within `window` (for the flow check), from the data
    /// plane's last-seen time.
    pub fn input_moving(&self, channel: &str, window: Duration) -> bool {
        let Some(ch) = self.effective.channel(channel) else {
            return false;
        };
        self.dp.channel_stats(ch.listen).is_ok_and(|s| {
            s.packets > 0
                && monotonic_ns().saturating_sub(s.last_seen_ns) < window.as_nanos() as u64
        })
    }
}
