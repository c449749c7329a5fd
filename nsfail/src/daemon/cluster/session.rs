//! One connected stretch of a cluster host: see `session`.

use anyhow::anyhow;
use etcd_client::{
    CampaignResponse, Compare, CompareOp, EventType, LeaderKey, LeaseKeepAliveStream, LeaseKeeper,
    Txn, TxnOp, WatchOptions, WatchResponse,
};

use super::*;

/// How often the local encoders' health is compared with what was last published.
const PUBLISH_EVERY: Duration = Duration::from_millis(100);
/// How often the leader writes the decisions it made since the last time.
const OUTBOX_EVERY: Duration = Duration::from_millis(10);
/// Transactions the leader writes per tick of [`OUTBOX_EVERY`] at most.
const OUTBOX_TXNS: usize = 4;
/// How often who leads is asked when nothing in the election changed.
const LEADER_CHECK_EVERY: Duration = Duration::from_secs(1);

/// One connected stretch: keep-alives, the watch, health publication, the campaign for
/// leadership and, once elected, the leader's writes of its decisions; until one of them fails
/// (the error says which).
pub(super) async fn session(
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
    let mut published: BTreeMap<String, EncoderRecord> = BTreeMap::new();
    let mut callers: BTreeMap<(String, SocketAddr), CallerRecord> = BTreeMap::new();
    let mut writer = client.clone();
    let election = cluster::election_name(&me.cluster);
    let mut elector = match Client::connect(&me.cluster.etcd, Some(campaign_options())).await {
        Ok(c) => c,
        Err(e) => return anyhow::Error::new(e).context("connecting for the campaign"),
    };
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
            won = &mut campaign, if leading.is_none() => match elected(won, me, ctl) {
                Ok(key) => leading = Some(key),
                Err(e) => return e,
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
                if let Err(e) = keep_alive(&mut keeper, &mut alive, lease_for).await {
                    return e;
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
            // A local encoder's health changed: published now (the leader decides on it), and
            // again at every round besides.
            () = me.health_changed.notified() => {
                publish.reset_immediately();
            }
            _ = publish.tick() => {
                if let Err(e) = publish_health(&mut writer, me, lease, ctl, &mut published).await {
                    return e.context("publishing the encoders' health");
                }
                if let Err(e) = publish_callers(&mut writer, me, lease, ctl, &mut callers).await {
                    return e.context("publishing the SRT callers");
                }
            }
        }
    }
}

/// The leader writes the active encoders it decided since the last call, at most
/// [`OUTBOX_TXNS`] transactions of [`cluster::store::TXN_OPS`] channels per call (the rest wait
/// in the controller's outbox for the next tick, so that the session's loop, keep-alives
/// included, is not held while a new leader of 10,000 channels writes them all). Each
/// transaction succeeds only while the leader's election key is still the one it won with (a
/// deposed leader's write fails whole, never lands).
async fn write_decisions(
    client: &mut Client,
    me: &Me,
    key: &LeaderKey,
    ctl: &ControlHandle,
) -> Result<()> {
    let limit = OUTBOX_TXNS * cluster::store::TXN_OPS;
    let Some(outbox) = ctl.ask(|reply| Msg::TakeOutbox(limit, reply)).await else {
        bail!("the controller stopped");
    };
    for batch in outbox.chunks(cluster::store::TXN_OPS) {
        let puts: Vec<TxnOp> = batch
            .iter()
            .map(|placed| {
                let record = cluster::ActiveRecord {
                    encoder: placed.encoder.clone(),
                    leader: me.host.clone(),
                    term: key.rev(),
                    manual: placed.manual,
                };
                TxnOp::put(
                    cluster::active_key(&me.cluster, &placed.channel),
                    json(&record),
                    None,
                )
            })
            .collect();
        let txn = Txn::new()
            .when([Compare::create_revision(
                key.key(),
                CompareOp::Equal,
                key.rev(),
            )])
            .and_then(puts);
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
            Some(cluster::decode_at(
                prefix,
                kv.key(),
                value,
                kv.create_revision(),
            ))
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

/// Writes the records of local encoders whose definition, health or drain changed since last
/// written,
/// and deletes those of encoders the host no longer has (a reload removed them).
async fn publish_health(
    client: &mut Client,
    me: &Me,
    lease: i64,
    ctl: &ControlHandle,
    published: &mut BTreeMap<String, EncoderRecord>,
) -> Result<()> {
    let Some(now) = ctl.ask(Msg::LocalHealth).await else {
        bail!("the controller stopped");
    };
    let gone: Vec<String> = published
        .keys()
        .filter(|name| now.iter().all(|(e, _, _)| &e.name != *name))
        .cloned()
        .collect();
    for name in gone {
        client
            .delete(cluster::encoder_key(&me.cluster, &me.host, &name), None)
            .await?;
        published.remove(&name);
    }
    for (definition, healthy, drained) in now {
        let name = definition.name.clone();
        let rec = EncoderRecord {
            host: me.host.clone(),
            definition,
            healthy,
            drained,
        };
        if published.get(&name) == Some(&rec) {
            continue;
        }
        client
            .put(
                cluster::encoder_key(&me.cluster, &me.host, &name),
                json(&rec),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        published.insert(name, rec);
    }
    Ok(())
}

/// Publishes the SRT callers this host learned (`callers/<channel>/<host>/<caller>`, under
/// the host's lease) and deletes those it forgot, so that the leader tells them of a repoint
/// even when this host cannot.
async fn publish_callers(
    client: &mut Client,
    me: &Me,
    lease: i64,
    ctl: &ControlHandle,
    published: &mut BTreeMap<(String, SocketAddr), CallerRecord>,
) -> Result<()> {
    let Some(now) = ctl.ask(Msg::LocalCallers).await else {
        bail!("the controller stopped");
    };
    let now: BTreeMap<(String, SocketAddr), CallerRecord> = now
        .into_iter()
        .map(|(channel, caller, rec)| ((channel, caller), rec))
        .collect();
    let gone: Vec<(String, SocketAddr)> = published
        .keys()
        .filter(|k| !now.contains_key(*k))
        .cloned()
        .collect();
    for (channel, caller) in gone {
        client
            .delete(
                cluster::caller_key(&me.cluster, &channel, &me.host, caller),
                None,
            )
            .await?;
        published.remove(&(channel, caller));
    }
    for ((channel, caller), rec) in now {
        if published.get(&(channel.clone(), caller)) == Some(&rec) {
            continue;
        }
        client
            .put(
                cluster::caller_key(&me.cluster, &channel, &me.host, caller),
                json(&rec),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        published.insert((channel, caller), rec);
    }
    Ok(())
}

/// One keep-alive of the host's lease, answered within the lease.
async fn keep_alive(
    keeper: &mut LeaseKeeper,
    alive: &mut LeaseKeepAliveStream,
    lease_for: Duration,
) -> Result<()> {
    let answered = tokio::time::timeout(lease_for, async {
        keeper.keep_alive().await?;
        alive.message().await
    })
    .await;
    match answered {
        Ok(Ok(Some(resp))) if resp.ttl() > 0 => Ok(()),
        Ok(Ok(Some(_))) => bail!("the host's lease expired"),
        Ok(Ok(None)) => bail!("the lease keep-alive stream ended"),
        Ok(Err(e)) => Err(anyhow::Error::new(e).context("lease keep-alive")),
        Err(_) => bail!("no keep-alive answer within the lease"),
    }
}

/// The campaign's answer: this host leads, with the election key it won with.
fn elected(
    won: Result<CampaignResponse, etcd_client::Error>,
    me: &Me,
    ctl: &ControlHandle,
) -> Result<LeaderKey> {
    let resp = won.context("campaigning for leadership")?;
    let key = resp
        .leader()
        .ok_or_else(|| anyhow!("the election answered without a leader key"))?
        .clone();
    info!(
        "cluster {}: elected leader (term {})",
        me.cluster.name,
        key.rev()
    );
    ctl.tell(Msg::ClusterView {
        leading: true,
        leader: Some(me.host.clone()),
        etcd_up: true,
    });
    Ok(key)
}
