//! Everything that touches the kernel programs: finding the cgroup, loading and
//! attaching the object, and the typed views of its maps the proxy uses.

pub mod cgroup;
pub mod held_links;
pub mod loader;
pub mod logs;
pub mod maps;
pub mod metrics;
pub mod orig_dst;
pub mod pins;
pub mod rules;

pub use loader::{Capture, CaptureError};
pub use maps::KernelMaps;
pub use orig_dst::OrigDstTable;
