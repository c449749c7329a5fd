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
    /// Every channel's counter comes from one batched read.
    pub(super) fn watch_input(&mut self, now: Instant) -> Result<()> {
        let stats = self.dp.all_channel_stats()?;
        let mut events = Vec::new();
        for ch in &self.effective.channels {
            let packets = stats.get(&ch.listen).map_or(0, |s| s.packets);
            let w = self.input.entry(ch.listen).or_insert(InputWatch {
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
                    events.push((ch.name.clone(), false));
                }
            } else if packets > 0 && !w.lost && now.duration_since(w.since) >= INPUT_LOSS_AFTER {
                w.lost = true;
                events.push((ch.name.clone(), true));
            }
        }
        for (name, lost) in events {
            if lost {
                let active = self.decider.active(&name).map(str::to_owned);
                self.event(Some(&name), active, None, "input loss (no failover)");
            } else {
                self.event(Some(&name), None, None, "input restored");
            }
        }
        Ok(())
    }

    /// Whether a channel's input moved within `window` (for the flow check), from the data
    /// plane's last-seen time.
    pub fn input_moving(&self, channel: &str, window: Duration) -> bool {
        let Some(ch) = self
            .lookup
            .channel(&self.effective.channels, channel)
            .map(|i| &self.effective.channels[i])
        else {
            return false;
        };
        self.dp.channel_stats(ch.listen).is_ok_and(|s| {
            s.packets > 0
                && monotonic_ns().saturating_sub(s.last_seen_ns) < window.as_nanos() as u64
        })
    }
}
