//! A stand-in for the controller in end-to-end tests: loads and pins a data plane, configures
//! it from its arguments, prints `ready`, then waits to be killed (the tests kill it with
//! SIGKILL and check that forwarding goes on).
//!
//! ```text
//! dp-holder PIN_DIR INGEST_IF [encoder NAME ADDR HOST_IF MAC]... [channel LISTEN PORT ACTIVE MEMBER,...]...
//! ```

use std::{io::Write, thread, time::Duration};

use anyhow::{Context, bail};
use nsfail::{Dataplane, EncoderLink, EncoderSpec, XdpMode, paths::Pins};

fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC {s}"))?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("MAC {s}: 6 bytes"))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [pin_dir, ingest, rest @ ..] = args.as_slice() else {
        bail!("usage: dp-holder PIN_DIR INGEST_IF [encoder ...] [channel ...]");
    };
    let mut dp = Dataplane::open(Pins::new(pin_dir))?;
    dp.attach_ingest(ingest, XdpMode::Native)?;
    let mut rest = rest;
    while let Some((word, tail)) = rest.split_first() {
        match (word.as_str(), tail) {
            ("encoder", [name, addr, host_if, mac, more @ ..]) => {
                dp.upsert_encoder(&EncoderSpec {
                    name: name.clone(),
                    addr: addr.parse()?,
                    mac: parse_mac(mac)?,
                    link: EncoderLink::Local {
                        ifname: host_if.clone(),
                    },
                })?;
                rest = more;
            }
            ("channel", [listen, port, active, members, more @ ..]) => {
                let members: Vec<&str> = members.split(',').collect();
                dp.set_channel(listen.parse()?, port.parse()?, active, &members, false)?;
                rest = more;
            }
            _ => bail!("cannot parse arguments at {word:?}"),
        }
    }
    println!("ready");
    std::io::stdout().flush()?;
    loop {
        thread::sleep(Duration::from_secs(3600));
    }
}
