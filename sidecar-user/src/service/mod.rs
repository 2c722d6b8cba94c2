//! Services: virtual addresses balanced across endpoints.
//!
//! The accept path reads a [`Snapshot`] of the service table (one atomic load, no lock) and, for
//! a service, its current [`Balancer`] (another atomic load). Reloads and DNS answers
//! build new snapshots and swap them in; state that must survive a swap (active
//! connections, ejections, latency averages) lives in [`ServiceState`] and
//! [`EndpointState`], carried over by name and address.

pub mod discovery;
pub mod endpoint;
pub mod health_check;
pub mod lb;
pub mod metrics;
mod registry;
pub mod view;

pub use endpoint::{Endpoint, EndpointLease, EndpointState, Health};
pub use registry::{
    Admission, Balancer, Discovered, Overflow, Route, Service, ServiceState, Services, Snapshot,
    Workload,
};
