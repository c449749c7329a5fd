//! SRT across cluster hosts (issue 17): the callers a host learned are published in etcd, and
//! a repoint tells them to reconnect even when the host that learned them is frozen.

use std::{
    net::SocketAddrV4,
    time::{Duration, Instant},
};

use nsfail_tests::{
    cluster::{ROUTED_INGEST, log_of, routed_cluster_of},
    daemon::{TempDir, cli, placement},
    srt::{self, Capture, Feeder},
    wait_for,
};

/// Issue 17, "What must be shown" 1, SRT: a real srt-live-transmit caller streams to cam1's
/// ingest address, through host A (where the router sends the ingest address) to encoder eb
/// on host B, whose data plane learns the caller and publishes it in etcd. Host B freezes
/// (daemon SIGSTOP, uplink dropped at the router): the leader on A moves cam1 to ea and sends
/// the caller, which only B learned, its SHUTDOWN from the ingest address; the caller
/// reconnects and streams to ea. The time from the freeze to data at ea is printed.
#[test]
fn a_frozen_hosts_srt_caller_is_told_by_the_leader_and_streams_at_the_backup() {
    let c = routed_cluster_of("srt");
    let dir = TempDir::new();
    let (out_a, out_b) = (dir.path.join("ea.ts"), dir.path.join("eb.ts"));
    let _la = srt::listener(&c.w.ea, 7000, &out_a, None);
    let _lb = srt::listener(&c.w.eb, 7000, &out_b, None);
    let ingest: SocketAddrV4 = format!("{ROUTED_INGEST}:5000").parse().unwrap();
    let capture = Capture::start(&c.w.cl, ingest);
    let _feed = Feeder::start(&c.w.cl.name);
    let _caller = srt::caller(&c.w.cl, &ingest.to_string(), None);
    let at_b = wait_for(Duration::from_secs(15), || {
        (srt::size(&out_b) > 20_000).then_some(())
    });
    assert!(
        at_b.is_some(),
        "the caller streams to eb on B:\n{}\n{}",
        log_of(&c.cfg_a),
        log_of(&c.cfg_b)
    );
    assert_eq!(srt::size(&out_a), 0, "nothing at ea before the freeze");
    let published = wait_for(Duration::from_secs(5), || {
        let keys = c.w.etcd.history(&format!("{}callers/cam1/hb/", c.prefix));
        keys.into_iter().next()
    });
    let (key, value) = published.expect("hb publishes its SRT caller in etcd");
    let record: serde_json::Value = serde_json::from_slice(&value).unwrap();
    assert_eq!(record["listen"], ingest.to_string(), "{key}");
    let socket_id = record["socket_id"].as_u64().expect("a socket ID") as u32;
    let caller_addr: SocketAddrV4 = key.rsplit('/').next().unwrap().parse().unwrap();
    assert!(
        c.w.etcd
            .history(&format!("{}callers/cam1/ha/", c.prefix))
            .is_empty(),
        "ha did not learn the caller itself (B answered it)"
    );

    // Freeze B: its daemon stopped, its uplink's traffic dropped at the router.
    let frozen_at = Instant::now();
    let pid = nix::unistd::Pid::from_raw(c.b.child.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP hb");
    nsfail_tests::run(
        "ip",
        &[
            "netns",
            "exec",
            &c.w.rt.name,
            "nft",
            "add table netdev freeze; add chain netdev freeze in { type filter hook ingress \
             device \"rb\" priority 0; policy drop; }; add chain netdev freeze out { type \
             filter hook egress device \"rb\" priority 0; policy drop; }",
        ],
    );
    let at_a = wait_for(Duration::from_secs(10), || {
        (srt::size(&out_a) > 0).then(Instant::now)
    });
    // Continued whatever happened, so that it stops cleanly.
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    let at_a = at_a.unwrap_or_else(|| {
        panic!(
            "the caller streams at ea on A within 10 s of the freeze; shutdowns seen: {:?}\n{}",
            capture.shutdowns().len(),
            log_of(&c.cfg_a)
        )
    });
    assert_eq!(placement(&c.sock_a), [("cam1".to_owned(), "ea".to_owned())]);
    // B was frozen and cut off: a SHUTDOWN to the caller that arrived after the freeze was
    // sent by A, from the ingest address.
    let told: Vec<_> = capture
        .shutdowns()
        .into_iter()
        .filter(|d| d.at > frozen_at && d.to == caller_addr)
        .collect();
    assert!(
        told.iter()
            .any(|d| d.from == ingest && d.srt_shutdown() == Some(socket_id)),
        "A sent the caller B learned ({caller_addr}, ID {socket_id}) its SHUTDOWN from the \
         ingest address: {:?}; all SHUTDOWNs: {:?}; streaming at ea after {:?}\n{}",
        told.iter()
            .map(|d| (d.from, d.srt_shutdown()))
            .collect::<Vec<_>>(),
        capture
            .shutdowns()
            .iter()
            .map(|d| (
                d.to,
                d.srt_shutdown(),
                d.at.saturating_duration_since(frozen_at)
            ))
            .collect::<Vec<_>>(),
        at_a - frozen_at,
        cli(&c.sock_a, &["events"]).stdout + &log_of(&c.cfg_a)
    );
    let grew = wait_for(Duration::from_secs(5), || {
        (srt::size(&out_a) > 20_000).then_some(())
    });
    assert!(grew.is_some(), "the stream goes on at ea");
    println!(
        "host B frozen: the SRT caller streams at ea on A {:.0} ms later (1 s lease)",
        (at_a - frozen_at).as_secs_f64() * 1e3
    );
}
