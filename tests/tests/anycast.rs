//! Anycast with BGP and BFD (issue 17): two ingest hosts announce the ingest address from
//! their announce tables (`net::announce`, as the daemon will), each through its own BIRD 2,
//! to an upstream router running BIRD, which installs one route with a next hop per host
//! (ECMP). A host that withdraws, or that freezes (its BIRD stopped by SIGSTOP and its
//! traffic dropped, the link left up: only BFD can tell), leaves the router's route.
//!
//! ```text
//!   h1 10.72.1.2 (u1) --- (r1) 10.72.1.1  r  10.72.2.1 (r2) --- (u2) 10.72.2.2 h2
//! ```

use std::{
    collections::BTreeSet,
    fs,
    time::{Duration, Instant},
};

use nsfail::net::announce;
use nsfail_tests::{
    Entered, Netns,
    daemon::TempDir,
    hosts::{
        AnycastLab, FLOWS, TABLE, announce_in, bird, host_conf, next_hops as next_hops_of,
        router_conf, wire,
    },
    run, wait_for,
};

const INGEST: &str = "203.0.113.88";
/// BFD: 100 ms intervals, down after 3 missed.
const BFD: &str = "min rx interval 100 ms; min tx interval 100 ms; multiplier 3;";

fn next_hops(r: &Netns) -> BTreeSet<String> {
    next_hops_of(r, INGEST)
}

fn hops(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn the_router_spreads_the_ingest_address_over_the_hosts_that_announce_it_and_bfd_drops_a_frozen_one()
 {
    let dir = TempDir::new();
    let (r, h1, h2) = (Netns::new("bgr"), Netns::new("bgh"), Netns::new("bgh"));
    wire(&r, "r1", "10.72.1.1", &h1, "u1", "10.72.1.2");
    wire(&r, "r2", "10.72.2.1", &h2, "u2", "10.72.2.2");
    announce_in(&h1, "u1", &[INGEST]);
    announce_in(&h2, "u2", &[INGEST]);
    let _router = bird(
        &r,
        &dir,
        "r",
        &router_conf(
            &dir,
            &[("10.72.1.1", "10.72.1.2"), ("10.72.2.1", "10.72.2.2")],
            BFD,
        ),
    );
    let mut bird1 = bird(
        &h1,
        &dir,
        "h1",
        &host_conf(&dir, "h1", "10.72.1.2", "10.72.1.1", BFD),
    );
    let _bird2 = bird(
        &h2,
        &dir,
        "h2",
        &host_conf(&dir, "h2", "10.72.2.2", "10.72.2.1", BFD),
    );

    // 1. Both hosts announce: one route, a next hop per host.
    let both = hops(&["10.72.1.2", "10.72.2.2"]);
    let seen = wait_for(Duration::from_secs(30), || {
        (next_hops(&r) == both).then_some(())
    });
    assert!(
        seen.is_some(),
        "router's next hops {:?}; logs: {}",
        next_hops(&r),
        fs::read_to_string(dir.path.join("r.log")).unwrap_or_default()
    );

    // 2. A host withdraws (drained): its next hop leaves, the other stays.
    {
        let _in = Entered::new(&h2);
        announce::withdraw(TABLE).unwrap();
    }
    let only1 = hops(&["10.72.1.2"]);
    assert!(
        wait_for(Duration::from_secs(10), || (next_hops(&r) == only1)
            .then_some(()))
        .is_some(),
        "after h2's withdrawal: {:?}",
        next_hops(&r)
    );
    announce_in(&h2, "u2", &[INGEST]);
    assert!(
        wait_for(Duration::from_secs(10), || (next_hops(&r) == both)
            .then_some(()))
        .is_some(),
        "h2 back: {:?}",
        next_hops(&r)
    );

    // 3. h1 freezes: its BIRD stopped, everything to and from it dropped, the link up. Only
    //    BFD can tell; the router drops h1's next hop.
    let frozen = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(bird1.pid()),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    run(
        "ip",
        &[
            "netns",
            "exec",
            &h1.name,
            "nft",
            "add table inet freeze; add chain inet freeze in \
             { type filter hook input priority 0; policy drop; }; add chain inet freeze out { \
             type filter hook output priority 0; policy drop; }",
        ],
    );
    let only2 = hops(&["10.72.2.2"]);
    let gone = wait_for(Duration::from_secs(5), || {
        (next_hops(&r) == only2).then(|| frozen.elapsed())
    });
    let gone = gone.unwrap_or_else(|| panic!("h1 still a next hop: {:?}", next_hops(&r)));
    // A figure, not a pass line (BFD's detection time is 300 ms; the rest is BIRD and the
    // kernel): `cargo xtask bench cluster` is where it belongs.
    eprintln!(
        "frozen h1 left the router's route after {} ms",
        gone.as_millis()
    );
    let _ = bird1.child.kill();
}

/// The data path under anycast (issue 17, "What must be shown" 2): flows from one caller,
/// spread by the router's ECMP (L4 hash) over two ingest hosts, all reach the channel's
/// encoder on host B (directly on B, through A by A's routed encoder and B's transit entry).
/// Host A freezes (its BIRD stopped, all its traffic dropped at the router, the link up):
/// the flows that went through A move to B when BFD withdraws A; those through B lose
/// nothing. The gap's figures are `cargo xtask bench cluster`'s.
#[test]
fn flows_through_a_frozen_host_move_to_the_other_and_the_rest_lose_nothing() {
    // A more tolerant BFD than the control-plane test: this one also carries streams on a
    // busy VM, where a false "down" would move flows that must not move.
    let lab = AnycastLab::new("min rx interval 100 ms; min tx interval 100 ms; multiplier 5;");
    let run = lab.freeze_a();
    assert!(
        !run.via_a.is_empty() && run.via_a.len() < FLOWS as usize,
        "ECMP spread {FLOWS} flows over both hosts: {:?} went through A",
        run.via_a
    );
    assert!(run.withdrawn.is_some(), "the router kept the frozen host");
    let mut lost_a = Vec::new();
    for f in &run.flows {
        if run.via_a.contains(&f.flow) {
            assert!(
                f.tail_arrived,
                "flow {} (through A) came back through B",
                f.flow
            );
            lost_a.push(f.lost);
        } else {
            assert_eq!(
                f.lost, 0,
                "flow {} through B lost {} packets",
                f.flow, f.lost
            );
        }
    }
    eprintln!(
        "flows through the frozen host lost {lost_a:?} packets; the router dropped it after {:?}",
        run.withdrawn
    );
}
