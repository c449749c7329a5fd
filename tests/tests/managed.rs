//! Managed encoders: nsfail makes the namespace, veth, addresses and routes, runs the command
//! inside, restarts it when it dies (the channel fails over meanwhile), and removes it all.

use std::{fs, net::SocketAddr, time::Duration};

use nsfail::lab::INGEST4;
use nsfail_tests::{
    PinDir,
    daemon::{Daemon, TempDir, active, cli, events, status},
    lab, srt,
    traffic::Echo,
    unique, wait_for,
};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// PIDs of the processes inside namespace `ns`.
fn pids_in(ns: &str) -> Vec<i32> {
    let out = std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn ns_exists(ns: &str) -> bool {
    nsfail::paths::netns(ns).exists()
}

#[test]
fn managed_encoder_lifecycle() {
    let lab = lab(1);
    let eb = &lab.encoders[0];
    let _echo = Echo::start(&eb.ns, sa(&format!("{}:9000", eb.addr4)));
    let dir = TempDir::new();
    let out_file = dir.path.join("mgd.ts");
    let ns = unique("mg");
    let host_if = unique("mh");
    let config = dir.path.join("nsfail.toml");
    let listener = format!(
        "exec srt-live-transmit -q 'srt://:7000?mode=listener' file://con > {}",
        out_file.display()
    );
    fs::write(
        &config,
        format!(
            "[ingest]\ninterface = \"ing\"\nnetns = \"{rt}\"\n\n\
             [[encoder]]\nname = \"mgd\"\naddress = \"10.78.5.2\"\ninterface = \"{host_if}\"\n\
             netns = \"{ns}\"\nspawn = {{ command = \"sh\", args = [\"-c\", \"{listener}\"] }}\n\
             health = {{ kind = \"flow\", interval_ms = 100, timeout_ms = 100, rise = 2, fall = 3 }}\n\n\
             [[encoder]]\nname = \"enc-b\"\naddress = \"{b}\"\ninterface = \"{b_if}\"\n\
             netns = \"{b_ns}\"\nhealth = {{ kind = \"udp\", port = 9000 }}\n\n\
             [[channel]]\nname = \"cam1\"\nlisten = \"10.77.0.1:5000\"\n\
             encoders = [\"mgd\", \"enc-b\"]\nport = 7000\nprotocol = \"srt\"\n",
            rt = lab.rt.name,
            b = eb.addr4,
            b_if = eb.host_if,
            b_ns = eb.ns.name,
        ),
    )
    .unwrap();
    let pins = PinDir::new();
    let daemon = Daemon::start(&config, &dir.path.join("nsfail.sock"), &pins);
    let sock = daemon.socket.clone();

    // Made by nsfail: namespace, veth (host side in the ingest namespace), address, route,
    // GRO on the inner side, and the process running inside.
    assert!(ns_exists(&ns), "namespace {ns} made");
    let link = lab
        .rt
        .exec("ip", &["-o", "addr", "show", "dev", &host_if])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("10.78.5.1/30"),
        "host side addressed"
    );
    let inner = lab
        .rt
        .exec("ip", &["-n", &ns, "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&inner.stdout).contains("10.78.5.2/30"),
        "inner side addressed"
    );
    let route = lab
        .rt
        .exec("ip", &["-n", &ns, "route", "show", "default"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&route.stdout).contains("via 10.78.5.1"),
        "default route"
    );
    let gro = lab
        .rt
        .exec("ip", &["netns", "exec", &ns, "ethtool", "-k", "eth0"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&gro.stdout).contains("generic-receive-offload: on"),
        "GRO on inside"
    );
    let first = wait_for(Duration::from_secs(5), || {
        let p = pids_in(&ns);
        (!p.is_empty()).then_some(p)
    })
    .expect("the encoder's process runs inside its namespace");

    // enc-b's SRT listener, for the stream after the failover.
    let b_out = dir.path.join("enc-b.ts");
    let _b_listener = srt::listener(&eb.ns, 7000, &b_out, None);

    // The lab stream reaches it.
    let _caller = srt::caller(&lab.src, &format!("{INGEST4}:5000"), None);
    let feed = srt::Feeder::start(&lab.src.name);
    let size = || fs::metadata(&out_file).map(|m| m.len()).unwrap_or(0);
    assert!(
        wait_for(Duration::from_secs(15), || (size() > 50_000).then_some(())).is_some(),
        "the managed encoder receives the stream"
    );
    assert_eq!(active(&sock, "cam1"), "mgd");

    // It dies: nsfail restarts it, and the channel fails over to enc-b meanwhile.
    for pid in &first {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let restarted = wait_for(Duration::from_secs(10), || {
        let p = pids_in(&ns);
        (!p.is_empty() && p.iter().all(|x| !first.contains(x))).then_some(p)
    });
    assert!(restarted.is_some(), "restarted: {:?}", events(&sock));
    let moved = wait_for(Duration::from_secs(5), || {
        (active(&sock, "cam1") == "enc-b").then_some(())
    });
    assert!(
        moved.is_some(),
        "failed over meanwhile: {:?}",
        events(&sock)
    );
    // The stream itself moved: enc-b's listener writes it.
    let b_from = srt::size(&b_out);
    let b_grew = wait_for(Duration::from_secs(20), || {
        (srt::size(&b_out) >= b_from + 10 * srt::DATAGRAM as u64).then_some(())
    });
    assert!(
        b_grew.is_some(),
        "the stream did not reach enc-b after the failover: {} bytes",
        srt::size(&b_out)
    );
    let ev = events(&sock);
    assert!(
        ev.iter()
            .any(|e| e["to"] == "mgd" && e["reason"].as_str().unwrap_or("").contains("restarting")),
        "{ev:?}"
    );
    drop(feed);

    // Removal takes everything away: process, veth, namespace.
    assert_eq!(cli(&sock, &["remove", "channel", "cam1"]).code, 0);
    let out = cli(&sock, &["remove", "encoder", "mgd"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let gone = wait_for(Duration::from_secs(10), || (!ns_exists(&ns)).then_some(()));
    assert!(gone.is_some(), "namespace {ns} removed");
    let link = lab.rt.exec("ip", &["link", "show", &host_if]);
    assert!(link.is_err(), "veth removed");

    // At run time, from the CLI.
    let name = unique("t");
    let out = cli(
        &sock,
        &[
            "encoder",
            "spawn",
            &name,
            "--address",
            "10.78.6.2",
            "--",
            "sleep",
            "600",
        ],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let spawned_ns = format!("nsf-{name}");
    let running = wait_for(Duration::from_secs(5), || {
        let p = pids_in(&spawned_ns);
        (!p.is_empty()).then_some(p)
    });
    assert!(running.is_some(), "spawned at run time");
    assert!(
        status(&sock)["encoders"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == name.as_str())
    );
    assert_eq!(cli(&sock, &["remove", "encoder", &name]).code, 0);
    let gone = wait_for(Duration::from_secs(10), || {
        (!ns_exists(&spawned_ns)).then_some(())
    });
    assert!(
        gone.is_some(),
        "runtime-spawned encoder's namespace removed"
    );
    drop(daemon);
}
