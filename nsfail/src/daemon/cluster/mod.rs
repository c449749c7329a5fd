//! A cluster host's side of etcd (issue 17): wait for etcd at the first start, register this
//! host and its encoders under its lease, read the prefix, then keep the lease alive, watch
//! the prefix (every change goes to the controller, which applies it as a reload) and publish
//! the local encoders' health. When etcd is lost the host keeps forwarding with the last
//! state and keeps failing over between its own encoders (the controller's local rules); when
//! etcd returns it registers again and applies a whole new snapshot.
//!
//! Also the writes of `nsfail add channel` / `nsfail remove channel` to a clustered daemon:
//! they go to etcd, and are answered once this host's watch has applied them.

mod session;
mod writes;

use std::{collections::BTreeSet, net::SocketAddr};

use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions};
use log::debug;
use tokio::sync::watch as tokio_watch;

pub(in crate::daemon) use self::writes::Writes;
use super::{actor::ControlHandle, *};
use crate::{
    cluster::{self, CallerRecord, Change, EncoderRecord, HostRecord},
    config::{self, Cluster},
};

/// The longest wait between two attempts to reach etcd: short, so that hosts agree again within
/// a second of etcd's return (issue 17); a refused connection costs next to nothing.
const RETRY_MAX: Duration = Duration::from_millis(250);

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
    /// Woken by the controller when a local encoder's health changes (publish it at once).
    pub(super) health_changed: Arc<tokio::sync::Notify>,
}

/// This host as its config file makes it, joined to the cluster: see [`join`]. `None`:
/// stopped while waiting.
pub(super) async fn join_at_start(c: &Cluster, cfg: &Config) -> Result<Option<(Me, Joined)>> {
    let ingest = crate::net::netns::link(&cfg.ingest.interface)
        .with_context(|| format!("ingest interface {}", cfg.ingest.interface))?;
    let me = Me {
        cluster: c.clone(),
        host: c.host_name(),
        mac: format_mac(ingest.mac),
        encoders: cfg.encoders.clone(),
        health_changed: Arc::default(),
    };
    Ok(join(&me).await?.map(|joined| (me, joined)))
}

/// Starts the controller of a cluster host on what it read at its join.
pub(super) fn start_controller(
    cfg: Config,
    config_path: &Path,
    dp: Dataplane,
    mut me: Me,
    mut joined: Joined,
) -> Result<(Controller, Option<(Me, Joined)>)> {
    let changes = std::mem::take(&mut joined.changes);
    let (ctl, report) =
        Controller::start_clustered(cfg, me.host.clone(), changes, config_path, dp)?;
    if let Some(changed) = ctl.health_changed() {
        me.health_changed = changed;
    }
    info!(
        "cluster {} host {}: {} keys or objects skipped",
        me.cluster.name,
        me.host,
        report.skipped.len()
    );
    Ok((ctl, Some((me, joined))))
}

/// Starts the task that keeps the host in the cluster (see [`run`]); returns what socket
/// writes go through, and the task.
pub(super) fn spawn(
    me: Me,
    joined: Joined,
    ctl: ControlHandle,
    stop: CancellationToken,
) -> (Arc<Writes>, JoinHandle<()>) {
    let (applied_tx, applied) = watch::channel(joined.revision);
    let writes = Arc::new(Writes {
        client: joined.client.clone(),
        cluster: me.cluster.clone(),
        host: me.host.clone(),
        applied,
    });
    let task = tokio::spawn(run(me, joined, ctl, applied_tx, stop));
    (writes, task)
}

/// `aa:bb:cc:dd:ee:ff`.
fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn options() -> ConnectOptions {
    campaign_options()
        .with_timeout(cluster::store::REQUEST_TIMEOUT)
        // A dead etcd is found by HTTP/2 pings, not by a request that never returns.
        .with_keep_alive(Duration::from_millis(500), Duration::from_millis(1000))
        .with_keep_alive_while_idle(true)
}

/// The campaign's own connection: it waits as long as another host leads, so no request
/// timeout (one made a follower drop its session, lease and encoders' keys every 5 s, and the
/// leader fail their channels over), and no pings (etcd answers pings on a connection that
/// carries nothing else with GOAWAY). A dead etcd ends the session by the lease's keep-alives.
fn campaign_options() -> ConnectOptions {
    ConnectOptions::new().with_connect_timeout(cluster::store::CONNECT_TIMEOUT)
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

/// Reads the whole prefix (as of one revision) and refuses an encoder name another host
/// registered.
async fn read(mut client: Client, me: &Me) -> Result<Joined, RegisterError> {
    let c = &me.cluster;
    let prefix = c.prefix();
    // In pages: one answer of the whole prefix would pass the client's limit on an answer at
    // about 13,000 channels.
    let (revision, all) = cluster::store::get_prefix(&mut client, &prefix).await?;
    let mine: BTreeSet<&str> = me.encoders.iter().map(|e| e.name.as_str()).collect();
    for kv in &all {
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
    let changes = all
        .iter()
        .map(|kv| cluster::decode_at(&prefix, kv.key(), Some(kv.value()), kv.create_revision()))
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
    // This host's lease from before (a session that lost etcd, or a previous process): a
    // restarted etcd renews it, so its election key would hold the leadership for one more
    // lease. Revoked once its keys are under the new lease, the cluster elects and agrees
    // within a second of etcd's return.
    let previous = client.get(cluster::host_key(c, &me.host), None).await?;
    let previous = previous
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice::<HostRecord>(kv.value()).ok());
    let ttl = i64::try_from(c.lease_s).unwrap_or(i64::MAX);
    let granted = client.lease_grant(ttl, None).await?;
    if granted.ttl() != ttl {
        // etcd raises a TTL below its minimum (1.5 election timeouts): a dead host is seen
        // later than lease_s says.
        warn!(
            "cluster.lease_s = {ttl}, but etcd granted a lease of {} s (its minimum: lower \
             etcd's --election-timeout for shorter leases)",
            granted.ttl()
        );
    }
    let lease = granted.id();
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
    if let Some(old) = previous
        && old.lease != lease
        && let Err(e) = client.lease_revoke(old.lease).await
    {
        // Expired meanwhile: nothing left to revoke.
        debug!("revoking this host's previous lease {}: {e}", old.lease);
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
    mut me: Me,
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
                e = session::session(&mut client, &me, lease, revision, &ctl, &applied) => e,
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
        let Some((joined, lease)) = rejoin(&mut me, &ctl, &stop).await else {
            return;
        };
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
    }
}

/// Tries to reach etcd again, with back-off, until it answers (`None`: the daemon stops):
/// reads the prefix, registers the host as it is now (a reload may have changed its
/// encoders) and has the controller apply the whole snapshot.
async fn rejoin(
    me: &mut Me,
    ctl: &ControlHandle,
    stop: &CancellationToken,
) -> Option<(Joined, i64)> {
    let mut wait = Duration::from_millis(100);
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(RETRY_MAX);
        if let Some(now) = ctl.ask(Msg::LocalHealth).await {
            me.encoders = now.into_iter().map(|(e, _, _)| e).collect();
        }
        let attempt = async {
            let client = Client::connect(&me.cluster.etcd, Some(options())).await?;
            let mut joined = read(client, me).await?;
            let lease = register(&mut joined.client, me).await?;
            Ok::<_, RegisterError>((joined, lease))
        };
        let (mut joined, lease) = match tokio::time::timeout(
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
        let changes = std::mem::take(&mut joined.changes);
        let report = ctl
            .ask(|reply| Msg::Cluster {
                changes,
                resync: true,
                reply,
            })
            .await;
        if let Some(Err(e)) = report {
            warn!("applying the cluster's state after etcd came back: {e}");
        }
        return Some((joined, lease));
    }
}
