//! The cluster's data path as the controller sets it (issue 17): another host's encoder is a
//! routed encoder here ([`EncoderLink::Routed`]: XDP rewrites towards it and sends the
//! packet back out of the uplink to the next hop from this host's routing table), and each
//! local encoder of a channel that also has encoders on other hosts gets a transit entry
//! ([`Dataplane::set_transit`]), so that what another host routes to it is taken in. The
//! next hops are resolved again every [`ROUTES_EVERY`].
//!
//! An encoder with no route here is reached as a remote encoder at its host's ingest MAC
//! instead (hosts on one segment), and that is reported: on a routed network it does not
//! arrive.
//!
//! Anycast: with `announce_table`, the host keeps one route per ingest address in that table
//! ([`announce::sync`]) while its XDP program is on the ingest interface, and withdraws them
//! when it is not or while the host is drained (`nsfail drain host`), for a routing daemon to
//! export. A daemon that stops leaves them (the data plane keeps forwarding).

use std::net::IpAddr;

use super::*;
use crate::net::announce;

/// How often the routed encoders' next hops are resolved again.
const ROUTES_EVERY: Duration = Duration::from_secs(5);
/// How often the announced routes are compared with what should be announced.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);

impl Controller {
    /// Registers another host's encoder: routed when this host has a route to it, else at its
    /// host's MAC (reported once per reason). No egress policy: its own host polices it.
    pub(super) fn reconcile_routed(&mut self, spec: EncoderSpec, now: Instant) -> Result<()> {
        let routed = EncoderSpec {
            link: EncoderLink::Routed,
            ..spec.clone()
        };
        let outcome = self.dp.upsert_encoder_policed(&routed, None);
        let why = match outcome {
            Ok(_) => None,
            Err(e) => {
                self.dp.upsert_encoder_policed(&spec, None)?;
                Some(e.to_string())
            }
        };
        self.decider.add_encoder(&spec.name, now);
        let Some(shared) = self.shared.as_mut() else {
            return Ok(());
        };
        let before = match &why {
            Some(w) => shared.unrouted.insert(spec.name.clone(), w.clone()),
            None => shared.unrouted.remove(&spec.name),
        };
        match (why, before) {
            (Some(why), before) if before.as_ref() != Some(&why) => {
                let reason = format!(
                    "cluster: no route to encoder {} here ({why}): sent to its host's MAC on \
                     the ingest segment instead",
                    spec.name
                );
                warn!("{reason}");
                self.event(None, None, Some(spec.name.clone()), &reason);
            }
            (None, Some(_)) => {
                let reason = format!("cluster: encoder {} is routed again", spec.name);
                info!("{reason}");
                self.event(None, None, Some(spec.name.clone()), &reason);
            }
            _ => {}
        }
        Ok(())
    }

    /// Sets the transit entry of every local encoder of every channel that also has encoders
    /// on other hosts (idempotent: the data plane keeps them with their channel and drops
    /// them with it). A failure is reported once per reason, and tried again at the next
    /// change.
    pub(super) fn sync_transits(&mut self) {
        let Some(shared) = self.shared.as_ref() else {
            return;
        };
        let mut wanted = Vec::new();
        for ch in &self.effective.channels {
            if !ch.encoders.iter().any(|e| shared.is_remote(e)) {
                continue;
            }
            for enc in &ch.encoders {
                if self
                    .lookup
                    .encoder(enc)
                    .is_some_and(|i| self.effective.encoders[i].interface.is_some())
                {
                    wanted.push((ch.listen, ch.name.clone(), enc.clone()));
                }
            }
        }
        let mut failed = BTreeMap::new();
        for (listen, channel, encoder) in wanted {
            if let Err(e) = self.dp.set_transit(listen, &encoder) {
                failed.insert((channel, encoder), e.to_string());
            }
        }
        let Some(shared) = self.shared.as_mut() else {
            return;
        };
        for ((channel, encoder), why) in newly_failed(&mut shared.transit_failed, failed) {
            let reason = format!(
                "cluster: packets routed here for {encoder} cannot be taken in (critical): {why}"
            );
            warn!("channel {channel}: {reason}");
            self.event(Some(&channel), None, Some(encoder), &reason);
        }
    }

    /// Periodic work of a cluster host: the routed encoders' next hops resolved again (a
    /// changed route or gateway MAC repoints their channels; one that cannot be resolved
    /// keeps its last next hop and is reported once per reason), and the encoders reached at
    /// their host's MAC for want of a route tried as routed encoders again.
    pub(super) fn refresh_routes_periodically(&mut self, now: Instant) {
        let Some(shared) = self.shared.as_mut() else {
            return;
        };
        if shared
            .routes_at
            .is_some_and(|t| now.duration_since(t) < ROUTES_EVERY)
        {
            return;
        }
        shared.routes_at = Some(now);
        let unrouted: Vec<String> = shared.unrouted.keys().cloned().collect();
        let failed: BTreeMap<String, String> = self
            .dp
            .refresh_routes()
            .into_iter()
            .map(|(name, e)| (name, e.to_string()))
            .collect();
        let Some(shared) = self.shared.as_mut() else {
            return;
        };
        for (name, why) in newly_failed(&mut shared.stale_routes, failed) {
            let reason = format!(
                "cluster: the next hop to encoder {name} cannot be resolved again ({why}); \
                 forwarding on the last one"
            );
            warn!("{reason}");
            self.event(None, None, Some(name), &reason);
        }
        for name in unrouted {
            let Some(e) = self
                .lookup
                .encoder(&name)
                .map(|i| self.effective.encoders[i].clone())
            else {
                continue;
            };
            // Not tried while its next hop is still unresolved (the kernel is asked again):
            // registering waits up to a second for it, on this thread.
            if crate::net::route::next_hop_within(e.address, Duration::ZERO).is_err() {
                continue;
            }
            let retried = encoder_spec(&e).and_then(|spec| self.reconcile_routed(spec, now));
            if let Err(err) = retried {
                warn!("cluster: encoder {name}: {err}");
            }
        }
    }

    /// Makes `announce_table` hold a route for each ingest address while the XDP program is
    /// on the ingest interface, and none while it is not; every change an event, a failure
    /// reported once per reason.
    pub(super) fn sync_announce(&mut self) {
        let Some(shared) = self.shared.as_mut() else {
            return;
        };
        let Some(table) = shared.file.cluster.as_ref().and_then(|c| c.announce_table) else {
            return;
        };
        shared.announced_at = Some(Instant::now());
        let wanted: BTreeSet<IpAddr> = if self.ingest_lost.is_none() && !self.delta.host_drained {
            self.effective
                .channels
                .iter()
                .map(|c| c.listen.ip())
                .collect()
        } else {
            BTreeSet::new()
        };
        let ingest = self.effective.ingest.interface.clone();
        let outcome =
            netns::link(&ingest).and_then(|link| announce::sync(table, link.ifindex, &wanted));
        let changed = match outcome {
            Ok(changed) => {
                if let Some(s) = self.shared.as_mut() {
                    s.announce_failed = None;
                }
                changed
            }
            Err(e) => {
                let why = e.to_string();
                let Some(s) = self.shared.as_mut() else {
                    return;
                };
                if s.announce_failed.as_ref() != Some(&why) {
                    let reason = format!(
                        "cluster: the ingest addresses cannot be announced in table {table} \
                         (critical): {why}"
                    );
                    warn!("{reason}");
                    self.event(None, None, None, &reason);
                    if let Some(s) = self.shared.as_mut() {
                        s.announce_failed = Some(why);
                    }
                }
                return;
            }
        };
        for addr in changed.added {
            let reason = format!("cluster: announcing {addr} (table {table})");
            info!("{reason}");
            self.event(None, None, None, &reason);
        }
        for addr in changed.removed {
            let reason = format!("cluster: withdrew {addr} (table {table})");
            warn!("{reason}");
            self.event(None, None, None, &reason);
        }
    }

    /// `nsfail drain host` (`drained`) and `undrain host`: withdraws this host's announced
    /// routes, so that the router moves the flows to the other hosts while this host's data
    /// plane keeps forwarding whatever still arrives, or announces them again. Kept in the
    /// state file, so a restarted daemon stays drained. Refused on a host that announces
    /// nothing (no `[cluster]` with `announce_table`).
    pub fn drain_host(&mut self, drained: bool) -> Result<()> {
        let Some(table) = self
            .shared
            .as_ref()
            .and_then(|s| s.file.cluster.as_ref()?.announce_table)
        else {
            return Err(ControlError::Refused(
                "drain host withdraws this host's anycast routes: it needs a [cluster] section \
                 with announce_table"
                    .to_owned(),
            ));
        };
        if self.delta.host_drained == drained {
            return Ok(());
        }
        self.delta.host_drained = drained;
        let reason = if drained {
            format!(
                "host drained: its ingest addresses withdrawn from table {table}; what still \
                 arrives is forwarded"
            )
        } else {
            format!("host undrained: its ingest addresses announced in table {table} again")
        };
        info!("{reason}");
        self.event(None, None, None, &reason);
        self.sync_announce();
        self.persist_or_report();
        Ok(())
    }

    /// Whether `nsfail drain host` holds this host's routes back.
    pub fn host_drained(&self) -> bool {
        self.delta.host_drained
    }

    /// Periodic work: [`Controller::sync_announce`] every [`ANNOUNCE_EVERY`] (the ingest
    /// interface may have been lost or found again, a route deleted by hand).
    pub(super) fn announce_periodically(&mut self, now: Instant) {
        let due = self.shared.as_ref().is_some_and(|s| {
            s.announced_at
                .is_none_or(|t| now.duration_since(t) >= ANNOUNCE_EVERY)
        });
        if due {
            self.sync_announce();
        }
    }
}
