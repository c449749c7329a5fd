//! Runtime changes (add and remove channels and encoders): validated as a whole, applied to
//! the data plane, undone on any failure, persisted.

use super::*;

impl Controller {
    /// Applies a candidate effective configuration: validated first; on any failure the
    /// previous delta is restored and the data plane reconciled back.
    pub(super) fn change(&mut self, edit: impl FnOnce(&mut Delta)) -> Result<()> {
        let saved = self.delta.clone();
        edit(&mut self.delta);
        let candidate = self.delta.apply(&self.base);
        if let Err(e) = self.switch_to(candidate) {
            self.delta = saved;
            return Err(e);
        }
        self.generation += 1;
        // The change is made: a state file that cannot be written is reported (and retried),
        // not presented as a refusal of what is already in the data plane.
        self.persist_or_report();
        Ok(())
    }

    /// Makes `candidate` the effective configuration and the data plane match it, atomically:
    /// validated first; on a failure the previous one is restored (managed encoders it
    /// provisioned taken away again) and the data plane reconciled back.
    pub(super) fn switch_to(&mut self, candidate: Config) -> Result<()> {
        candidate.validate()?;
        let previous = std::mem::replace(&mut self.effective, candidate);
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
        if let Err(again) = self.reconcile() {
            warn!("restoring the data plane after a failed change: {again}");
        }
    }

    pub fn add_channel(&mut self, ch: config::Channel) -> Result<()> {
        if self.effective.channel(&ch.name).is_some() {
            return Err(ControlError::Refused(format!(
                "channel {:?} already exists",
                ch.name
            )));
        }
        let name = ch.name.clone();
        self.change(|d| {
            d.removed_channels.remove(&ch.name);
            d.added_channels.push(ch);
        })?;
        let active = self.active_of(&self.channel(&name)?)?;
        self.event(Some(&name), None, active, "channel added");
        Ok(())
    }

    pub fn add_encoder(&mut self, e: config::Encoder) -> Result<()> {
        if self.effective.encoder(&e.name).is_some() {
            return Err(ControlError::Refused(format!(
                "encoder {:?} already exists",
                e.name
            )));
        }
        // Resolve before changing anything, for a clear error (a managed encoder's namespace
        // does not exist yet: it is made by the change itself).
        if e.spawn.is_none() {
            encoder_spec(&e)?;
        }
        let name = e.name.clone();
        self.change(|d| {
            d.removed_encoders.remove(&e.name);
            d.added_encoders.push(e);
        })?;
        self.event(None, None, Some(name), "encoder added");
        Ok(())
    }

    pub fn remove_channel(&mut self, name: &str) -> Result<()> {
        let ch = self.channel(name)?;
        let active = self.active_of(&ch)?;
        self.change(|d| {
            d.added_channels.retain(|c| c.name != ch.name);
            d.active.remove(&ch.name);
            d.removed_channels.insert(ch.name.clone());
        })?;
        self.event(Some(name), active, None, "channel removed");
        Ok(())
    }

    pub fn remove_encoder(&mut self, name: &str) -> Result<()> {
        if self.effective.encoder(name).is_none() {
            return Err(ControlError::UnknownEncoder(name.to_owned()));
        }
        if let Some(ch) = self
            .effective
            .channels
            .iter()
            .find(|c| c.encoders.iter().any(|e| e == name))
        {
            return Err(ControlError::Refused(format!(
                "encoder {name:?} is still used by channel {:?} (remove it there first)",
                ch.name
            )));
        }
        self.change(|d| {
            d.added_encoders.retain(|e| e.name != name);
            d.drained.remove(name);
            d.removed_encoders.insert(name.to_owned());
        })?;
        self.event(None, Some(name.to_owned()), None, "encoder removed");
        Ok(())
    }
}
