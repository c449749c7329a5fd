//! Channels in the data plane: the CHANNELS entry (one write is a failover), the return
//! path's REPLIES, the sources and SRT callers learnt, and the input counters.

use super::*;

impl Dataplane {
    /// Adds or replaces a channel: packets to `listen` go to `active` on `port`, and replies
    /// from any of `members` (the active encoder and its backups) on `port` are returned from
    /// `listen`. For an `srt` channel the return path also learns each caller's SRT socket ID
    /// ([`Dataplane::srt_peers`]). The CHANNELS write comes last, so the channel forwards only
    /// once its return path is in place.
    pub fn set_channel(
        &mut self,
        listen: SocketAddr,
        port: u16,
        active: &str,
        members: &[&str],
        srt: bool,
    ) -> Result<u32> {
        let opts = ChannelOptions {
            srt,
            ..ChannelOptions::default()
        };
        self.set_channel_with(listen, port, active, members, &opts)
    }

    /// [`Dataplane::set_channel`] with the channel's `sources` and SRT caller limit. The
    /// prefixes of a newly restricted channel are in place before its CHANNELS write; those
    /// of a channel no longer restricted go after it.
    pub fn set_channel_with(
        &mut self,
        listen: SocketAddr,
        port: u16,
        active: &str,
        members: &[&str],
        opts: &ChannelOptions,
    ) -> Result<u32> {
        let srt = opts.srt;
        let ingest = self.ingest.clone().ok_or(DataplaneError::NoIngest)?;
        validate_endpoint(listen)?;
        validate_options(listen, opts)?;
        if port == 0 {
            return Err(DataplaneError::Invalid {
                what: format!("channel {listen}"),
                why: "encoder-side port 0".into(),
            });
        }
        let key = endpoint(listen);
        let mut ids = Vec::new();
        for name in members.iter().chain(std::iter::once(&active)) {
            let (id, info) = self.encoder_checked(name, listen)?;
            ids.push((name.to_string(), id, info));
        }
        let (active_id, active_info) = {
            let (_, id, info) = ids.last().expect("active is always present");
            (*id, *info)
        };
        // Check every reply key before writing any.
        for (name, _, info) in &ids {
            let rkey = reply_key(info, port);
            if let Ok(other) = self.replies.get(&rkey, 0)
                && other.ingest != key
            {
                return Err(DataplaneError::PortConflict {
                    encoder: name.clone(),
                    port,
                    other: socket_addr(&other.ingest),
                });
            }
        }
        let previous = self.channels.get(&key, 0).ok();
        let channel_id = match previous {
            Some(t) => t.channel_id,
            None => {
                let used: HashSet<u32> = self
                    .channel_targets()?
                    .iter()
                    .map(|(_, t)| t.channel_id)
                    .collect();
                let id = (0..MAX_CHANNELS)
                    .find(|i| !used.contains(i))
                    .ok_or(DataplaneError::Full("channel"))?;
                zero_slot(&mut self.channel_stats, id, "CHANNEL_STATS")?;
                id
            }
        };
        // Replies of encoders no longer listed (or on another port) stop being rewritten.
        let wanted: HashSet<Endpoint> = ids.iter().map(|(_, _, i)| reply_key(i, port)).collect();
        for (rkey, rt) in self.reply_entries()? {
            if rt.ingest == key && !wanted.contains(&rkey) {
                self.replies.remove(&rkey).map_err(map_err("REPLIES"))?;
            }
        }
        for (_, id, info) in &ids {
            let rt = ReplyTarget {
                ingest: key,
                channel_id,
                encoder_id: *id,
                ifindex: ingest.ifindex,
                flags: if srt { REPLY_SRT } else { 0 },
            };
            self.replies
                .insert(reply_key(info, port), rt, 0)
                .map_err(map_err("REPLIES"))?;
        }
        self.set_srt_peers(channel_id, opts)?;
        let old_nets = self.source_nets_of(channel_id, key.family)?;
        for net in &opts.sources {
            self.source_nets
                .insert(&source_net_key(channel_id, net), 1, 0)
                .map_err(map_err("SOURCE_NETS"))?;
        }
        let mut target = target_for(&active_info, active_id, channel_id, port);
        if !opts.sources.is_empty() {
            target.flags |= CHANNEL_SOURCES;
        }
        self.channels
            .insert(key, target, 0)
            .map_err(map_err("CHANNELS"))?;
        let wanted: HashSet<SourcePrefix> = opts.sources.iter().copied().collect();
        for net in old_nets.iter().filter(|n| !wanted.contains(n)) {
            self.source_nets
                .remove(&source_net_key(channel_id, net))
                .map_err(map_err("SOURCE_NETS"))?;
        }
        Ok(channel_id)
    }

    /// Creates, resizes or removes the channel's SRT_PEERS entry (its learnt callers stay
    /// across a reconfiguration, up to the new limit).
    fn set_srt_peers(&mut self, channel_id: u32, opts: &ChannelOptions) -> Result<()> {
        let current = self.srt_peers.get(&channel_id, 0).ok();
        if !opts.srt {
            if current.is_some() {
                self.srt_peers
                    .remove(&channel_id)
                    .map_err(map_err("SRT_PEERS"))?;
            }
            return Ok(());
        }
        if current.is_some_and(|c| c.limit == opts.srt_peer_limit) {
            return Ok(());
        }
        let mut peers = SrtPeers::new(opts.srt_peer_limit);
        if let Some(c) = current {
            let keep = (opts.srt_peer_limit as usize).min(MAX_SRT_PEERS_PER_CHANNEL);
            peers.slots[..keep].copy_from_slice(&c.slots[..keep]);
        }
        self.srt_peers
            .insert(channel_id, peers, 0)
            .map_err(map_err("SRT_PEERS"))
    }

    /// The `sources` prefixes the data plane holds for a channel of `family`.
    fn source_nets_of(&self, channel_id: u32, family: u8) -> Result<Vec<SourcePrefix>> {
        let mut out = Vec::new();
        for key in self.source_nets.keys() {
            let key = key.map_err(map_err("SOURCE_NETS"))?;
            let data = key.data();
            if u32::from_be_bytes(data.channel) != channel_id {
                continue;
            }
            let bits = key.prefix_len().saturating_sub(32) as u8;
            if let Some(net) = SourcePrefix::new(ip_addr(family, &data.addr), bits) {
                out.push(net);
            }
        }
        Ok(out)
    }

    /// A channel's `sources` as the data plane holds them (empty: from anywhere).
    pub fn channel_sources(&self, listen: SocketAddr) -> Result<Vec<SourcePrefix>> {
        let t = self
            .channels
            .get(&endpoint(listen), 0)
            .map_err(|_| DataplaneError::UnknownChannel(listen))?;
        let mut nets = self.source_nets_of(t.channel_id, endpoint(listen).family)?;
        nets.sort();
        Ok(nets)
    }

    /// Points an existing channel at another encoder: the failover. One HASH map update.
    pub fn activate(&mut self, listen: SocketAddr, encoder: &str) -> Result<()> {
        let key = endpoint(listen);
        let current = self
            .channels
            .get(&key, 0)
            .map_err(|_| DataplaneError::UnknownChannel(listen))?;
        let (id, info) = self.encoder_checked(encoder, listen)?;
        let target = retarget(&info, id, &current);
        self.channels
            .insert(key, target, 0)
            .map_err(map_err("CHANNELS"))
    }

    /// Removes a channel: forwarding stops first, then its return path.
    pub fn remove_channel(&mut self, listen: SocketAddr) -> Result<()> {
        let key = endpoint(listen);
        let current = self
            .channels
            .get(&key, 0)
            .map_err(|_| DataplaneError::UnknownChannel(listen))?;
        self.channels.remove(&key).map_err(map_err("CHANNELS"))?;
        for (rkey, rt) in self.reply_entries()? {
            if rt.ingest == key {
                self.replies.remove(&rkey).map_err(map_err("REPLIES"))?;
            }
        }
        let stale: Vec<SourceKey> = self
            .sources
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.channel_id == current.channel_id)
            .collect();
        for k in stale {
            let _ = self.sources.remove(&k);
        }
        let _ = self.srt_peers.remove(&current.channel_id);
        for net in self.source_nets_of(current.channel_id, key.family)? {
            let _ = self
                .source_nets
                .remove(&source_net_key(current.channel_id, &net));
        }
        Ok(())
    }

    /// Each channel's ingest address by channel id (the key of SOURCES and SRT_PEERS).
    pub(super) fn listen_by_id(&self) -> Result<BTreeMap<u32, SocketAddr>> {
        Ok(self
            .channel_targets()?
            .into_iter()
            .map(|(k, t)| (t.channel_id, socket_addr(&k)))
            .collect())
    }

    /// SRT callers of SRT channels, with the socket ID their listener last addressed them by.
    pub fn srt_peers(&self) -> Result<Vec<SrtPeerEntry>> {
        let by_id = self.listen_by_id()?;
        let mut out = Vec::new();
        for item in self.srt_peers.iter() {
            let (id, v) = item.map_err(map_err("SRT_PEERS"))?;
            let Some(channel) = by_id.get(&id) else {
                continue;
            };
            let limit = (v.limit as usize).min(MAX_SRT_PEERS_PER_CHANNEL);
            for slot in v.slots[..limit].iter().filter(|s| s.last_seen_ns != 0) {
                out.push(SrtPeerEntry {
                    channel: *channel,
                    peer: socket_addr(&slot.peer),
                    socket_id: slot.socket_id,
                    last_seen_ns: slot.last_seen_ns,
                });
            }
        }
        out.sort_by_key(|p| (p.channel, p.peer));
        Ok(out)
    }

    pub fn channels(&self) -> Result<Vec<ChannelEntry>> {
        let names: BTreeMap<u32, String> = self
            .encoder_list()?
            .into_iter()
            .map(|e| (e.id, e.name))
            .collect();
        let mut out: Vec<ChannelEntry> = self
            .channel_targets()?
            .into_iter()
            .map(|(k, t)| ChannelEntry {
                id: t.channel_id,
                listen: socket_addr(&k),
                encoder: names.get(&t.encoder_id).cloned().unwrap_or_default(),
                port: t.port,
            })
            .collect();
        out.sort_by_key(|c| c.listen);
        Ok(out)
    }

    /// Sources seen sending to channels.
    pub fn sources(&self) -> Result<Vec<SourceEntry>> {
        let by_id = self.listen_by_id()?;
        let mut out = Vec::new();
        for item in self.sources.iter() {
            let (k, v) = item.map_err(map_err("SOURCES"))?;
            if let Some(channel) = by_id.get(&k.channel_id) {
                out.push(SourceEntry {
                    channel: *channel,
                    peer: socket_addr(&k.peer),
                    last_seen_ns: v.last_seen_ns,
                });
            }
        }
        Ok(out)
    }

    /// A channel's input counters, summed over CPUs.
    pub fn channel_stats(&self, listen: SocketAddr) -> Result<FlowStats> {
        let t = self
            .channels
            .get(&endpoint(listen), 0)
            .map_err(|_| DataplaneError::UnknownChannel(listen))?;
        let per_cpu = self
            .channel_stats
            .get(&t.channel_id, 0)
            .map_err(map_err("CHANNEL_STATS"))?;
        let mut sum = FlowStats::default();
        per_cpu.iter().for_each(|s| sum.merge(&s.flow));
        Ok(sum)
    }

    pub(super) fn channel_targets(&self) -> Result<Vec<(Endpoint, ChannelTarget)>> {
        self.channels
            .iter()
            .map(|r| r.map_err(map_err("CHANNELS")))
            .collect()
    }

    pub(super) fn reply_entries(&self) -> Result<Vec<(Endpoint, ReplyTarget)>> {
        self.replies
            .iter()
            .map(|r| r.map_err(map_err("REPLIES")))
            .collect()
    }
}

/// `sources` of the channel's family, within the map's capacity; an SRT caller limit of 1 to
/// `MAX_SRT_PEERS_PER_CHANNEL`.
fn validate_options(listen: SocketAddr, opts: &ChannelOptions) -> Result<()> {
    let invalid = |why: String| DataplaneError::Invalid {
        what: format!("channel {listen}"),
        why,
    };
    if let Some(net) = opts
        .sources
        .iter()
        .find(|n| n.addr.is_ipv4() != listen.is_ipv4())
    {
        return Err(invalid(format!(
            "source {net} is not of the ingest address's family"
        )));
    }
    if opts.sources.len() > MAX_SOURCE_NETS as usize {
        return Err(invalid(format!(
            "{} sources, at most {MAX_SOURCE_NETS}",
            opts.sources.len()
        )));
    }
    if opts.srt_peer_limit == 0 || opts.srt_peer_limit as usize > MAX_SRT_PEERS_PER_CHANNEL {
        return Err(invalid(format!(
            "SRT caller limit {}, must be 1 to {MAX_SRT_PEERS_PER_CHANNEL}",
            opts.srt_peer_limit
        )));
    }
    Ok(())
}
