//! Interfaces and network namespaces, through netlink and ioctls: looking interfaces up in
//! any namespace (named or not), veth, address and route plumbing (`plumb`, shared by managed encoders and the
//! lab), provisioning managed encoders' namespaces and veths, and
//! making sure a local encoder can receive XDP-redirected frames.
//!
//! Must not: touch BPF objects (that is `dataplane`), or decide anything about channels.

pub mod announce;
pub mod netns;
pub mod plumb;
pub mod provision;
pub mod receive;
pub mod route;
