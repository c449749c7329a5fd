//! The etcd calls: connect, write channels (`nsfail apply`), read the cluster's hosts
//! (`nsfail cluster status`). The daemon's side (lease, registration, watch) is in
//! `daemon::cluster`.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use etcd_client::{Client, ConnectOptions, GetOptions, KeyValue, Txn, TxnOp};
use serde::Serialize;

use super::*;

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A client of the cluster's etcd, checked to answer (a `status` call: the client itself
/// connects lazily).
pub async fn connect(c: &Cluster) -> Result<Client> {
    let options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT);
    let endpoints = c.etcd.join(", ");
    let mut client = tokio::time::timeout(
        CONNECT_TIMEOUT + REQUEST_TIMEOUT,
        Client::connect(&c.etcd, Some(options)),
    )
    .await
    .map_err(|_| anyhow!("etcd at {endpoints}: no answer"))?
    .with_context(|| format!("etcd at {endpoints}"))?;
    client
        .status()
        .await
        .with_context(|| format!("etcd at {endpoints}"))?;
    Ok(client)
}

/// Keys per answer of [`get_prefix`]: a page of channels stays far below the client's 4 MiB
/// limit on an answer (a channel's value is about 200 bytes, at most a few KiB with many
/// sources), which one answer holding the whole prefix passes at about 13,000 channels.
pub const PAGE: i64 = 1000;

/// Every key under `prefix` as of one revision (the first page's; later pages ask for it),
/// read in pages of [`PAGE`] keys. Returns that revision and the keys in order.
pub async fn get_prefix(
    client: &mut Client,
    prefix: &str,
) -> Result<(i64, Vec<KeyValue>), etcd_client::Error> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let mut options = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision != 0 {
            options = options.with_revision(revision);
        }
        let mut page = client.get(from.clone(), Some(options)).await?;
        if revision == 0 {
            revision = page.header().map_or(0, |h| h.revision());
        }
        let more = page.more();
        let kvs = page.take_kvs();
        let Some(last) = kvs.last() else {
            return Ok((revision, out));
        };
        // The next page starts right after the last key of this one.
        from = last.key().to_vec();
        from.push(0);
        out.extend(kvs);
        if !more {
            return Ok((revision, out));
        }
    }
}

/// The first key after every key that starts with `prefix` (etcd's range end of a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: to the end of the key space.
    vec![0]
}

/// What `nsfail apply` did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Channels written (new or changed).
    pub written: Vec<String>,
    /// Channels already in etcd as the file has them.
    pub unchanged: Vec<String>,
    /// Channels deleted (`--prune`: in etcd, not in the file).
    pub removed: Vec<String>,
}

/// Writes `channels` to etcd; with `prune`, deletes the cluster's channels the file does not
/// list. Nothing but `channels/` keys is touched.
pub async fn apply(
    client: &mut Client,
    c: &Cluster,
    channels: &[config::Channel],
    prune: bool,
) -> Result<ApplyReport> {
    let mut report = ApplyReport::default();
    let (_, existing) = get_prefix(client, &channels_prefix(c))
        .await
        .context("reading the cluster's channels")?;
    let mut before = std::collections::BTreeMap::new();
    for kv in &existing {
        before.insert(kv.key().to_vec(), kv.value().to_vec());
    }
    refuse_collisions(c, channels, &existing, prune)?;
    // Written in transactions of up to [`TXN_OPS`] puts: one round trip per key took
    // seconds at 10,000 channels.
    let mut batch: Vec<(String, TxnOp)> = Vec::new();
    for ch in channels {
        let key = channel_key(c, &ch.name);
        let value = serde_json::to_vec(&encode_channel(ch))?;
        if before.get(key.as_bytes()) == Some(&value) {
            report.unchanged.push(ch.name.clone());
            continue;
        }
        batch.push((ch.name.clone(), TxnOp::put(key, value, None)));
        if batch.len() == TXN_OPS {
            write_batch(client, &mut batch, &mut report).await?;
        }
    }
    write_batch(client, &mut batch, &mut report).await?;
    if prune {
        let prefix = c.prefix();
        for key in before.keys() {
            let key = String::from_utf8_lossy(key);
            let Key::Channel(name) = parse_key(&prefix, &key) else {
                continue;
            };
            if channels.iter().all(|ch| ch.name != name) {
                // Its active encoder goes with it, so that a channel of the same name added
                // later does not start from a stale choice.
                client
                    .txn(Txn::new().and_then([
                        TxnOp::delete(key.as_bytes(), None),
                        TxnOp::delete(active_key(c, &name), None),
                    ]))
                    .await
                    .with_context(|| format!("deleting channel {name}"))?;
                report.removed.push(name);
            }
        }
    }
    Ok(report)
}

/// A channel of the file on the ingest address of a channel etcd keeps (one the file does
/// not list, and `prune` does not remove) would be skipped by every host running the other,
/// and a restarted host might choose it instead: the apply is refused, before anything is
/// written, naming each collision.
fn refuse_collisions(
    c: &Cluster,
    channels: &[config::Channel],
    existing: &[KeyValue],
    prune: bool,
) -> Result<()> {
    if prune {
        return Ok(());
    }
    let prefix = c.prefix();
    let kept: std::collections::BTreeMap<std::net::SocketAddr, String> = existing
        .iter()
        .filter_map(|kv| match decode(&prefix, kv.key(), Some(kv.value())) {
            Change::PutChannel { channel, .. }
                if channels.iter().all(|f| f.name != channel.name) =>
            {
                Some((channel.listen, channel.name))
            }
            _ => None,
        })
        .collect();
    let clashes: Vec<String> = channels
        .iter()
        .filter_map(|ch| {
            kept.get(&ch.listen).map(|other| {
                format!(
                    "{} on {} (etcd's channel {other} is there)",
                    ch.name, ch.listen
                )
            })
        })
        .collect();
    if clashes.is_empty() {
        return Ok(());
    }
    Err(anyhow!(
        "nothing written: the file's channels collide with channels in etcd that it does not \
         list: {}; remove those (`nsfail remove channel`) or apply with --prune",
        clashes.join(", ")
    ))
}

/// Operations per transaction: etcd's default `--max-txn-ops`.
pub const TXN_OPS: usize = 128;

/// Writes `batch` (channel name, put) in one transaction and empties it.
async fn write_batch(
    client: &mut Client,
    batch: &mut Vec<(String, TxnOp)>,
    report: &mut ApplyReport,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let (names, ops): (Vec<String>, Vec<TxnOp>) = std::mem::take(batch).into_iter().unzip();
    client
        .txn(Txn::new().and_then(ops))
        .await
        .with_context(|| {
            format!(
                "writing channels {} to {}",
                names.first().map_or("", String::as_str),
                names.last().map_or("", String::as_str)
            )
        })?;
    report.written.extend(names);
    Ok(())
}

/// `nsfail cluster status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClusterStatus {
    pub name: String,
    pub etcd: EtcdHealth,
    pub hosts: Vec<HostStatus>,
    /// The host the election made leader (`None`: none now).
    pub leader: Option<String>,
    /// How many channels the cluster holds.
    pub channels: usize,
    /// Channels with an active encoder written by a leader.
    pub actives: usize,
    /// SRT callers published by the hosts (one per channel, host and caller).
    pub srt_callers: usize,
    /// Encoders drained cluster-wide (`drains/`).
    pub drained: Vec<String>,
    /// Keys under the prefix that are not nsfail's layout or do not decode.
    pub bad_keys: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EtcdHealth {
    pub endpoints: Vec<String>,
    pub healthy: bool,
    pub version: Option<String>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostStatus {
    pub host: String,
    pub pid: u32,
    pub lease_s: u64,
    /// Seconds left on its lease (`None`: expired while being read).
    pub ttl_s: Option<i64>,
    /// Its encoders: name and health.
    pub encoders: Vec<(String, bool)>,
}

/// Reads the cluster's hosts, their leases and encoders. etcd unreachable is not an error:
/// the status says so.
pub async fn status(c: &Cluster) -> ClusterStatus {
    let mut out = ClusterStatus {
        name: c.name.clone(),
        etcd: EtcdHealth {
            endpoints: c.etcd.clone(),
            healthy: false,
            version: None,
            error: None,
        },
        hosts: Vec::new(),
        leader: None,
        channels: 0,
        actives: 0,
        drained: Vec::new(),
        srt_callers: 0,
        bad_keys: Vec::new(),
    };
    if let Err(e) = read_status(c, &mut out).await {
        out.etcd.error = Some(format!("{e:#}"));
    }
    out
}

async fn read_status(c: &Cluster, out: &mut ClusterStatus) -> Result<()> {
    let mut client = connect(c).await?;
    let st = client.status().await?;
    out.etcd.healthy = true;
    out.etcd.version = Some(st.version().to_owned());
    let prefix = c.prefix();
    let (_, all) = get_prefix(&mut client, &prefix).await?;
    let mut encoders: Vec<(String, String, bool)> = Vec::new();
    for kv in &all {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match parse_key(&prefix, &key) {
            Key::Channel(name) => match decode_channel(&name, kv.value()) {
                Ok(_) => out.channels += 1,
                Err(_) => out.bad_keys.push(key),
            },
            Key::Host(host) => match serde_json::from_slice::<HostRecord>(kv.value()) {
                Ok(rec) if rec.host == host => {
                    let ttl = client.lease_time_to_live(rec.lease, None).await?.ttl();
                    out.hosts.push(HostStatus {
                        host,
                        pid: rec.pid,
                        lease_s: rec.lease_s,
                        ttl_s: (ttl >= 0).then_some(ttl),
                        encoders: Vec::new(),
                    });
                }
                _ => out.bad_keys.push(key),
            },
            Key::Encoder { host, encoder } => {
                match serde_json::from_slice::<EncoderRecord>(kv.value()) {
                    Ok(rec) if rec.host == host && rec.definition.name == encoder => {
                        encoders.push((host, encoder, rec.healthy));
                    }
                    _ => out.bad_keys.push(key),
                }
            }
            Key::Active(_) => match decode(&prefix, kv.key(), Some(kv.value())) {
                Change::PutActive { .. } => out.actives += 1,
                _ => out.bad_keys.push(key),
            },
            Key::Drain(_) => match decode(&prefix, kv.key(), Some(kv.value())) {
                Change::PutDrain { encoder, .. } => out.drained.push(encoder),
                _ => out.bad_keys.push(key),
            },
            Key::Caller { .. } => match decode(&prefix, kv.key(), Some(kv.value())) {
                Change::PutCaller { .. } => out.srt_callers += 1,
                _ => out.bad_keys.push(key),
            },
            Key::Election => {}
            Key::Foreign => out.bad_keys.push(key),
        }
    }
    // No leader is an error of the election API ("election: no leader"), not of etcd.
    if let Ok(resp) = client.leader(election_name(c)).await {
        out.leader = resp
            .kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned());
    }
    for (host, encoder, healthy) in encoders {
        if let Some(h) = out.hosts.iter_mut().find(|h| h.host == host) {
            h.encoders.push((encoder, healthy));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_ends_at_its_last_byte_plus_one() {
        assert_eq!(prefix_end(b"/nsfail/c/"), b"/nsfail/c0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }
}
