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
    net::SocketAddr,
    time::{Duration, Instant},
};

use nsfail::net::announce;
use nsfail_tests::{
    Entered, Netns,
    cluster::{A_HOP, AnycastCluster, B_HOP, ROUTED_INGEST, hops as hop_set, log_of},
    daemon::{Daemon, TempDir, cli, events, nsfail_bin, status},
    hosts::{
        AnycastLab, FLOWS, TABLE, announce_in, bird, host_conf, next_hops as next_hops_of,
        router_conf, router_xdp, wire,
    },
    run,
    traffic::{Receiver, send_burst, spawn_burst},
    wait_for,
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

/// BFD for the tests that carry streams on a busy VM, where a false "down" would move flows
/// that must not move.
const TOLERANT_BFD: &str = "min rx interval 100 ms; min tx interval 100 ms; multiplier 5;";

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn channel() -> SocketAddr {
    sa(&format!("{ROUTED_INGEST}:5000"))
}

/// Flow `f`'s caller: port 41000 + f.
fn caller(f: u32) -> SocketAddr {
    SocketAddr::new("10.71.1.2".parse().unwrap(), 41000 + f as u16)
}

/// `ip route show table TABLE` in the namespace `ns`: nsfail's routes carry `proto 247`.
fn routes_in(ns: &Netns) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", &ns.name, "route", "show", "table", &TABLE.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn announces(ns: &Netns) -> bool {
    routes_in(ns).contains(&format!("{ROUTED_INGEST} dev "))
}

/// cam1's input packets as host A's data plane counted them.
fn packets_at_a(lab: &AnycastCluster) -> u64 {
    status(&lab.c.sock_a)["channels"][0]["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("cam1's packets: {}", status(&lab.c.sock_a)))
}

/// 10 packets on each flow, seqs from `base`: every flow is answered by eb, whichever host it
/// entered by. With `via_a`, the flows host A's data plane counted (the router sends them
/// through A).
fn flows(lab: &AnycastCluster, base: u32, via_a: bool) -> BTreeSet<u32> {
    let mut through_a = BTreeSet::new();
    for f in 0..FLOWS {
        let before = via_a.then(|| packets_at_a(lab));
        let seqs = base + f * 100_000..base + f * 100_000 + 10;
        let r = send_burst(
            &lab.c.w.cl,
            caller(f),
            channel(),
            seqs,
            Duration::from_millis(1),
            Duration::from_secs(2),
        );
        assert_eq!(r.seqs().len(), 10, "flow {f} answered");
        if before.is_some_and(|n| packets_at_a(lab) > n) {
            through_a.insert(f);
        }
    }
    through_a
}

/// Every flow streams 1,500 packets (1 a ms, seqs from `base`); `act` runs 500 ms in.
/// Returns each flow's packets that did not reach eb.
fn stream_while(lab: &AnycastCluster, rx: &Receiver, base: u32, act: impl FnOnce()) -> Vec<u32> {
    const PACKETS: u32 = 1500;
    let range = |f: u32| base + f * 100_000..base + f * 100_000 + PACKETS;
    let bursts: Vec<_> = (0..FLOWS)
        .map(|f| {
            spawn_burst(
                &lab.c.w.cl.name,
                caller(f),
                channel(),
                range(f),
                Duration::from_millis(1),
                Duration::from_secs(2),
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    act();
    for b in bursts {
        b.join().unwrap();
    }
    let seen = rx.settled();
    (0..FLOWS)
        .map(|f| PACKETS - range(f).filter(|s| seen.contains(s)).count() as u32)
        .collect()
}

fn drained(socket: &std::path::Path) -> serde_json::Value {
    status(socket)["cluster"]["drained"].clone()
}

/// `nsfail drain host` (issue 17): host A withdraws its route from its announce table, the
/// router's next hops shrink to host B and A's flows move there without a packet lost on any
/// flow (A still forwards what reaches it meanwhile); the drain is in `status` and the state
/// file, so a restarted daemon keeps its route withdrawn; `undrain host` announces it again
/// and the router sends flows through A again.
#[test]
fn drain_host_moves_the_hosts_flows_to_the_other_host_without_loss_and_outlives_a_restart() {
    let mut lab = AnycastCluster::new(TOLERANT_BFD);
    let w = &lab.c.w;
    let (ha, hb) = (&w.ha, &w.hb);
    let rx = Receiver::start(&w.eb, sa("10.71.4.2:7000"));
    let both = hop_set(&[A_HOP, B_HOP]);
    let only_b = hop_set(&[B_HOP]);
    assert!(announces(ha) && announces(hb), "{}", routes_in(ha));
    assert_eq!(drained(&lab.c.sock_a), false);
    let via_a = flows(&lab, 0, true);
    assert!(
        !via_a.is_empty() && via_a.len() < FLOWS as usize,
        "ECMP spread {FLOWS} flows over both hosts: {via_a:?} went through A"
    );

    // Drained while every flow streams.
    let sock_a = lab.c.sock_a.clone();
    let mut out = None;
    let mut moved = None;
    let lost = stream_while(&lab, &rx, 1_000, || {
        let at = Instant::now();
        out = Some(cli(&sock_a, &["drain", "host"]));
        moved = wait_for(Duration::from_secs(10), || {
            (lab.next_hops() == only_b).then(|| at.elapsed())
        });
    });
    let out = out.unwrap();
    assert_eq!(out.code, 0, "drain host: {}", out.stderr);
    let moved = moved.unwrap_or_else(|| panic!("router still has {:?}", lab.next_hops()));
    eprintln!("drained host A left the router's route after {moved:?}; lost per flow {lost:?}");
    assert_eq!(
        lost,
        vec![0; FLOWS as usize],
        "packets lost per flow across the drain"
    );
    assert!(!announces(ha), "A withdrew: {}", routes_in(ha));
    assert!(announces(hb), "B still announces: {}", routes_in(hb));
    assert_eq!(drained(&lab.c.sock_a), true);
    assert_eq!(drained(&lab.c.sock_b), false);
    assert!(
        events(&sock_a).iter().any(|e| e["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("host drained")),
        "a host drained event"
    );
    assert!(flows(&lab, 10_000, true).is_empty(), "no flow through A");
    // Again: nothing changes.
    assert_eq!(cli(&sock_a, &["drain", "host"]).code, 0);
    assert_eq!(drained(&lab.c.sock_a), true);

    // A's daemon restarts: still drained, its route still withdrawn once it runs again
    // (held for 3 of its 1 s announce rounds).
    assert_eq!(lab.c.a.stop(), Some(0), "{}", log_of(&lab.c.cfg_a));
    assert!(!announces(ha), "{}", routes_in(ha));
    lab.c.a = Daemon::start(&lab.c.cfg_a, &sock_a, &lab.c.pins.0);
    let serving = wait_for(Duration::from_secs(10), || {
        (!nsfail_tests::daemon::placement(&sock_a).is_empty()).then_some(())
    });
    assert!(serving.is_some(), "{}", log_of(&lab.c.cfg_a));
    assert_eq!(drained(&sock_a), true, "the drain outlives a restart");
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(3) {
        assert!(
            !announces(ha),
            "announced after the restart: {}",
            routes_in(ha)
        );
        assert_eq!(lab.next_hops(), only_b);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(flows(&lab, 20_000, true).is_empty(), "no flow through A");

    // Undrained: announced again, and the router sends flows through A again.
    let out = cli(&sock_a, &["undrain", "host"]);
    assert_eq!(out.code, 0, "undrain host: {}", out.stderr);
    assert!(announces(ha), "{}", routes_in(ha));
    assert_eq!(drained(&sock_a), false);
    let back = wait_for(Duration::from_secs(10), || {
        (lab.next_hops() == both).then_some(())
    });
    assert!(back.is_some(), "router's next hops {:?}", lab.next_hops());
    assert!(
        !flows(&lab, 30_000, true).is_empty(),
        "flows through A again"
    );
    // Host B followed throughout (longer than etcd's 5 s request timeout): it never lost
    // etcd, so its encoder never left the cluster.
    let log_b = log_of(&lab.c.cfg_b);
    assert!(!log_b.contains("etcd lost"), "{log_b}");
}

/// A cluster host's daemon killed (SIGKILL) leaves its routes, and forwarding, in place (issue
/// 17: the data plane outlives it); `nsfail teardown` with the daemon's pin directory
/// withdraws them from the recorded table in the recorded namespace, and removes the record:
/// the router's next hops shrink to the other host, which answers every flow.
#[test]
fn a_killed_hosts_routes_stay_until_teardown_withdraws_them() {
    let mut lab = AnycastCluster::new(TOLERANT_BFD);
    let _rx = Receiver::start(&lab.c.w.eb, sa("10.71.4.2:7000"));
    let both = hop_set(&[A_HOP, B_HOP]);
    let only_b = hop_set(&[B_HOP]);
    let record = lab.c.pins.0.pins.announce_record();
    assert!(record.exists(), "{} recorded", record.display());
    let via_a = flows(&lab, 0, true);
    assert!(!via_a.is_empty(), "no flow went through A");

    lab.c.a.child.child.kill().unwrap();
    lab.c.a.child.child.wait().unwrap();
    // Held over 3 s (A's lease expires after 1 s): its route and the router's next hop stay,
    // and A's data plane still forwards its flows.
    let hold = Instant::now();
    while hold.elapsed() < Duration::from_secs(3) {
        assert!(announces(&lab.c.w.ha), "{}", routes_in(&lab.c.w.ha));
        assert_eq!(lab.next_hops(), both);
        std::thread::sleep(Duration::from_millis(100));
    }
    flows(&lab, 1_000, false);
    assert!(record.exists());

    let root = lab.c.pins.0.pins.root().to_owned();
    let out = std::process::Command::new(nsfail_bin())
        .arg("teardown")
        .arg("--pins")
        .arg(&root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "teardown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "1 announced route(s) withdrawn from table {TABLE}"
        )),
        "{stdout}"
    );
    assert!(!announces(&lab.c.w.ha), "{}", routes_in(&lab.c.w.ha));
    assert!(announces(&lab.c.w.hb), "{}", routes_in(&lab.c.w.hb));
    assert!(!record.exists(), "{} removed", record.display());
    let gone = wait_for(Duration::from_secs(10), || {
        (lab.next_hops() == only_b).then_some(())
    });
    assert!(gone.is_some(), "router's next hops {:?}", lab.next_hops());
    // Every flow, those A took included, is answered through B.
    flows(&lab, 2_000, false);
}

/// Someone else's XDP program takes host A's ingest interface (nsfail's link detached with
/// bpftool, theirs attached in its place): A's data plane no longer sees the channel's
/// packets, so A withdraws its route, the router stops sending flows to it, and every flow is
/// answered through B. Once the interface is free again, A re-attaches and announces again.
#[test]
fn a_host_that_loses_its_ingest_program_withdraws_its_route_until_it_has_it_back() {
    let lab = AnycastCluster::new(TOLERANT_BFD);
    let _rx = Receiver::start(&lab.c.w.eb, sa("10.71.4.2:7000"));
    let both = hop_set(&[A_HOP, B_HOP]);
    let only_b = hop_set(&[B_HOP]);
    let up = wait_for(Duration::from_secs(10), || {
        (announces(&lab.c.w.ha) && lab.next_hops() == both).then_some(())
    });
    assert!(
        up.is_some(),
        "{} {:?}",
        routes_in(&lab.c.w.ha),
        lab.next_hops()
    );

    // A is stopped for the swap (a few ms), or it would re-attach between the two steps.
    let pid = nix::unistd::Pid::from_raw(lab.c.a.child.pid());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let link = lab.c.pins.0.pins.xdp_link("ua");
    let out = std::process::Command::new("bpftool")
        .args(["link", "detach", "pinned"])
        .arg(&link)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bpftool link detach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let foreign = router_xdp(&lab.c.w.ha, "ua");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let withdrawn = wait_for(Duration::from_secs(10), || {
        (!announces(&lab.c.w.ha)).then_some(())
    });
    assert!(
        withdrawn.is_some(),
        "A still announces without its program: {}\n{}",
        routes_in(&lab.c.w.ha),
        log_of(&lab.c.cfg_a)
    );
    let said = events(&lab.c.sock_a);
    let withdrew = format!("cluster: withdrew {ROUTED_INGEST}");
    for needle in [
        "ingest interface ua lost (critical)",
        "Device or resource busy",
        "another XDP program is attached to the interface",
        withdrew.as_str(),
    ] {
        assert!(
            said.iter()
                .any(|e| e["reason"].as_str().unwrap_or("").contains(needle)),
            "no event {needle:?}: {said:?}"
        );
    }
    assert!(announces(&lab.c.w.hb), "{}", routes_in(&lab.c.w.hb));
    let gone = wait_for(Duration::from_secs(10), || {
        (lab.next_hops() == only_b).then_some(())
    });
    assert!(gone.is_some(), "router's next hops {:?}", lab.next_hops());
    // Every flow is answered through B.
    flows(&lab, 3_000, false);

    drop(foreign);
    let back = wait_for(Duration::from_secs(10), || {
        (announces(&lab.c.w.ha) && lab.next_hops() == both).then_some(())
    });
    assert!(
        back.is_some(),
        "A back: {} {:?}\n{}",
        routes_in(&lab.c.w.ha),
        lab.next_hops(),
        log_of(&lab.c.cfg_a)
    );
    assert!(
        events(&lab.c.sock_a)
            .iter()
            .any(|e| e["reason"] == "XDP re-attached to ingest interface ua"),
        "no re-attach event"
    );
    let via_a = flows(&lab, 4_000, true);
    assert!(!via_a.is_empty(), "no flow went through A again");
}
