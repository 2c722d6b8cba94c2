//! `cargo xtask demo`: three pods on a private bridge, each with its sidecar; an
//! unmodified curl in the client pod's app cgroup talks to a server pod over HBONE
//! (HTTP/2 CONNECT over pooled mTLS), then to a service's virtual address balanced
//! across both server pods. Prints what the kernel captured, the pool (several
//! application connections on one mTLS connection) and what the proxy carried, then
//! cleans up.

use std::path::Path;

use anyhow::{Context, Result, bail};
use sidecar_tests::{
    Certs, Net, Placement, Sidecar,
    tools::{Background, attached_programs, firewall_rules},
};

use super::{curl, http_server, step, strip_ansi};

/// The demo service's virtual address: no route to it exists anywhere.
const VIP: &str = "198.19.0.10:80";

/// Runs the demo with the config file's service; `bin` holds the release binaries.
pub fn run(bin: &Path) -> Result<()> {
    let firewall_before = firewall_rules();

    step("Creating three pods (network namespace + cgroup v2) on a private bridge");
    let mut net = Net::new("demo");
    let client = net.pod("client");
    let server = net.pod("server");
    let server2 = net.pod("server2");
    println!(
        "  client pod: {} / {}   cgroup {}",
        client.ip4,
        client.ip6,
        client.cgroup.display()
    );
    println!(
        "  server pods: {} / {} and {} / {}",
        server.ip4, server.ip6, server2.ip4, server2.ip6
    );

    step("Starting an HTTP server in each server pod on :8080 (bound to the pod IPs only)");
    let _http: Vec<Background> = [&server, &server2]
        .iter()
        .map(|pod| http_server(pod, bin))
        .collect();

    step("Issuing dev certificates (sidecar certs): client = shop/cart, server = shop/db");
    let certs = Certs::new("demo", &["client=shop/cart", "server=shop/db"]);
    let identity = |who: &str| certs.identity(who);

    step(
        "Starting the server pods' sidecars: HBONE on :15008, strict (only HBONE gets in), only spiffe://cluster.local/ns/shop/*",
    );
    let server_config = format!(
        "{}inbound:\n  mode: strict\n  allow: ['spiffe://cluster.local/ns/shop/*']\n",
        identity("server")
    );
    let server_sidecar = Sidecar::start(&server, &server_config, Placement::InPodCgroup);
    let server2_sidecar = Sidecar::start(&server2, &server_config, Placement::InPodCgroup);

    step(
        "Starting the client pod's sidecar (connect4/connect6/sock_ops on its cgroup; HBONE to the pod network)",
    );
    let client_config = format!(
        "{}mesh:\n  cidrs: [198.18.0.0/24, 'fd00:5c::/64']\n\
         services:\n- name: db\n  addresses: ['{VIP}']\n  policy: round_robin\n  \
         endpoints: ['{}:8080', '{}:8080']\n  server_identity: spiffe://cluster.local/ns/shop/sa/db\n",
        identity("client"),
        server.ip4,
        server2.ip4,
    );
    let sidecar = Sidecar::start(&client, &client_config, Placement::InPodCgroup);
    for line in attached_programs(&client.cgroup) {
        println!(
            "  bpftool cgroup show: {}",
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        );
    }

    for url in [
        format!("http://{}:8080/hello", server.ip4),
        format!("http://[{}]:8080/hello", server.ip6),
    ] {
        step(&format!("App in the client pod runs: curl {url}"));
        let out = client
            .app("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-w",
                "  (curl's socket was connected to %{remote_ip})\n",
                &url,
            ])
            .output()
            .context("curl")?;
        print!("  {}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    step(&format!(
        "Service db: the app curls the virtual address {VIP} (routed nowhere) 4 times"
    ));
    for _ in 0..4 {
        print!("  {}", curl(&client, &format!("http://{VIP}/"))?);
    }
    for s in sidecar
        .admin_json("/services")
        .as_array()
        .into_iter()
        .flatten()
    {
        for e in s["endpoints"].as_array().into_iter().flatten() {
            println!(
                "  /services: {} endpoint {} health={} mtls={} attempts_ok={}",
                s["name"], e["address"], e["health"], e["mtls"], e["attempts_ok"]
            );
        }
    }

    step("The client sidecar's HBONE pool (GET /pool): one mTLS connection per server pod");
    for t in sidecar.admin_json("/pool").as_array().into_iter().flatten() {
        println!(
            "  /pool: {} peer {}: {} application connections carried, {} open",
            t["destination"], t["peer_identity"], t["streams_carried"], t["streams"]
        );
    }
    let metrics = sidecar.metrics_text();
    for line in metrics.lines().filter(|l| l.starts_with("sidecar_hbone_")) {
        if line.contains("side=\"client\"") {
            println!("  metric: {line}");
        }
    }

    step("Both identities, as each sidecar recorded them");
    for (who, sc, direction) in [
        ("client", &sidecar, "outbound"),
        ("server", &server_sidecar, "inbound"),
    ] {
        for line in sc
            .metrics_text()
            .lines()
            .filter(|l| l.starts_with("sidecar_connections_opened_total"))
        {
            if line.contains(&format!("direction=\"{direction}\"")) {
                println!("  {who} sidecar: {line}");
            }
        }
    }

    step("What the client sidecar saw");
    let metrics = sidecar.metrics_text();
    let interesting = [
        "sidecar_kernel_events_total",
        "sidecar_connections_opened_total",
        "sidecar_connections_closed_total",
        "sidecar_connection_sent_bytes_total",
        "sidecar_connection_received_bytes_total",
    ];
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        if interesting.contains(&name) && !line.ends_with(" 0") {
            println!("  metric: {line}");
        }
    }
    for line in sidecar
        .logs()
        .lines()
        .filter(|l| l.contains("connection closed"))
    {
        println!("  log: {}", strip_ansi(line));
    }

    step("Firewall rules added: none (iptables-save / nft list ruleset unchanged)");
    if firewall_rules() != firewall_before {
        bail!("firewall rules changed during the demo");
    }

    step("SIGTERM: the sidecar drains and detaches");
    let status = sidecar.terminate();
    println!(
        "  sidecar exited: {status}; programs still attached: {}",
        attached_programs(&client.cgroup).len()
    );
    drop(server_sidecar);
    drop(server2_sidecar);
    drop(net);
    drop(certs);
    step("Cleaned up: pods, cgroups, namespaces and certificates removed");
    Ok(())
}
