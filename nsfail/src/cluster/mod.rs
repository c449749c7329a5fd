//! Shared state in etcd (issue 17, first part): the key layout under `/nsfail/<name>/`, what
//! each key holds, and the etcd calls the CLI and the daemon make.
//!
//! | key                                   | value (JSON)                              | lease      |
//! |---------------------------------------|-------------------------------------------|------------|
//! | `/nsfail/<name>/channels/<channel>`   | the channel, as `add channel` states it   | none       |
//! | `/nsfail/<name>/hosts/<host>`         | [`HostRecord`]                            | the host's |
//! | `/nsfail/<name>/encoders/<host>/<enc>`| [`EncoderRecord`]: definition and health  | the host's |
//! | `/nsfail/<name>/active/<channel>`     | [`ActiveRecord`]: the leader's choice     | none       |
//! | `/nsfail/<name>/leader/<lease>`       | a candidate's host name (etcd election)   | the host's |
//! | `/nsfail/<name>/callers/<channel>/<host>/<ip:port>` | [`CallerRecord`]: an SRT caller that host learned | the host's |
//!
//! Anything else under the prefix, or a value that does not decode, is foreign or corrupt:
//! reported and skipped, never applied.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    api::NewChannel,
    config::{self, Cluster},
};

pub mod cli;
pub mod store;

/// What a key under the cluster's prefix names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    Channel(String),
    Host(String),
    Encoder {
        host: String,
        encoder: String,
    },
    Active(String),
    /// A drained encoder (`nsfail drain` on the leader), whichever host it is on.
    Drain(String),
    /// A candidate's key in the leader election (etcd's election API writes it).
    Election,
    /// An SRT caller of a channel, learned by a host.
    Caller {
        channel: String,
        host: String,
        caller: SocketAddr,
    },
    /// Not nsfail's layout (or a bad name in it).
    Foreign,
}

pub fn channels_prefix(c: &Cluster) -> String {
    format!("{}channels/", c.prefix())
}

pub fn channel_key(c: &Cluster, name: &str) -> String {
    format!("{}channels/{name}", c.prefix())
}

pub fn host_key(c: &Cluster, host: &str) -> String {
    format!("{}hosts/{host}", c.prefix())
}

pub fn hosts_prefix(c: &Cluster) -> String {
    format!("{}hosts/", c.prefix())
}

pub fn encoder_key(c: &Cluster, host: &str, encoder: &str) -> String {
    format!("{}encoders/{host}/{encoder}", c.prefix())
}

pub fn active_key(c: &Cluster, channel: &str) -> String {
    format!("{}active/{channel}", c.prefix())
}

pub fn drain_key(c: &Cluster, encoder: &str) -> String {
    format!("{}drains/{encoder}", c.prefix())
}

pub fn callers_prefix(c: &Cluster) -> String {
    format!("{}callers/", c.prefix())
}

/// An SRT caller's key: `callers/<channel>/<host>/<ip:port>` (an IPv6 caller as `[ip]:port`).
pub fn caller_key(c: &Cluster, channel: &str, host: &str, caller: SocketAddr) -> String {
    format!("{}callers/{channel}/{host}/{caller}", c.prefix())
}

/// The election's name: candidates' keys are `<name>/<lease in hex>`.
pub fn election_name(c: &Cluster) -> String {
    format!("{}leader", c.prefix())
}

/// Classifies `key` (under the prefix `prefix`).
pub fn parse_key(prefix: &str, key: &str) -> Key {
    let Some(rest) = key.strip_prefix(prefix) else {
        return Key::Foreign;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let ok = |s: &str| config::valid_name(s);
    match parts.as_slice() {
        ["channels", name] if ok(name) => Key::Channel((*name).to_owned()),
        ["hosts", host] if ok(host) => Key::Host((*host).to_owned()),
        ["encoders", host, enc] if ok(host) && ok(enc) => Key::Encoder {
            host: (*host).to_owned(),
            encoder: (*enc).to_owned(),
        },
        ["active", name] if ok(name) => Key::Active((*name).to_owned()),
        ["drains", name] if ok(name) => Key::Drain((*name).to_owned()),
        ["callers", channel, host, caller] if ok(channel) && ok(host) => {
            match caller.parse::<SocketAddr>() {
                Ok(caller) => Key::Caller {
                    channel: (*channel).to_owned(),
                    host: (*host).to_owned(),
                    caller,
                },
                Err(_) => Key::Foreign,
            }
        }
        ["leader", lease] if !lease.is_empty() && lease.chars().all(|c| c.is_ascii_hexdigit()) => {
            Key::Election
        }
        _ => Key::Foreign,
    }
}

/// A channel's value: the JSON of [`NewChannel`], whose name must be the key's, and which must
/// make a valid channel by the config file's rules.
pub fn decode_channel(name: &str, value: &[u8]) -> Result<NewChannel, String> {
    let nc: NewChannel =
        serde_json::from_slice(value).map_err(|e| format!("not a channel definition: {e}"))?;
    if nc.name != name {
        return Err(format!(
            "the value names channel {:?}, the key {name:?}",
            nc.name
        ));
    }
    config::Channel::try_from(nc.clone()).map_err(|e| e.to_string())?;
    Ok(nc)
}

/// A config channel as etcd stores it.
pub fn encode_channel(ch: &config::Channel) -> NewChannel {
    let lower = |v: serde_json::Value| v.as_str().map(str::to_owned);
    NewChannel {
        name: ch.name.clone(),
        listen: ch.listen.to_string(),
        encoders: ch.encoders.clone(),
        port: ch.port,
        failback: serde_json::to_value(ch.failback).ok().and_then(lower),
        hold_down_ms: Some(ch.hold_down_ms),
        protocol: serde_json::to_value(ch.protocol).ok().and_then(lower),
        sources: ch.sources.iter().map(ToString::to_string).collect(),
        srt_peer_limit: ch.srt_peer_limit,
    }
}

/// `hosts/<host>`: a host that is up (the key lives as long as its lease).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    pub host: String,
    /// Its lease's ID.
    pub lease: i64,
    pub lease_s: u64,
    /// The daemon's process ID on its host.
    pub pid: u32,
    /// The MAC address of its ingest interface: where other hosts send a channel's packets
    /// for its encoders.
    pub mac: String,
}

/// `encoders/<host>/<encoder>`: a host's encoder, as its config defines it, and its health as
/// that host sees it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EncoderRecord {
    pub host: String,
    pub definition: config::Encoder,
    pub healthy: bool,
    pub drained: bool,
}

/// `drains/<encoder>`: an encoder kept off every channel until undrained, on every host and
/// across a change of leader (no lease: it outlives the host that wrote it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainRecord {
    pub encoder: String,
    /// The host that led when it was drained.
    pub by: String,
}

/// `active/<channel>`: the encoder the leader chose for a channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveRecord {
    pub encoder: String,
    /// The host that was leader when it wrote this.
    pub leader: String,
    /// Its term: the create revision of its key in the election.
    pub term: i64,
    /// Placed by hand (`remap`, `drain`): automatic failback leaves the channel where it is
    /// until its next automatic failover, on whichever host leads next. Absent in records
    /// written before it existed: automatic.
    #[serde(default)]
    pub manual: bool,
}

/// `callers/<channel>/<host>/<caller>`: an SRT caller of a channel that a host learned (its
/// data plane saw the caller's handshake accepted), with what a SHUTDOWN to it needs. The
/// host writes it under its own lease and deletes it when it forgets the caller, so that a
/// repoint tells the caller to reconnect even when the host that learned it is down.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CallerRecord {
    /// The channel's ingest address the caller sends to: the SHUTDOWN's source.
    pub listen: SocketAddr,
    /// The caller's SRT socket ID: the SHUTDOWN's Destination Socket ID.
    pub socket_id: u32,
}

/// One key of the cluster's prefix as read or watched, decoded: what a host applies, or why
/// it skips it.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// A channel's definition and the revision its key was created at (etcd's create
    /// revision, which a change of the definition keeps; 0 when not known): of two channels
    /// that collide, the older channel is the one a host without either running applies.
    PutChannel {
        channel: config::Channel,
        revision: i64,
    },
    DeleteChannel(String),
    PutHost(HostRecord),
    DeleteHost(String),
    PutEncoder(EncoderRecord),
    DeleteEncoder {
        host: String,
        encoder: String,
    },
    PutActive {
        channel: String,
        record: ActiveRecord,
    },
    DeleteActive(String),
    /// An encoder drained cluster-wide, and the host that led when it was drained.
    PutDrain {
        encoder: String,
        record: DrainRecord,
    },
    DeleteDrain(String),
    PutCaller {
        channel: String,
        host: String,
        caller: SocketAddr,
        record: CallerRecord,
    },
    DeleteCaller {
        channel: String,
        host: String,
        caller: SocketAddr,
    },
    /// A candidate of the election came or went (followed through etcd's election API).
    Election,
    /// Foreign or corrupt: reported and skipped, never applied.
    Bad {
        key: String,
        why: String,
    },
}

/// [`decode`] of a key etcd returned with the revision the key was created at.
pub fn decode_at(prefix: &str, key: &[u8], value: Option<&[u8]>, create_revision: i64) -> Change {
    match decode(prefix, key, value) {
        Change::PutChannel { channel, .. } => Change::PutChannel {
            channel,
            revision: create_revision,
        },
        other => other,
    }
}

/// Decodes a key under `prefix` and its value (`None`: the key was deleted).
pub fn decode(prefix: &str, key: &[u8], value: Option<&[u8]>) -> Change {
    let bad = |why: String| Change::Bad {
        key: String::from_utf8_lossy(key).into_owned(),
        why,
    };
    let Ok(key_text) = std::str::from_utf8(key) else {
        return bad("the key is not UTF-8".into());
    };
    match (parse_key(prefix, key_text), value) {
        (Key::Foreign, _) => bad("not a key of nsfail's layout".into()),
        (Key::Channel(name), None) => Change::DeleteChannel(name),
        (Key::Channel(name), Some(v)) => match decode_channel(&name, v)
            .and_then(|nc| config::Channel::try_from(nc).map_err(|e| e.to_string()))
        {
            Ok(channel) => Change::PutChannel {
                channel,
                revision: 0,
            },
            Err(why) => bad(why),
        },
        (Key::Host(host), None) => Change::DeleteHost(host),
        (Key::Host(host), Some(v)) => match serde_json::from_slice::<HostRecord>(v) {
            Ok(rec) if rec.host == host && config::parse_mac(&rec.mac).is_some() => {
                Change::PutHost(rec)
            }
            Ok(rec) => bad(format!(
                "host record of {:?} with MAC {:?} under the key of {host:?}",
                rec.host, rec.mac
            )),
            Err(e) => bad(format!("not a host record: {e}")),
        },
        (Key::Election, _) => Change::Election,
        (Key::Drain(encoder), None) => Change::DeleteDrain(encoder),
        (Key::Drain(encoder), Some(v)) => match serde_json::from_slice::<DrainRecord>(v) {
            Ok(record) if record.encoder == encoder => Change::PutDrain { encoder, record },
            Ok(record) => bad(format!(
                "the value names encoder {:?}, the key {encoder:?}",
                record.encoder
            )),
            Err(e) => bad(format!("not a drain record: {e}")),
        },
        (Key::Active(channel), None) => Change::DeleteActive(channel),
        (Key::Active(channel), Some(v)) => match serde_json::from_slice::<ActiveRecord>(v) {
            Ok(record) if config::valid_name(&record.encoder) => {
                Change::PutActive { channel, record }
            }
            Ok(record) => bad(format!("not an encoder name: {:?}", record.encoder)),
            Err(e) => bad(format!("not an active-encoder record: {e}")),
        },
        (
            Key::Caller {
                channel,
                host,
                caller,
            },
            None,
        ) => Change::DeleteCaller {
            channel,
            host,
            caller,
        },
        (
            Key::Caller {
                channel,
                host,
                caller,
            },
            Some(v),
        ) => match serde_json::from_slice::<CallerRecord>(v) {
            Ok(record) if record.listen.is_ipv4() == caller.is_ipv4() => Change::PutCaller {
                channel,
                host,
                caller,
                record,
            },
            Ok(record) => bad(format!(
                "caller {caller} of ingest address {}: not the same IP family",
                record.listen
            )),
            Err(e) => bad(format!("not an SRT caller record: {e}")),
        },
        (Key::Encoder { host, encoder }, None) => Change::DeleteEncoder { host, encoder },
        (Key::Encoder { host, encoder }, Some(v)) => {
            match serde_json::from_slice::<EncoderRecord>(v) {
                Ok(rec) if rec.host == host && rec.definition.name == encoder => {
                    Change::PutEncoder(rec)
                }
                Ok(rec) => bad(format!(
                    "encoder record of {}/{} under the key of {host}/{encoder}",
                    rec.host, rec.definition.name
                )),
                Err(e) => bad(format!("not an encoder record: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster() -> Cluster {
        let cfg = config::Config::parse(
            "[ingest]\ninterface = \"eth0\"\n[cluster]\nname = \"studio\"\nhost = \"h1\"\netcd = [\"http://127.0.0.1:2379\"]\n",
            "t",
        )
        .unwrap();
        cfg.cluster.unwrap()
    }

    #[test]
    fn keys_round_trip_and_foreign_keys_are_foreign() {
        let c = cluster();
        let p = c.prefix();
        assert_eq!(
            parse_key(&p, &channel_key(&c, "cam1")),
            Key::Channel("cam1".into())
        );
        assert_eq!(parse_key(&p, &host_key(&c, "h1")), Key::Host("h1".into()));
        assert_eq!(
            parse_key(&p, &drain_key(&c, "enc-a")),
            Key::Drain("enc-a".into())
        );
        let key = drain_key(&c, "enc-a");
        assert!(matches!(
            decode(&p, key.as_bytes(), Some(br#"{"encoder":"enc-a","by":"h1"}"#)),
            Change::PutDrain { encoder, record } if encoder == "enc-a" && record.by == "h1"
        ));
        assert!(matches!(
            decode(&p, key.as_bytes(), None),
            Change::DeleteDrain(e) if e == "enc-a"
        ));
        for bad in [
            &br#"{"encoder":"enc-b","by":"h1"}"#[..],
            b"{not json",
            b"{\"encoder\":\"enc-a\"}",
        ] {
            assert!(
                matches!(decode(&p, key.as_bytes(), Some(bad)), Change::Bad { .. }),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_key(&p, &encoder_key(&c, "h1", "enc-a")),
            Key::Encoder {
                host: "h1".into(),
                encoder: "enc-a".into()
            }
        );
        assert_eq!(
            parse_key(
                &p,
                &caller_key(&c, "cam1", "h1", "[2001:db8::7]:4000".parse().unwrap())
            ),
            Key::Caller {
                channel: "cam1".into(),
                host: "h1".into(),
                caller: "[2001:db8::7]:4000".parse().unwrap()
            }
        );
        for foreign in [
            "/nsfail/studio/callers/cam1/h1/nowhere",
            "/nsfail/studio/callers/cam1/h1",
            "/nsfail/studio/callers/cam1/bad host/10.0.0.9:4000",
            "/nsfail/studio/other/x",
            "/nsfail/studio/channels/",
            "/nsfail/studio/channels/a/b",
            "/nsfail/studio/channels/bad name",
            "/nsfail/studiox/channels/a",
            "/nsfail/studio/encoders/h1",
            "/nsfail/studio/drains/bad name",
            "/nsfail/studio/drains/a/b",
        ] {
            assert_eq!(parse_key(&p, foreign), Key::Foreign, "{foreign}");
        }
    }

    #[test]
    fn channels_decode_only_when_valid() {
        let cfg = config::Config::parse(
            "[ingest]\ninterface = \"eth0\"\n[[encoder]]\nname = \"e\"\naddress = \"10.0.0.2\"\nhealth = { kind = \"tcp\", port = 9 }\n[[channel]]\nname = \"cam1\"\nlisten = \"10.0.0.1:5000\"\nencoders = [\"e\"]\nprotocol = \"srt\"\nfailback = \"auto\"\nsources = [\"203.0.113.0/24\"]\nsrt_peer_limit = 4\n",
            "t",
        )
        .unwrap();
        let nc = encode_channel(&cfg.channels[0]);
        let json = serde_json::to_vec(&nc).unwrap();
        let back = decode_channel("cam1", &json).unwrap();
        assert_eq!(back, nc);
        assert_eq!(
            config::Channel::try_from(back).unwrap(),
            cfg.channels[0],
            "the stored channel is the file's"
        );
        assert!(decode_channel("cam2", &json).unwrap_err().contains("key"));
        assert!(decode_channel("cam1", b"{not json").is_err());
        let bad = br#"{"name":"cam1","listen":"nowhere","encoders":["e"]}"#;
        assert!(decode_channel("cam1", bad).is_err());
        let extra = br#"{"name":"cam1","listen":"10.0.0.1:5000","encoders":["e"],"x":1}"#;
        assert!(decode_channel("cam1", extra).is_err());
    }

    #[test]
    fn watched_keys_decode_to_changes_or_to_reported_skips() {
        let p = "/nsfail/studio/";
        let ch = br#"{"name":"cam1","listen":"10.0.0.1:5000","encoders":["e"]}"#;
        assert!(matches!(
            decode(p, b"/nsfail/studio/channels/cam1", Some(ch)),
            Change::PutChannel { channel: c, .. } if c.name == "cam1"
        ));
        assert_eq!(
            decode(p, b"/nsfail/studio/channels/cam1", None),
            Change::DeleteChannel("cam1".into())
        );
        let host = br#"{"host":"h2","lease":7,"lease_s":1,"pid":9,"mac":"02:00:00:00:00:02"}"#;
        assert!(matches!(
            decode(p, b"/nsfail/studio/hosts/h2", Some(host)),
            Change::PutHost(h) if h.lease == 7
        ));
        let enc = br#"{"host":"h2","definition":{"name":"e","address":"10.0.0.2"},"healthy":true,"drained":false}"#;
        assert!(matches!(
            decode(p, b"/nsfail/studio/encoders/h2/e", Some(enc)),
            Change::PutEncoder(r) if r.healthy
        ));
        assert_eq!(
            decode(p, b"/nsfail/studio/encoders/h2/e", None),
            Change::DeleteEncoder {
                host: "h2".into(),
                encoder: "e".into()
            }
        );
        let active = br#"{"encoder":"e","leader":"h2","term":12}"#;
        assert!(matches!(
            decode(p, b"/nsfail/studio/active/cam1", Some(active)),
            Change::PutActive { channel, record } if channel == "cam1" && record.term == 12
        ));
        assert_eq!(
            decode(p, b"/nsfail/studio/leader/694d8a3b1c2f0e05", Some(b"h2")),
            Change::Election
        );
        let caller = br#"{"listen":"10.0.0.1:5000","socket_id":305419896}"#;
        assert!(matches!(
            decode(p, b"/nsfail/studio/callers/cam1/h2/10.9.0.2:4000", Some(caller)),
            Change::PutCaller { channel, host, caller, record }
                if channel == "cam1" && host == "h2" && caller.port() == 4000
                    && record.socket_id == 0x1234_5678
        ));
        assert!(matches!(
            decode(p, b"/nsfail/studio/callers/cam1/h2/10.9.0.2:4000", None),
            Change::DeleteCaller { host, .. } if host == "h2"
        ));
        // Each of these is skipped, with its reason, and never applied.
        let bad: [(&[u8], Option<&[u8]>); 11] = [
            (b"/nsfail/studio/callers/cam1/h2/10.9.0.2:4000", Some(b"{}")),
            (
                b"/nsfail/studio/callers/cam1/h2/[2001:db8::2]:4000",
                Some(caller),
            ),
            (b"/nsfail/studio/callers/cam1/h2/10.9.0.2", Some(caller)),
            (b"/nsfail/studio/active/cam1", Some(b"{}")),
            (b"/nsfail/studio/leader/not-hex", Some(b"h2")),
            (b"/nsfail/studio/junk", Some(b"1")),
            (b"/nsfail/studio/channels/cam1", Some(b"{not json")),
            (b"/nsfail/studio/channels/cam2", Some(ch)),
            (b"/nsfail/studio/hosts/h3", Some(host)),
            (b"/nsfail/studio/encoders/h3/e", Some(enc)),
            (b"/nsfail/studio/channels/\xff", Some(ch)),
        ];
        for (key, value) in bad {
            assert!(
                matches!(decode(p, key, value), Change::Bad { .. }),
                "{}",
                String::from_utf8_lossy(key)
            );
        }
    }
}
