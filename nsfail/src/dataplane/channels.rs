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
            // An encoder at the channel's own address and port would be a loop, and would
            // read back as a transit entry (see the `transit` module).
            if rkey == key {
                return Err(DataplaneError::Invalid {
                    what: format!("channel {listen}"),
                    why: format!("encoder {name:?} is at the channel's own address and port"),
                });
            }
            if let Some(other) = self.mirror.replies.get(&rkey)
                && other.ingest != key
            {
                return Err(DataplaneError::PortConflict {
                    encoder: name.clone(),
                    port,
                    other: socket_addr(&other.ingest),
                });
            }
        }
        let previous = self.mirror.channels.get(&key).copied();
        let channel_id = match previous {
            Some(t) => t.channel_id,
            None => {
                let id = self.mirror.take_id()?;
                if let Err(e) = zero_slot(&mut self.channel_stats, id, "CHANNEL_STATS") {
                    self.mirror.free_id(id);
                    return Err(e);
                }
                id
            }
        };
        let written = self
            .write_channel(key, channel_id, port, srt, &ids, ingest.ifindex)
            .and_then(|()| self.set_srt_peers(channel_id, opts))
            .and_then(|()| self.add_source_nets(channel_id, &opts.sources));
        let mut target = target_for(&active_info, active_id, channel_id, port);
        if !opts.sources.is_empty() {
            target.flags |= CHANNEL_SOURCES;
        }
        match written.and_then(|()| {
            self.channels
                .insert(key, target)
                .map_err(map_err("CHANNELS"))
        }) {
            Ok(()) => {
                self.mirror.channels.insert(key, target);
                self.drop_source_nets(channel_id, &opts.sources)?;
                self.sync_transit(channel_id, Some((key, target)))?;
                Ok(channel_id)
            }
            Err(e) => {
                if previous.is_none() {
                    self.mirror.free_id(channel_id);
                }
                Err(e)
            }
        }
    }

    /// The return path of a channel: its members' reply keys written, those of encoders no
    /// longer listed (or on another port) removed.
    fn write_channel(
        &mut self,
        key: Endpoint,
        channel_id: u32,
        port: u16,
        srt: bool,
        ids: &[(String, u32, EncoderInfo)],
        ifindex: u32,
    ) -> Result<()> {
        let wanted: HashSet<Endpoint> = ids.iter().map(|(_, _, i)| reply_key(i, port)).collect();
        for rkey in self.mirror.replies_of(&key) {
            if !wanted.contains(&rkey) {
                self.replies.remove(&rkey).map_err(map_err("REPLIES"))?;
                self.mirror.remove_reply(&rkey);
            }
        }
        for (_, id, info) in ids {
            let rt = ReplyTarget {
                ingest: key,
                channel_id,
                encoder_id: *id,
                ifindex,
                flags: if srt { REPLY_SRT } else { 0 },
            };
            let rkey = reply_key(info, port);
            if self.mirror.replies.get(&rkey) == Some(&rt) {
                continue;
            }
            self.replies
                .insert(rkey, rt, 0)
                .map_err(map_err("REPLIES"))?;
            self.mirror.add_reply(rkey, rt);
        }
        Ok(())
    }

    /// Creates, resizes or removes the channel's SRT_PEERS entry (its learnt callers stay
    /// across a reconfiguration, up to the new limit). No map access when the limit is as
    /// written.
    fn set_srt_peers(&mut self, channel_id: u32, opts: &ChannelOptions) -> Result<()> {
        let written = self.mirror.srt_limits.get(&channel_id).copied();
        if !opts.srt {
            if written.is_some() {
                self.srt_peers
                    .remove(&channel_id)
                    .map_err(map_err("SRT_PEERS"))?;
                self.mirror.srt_limits.remove(&channel_id);
            }
            return Ok(());
        }
        if written == Some(opts.srt_peer_limit) {
            return Ok(());
        }
        let mut peers = SrtPeers::new(opts.srt_peer_limit);
        if let Ok(c) = self.srt_peers.get(&channel_id, 0) {
            let keep = (opts.srt_peer_limit as usize).min(MAX_SRT_PEERS_PER_CHANNEL);
            peers.slots[..keep].copy_from_slice(&c.slots[..keep]);
        }
        self.srt_peers
            .insert(channel_id, peers, 0)
            .map_err(map_err("SRT_PEERS"))?;
        self.mirror
            .srt_limits
            .insert(channel_id, opts.srt_peer_limit);
        Ok(())
    }

    /// Writes the prefixes of `sources` the channel does not have yet (before its CHANNELS
    /// write, so a newly restricted channel never forwards from outside them).
    fn add_source_nets(&mut self, channel_id: u32, sources: &[SourcePrefix]) -> Result<()> {
        for net in sources {
            let have = self.mirror.source_nets.entry(channel_id).or_default();
            if have.contains(net) {
                continue;
            }
            self.source_nets
                .insert(&source_net_key(channel_id, net), 1, 0)
                .map_err(map_err("SOURCE_NETS"))?;
            have.push(*net);
        }
        if self
            .mirror
            .source_nets
            .get(&channel_id)
            .is_some_and(Vec::is_empty)
        {
            self.mirror.source_nets.remove(&channel_id);
        }
        Ok(())
    }

    /// Removes the channel's prefixes not in `keep` (after its CHANNELS write).
    fn drop_source_nets(&mut self, channel_id: u32, keep: &[SourcePrefix]) -> Result<()> {
        let Some(have) = self.mirror.source_nets.get(&channel_id) else {
            return Ok(());
        };
        let stale: Vec<SourcePrefix> = have.iter().filter(|n| !keep.contains(n)).copied().collect();
        for net in stale {
            self.source_nets
                .remove(&source_net_key(channel_id, &net))
                .map_err(map_err("SOURCE_NETS"))?;
            if let Some(have) = self.mirror.source_nets.get_mut(&channel_id) {
                have.retain(|n| *n != net);
            }
        }
        if self
            .mirror
            .source_nets
            .get(&channel_id)
            .is_some_and(Vec::is_empty)
        {
            self.mirror.source_nets.remove(&channel_id);
        }
        Ok(())
    }

    /// A channel's `sources` as the data plane holds them (empty: from anywhere).
    pub fn channel_sources(&self, listen: SocketAddr) -> Result<Vec<SourcePrefix>> {
        let t = self
            .mirror
            .channels
            .get(&endpoint(listen))
            .ok_or(DataplaneError::UnknownChannel(listen))?;
        let mut nets = self
            .mirror
            .source_nets
            .get(&t.channel_id)
            .cloned()
            .unwrap_or_default();
        nets.sort();
        Ok(nets)
    }

    /// Points an existing channel at another encoder: the failover. One HASH map update.
    pub fn activate(&mut self, listen: SocketAddr, encoder: &str) -> Result<()> {
        let key = endpoint(listen);
        let current = *self
            .mirror
            .channels
            .get(&key)
            .ok_or(DataplaneError::UnknownChannel(listen))?;
        let (id, info) = self.encoder_checked(encoder, listen)?;
        let target = retarget(&info, id, &current);
        self.channels
            .insert(key, target)
            .map_err(map_err("CHANNELS"))?;
        self.mirror.channels.insert(key, target);
        Ok(())
    }

    /// Removes a channel: forwarding stops first, then its return path.
    pub fn remove_channel(&mut self, listen: SocketAddr) -> Result<()> {
        let key = endpoint(listen);
        let current = *self
            .mirror
            .channels
            .get(&key)
            .ok_or(DataplaneError::UnknownChannel(listen))?;
        self.channels.remove(&key).map_err(map_err("CHANNELS"))?;
        self.mirror.channels.remove(&key);
        for rkey in self.mirror.replies_of(&key) {
            self.replies.remove(&rkey).map_err(map_err("REPLIES"))?;
            self.mirror.remove_reply(&rkey);
        }
        self.sync_transit(current.channel_id, None)?;
        self.mirror.free_id(current.channel_id);
        let stale: Vec<SourceKey> = self
            .sources
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.channel_id == current.channel_id)
            .collect();
        for k in stale {
            let _ = self.sources.remove(&k);
        }
        if self.mirror.srt_limits.remove(&current.channel_id).is_some() {
            let _ = self.srt_peers.remove(&current.channel_id);
        }
        for net in self
            .mirror
            .source_nets
            .remove(&current.channel_id)
            .unwrap_or_default()
        {
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

    /// Reads CHANNELS and REPLIES again into the in-memory mirror this type keeps of them: for
    /// a caller that wrote them directly (a benchmark's synthetic channels). Nothing in nsfail
    /// itself needs it: this type is the maps' only writer.
    pub fn reload_channels(&mut self) -> Result<()> {
        self.mirror = Mirror::load(&self.channels, &self.replies)?;
        self.mirror
            .load_options(&self.source_nets, &self.srt_peers)?;
        Ok(())
    }

    /// The name of the encoder a channel is forwarded to now, without reading any map.
    pub fn active_encoder(&self, listen: SocketAddr) -> Option<&str> {
        let t = self.mirror.channels.get(&endpoint(listen))?;
        self.by_name
            .iter()
            .find(|(_, (id, _))| *id == t.encoder_id)
            .map(|(name, _)| name.as_str())
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
            .mirror
            .channels
            .get(&endpoint(listen))
            .ok_or(DataplaneError::UnknownChannel(listen))?;
        let per_cpu = self
            .channel_stats
            .get(&t.channel_id, 0)
            .map_err(map_err("CHANNEL_STATS"))?;
        let mut sum = FlowStats::default();
        per_cpu.iter().for_each(|s| sum.merge(&s.flow));
        Ok(sum)
    }

    /// Every channel's input counters, summed over CPUs, read in a few batched syscalls
    /// rather than one per channel.
    pub fn all_channel_stats(&self) -> Result<std::collections::HashMap<SocketAddr, FlowStats>> {
        const CHUNK: u32 = 4096;
        let cpus = nr_cpus().map_err(|(_, e)| DataplaneError::Invalid {
            what: "possible CPUs".into(),
            why: e.to_string(),
        })?;
        let slot = size_of::<ChannelStats>().next_multiple_of(8);
        let size = slot * cpus;
        let bound = self.mirror.id_bound();
        let mut by_id = vec![FlowStats::default(); bound as usize];
        let mut buf = vec![0u8; CHUNK as usize * size];
        let mut start = 0;
        while start < bound {
            let count = CHUNK.min(bound - start);
            let read =
                sys::bpf_array_lookup_batch(&self.channel_stats_fd, start, count, &mut buf, size)
                    .map_err(|e| DataplaneError::Invalid {
                    what: "CHANNEL_STATS batch read".into(),
                    why: e.to_string(),
                })?;
            if read == 0 {
                break;
            }
            for (k, value) in buf.chunks_exact(size).take(read as usize).enumerate() {
                let sum = &mut by_id[start as usize + k];
                for cpu in value.chunks_exact(slot) {
                    // SAFETY: the kernel wrote a whole `ChannelStats` (plain integers, any
                    // bit pattern valid) at the start of each CPU's slot.
                    let s: ChannelStats = unsafe { std::ptr::read_unaligned(cpu.as_ptr().cast()) };
                    sum.merge(&s.flow);
                }
            }
            start += read;
        }
        Ok(self
            .mirror
            .channels
            .iter()
            .filter_map(|(k, t)| Some((socket_addr(k), *by_id.get(t.channel_id as usize)?)))
            .collect())
    }

    pub(super) fn channel_targets(&self) -> Result<Vec<(Endpoint, ChannelTarget)>> {
        Ok(self.mirror.channels.iter().map(|(k, t)| (*k, *t)).collect())
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
