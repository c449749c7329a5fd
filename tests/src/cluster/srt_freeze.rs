//! An SRT caller whose active encoder's host freezes (issue 17, "What must be shown" 1, SRT):
//! measured here for both `tests/tests/cluster_srt.rs` and `cargo xtask bench cluster`.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use super::{ROUTED_INGEST, RoutedCluster, log_of};
use crate::{
    daemon::{TempDir, cli, placement},
    srt::{self, Capture, Feeder},
    wait_for,
};

/// What freezing host B did to an SRT caller streaming to eb on B.
#[derive(Debug)]
pub struct SrtFreeze {
    /// The caller as host B learned and published it in etcd, and its SRT socket ID.
    pub caller: SocketAddrV4,
    pub socket_id: u32,
    /// Freeze to the first data at ea on A (10 s at most).
    pub streaming_at_a: Option<Duration>,
    /// Whether a SHUTDOWN for the caller's socket ID reached it from the ingest address after
    /// the freeze (B was cut off: so host A sent it).
    pub told_by_a: bool,
    /// Host A's placement afterwards.
    pub placement_a: Vec<(String, String)>,
    /// Whether the stream at ea went on to 20 kB (5 s at most).
    pub grew: bool,
    /// Host A's events and log, and the SHUTDOWNs seen, when something went wrong.
    pub detail: String,
}

impl RoutedCluster {
    /// A real srt-live-transmit caller streams to cam1 (an `srt` channel: build with
    /// [`super::routed_cluster_of`]) through host A to eb on host B, which learns the caller
    /// and publishes it in etcd; then host B freezes ([`RoutedCluster::freeze_host_b`]).
    /// Panics when the set-up fails: the stream does not reach eb, B publishes no caller, or
    /// A learned the caller itself.
    pub fn freeze_b_srt(&self) -> SrtFreeze {
        let dir = TempDir::new();
        let (out_a, out_b) = (dir.path.join("ea.ts"), dir.path.join("eb.ts"));
        let _la = srt::listener(&self.w.ea, 7000, &out_a, None);
        let _lb = srt::listener(&self.w.eb, 7000, &out_b, None);
        let ingest: SocketAddrV4 = format!("{ROUTED_INGEST}:5000").parse().unwrap();
        let capture = Capture::start(&self.w.cl, ingest);
        let _feed = Feeder::start(&self.w.cl.name);
        let _caller = srt::caller(&self.w.cl, &ingest.to_string(), None);
        let at_b = wait_for(Duration::from_secs(15), || {
            (srt::size(&out_b) > 20_000).then_some(())
        });
        assert!(
            at_b.is_some(),
            "the caller streams to eb on B:\n{}\n{}",
            log_of(&self.cfg_a),
            log_of(&self.cfg_b)
        );
        assert_eq!(srt::size(&out_a), 0, "nothing at ea before the freeze");
        let published = wait_for(Duration::from_secs(5), || {
            let keys = self
                .w
                .etcd
                .history(&format!("{}callers/cam1/hb/", self.prefix));
            keys.into_iter().next()
        });
        let (key, value) = published.expect("hb publishes its SRT caller in etcd");
        let record: serde_json::Value = serde_json::from_slice(&value).unwrap();
        assert_eq!(record["listen"], ingest.to_string(), "{key}");
        let socket_id = record["socket_id"].as_u64().expect("a socket ID") as u32;
        let caller: SocketAddrV4 = key.rsplit('/').next().unwrap().parse().unwrap();
        assert!(
            self.w
                .etcd
                .history(&format!("{}callers/cam1/ha/", self.prefix))
                .is_empty(),
            "ha did not learn the caller itself (B answered it)"
        );

        let frozen_at = Instant::now();
        let frozen = self.freeze_host_b();
        let streaming_at_a = wait_for(Duration::from_secs(10), || {
            (srt::size(&out_a) > 0).then(|| frozen_at.elapsed())
        });
        drop(frozen);
        let shutdowns = capture.shutdowns();
        let told_by_a = shutdowns.iter().any(|d| {
            d.at > frozen_at
                && d.to == caller
                && d.from == ingest
                && d.srt_shutdown() == Some(socket_id)
        });
        let grew = streaming_at_a.is_some()
            && wait_for(Duration::from_secs(5), || {
                (srt::size(&out_a) > 20_000).then_some(())
            })
            .is_some();
        let detail = if told_by_a && grew {
            String::new()
        } else {
            let seen: Vec<_> = shutdowns
                .iter()
                .map(|d| {
                    (
                        d.from,
                        d.to,
                        d.srt_shutdown(),
                        d.at.saturating_duration_since(frozen_at),
                    )
                })
                .collect();
            format!(
                "SHUTDOWNs seen (from, to, ID, after the freeze): {seen:?}\n{}{}",
                cli(&self.sock_a, &["events"]).stdout,
                log_of(&self.cfg_a)
            )
        };
        SrtFreeze {
            caller,
            socket_id,
            streaming_at_a,
            told_by_a,
            placement_a: placement(&self.sock_a),
            grew,
            detail,
        }
    }
}
