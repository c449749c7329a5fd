//! The persistent lab (`nsfail lab up` / `lab down`) through its library calls: `up` builds the
//! namespaces and starts detached processes, `down` removes exactly what `up` recorded. Every
//! test uses its own namespace prefix and lab directory, so it cannot touch a real lab or
//! another test, and a guard brings its lab down whatever happens.

use std::{fs, net::SocketAddr, path::Path, process::Command, time::Duration};

use nsfail::{
    lab::ctl::{self, LabCtlError, LabInfo, LabOptions, LabProcess, LabProtocol},
    net::netns,
    paths::{self, LabDir},
};
use nsfail_tests::{ChildGuard, srt, traffic::ask, unique, wait_for};

/// Brings the test's lab down when dropped, panics included.
struct LabGuard(LabOptions);

impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = ctl::down_with(&self.0) {
            eprintln!("lab down for {}: {e}", self.0.dir.display());
        }
    }
}

fn options(protocol: LabProtocol) -> LabOptions {
    let tag = unique("lc");
    LabOptions {
        encoders: 2,
        protocol,
        prefix: format!("{tag}-"),
        dir: std::env::temp_dir().join(format!("nsfail-lab-{tag}")),
    }
}

/// Sends a datagram from the ingest namespace to `addr`'s echo port; returns what came back
/// from that address and port. Up to 25 tries 200 ms apart: socat may still be starting.
fn echo(rt: &str, addr: &str) -> Option<Vec<u8>> {
    let target: SocketAddr = format!("{addr}:9000").parse().unwrap();
    let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
    netns::in_netns(rt, move || {
        ask(any, target, b"p", 25, Duration::from_millis(200))
    })
    .expect("enter the ingest namespace")
}

/// Streams from the ingest namespace to `addr`'s stream port (5000) until its receiver's
/// output file `out` has grown by ten datagrams (at most 15 s): plain datagrams for the UDP
/// lab, an SRT caller fed with them for the SRT lab.
fn stream_into(rt: &str, protocol: LabProtocol, addr: &str, out: &Path) -> Option<()> {
    let from = srt::size(out);
    let grown = || (srt::size(out) >= from + 10 * srt::DATAGRAM as u64).then_some(());
    match protocol {
        LabProtocol::Srt => {
            let uri = format!("srt://{addr}:5000?mode=caller");
            let feed = format!("udp://{}", srt::FEED);
            let _caller = ChildGuard::spawn(
                "ip",
                &["netns", "exec", rt, "srt-live-transmit", "-q", &feed, &uri],
            );
            let _feed = srt::Feeder::start(rt);
            wait_for(Duration::from_secs(15), grown)
        }
        LabProtocol::Udp => {
            let target: SocketAddr = format!("{addr}:5000").parse().unwrap();
            let sock = netns::in_netns(rt, || std::net::UdpSocket::bind("0.0.0.0:0"))
                .expect("enter the ingest namespace")
                .expect("bind");
            // One datagram every 5 ms, as the SRT feeder sends: at most 3,000 (15 s).
            (0..3000).find_map(|i: u32| {
                let mut p = vec![0x47u8; srt::DATAGRAM];
                p[1..5].copy_from_slice(&i.to_be_bytes());
                sock.send_to(&p, target).expect("send");
                std::thread::sleep(Duration::from_millis(5));
                grown()
            })
        }
    }
}

fn up_then_down(protocol: LabProtocol) {
    let opts = options(protocol);
    let guard = LabGuard(opts.clone());
    let info = ctl::up(&opts).expect("lab up");
    let prefix = &opts.prefix;
    let rt = format!("{prefix}rt");

    let expected: Vec<String> = ["rt", "src", "ea", "eb"]
        .iter()
        .map(|n| format!("{prefix}{n}"))
        .collect();
    assert_eq!(info.namespaces, expected);
    for ns in &info.namespaces {
        assert!(paths::netns(ns).exists(), "namespace {ns} missing");
    }

    // An SRT listener answers its own health check: no echo beside it (issue 14).
    let mut roles = match protocol {
        LabProtocol::Srt => vec!["enc-a-receiver", "enc-b-receiver", "rt-service"],
        LabProtocol::Udp => vec![
            "enc-a-receiver",
            "enc-a-echo",
            "enc-b-receiver",
            "enc-b-echo",
            "rt-service",
        ],
    };
    if protocol == LabProtocol::Srt {
        roles.push("src-relay");
    }
    roles.push("src-ffmpeg");
    let names: Vec<&str> = info.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, roles);
    for p in &info.processes {
        assert!(p.is_running(), "{} (pid {}) is not running", p.name, p.pid);
    }

    assert_eq!(ctl::status_with(&opts).expect("status"), Some(info.clone()));
    let refused = ctl::up(&opts).expect_err("a second lab up must be refused");
    assert_eq!(
        refused.to_string(),
        "lab is already up (nsfail lab down removes it)"
    );
    assert!(info.processes.iter().all(LabProcess::is_running));

    let text = fs::read_to_string(&info.config).expect("read the daemon config");
    let cfg: toml::Table = text.parse().expect("the daemon config is TOML");
    assert_eq!(cfg["ingest"]["interface"].as_str(), Some("ing"));
    assert_eq!(cfg["ingest"]["netns"].as_str(), Some(rt.as_str()));
    let encoders = cfg["encoder"].as_array().expect("[[encoder]]");
    assert_eq!(encoders.len(), 2);
    assert_eq!(encoders[1]["name"].as_str(), Some("enc-b"));
    assert_eq!(encoders[1]["address"].as_str(), Some("10.77.2.2"));
    assert_eq!(encoders[1]["interface"].as_str(), Some("veb"));
    let eb = format!("{prefix}eb");
    assert_eq!(encoders[1]["netns"].as_str(), Some(eb.as_str()));
    match protocol {
        LabProtocol::Srt => {
            assert_eq!(encoders[1]["health"]["kind"].as_str(), Some("srt"));
            // The port is the channel's: the one SRT channel the encoder serves.
            assert_eq!(encoders[1]["health"].get("port"), None);
        }
        LabProtocol::Udp => {
            assert_eq!(encoders[1]["health"]["port"].as_integer(), Some(9000))
        }
    }
    let channel = &cfg["channel"].as_array().expect("[[channel]]")[0];
    assert_eq!(channel["listen"].as_str(), Some("10.77.0.1:5000"));
    let protocol_name = match protocol {
        LabProtocol::Srt => "srt",
        LabProtocol::Udp => "udp",
    };
    assert_eq!(channel["protocol"].as_str(), Some(protocol_name));

    // The health-probe responders answer from the ingest namespace, as the daemon will ask.
    if protocol == LabProtocol::Udp {
        for addr in ["10.77.1.2", "10.77.2.2"] {
            assert!(echo(&rt, addr).is_some(), "no echo from {addr}:9000");
        }
    }
    // What reaches an encoder's stream port ends up in its output file: its receiver runs,
    // listens where the daemon config sends the stream, and writes where the record says.
    // (The lab's own source needs the daemon's data plane to reach the encoders.)
    assert_eq!(info.outputs.len(), 2);
    for ((encoder, path), addr) in info.outputs.iter().zip(["10.77.1.2", "10.77.2.2"]) {
        let wrote = stream_into(&rt, protocol, addr, path);
        assert!(
            wrote.is_some(),
            "nothing sent to {encoder}'s stream port reached {}: {} bytes",
            path.display(),
            srt::size(path)
        );
    }

    ctl::down_with(&opts).expect("lab down");
    for ns in &info.namespaces {
        assert!(!paths::netns(ns).exists(), "namespace {ns} left behind");
    }
    for p in &info.processes {
        assert!(!p.is_running(), "{} (pid {}) left running", p.name, p.pid);
    }
    assert!(!opts.dir.exists(), "lab directory left behind");
    assert_eq!(ctl::status_with(&opts).expect("status"), None);
    ctl::down_with(&opts).expect("lab down with nothing up");
    drop(guard);
}

#[test]
fn srt_lab_up_then_down_removes_exactly_it() {
    up_then_down(LabProtocol::Srt);
}

#[test]
fn udp_lab_up_then_down_removes_exactly_it() {
    up_then_down(LabProtocol::Udp);
}

#[test]
fn up_refuses_an_existing_namespace_and_leaves_it_alone() {
    let opts = options(LabProtocol::Srt);
    let _guard = LabGuard(opts.clone());
    let foreign = nsfail::lab::Netns::new(&format!("{}ea", opts.prefix)).expect("namespace");

    let err = ctl::up(&opts).expect_err("up must refuse");
    assert!(
        matches!(&err, LabCtlError::NamespaceExists(n) if *n == foreign.name),
        "unexpected error: {err}"
    );
    assert!(paths::netns(&foreign.name).exists());
    assert!(!paths::netns(&format!("{}rt", opts.prefix)).exists());
    assert_eq!(ctl::status_with(&opts).expect("status"), None);
    assert!(!opts.dir.exists(), "a refused up left its directory");
}

/// The start time of `pid` (field 22 of /proc/PID/stat).
fn start_time(pid: u32) -> u64 {
    let stat = fs::read_to_string(paths::proc_file(pid, "stat")).expect("stat");
    let after = &stat[stat.rfind(')').unwrap() + 1..];
    after.split_whitespace().nth(19).unwrap().parse().unwrap()
}

#[test]
fn down_signals_only_processes_that_are_still_the_recorded_ones() {
    let opts = options(LabProtocol::Srt);
    let _guard = LabGuard(opts.clone());
    let mut reused_cmdline = ChildGuard::spawn("sleep", &["31"]);
    let mut reused_start = ChildGuard::spawn("sleep", &["32"]);
    // Not a ChildGuard: lab down reaps it, after which its PID is not this test's to signal.
    #[expect(
        clippy::zombie_processes,
        reason = "lab down reaps it; the test checks that"
    )]
    let recorded = Command::new("sleep")
        .arg("33")
        .spawn()
        .expect("spawn sleep");
    // A spawned child may still be inside execve, showing no command line yet.
    for (pid, arg) in [
        (reused_cmdline.pid() as u32, "31"),
        (reused_start.pid() as u32, "32"),
        (recorded.id(), "33"),
    ] {
        let shown = format!("sleep\0{arg}\0");
        wait_for(Duration::from_secs(5), || {
            (fs::read(paths::proc_file(pid, "cmdline")).ok()? == shown.as_bytes()).then_some(())
        })
        .expect("sleep did not start");
    }
    let record = |pid: u32, cmdline: &[&str], start: u64| LabProcess {
        name: format!("sleep-{pid}"),
        netns: String::new(),
        pid,
        start_time: start,
        cmdline: cmdline.iter().map(|s| s.to_string()).collect(),
        log: opts.dir.join("sleep.log"),
    };
    let info = LabInfo {
        dir: opts.dir.clone(),
        protocol: LabProtocol::Srt,
        config: opts.dir.join("nsfail.toml"),
        namespaces: Vec::new(),
        processes: vec![
            // The PID now runs another program than the one recorded.
            record(
                reused_cmdline.pid() as u32,
                &["sleep", "99"],
                start_time(reused_cmdline.pid() as u32),
            ),
            // Same program, but started at another time: another process.
            record(
                reused_start.pid() as u32,
                &["sleep", "32"],
                start_time(reused_start.pid() as u32) + 1,
            ),
            record(recorded.id(), &["sleep", "33"], start_time(recorded.id())),
        ],
        outputs: Vec::new(),
    };
    let dir = LabDir::new(&opts.dir);
    fs::create_dir_all(dir.root()).unwrap();
    fs::write(dir.record(), serde_json::to_vec(&info).unwrap()).unwrap();

    ctl::down_with(&opts).expect("lab down");
    assert!(reused_cmdline.child.try_wait().unwrap().is_none());
    assert!(reused_start.child.try_wait().unwrap().is_none());
    assert!(
        !info.processes[2].is_running(),
        "the recorded process survived lab down"
    );
    assert!(!opts.dir.exists());
}
