//! What this process wrote to CHANNELS and REPLIES (and each channel's SOURCE_NETS prefixes
//! and SRT caller limit), kept in memory: [`Dataplane`] is their only writer (the programs
//! only read them, or fill SRT_PEERS' slots but never its limit), so reads, checks and id
//! allocation need no walk of a map. Loaded once from the maps when a data plane is adopted, then changed only
//! together with them, after each map write succeeded.

use std::collections::{BTreeSet, HashMap};

use super::*;

#[derive(Debug, Default)]
pub(super) struct Mirror {
    /// CHANNELS: listen key → target.
    pub(super) channels: HashMap<Endpoint, ChannelTarget>,
    /// CHANNELS' transit entries (in a cluster): a local encoder's endpoint → the encoder,
    /// for a channel's packets another host routed here.
    pub(super) transit: HashMap<Endpoint, ChannelTarget>,
    /// REPLIES: reply key (encoder address and port) → where replies go.
    pub(super) replies: HashMap<Endpoint, ReplyTarget>,
    /// Each channel's reply keys (by listen key).
    pub(super) replies_of: HashMap<Endpoint, Vec<Endpoint>>,
    /// Channel ids below `next_id` not in use, lowest first.
    free_ids: BTreeSet<u32>,
    /// Every id at or above this is free.
    next_id: u32,
    /// SOURCE_NETS: each restricted channel's prefixes, by channel id.
    pub(super) source_nets: HashMap<u32, Vec<SourcePrefix>>,
    /// SRT_PEERS: each SRT channel's caller limit, by channel id.
    pub(super) srt_limits: HashMap<u32, u32>,
}

impl Mirror {
    /// Reads both maps (once, when a data plane is adopted).
    pub(super) fn load(
        channels: &super::channel_map::ChannelMaps,
        replies: &aya::maps::HashMap<MapData, Endpoint, ReplyTarget>,
    ) -> Result<Self> {
        let mut m = Self::default();
        for item in channels.iter() {
            let (k, t) = item.map_err(map_err("CHANNELS"))?;
            // A transit entry forwards to its own key (see the `transit` module).
            if k.addr == t.addr && k.port == t.port {
                m.transit.insert(k, t);
            } else {
                m.channels.insert(k, t);
            }
        }
        for item in replies.iter() {
            let (k, r) = item.map_err(map_err("REPLIES"))?;
            m.add_reply(k, r);
        }
        let used: BTreeSet<u32> = m.channels.values().map(|t| t.channel_id).collect();
        m.next_id = used.last().map_or(0, |last| last + 1);
        m.free_ids = (0..m.next_id).filter(|i| !used.contains(i)).collect();
        Ok(m)
    }

    /// Reads SOURCE_NETS and SRT_PEERS (once, when a data plane is adopted, after
    /// [`Mirror::load`]): a prefix's family is its channel's.
    pub(super) fn load_options(
        &mut self,
        source_nets: &LpmTrie<MapData, SourceNet, u8>,
        srt_peers: &aya::maps::HashMap<MapData, u32, SrtPeers>,
    ) -> Result<()> {
        let family: HashMap<u32, u8> = self
            .channels
            .iter()
            .map(|(k, t)| (t.channel_id, k.family))
            .collect();
        for key in source_nets.keys() {
            let key = key.map_err(map_err("SOURCE_NETS"))?;
            let data = key.data();
            let id = u32::from_be_bytes(data.channel);
            let Some(&family) = family.get(&id) else {
                continue;
            };
            let bits = key.prefix_len().saturating_sub(32) as u8;
            if let Some(net) = SourcePrefix::new(ip_addr(family, &data.addr), bits) {
                self.source_nets.entry(id).or_default().push(net);
            }
        }
        for item in srt_peers.iter() {
            let (id, peers) = item.map_err(map_err("SRT_PEERS"))?;
            self.srt_limits.insert(id, peers.limit);
        }
        Ok(())
    }

    /// The lowest free channel id, taken.
    pub(super) fn take_id(&mut self) -> Result<u32> {
        if let Some(id) = self.free_ids.pop_first() {
            return Ok(id);
        }
        if self.next_id >= MAX_CHANNELS {
            return Err(DataplaneError::Full("channel"));
        }
        self.next_id += 1;
        Ok(self.next_id - 1)
    }

    /// Gives back an id taken by [`Mirror::take_id`] and not used after all, or freed.
    pub(super) fn free_id(&mut self, id: u32) {
        if id + 1 == self.next_id {
            self.next_id -= 1;
            // Free ids at the top go back to the range above `next_id`.
            while let Some(&top) = self.free_ids.last() {
                if top + 1 != self.next_id {
                    break;
                }
                self.free_ids.pop_last();
                self.next_id -= 1;
            }
        } else if id < self.next_id {
            self.free_ids.insert(id);
        }
    }

    /// One past the highest channel id in use: the part of CHANNEL_STATS worth reading.
    pub(super) fn id_bound(&self) -> u32 {
        self.next_id
    }

    pub(super) fn add_reply(&mut self, key: Endpoint, r: ReplyTarget) {
        if let Some(old) = self.replies.insert(key, r)
            && old.ingest != r.ingest
            && let Some(keys) = self.replies_of.get_mut(&old.ingest)
        {
            keys.retain(|k| *k != key);
        }
        let keys = self.replies_of.entry(r.ingest).or_default();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }

    pub(super) fn remove_reply(&mut self, key: &Endpoint) {
        if let Some(old) = self.replies.remove(key)
            && let Some(keys) = self.replies_of.get_mut(&old.ingest)
        {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                self.replies_of.remove(&old.ingest);
            }
        }
    }

    /// The reply keys of the channel listening on `ingest`.
    pub(super) fn replies_of(&self, ingest: &Endpoint) -> Vec<Endpoint> {
        self.replies_of.get(ingest).cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_lowest_free_and_come_back() {
        let mut m = Mirror::default();
        assert_eq!(
            (0..4).map(|_| m.take_id().unwrap()).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        m.free_id(1);
        m.free_id(3);
        assert_eq!(m.id_bound(), 3, "a free id at the top lowers the bound");
        assert_eq!(m.take_id().unwrap(), 1);
        assert_eq!(m.take_id().unwrap(), 3);
        m.free_id(3);
        m.free_id(2);
        assert_eq!(m.id_bound(), 2);
        assert_eq!(m.take_id().unwrap(), 2);
    }

    #[test]
    fn replies_are_indexed_by_channel() {
        let mut m = Mirror::default();
        let ch = Endpoint::v4([10, 0, 0, 1], 5000);
        let other = Endpoint::v4([10, 0, 0, 1], 5001);
        let r = |ingest| ReplyTarget {
            ingest,
            ..Default::default()
        };
        let k1 = Endpoint::v4([10, 1, 0, 2], 7000);
        let k2 = Endpoint::v4([10, 2, 0, 2], 7000);
        m.add_reply(k1, r(ch));
        m.add_reply(k2, r(ch));
        assert_eq!(m.replies_of(&ch), [k1, k2]);
        // A key taken over by another channel leaves the first one's list.
        m.add_reply(k2, r(other));
        assert_eq!(m.replies_of(&ch), [k1]);
        assert_eq!(m.replies_of(&other), [k2]);
        m.remove_reply(&k1);
        assert!(m.replies_of(&ch).is_empty());
    }
}
