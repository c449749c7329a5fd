//! The TOML configuration: ingest NIC, encoders and channels, checked before anything is touched.
//!
//! [`Config::parse`] runs two passes. Serde catches syntax, wrong types and unknown or missing
//! keys; [`Config::validate`]'s semantic checks catch what serde cannot (unknown or duplicate
//! names, port clashes, health checks missing what they need). Every error from `parse` reads
//! `ORIGIN:LINE:COL: message`: serde errors carry a byte span, and semantic problems name the
//! offending value by its key path, which is looked up in the document's spans
//! ([`toml::de::DeTable`]).
//!
//! ```toml
//! [ingest]
//! interface = "eth0"
//!
//! [[encoder]]
//! name = "enc-a"
//! address = "10.200.1.2"
//! health = { kind = "udp", port = 9000 }
//!
//! [[channel]]
//! name = "cam1"
//! listen = "10.200.0.1:5000"
//! encoders = ["enc-a"]
//! ```

use std::{
    collections::HashMap,
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::Range,
    path::Path,
};

use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
use toml::de::{DeTable, DeValue};

pub use crate::dataplane::{
    XdpMode,
    policy::{AllowProto, AllowRule, AllowRuleError},
};

/// A key path, e.g. `at!["channel", 2, "encoders", 0]`.
macro_rules! at {
    ($($seg:expr),* $(,)?) => {
        vec![$(Seg::from($seg)),*]
    };
}

/// Longest encoder or channel name, in bytes: names travel NUL-terminated in 32-byte map fields.
pub const MAX_NAME_LEN: usize = 31;

/// Where Prometheus metrics are served unless `ingest.metrics` says otherwise.
pub const DEFAULT_METRICS: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 1), 9464));

/// Failback hold-down unless a channel sets `hold_down_ms`.
pub const DEFAULT_HOLD_DOWN_MS: u64 = 10_000;

/// Longest Linux interface name (IFNAMSIZ minus the NUL).
const MAX_IFNAME_LEN: usize = 15;

/// A whole nsfail configuration file.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub ingest: Ingest,
    #[serde(rename = "encoder", default, skip_serializing_if = "Vec::is_empty")]
    pub encoders: Vec<Encoder>,
    #[serde(rename = "channel", default, skip_serializing_if = "Vec::is_empty")]
    pub channels: Vec<Channel>,
}

/// `[ingest]`: the NIC that receives contribution streams.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Ingest {
    /// The XDP program attaches here.
    pub interface: String,
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// The Prometheus endpoint (port 0 is accepted: an ephemeral port, for tests).
    #[serde(default = "default_metrics", deserialize_with = "socket_addr_from_str")]
    pub metrics: SocketAddr,
    /// The network namespace the ingest interface lives in, when not the daemon's own (the
    /// lab's ingest host): the daemon moves into it before anything else.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
}

/// `[[encoder]]`: a receiver of channels.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Encoder {
    pub name: String,
    /// Where the encoder receives.
    #[serde(deserialize_with = "ip_addr_from_str")]
    pub address: IpAddr,
    /// Host side of its veth for a local encoder; `None` for a remote one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Its network namespace (local encoder); exec probes run inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// MAC override, `"aa:bb:cc:dd:ee:ff"`; normally learnt from the link or the neighbour table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// What it may reach besides replying to sources, in [`AllowRule`] syntax.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    #[serde(default)]
    pub health: Health,
    /// A managed encoder: nsfail makes its namespace, veth, addresses and routes, and runs
    /// this command inside as a supervised child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn: Option<Spawn>,
    /// Managed encoders: what to do when the command exits.
    #[serde(default)]
    pub restart: Restart,
    /// Managed encoders: the prefix length of the veth link (default 30 for IPv4, 126 for
    /// IPv6); the host side takes the link's first address, the encoder `address`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
}

/// `encoder.spawn`: the program a managed encoder runs.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spawn {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
}

/// `encoder.restart`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Restart {
    /// Restart with backoff whenever it exits.
    #[default]
    Always,
    Never,
}

/// `encoder.health`: how an encoder is judged alive.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Health {
    pub kind: HealthKind,
    /// Probe port (udp, tcp).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Probe URL (http); a 2xx status is healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Program and arguments (exec), run inside the encoder's netns; exit 0 is healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    /// Consecutive successes that make a down encoder healthy.
    pub rise: u32,
    /// Consecutive failures that make a healthy encoder down.
    pub fall: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            kind: HealthKind::default(),
            port: None,
            url: None,
            command: None,
            interval_ms: 100,
            timeout_ms: 100,
            rise: 3,
            fall: 3,
        }
    }
}

/// `encoder.health.kind`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// UDP echo on `port`.
    #[default]
    Udp,
    /// TCP connect to `port`.
    Tcp,
    /// HTTP GET of `url`.
    Http,
    /// `command` inside the encoder's namespace.
    Exec,
    /// Data-plane liveness: the channel's input moves, so the encoder's output must too.
    Flow,
}

/// `[[channel]]`: one contribution stream.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    pub name: String,
    /// The ingest address the sender is given.
    #[serde(deserialize_with = "socket_addr_from_str")]
    pub listen: SocketAddr,
    /// Priority order: the first is primary, the rest are backups.
    pub encoders: Vec<String>,
    /// Encoder-side port; see [`Channel::encoder_port`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub failback: Failback,
    #[serde(default = "default_hold_down_ms")]
    pub hold_down_ms: u64,
    #[serde(default)]
    pub protocol: Protocol,
}

/// `channel.failback`: what happens once a channel's primary is healthy again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// Stay on the backup until an operator remaps.
    #[default]
    Manual,
    /// Move back after the primary has stayed healthy for `hold_down_ms`.
    Auto,
}

/// `channel.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Udp,
    /// Two-way: the encoder's handshake, ACK and NAK go back to the sender.
    Srt,
}

/// Lowercase TOML spelling of config enums, for messages and tables.
macro_rules! toml_names {
    ($ty:ty { $($variant:ident => $name:literal),* $(,)? }) => {
        impl $ty {
            /// The value as written in the config file.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $name,)*
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

toml_names!(HealthKind {
    Udp => "udp",
    Tcp => "tcp",
    Http => "http",
    Exec => "exec",
    Flow => "flow",
});
toml_names!(Failback { Manual => "manual", Auto => "auto" });
toml_names!(Protocol { Udp => "udp", Srt => "srt" });

impl Encoder {
    /// Local encoders sit behind a veth of this host; remote ones are reached through the
    /// ingest NIC.
    pub fn is_local(&self) -> bool {
        self.interface.is_some() || self.spawn.is_some()
    }

    /// The host-side veth of a local encoder: configured, or derived for a managed one
    /// (`nf-` and the name's first 10 bytes).
    pub fn host_interface(&self) -> Option<String> {
        self.interface.clone().or_else(|| {
            self.spawn.as_ref().map(|_| {
                let short: String = self.name.chars().take(10).collect();
                format!("nf-{short}")
            })
        })
    }

    /// The namespace of a local encoder: configured, or `nsf-<name>` for a managed one.
    pub fn namespace(&self) -> Option<String> {
        self.netns
            .clone()
            .or_else(|| self.spawn.as_ref().map(|_| format!("nsf-{}", self.name)))
    }

    /// A managed encoder's link prefix length.
    pub fn link_prefix(&self) -> u8 {
        self.prefix
            .unwrap_or(if self.address.is_ipv4() { 30 } else { 126 })
    }

    /// The MAC override as bytes: `None` when there is none (or it is malformed, which
    /// [`Config::validate`] rejects).
    pub fn mac_bytes(&self) -> Option<[u8; 6]> {
        self.mac.as_deref().and_then(parse_mac)
    }

    /// The allow-list, parsed.
    pub fn allow_rules(&self) -> Result<Vec<AllowRule>, AllowRuleError> {
        self.allow.iter().map(|rule| rule.parse()).collect()
    }
}

impl Channel {
    /// The UDP port the channel's encoders receive on: `port`, or the listen port.
    pub fn encoder_port(&self) -> u16 {
        self.port.unwrap_or(self.listen.port())
    }
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A place in the config file: 1-based line and column (in characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

/// A config that cannot be used. Displays as one line, `ORIGIN:LINE:COL: message` when the
/// place is known.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{origin}: cannot read: {source}")]
    Read { origin: String, source: io::Error },
    /// Not TOML, a wrong type, an unknown or missing key.
    #[error("{}{message}", prefix(Some(.origin), .location))]
    Syntax {
        origin: String,
        location: Option<Location>,
        message: String,
    },
    /// Well-formed but wrong: a dangling or duplicate name, a port clash, a missing probe
    /// setting. `origin` and `location` are `None` for a config built in code.
    #[error("{}{message}", prefix(.origin.as_ref(), .location))]
    Invalid {
        origin: Option<String>,
        location: Option<Location>,
        message: String,
    },
}

impl ConfigError {
    /// Where in the file, when known.
    pub fn location(&self) -> Option<Location> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { location, .. } | Self::Invalid { location, .. } => *location,
        }
    }
}

fn prefix(origin: Option<&String>, location: &Option<Location>) -> String {
    match (origin, location) {
        (Some(origin), Some(at)) => format!("{origin}:{}:{}: ", at.line, at.column),
        (Some(origin), None) => format!("{origin}: "),
        (None, _) => String::new(),
    }
}

impl Config {
    /// Parses and validates a config; `origin` (usually the file name) prefixes every error.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        Self::parse_with(text, origin, |_| Vec::new())
    }

    /// As [`Config::parse`], and checks the config against this host too: the ingest
    /// interface and every local encoder's `interface` (managed encoders' are made by nsfail)
    /// must exist in the ingest namespace. What `nsfail check` and `nsfail run` read.
    pub fn load_for_host(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            origin: origin.clone(),
            source,
        })?;
        Self::parse_with(&text, &origin, Config::host_problems)
    }

    /// Interfaces the config names that this host does not have, looked up inside
    /// `ingest.netns` when it is set (read-only: nothing is changed).
    fn host_problems(&self) -> Vec<Problem> {
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

    fn parse_with(
        text: &str,
        origin: &str,
        host: impl FnOnce(&Config) -> Vec<Problem>,
    ) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            origin: origin.to_owned(),
            location: e.span().map(|span| location(text, span.start)),
            message: one_line(e.message()),
        })?;
        let mut problems = config.problems();
        if problems.is_empty() {
            problems = host(&config);
        }
        if problems.is_empty() {
            return Ok(config);
        }
        // Serde has just parsed the same text, so this parse succeeds; were it to fail, the
        // error would merely lack a location.
        let doc = DeTable::parse(text)
            .map(|doc| DeValue::Table(doc.into_inner()))
            .ok();
        let locate = |path: &[Seg]| {
            doc.as_ref()
                .map(|doc| location(text, span_of(doc, path).start))
        };
        // The first problem in the file, as a compiler would report it.
        let problem = problems
            .into_iter()
            .min_by_key(|p| locate(&p.at).map(|at| (at.line, at.column)))
            .expect("not empty");
        let mut message = problem.message;
        if let Some(first) = problem.first.as_deref().and_then(locate) {
            message.push_str(&format!(" (first at line {})", first.line));
        }
        Err(ConfigError::Invalid {
            origin: Some(origin.to_owned()),
            location: locate(&problem.at),
            message,
        })
    }

    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let origin = path.display().to_string();
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            origin: origin.clone(),
            source,
        })?;
        Self::parse(&text, &origin)
    }

    /// The config as TOML that [`Config::parse`] reads back to an equal value.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("every Config field has a TOML form")
    }

    /// The semantic checks of [`Config::parse`], for a config built or changed in code. The
    /// error has no origin or location; the first problem found is reported.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self.problems().into_iter().next() {
            None => Ok(()),
            Some(problem) => Err(ConfigError::Invalid {
                origin: None,
                location: None,
                message: problem.message,
            }),
        }
    }

    pub fn encoder(&self, name: &str) -> Option<&Encoder> {
        self.encoders.iter().find(|e| e.name == name)
    }

    pub fn channel(&self, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.name == name)
    }

    /// Every semantic problem, each with the key path of the value to blame.
    fn problems(&self) -> Vec<Problem> {
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
        let mut channel_names = HashMap::new();
        let mut listens = HashMap::new();
        // (encoder address, encoder-side port) -> (channel index, encoder): the key the return
        // path tells replies apart by.
        let mut reply_keys: HashMap<(IpAddr, u16), (usize, &str)> = HashMap::new();
        for (i, channel) in self.channels.iter().enumerate() {
            let name = &channel.name;
            if let Some(why) = name_problem(name) {
                out.push(Problem::new(
                    at!["channel", i, "name"],
                    format!("channel name {name:?} {why}"),
                ));
            }
            if let Some(&first) = channel_names.get(name.as_str()) {
                out.push(
                    Problem::new(
                        at!["channel", i, "name"],
                        format!("duplicate channel name {name:?}"),
                    )
                    .first(at!["channel", first, "name"]),
                );
            } else {
                channel_names.insert(name.as_str(), i);
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
            if let Some(&first) = listens.get(&listen) {
                let first: &Channel = &self.channels[first];
                out.push(Problem::new(
                    at!["channel", i, "listen"],
                    format!(
                        "ingest address {listen} is used by channels {:?} and {name:?}",
                        first.name
                    ),
                ));
            } else {
                listens.insert(listen, i);
            }
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
                let Some(encoder) = self.encoder(encoder_name) else {
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
                match reply_keys.get(&(encoder.address, port)) {
                    Some(&(other, other_encoder)) if other != i => {
                        let other = &self.channels[other].name;
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
                    Some(_) => {}
                    None => {
                        reply_keys.insert((encoder.address, port), (i, encoder_name));
                    }
                }
            }
        }
        out
    }
}

fn encoder_problems(i: usize, encoder: &Encoder, out: &mut Vec<Problem>) {
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
    health_problems(i, encoder, out);
}

fn health_problems(i: usize, encoder: &Encoder, out: &mut Vec<Problem>) {
    let name = &encoder.name;
    let health = &encoder.health;
    let kind = health.kind;
    let mut push = |key: &'static str, message: String| {
        out.push(Problem::new(
            at!["encoder", i, "health", key],
            format!("encoder {name:?}: {message}"),
        ));
    };
    match kind {
        HealthKind::Udp | HealthKind::Tcp => match health.port {
            None => push(
                "kind",
                format!(
                    "health kind \"{kind}\" needs a port (health = {{ kind = \"{kind}\", port = N }})"
                ),
            ),
            Some(0) => push("port", "port 0 is not a valid health-check port".into()),
            Some(_) => {}
        },
        HealthKind::Http => match health.url.as_deref() {
            None => push(
                "kind",
                "health kind \"http\" needs a url (url = \"http://HOST:PORT/PATH\")".into(),
            ),
            Some(url) if !url.starts_with("http://") || url.len() == "http://".len() => push(
                "url",
                format!("health url {url:?} must start with http:// and name a host"),
            ),
            Some(_) => {}
        },
        HealthKind::Exec => {
            if health
                .command
                .as_ref()
                .is_none_or(|c| c.first().is_none_or(|program| program.is_empty()))
            {
                push(
                    "command",
                    "health kind \"exec\" needs a non-empty command (command = [\"PROGRAM\", \
                     \"ARG\"])"
                        .into(),
                );
            }
        }
        HealthKind::Flow => {}
    }
    let unused = [
        (
            "port",
            health.port.is_some(),
            matches!(kind, HealthKind::Udp | HealthKind::Tcp),
        ),
        ("url", health.url.is_some(), kind == HealthKind::Http),
        (
            "command",
            health.command.is_some(),
            kind == HealthKind::Exec,
        ),
    ];
    for (key, set, used) in unused {
        if set && !used {
            push(key, format!("health kind \"{kind}\" does not use `{key}`"));
        }
    }
    for (key, value) in [
        ("interval_ms", health.interval_ms),
        ("timeout_ms", health.timeout_ms),
        ("rise", u64::from(health.rise)),
        ("fall", u64::from(health.fall)),
    ] {
        if value == 0 {
            push(key, format!("health {key} must be at least 1"));
        }
    }
    // With a zero interval the problem is the interval, reported above.
    if health.interval_ms > 0 && health.timeout_ms > health.interval_ms {
        push(
            "timeout_ms",
            format!(
                "health timeout_ms ({}) must not exceed interval_ms ({}): one probe at a time",
                health.timeout_ms, health.interval_ms
            ),
        );
    }
}

/// Why `name` cannot name an encoder or channel.
fn name_problem(name: &str) -> Option<String> {
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
fn ifname_problem(name: &str) -> Option<String> {
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

fn is_unicast(ip: IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(Ipv4Addr::BROADCAST))
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
}

/// One step of a key path: a table key or an array index.
#[derive(Clone, Debug)]
enum Seg {
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
struct Problem {
    at: Vec<Seg>,
    message: String,
    /// For duplicates: the earlier occurrence, reported by line.
    first: Option<Vec<Seg>>,
}

impl Problem {
    fn new(at: Vec<Seg>, message: String) -> Self {
        Self {
            at,
            message,
            first: None,
        }
    }

    fn first(mut self, at: Vec<Seg>) -> Self {
        self.first = Some(at);
        self
    }
}

/// The span of the value at `path`, or of its nearest ancestor present in the document (a
/// defaulted key is blamed on the table that left it out).
fn span_of(doc: &DeValue<'_>, path: &[Seg]) -> Range<usize> {
    let mut value = doc;
    let mut span = 0..0;
    for seg in path {
        let next = match seg {
            Seg::Key(key) => value.get(*key),
            Seg::Index(index) => value.get(*index),
        };
        match next {
            Some(next) => {
                span = next.span();
                value = next.get_ref();
            }
            None => break,
        }
    }
    span
}

fn location(text: &str, offset: usize) -> Location {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    }
}

fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

fn default_metrics() -> SocketAddr {
    DEFAULT_METRICS
}

fn default_hold_down_ms() -> u64 {
    DEFAULT_HOLD_DOWN_MS
}

fn socket_addr_from_str<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        D::Error::custom(format!(
            "invalid socket address {text:?}: expected IP:PORT, e.g. \"10.200.0.1:5000\" or \
             \"[fd00::1]:5000\""
        ))
    })
}

fn ip_addr_from_str<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
    let text = String::deserialize(d)?;
    text.parse().map_err(|_| {
        D::Error::custom(format!(
            "invalid IP address {text:?}: expected e.g. \"10.200.1.2\" or \"fd00::2\" (no port)"
        ))
    })
}

/// A name `ip netns` could have made: a plain file name under /run/netns.
fn netns_name_ok(name: &str) -> bool {
    !(name.is_empty() || name.contains('/') || name == "." || name == "..")
}

/// A managed encoder's address must leave room for the host side: the link's first address is
/// the host's, the encoder's must be another host address of the same link.
fn managed_address_problem(addr: IpAddr, prefix: u8) -> Option<String> {
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

/// For a managed encoder: its host part within the link, and the host side's address (the
/// link's first address).
pub fn managed_link(addr: IpAddr, prefix: u8) -> (u128, IpAddr) {
    match addr {
        IpAddr::V4(a) => {
            let v = u32::from(a);
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix))
            };
            let gw = std::net::Ipv4Addr::from((v & mask) + 1);
            (u128::from(v & !mask), IpAddr::V4(gw))
        }
        IpAddr::V6(a) => {
            let v = u128::from(a);
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix))
            };
            let gw = std::net::Ipv6Addr::from((v & mask) + 1);
            (v & !mask, IpAddr::V6(gw))
        }
    }
}
