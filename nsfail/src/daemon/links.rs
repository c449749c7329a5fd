//! The data plane on the interfaces that exist now: link events and a periodic sweep drive
//! the controller's readiness and re-attachment checks.

use super::{
    actor::{ControlHandle, Msg},
    *,
};

/// How often attachments and receive readiness are checked when no link event says so
/// sooner.
pub(super) const LINK_SWEEP: Duration = Duration::from_millis(500);

/// Keeps the data plane on the interfaces that exist now, and every local encoder able to
/// receive: on every link event in this namespace (an interface deleted, re-created, brought
/// up or down) and every [`LINK_SWEEP`] (a peer's GRO turned off in another namespace makes
/// no event here). The checks run on the blocking pool, one round at a time; the controller
/// applies what they found.
pub(super) async fn watch_links(ctl: ControlHandle, stop: CancellationToken) {
    let mut events = match rtnetlink::new_multicast_connection(&[rtnetlink::MulticastGroup::Link]) {
        Ok((conn, _handle, events)) => {
            tokio::spawn(conn);
            Some(events)
        }
        Err(e) => {
            warn!("link events unavailable ({e}); checking links every {LINK_SWEEP:?} only");
            None
        }
    };
    let mut sweep = tokio::time::interval(LINK_SWEEP);
    sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sweep.tick() => {},
            Some(_) = async {
                match events.as_mut() {
                    Some(ev) => ev.next().await,
                    None => std::future::pending().await,
                }
            } => {
                // A burst of events (a veth pair made, addressed, brought up) is one round.
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Some(ev) = events.as_mut() {
                    while let Some(Some(_)) = ev.next().now_or_never() {}
                }
            },
            () = stop.cancelled() => return,
        }
        let Some(targets) = ctl.ask(Msg::ReceiveTargets).await else {
            return;
        };
        let round = tokio::task::spawn_blocking(move || {
            targets
                .into_iter()
                .map(|(name, ifname, ns)| {
                    (name, crate::net::receive::ensure(&ifname, ns.as_deref()))
                })
                .collect::<Vec<_>>()
        });
        match round.await {
            Ok(verdicts) => {
                if ctl.ask(|done| Msg::Links(verdicts, done)).await.is_none() {
                    return;
                }
            }
            Err(e) => warn!("link check: {e}"),
        }
    }
}
