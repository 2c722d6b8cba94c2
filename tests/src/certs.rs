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

    /// The folder holding everything (`ca.pem`, `ca-key.pem`, one folder per workload).
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// A new certificate for `workload` (`name=namespace/sa`) from the same CA, in
    /// `<dir>/<folder>/<name>`; returns `<dir>/<folder>`.
    pub fn reissue(&self, folder: &str, workload: &str) -> PathBuf {
        let out = self.0.join(folder);
        reissue(&self.0, &out, workload);
        out
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

/// Writes cert/key/bundle the way the kubelet updates a Secret volume: a new timestamped
/// folder, then an atomic rename of `..data`; the visible names link through `..data`.
pub fn kubelet_write(mount: &Path, generation: u32, from: &Path) {
    let versioned = mount.join(format!("..2026_11_23_{generation}"));
    std::fs::create_dir_all(&versioned).expect("dir");
    for name in ["cert.pem", "key.pem", "bundle.pem"] {
        std::fs::copy(from.join(name), versioned.join(name)).expect("copy");
        // Readable by the proxy's UID, as a Secret volume's files are by default.
        std::fs::set_permissions(
            versioned.join(name),
            std::os::unix::fs::PermissionsExt::from_mode(0o644),
        )
        .expect("chmod");
    }
    let tmp = mount.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(versioned.file_name().expect("name"), &tmp).expect("symlink");
    std::fs::rename(&tmp, mount.join("..data")).expect("swap ..data");
    for name in ["cert.pem", "key.pem", "bundle.pem"] {
        let link = mount.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("link");
        }
    }
}

/// `sidecar certs --ca <ca_dir> --out <out> --workload <workload>`: a new certificate
/// from an existing CA, as a rotation brings.
pub fn reissue(ca_dir: &Path, out: &Path, workload: &str) {
    reissue_valid_for(ca_dir, out, workload, None);
}

/// As [`reissue`], valid for `seconds` from now when given (short-lived
/// certificates, to see expiry).
pub fn reissue_valid_for(ca_dir: &Path, out: &Path, workload: &str, seconds: Option<u32>) {
    let mut cmd = Command::new(sidecar_bin());
    cmd.args(["certs", "--out"])
        .arg(out)
        .arg("--ca")
        .arg(ca_dir)
        .args(["--workload", workload]);
    if let Some(seconds) = seconds {
        cmd.args(["--seconds", &seconds.to_string()]);
    }
    let done = crate::tools::output_within(&mut cmd, std::time::Duration::from_secs(20));
    assert!(
        done.status.success(),
        "sidecar certs --ca: {}",
        String::from_utf8_lossy(&done.stderr)
    );
}

/// The serial of the certificate in `pem`, lower-case hex without leading zeros, as
/// the sidecar shows it (`/pool`) and `openssl s_client` prints it.
pub fn serial_of(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(pem)
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
    text.trim()
        .trim_start_matches("serial=")
        .trim_start_matches('0')
        .to_string()
}
