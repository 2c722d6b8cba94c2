//! The descriptors of the pinned links a sidecar runs with: how the proxy, which may
//! not touch the pins (root's alone), checks that capture is still attached and
//! detaches it on a clean stop. Readiness and `sidecar_capture_attached` come from
//! here: a link someone detached (or whose cgroup or namespace went away) makes the
//! pod unready instead of silently uncaptured.

use std::os::fd::AsFd;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::gauge::ConstGauge,
};

/// Descriptors of the pinned links in use.
#[derive(Debug, Default)]
pub struct HeldLinks {
    links: std::sync::Mutex<Vec<(&'static str, std::os::fd::OwnedFd)>>,
}

impl HeldLinks {
    /// Keeps the descriptor of program `name`'s link.
    pub fn push(&self, name: &'static str, fd: std::os::fd::OwnedFd) {
        self.lock().push((name, fd));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(&'static str, std::os::fd::OwnedFd)>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The programs whose links are held.
    pub fn names(&self) -> Vec<&'static str> {
        self.lock().iter().map(|(name, _)| *name).collect()
    }

    /// Programs whose link is no longer attached (someone detached it, or its cgroup
    /// or namespace is gone); empty while capture is whole.
    pub fn detached(&self) -> Vec<&'static str> {
        self.lock()
            .iter()
            .filter(|(_, fd)| !crate::ebpf::pins::link_attached(fd.as_fd()).unwrap_or(false))
            .map(|(name, _)| *name)
            .collect()
    }

    /// Detaches every link.
    pub fn detach_all(&self) -> std::io::Result<()> {
        let mut result = Ok(());
        for (_, fd) in self.lock().drain(..) {
            if let Err(e) = crate::ebpf::pins::link_detach(fd.as_fd()) {
                result = Err(e);
            }
        }
        result
    }
}

/// `sidecar_capture_attached{program}`: 1 while the program's link is attached.
#[derive(Debug)]
pub struct CaptureCollector(pub std::sync::Arc<HeldLinks>);

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let detached = self.0.detached();
        let mut family = encoder.encode_descriptor(
            "capture_attached",
            "1 while the program's pinned link is attached to the pod, 0 once it is not",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for name in self.0.names() {
            let value = i64::from(!detached.contains(&name));
            ConstGauge::new(value).encode(family.encode_family(&[("program", name)])?)?;
        }
        Ok(())
    }
}
