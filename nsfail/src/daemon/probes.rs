//! The network health probes: one task per encoder, restarted when what it was made from
//! changes, stopped when the encoder goes away.

use super::*;

/// One probe task per encoder with a network health check, restarted when its check changes
/// and stopped when the encoder goes away.
///
/// `udp` and SRT induction probes are not tasks of their own: one batch prober
/// ([`health::batch`]) sends them all from one socket per address family, on one timer.
#[derive(Default)]
pub(super) struct Probes {
    running: BTreeMap<String, (ProbeTarget, CancellationToken)>,
    /// What the batch prober probes, once it runs.
    batch: Option<watch::Sender<BTreeMap<String, health::batch::Target>>>,
}

/// Everything a probe task was made from: a change to any of it replaces the task.
pub(super) type ProbeTarget = HealthCheck;

impl Probes {
    pub(super) fn sync(
        &mut self,
        checks: &[(String, HealthCheck)],
        tx: &mpsc::Sender<HealthUpdate>,
        stop: &CancellationToken,
    ) {
        let (batched, wanted): (BTreeMap<String, HealthCheck>, BTreeMap<String, HealthCheck>) =
            checks
                .iter()
                .cloned()
                .partition(|(_, c)| health::batch::Target::of(c).is_some());
        let batched: BTreeMap<String, health::batch::Target> = batched
            .iter()
            .filter_map(|(n, c)| Some((n.clone(), health::batch::Target::of(c)?)))
            .collect();
        match &self.batch {
            Some(targets) => {
                targets.send_if_modified(|t| {
                    let changed = *t != batched;
                    *t = batched.clone();
                    changed
                });
            }
            None if batched.is_empty() => {}
            None => {
                let (targets, rx) = watch::channel(batched);
                health::batch::spawn(rx, tx.clone(), stop.clone());
                self.batch = Some(targets);
            }
        }
        self.running.retain(|name, (target, cancel)| {
            let keep = wanted.get(name).is_some_and(|w| w == target);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        for (name, check) in wanted {
            if self.running.contains_key(&name) {
                continue;
            }
            let Some(probe) = health::probe_for(&check) else {
                continue;
            };
            // The daemon's own stop also stops every probe.
            let cancel = stop.child_token();
            health::spawn(name.clone(), probe, &check, tx.clone(), cancel.clone());
            self.running.insert(name, (check, cancel));
        }
    }
}

impl Drop for Probes {
    fn drop(&mut self) {
        for (_, cancel) in self.running.values() {
            cancel.cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::mpsc;
    use tokio_util::sync::CancellationToken;

    use super::Probes;
    use crate::config::Config;

    fn config_of(kind: &str, address: &str) -> Config {
        let text = format!(
            "[ingest]\ninterface = \"eth0\"\n\n[[encoder]]\nname = \"enc-a\"\n\
             address = \"{address}\"\nhealth = {{ kind = \"{kind}\", port = 9, interval_ms = 60000, \
             timeout_ms = 100 }}\n"
        );
        Config::parse(&text, "t.toml").unwrap()
    }

    /// A check that runs as a task of its own (`tcp`).
    fn config(address: &str) -> Config {
        config_of("tcp", address)
    }

    #[tokio::test]
    async fn udp_probes_go_to_the_one_batch_prober() {
        let (tx, _rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let mut probes = Probes::default();
        probes.sync(&config_of("udp", "127.0.0.2").health_checks(), &tx, &stop);
        assert!(probes.running.is_empty(), "no task of its own");
        let targets = probes
            .batch
            .as_ref()
            .expect("the batch prober runs")
            .subscribe();
        assert_eq!(targets.borrow()["enc-a"].at, "127.0.0.2:9".parse().unwrap());
        probes.sync(&config_of("udp", "127.0.0.3").health_checks(), &tx, &stop);
        assert_eq!(targets.borrow()["enc-a"].at, "127.0.0.3:9".parse().unwrap());
    }

    #[tokio::test]
    async fn a_probe_follows_its_encoders_address() {
        let (tx, _rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let mut probes = Probes::default();
        probes.sync(&config("127.0.0.2").health_checks(), &tx, &stop);
        let first = probes.running["enc-a"].1.clone();
        assert!(!first.is_cancelled());

        // Same settings: the running probe is kept.
        probes.sync(&config("127.0.0.2").health_checks(), &tx, &stop);
        assert!(!first.is_cancelled());

        // A new address: the old probe is cancelled and one for the new address runs.
        probes.sync(&config("127.0.0.3").health_checks(), &tx, &stop);
        assert!(
            first.is_cancelled(),
            "the probe of the old address was cancelled"
        );
        let (target, cancel) = &probes.running["enc-a"];
        assert_eq!(
            target.check,
            crate::config::Check::Tcp("127.0.0.3:9".parse().unwrap())
        );
        assert!(!cancel.is_cancelled());
        // The daemon's stop stops it too.
        let cancel = cancel.clone();
        stop.cancel();
        assert!(cancel.is_cancelled());
    }
}
