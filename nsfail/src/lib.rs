//! nsfail: keeps live-video contribution streams flowing when the encoder receiving them dies.
//!
//! The folders are the architecture, and imports run down this list, never up:
//!
//! - `cli`: arguments, dispatch and rendering; it talks to the daemon through `api`.
//! - `daemon`: `nsfail run`: the serve loop, the socket, supervision of probes, link watch and
//!   managed encoders' processes.
//! - `metrics`: the Prometheus registry and its endpoint.
//! - `control`: the controller: effective config and runtime delta, the decision state
//!   machine, events, switchover timing, SRT reconnects.
//! - `health`: every probe kind, `flow` included.
//! - `config`: the TOML config, parsed into typed values once; it uses the data plane's
//!   vocabulary (XDP mode, allow rules).
//! - `net`: namespaces, veths, provisioning and receive readiness, through netlink.
//! - `dataplane`: the one owner of every BPF map and link, its policy vocabulary, the raw
//!   syscalls aya lacks.
//! - `api` (the socket protocol), `paths` (every path), `logging`, `heap` (giving memory
//!   back) and `child` (how nsfail's child processes are started, stopped and recognised)
//!   are leaves anyone may use.
//! - `lab`: the lab, the demo and bench helpers, outside the product's paths.

pub mod api;
pub mod child;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod heap;
pub mod lab;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod paths;

pub use dataplane::{Dataplane, DataplaneError, EncoderLink, EncoderSpec, XdpMode};
