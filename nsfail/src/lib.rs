//! nsfail: keeps live-video contribution streams flowing when the encoder receiving them dies.
//!
//! The module tree follows the architecture: `dataplane` owns every BPF map and link;
//! `paths` names every path; `netns` looks at interfaces and namespaces.

pub mod dataplane;
pub mod demo;
pub mod lab;
pub mod netns;
pub mod paths;

pub use dataplane::{Dataplane, DataplaneError, EncoderLink, EncoderSpec, XdpModeSetting};
