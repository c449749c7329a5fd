//! `controller`: the daemon's own cost with 100 encoders probed every 100 ms (half `udp` echo
//! probes, each answered from the encoder's own address, half `srt` induction probes answered
//! by idle `srt-live-transmit` listeners) and 50 channels, for 60 s: CPU time as a share of
//! one core, and resident memory. Five 12-second windows after a warm-up; the
//! figures are their median, min and max.
//!
//! Then the start-up series ([`crate::startup`]): 1,000, 10,000 and 100,000 channels.
//!
//! With `NSFAIL_BENCH_BASELINE=/path/to/nsfail` (another build, e.g. the previous commit's),
//! a second daemon from that binary runs at the same time on a lab of its own, both are
//! measured in the same windows, and their CPU ratio is taken window by window: the machine's
//! noise falls on both alike. Both then probe only `udp` (a baseline may not know `srt`).

use std::{
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use nsfail::lab::Netns;
use nsfail_tests::{
    PinDir,
    daemon::{Daemon, TempDir},
    lab,
    traffic::Echo,
    unique,
};

use crate::report::{Figure, Goal, Limit, Ratio, Report};

const ENCODERS: usize = 100;
const CHANNELS: usize = 50;
const WINDOW: Duration = Duration::from_secs(12);

/// utime + stime of a process, in clock ticks.
pub fn cpu_ticks(pid: i32) -> Result<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

fn rss_mib(pid: i32) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

/// One daemon on its own lab, with its 100 encoders' echo responders.
struct Bed {
    daemon: Daemon,
    _echoes: Vec<Echo>,
    _listeners: Vec<nsfail_tests::ChildGuard>,
    _pins: PinDir,
    _dir: TempDir,
    _echo_ns: Netns,
    _lab: nsfail::lab::Lab,
}

fn bed(bin: &Path, srt_half: bool) -> Result<Bed> {
    let lab = lab(0);
    // One namespace answers for all 100 encoders, each address with its own echo socket.
    let echo_ns = Netns::new(&unique("ech"))?;
    lab.rt
        .ip(&["link", "add", "ech", "type", "veth", "peer", "name", "echp"])?;
    lab.rt
        .ip(&["link", "set", "echp", "netns", &echo_ns.name])?;
    lab.rt.ip(&["addr", "add", "10.79.0.1/24", "dev", "ech"])?;
    lab.rt.ip(&["link", "set", "ech", "up"])?;
    echo_ns.ip(&["link", "set", "echp", "up"])?;
    let addr = |i: usize| format!("10.79.{}.{}", i / 200, 2 + i % 200);
    for i in 0..ENCODERS {
        echo_ns.ip(&["addr", "add", &format!("{}/16", addr(i)), "dev", "echp"])?;
    }
    lab.rt
        .ip(&["addr", "add", "10.79.0.1/16", "dev", "ech"])
        .ok();
    let srt = |i: usize| srt_half && i % 2 == 1;
    let listeners: Vec<nsfail_tests::ChildGuard> = (0..ENCODERS)
        .filter(|&i| srt(i))
        .map(|i| {
            let uri = format!("srt://{}:7100?mode=listener", addr(i));
            let shell = format!("exec srt-live-transmit -q '{uri}' file://con > /dev/null");
            nsfail_tests::spawn_in(&echo_ns, "sh", &["-c", &shell])
        })
        .collect();
    let echoes: Vec<Echo> = (0..ENCODERS)
        .filter(|&i| !srt(i))
        .map(|i| {
            Echo::start(
                &echo_ns,
                format!("{}:9000", addr(i))
                    .parse::<SocketAddr>()
                    .expect("addr"),
            )
        })
        .collect();

    let dir = TempDir::new();
    let mut config = format!(
        "[ingest]\ninterface = \"ing\"\nnetns = \"{}\"\nmetrics = \"127.0.0.1:0\"\n\n",
        lab.rt.name
    );
    for i in 0..ENCODERS {
        let (kind, port) = if srt(i) { ("srt", 7100) } else { ("udp", 9000) };
        config += &format!(
            "[[encoder]]\nname = \"e{i:03}\"\naddress = \"{}\"\nmac = \"02:00:00:00:00:01\"\n\
             health = {{ kind = \"{kind}\", port = {port}, interval_ms = 100, timeout_ms = 100 }}\n\n",
            addr(i)
        );
    }
    for c in 0..CHANNELS {
        config += &format!(
            "[[channel]]\nname = \"ch{c:02}\"\nlisten = \"10.77.0.1:{}\"\n\
             encoders = [\"e{:03}\", \"e{:03}\"]\nport = 7000\n\n",
            6000 + c,
            2 * c,
            2 * c + 1
        );
    }
    let path = dir.path.join("nsfail.toml");
    fs::write(&path, config)?;
    let pins = PinDir::new();
    let daemon = Daemon::start_bin(bin, &path, &dir.path.join("nsfail.sock"), &pins);
    Ok(Bed {
        daemon,
        _echoes: echoes,
        _listeners: listeners,
        _pins: pins,
        _dir: dir,
        _echo_ns: echo_ns,
        _lab: lab,
    })
}

pub fn run(reps: usize) -> Result<Report> {
    let baseline = std::env::var_os("NSFAIL_BENCH_BASELINE").map(PathBuf::from);
    let srt_half = baseline.is_none();
    let mut beds = vec![(
        "this build",
        bed(&nsfail_tests::daemon::nsfail_bin(), srt_half)?,
    )];
    if let Some(bin) = &baseline {
        beds.push(("baseline", bed(bin, false)?));
    }
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("CLK_TCK")? as f64;

    std::thread::sleep(Duration::from_secs(3));
    for (variant, b) in &beds {
        let healthy = nsfail_tests::daemon::status(&b.daemon.socket)["encoders"]
            .as_array()
            .map_or(0, |e| e.iter().filter(|e| e["healthy"] == true).count());
        if healthy != ENCODERS {
            bail!(
                "{variant}: only {healthy} of {ENCODERS} encoders are healthy: the probes do not work"
            );
        }
    }
    let mut cpu: Vec<Figure> = beds
        .iter()
        .map(|(v, _)| Figure::new("CPU, % of one core", v, "%"))
        .collect();
    let mut rss: Vec<Figure> = beds
        .iter()
        .map(|(v, _)| Figure::new("resident memory", v, "MiB"))
        .collect();
    for _ in 0..reps {
        let pids: Vec<i32> = beds.iter().map(|(_, b)| b.daemon.child.pid()).collect();
        let t0: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect::<Result<_>>()?;
        std::thread::sleep(WINDOW);
        for (k, &pid) in pids.iter().enumerate() {
            let t1 = cpu_ticks(pid)?;
            cpu[k]
                .samples
                .push((t1 - t0[k]) as f64 / tick / WINDOW.as_secs_f64() * 100.0);
            rss[k].samples.push(rss_mib(pid)?);
        }
    }
    let mut report = Report::new(
        "controller",
        "Controller: 100 encoders probed every 100 ms",
        reps,
    );
    report.method.push(format!(
        "{ENCODERS} encoders probed every 100 ms (timeout 100 ms), {}, {CHANNELS} channels; \
         daemon CPU (utime+stime from /proc) per {}-s window, VmRSS at each window's end",
        if srt_half {
            "half udp echo, half srt induction to idle srt-live-transmit listeners"
        } else {
            "all udp echo"
        },
        WINDOW.as_secs()
    ));
    if let Some(bin) = &baseline {
        report.method.push(format!(
            "baseline: {} on a lab of its own, running at the same time, measured in the same \
             windows",
            bin.display()
        ));
        report.ratios.push(Ratio::of(
            "this build / baseline, CPU",
            &cpu[0],
            &cpu[1],
            None,
        ));
        report.ratios.push(Ratio::of(
            "this build / baseline, resident memory",
            &rss[0],
            &rss[1],
            None,
        ));
    }
    report.limits.push(Limit {
        name: "controller CPU".into(),
        value: cpu[0].summary().median,
        unit: "%".into(),
        goal: Goal::AtMost(1.0),
    });
    report.limits.push(Limit {
        name: "controller resident memory".into(),
        value: rss[0].summary().max,
        unit: "MiB".into(),
        goal: Goal::AtMost(30.0),
    });
    report.figures.extend(cpu);
    report.figures.extend(rss);
    drop(beds);
    crate::startup::run(&mut report)?;
    Ok(report)
}

/// The start-up series alone (`nsfail-bench controller-startup`).
pub fn startup_only() -> Result<Report> {
    let mut report = Report::new(
        "controller-startup",
        "Controller: start-up with 1,000 to 100,000 channels",
        1,
    );
    crate::startup::run(&mut report)?;
    Ok(report)
}
