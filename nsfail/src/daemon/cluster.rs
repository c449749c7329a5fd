//! A cluster host's side of etcd (issue 17): wait for etcd at the first start, register this
//! host and its encoders under its lease, read the prefix, then keep the lease alive, watch
//! the prefix (every change goes to the controller, which applies it as a reload) and publish
//! the local encoders' health. When etcd is lost the host keeps forwarding with the last
//! state and keeps failing over between its own encoders (the controller's local rules); when
//! etcd returns it registers again and applies a whole new snapshot.
//!
//! Also the writes of `nsfail add channel` / `nsfail remove channel` to a clustered daemon:
//! they go to etcd, and are answered once this host's watch has applied them.

use std::collections::BTreeSet;

use anyhow::anyhow;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, LeaderKey, PutOptions, Txn,
    TxnOp, WatchOptions, WatchResponse,
};
use log::debug;
use tokio::sync::watch as tokio_watch;

use super::{actor::ControlHandle, *};
use crate::{
    api::{Command, NewChannel},
    cluster::{self, Change, EncoderRecord, HostRecord},
    config::{self, Cluster},
};

/// How often the local encoders' health is compared with what was last published.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often the leader writes the decisions it made since the last time.
const OUTBOX_EVERY: Duration = Duration::from_millis(10);
/// How often who leads is asked when nothing in the election changed.
const LEADER_CHECK_EVERY: Duration = Duration::from_secs(1);
/// The longest wait between two attempts to reach etcd.
const RETRY_MAX: Duration = Duration::from_secs(2);
/// How long a socket write waits for this host's watch to apply it.
const APPLIED_WAIT: Duration = Duration::from_secs(5);

/// This host in the cluster, as `join` left it.
pub(super) struct Joined {
    pub(super) client: Client,
    /// The revision of the snapshot: the watch starts after it.
    pub(super) revision: i64,
    /// The snapshot of the prefix, decoded.
    pub(super) changes: Vec<Change>,
}

/// What registration needs to know of this host.
#[derive(Clone)]
pub(super) struct Me {
    pub(super) cluster: Cluster,
    pub(super) host: String,
    /// The ingest interface's MAC.
    pub(super) mac: String,
    /// This host's encoders, from its config file.
    pub(super) encoders: Vec<config::Encoder>,
}

fn options() -> ConnectOptions {
    ConnectOptions::new()
        .with_connect_timeout(cluster::store::CONNECT_TIMEOUT)
        .with_timeout(cluster::store::REQUEST_TIMEOUT)
        // A dead etcd is found by HTTP/2 pings, not by a request that never returns.
        .with_keep_alive(Duration::from_millis(500), Duration::from_millis(1000))
        .with_keep_alive_while_idle(true)
}

/// Connects and reads the prefix, retrying until etcd answers, and says so while
/// it waits: before this nothing is attached, so nothing is forwarded that this host cannot
/// know. `Ok(None)`: SIGTERM or SIGINT came while waiting. An encoder of this host already
/// registered by another host is an error (no retry: the configs must be fixed).
pub(super) async fn join(me: &Me) -> Result<Option<Joined>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut wait = Duration::from_millis(100);
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let attempt = async {
            let client = Client::connect(&me.cluster.etcd, Some(options())).await?;
            read(client, me).await
        };
        let outcome = tokio::select! {
            outcome = tokio::time::timeout(
                cluster::store::CONNECT_TIMEOUT + cluster::store::REQUEST_TIMEOUT,
                attempt,
            ) => outcome,
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
        };
        match outcome {
            Ok(Ok(joined)) => {
                if attempts > 1 {
                    info!("etcd answers: joined cluster {}", me.cluster.name);
                }
                return Ok(Some(joined));
            }
            Ok(Err(RegisterError::Refused(why))) => bail!("{why}"),
            Ok(Err(RegisterError::Etcd(e))) => warn_waiting(me, attempts, &e.to_string()),
            Err(_) => warn_waiting(me, attempts, "no answer"),
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = term.recv() => return Ok(None),
            _ = int.recv() => return Ok(None),
        }
        wait = (wait * 2).min(RETRY_MAX);
    }
}

fn warn_waiting(me: &Me, attempts: u32, why: &str) {
    // Said at the first failure and then every tenth, not at every retry.
    if attempts == 1 || attempts.is_multiple_of(10) {
        warn!(
            "waiting for etcd at {} (cluster {}, host {}): {why}; nothing is forwarded until \
             it answers",
            me.cluster.etcd.join(","),
            me.cluster.name,
            me.host
        );
    }
}

#[derive(Debug, thiserror::Error)]
enum RegisterError {
    #[error(transparent)]
    Etcd(#[from] etcd_client::Error),
    /// Not etcd's fault: retrying would not help.
    #[error("{0}")]
    Refused(String),
}

/// Refuses an encoder name another host registered, then reads the whole prefix.
async fn read(mut client: Client, me: &Me) -> Result<Joined, RegisterError> {
    let c = &me.cluster;
    let prefix = c.prefix();
    let all = client
        .get(prefix.clone(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mine: BTreeSet<&str> = me.encoders.iter().map(|e| e.name.as_str()).collect();
    for kv in all.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        if let cluster::Key::Encoder { host, encoder } = cluster::parse_key(&prefix, &key)
            && host != me.host
            && mine.contains(encoder.as_str())
        {
            return Err(RegisterError::Refused(format!(
                "encoder {encoder} of this host ({}) is already registered in cluster {} by \
                 host {host}: encoder names must be unique in the cluster (rename it in one \
                 of the configs)",
                me.host, c.name
            )));
        }
    }
    let revision = all.header().map_or(0, |h| h.revision());
    let changes = all
        .kvs()
        .iter()
        .map(|kv| cluster::decode(&prefix, kv.key(), Some(kv.value())))
        .collect();
    Ok(Joined {
        client,
        revision,
        changes,
    })
}

/// Grants the host's lease and writes the host's and its encoders' records under it
/// (removing records of encoders this host no longer has). Returns the lease.
async fn register(client: &mut Client, me: &Me) -> Result<i64, etcd_client::Error> {
    let c = &me.cluster;
    let prefix = c.prefix();
    let own = client
        .get(
            format!("{prefix}encoders/{}/", me.host),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let ttl = i64::try_from(c.lease_s).unwrap_or(i64::MAX);
    let lease = client.lease_grant(ttl, None).await?.id();
    let under_lease = || Some(PutOptions::new().with_lease(lease));
    let host = HostRecord {
        host: me.host.clone(),
        lease,
        lease_s: c.lease_s,
        pid: std::process::id(),
        mac: me.mac.clone(),
    };
    client
        .put(cluster::host_key(c, &me.host), json(&host), under_lease())
        .await?;
    for kv in own.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        if let cluster::Key::Encoder { encoder, .. } = cluster::parse_key(&prefix, &key)
            && me.encoders.iter().all(|e| e.name != encoder)
        {
            client.delete(kv.key(), None).await?;
        }
    }
    for e in &me.encoders {
        // Not judged yet: the first publication says what the probes found.
        let rec = EncoderRecord {
            host: me.host.clone(),
            definition: e.clone(),
            healthy: false,
            drained: false,
        };
        client
            .put(
                cluster::encoder_key(c, &me.host, &e.name),
                json(&rec),
                under_lease(),
            )
            .await?;
    }
    Ok(lease)
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

/// The revision this host's controller has applied, for socket writes to wait on.
pub(super) type Applied = tokio_watch::Receiver<i64>;

/// Keeps the host in the cluster until the daemon stops: registers it (its lease starts
/// here, once the data plane is up, so that a slow start cannot outlive it), then see the
/// module comment.
pub(super) async fn run(
    me: Me,
    joined: Joined,
    ctl: ControlHandle,
    applied: tokio_watch::Sender<i64>,
    stop: CancellationToken,
) {
    let Joined {
        mut client,
        mut revision,
        ..
    } = joined;
    applied.send_replace(revision);
    let mut registered = tokio::select! {
        () = stop.cancelled() => return,
        r = register(&mut client, &me) => r.map_err(anyhow::Error::from),
    };
    loop {
        let lost = match registered {
            Ok(lease) => tokio::select! {
                () = stop.cancelled() => return,
                e = session(&mut client, &me, lease, revision, &ctl, &applied) => e,
            },
            Err(e) => e.context("registering the host"),
        };
        // The leader steps down: its lease runs out in etcd, and another host is elected.
        ctl.tell(Msg::ClusterView {
            leading: false,
            leader: None,
            etcd_up: false,
        });
        let reason = format!(
            "cluster: etcd lost ({lost:#}); forwarding with the last state, failing over \
             between this host's encoders"
        );
        warn!("{reason}");
        ctl.tell(Msg::ClusterEvent(reason));
        let mut wait = Duration::from_millis(100);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(RETRY_MAX);
            let attempt = async {
                let client = Client::connect(&me.cluster.etcd, Some(options())).await?;
                let mut joined = read(client, &me).await?;
                let lease = register(&mut joined.client, &me).await?;
                Ok::<_, RegisterError>((joined, lease))
            };
            let (joined, lease) = match tokio::time::timeout(
                cluster::store::CONNECT_TIMEOUT + cluster::store::REQUEST_TIMEOUT,
                attempt,
            )
            .await
            {
                Ok(Ok(j)) => j,
                Ok(Err(e)) => {
                    debug!("etcd still lost: {e}");
                    continue;
                }
                Err(_) => continue,
            };
            let report = ctl
                .ask(|reply| Msg::Cluster {
                    changes: joined.changes,
                    resync: true,
                    reply,
                })
                .await;
            if let Some(Err(e)) = report {
                warn!("applying the cluster's state after etcd came back: {e}");
            }
            client = joined.client;
            registered = Ok(lease);
            revision = joined.revision;
            applied.send_replace(revision);
            ctl.tell(Msg::ClusterView {
                leading: false,
                leader: None,
                etcd_up: true,
            });
            let reason = "cluster: etcd is back; its state applied".to_owned();
            info!("{reason}");
            ctl.tell(Msg::ClusterEvent(reason));
            break;
        }
    }
}

/// One connected stretch: keep-alives, the watch, health publication, the campaign for
/// leadership and, once elected, the leader's writes of its decisions; until one of them fails
/// (the error says which).
async fn session(
    client: &mut Client,
    me: &Me,
    lease: i64,
    revision: i64,
    ctl: &ControlHandle,
    applied: &tokio_watch::Sender<i64>,
) -> anyhow::Error {
    let prefix = me.cluster.prefix();
    let (_watcher, mut stream) = match client
        .watch(
            prefix.clone(),
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1),
            ),
        )
        .await
    {
        Ok(w) => w,
        Err(e) => return anyhow::Error::new(e).context("watching the prefix"),
    };
    let (mut keeper, mut alive) = match client.lease_keep_alive(lease).await {
        Ok(k) => k,
        Err(e) => return anyhow::Error::new(e).context("keeping the lease alive"),
    };
    let lease_for = Duration::from_secs(me.cluster.lease_s);
    let mut keep = tokio::time::interval((lease_for / 3).max(Duration::from_millis(100)));
    keep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut publish = tokio::time::interval(PUBLISH_EVERY);
    publish.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut published: BTreeMap<String, (bool, bool)> = BTreeMap::new();
    let mut writer = client.clone();
    let election = cluster::election_name(&me.cluster);
    let mut elector = client.clone();
    let campaign = elector.campaign(election.clone(), me.host.clone(), lease);
    let mut asker = client.clone();
    // Who leads is asked at the start, whenever a candidate's key comes or goes, and every
    // second besides.
    let mut ask_leader = tokio::time::interval(LEADER_CHECK_EVERY);
    ask_leader.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tokio::pin!(campaign);
    let mut leading: Option<LeaderKey> = None;
    let mut outbox = tokio::time::interval(OUTBOX_EVERY);
    outbox.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            won = &mut campaign, if leading.is_none() => match won {
                Ok(resp) => match resp.leader() {
                    Some(key) => {
                        info!("cluster {}: elected leader (term {})", me.cluster.name, key.rev());
                        leading = Some(key.clone());
                        ctl.tell(Msg::ClusterView {
                            leading: true,
                            leader: Some(me.host.clone()),
                            etcd_up: true,
                        });
                    }
                    None => return anyhow!("the election answered without a leader key"),
                },
                Err(e) => return anyhow::Error::new(e).context("campaigning for leadership"),
            },
            _ = ask_leader.tick() => {
                if let Err(e) = tell_leader(&mut asker, &election, me, leading.is_some(), ctl).await {
                    return e;
                }
            }
            _ = outbox.tick(), if leading.is_some() => {
                let key = leading.as_ref().expect("guarded");
                if let Err(e) = write_decisions(&mut writer, me, key, ctl).await {
                    return e;
                }
            }
            _ = keep.tick() => {
                let answered = tokio::time::timeout(lease_for, async {
                    keeper.keep_alive().await?;
                    alive.message().await
                })
                .await;
                match answered {
                    Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                    Ok(Ok(Some(_))) => return anyhow!("the host's lease expired"),
                    Ok(Ok(None)) => return anyhow!("the lease keep-alive stream ended"),
                    Ok(Err(e)) => return anyhow::Error::new(e).context("lease keep-alive"),
                    Err(_) => return anyhow!("no keep-alive answer within the lease"),
                }
            }
            msg = stream.message() => match msg {
                Ok(Some(resp)) => match apply_watched(&prefix, resp, ctl, applied).await {
                    Ok(true) => ask_leader.reset_immediately(),
                    Ok(false) => {}
                    Err(e) => return e,
                },
                Ok(None) => return anyhow!("the watch ended"),
                Err(e) => return anyhow::Error::new(e).context("watching the prefix"),
            },
            _ = publish.tick() => {
                if let Err(e) = publish_health(&mut writer, me, lease, ctl, &mut published).await {
                    return e.context("publishing the encoders' health");
                }
            }
        }
    }
}

/// The leader writes the active encoders it decided since the last call, each only while its
/// election key is still the one it won with (a deposed leader's write fails, never lands).
async fn write_decisions(
    client: &mut Client,
    me: &Me,
    key: &LeaderKey,
    ctl: &ControlHandle,
) -> Result<()> {
    let Some(outbox) = ctl.ask(Msg::TakeOutbox).await else {
        bail!("the controller stopped");
    };
    for (channel, encoder) in outbox {
        let record = cluster::ActiveRecord {
            encoder,
            leader: me.host.clone(),
            term: key.rev(),
        };
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.key(),
                CompareOp::Equal,
                key.rev(),
            )])
            .and_then([TxnOp::put(
                cluster::active_key(&me.cluster, &channel),
                json(&record),
                None,
            )]);
        match client.txn(txn).await {
            Ok(r) if r.succeeded() => {}
            Ok(_) => bail!("no longer the leader (its election key is gone)"),
            Err(e) => return Err(anyhow::Error::new(e).context("writing the active encoders")),
        }
    }
    Ok(())
}

/// Asks etcd who leads and tells the controller; a leader that finds another host leading
/// was deposed (an error: the session starts again).
async fn tell_leader(
    client: &mut Client,
    election: &str,
    me: &Me,
    leading: bool,
    ctl: &ControlHandle,
) -> Result<()> {
    let leader = match client.leader(election).await {
        Ok(resp) => resp
            .kv()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
        // etcd answers "election: no leader" as an error of the call.
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => None,
        Err(e) => return Err(anyhow::Error::new(e).context("asking who leads")),
    };
    if leading && leader.as_deref() != Some(me.host.as_str()) {
        bail!("another host leads now ({})", leader.unwrap_or_default());
    }
    ctl.tell(Msg::ClusterView {
        leading,
        leader,
        etcd_up: true,
    });
    Ok(())
}

/// Hands one watch response's events to the controller, in order; a cancelled watch
/// (compacted history) is an error, so that the session starts again from a snapshot.
/// Returns whether a candidate of the election came or went.
async fn apply_watched(
    prefix: &str,
    resp: WatchResponse,
    ctl: &ControlHandle,
    applied: &tokio_watch::Sender<i64>,
) -> Result<bool> {
    if resp.canceled() {
        bail!(
            "the watch was cancelled ({}; compacted at {})",
            resp.cancel_reason(),
            resp.compact_revision()
        );
    }
    let revision = resp.header().map(|h| h.revision());
    let changes: Vec<Change> = resp
        .events()
        .iter()
        .filter_map(|ev| {
            let kv = ev.kv()?;
            let value = match ev.event_type() {
                EventType::Put => Some(kv.value()),
                EventType::Delete => None,
            };
            Some(cluster::decode(prefix, kv.key(), value))
        })
        .collect();
    let election = changes.iter().any(|c| matches!(c, Change::Election));
    if !changes.is_empty() {
        let report = ctl
            .ask(|reply| Msg::Cluster {
                changes,
                resync: false,
                reply,
            })
            .await;
        match report {
            None => bail!("the controller stopped"),
            Some(Err(e)) => warn!("applying the cluster's changes: {e}"),
            Some(Ok(_)) => {}
        }
    }
    if let Some(revision) = revision {
        applied.send_replace(revision);
    }
    Ok(election)
}

/// Writes the records of local encoders whose health or drain changed since last written.
async fn publish_health(
    client: &mut Client,
    me: &Me,
    lease: i64,
    ctl: &ControlHandle,
    published: &mut BTreeMap<String, (bool, bool)>,
) -> Result<()> {
    let Some(now) = ctl.ask(Msg::LocalHealth).await else {
        bail!("the controller stopped");
    };
    for (definition, healthy, drained) in now {
        if published.get(&definition.name) == Some(&(healthy, drained)) {
            continue;
        }
        let name = definition.name.clone();
        let rec = EncoderRecord {
            host: me.host.clone(),
            definition,
            healthy,
            drained,
        };
        client
            .put(
                cluster::encoder_key(&me.cluster, &me.host, &name),
                json(&rec),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        published.insert(name, (healthy, drained));
    }
    Ok(())
}

/// `nsfail add channel` / `remove channel` on a cluster host: written to etcd (every host
/// applies it from its watch), answered once this host has applied it.
#[derive(Clone)]
pub(super) struct Writes {
    pub(super) client: Client,
    pub(super) cluster: Cluster,
    pub(super) applied: Applied,
}

impl Writes {
    /// `Some(answer)` for the requests a cluster host answers through etcd.
    pub(super) async fn intercept(
        &self,
        command: &Command,
        ctl: &ControlHandle,
    ) -> Option<Response> {
        match command {
            Command::AddChannel { channel } => Some(self.add_channel(channel, ctl).await),
            Command::RemoveChannel { name } => Some(self.remove_channel(name).await),
            Command::AddEncoder { .. } | Command::RemoveEncoder { .. } => Some(Response::error(
                "in a cluster, a host's encoders are its config file's: edit the file and \
                 reload (they are registered in etcd under the host)",
            )),
            _ => None,
        }
    }

    async fn add_channel(&self, nc: &NewChannel, ctl: &ControlHandle) -> Response {
        let ch = match config::Channel::try_from(nc.clone()) {
            Ok(ch) => ch,
            Err(e) => return Response::error(e.to_string()),
        };
        let key = cluster::channel_key(&self.cluster, &ch.name);
        let value = json(&cluster::encode_channel(&ch));
        let mut client = self.client.clone();
        let written = match client.put(key, value, None).await {
            Ok(r) => r.header().map_or(0, |h| h.revision()),
            Err(e) => return Response::error(format!("writing to etcd: {e}")),
        };
        if let Err(e) = self.wait_applied(written).await {
            return Response::error(e);
        }
        match ctl
            .ask(|reply| Msg::SharedChannel(ch.name.clone(), reply))
            .await
        {
            Some(Ok(())) => Response::ok(()),
            Some(Err(why)) => Response::error(format!(
                "channel {} written to etcd, but this host skips it: {why}",
                ch.name
            )),
            None => Response::error("the daemon is stopping"),
        }
    }

    async fn remove_channel(&self, name: &str) -> Response {
        let key = cluster::channel_key(&self.cluster, name);
        let mut client = self.client.clone();
        // The channel and its active encoder together, so that a channel of the same name
        // added later does not start from a stale choice.
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Greater, 0)])
            .and_then([
                TxnOp::delete(key, None),
                TxnOp::delete(cluster::active_key(&self.cluster, name), None),
            ]);
        let written = match client.txn(txn).await {
            Ok(r) if !r.succeeded() => {
                return Response::error(format!("unknown channel {name:?} in the cluster"));
            }
            Ok(r) => r.header().map_or(0, |h| h.revision()),
            Err(e) => return Response::error(format!("deleting from etcd: {e}")),
        };
        match self.wait_applied(written).await {
            Ok(()) => Response::ok(()),
            Err(e) => Response::error(e),
        }
    }

    async fn wait_applied(&self, revision: i64) -> Result<(), String> {
        let mut applied = self.applied.clone();
        tokio::time::timeout(APPLIED_WAIT, applied.wait_for(|r| *r >= revision))
            .await
            .map_err(|_| {
                format!(
                    "written to etcd (revision {revision}), not applied on this host within {} s",
                    APPLIED_WAIT.as_secs()
                )
            })?
            .map(|_| ())
            .map_err(|_| "the daemon is stopping".to_owned())
    }
}
