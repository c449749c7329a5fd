//! The data plane on the interfaces that exist now: receive readiness of local encoders,
//! re-attachment to re-created interfaces, and what an encoder's config resolves to.

use super::*;

impl Controller {
    /// Records whether a local encoder can receive (see [`receive::ensure`]): every repair
    /// and every change is an event, one that cannot receive is down (its channels fail
    /// over), and it comes back when it can receive again and its probe agrees.
    pub fn set_receive(&mut self, encoder: &str, verdict: Verdict) -> Result<()> {
        if self.effective.encoder(encoder).is_none() {
            return Ok(());
        }
        if let Some(done) = &verdict.repaired {
            warn!("encoder {encoder}: {done}");
            self.event(None, None, Some(encoder.to_owned()), done);
        }
        let before = self.receive.get(encoder).map(|v| v.can_receive);
        if before != Some(verdict.can_receive) {
            if verdict.can_receive {
                if before.is_some() {
                    let reason = format!("can receive again: {}", verdict.reason);
                    self.event(None, None, Some(encoder.to_owned()), &reason);
                }
            } else {
                let reason = format!("cannot receive (critical): {}", verdict.reason);
                warn!("encoder {encoder}: {reason}");
                self.event(None, Some(encoder.to_owned()), None, &reason);
            }
        }
        self.receive.insert(encoder.to_owned(), verdict);
        self.sync_health(encoder)
    }

    /// Local encoders whose interface readiness is watched: (name, host interface, the
    /// configured namespace to look for the peer in first).
    pub fn receive_targets(&self) -> Vec<(String, String, Option<String>)> {
        self.effective
            .encoders
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.host_interface()?, e.namespace())))
            .collect()
    }

    /// Puts the programs back on interfaces that were deleted and re-created (a driver
    /// reload, a container restart): the XDP program on the ingest interface, the TC program
    /// and the DEVMAP entry on each local encoder's veth. Each re-attach is an event; an
    /// interface that is gone is reported once and retried at the next call.
    pub fn check_attachments(&mut self) {
        let ingest = self.effective.ingest.interface.clone();
        match self.dp.ingest_attached(&ingest) {
            Ok(true) => {}
            Ok(false) => match self
                .dp
                .attach_ingest(&ingest, self.effective.ingest.xdp_mode)
            {
                Ok(_) => {
                    self.ingest_lost = None;
                    let reason = format!("XDP re-attached to ingest interface {ingest}");
                    warn!("{reason}");
                    self.event(None, None, None, &reason);
                    // Replies leave by the ingest interface's new index, and remote encoders
                    // are reached with its new MAC.
                    if let Err(e) = self.reconcile() {
                        warn!("re-applying the configuration after re-attaching: {e}");
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    if self.ingest_lost.as_ref() != Some(&why) {
                        let reason = format!("ingest interface {ingest} lost (critical): {why}");
                        warn!("{reason}");
                        self.event(None, None, None, &reason);
                        self.ingest_lost = Some(why);
                    }
                }
            },
            Err(e) => warn!("checking the XDP link on {ingest}: {e}"),
        }
        for e in self.effective.encoders.clone() {
            let Some(ifname) = e.host_interface() else {
                continue;
            };
            // Gone: nothing to attach to; its receive check says so and fails it over.
            let Ok(link) = netns::link(&ifname) else {
                continue;
            };
            let stale = self.dp.registered_ifindex(&e.name) != Some(link.ifindex)
                || !self.dp.egress_attached(&ifname).unwrap_or(false);
            if !stale {
                self.relink_failed.remove(&e.name);
                continue;
            }
            let relinked = encoder_spec(&e).and_then(|spec| {
                let policy = policy_from_config(&self.effective, &e)?;
                self.dp.upsert_encoder_policed(&spec, Some(&policy))?;
                Ok(())
            });
            match relinked {
                Ok(()) => {
                    self.relink_failed.remove(&e.name);
                    let reason = format!("re-attached to {ifname} (interface re-created)");
                    warn!("encoder {}: {reason}", e.name);
                    self.event(None, None, Some(e.name.clone()), &reason);
                }
                Err(err) => {
                    let why = err.to_string();
                    if self.relink_failed.get(&e.name) != Some(&why) {
                        let reason = format!("cannot re-attach to {ifname} (critical): {why}");
                        warn!("encoder {}: {reason}", e.name);
                        self.event(None, Some(e.name.clone()), None, &reason);
                        self.relink_failed.insert(e.name.clone(), why);
                    }
                }
            }
        }
    }
}

/// What the data plane needs for a configured encoder; a local encoder's MAC is looked up in
/// its namespace unless the config gives it.
pub fn encoder_spec(e: &config::Encoder) -> Result<EncoderSpec> {
    let err = |why: String| ControlError::Encoder {
        name: e.name.clone(),
        why,
    };
    let mac = match (&e.mac, e.host_interface(), e.namespace()) {
        (Some(m), _, _) => config::parse_mac(m).ok_or_else(|| err(format!("bad MAC {m:?}")))?,
        // A local encoder receives on its veth's peer: that peer's MAC, found wherever its
        // namespace is (named or not); an interface that is not a veth is looked up by the
        // encoder's address in its namespace.
        (None, Some(ifname), ns) => match receive::peer_mac(&ifname, ns.as_deref()) {
            Ok(mac) => mac,
            Err(peer_err) => match &ns {
                Some(ns) => {
                    netns::link_with_addr(ns, e.address)
                        .map_err(|x| err(format!("{ifname}'s peer: {peer_err}; {x}")))?
                        .mac
                }
                None => return Err(err(format!("{ifname}'s peer: {peer_err}"))),
            },
        },
        (None, None, Some(ns)) => {
            netns::link_with_addr(&ns, e.address)
                .map_err(|x| err(x.to_string()))?
                .mac
        }
        (None, None, None) => {
            return Err(err(
                "no `mac` and no `netns` or `interface` to find it by: set one of them".into(),
            ));
        }
    };
    let link = match e.host_interface() {
        Some(ifname) => EncoderLink::Local { ifname },
        None => EncoderLink::Remote,
    };
    Ok(EncoderSpec {
        name: e.name.clone(),
        addr: e.address,
        mac,
        link,
    })
}
