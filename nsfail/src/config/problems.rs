//! The semantic checks of a config, each problem blamed on the key path of its value.

use super::*;

/// Every problem with one encoder's settings. Long because it is a flat list of independent
/// checks, each a few lines naming its key; splitting it would only scatter the list.
pub(super) fn encoder_problems(i: usize, encoder: &Encoder, out: &mut Vec<Problem>) {
    let name = &encoder.name;
    if let Some(why) = name_problem(name) {
        out.push(Problem::new(
            at!["encoder", i, "name"],
            format!("encoder name {name:?} {why}"),
        ));
    }
    if !is_unicast(encoder.address) {
        out.push(Problem::new(
            at!["encoder", i, "address"],
            format!(
                "encoder {name:?}: address {} is not a unicast address",
                encoder.address
            ),
        ));
    }
    if let Some(why) = encoder.interface.as_deref().and_then(ifname_problem) {
        out.push(Problem::new(
            at!["encoder", i, "interface"],
            format!("encoder {name:?}: interface {why}"),
        ));
    }
    if let Some(spawn) = &encoder.spawn {
        if spawn.command.trim().is_empty() {
            out.push(Problem::new(
                at!["encoder", i, "spawn"],
                format!("encoder {name:?}: spawn.command is empty"),
            ));
        }
        if let Some(why) = managed_address_problem(encoder.address, encoder.link_prefix()) {
            out.push(Problem::new(
                at!["encoder", i, "address"],
                format!("encoder {name:?}: {why}"),
            ));
        }
    } else if encoder.prefix.is_some() {
        out.push(Problem::new(
            at!["encoder", i, "prefix"],
            format!("encoder {name:?}: `prefix` is only for managed encoders (with `spawn`)"),
        ));
    }
    for (key, value) in &encoder.env {
        let why = if key.is_empty() || key.contains(['=', '\0']) {
            Some(format!("{key:?} is not an environment variable name"))
        } else if value.contains('\0') {
            Some(format!("env {key} holds a NUL byte"))
        } else {
            None
        };
        if let Some(why) = why {
            out.push(Problem::new(
                at!["encoder", i, "env"],
                format!("encoder {name:?}: {why}"),
            ));
        }
    }
    if let Some(netns) = &encoder.netns
        && !netns_name_ok(netns)
    {
        out.push(Problem::new(
            at!["encoder", i, "netns"],
            format!("encoder {name:?}: {netns:?} is not a network namespace name"),
        ));
    }
    if let Some(mac) = &encoder.mac {
        let why = match parse_mac(mac) {
            None => Some("expected six hex pairs like \"02:00:00:00:00:01\""),
            Some(m) if m[0] & 1 == 1 => Some("a multicast MAC cannot be an encoder's"),
            Some([0, 0, 0, 0, 0, 0]) => Some("the all-zero MAC cannot be an encoder's"),
            Some(_) => None,
        };
        if let Some(why) = why {
            out.push(Problem::new(
                at!["encoder", i, "mac"],
                format!("encoder {name:?}: invalid mac {mac:?}: {why}"),
            ));
        }
    }
    for (j, rule) in encoder.allow.iter().enumerate() {
        match rule.parse::<AllowRule>() {
            Err(e) => out.push(Problem::new(
                at!["encoder", i, "allow", j],
                format!("encoder {name:?}: {e}"),
            )),
            Ok(r) if r.network.is_ipv4() != encoder.address.is_ipv4() => out.push(Problem::new(
                at!["encoder", i, "allow", j],
                format!(
                    "encoder {name:?}: allow rule {rule:?} is of the other address family \
                         than the encoder's address {}",
                    encoder.address
                ),
            )),
            Ok(_) => {}
        }
    }
    let max = nsfail_common::MAX_ALLOW_RULES;
    if encoder.allow.len() > max {
        out.push(Problem::new(
            at!["encoder", i, "allow"],
            format!(
                "encoder {name:?} has {} allow rules; the kernel policy holds at most {max}",
                encoder.allow.len()
            ),
        ));
    }
}

/// The problems of `encoder`'s health settings, from the one place that builds the check.
pub(super) fn health_problems(cfg: &Config, i: usize, encoder: &Encoder, out: &mut Vec<Problem>) {
    if let Err(problems) = cfg.health_check(encoder) {
        let name = &encoder.name;
        for p in problems {
            out.push(Problem::new(
                at!["encoder", i, "health", p.key],
                format!("encoder {name:?}: {}", p.message),
            ));
        }
    }
}

/// Why `name` cannot name an encoder or channel.
pub(super) fn name_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("is empty".into())
    } else if name.len() > MAX_NAME_LEN {
        Some(format!(
            "is {} bytes long, the limit is {MAX_NAME_LEN}",
            name.len()
        ))
    } else {
        name.chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            .map(|c| format!("contains {c:?}: use only A-Z a-z 0-9 . _ -"))
    }
}

/// Why `name` cannot be a Linux interface name (the kernel's `dev_valid_name`).
pub(super) fn ifname_problem(name: &str) -> Option<String> {
    if name.is_empty() {
        Some("is empty".into())
    } else if name.len() > MAX_IFNAME_LEN {
        Some(format!(
            "{name:?} is longer than {MAX_IFNAME_LEN} bytes, the limit for an interface name"
        ))
    } else if name == "."
        || name == ".."
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        Some(format!("{name:?} is not a valid interface name"))
    } else {
        None
    }
}

pub(super) fn is_unicast(ip: IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST))
}

pub(super) fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// One step of a key path: a table key or an array index.
#[derive(Clone, Debug)]
pub(super) enum Seg {
    Key(&'static str),
    Index(usize),
}

impl From<&'static str> for Seg {
    fn from(key: &'static str) -> Self {
        Self::Key(key)
    }
}

impl From<usize> for Seg {
    fn from(index: usize) -> Self {
        Self::Index(index)
    }
}

/// A semantic problem and the value it is blamed on.
pub(super) struct Problem {
    pub(super) at: Vec<Seg>,
    pub(super) message: String,
    /// For duplicates: the earlier occurrence, reported by line.
    pub(super) first: Option<Vec<Seg>>,
}

impl Problem {
    pub(super) fn new(at: Vec<Seg>, message: String) -> Self {
        Self {
            at,
            message,
            first: None,
        }
    }

    pub(super) fn first(mut self, at: Vec<Seg>) -> Self {
        self.first = Some(at);
        self
    }
}

/// A name `ip netns` could have made: a plain file name under /run/netns.
pub(super) fn netns_name_ok(name: &str) -> bool {
    !(name.is_empty() || name.contains('/') || name == "." || name == "..")
}

/// A managed encoder's address must leave room for the host side: the link's first address is
/// the host's, the encoder's must be another host address of the same link.
pub(super) fn managed_address_problem(addr: IpAddr, prefix: u8) -> Option<String> {
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    if prefix >= bits - 1 {
        return Some(format!(
            "prefix /{prefix} leaves no room for the host side of the veth"
        ));
    }
    let (host, gateway) = managed_link(addr, prefix);
    if addr == gateway {
        return Some(format!(
            "address {addr} is the link's first address, which the host side takes ({gateway}/{prefix})"
        ));
    }
    if addr.is_ipv4() && (host == 0 || host == (1u128 << (bits - prefix)) - 1) {
        return Some(format!(
            "address {addr} is the network or broadcast address of /{prefix}"
        ));
    }
    None
}

impl Config {
    /// Interfaces the config names that this host does not have, looked up inside
    /// `ingest.netns` when it is set (read-only: nothing is changed).
    pub(super) fn host_problems(&self) -> Vec<Problem> {
        let mut names = vec![(at!["ingest", "interface"], self.ingest.interface.clone())];
        for (i, e) in self.encoders.iter().enumerate() {
            if let (Some(ifname), None) = (&e.interface, &e.spawn) {
                names.push((at!["encoder", i, "interface"], ifname.clone()));
            }
        }
        let lookup = {
            let names: Vec<String> = names.iter().map(|(_, n)| n.clone()).collect();
            move || -> Vec<Option<String>> {
                names
                    .iter()
                    .map(|n| crate::net::netns::link(n).err().map(|e| e.to_string()))
                    .collect()
            }
        };
        let (missing, where_) = match &self.ingest.netns {
            Some(ns) => match crate::net::netns::in_netns(ns, lookup) {
                Ok(found) => (found, format!("in network namespace {ns}")),
                Err(e) => {
                    return vec![Problem::new(
                        at!["ingest", "netns"],
                        format!("ingest.netns {ns:?}: {e}"),
                    )];
                }
            },
            None => (lookup(), "in the ingest namespace".to_owned()),
        };
        names
            .into_iter()
            .zip(missing)
            .filter_map(|((at, name), err)| {
                err.map(|_| Problem::new(at, format!("interface {name:?} does not exist {where_}")))
            })
            .collect()
    }

    /// Every semantic problem, each with the key path of the value to blame.
    pub(super) fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        if let Some(why) = ifname_problem(&self.ingest.interface) {
            out.push(Problem::new(
                at!["ingest", "interface"],
                format!("ingest.interface {why}"),
            ));
        }
        if let Some(netns) = &self.ingest.netns
            && !netns_name_ok(netns)
        {
            out.push(Problem::new(
                at!["ingest", "netns"],
                format!("ingest.netns {netns:?} is not a network namespace name"),
            ));
        }
        daemon_problems(&self.daemon, &mut out);
        if let Some(cluster) = &self.cluster {
            cluster_problems(cluster, &mut out);
        }
        let mut encoder_names = HashMap::new();
        for (i, encoder) in self.encoders.iter().enumerate() {
            if let Some(&first) = encoder_names.get(encoder.name.as_str()) {
                out.push(
                    Problem::new(
                        at!["encoder", i, "name"],
                        format!("duplicate encoder name {:?}", encoder.name),
                    )
                    .first(at!["encoder", first, "name"]),
                );
            } else {
                encoder_names.insert(encoder.name.as_str(), i);
            }
            encoder_problems(i, encoder, &mut out);
            health_problems(self, i, encoder, &mut out);
        }
        // Every interface nsfail attaches to or makes is its own: two encoders on one veth
        // (or a managed encoder's generated name, `nf-` + 10 characters of its name, meeting
        // another's) would share one TC link and one DEVMAP slot, and removing one would
        // take the other's veth.
        let mut interfaces: HashMap<String, (Vec<Seg>, String)> = HashMap::new();
        interfaces.insert(
            self.ingest.interface.clone(),
            (at!["ingest", "interface"], "the ingest interface".into()),
        );
        for (i, encoder) in self.encoders.iter().enumerate() {
            let Some(ifname) = encoder.host_interface() else {
                continue;
            };
            let here = if encoder.interface.is_some() {
                at!["encoder", i, "interface"]
            } else {
                at!["encoder", i, "name"]
            };
            match interfaces.get(&ifname) {
                Some((first, owner)) => out.push(
                    Problem::new(
                        here,
                        format!(
                            "encoder {:?}'s interface {ifname:?} is already {owner}",
                            encoder.name
                        ),
                    )
                    .first(first.clone()),
                ),
                None => {
                    interfaces.insert(ifname, (here, format!("encoder {:?}'s", encoder.name)));
                }
            }
        }
        let mut lookup = Lookup::of_encoders(&self.encoders);
        for (i, channel) in self.channels.iter().enumerate() {
            self.channel_problems(i, channel, &lookup, &mut out);
            lookup.insert_channel(&self.encoders, &self.channels, i);
        }
        out
    }
}

/// The problems of a channel's `sources` (each of the listen address's family) and
/// `srt_peer_limit` (1 to [`SRT_PEER_LIMIT_MAX`]).
fn source_problems(i: usize, channel: &Channel, out: &mut Vec<Problem>) {
    let name = &channel.name;
    let listen = channel.listen;
    for (j, net) in channel.sources.iter().enumerate() {
        if net.addr.is_ipv4() != listen.is_ipv4() {
            out.push(Problem::new(
                at!["channel", i, "sources", j],
                format!(
                    "channel {name:?} listens on {} {listen} but source {net} is {}",
                    family(listen.ip()),
                    family(net.addr)
                ),
            ));
        }
    }
    if let Some(limit) = channel.srt_peer_limit
        && !(1..=SRT_PEER_LIMIT_MAX as u32).contains(&limit)
    {
        out.push(Problem::new(
            at!["channel", i, "srt_peer_limit"],
            format!("channel {name:?}: srt_peer_limit {limit} must be 1 to {SRT_PEER_LIMIT_MAX}"),
        ));
    }
}

fn daemon_problems(d: &DaemonSettings, out: &mut Vec<Problem>) {
    if d.events_max_bytes < MIN_EVENTS_MAX_BYTES {
        out.push(Problem::new(
            at!["daemon", "events_max_bytes"],
            format!(
                "daemon.events_max_bytes {} is below the minimum {MIN_EVENTS_MAX_BYTES}",
                d.events_max_bytes
            ),
        ));
    }
    if d.events_keep > MAX_EVENTS_KEEP {
        out.push(Problem::new(
            at!["daemon", "events_keep"],
            format!(
                "daemon.events_keep {} is above the maximum {MAX_EVENTS_KEEP}",
                d.events_keep
            ),
        ));
    }
    if let Some(group) = &d.socket_group
        && (group.is_empty() || group.contains(['\0', ':']))
    {
        out.push(Problem::new(
            at!["daemon", "socket_group"],
            format!("daemon.socket_group {group:?} is not a group name or ID"),
        ));
    }
}

impl Config {
    /// The problems of channel `channel` as the `i`th of this config, checked against the
    /// channels before it (as `lookup` has them): each check looks names and addresses up, so
    /// checking every channel of a config is linear in their number.
    pub(super) fn channel_problems(
        &self,
        i: usize,
        channel: &Channel,
        lookup: &Lookup,
        out: &mut Vec<Problem>,
    ) {
        let name = &channel.name;
        if let Some(why) = name_problem(name) {
            out.push(Problem::new(
                at!["channel", i, "name"],
                format!("channel name {name:?} {why}"),
            ));
        }
        if let Some(first) = lookup.channel(&self.channels, name) {
            out.push(
                Problem::new(
                    at!["channel", i, "name"],
                    format!("duplicate channel name {name:?}"),
                )
                .first(at!["channel", first, "name"]),
            );
        }
        let listen = channel.listen;
        if listen.port() == 0 {
            out.push(Problem::new(
                at!["channel", i, "listen"],
                format!("channel {name:?}: port 0 is not a valid listen port"),
            ));
        }
        if !is_unicast(listen.ip()) {
            out.push(Problem::new(
                at!["channel", i, "listen"],
                format!(
                    "channel {name:?}: listen address {} is not a unicast address",
                    listen.ip()
                ),
            ));
        }
        if let Some(first) = lookup.listen(&self.channels, listen) {
            let first: &Channel = &self.channels[first];
            out.push(Problem::new(
                at!["channel", i, "listen"],
                format!(
                    "ingest address {listen} is used by channels {:?} and {name:?}",
                    first.name
                ),
            ));
        }
        source_problems(i, channel, out);
        if channel.port == Some(0) {
            out.push(Problem::new(
                at!["channel", i, "port"],
                format!("channel {name:?}: port 0 is not a valid encoder-side port"),
            ));
        }
        if channel.encoders.is_empty() {
            out.push(Problem::new(
                at!["channel", i, "encoders"],
                format!("channel {name:?} has no encoders"),
            ));
        }
        self.member_problems(i, channel, lookup, out);
    }

    /// The problems of a channel's encoder list: unknown, listed twice, of the other address
    /// family, or receiving another channel on the same port.
    fn member_problems(
        &self,
        i: usize,
        channel: &Channel,
        lookup: &Lookup,
        out: &mut Vec<Problem>,
    ) {
        let name = &channel.name;
        let listen = channel.listen;
        let port = channel.encoder_port();
        // A clash is blamed on the value that set the encoder-side port.
        let port_at = if channel.port.is_some() {
            at!["channel", i, "port"]
        } else {
            at!["channel", i, "listen"]
        };
        for (j, encoder_name) in channel.encoders.iter().enumerate() {
            let entry = at!["channel", i, "encoders", j];
            if channel.encoders[..j].contains(encoder_name) {
                out.push(Problem::new(
                    entry,
                    format!("channel {name:?} lists encoder {encoder_name:?} twice"),
                ));
                continue;
            }
            let Some(encoder) = lookup.encoder(encoder_name).map(|e| &self.encoders[e]) else {
                out.push(Problem::new(
                    entry,
                    format!("channel {name:?} names unknown encoder {encoder_name:?}"),
                ));
                continue;
            };
            if encoder.address.is_ipv4() != listen.is_ipv4() {
                out.push(Problem::new(
                    entry,
                    format!(
                        "channel {name:?} listens on {} {listen} but encoder \
                         {encoder_name:?} has {} address {}",
                        family(listen.ip()),
                        family(encoder.address),
                        encoder.address
                    ),
                ));
                continue;
            }
            if port == 0 {
                continue;
            }
            if let Some((other, other_encoder)) =
                lookup.reply_key(&self.encoders, &self.channels, encoder.address, port)
                && other != i
            {
                let other = &self.channels[other].name;
                let other_encoder = &self.encoders[other_encoder].name;
                let message = if other_encoder == encoder_name {
                    format!(
                        "encoder {encoder_name:?} would receive channels {other:?} and \
                         {name:?} on the same port {port}, so their replies could not \
                         be told apart: give one of them another `port`"
                    )
                } else {
                    format!(
                        "encoders {other_encoder:?} (channel {other:?}) and \
                         {encoder_name:?} (channel {name:?}) share address {} and \
                         port {port}, so their replies could not be told apart: give \
                         one channel another `port`",
                        encoder.address
                    )
                };
                out.push(Problem::new(port_at.clone(), message));
            }
        }
    }
}
