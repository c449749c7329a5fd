//! nsfail: keeps live-video contribution streams flowing when the encoder receiving them dies.
//!
//! The module tree follows the architecture: `config` → `controller` (decisions, events) →
//! `dataplane` (the one owner of every BPF map and link); `api` is the socket protocol shared
//! by `daemon` and `cli`; `netns` looks at interfaces and namespaces; `lab`/`labctl` build the
//! lab; `paths` names every path.

pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod dataplane;
pub mod health;
pub mod lab;
pub mod metrics;
pub mod net;
pub mod paths;

pub use dataplane::{Dataplane, DataplaneError, EncoderLink, EncoderSpec, XdpMode};
