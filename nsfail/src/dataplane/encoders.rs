//! Encoders in the data plane: registration (ENCODERS, the DEVMAP slot, the TC link on a
//! local encoder's veth, ENCODER_IFINDEX), egress policies and counters.

use super::*;

impl Dataplane {
    /// Whether the TC link pinned for `ifname` is attached to the interface that has that
    /// name now. Changes nothing.
    pub fn egress_attached(&self, ifname: &str) -> Result<bool> {
        pinned_to(&self.pins.tc_link(ifname), ifname)
    }

    /// Adds an encoder, or replaces its address, MAC or link. Channels pointing at it are
    /// repointed to the new values (one map write each). Returns its id.
    pub fn upsert_encoder(&mut self, spec: &EncoderSpec) -> Result<u32> {
        self.upsert_encoder_policed(spec, None)
    }

    /// [`Dataplane::upsert_encoder`] with its egress policy, written before the TC program
    /// is attached to a new veth: no packet leaves the encoder unpoliced (no fail-open
    /// window). Long because its steps must run in this order (resolve, refuse a family
    /// change, policy, ENCODERS, DEVMAP, TC link) and each undoes what came before on failure.
    pub fn upsert_encoder_policed(
        &mut self,
        spec: &EncoderSpec,
        policy: Option<&EgressPolicy>,
    ) -> Result<u32> {
        let name_bytes = encode_name(&spec.name)?;
        let ingest = self.ingest.clone();
        let (ifindex, smac, kind, hop_mac) = match &spec.link {
            EncoderLink::Local { ifname } => {
                let l = netns::link(ifname).map_err(|source| DataplaneError::Interface {
                    name: ifname.clone(),
                    source,
                })?;
                (l.ifindex, l.mac, ENCODER_LOCAL, None)
            }
            EncoderLink::Remote => {
                let ingest = ingest.ok_or(DataplaneError::NoIngest)?;
                // Remote encoders predate this check: said, not refused.
                if let Err(e) = xdp_tx_reaches(&ingest, spec) {
                    warn!("{e}");
                }
                (ingest.ifindex, ingest.mac, ENCODER_REMOTE, None)
            }
            EncoderLink::Routed => {
                let ingest = ingest.ok_or(DataplaneError::NoIngest)?;
                xdp_tx_reaches(&ingest, spec)?;
                let hop = next_hop_by(&ingest, spec)?;
                (ingest.ifindex, ingest.mac, ENCODER_ROUTED, Some(hop.mac))
            }
        };
        // A routed encoder is reached through its next hop: that MAC is what XDP writes.
        let mac = hop_mac.unwrap_or(spec.mac);
        let (family, addr) = ip_bytes(spec.addr);
        let info = EncoderInfo {
            name: name_bytes,
            addr,
            mac,
            smac,
            ifindex,
            family,
            kind,
            _pad: [0; 2],
        };
        let existing = self.encoder_id(&spec.name)?;
        let mut old_info = None;
        if let Some(id) = existing {
            let old = self.encoders.get(&id, 0).map_err(map_err("ENCODERS"))?;
            old_info = Some(old);
            if old.family != family {
                // Channels are bound to an address family: refuse rather than break them.
                if let Some(ch) = self.channels_using(id)?.first() {
                    return Err(DataplaneError::EncoderInUse {
                        encoder: spec.name.clone(),
                        channel: *ch,
                    });
                }
            }
        }
        let id = match existing {
            Some(id) => id,
            None => {
                let used: HashSet<u32> = self.encoder_list()?.iter().map(|e| e.id).collect();
                let id = (0..MAX_ENCODERS)
                    .find(|i| !used.contains(i))
                    .ok_or(DataplaneError::Full("encoder"))?;
                zero_slot(&mut self.encoder_stats, id, "ENCODER_STATS")?;
                id
            }
        };
        // Checked before anything is written: a policy the kernel cannot hold leaves the
        // encoder as it was.
        let policy = policy
            .map(|p| policy_value(&spec.name, &info, p))
            .transpose()?;
        self.encoders
            .insert(id, info, 0)
            .map_err(map_err("ENCODERS"))?;
        self.by_name.insert(spec.name.clone(), (id, info));
        self.index_encoder(id, old_info.as_ref(), &info)?;
        if let Some(value) = policy {
            self.policies
                .insert(id, value, 0)
                .map_err(map_err("POLICIES"))?;
        }
        if let EncoderLink::Local { ifname } = &spec.link {
            // Last: the program finds the encoder (ENCODER_IFINDEX) and its policy from the
            // first packet on.
            self.attach_egress(ifname)?;
            self.tx_ports
                .set(id, ifindex, None, 0)
                .map_err(|e| DataplaneError::Invalid {
                    what: "TX_PORTS".into(),
                    why: e.to_string(),
                })?;
        } else {
            // A remote or routed encoder is reached by XDP_TX: no DEVMAP entry.
            let _ = self.tx_ports.set(id, 0, None, 0);
        }
        // Repoint channels whose target is this encoder (its MAC or address may have changed).
        let using: Vec<(Endpoint, ChannelTarget)> = self
            .mirror
            .channels
            .iter()
            .filter(|(_, t)| t.encoder_id == id)
            .map(|(k, t)| (*k, *t))
            .collect();
        for (key, target) in using {
            let t = retarget(&info, id, &target);
            if t == target {
                continue;
            }
            self.channels.insert(key, t).map_err(map_err("CHANNELS"))?;
            self.mirror.channels.insert(key, t);
        }
        // Transit entries follow the encoder's MAC; one that is no longer local (or whose
        // address changed: its key is the old address) goes.
        let transit: Vec<(Endpoint, ChannelTarget)> = self
            .mirror
            .transit
            .iter()
            .filter(|(_, t)| t.encoder_id == id)
            .map(|(k, t)| (*k, *t))
            .collect();
        for (key, target) in transit {
            let t = retarget(&info, id, &target);
            if info.kind == ENCODER_LOCAL && t.addr == key.addr {
                if t != target {
                    self.channels.insert(key, t).map_err(map_err("CHANNELS"))?;
                    self.mirror.transit.insert(key, t);
                }
            } else {
                self.channels.remove(&key).map_err(map_err("CHANNELS"))?;
                self.mirror.transit.remove(&key);
            }
        }
        Ok(id)
    }

    /// Resolves the next hop of every routed encoder again (the route or the gateway's MAC may
    /// have changed) and repoints the channels of those whose next hop did (one map write
    /// each). An encoder whose next hop cannot be resolved keeps the last one (fail static)
    /// and is returned with the reason, for the caller to report and act on. Nothing here
    /// waits for a neighbour entry: a gateway without one is asked for it and counts as not
    /// resolved this time (the controller calls this every few seconds on its own thread,
    /// which a wait of a second per encoder would hold).
    pub fn refresh_routes(&mut self) -> Vec<(String, DataplaneError)> {
        let routed: Vec<(String, EncoderInfo)> = self
            .by_name
            .iter()
            .filter(|(_, (_, info))| info.kind == ENCODER_ROUTED)
            .map(|(name, (_, info))| (name.clone(), *info))
            .collect();
        let mut failed = Vec::new();
        for (name, info) in routed {
            let spec = EncoderSpec {
                name: name.clone(),
                addr: ip_addr(info.family, &info.addr),
                mac: info.mac,
                link: EncoderLink::Routed,
            };
            match crate::net::route::next_hop_within(spec.addr, std::time::Duration::ZERO) {
                Err(e) => {
                    failed.push((
                        name.clone(),
                        DataplaneError::Invalid {
                            what: format!("routed encoder {name:?}"),
                            why: e.to_string(),
                        },
                    ));
                    continue;
                }
                // The same next hop: nothing to write (and nothing resolved again below).
                Ok(hop) if hop.mac == info.mac && hop.ifindex == info.ifindex => continue,
                Ok(_) => {}
            }
            if let Err(e) = self.upsert_encoder(&spec) {
                failed.push((name, e));
            }
        }
        failed
    }

    /// Removes an encoder. Refused while a channel is forwarded to it or lists it as a backup
    /// (its replies are still expected).
    pub fn remove_encoder(&mut self, name: &str) -> Result<()> {
        let id = self
            .encoder_id(name)?
            .ok_or_else(|| DataplaneError::UnknownEncoder(name.to_owned()))?;
        if let Some(ch) = self.channels_using(id)?.first() {
            return Err(DataplaneError::EncoderInUse {
                encoder: name.to_owned(),
                channel: *ch,
            });
        }
        let info = self.encoders.get(&id, 0).map_err(map_err("ENCODERS"))?;
        self.encoders.remove(&id).map_err(map_err("ENCODERS"))?;
        self.by_name.remove(name);
        let _ = self.tx_ports.set(id, 0, None, 0);
        if info.kind == ENCODER_LOCAL {
            if let Some(ifname) = ifname_of(info.ifindex) {
                self.detach_egress(&ifname)?;
            }
            // The veth may be gone already; remove any pinned TC link that names it.
            self.remove_stale_tc_links()?;
            self.unindex_ifindex(info.ifindex, id)?;
        }
        remove_missing_ok(&mut self.policies, &id, "POLICIES")
    }

    /// Replaces an encoder's egress policy: one HASH map update, so the TC program sees the
    /// old policy or the new one, never a mix, and stays attached. The encoder's own address
    /// (the only source it may use) is its registered address. Refused, leaving the old
    /// policy in place, when the allow-list has more than `MAX_ALLOW_RULES` rules or a rule
    /// of the other address family, or the health protocol is not UDP or TCP.
    pub fn set_policy(&mut self, encoder: &str, policy: &EgressPolicy) -> Result<()> {
        let id = self
            .encoder_id(encoder)?
            .ok_or_else(|| DataplaneError::UnknownEncoder(encoder.to_owned()))?;
        let info = self.encoders.get(&id, 0).map_err(map_err("ENCODERS"))?;
        let value = policy_value(encoder, &info, policy)?;
        self.policies
            .insert(id, value, 0)
            .map_err(map_err("POLICIES"))
    }

    /// An encoder's egress-policy drops by reason (`drop_reason::NAMES`), summed over CPUs.
    pub fn encoder_drops(&self, name: &str) -> Result<Vec<(&'static str, u64)>> {
        let stats = self.encoder_stats(name)?;
        Ok(drop_reason::NAMES.into_iter().zip(stats.drops).collect())
    }

    /// Keeps `ENCODER_IFINDEX` and the encoder's policy in line with its registration: the TC
    /// program finds a local encoder by its veth, and judges sources by its address.
    pub(super) fn index_encoder(
        &mut self,
        id: u32,
        old: Option<&EncoderInfo>,
        info: &EncoderInfo,
    ) -> Result<()> {
        if let Some(old) = old
            && old.kind == ENCODER_LOCAL
            && (info.kind != ENCODER_LOCAL || old.ifindex != info.ifindex)
        {
            self.unindex_ifindex(old.ifindex, id)?;
        }
        if info.kind == ENCODER_LOCAL {
            self.encoder_ifindex
                .insert(info.ifindex, id, 0)
                .map_err(map_err("ENCODER_IFINDEX"))?;
        }
        if let Ok(mut policy) = self.policies.get(&id, 0)
            && (policy.addr != info.addr || policy.family != info.family)
        {
            policy.addr = info.addr;
            policy.family = info.family;
            self.policies
                .insert(id, policy, 0)
                .map_err(map_err("POLICIES"))?;
        }
        Ok(())
    }

    /// Removes the `ENCODER_IFINDEX` entry of `ifindex` if it still names encoder `id`.
    pub(super) fn unindex_ifindex(&mut self, ifindex: u32, id: u32) -> Result<()> {
        if self.encoder_ifindex.get(&ifindex, 0).ok() == Some(id) {
            remove_missing_ok(&mut self.encoder_ifindex, &ifindex, "ENCODER_IFINDEX")?;
        }
        Ok(())
    }

    pub fn encoders(&self) -> Result<Vec<EncoderEntry>> {
        self.encoder_list()
    }

    /// An encoder's counters, summed over CPUs.
    pub fn encoder_stats(&self, name: &str) -> Result<EncoderStats> {
        let id = self
            .encoder_id(name)?
            .ok_or_else(|| DataplaneError::UnknownEncoder(name.to_owned()))?;
        let per_cpu = self
            .encoder_stats
            .get(&id, 0)
            .map_err(map_err("ENCODER_STATS"))?;
        let mut sum = EncoderStats::default();
        per_cpu.iter().for_each(|s| sum.merge(s));
        Ok(sum)
    }

    /// Attaches the TC program to `ifname` unless the link pinned for it is attached to the
    /// interface of that name now; a link left by a deleted interface is replaced.
    pub(super) fn attach_egress(&mut self, ifname: &str) -> Result<()> {
        let pin = self.pins.tc_link(ifname);
        let ifindex = netns::link(ifname)
            .map_err(|source| DataplaneError::Interface {
                name: ifname.to_owned(),
                source,
            })?
            .ifindex;
        if live_link(&pin, ifindex)? {
            return Ok(());
        }
        let id = self
            .tc
            .attach(ifname, TcAttachType::Ingress)
            .map_err(prog_err(PROG_EGRESS))?;
        let link = self.tc.take_link(id).map_err(prog_err(PROG_EGRESS))?;
        let fd_link: FdLink = link.try_into().map_err(|e| DataplaneError::Link {
            path: pin.display().to_string(),
            source: e,
        })?;
        pin_link(fd_link, &pin)
    }

    pub(super) fn detach_egress(&mut self, ifname: &str) -> Result<()> {
        let pin = self.pins.tc_link(ifname);
        if !pin.exists() {
            return Ok(());
        }
        detach_pinned_link(&pin)
    }

    /// TC link pins whose veth no longer exists (removed with its namespace).
    pub(super) fn remove_stale_tc_links(&mut self) -> Result<()> {
        for entry in read_dir(&self.pins.links())? {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(ifname) = name.strip_prefix("tc_")
                && netns::link(ifname).is_err()
            {
                self.detach_egress(ifname)?;
            }
        }
        Ok(())
    }

    pub(super) fn encoder_list(&self) -> Result<Vec<EncoderEntry>> {
        let mut out = Vec::new();
        for item in self.encoders.iter() {
            let (id, info) = item.map_err(map_err("ENCODERS"))?;
            out.push(EncoderEntry {
                id,
                name: decode_name(&info.name),
                addr: ip_addr(info.family, &info.addr),
                mac: info.mac,
                ifindex: info.ifindex,
                local: info.kind == ENCODER_LOCAL,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The interface index encoder `name` was registered with (from memory: no map read).
    pub fn registered_ifindex(&self, name: &str) -> Option<u32> {
        self.by_name.get(name).map(|(_, info)| info.ifindex)
    }

    /// The name of encoder `id`, if it is registered.
    pub fn encoder_name(&self, id: u32) -> Option<String> {
        self.by_name
            .iter()
            .find(|(_, (i, _))| *i == id)
            .map(|(name, _)| name.clone())
    }

    /// The ring buffer on which the egress program reports refused channel packets
    /// ([`nsfail_common::RefusalEvent`]), opened afresh for its reader.
    pub fn refusals(&self) -> Result<aya::maps::RingBuf<MapData>> {
        open_pinned_map(&self.pins, "REFUSALS")?
            .try_into()
            .map_err(map_err("REFUSALS"))
    }

    pub(super) fn encoder_id(&self, name: &str) -> Result<Option<u32>> {
        Ok(self.by_name.get(name).map(|(id, _)| *id))
    }

    /// An encoder by name, checked to be of the channel's address family.
    pub(super) fn encoder_checked(
        &self,
        name: &str,
        channel: SocketAddr,
    ) -> Result<(u32, EncoderInfo)> {
        let (id, info) = *self
            .by_name
            .get(name)
            .ok_or_else(|| DataplaneError::UnknownEncoder(name.to_owned()))?;
        let (family, _) = ip_bytes(channel.ip());
        if info.family != family {
            return Err(DataplaneError::FamilyMismatch {
                encoder: name.to_owned(),
                encoder_family: if info.family == FAMILY_V4 {
                    "IPv4"
                } else {
                    "IPv6"
                },
                channel,
            });
        }
        Ok((id, info))
    }

    /// Channels forwarded to encoder `id` or expecting its replies.
    pub(super) fn channels_using(&self, id: u32) -> Result<Vec<SocketAddr>> {
        let mut out: Vec<SocketAddr> = self
            .mirror
            .channels
            .iter()
            .filter(|(_, t)| t.encoder_id == id)
            .map(|(k, _)| socket_addr(k))
            .collect();
        out.extend(
            self.mirror
                .replies
                .values()
                .filter(|r| r.encoder_id == id)
                .map(|r| socket_addr(&r.ingest)),
        );
        out.sort();
        out.dedup();
        Ok(out)
    }
}

/// The next hop towards routed encoder `spec`, which must leave by the ingest NIC (the
/// uplink): XDP sends it back out of the device it came in by.
fn next_hop_by(ingest: &Ingest, spec: &EncoderSpec) -> Result<crate::net::route::NextHop> {
    let invalid = |why: String| DataplaneError::Invalid {
        what: format!("routed encoder {:?}", spec.name),
        why,
    };
    let hop = crate::net::route::next_hop(spec.addr).map_err(|e| invalid(e.to_string()))?;
    if hop.ifindex != ingest.ifindex {
        let by = netns::ifname_of(hop.ifindex).unwrap_or_else(|_| hop.ifindex.to_string());
        return Err(invalid(format!(
            "{} is reached by {by}, not by the ingest interface: XDP can only send it back out \
             of the interface it came in by",
            spec.addr
        )));
    }
    Ok(hop)
}

/// Refuses an encoder reached by `XDP_TX` out of an ingest NIC whose frames would not arrive
/// (a veth whose peer has no XDP program: see `net::receive::xdp_tx_problem`).
fn xdp_tx_reaches(ingest: &Ingest, spec: &EncoderSpec) -> Result<()> {
    let ifname = netns::ifname_of(ingest.ifindex).map_err(|source| DataplaneError::Interface {
        name: ingest.ifindex.to_string(),
        source,
    })?;
    match crate::net::receive::xdp_tx_problem(&ifname) {
        Ok(None) => Ok(()),
        Ok(Some(why)) => Err(DataplaneError::Invalid {
            what: format!("encoder {:?}", spec.name),
            why,
        }),
        Err(e) => Err(DataplaneError::Invalid {
            what: format!("encoder {:?}", spec.name),
            why: format!("cannot tell whether frames sent back out of {ifname} arrive: {e}"),
        }),
    }
}
