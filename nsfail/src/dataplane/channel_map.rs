//! CHANNELS_V4 and CHANNELS_V6 as one map keyed by ingest [`Endpoint`]: the XDP program looks
//! IPv4 channels up by an 8-byte key and IPv6 ones by the full endpoint; the rest of this
//! module sees one map, and each call goes to the family's own. Values are written sealed
//! with their checksum deltas ([`ChannelTarget::sealed`]) and read back without them.

use aya::maps::{HashMap, MapData, MapError};
use nsfail_common::{ChannelKey4, ChannelTarget, Endpoint};

pub(super) struct ChannelMaps {
    pub(super) v4: HashMap<MapData, ChannelKey4, ChannelTarget>,
    pub(super) v6: HashMap<MapData, Endpoint, ChannelTarget>,
}

impl ChannelMaps {
    pub(super) fn get(&self, key: &Endpoint) -> Result<ChannelTarget, MapError> {
        match ChannelKey4::of(key) {
            Some(k) => self.v4.get(&k, 0),
            None => self.v6.get(key, 0),
        }
        .map(ChannelTarget::unsealed)
    }

    /// Writes `target` under `key`, sealed with the checksum deltas of its rewrite (which
    /// only the key and the target decide).
    pub(super) fn insert(&mut self, key: Endpoint, target: ChannelTarget) -> Result<(), MapError> {
        let target = target.sealed(&key);
        match ChannelKey4::of(&key) {
            Some(k) => self.v4.insert(k, target, 0),
            None => self.v6.insert(key, target, 0),
        }
    }

    pub(super) fn remove(&mut self, key: &Endpoint) -> Result<(), MapError> {
        match ChannelKey4::of(key) {
            Some(k) => self.v4.remove(&k),
            None => self.v6.remove(key),
        }
    }

    /// Every entry of both maps, IPv4 first.
    pub(super) fn iter(
        &self,
    ) -> impl Iterator<Item = Result<(Endpoint, ChannelTarget), MapError>> + '_ {
        self.v4
            .iter()
            .map(|r| r.map(|(k, t)| (k.endpoint(), t)))
            .chain(self.v6.iter())
            .map(|r| r.map(|(k, t)| (k, t.unsealed())))
    }

    /// Every key of both maps, IPv4 first.
    pub(super) fn keys(&self) -> impl Iterator<Item = Result<Endpoint, MapError>> + '_ {
        self.v4
            .keys()
            .map(|r| r.map(|k| k.endpoint()))
            .chain(self.v6.keys())
    }
}
