//! The TOML configuration: ingest NIC, encoders and channels, checked before anything is touched.
//!
//! [`Config::parse`] runs two passes (the first, for a large file, in pieces: see `pieces`). Serde catches syntax, wrong types and unknown or missing
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
    collections::{BTreeMap, HashMap},
    fmt, fs, io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    ops::Range,
    path::Path,
};

use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
use toml::de::{DeTable, DeValue};

pub use crate::dataplane::{
    SRT_PEER_LIMIT_DEFAULT, SRT_PEER_LIMIT_MAX, SourcePrefix, XdpMode,
    policy::{AllowProto, AllowRule, AllowRuleError},
};

/// A key path, e.g. `at!["channel", 2, "encoders", 0]`.
macro_rules! at {
    ($($seg:expr),* $(,)?) => {
        vec![$(Seg::from($seg)),*]
    };
}

mod cluster;
mod error;
mod health;
mod lookup;
mod pieces;
mod problems;
mod request;
mod url;

use self::{cluster::*, error::*, problems::*};
pub use self::{
    cluster::{Cluster, DEFAULT_LEASE_S, MAX_LEASE_S, valid_name},
    error::{ConfigError, Location},
    health::{Check, HealthCheck, HealthProblem},
    lookup::Lookup,
    url::HttpUrl,
};
use crate::net::provision::{Plan, managed_link};

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
    #[serde(default, skip_serializing_if = "DaemonSettings::is_default")]
    pub daemon: DaemonSettings,
    /// `[cluster]` (issue 17): `None`, the default, is one host with no extra services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<Cluster>,
}

/// Where the events file is rotated unless `daemon.events_max_bytes` says otherwise.
pub const DEFAULT_EVENTS_MAX_BYTES: u64 = 10 << 20;
/// How many rotated events files are kept unless `daemon.events_keep` says otherwise.
pub const DEFAULT_EVENTS_KEEP: u32 = 5;
/// The smallest `daemon.events_max_bytes`: room for a few events.
pub const MIN_EVENTS_MAX_BYTES: u64 = 1024;
/// The most rotated events files `daemon.events_keep` may ask for.
pub const MAX_EVENTS_KEEP: u32 = 100;

/// `[daemon]`: the daemon's own files and its control socket.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSettings {
    /// A group (name or numeric ID) whose members may run the read-only socket commands
    /// (`status`, `events`); the socket is then mode 0660 with this group. Everything else is
    /// root's alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
    /// The events file is rotated (`.1`, `.2`, ...) before a line would take it past this.
    pub events_max_bytes: u64,
    /// How many rotated events files are kept.
    pub events_keep: u32,
}

impl Default for DaemonSettings {
    fn default() -> Self {
        Self {
            socket_group: None,
            events_max_bytes: DEFAULT_EVENTS_MAX_BYTES,
            events_keep: DEFAULT_EVENTS_KEEP,
        }
    }
}

impl DaemonSettings {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
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
    /// The daemon's log level; `RUST_LOG`, when set, wins. Changes on reload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_level: Option<LogLevel>,
}

/// `ingest.log_level`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl From<LogLevel> for log::LevelFilter {
    fn from(level: LogLevel) -> Self {
        match level {
            LogLevel::Error => Self::Error,
            LogLevel::Warn => Self::Warn,
            LogLevel::Info => Self::Info,
            LogLevel::Debug => Self::Debug,
            LogLevel::Trace => Self::Trace,
        }
    }
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
    /// The environment of the commands nsfail runs for this encoder (its `spawn` command, its
    /// `exec` probe): nothing is inherited from the daemon; `PATH` defaults to the system's
    /// usual directories.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
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
    /// Probe port (udp, tcp, srt; an `srt` check defaults to the SRT port of the one SRT
    /// channel port the encoder serves).
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
    /// The SRT listener itself: an induction handshake while idle, its session while live.
    Srt,
}

/// `[[channel]]`: one contribution stream.
#[derive(Clone, Debug, PartialEq, Hash, Deserialize, Serialize)]
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
    /// Only packets from these prefixes (`"203.0.113.0/24"`, `"2001:db8::/32"`, or one
    /// address) are forwarded; others pass to the host untouched and are counted
    /// (`pass_not_source`). Empty (the default): from anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourcePrefix>,
    /// SRT channels: how many callers the data plane remembers (and tells to reconnect on a
    /// failover), 1 to 16; see [`Channel::srt_peer_limit`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srt_peer_limit: Option<u32>,
}

/// `channel.failback`: what happens once a channel's primary is healthy again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    /// Stay on the backup until an operator remaps.
    #[default]
    Manual,
    /// Move back after the primary has stayed healthy for `hold_down_ms`.
    Auto,
}

/// `channel.protocol`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Deserialize, Serialize)]
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
    Srt => "srt",
});
toml_names!(Failback { Manual => "manual", Auto => "auto" });
toml_names!(Protocol { Udp => "udp", Srt => "srt" });

impl Encoder {
    /// What a managed encoder's namespace and veth are made of (`None` for any other).
    pub fn provision_plan(&self) -> Option<Plan> {
        self.spawn.as_ref()?;
        let prefix = self.link_prefix();
        Some(Plan {
            encoder: self.name.clone(),
            netns: self.namespace()?,
            host_if: self.host_interface()?,
            addr: self.address,
            prefix,
            gateway: managed_link(self.address, prefix).1,
        })
    }

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

    /// SRT callers remembered: `srt_peer_limit`, or [`SRT_PEER_LIMIT_DEFAULT`].
    pub fn srt_peer_limit(&self) -> u32 {
        self.srt_peer_limit.unwrap_or(SRT_PEER_LIMIT_DEFAULT)
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

    fn parse_with(
        text: &str,
        origin: &str,
        host: impl FnOnce(&Config) -> Vec<Problem>,
    ) -> Result<Self, ConfigError> {
        let config: Config = match pieces::parse(text, pieces::CHANNELS_PER_PIECE) {
            Some(config) => config,
            None => toml::from_str(text).map_err(|e| ConfigError::Syntax {
                origin: origin.to_owned(),
                location: e.span().map(|span| location(text, span.start)),
                message: one_line(e.message()),
            })?,
        };
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
