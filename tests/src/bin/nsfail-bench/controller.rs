//! `controller`: the daemon's own cost with 100 encoders probed every 100 ms (`udp` echo
//! probes, each answered from the encoder's own address) and 50 channels, for 60 s: CPU time
//! as a share of one core, and resident memory. Five 12-second windows after a warm-up; the
//! figures are their median, min and max.

use std::{fs, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use nsfail::lab::Netns;
use nsfail_tests::{
    PinDir,
    daemon::{Daemon, TempDir},
    lab,
    traffic::Echo,
    unique,
};

use crate::report::{Figure, Goal, Limit, Report};

const ENCODERS: usize = 100;
const CHANNELS: usize = 50;
const WINDOW: Duration = Duration::from_secs(12);

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> Result<u64> {
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

pub fn run(reps: usize) -> Result<Report> {
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
    let echoes: Vec<Echo> = (0..ENCODERS)
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
        config += &format!(
            "[[encoder]]\nname = \"e{i:03}\"\naddress = \"{}\"\nmac = \"02:00:00:00:00:01\"\n\
             health = {{ kind = \"udp\", port = 9000, interval_ms = 100, timeout_ms = 100 }}\n\n",
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
    let daemon = Daemon::start(&path, &dir.path.join("nsfail.sock"), &pins);
    let pid = daemon.child.pid();
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("CLK_TCK")? as f64;

    std::thread::sleep(Duration::from_secs(3));
    let healthy = nsfail_tests::daemon::status(&daemon.socket)["encoders"]
        .as_array()
        .map_or(0, |e| e.iter().filter(|e| e["healthy"] == true).count());
    if healthy != ENCODERS {
        bail!("only {healthy} of {ENCODERS} encoders are healthy: the probes do not work");
    }
    let mut cpu = Figure::new("controller", "CPU, % of one core", "%");
    let mut rss = Figure::new("controller", "resident memory", "MiB");
    for _ in 0..reps {
        let t0 = cpu_ticks(pid)?;
        std::thread::sleep(WINDOW);
        let t1 = cpu_ticks(pid)?;
        cpu.samples
            .push((t1 - t0) as f64 / tick / WINDOW.as_secs_f64() * 100.0);
        rss.samples.push(rss_mib(pid)?);
    }
    drop(echoes);
    let mut report = Report::new(
        "controller",
        "Controller: 100 encoders probed every 100 ms",
        reps,
    );
    report.method.push(format!(
        "{ENCODERS} udp-probed encoders (interval 100 ms, timeout 100 ms), {CHANNELS} channels; \
         daemon CPU (utime+stime from /proc) per {}-s window, VmRSS at each window's end",
        WINDOW.as_secs()
    ));
    report.limits.push(Limit {
        name: "controller CPU".into(),
        value: cpu.summary().median,
        unit: "%".into(),
        goal: Goal::AtMost(1.0),
    });
    report.limits.push(Limit {
        name: "controller resident memory".into(),
        value: rss.summary().max,
        unit: "MiB".into(),
        goal: Goal::AtMost(30.0),
    });
    report.figures.extend([cpu, rss]);
    drop(daemon);
    Ok(report)
}
