//! Interfaces and network namespaces, through netlink and ioctls: looking interfaces up in
//! any namespace (named or not), provisioning managed encoders' namespaces and veths, and
//! making sure a local encoder can receive XDP-redirected frames.
//!
//! Must not: touch BPF objects (that is `dataplane`), or decide anything about channels.

pub mod netns;
pub mod provision;
pub mod receive;
