//! The audit: a slice of the channels at a time, each compared across the decider, nsfail's
//! record of what it wrote to the maps, and the kernel's maps. Whatever disagrees is put back
//! to the decision and said in a critical event: nsfail is the maps' only writer, so a
//! difference means something else wrote them (`bpftool map update`, a second daemon, a bug),
//! and a stream may be going somewhere nobody decided.

use std::time::{Duration, Instant};

use log::warn;

use super::Controller;

/// How often a slice is audited, and how many channels it holds: 256 channels a second, a
/// few hundred map lookups (about a millisecond); 100,000 channels take a round of under
/// seven minutes, 1,000 channels four seconds, a few channels three ([`AUDIT_ROUND_MIN`]).
const AUDIT_EVERY: Duration = Duration::from_secs(1);
const AUDIT_SLICE: usize = 256;
/// A new round starts no sooner than this after the last: with a few channels a round is one
/// slice, and a walk of the maps every second would cost more than the rest of the idle
/// controller's map reads together.
const AUDIT_ROUND_MIN: Duration = Duration::from_secs(3);

/// Where the audit is in its round over the channels.
#[derive(Debug, Default)]
pub(super) struct AuditCursor {
    /// The index (in the effective config's channels) the next slice starts at.
    next: usize,
    last: Option<Instant>,
    /// When the current round started.
    round: Option<Instant>,
}

impl Controller {
    /// Audits the next slice of channels, when it is time; at the start of each round, also
    /// removes the map entries nsfail never wrote.
    pub(super) fn audit(&mut self, now: Instant) {
        if self
            .audit
            .last
            .is_some_and(|t| now.duration_since(t) < AUDIT_EVERY)
        {
            return;
        }
        let n = self.effective.channels.len();
        if self.audit.next >= n {
            if self
                .audit
                .round
                .is_some_and(|t| now.duration_since(t) < AUDIT_ROUND_MIN)
            {
                return;
            }
            self.audit.round = Some(now);
            self.audit.next = 0;
            self.remove_foreign_entries();
        }
        self.audit.last = Some(now);
        let end = (self.audit.next + AUDIT_SLICE).min(n);
        for i in self.audit.next..end {
            let (name, listen) = {
                let ch = &self.effective.channels[i];
                (ch.name.clone(), ch.listen)
            };
            self.audit_channel(&name, listen);
        }
        self.audit.next = end;
    }

    /// Re-syncs one channel: the data plane forwards to the decided encoder, and the kernel's
    /// entries are the ones nsfail wrote.
    fn audit_channel(&mut self, name: &str, listen: std::net::SocketAddr) {
        let Some(decided) = self.decider.active(name).map(str::to_owned) else {
            return;
        };
        // A decision whose write failed is the retry's to finish.
        if self.unapplied.contains_key(name) {
            return;
        }
        let written = self.dp.active_encoder(listen).map(str::to_owned);
        if written.as_deref() != Some(decided.as_str()) {
            let reason = match self.dp.activate(listen, &decided) {
                Ok(()) => format!(
                    "the data plane forwarded to {}, not to the decided {decided}: repointed \
                     (critical)",
                    written.as_deref().unwrap_or("nothing")
                ),
                Err(e) => format!(
                    "the data plane forwards to {}, not to the decided {decided}, and \
                     repointing failed (critical): {e}",
                    written.as_deref().unwrap_or("nothing")
                ),
            };
            warn!("channel {name}: {reason}");
            self.event(Some(name), written, Some(decided.clone()), &reason);
        }
        match self.dp.audit_channel(listen) {
            Ok(r) if r.any() => {
                let reason = format!(
                    "{} map entries differed from what nsfail wrote (written by something \
                     else): rewritten (critical)",
                    r.rewritten
                );
                warn!("channel {name}: {reason}");
                self.event(Some(name), None, Some(decided), &reason);
            }
            Ok(_) => {}
            Err(e) => warn!("channel {name}: auditing its map entries: {e}"),
        }
    }

    fn remove_foreign_entries(&mut self) {
        match self.dp.remove_foreign() {
            Ok(r) if r.any() => {
                let reason = format!(
                    "{} map entries nsfail never wrote (written by something else): removed \
                     (critical)",
                    r.removed
                );
                warn!("{reason}");
                self.event(None, None, None, &reason);
            }
            Ok(_) => {}
            Err(e) => warn!("auditing the maps for entries nsfail never wrote: {e}"),
        }
    }
}
