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
        let ingest = self.ingest.clone().ok_or(DataplaneError::NoIngest)?;
        validate_endpoint(listen)?;
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
        let target = target_for(&active_info, active_id, channel_id, port);
        self.channels
            .insert(key, target, 0)
            .map_err(map_err("CHANNELS"))?;
        Ok(channel_id)
    }

    /// Points an existing channel at another encoder: the failover. One HASH map update.
    pub fn activate(&mut self, listen: SocketAddr, encoder: &str) -> Result<()> {
        let key = endpoint(listen);
        let current = self
            .channels
            .get(&key, 0)
            .map_err(|_| DataplaneError::UnknownChannel(listen))?;
        let (id, info) = self.encoder_checked(encoder, listen)?;
        let target = target_for(&info, id, current.channel_id, current.port);
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
            let _ = self.srt_peers.remove(&k);
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
            let (k, v) = item.map_err(map_err("SRT_PEERS"))?;
            if let Some(channel) = by_id.get(&k.channel_id) {
                out.push(SrtPeerEntry {
                    channel: *channel,
                    peer: socket_addr(&k.peer),
                    socket_id: v.socket_id,
                    last_seen_ns: v.last_seen_ns,
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
