//! SRT across cluster hosts (issue 17): the callers a host learned are published in etcd, and
//! a repoint tells them to reconnect even when the host that learned them is frozen.

use nsfail_tests::cluster::routed_cluster_of;

/// Issue 17, "What must be shown" 1, SRT: a real srt-live-transmit caller streams to cam1's
/// ingest address, through host A (where the router sends the ingest address) to encoder eb
/// on host B, whose data plane learns the caller and publishes it in etcd. Host B freezes
/// (daemon SIGSTOP, uplink dropped at the router): the leader on A moves cam1 to ea and sends
/// the caller, which only B learned, its SHUTDOWN from the ingest address; the caller
/// reconnects and streams to ea. The time from the freeze to data at ea is printed (`cargo
/// xtask bench cluster` has it over its trials).
#[test]
fn a_frozen_hosts_srt_caller_is_told_by_the_leader_and_streams_at_the_backup() {
    let c = routed_cluster_of("srt");
    let f = c.freeze_b_srt();
    let at_a = f.streaming_at_a.unwrap_or_else(|| {
        panic!(
            "the caller streams at ea on A within 10 s of the freeze\n{}",
            f.detail
        )
    });
    assert_eq!(f.placement_a, [("cam1".to_owned(), "ea".to_owned())]);
    // B was frozen and cut off: a SHUTDOWN to the caller that arrived after the freeze was
    // sent by A, from the ingest address.
    assert!(
        f.told_by_a,
        "A sent the caller B learned ({}, ID {}) its SHUTDOWN from the ingest address; \
         streaming at ea after {at_a:?}\n{}",
        f.caller, f.socket_id, f.detail
    );
    assert!(f.grew, "the stream goes on at ea\n{}", f.detail);
    println!(
        "host B frozen: the SRT caller streams at ea on A {:.0} ms later (1 s lease)",
        at_a.as_secs_f64() * 1e3
    );
}
