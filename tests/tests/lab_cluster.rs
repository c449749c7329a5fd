//! `nsfail lab cluster up|down` (issue 17), through the real binary: the lab comes up with three
//! daemons (one leading), the router's ECMP route over the three hosts, the caller's UDP and
//! SRT streams delivered to encoders; `down` leaves no namespace, process, pin directory or
//! file of the lab. Every test uses its own prefix and directory, and a guard brings its lab
//! down whatever happens, panics included.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nsfail::{
    lab::{
        bird,
        cluster::{self, ClusterLabInfo, ClusterLabOptions, INGEST},
        ctl::LabCtlError,
    },
    paths,
};
use nsfail_tests::{
    daemon::{CliOut, nsfail_bin, status},
    srt, unique, wait_for,
};

/// The options of a lab unique to this test.
fn options() -> ClusterLabOptions {
    let tag = unique("lk");
    ClusterLabOptions {
        prefix: format!("{tag}-"),
        dir: std::env::temp_dir().join(format!("nsfail-labc-{tag}")),
        nsfail: nsfail_bin(),
    }
}

/// Runs `nsfail lab cluster ACTION --prefix P --dir D` (and `extra` arguments) to completion.
fn lab_cluster(opts: &ClusterLabOptions, action: &str, extra: &[&str]) -> CliOut {
    let out = Command::new(nsfail_bin())
        .args(extra)
        .args(["lab", "cluster", action, "--prefix", &opts.prefix, "--dir"])
        .arg(&opts.dir)
        .stdin(Stdio::null())
        .output()
        .expect("run nsfail");
    out.into()
}

/// Runs `nsfail lab cluster down` for the test's lab when dropped, panics included.
struct Guard(ClusterLabOptions);

impl Drop for Guard {
    fn drop(&mut self) {
        let out = lab_cluster(&self.0, "down", &[]);
        if out.code != 0 {
            eprintln!(
                "lab cluster down for {}: {}",
                self.0.dir.display(),
                out.stderr
            );
        }
    }
}

/// Everything of the lab that is still there: namespaces named with its prefix, processes in
/// one of the namespaces whose inodes are given (or whose command line names its directory),
/// pin directories, daemon locks and records, its directory.
fn leftovers(opts: &ClusterLabOptions, inodes: &[u64]) -> Vec<String> {
    let mut left = Vec::new();
    let named = |dir: &str| -> Vec<String> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.contains(&opts.prefix))
                    .map(|n| format!("{dir}/{n}"))
                    .collect()
            })
            .unwrap_or_default()
    };
    for dir in [
        paths::NETNS_DIR,
        paths::BPFFS,
        paths::LOCK_DIR,
        paths::ANNOUNCE_DIR,
        paths::CHILDREN_DIR,
    ] {
        left.extend(named(dir));
    }
    let dir = opts.dir.display().to_string();
    for entry in fs::read_dir(paths::PROC).expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let in_lab_netns = fs::metadata(paths::proc_netns(pid)).is_ok_and(|m| {
            inodes.contains(&m.ino()) && pid != std::process::id() // never this test
        });
        let cmdline = fs::read(paths::proc_file(pid, "cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        if in_lab_netns || cmdline.contains(&dir) {
            left.push(format!("process {pid}: {cmdline}"));
        }
    }
    if opts.dir.exists() {
        left.push(dir);
    }
    left
}

/// `status --json` of every host.
fn statuses(info: &ClusterLabInfo) -> Vec<serde_json::Value> {
    info.hosts.iter().map(|h| status(&h.socket)).collect()
}

/// The packets forwarded to encoder `name` and the replies from it, as its own host counts them.
fn encoder_packets(info: &ClusterLabInfo, name: &str) -> (u64, u64) {
    let host = info
        .hosts
        .iter()
        .find(|h| h.encoders.iter().any(|e| e == name))
        .expect("the encoder's host");
    let st = status(&host.socket);
    let e = st["encoders"]
        .as_array()
        .expect("encoders")
        .iter()
        .find(|e| e["name"] == name && e["local"] == true)
        .unwrap_or_else(|| panic!("{name} is local on {}: {st}", host.name))
        .clone();
    (
        e["packets"].as_u64().expect("packets"),
        e["replies"].as_u64().expect("replies"),
    )
}

/// The output file of encoder `name`.
fn output<'a>(info: &'a ClusterLabInfo, name: &str) -> &'a Path {
    &info
        .outputs
        .iter()
        .find(|(e, _)| e == name)
        .expect("an output per encoder")
        .1
}

/// Waits until channel `channel`'s active encoder has received at least 100 packets more
/// (counted by its host's data plane) and 100 kB more in its output file; returns the
/// encoder, its packets and replies counted.
fn delivered(info: &ClusterLabInfo, channel: &str) -> (String, u64, u64) {
    let active = wait_for(Duration::from_secs(10), || {
        statuses(info)[0]["channels"]
            .as_array()?
            .iter()
            .find(|c| c["name"] == channel)?["active"]
            .as_str()
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("{channel} has an active encoder"));
    let file = output(info, &active).to_path_buf();
    let (packets0, _) = encoder_packets(info, &active);
    let size0 = srt::size(&file);
    let grown = wait_for(Duration::from_secs(20), || {
        let (packets, replies) = encoder_packets(info, &active);
        (packets >= packets0 + 100 && srt::size(&file) >= size0 + 100_000)
            .then_some((packets, replies))
    });
    let (packets, replies) = grown.unwrap_or_else(|| {
        panic!(
            "{channel}'s stream reaches {active}: packets {:?} (from {packets0}), {} has {} \
             bytes (from {size0}); statuses: {:?}",
            encoder_packets(info, &active),
            file.display(),
            srt::size(&file),
            statuses(info)
        )
    });
    (active, packets, replies)
}

#[test]
fn cluster_lab_up_runs_three_hosts_and_both_streams_and_down_leaves_nothing() {
    let opts = options();
    let guard = Guard(opts.clone());
    let begun = Instant::now();
    let up = lab_cluster(&opts, "up", &["--json"]);
    assert_eq!(up.code, 0, "lab cluster up: {}", up.stderr);
    let info: ClusterLabInfo = serde_json::from_str(&up.stdout).expect("up --json");
    println!("lab cluster up: {:?}", begun.elapsed());
    // Whatever happens next, these namespaces' processes must be gone after down.
    let inodes: Vec<u64> = info
        .namespaces
        .iter()
        .map(|ns| fs::metadata(paths::netns(ns)).expect("namespace").ino())
        .collect();
    assert_eq!(info.namespaces.len(), 12, "{:?}", info.namespaces);
    assert_eq!(info.hosts.len(), 3);
    for p in &info.processes {
        assert!(p.is_running(), "{} (pid {}) is not running", p.name, p.pid);
    }

    let again = lab_cluster(&opts, "up", &[]);
    assert_eq!(again.code, 1, "a second up is refused: {}", again.stdout);
    assert!(
        again.stderr.contains("a cluster lab is already up"),
        "{}",
        again.stderr
    );

    // Three daemons up, reaching etcd, agreeing on one leader that says it leads.
    let agreed = wait_for(Duration::from_secs(10), || {
        let views: Vec<serde_json::Value> = statuses(&info)
            .into_iter()
            .map(|s| s["cluster"].clone())
            .collect();
        let leading: Vec<&serde_json::Value> =
            views.iter().filter(|v| v["leading"] == true).collect();
        let ok = views.iter().all(|v| v["etcd"] == true)
            && leading.len() == 1
            && views.iter().all(|v| v["leader"] == leading[0]["host"]);
        ok.then(|| leading[0]["host"].as_str().unwrap_or_default().to_owned())
    });
    let leader = agreed.unwrap_or_else(|| panic!("one leader: {:?}", statuses(&info)));
    let h1 = &info.hosts[0];
    let out = Command::new("ip")
        .args(["netns", "exec", &h1.netns])
        .arg(nsfail_bin())
        .args(["--json", "cluster", "status", "--config"])
        .arg(&h1.config)
        .output()
        .expect("cluster status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cluster: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let mut hosts: Vec<&str> = cluster["hosts"]
        .as_array()
        .expect("hosts")
        .iter()
        .filter_map(|h| h["host"].as_str())
        .collect();
    hosts.sort();
    assert_eq!(hosts, ["h1", "h2", "h3"], "{cluster}");
    assert_eq!(cluster["leader"], leader.as_str(), "{cluster}");
    assert_eq!(cluster["channels"], 2, "{cluster}");

    // The router's route to the ingest address: one next hop per host (ECMP).
    let mut uplinks: Vec<std::net::IpAddr> = info.hosts.iter().map(|h| h.uplink.into()).collect();
    uplinks.sort();
    assert_eq!(
        bird::next_hops(&info.router, &INGEST.to_string()).expect("ip route"),
        uplinks
    );

    // The caller's UDP and SRT streams reach the channels' active encoders, as counted by
    // their hosts' data planes and written by their receivers; SRT is answered (replies).
    let (udp_at, udp_packets, _) = delivered(&info, "cam-udp");
    let (srt_at, srt_packets, srt_replies) = delivered(&info, "cam-srt");
    assert!(srt_replies > 0, "{srt_at} answers its SRT caller");
    println!(
        "leader {leader}; cam-udp at {udp_at} ({udp_packets} packets), cam-srt at {srt_at} \
         ({srt_packets} packets, {srt_replies} replies); {:?} after up began",
        begun.elapsed()
    );

    let down_begun = Instant::now();
    let down = lab_cluster(&opts, "down", &[]);
    assert_eq!(down.code, 0, "lab cluster down: {}", down.stderr);
    println!("lab cluster down: {:?}", down_begun.elapsed());
    for p in &info.processes {
        assert!(!p.is_running(), "{} (pid {}) left running", p.name, p.pid);
    }
    assert_eq!(leftovers(&opts, &inodes), Vec::<String>::new());
    let none = lab_cluster(&opts, "down", &[]);
    assert_eq!(none.code, 0, "{}", none.stderr);
    assert!(none.stdout.contains("no cluster lab"), "{}", none.stdout);
    drop(guard);
}

#[test]
fn cluster_lab_up_failing_half_way_undoes_what_it_built() {
    let opts = ClusterLabOptions {
        // A daemon that exits at once: `up` fails after the network, etcd and the encoders.
        nsfail: PathBuf::from("/bin/false"),
        ..options()
    };
    let _guard = Guard(opts.clone());
    let err = cluster::up(&opts).expect_err("up must fail");
    assert!(
        matches!(&err, LabCtlError::Start { name, .. } if name.ends_with("-daemon")),
        "unexpected error: {err}"
    );
    assert_eq!(leftovers(&opts, &[]), Vec::<String>::new());
    assert_eq!(cluster::status(&opts).expect("status"), None);
}
