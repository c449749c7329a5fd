//! The `nsfail` binary. The daemon and its socket clients come with the controller; for now it
//! offers the data plane's teardown and the demo lab.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use nsfail::{Dataplane, paths::Pins};

#[derive(Parser)]
#[command(
    name = "nsfail",
    version,
    about = "Keeps live-video contribution streams flowing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detach and unpin the whole data plane (XDP, TC, maps), with or without a daemon.
    Teardown {
        /// The pin directory.
        #[arg(long, default_value = nsfail::paths::PIN_DIR)]
        pins: String,
    },
    /// The demo lab.
    Lab {
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand)]
enum LabCommand {
    /// Build a lab, stream through the data plane, remap half-way, then remove everything.
    Demo {
        /// How long to stream.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=3600))]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Teardown { pins } => Dataplane::teardown(&Pins::new(pins)).map_err(Into::into),
        Command::Lab {
            command: LabCommand::Demo { seconds },
        } => nsfail::demo::run(seconds),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nsfail: {e:#}");
            ExitCode::from(1)
        }
    }
}
