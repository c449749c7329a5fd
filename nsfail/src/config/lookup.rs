//! Indexes over a config's encoders and channels (names, ingest addresses, reply keys), so
//! that checking a config, or a channel added to it, and finding a channel by name are
//! lookups rather than scans: linear in the number of channels overall, constant per change.

use super::*;

/// Where each name, ingest address and reply key of a config is first used, by position in
/// [`Config::encoders`] and [`Config::channels`]. Built by [`Config::lookup`]; kept in step by
/// [`Config::push_channel`] and [`Config::push_encoder`] (any other change of the config calls
/// for a new one).
#[derive(Clone, Debug, Default)]
pub struct Lookup {
    encoders: HashMap<String, usize>,
    channels: HashMap<String, usize>,
    pub(super) listens: HashMap<SocketAddr, usize>,
    /// (encoder address, encoder-side port) → (channel, encoder): what tells replies apart.
    pub(super) reply_keys: HashMap<(IpAddr, u16), (usize, usize)>,
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

    /// Records channel `i` (first uses win: a duplicate is the later one).
    pub(super) fn insert_channel(&mut self, encoders: &[Encoder], i: usize, channel: &Channel) {
        self.channels.entry(channel.name.clone()).or_insert(i);
        self.listens.entry(channel.listen).or_insert(i);
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
            if address.is_ipv4() == channel.listen.is_ipv4() {
                self.reply_keys.entry((address, port)).or_insert((i, e));
            }
        }
    }

    /// The position of the encoder named `name`.
    pub fn encoder(&self, name: &str) -> Option<usize> {
        self.encoders.get(name).copied()
    }

    /// The position of the channel named `name`.
    pub fn channel(&self, name: &str) -> Option<usize> {
        self.channels.get(name).copied()
    }
}

impl Config {
    /// The indexes of this config.
    pub fn lookup(&self) -> Lookup {
        let mut l = Lookup::of_encoders(&self.encoders);
        for (i, c) in self.channels.iter().enumerate() {
            l.insert_channel(&self.encoders, i, c);
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
        lookup.insert_channel(&self.encoders, self.channels.len(), &channel);
        // Room for an eighth more at a time, still amortized constant: doubling, the first
        // channel added to 100,000 would leave 12 MiB unused.
        if self.channels.len() == self.channels.capacity() {
            self.channels.reserve_exact(self.channels.len() / 8 + 16);
        }
        self.channels.push(channel);
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
        assert_eq!(lookup.channel("cam2"), Some(1));
        let clash = channel("cam3", "10.9.0.1:5003", &["b"], Some(5002));
        assert!(
            cfg.check_new_channel(&lookup, &clash)
                .unwrap_err()
                .to_string()
                .contains("same port 5002"),
        );
    }
}
