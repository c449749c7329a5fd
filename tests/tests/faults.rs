//! Faults injected into a running daemon, each with a stream running and an exact outcome: a
//! second daemon started by mistake, a read-only config directory during a failover, a
//! corrupt state file, an unprivileged client, a flood of spoofed SRT handshakes.

use std::{
    fs,
    net::SocketAddr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use nsfail::lab::{INGEST4, SRC4};
use nsfail_tests::{
    ChildGuard, PinDir,
    daemon::{
        Bed, Daemon, HEALTH_DESIGN, HEALTH_TOLERANT, Policy, TempDir, active, cli, events,
        lab_config_with, nsfail_bin, status,
    },
    frames::{Frame, inject},
    lab, run,
    traffic::{Echo, Receiver, send_burst, spawn_burst},
    wait_for,
};

const GAP: Duration = Duration::from_millis(1);
const LINGER: Duration = Duration::from_secs(2);

fn sa(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), port)
}

/// Channels and their active encoder, as `status --json` has them.
fn placement(socket: &Path) -> Vec<(String, String)> {
    status(socket)["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                c["active"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn reasons(socket: &Path) -> Vec<String> {
    events(socket)
        .iter()
        .map(|e| e["reason"].as_str().unwrap_or("").to_owned())
        .collect()
}

/// 1. A second `nsfail run` on the same data plane (another socket, a config without the
///    channels) is refused before it touches anything: the stream keeps every packet, and
///    the first daemon's channels are where they were.
#[test]
fn a_second_daemon_is_refused_before_it_touches_anything() {
    let bed = Bed::new(&Policy::tolerant());
    let enc = &bed.lab.encoders[0];
    let rx = Receiver::start(&enc.ns, sa(&enc.addr4, 7002));
    let before = placement(&bed.socket());
    let cam2 = sa(INGEST4, 5002);
    let burst = spawn_burst(
        &bed.lab.src.name,
        sa(SRC4, 41100),
        cam2,
        0..2000,
        GAP,
        LINGER,
    );

    let other = bed.dir.path.join("other.toml");
    let text = fs::read_to_string(&bed.config).unwrap();
    let no_channels = &text[..text.find("[[channel]]").unwrap()];
    fs::write(&other, no_channels).unwrap();
    let second = Command::new(nsfail_bin())
        .args(["--socket"])
        .arg(bed.dir.path.join("other.sock"))
        .args(["run", "--config"])
        .arg(&other)
        .arg("--pins")
        .arg(bed.pins.pins.root())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut second = ChildGuard { child: second };
    let code = wait_for(Duration::from_secs(10), || second.child.try_wait().unwrap())
        .expect("the second daemon exits by itself");
    let mut stderr = String::new();
    std::io::Read::read_to_string(second.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(code.code(), Some(1), "{stderr}");
    let first_pid = bed.daemon.child.pid();
    assert!(
        stderr.contains("another nsfail daemon serves the data plane")
            && stderr.contains(&format!("pid {first_pid}")),
        "names the running daemon: {stderr}"
    );

    let replies = burst.join().unwrap();
    assert_eq!(
        rx.settled(),
        (0..2000).collect(),
        "every packet of the stream arrived"
    );
    assert_eq!(replies.seqs(), (0..2000).collect());
    assert_eq!(
        placement(&bed.socket()),
        before,
        "the first daemon's channels are unchanged"
    );
    assert!(!bed.dir.path.join("other.sock").exists());
}

/// A bind mount of `dir` over itself, read-only: root gets EROFS as anyone would. Undone on
/// drop.
struct ReadOnly(PathBuf);

impl ReadOnly {
    fn new(dir: &Path) -> Self {
        let d = dir.to_str().unwrap();
        run("mount", &["--bind", d, d]);
        let ro = Self(dir.to_owned());
        run("mount", &["-o", "remount,bind,ro", d]);
        ro
    }
}

impl Drop for ReadOnly {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// 2. The config directory read-only, then the active encoder of three channels dies: every
///    channel moves (packets arrive at the backup), a critical event says persisting failed,
///    and persisting works again once the directory is writable.
#[test]
fn a_failover_finishes_on_a_read_only_disk() {
    let lab = lab(2);
    let echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&e.addr4, 9000)))
        .collect();
    let mut echoes = echoes.into_iter();
    let mut echo_a = echoes.next().unwrap();
    let _echo_b = echoes.next().unwrap();
    let dir = TempDir::new();
    let config = dir.path.join("nsfail.toml");
    let policy = Policy {
        health: [HEALTH_DESIGN, HEALTH_TOLERANT],
        ..Policy::default()
    };
    let text = lab_config_with(&lab, &policy)
        + "\n[[channel]]\nname = \"cam3\"\nlisten = \"10.77.0.1:5004\"\n\
           encoders = [\"enc-a\", \"enc-b\"]\nport = 7004\n";
    fs::write(&config, text).unwrap();
    // The socket lives elsewhere: only the config, state and events are read-only.
    let sockdir = TempDir::new();
    let pins = PinDir::new();
    let daemon = Daemon::start(&config, &sockdir.path.join("nsfail.sock"), &pins);
    let socket = daemon.socket.clone();
    for cam in ["cam1", "cam2", "cam3"] {
        assert_eq!(active(&socket, cam), "enc-a");
    }

    let ro = ReadOnly::new(&dir.path);
    echo_a.stop();
    let moved = wait_for(Duration::from_secs(5), || {
        placement(&socket)
            .iter()
            .all(|(_, a)| a == "enc-b")
            .then_some(())
    });
    assert!(
        moved.is_some(),
        "every channel moved: {:?}",
        placement(&socket)
    );
    let eb = &lab.encoders[1];
    for (cam, port) in [(5000u16, 7000u16), (5002, 7002), (5004, 7004)] {
        let rx = Receiver::start(&eb.ns, sa(&eb.addr4, port));
        send_burst(
            &lab.src,
            sa(SRC4, 41200),
            sa(INGEST4, cam),
            0..100,
            GAP,
            LINGER,
        );
        assert_eq!(
            rx.settled(),
            (0..100).collect(),
            "channel on port {cam} reaches enc-b"
        );
    }
    assert!(
        reasons(&socket)
            .iter()
            .any(|r| r.contains("persisting runtime state failed (critical)")),
        "{:?}",
        reasons(&socket)
    );

    drop(ro);
    let again = wait_for(Duration::from_secs(5), || {
        reasons(&socket)
            .iter()
            .any(|r| r == "runtime state persisted again")
            .then_some(())
    });
    assert!(
        again.is_some(),
        "persisting works again: {:?}",
        reasons(&socket)
    );
    let state = fs::read_to_string(dir.path.join("nsfail.state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    for cam in ["cam1", "cam2", "cam3"] {
        assert_eq!(state["active"][cam], "enc-b", "{state}");
    }
}

/// 6. A corrupt state file: the daemon starts from the config, moves the file aside and says
///    so.
#[test]
fn a_corrupt_state_file_is_moved_aside() {
    let lab = lab(2);
    let _echoes: Vec<Echo> = lab
        .encoders
        .iter()
        .map(|e| Echo::start(&e.ns, sa(&e.addr4, 9000)))
        .collect();
    let dir = TempDir::new();
    let config = dir.path.join("nsfail.toml");
    fs::write(&config, lab_config_with(&lab, &Policy::tolerant())).unwrap();
    let state = dir.path.join("nsfail.state.json");
    fs::write(&state, "{\"v\": 1, \"active\": {\"cam1\": ").unwrap();
    let pins = PinDir::new();
    let daemon = Daemon::start(&config, &dir.path.join("nsfail.sock"), &pins);
    assert_eq!(
        active(&daemon.socket, "cam1"),
        "enc-a",
        "started from the config"
    );
    let aside: Vec<_> = fs::read_dir(&dir.path)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("nsfail.state.json.bad-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "moved aside");
    assert_eq!(
        fs::read_to_string(aside[0].path()).unwrap(),
        "{\"v\": 1, \"active\": {\"cam1\": ",
        "kept as it was"
    );
    assert!(
        reasons(&daemon.socket)
            .iter()
            .any(|r| r.contains("unusable (critical)") && r.contains("bad-")),
        "{:?}",
        reasons(&daemon.socket)
    );
}

/// 7. The control socket is root's from the moment it exists: another user cannot connect.
///    State and events files are root's only.
#[test]
fn an_unprivileged_user_cannot_use_the_socket() {
    let bed = Bed::new(&Policy::tolerant());
    let socket = bed.socket();
    let mode = fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(nsfail_bin())
        .arg("--socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ermission denied"), "{stderr}");
    // A change, so that the state file exists.
    let out = cli(&socket, &["remap", "cam2", "enc-b"]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    for file in ["nsfail.state.json", "nsfail.events.jsonl"] {
        let mode = fs::metadata(bed.dir.path.join(file))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{file} mode {mode:o}");
    }
}

/// An SRT handshake's first 64 bytes: the control header addressed to `dest_id`, then the
/// CIF with `version`, Handshake Type `kind` (1 induction, -1 conclusion), socket ID `id` and
/// SYN cookie `cookie`.
fn srt_handshake(version: u32, kind: u32, dest_id: u32, id: u32, cookie: u32) -> Vec<u8> {
    let mut p = vec![0u8; 64];
    p[0] = 0x80;
    p[12..16].copy_from_slice(&dest_id.to_be_bytes());
    p[16..20].copy_from_slice(&version.to_be_bytes());
    p[28..32].copy_from_slice(&1500u32.to_be_bytes());
    p[32..36].copy_from_slice(&8192u32.to_be_bytes());
    p[36..40].copy_from_slice(&kind.to_be_bytes());
    p[40..44].copy_from_slice(&id.to_be_bytes());
    p[44..48].copy_from_slice(&cookie.to_be_bytes());
    p
}

/// cam1's learnt SRT callers, from `status --json`.
fn srt_callers(socket: &Path) -> Vec<(String, u64)> {
    status(socket)["channels"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == "cam1"))
        .and_then(|c| c["srt_peers"].as_array())
        .map(|peers| {
            peers
                .iter()
                .map(|p| {
                    let caller = p["caller"].as_str().unwrap_or_default().to_owned();
                    (caller, p["socket_id"].as_u64().unwrap_or_default())
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A sample of the metrics endpoint (in the lab's ingest namespace).
fn metric(bed: &Bed, line_start: &str) -> Option<f64> {
    let out = bed
        .lab
        .rt
        .exec("curl", &["-sf", "http://127.0.0.1:9464/metrics"])
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// 8. 100,000 SRT handshakes from 10,000 spoofed sources (crafted frames into the ingest
///    veth, half inductions and half conclusions with a made-up cookie) while the encoder
///    answers every one of them as a listener answers an induction (crafted frames out of
///    the encoder's veth): the caller table never holds more than the channel's limit and
///    ends holding the real caller alone, who still gets its SHUTDOWN on failover. Packets
///    to cam2 from outside its `sources` are never forwarded: they reach the ingest host
///    untouched and are counted.
#[test]
fn spoofed_srt_handshakes_do_not_fill_the_caller_table() {
    const LIMIT: usize = 4;
    const SOURCES: u32 = 10_000;
    const ROUNDS: u32 = 10;
    let cam1_extra =
        format!("sources = [\"10.77.0.0/24\", \"198.18.0.0/15\"]\nsrt_peer_limit = {LIMIT}");
    let mut bed = Bed::new(&Policy {
        cam1_extra: &cam1_extra,
        cam2_extra: "sources = [\"192.0.2.0/24\"]",
        ..Policy::tolerant()
    });
    let sock = bed.socket();
    let mut session = nsfail_tests::srt::Session::start(&bed, None);
    assert!(
        session.growth(0, 50_000, Duration::from_secs(15)).is_some(),
        "enc-a receives the SRT stream"
    );
    let caller = session.caller_on_wire();
    println!("the real caller: {caller:?}");
    let real = vec![(caller.0.to_string(), u64::from(caller.1))];
    assert_eq!(srt_callers(&sock), real, "the real caller is learnt");

    let (ing, enc_inner) = {
        let rt = bed.lab.rt.name.clone();
        let ns = bed.lab.encoders[0].ns.name.clone();
        let inner = bed.lab.encoders[0].inner_if.clone();
        (
            nsfail::net::netns::in_netns(&rt, || nsfail::net::netns::link("ing"))
                .unwrap()
                .unwrap(),
            nsfail::net::netns::in_netns(&ns, move || nsfail::net::netns::link(&inner))
                .unwrap()
                .unwrap(),
        )
    };
    let host_side = bed.lab.encoders[0].host_if.clone();
    let host_mac = nsfail::net::netns::in_netns(&bed.lab.rt.name, move || {
        nsfail::net::netns::link(&host_side)
    })
    .unwrap()
    .unwrap()
    .mac;
    let spoofed = |i: u32| -> SocketAddr {
        SocketAddr::new(
            std::net::Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8).into(),
            40_000,
        )
    };
    let ingest = sa(INGEST4, 5000);
    let encoder = sa(&bed.lab.encoders[0].addr4, 7000);
    let mut injected = (0usize, 0usize);
    let mut most = 0usize;
    for round in 0..ROUNDS {
        let to_ingest = (0..SOURCES).map(|i| {
            let id = round * SOURCES + i + 1;
            let hs = if i % 2 == 0 {
                srt_handshake(4, 1, 0, id, 0)
            } else {
                srt_handshake(5, u32::MAX, 0, id, 0x5eed_0000 ^ id)
            };
            let mut f = Frame::udp(spoofed(i), ingest, &hs);
            f.dmac = ing.mac;
            f.bytes()
        });
        let t0 = std::time::Instant::now();
        injected.0 += inject(&bed.lab.src, "s0", to_ingest).expect("inject into the ingest");
        let t1 = t0.elapsed();
        // The encoder answers each as a listener answers an induction (its cookie), which a
        // spoofed caller never sees: nothing of this may add a caller.
        let answers = (0..SOURCES).map(|i| {
            let id = round * SOURCES + i + 1;
            let mut f = Frame::udp(encoder, spoofed(i), &srt_handshake(5, 1, id, 77, 0xc00c));
            f.smac = enc_inner.mac;
            f.dmac = host_mac;
            f.bytes()
        });
        injected.1 += inject(
            &bed.lab.encoders[0].ns,
            &bed.lab.encoders[0].inner_if,
            answers,
        )
        .expect("inject from the encoder");
        let t2 = t0.elapsed();
        let held = srt_callers(&sock);
        println!(
            "round {round}: {injected:?} frames injected ({t1:?}, {t2:?}, status at {:?}), {} \
             callers held",
            t0.elapsed(),
            held.len()
        );
        most = most.max(held.len());
        assert!(
            held.len() <= LIMIT,
            "round {round}: {} callers: {held:?}",
            held.len()
        );
    }
    assert_eq!(
        injected,
        ((SOURCES * ROUNDS) as usize, (SOURCES * ROUNDS) as usize),
        "every crafted frame was sent"
    );
    assert_eq!(
        srt_callers(&sock),
        real,
        "the real caller alone (at most {most} held)"
    );

    // cam2 accepts 192.0.2.0/24 only: the lab's sender is outside.
    let mut rx = Receiver::start(
        &bed.lab.encoders[0].ns,
        sa(&bed.lab.encoders[0].addr4, 7002),
    );
    let on_host =
        nsfail_tests::srt::Capture::start(&bed.lab.rt, "10.77.0.2:40002".parse().unwrap());
    let before =
        metric(&bed, "nsfail_xdp_packets_total{reason=\"pass_not_source\"}").unwrap_or(0.0);
    send_burst(
        &bed.lab.src,
        sa(SRC4, 40002),
        sa(INGEST4, 5002),
        0..200,
        GAP,
        LINGER,
    );
    let host = wait_for(Duration::from_secs(5), || {
        let d = on_host.datagrams();
        (d.len() >= 200).then_some(d)
    })
    .unwrap_or_else(|| {
        panic!(
            "{} of 200 reached the ingest host",
            on_host.datagrams().len()
        )
    });
    assert!(
        host.iter()
            .all(|d| d.to.to_string() == format!("{INGEST4}:5002")),
        "untouched: still addressed to the ingest address"
    );
    assert!(
        rx.settled().is_empty(),
        "nothing from outside cam2's sources reached enc-a"
    );
    rx.kill();
    let counted = wait_for(Duration::from_secs(5), || {
        let now = metric(&bed, "nsfail_xdp_packets_total{reason=\"pass_not_source\"}")?;
        (now - before >= 200.0).then_some(now - before)
    });
    assert!(counted.is_some(), "pass_not_source counted the 200 packets");

    // The real caller is told on failover.
    session.kill(0);
    bed.echoes[0].stop();
    let killed = std::time::Instant::now();
    wait_for(Duration::from_secs(5), || {
        (active(&sock, "cam1") == "enc-b").then_some(())
    })
    .unwrap_or_else(|| panic!("cam1 did not fail over: {:?}", events(&sock)));
    session.assert_told_to_reconnect(caller, killed);
}
