//! Indexes over a config's encoders and channels (names, ingest addresses, reply keys), so
//! that checking a config, or a channel added to it, and finding a channel by name are
//! lookups rather than scans: linear in the number of channels overall, constant per change.

use std::hash::{BuildHasher, Hash, RandomState};

use hashbrown::HashTable;

use super::*;

/// Where each name, ingest address and reply key of a config is first used, by position in
/// [`Config::encoders`] and [`Config::channels`]. Built by [`Config::lookup`]; kept in step by
/// [`Config::push_channel`] and [`Config::push_encoder`] (any other change of the config calls
/// for a new one).
///
/// The channels' tables hold positions only, and find their keys in the config itself: at
/// 100,000 channels, tables keyed by copies of the names, addresses and reply keys took
/// 19.5 MiB, these take 2.
#[derive(Clone, Debug, Default)]
pub struct Lookup {
    encoders: HashMap<String, usize>,
    hasher: RandomState,
    /// Channel positions, by name.
    channels: HashTable<u32>,
    /// Channel positions, by ingest address.
    listens: HashTable<u32>,
    /// (channel, encoder) positions, by (encoder address, encoder-side port): what tells
    /// replies apart.
    reply_keys: HashTable<(u32, u32)>,
}

impl Lookup {
    /// The encoders' names only (channels are added with [`Lookup::insert_channel`]).
    pub(super) fn of_encoders(encoders: &[Encoder]) -> Self {
        let mut l = Self::default();
        for (i, e) in encoders.iter().enumerate() {
            l.encoders.entry(e.name.clone()).or_insert(i);
        }
        l
    }

    fn hash(&self, key: &(impl Hash + ?Sized)) -> u64 {
        self.hasher.hash_one(key)
    }

    /// Records channel `i` of `cfg` (first uses win: a duplicate is the later one).
    pub(super) fn insert_channel(&mut self, encoders: &[Encoder], channels: &[Channel], i: usize) {
        let channel = &channels[i];
        let at = i as u32;
        let hasher = self.hasher.clone();
        let name = self.hash(channel.name.as_str());
        if self.channel(channels, &channel.name).is_none() {
            self.channels.insert_unique(name, at, |&c| {
                hasher.hash_one(channels[c as usize].name.as_str())
            });
        }
        if self.listen(channels, channel.listen).is_none() {
            let listen = self.hash(&channel.listen);
            self.listens.insert_unique(listen, at, |&c| {
                hasher.hash_one(channels[c as usize].listen)
            });
        }
        let port = channel.encoder_port();
        if port == 0 {
            return;
        }
        for (j, name) in channel.encoders.iter().enumerate() {
            if channel.encoders[..j].contains(name) {
                continue;
            }
            let Some(&e) = self.encoders.get(name) else {
                continue;
            };
            let address = encoders[e].address;
            if address.is_ipv4() == channel.listen.is_ipv4()
                && self.reply_key(encoders, channels, address, port).is_none()
            {
                let key = self.hash(&(address, port));
                self.reply_keys
                    .insert_unique(key, (at, e as u32), |&(c, e)| {
                        hasher.hash_one((
                            encoders[e as usize].address,
                            channels[c as usize].encoder_port(),
                        ))
                    });
            }
        }
    }

    /// The position of the encoder named `name`.
    pub fn encoder(&self, name: &str) -> Option<usize> {
        self.encoders.get(name).copied()
    }

    /// The position of the channel named `name` among `channels` (the config's).
    pub fn channel(&self, channels: &[Channel], name: &str) -> Option<usize> {
        self.channels
            .find(self.hash(name), |&c| channels[c as usize].name == name)
            .map(|&c| c as usize)
    }

    /// The position of the channel listening on `listen`.
    pub(super) fn listen(&self, channels: &[Channel], listen: SocketAddr) -> Option<usize> {
        self.listens
            .find(self.hash(&listen), |&c| {
                channels[c as usize].listen == listen
            })
            .map(|&c| c as usize)
    }

    /// The first (channel, encoder) whose replies come from `address`, `port`.
    pub(super) fn reply_key(
        &self,
        encoders: &[Encoder],
        channels: &[Channel],
        address: IpAddr,
        port: u16,
    ) -> Option<(usize, usize)> {
        self.reply_keys
            .find(self.hash(&(address, port)), |&(c, e)| {
                encoders[e as usize].address == address
                    && channels[c as usize].encoder_port() == port
            })
            .map(|&(c, e)| (c as usize, e as usize))
    }
}

impl Config {
    /// The indexes of this config.
    pub fn lookup(&self) -> Lookup {
        let mut l = Lookup::of_encoders(&self.encoders);
        for i in 0..self.channels.len() {
            l.insert_channel(&self.encoders, &self.channels, i);
        }
        l
    }

    /// The checks [`Config::validate`] makes of a channel, made of `channel` as a new last
    /// channel of this (valid) config, `lookup` being this config's: the first problem, if any.
    pub fn check_new_channel(&self, lookup: &Lookup, channel: &Channel) -> Result<(), ConfigError> {
        let mut out = Vec::new();
        self.channel_problems(self.channels.len(), channel, lookup, &mut out);
        match out.into_iter().next() {
            None => Ok(()),
            Some(problem) => Err(ConfigError::Invalid {
                origin: None,
                location: None,
                message: problem.message,
            }),
        }
    }

    /// Appends a channel (checked with [`Config::check_new_channel`]), `lookup` kept in step.
    pub fn push_channel(&mut self, lookup: &mut Lookup, channel: Channel) {
        // Room for an eighth more at a time, still amortized constant: doubling, the first
        // channel added to 100,000 would leave 12 MiB unused.
        if self.channels.len() == self.channels.capacity() {
            self.channels.reserve_exact(self.channels.len() / 8 + 16);
        }
        self.channels.push(channel);
        lookup.insert_channel(&self.encoders, &self.channels, self.channels.len() - 1);
    }

    /// Appends an encoder that no channel names yet (checked by [`Config::validate`] of a
    /// config holding it), `lookup` kept in step.
    pub fn push_encoder(&mut self, lookup: &mut Lookup, encoder: Encoder) {
        lookup
            .encoders
            .entry(encoder.name.clone())
            .or_insert(self.encoders.len());
        self.encoders.push(encoder);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Config {
        Config::parse(
            "[ingest]\ninterface = \"eth0\"\n\n\
             [[encoder]]\nname = \"a\"\naddress = \"10.0.0.2\"\nmac = \"02:00:00:00:00:01\"\n\
             health = { kind = \"udp\", port = 9 }\n\n\
             [[encoder]]\nname = \"b\"\naddress = \"10.0.0.3\"\nmac = \"02:00:00:00:00:02\"\n\
             health = { kind = \"udp\", port = 9 }\n\n\
             [[channel]]\nname = \"cam1\"\nlisten = \"10.9.0.1:5000\"\nencoders = [\"a\", \"b\"]\n",
            "t.toml",
        )
        .unwrap()
    }

    fn channel(name: &str, listen: &str, encoders: &[&str], port: Option<u16>) -> Channel {
        Channel {
            name: name.into(),
            listen: listen.parse().unwrap(),
            encoders: encoders.iter().map(|e| e.to_string()).collect(),
            port,
            failback: Failback::Manual,
            hold_down_ms: DEFAULT_HOLD_DOWN_MS,
            protocol: Protocol::Udp,
            sources: Vec::new(),
            srt_peer_limit: None,
        }
    }

    /// A new channel is judged as `validate` judges the config holding it.
    #[test]
    fn a_new_channel_is_checked_as_the_whole_config_would_be() {
        let mut cfg = base();
        let mut lookup = cfg.lookup();
        let cases = [
            channel("cam1", "10.9.0.1:5001", &["a"], None),
            channel("cam2", "10.9.0.1:5000", &["a"], Some(7000)),
            channel("cam2", "10.9.0.1:5002", &["b"], Some(5000)),
            channel("cam2", "10.9.0.1:5002", &["zz"], None),
            channel("cam2", "[fd00::1]:5002", &["a"], None),
            channel("cam2", "10.9.0.1:5002", &["a", "a"], None),
            channel("cam2", "10.9.0.1:5002", &["a", "b"], None),
        ];
        for ch in cases {
            let mut whole = cfg.clone();
            whole.channels.push(ch.clone());
            let expected = whole.validate().map_err(|e| e.to_string());
            let got = cfg
                .check_new_channel(&lookup, &ch)
                .map_err(|e| e.to_string());
            assert_eq!(got, expected, "{ch:?}");
        }
        let ok = channel("cam2", "10.9.0.1:5002", &["a", "b"], None);
        cfg.check_new_channel(&lookup, &ok).unwrap();
        cfg.push_channel(&mut lookup, ok);
        assert_eq!(lookup.channel(&cfg.channels, "cam2"), Some(1));
        let clash = channel("cam3", "10.9.0.1:5003", &["b"], Some(5002));
        assert!(
            cfg.check_new_channel(&lookup, &clash)
                .unwrap_err()
                .to_string()
                .contains("same port 5002"),
        );
    }
}
