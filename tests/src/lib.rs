//! Pods for integration tests: a pod is a network namespace plus a cgroup v2
//! directory, wired to a per-test "node" namespace through a bridge. Nothing touches
//! the host's network: the node namespace has no route out, and every address used
//! lives only inside these namespaces. Guards remove everything on drop, also when a
//! test panics.

pub mod certs;
pub mod hbone;
pub mod kube_api;
pub mod pod;
pub mod sidecar;
pub mod tools;

pub use certs::Certs;
pub use pod::{Net, Pod};
pub use sidecar::{Placement, Sidecar};
