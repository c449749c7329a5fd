//! The control socket's protocol, shared by the daemon and the CLI: one JSON object per line
//! each way. Every request carries the protocol version `v`; the daemon answers requests of
//! another version with an error rather than guessing.

use std::{net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

pub const VERSION: u32 = 1;
/// Requests longer than this are refused (and the connection closed).
pub const MAX_REQUEST: usize = 64 * 1024;
/// How long a client waits for the daemon.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    Status,
    Remap {
        channel: String,
        encoder: String,
    },
    Drain {
        encoder: String,
    },
    Undrain {
        encoder: String,
    },
    /// `drain host`: withdraw this cluster host's anycast routes (`drained`), or announce
    /// them again (`undrain host`).
    DrainHost {
        drained: bool,
    },
    AddChannel {
        channel: NewChannel,
    },
    AddEncoder {
        encoder: NewEncoder,
    },
    RemoveChannel {
        name: String,
    },
    RemoveEncoder {
        name: String,
    },
    Events,
    /// Re-read the config file the daemon was started with and apply the difference.
    Reload,
}

/// `add channel`: a channel as the client states it. The daemon turns it into a config
/// channel with the config's own parser (`config::Channel::try_from`), so the rules (and the
/// defaults) are the config file's; the field names are its keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewChannel {
    pub name: String,
    /// `IP:PORT`.
    pub listen: String,
    pub encoders: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `manual` | `auto`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failback: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_down_ms: Option<u64>,
    /// `udp` | `srt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Prefixes (`203.0.113.0/24`) or addresses the channel forwards from; empty: anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    /// SRT callers remembered, 1 to 16.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srt_peer_limit: Option<u32>,
}

/// `add encoder` and `encoder spawn`: an encoder as the client states it (see
/// [`NewChannel`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEncoder {
    pub name: String,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// The health check as the config's `health` table (its keys and values); absent: the
    /// config's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spawn: Option<NewSpawn>,
    /// `always` | `never`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<u8>,
}

/// A managed encoder's command.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewSpawn {
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Request {
    pub v: u32,
    #[serde(flatten)]
    pub command: Command,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The answer, as JSON text: serialized once by the daemon and parsed once by the client
    /// (a `status` of 100,000 channels is tens of MB; no tree of values is built on the way).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Box<serde_json::value::RawValue>>,
}

impl Response {
    pub fn ok(data: impl Serialize) -> Self {
        Self {
            ok: true,
            error: None,
            data: serde_json::value::to_raw_value(&data).ok(),
        }
    }

    pub fn error(msg: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(msg.into()),
            data: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub channels: Vec<ChannelStatus>,
    pub encoders: Vec<EncoderStatus>,
    /// A cluster host's view of its cluster (absent without `[cluster]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterView>,
}

/// `status`'s cluster part: this host, the leader, etcd.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    pub name: String,
    pub host: String,
    /// The leader as the election says (`None`: none now, or etcd unreachable).
    pub leader: Option<String>,
    /// Whether this host is the leader.
    pub leading: bool,
    /// Whether this host reaches etcd now.
    pub etcd: bool,
    /// Whether `nsfail drain host` withdrew this host's anycast routes.
    #[serde(default)]
    pub drained: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChannelStatus {
    pub name: String,
    pub listen: SocketAddr,
    /// The active encoder's name.
    pub active: Option<String>,
    /// Priority order: primary first.
    pub encoders: Vec<String>,
    pub port: u16,
    pub protocol: String,
    pub failback: String,
    /// Input packets and bytes (IP bytes) since the channel was created.
    pub packets: u64,
    pub bytes: u64,
    /// Milliseconds since the last input packet; `None` when none was seen.
    pub idle_ms: Option<u64>,
    /// SRT channels: the callers seen, with the socket ID their listener addresses them by.
    #[serde(default)]
    pub srt_peers: Vec<SrtPeerStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SrtPeerStatus {
    pub caller: SocketAddr,
    pub socket_id: u32,
    /// Milliseconds since the return path last refreshed it (refreshed about once a second
    /// while the session lives).
    pub idle_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EncoderStatus {
    pub name: String,
    /// A cluster host's view: the host the encoder belongs to (absent without `[cluster]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    pub address: String,
    pub local: bool,
    pub healthy: bool,
    pub drained: bool,
    /// Local encoders: whether its interface takes XDP-redirected frames (`None`: a remote
    /// encoder, or not checked yet); an encoder that cannot receive is not healthy.
    #[serde(default)]
    pub can_receive: Option<bool>,
    /// Why it can or cannot receive.
    #[serde(default)]
    pub receive: Option<String>,
    /// Channel packets forwarded to it: handed to its device and not refused by the kernel.
    pub packets: u64,
    /// Bytes XDP handed to its device (refused frames included).
    pub bytes: u64,
    /// Channel packets redirected to its device that the kernel refused (also in `drops`).
    #[serde(default)]
    pub redirect_failed: u64,
    /// Replies from it returned to sources.
    pub replies: u64,
    /// Packets leaving it that were dropped, all reasons.
    pub drops: u64,
    /// Channels for which it is active.
    pub active_for: Vec<String>,
    /// Its health check's kind and period, as configured now (a reload changes them).
    #[serde(default)]
    pub health_kind: String,
    #[serde(default)]
    pub health_interval_ms: u64,
}

/// What a reload did (`nsfail reload`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    /// One entry per object changed, in the order applied: `channel cam3 added`.
    pub changes: Vec<String>,
    /// Settings changed in the file that take effect at the next start only (they keep their
    /// running values): `ingest.interface`.
    #[serde(default)]
    pub at_restart: Vec<String>,
}

/// A decision or observation: `from`/`to` are encoder names.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// RFC 3339, UTC.
    pub time: String,
    pub channel: Option<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub reason: String,
    /// For a finished failover: the old encoder's last sign of life (last reply or successful
    /// probe) to the new encoder's first packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switchover_ms: Option<f64>,
    /// SRT channels: how many callers were sent a SHUTDOWN so that they reconnect to the
    /// encoder the channel now points to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub srt_reconnects: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {path}: {source} (is `nsfail run` running?)")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the daemon's answer is not understood: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends one request and reads its response.
pub async fn call(socket: &Path, command: Command) -> Result<Response, ClientError> {
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| ClientError::Connect {
                path: socket.display().to_string(),
                source,
            })?;
        let (read, mut write) = stream.into_split();
        let mut line = serde_json::to_vec(&Request {
            v: VERSION,
            command,
        })?;
        line.push(b'\n');
        write.write_all(&line).await?;
        let mut reader = BufReader::new(read);
        let mut answer = String::new();
        reader.read_line(&mut answer).await?;
        Ok(serde_json::from_str(&answer)?)
    };
    tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .map_err(|_| ClientError::Timeout(CLIENT_TIMEOUT))?
}
