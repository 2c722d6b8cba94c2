//! A server sidecar must prove it is the workload the destination should be, not
//! merely a member of the mesh: `mesh.identities` rules per destination network and a
//! service's `server_identity`, checked on every outbound mTLS handshake before any
//! application byte is sent.

use sidecar_tests::{
    Certs, Net, Placement, Pod, Sidecar,
    tools::{Background, echo_server, pod_tool_bin, run_json, wait_until},
};

const VIP: &str = "198.19.0.10:80";

fn tally(pod: &Pod, to: &str, count: usize) -> serde_json::Value {
    let mut cmd = pod.app(&pod_tool_bin());
    cmd.args(["tally", "--to", to, "--count", &count.to_string()]);
    run_json(cmd)
}

#[test]
fn a_server_with_the_wrong_identity_is_refused_before_any_byte() {
    let mut net = Net::new("identity");
    let client = net.pod("client");
    let cache1 = net.pod("cache1");
    let cache2 = net.pod("cache2");
    let db = net.pod("db");
    let certs = Certs::new(
        "identity",
        &[
            "client=shop/web",
            "cache1=shop/cache",
            "cache2=shop/cache",
            "db=shop/db",
        ],
    );
    let servers: Vec<(Background, String, Sidecar)> =
        [(&cache1, "cache1"), (&cache2, "cache2"), (&db, "db")]
            .into_iter()
            .map(|(pod, name)| {
                let (echo, dst) = echo_server(pod, 8080);
                let sidecar = Sidecar::start(pod, &certs.identity(name), Placement::InPodCgroup);
                (echo, dst, sidecar)
            })
            .collect();
    let db_id = "spiffe://cluster.local/ns/shop/sa/db";
    let config = format!(
        "{}mesh:\n  cidrs: [198.18.0.0/24]\n  identities:\n  - cidrs: [{}/32]\n    allow: ['{db_id}']\n\
         services:\n- name: db\n  addresses: ['{VIP}']\n  endpoints: ['{}']\n  \
         server_identity: {db_id}\n  retries: 0\n",
        certs.identity("client"),
        cache1.ip4,
        servers[1].1,
    );
    let sidecar = Sidecar::start(&client, &config, Placement::InPodCgroup);

    // cache1's address may only be served by the db identity: refused.
    let refused = tally(&client, &servers[0].1, 3);
    assert_eq!(refused["failed"], 3, "{refused}");
    // The service names its server identity; cache2 is not it: refused.
    let refused = tally(&client, VIP, 2);
    assert_eq!(refused["failed"], 2, "{refused}");
    assert_eq!(sidecar.closed("identity_mismatch"), 5);
    let logs = sidecar.logs();
    assert!(
        logs.contains(&format!(
            "server identity spiffe://cluster.local/ns/shop/sa/cache is refused: expected one of [{db_id}] (mesh.identities[0])"
        )),
        "{logs}"
    );
    assert!(
        logs.contains(&format!(
            "server identity spiffe://cluster.local/ns/shop/sa/cache is refused: expected {db_id} (the service's server_identity)"
        )),
        "{logs}"
    );
    // Not one application byte reached the refused servers' applications.
    for (_, _, server) in &servers[..2] {
        assert_eq!(
            server.metric(
                "sidecar_connection_sent_bytes_total",
                &[("direction", "inbound")]
            ),
            0.0
        );
    }
    // db is uncovered by the rule: any workload of the local trust domain may serve it.
    let ok = tally(&client, &servers[2].1, 3);
    assert_eq!(ok["ok"], 3, "{ok}");
    assert_eq!(
        sidecar.metric(
            "sidecar_connections_opened_total",
            &[("tls", "true"), ("peer_identity", db_id)]
        ),
        3.0
    );
}

#[test]
fn an_allow_list_reload_closes_open_connections_of_peers_no_longer_allowed() {
    let mut net = Net::new("allow-reload");
    let client = net.pod("client");
    let server = net.pod("server");
    let certs = Certs::new("allow-reload", &["client=shop/web", "server=shop/db"]);
    let (_echo, dst) = echo_server(&server, 8080);
    let server_config = |allow: &str| {
        format!(
            "{}inbound:\n  mode: strict\n  allow: ['{allow}']\n",
            certs.identity("server")
        )
    };
    let server_sidecar = Sidecar::start(
        &server,
        &server_config("spiffe://cluster.local/ns/shop/sa/web"),
        Placement::InPodCgroup,
    );
    let _client_sidecar = Sidecar::meshed_client(&client, &certs, "client");
    // One connection held open (enrol waits for a line on stdin that never comes).
    let mut app = client.app(&pod_tool_bin());
    app.args(["enrol", "--to", &dst])
        .stdin(std::process::Stdio::piped());
    let _held = sidecar_tests::tools::InFlight::start(app);
    let open = || server_sidecar.metric("sidecar_connections_open", &[("direction", "inbound")]);
    let five = std::time::Duration::from_secs(5);
    wait_until(five, "the held connection is open", || open() == 1.0);

    // The client's namespace is no longer allowed: its open connection is closed too.
    server_sidecar.write_config(&server_config("spiffe://cluster.local/ns/other/*"));
    wait_until(
        five,
        "the open connection of a peer no longer allowed is closed",
        || server_sidecar.closed("policy_denied") == 1 && open() == 0.0,
    );
    assert_eq!(
        server_sidecar.metric("sidecar_config_reloads_total", &[("result", "applied")]),
        1.0
    );
    let refused = tally(&client, &dst, 2);
    assert_eq!(refused["failed"], 2, "{refused}");
    assert!(
        server_sidecar
            .logs()
            .contains("the reloaded identity rules no longer allow this peer"),
        "{}",
        server_sidecar.logs()
    );
}

#[test]
fn outbound_mtls_to_a_plain_server_is_refused_and_nothing_goes_in_plaintext() {
    let mut net = Net::new("plain-server");
    let client = net.pod("client");
    let server = net.pod("server");
    let certs = Certs::new("plain-server", &["client=shop/web"]);
    // Plain TCP servers with no sidecar that record every byte they receive: on the
    // application's port, and on the HBONE port (something that is not HBONE).
    let record = |port: u16| std::env::temp_dir().join(format!("{}-received-{port}", net.id));
    let mut recorders: Vec<std::process::Child> = [8080u16, 15008]
        .iter()
        .map(|&port| {
            let mut cmd = server.app("socat");
            cmd.args([
                "-u",
                &format!("TCP-LISTEN:{port},bind={},fork,reuseaddr", server.ip4),
            ])
            .arg(format!("OPEN:{},creat,append", record(port).display()));
            cmd.spawn().expect("socat")
        })
        .collect();
    let sidecar = Sidecar::meshed_client(&client, &certs, "client");
    // Wait until both listen (a plain connect from outside the capture).
    for port in ["8080", "15008"] {
        wait_until(std::time::Duration::from_secs(5), "socat listens", || {
            client
                .outsider("nc")
                .args(["-z", &server.ip4.to_string(), port])
                .status()
                .is_ok_and(|s| s.success())
        });
    }
    let post_secret = || {
        let out = client
            .app("curl")
            .args(["-sS", "--max-time", "5", "-d", "SECRET-MARKER-51c2"])
            .arg(format!("http://{}:8080/", server.ip4))
            .output()
            .expect("curl");
        assert!(!out.status.success(), "the request went through");
    };
    post_secret();
    // The recorder on 15008 swallows the ClientHello and never answers: the
    // handshake times out.
    wait_until(
        std::time::Duration::from_secs(5),
        "handshake timed out",
        || sidecar.closed("timeout") == 1,
    );
    for socat in &mut recorders {
        let _ = socat.kill();
        let _ = socat.wait();
    }
    let app_port = std::fs::read(record(8080)).unwrap_or_default();
    let hbone_port = std::fs::read(record(15008)).unwrap_or_default();
    let _ = std::fs::remove_file(record(8080));
    let _ = std::fs::remove_file(record(15008));
    // Nothing went to the application's port; the HBONE port saw a TLS ClientHello
    // (record type 22) and never the request.
    assert!(app_port.is_empty(), "{app_port:?}");
    assert_eq!(hbone_port.first(), Some(&0x16), "{hbone_port:?}");
    assert!(
        !String::from_utf8_lossy(&hbone_port).contains("SECRET-MARKER"),
        "plaintext reached a server that is not a sidecar"
    );

    // With nothing on the HBONE port, the connect is refused: still nothing in
    // plaintext.
    let before = sidecar.closed("refused");
    post_secret();
    assert_eq!(sidecar.closed("refused"), before + 1);
}

#[test]
fn sixteen_mib_each_way_over_mtls_arrive_byte_exact() {
    let mut net = Net::new("mtls-bulk");
    let client = net.pod("client");
    let server = net.pod("server");
    let certs = Certs::new("mtls-bulk", &["client=shop/web", "server=shop/db"]);
    let (_echo, dst) = echo_server(&server, 8080);
    let server_sidecar = Sidecar::start(
        &server,
        &format!("{}inbound:\n  mode: strict\n", certs.identity("server")),
        Placement::InPodCgroup,
    );
    let _client_sidecar = Sidecar::meshed_client(&client, &certs, "client");
    // Eight connections: the eighth sends 16 MiB (and gets it echoed back), the
    // others random small payloads; half of them half-close.
    let mut cmd = client.app(&pod_tool_bin());
    cmd.args(["clients", "--to", &dst, "--connections", "8"])
        .args(["--big", &(16 * 1024 * 1024).to_string(), "--seed", "16"]);
    let summary = run_json(cmd);
    assert_eq!(summary["ok"], 8, "{summary}");
    let sent = server_sidecar.metric(
        "sidecar_connection_sent_bytes_total",
        &[("direction", "inbound"), ("tls", "true")],
    );
    assert!(sent >= 16.0 * 1024.0 * 1024.0, "{sent} bytes in");
    let received = server_sidecar.metric(
        "sidecar_connection_received_bytes_total",
        &[("direction", "inbound"), ("tls", "true")],
    );
    assert!(received >= 16.0 * 1024.0 * 1024.0, "{received} bytes out");
}
