//! `nsfail add channel` / `remove channel` and `drain` / `undrain` on a cluster host.

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::*;
use crate::api::{Command, NewChannel};

/// How long a socket write waits for this host's watch to apply it.
const APPLIED_WAIT: Duration = Duration::from_secs(5);

/// `nsfail add channel` / `remove channel` on a cluster host: written to etcd (every host
/// applies it from its watch), answered once this host has applied it.
#[derive(Clone)]
pub(in crate::daemon) struct Writes {
    pub(in crate::daemon) client: Client,
    pub(in crate::daemon) cluster: Cluster,
    /// This host's name.
    pub(in crate::daemon) host: String,
    pub(in crate::daemon) applied: Applied,
}

impl Writes {
    /// `Some(answer)` for the requests a cluster host answers through etcd.
    pub(in crate::daemon) async fn intercept(
        &self,
        command: &Command,
        ctl: &ControlHandle,
    ) -> Option<Response> {
        match command {
            Command::AddChannel { channel } => Some(self.add_channel(channel, ctl).await),
            Command::RemoveChannel { name } => Some(self.remove_channel(name).await),
            Command::Drain { encoder } => Some(self.drain(encoder, ctl).await),
            Command::Undrain { encoder } => Some(self.undrain(encoder, command, ctl).await),
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
        // Checked against the cluster as this host holds it before anything is written, as a
        // single host checks it: a channel that cannot be applied is refused, not stored.
        match ctl
            .ask(|reply| Msg::CheckChannel(Box::new(ch.clone()), reply))
            .await
        {
            Some(Ok(())) => {}
            Some(Err(why)) => return Response::error(why),
            None => return Response::error("the daemon is stopping"),
        }
        let key = cluster::channel_key(&self.cluster, &ch.name);
        let value = json(&cluster::encode_channel(&ch));
        let mut client = self.client.clone();
        // Only a new key: another host may have added the same name since the check.
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)]);
        let written = match client.txn(txn).await {
            Ok(r) if !r.succeeded() => {
                return Response::error(format!(
                    "channel {:?} already exists in the cluster",
                    ch.name
                ));
            }
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

    /// A drain is the cluster's: written to `drains/<encoder>` (no lease), so that every host
    /// drains the encoder and a new leader keeps it drained; answered once this host drained
    /// it. Refused while etcd is unreachable (it could not outlive this host's term).
    async fn drain(&self, encoder: &str, ctl: &ControlHandle) -> Response {
        match ctl
            .ask(|reply| Msg::CheckDrain(encoder.to_owned(), reply))
            .await
        {
            Some(Ok(())) => {}
            Some(Err(why)) => return Response::error(why),
            None => return Response::error("the daemon is stopping"),
        }
        let record = cluster::DrainRecord {
            encoder: encoder.to_owned(),
            by: self.host.clone(),
        };
        let mut client = self.client.clone();
        let written = match client
            .put(
                cluster::drain_key(&self.cluster, encoder),
                json(&record),
                None,
            )
            .await
        {
            Ok(r) => r.header().map_or(0, |h| h.revision()),
            Err(e) => {
                return Response::error(format!(
                    "writing the drain to etcd: {e} (a cluster's drain is kept there; try \
                     again when etcd answers)"
                ));
            }
        };
        if let Err(e) = self.wait_applied(written).await {
            return Response::error(e);
        }
        match ctl
            .ask(|reply| Msg::DrainState(encoder.to_owned(), reply))
            .await
        {
            Some(Ok(())) => Response::ok(()),
            Some(Err(why)) => Response::error(format!(
                "drain of {encoder} written to etcd, but not made on this host: {why}"
            )),
            None => Response::error("the daemon is stopping"),
        }
    }

    /// Deletes `drains/<encoder>` (every host undrains it), then undrains it here as a single
    /// host would (which also answers for an encoder this host does not know).
    async fn undrain(&self, encoder: &str, command: &Command, ctl: &ControlHandle) -> Response {
        let mut client = self.client.clone();
        let written = match client
            .delete(cluster::drain_key(&self.cluster, encoder), None)
            .await
        {
            // Nothing deleted: no new revision to wait for.
            Ok(r) if r.deleted() == 0 => 0,
            Ok(r) => r.header().map_or(0, |h| h.revision()),
            Err(e) => {
                return Response::error(format!(
                    "deleting the drain from etcd: {e} (try again when etcd answers)"
                ));
            }
        };
        if let Err(e) = self.wait_applied(written).await {
            return Response::error(e);
        }
        // A drain this host held alone (from before drains were the cluster's) ends here; an
        // unknown encoder is said so.
        ctl.request(command.clone()).await
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
