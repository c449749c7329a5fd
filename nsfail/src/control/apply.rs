//! Carrying decisions out: every map write of a batch first, each tried whatever the others
//! do, then the state persisted once; a map write that fails is kept and retried every tick.

use super::*;

impl Controller {
    /// Carries out a batch of decisions: every map write first, each tried whatever the
    /// others do, then the state persisted once. A map write that fails is retried by
    /// [`Controller::tick`] and raises a critical event; so does a persist that fails. A
    /// failover that has started finishes for every channel.
    pub(super) fn apply_all(&mut self, decisions: Vec<Decision>) {
        if decisions.is_empty() {
            return;
        }
        let mut batch = Batch::default();
        for d in decisions {
            if let Err(e) = self.apply(d.clone(), &mut batch) {
                let reason = format!("repointing failed (critical), retrying: {e}");
                warn!("channel {}: {reason}", d.channel);
                self.event(
                    Some(&d.channel),
                    Some(d.from.clone()),
                    d.to.clone(),
                    &reason,
                );
                self.unapplied.insert(d.channel.clone(), d);
            }
        }
        batch.finish();
        self.persist_or_report();
    }

    /// Retries the decisions whose map write failed (the newest for each channel).
    pub(super) fn retry_unapplied(&mut self) {
        if self.unapplied.is_empty() {
            return;
        }
        let mut batch = Batch::default();
        let mut done = false;
        for (_, d) in std::mem::take(&mut self.unapplied) {
            // A channel removed since, or moved by a later decision, needs nothing.
            if self.decider.active(&d.channel) != d.to.as_deref() {
                continue;
            }
            if let Err(e) = self.apply(d.clone(), &mut batch) {
                debug!("channel {}: repointing still fails: {e}", d.channel);
                self.unapplied.insert(d.channel.clone(), d);
            } else {
                self.event(
                    Some(&d.channel),
                    None,
                    d.to.clone(),
                    "repointed after a retry",
                );
                done = true;
            }
        }
        batch.finish();
        if done {
            self.persist_or_report();
        }
    }

    /// Carries one decision out: the map write, the event. A decision without a target (no
    /// healthy backup) is only recorded. What a batch of decisions shares (encoder counters,
    /// SRT callers, the SHUTDOWNs to send) is read and sent once per batch. The caller
    /// persists.
    pub(super) fn apply(&mut self, d: Decision, batch: &mut Batch) -> Result<()> {
        let Some(to) = d.to.clone() else {
            self.event(Some(&d.channel), Some(d.from), None, d.reason.as_str());
            return Ok(());
        };
        let ch = self.channel(&d.channel)?;
        // A failover is timed, whoever decided it (a follower takes its leader's).
        let failover = match d.reason {
            Reason::EncoderDown | Reason::Recovered => true,
            Reason::Leader => !self.decider.healthy(&d.from),
            _ => false,
        };
        let measure = failover
            .then(|| self.switch_baseline(&d.channel, &d.from, &to, batch))
            .flatten();
        self.dp.activate(ch.listen, &to)?;
        // Repoint first, then tell SRT callers: their reconnect must reach the new encoder.
        let reconnects = (ch.protocol == config::Protocol::Srt && d.from != to)
            .then(|| self.srt_reconnect(&ch, batch));
        self.delta.active.insert(d.channel.clone(), to.clone());
        self.note_decided(&d.channel, d.reason);
        self.record(Event {
            time: String::new(),
            channel: Some(d.channel.clone()),
            from: Some(d.from),
            to: Some(to),
            reason: d.reason.as_str().to_owned(),
            switchover_ms: None,
            srt_reconnects: reconnects,
        });
        self.pending.extend(measure);
        self.moved.push(d.channel);
        Ok(())
    }
}
