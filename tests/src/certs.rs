//! Dev certificates from `sidecar certs` for pod tests.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::tools::sidecar_bin;

/// Dev certificates from `sidecar certs`, removed on drop.
pub struct Certs(PathBuf);

impl Certs {
    /// Makes a CA and one certificate per `name=namespace/serviceaccount` workload.
    pub fn new(tag: &str, workloads: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("sidecar-svc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cmd = Command::new(sidecar_bin());
        cmd.args(["certs", "--out"]).arg(&dir);
        for w in workloads {
            cmd.args(["--workload", w]);
        }
        let out = cmd.output().expect("sidecar certs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir)
    }

    /// The `identity:` section of a config using workload `name`'s files.
    pub fn identity(&self, name: &str) -> String {
        let d: &Path = &self.0.join(name);
        format!(
            "identity:\n  cert: {}\n  key: {}\n  bundle: {}\n",
            d.join("cert.pem").display(),
            d.join("key.pem").display(),
            d.join("bundle.pem").display()
        )
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
