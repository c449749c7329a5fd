//! Runtime changes (add and remove channels and encoders): each checked as the whole
//! effective configuration would be, applied to the data plane, undone on failure, persisted.
//! Each touches only what it changes: adding a channel checks it against the indexes and
//! writes its own map entries, whatever the number of channels already there.

use super::*;

impl Controller {
    /// After a change of the effective configuration: followers re-read it, the state file
    /// is written. A state file that cannot be written is reported (and retried), not
    /// presented as a refusal of what is already in the data plane.
    pub(super) fn changed(&mut self) {
        self.generation += 1;
        self.persist_or_report();
    }

    /// Makes `candidate` the effective configuration and the data plane match it, atomically:
    /// validated first; on a failure the previous one is restored (managed encoders it
    /// provisioned taken away again) and the data plane reconciled back.
    pub(super) fn switch_to(&mut self, candidate: Config) -> Result<()> {
        candidate.validate()?;
        let previous = std::mem::replace(&mut self.effective, candidate);
        self.lookup = self.effective.lookup();
        if let Err(e) = self.reconcile() {
            self.restore(previous);
            return Err(e);
        }
        Ok(())
    }

    /// Goes back to `previous` after a failed change: managed encoders provisioned since are
    /// taken away, and the data plane reconciled back.
    pub(super) fn restore(&mut self, previous: Config) {
        for enc in &self.effective.encoders {
            if previous.encoder(&enc.name).is_none()
                && let Some(plan) = enc.provision_plan()
            {
                provision::deprovision_or_warn(&plan);
            }
        }
        self.effective = previous;
        self.lookup = self.effective.lookup();
        if let Err(again) = self.reconcile() {
            warn!("restoring the data plane after a failed change: {again}");
        }
    }

    pub fn add_channel(&mut self, ch: config::Channel) -> Result<()> {
        if self
            .lookup
            .channel(&self.effective.channels, &ch.name)
            .is_some()
        {
            return Err(ControlError::Refused(format!(
                "channel {:?} already exists",
                ch.name
            )));
        }
        self.effective.check_new_channel(&self.lookup, &ch)?;
        let active = self.program_new_channel(&ch)?;
        let name = ch.name.clone();
        self.delta.removed_channels.remove(&name);
        self.delta.added_channels.push(ch.clone());
        self.effective.push_channel(&mut self.lookup, ch);
        self.changed();
        self.event(Some(&name), None, Some(active), "channel added");
        Ok(())
    }

    /// Writes a channel new to the data plane (on its initial encoder, which is returned) and
    /// to the decider; the effective configuration is the caller's to extend.
    pub(super) fn program_new_channel(&mut self, ch: &config::Channel) -> Result<String> {
        let active = self.choose_initial(ch, None);
        let members: Vec<&str> = ch.encoders.iter().map(String::as_str).collect();
        self.dp.set_channel_with(
            ch.listen,
            ch.encoder_port(),
            &active,
            &members,
            &channel_options(ch),
        )?;
        self.decider.set_channel(&ch.name, policy(ch), &active);
        Ok(active)
    }

    pub fn add_encoder(&mut self, e: config::Encoder) -> Result<()> {
        if self.has_encoder(&e.name) {
            return Err(ControlError::Refused(format!(
                "encoder {:?} already exists",
                e.name
            )));
        }
        // Checked as the effective configuration with it would be: no channel names it yet,
        // so the encoders alone are what is checked.
        Config {
            ingest: self.effective.ingest.clone(),
            encoders: self
                .effective
                .encoders
                .iter()
                .cloned()
                .chain([e.clone()])
                .collect(),
            channels: Vec::new(),
            daemon: self.effective.daemon.clone(),
            cluster: self.effective.cluster.clone(),
        }
        .validate()?;
        // Resolve before changing anything, for a clear error (a managed encoder's namespace
        // does not exist yet: it is made below).
        if e.spawn.is_none() {
            encoder_spec(&e)?;
        }
        let name = e.name.clone();
        self.delta.removed_encoders.remove(&name);
        self.delta.added_encoders.push(e.clone());
        self.effective.push_encoder(&mut self.lookup, e.clone());
        if let Err(err) = self.reconcile_encoder(&e, Instant::now()) {
            // Taken away again: whatever of it reached the data plane, its namespace and
            // veth if this change made them.
            if self.dp.encoders()?.iter().any(|x| x.name == name) {
                let _ = self.dp.remove_encoder(&name);
            }
            if let Some(plan) = e.provision_plan() {
                provision::deprovision_or_warn(&plan);
            }
            self.decider.remove_encoder(&name);
            self.receive.remove(&name);
            self.probed.remove(&name);
            self.delta.added_encoders.retain(|x| x.name != name);
            self.effective.encoders.retain(|x| x.name != name);
            self.lookup = self.effective.lookup();
            return Err(err);
        }
        self.changed();
        self.event(None, None, Some(name), "encoder added");
        Ok(())
    }

    pub fn remove_channel(&mut self, name: &str) -> Result<()> {
        let ch = self.channel(name)?;
        let active = self.active_of(&ch);
        self.dp.remove_channel(ch.listen)?;
        self.decider.remove_channel(name);
        self.input.remove(&ch.listen);
        self.effective.channels.retain(|c| c.name != name);
        self.lookup = self.effective.lookup();
        self.delta.added_channels.retain(|c| c.name != name);
        self.delta.active.remove(name);
        self.delta.removed_channels.insert(name.to_owned());
        self.changed();
        self.event(Some(name), active, None, "channel removed");
        Ok(())
    }

    pub fn remove_encoder(&mut self, name: &str) -> Result<()> {
        if !self.has_encoder(name) {
            return Err(ControlError::UnknownEncoder(name.to_owned()));
        }
        if let Some(ch) = self.decider.listed_by(name) {
            return Err(ControlError::Refused(format!(
                "encoder {name:?} is still used by channel {ch:?} (remove it there first)"
            )));
        }
        self.dp.remove_encoder(name)?;
        self.decider.remove_encoder(name);
        self.effective.encoders.retain(|e| e.name != name);
        self.lookup = self.effective.lookup();
        self.delta.added_encoders.retain(|e| e.name != name);
        self.delta.drained.remove(name);
        self.delta.removed_encoders.insert(name.to_owned());
        self.changed();
        self.event(None, Some(name.to_owned()), None, "encoder removed");
        Ok(())
    }
}
