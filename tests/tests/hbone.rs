//! HBONE between two sidecars under the conditions a pool meets in a cluster: a slow
//! reader sharing a connection with busy streams (HTTP/2 flow control per stream),
//! idle expiry, a client certificate rotated under open streams, and a server sidecar
//! killed under load (fail closed; the broken connection is never reused).

use std::time::Duration;

use sidecar_tests::{
    Certs, Net, Placement, Pod, Sidecar,
    certs::{kubelet_write, serial_of},
    tools::{InFlight, echo_server, pod_tool_bin, run_json, wait_until},
};

/// B serves an echo on 8080 behind a strict sidecar; A's sidecar meshes B's network
/// with `a_extra` config.
struct Pair {
    a: Pod,
    b: Pod,
    a_sidecar: Sidecar,
    b_sidecar: Sidecar,
    dst: String,
    certs: Certs,
    _echo: sidecar_tests::tools::Background,
    _net: Net,
}

/// A pair whose A sidecar uses `certs.identity("good")`, or what `a_identity` makes
/// of the pair's certificates.
fn pair(tag: &str, a_identity: Option<&dyn Fn(&Certs) -> String>, a_extra: &str) -> Pair {
    pair_with(tag, a_identity, a_extra, "")
}

/// As [`pair`], with `b_extra` added to B's config.
fn pair_with(
    tag: &str,
    a_identity: Option<&dyn Fn(&Certs) -> String>,
    a_extra: &str,
    b_extra: &str,
) -> Pair {
    let mut net = Net::new(tag);
    let a = net.pod("a");
    let b = net.pod("b");
    let certs = Certs::new(tag, &["b=shop/db", "good=shop/web"]);
    let (echo, dst) = echo_server(&b, 8080);
    let b_sidecar = Sidecar::start(
        &b,
        &format!("{}inbound:\n  mode: strict\n{b_extra}", certs.identity("b")),
        Placement::InPodCgroup,
    );
    let identity = match a_identity {
        Some(make) => make(&certs),
        None => certs.identity("good"),
    };
    let a_sidecar = Sidecar::start(
        &a,
        &format!("{identity}mesh:\n  cidrs: [198.18.0.0/24]\n{a_extra}"),
        Placement::InPodCgroup,
    );
    Pair {
        a,
        b,
        a_sidecar,
        b_sidecar,
        dst,
        certs,
        _echo: echo,
        _net: net,
    }
}

/// `count` echo connections from A's app, `concurrency` at a time, within `limit_s`.
fn tally(pod: &Pod, to: &str, count: usize, concurrency: usize, limit_s: u32) -> serde_json::Value {
    let mut cmd = pod.app("timeout");
    cmd.arg(limit_s.to_string())
        .arg(pod_tool_bin())
        .args(["tally", "--to", to, "--count", &count.to_string()])
        .args(["--concurrency", &concurrency.to_string()]);
    run_json(cmd)
}

fn client_metric(sidecar: &Sidecar, name: &str) -> f64 {
    sidecar.metric(name, &[("side", "client")])
}

#[test]
fn a_slow_reader_does_not_stall_the_other_streams_of_its_connection() {
    // One connection to B, so every stream shares the stuck one's.
    let p = pair(
        "hbone-slow",
        None,
        "  hbone:\n    parallel_connections: 1\n",
    );
    // One application connection that writes and never reads: its stream's window
    // (4 MiB) fills, and everything behind it.
    let mut stuck = p.a.app(&pod_tool_bin());
    stuck.args(["stuck", "--to", &p.dst, "--hold-ms", "15000"]);
    let stuck = InFlight::start(stuck);
    let pool = p.a_sidecar.admin_json("/pool");
    assert_eq!(pool.as_array().map(Vec::len), Some(1), "{pool}");
    assert_eq!(pool[0]["streams"], 1, "{pool}");
    // `/connections` shows the stream with the TCP state of the pooled connection
    // carrying it (a stream has no socket of its own).
    let table = p.a_sidecar.admin_json("/connections");
    assert_eq!(table.as_array().map(Vec::len), Some(1), "{table}");
    let tcp = &table[0]["tcp"];
    assert_eq!(tcp["shared"], true, "{table}");
    assert_eq!(tcp["state"], "established", "{table}");
    assert!(tcp["rtt_us"].as_u64().is_some_and(|r| r > 0), "{table}");
    // Meanwhile 40 echo connections over the same connection, two of them moving
    // 4 MiB each way, finish promptly and byte-exact.
    let mut busy = p.a.app("timeout");
    busy.arg("20")
        .arg(pod_tool_bin())
        .args(["clients", "--to", &p.dst, "--connections", "40"]);
    let busy = run_json(busy);
    assert_eq!(busy["ok"], 40, "{busy}");
    assert_eq!(busy["big"], 2, "{busy}");
    assert_eq!(
        client_metric(&p.a_sidecar, "sidecar_hbone_connections_opened_total"),
        1.0,
        "all on the stuck stream's connection"
    );
    let summary = stuck.finish();
    let written = summary["written"].as_u64().expect("written");
    eprintln!("stuck connection wrote {written} bytes");
    // It did fill its stream's window (more than 4 MiB left the app), and the
    // proxies buffered only a bounded amount for it (no unbounded queue).
    assert!(
        written > 4 << 20 && written < 64 << 20,
        "the stuck connection wrote {written} bytes"
    );
}

#[test]
fn an_idle_pooled_connection_closes_and_an_open_stream_keeps_it() {
    let p = pair("hbone-idle", None, "  hbone:\n    idle_timeout: 1s\n");
    // A stream open longer than the idle timeout keeps its connection.
    let mut slow = p.a.app(&pod_tool_bin());
    slow.args(["slow", "--to", &p.dst, "--bytes", "3000", "--seconds", "3"]);
    let slow = InFlight::start(slow);
    std::thread::sleep(Duration::from_secs(2));
    let pool = p.a_sidecar.admin_json("/pool");
    assert_eq!(pool.as_array().map(Vec::len), Some(1), "{pool}");
    assert_eq!(pool[0]["streams"], 1, "{pool}");
    assert_eq!(slow.finish()["ok"], 1);
    // Idle, it leaves the pool and closes on both sides.
    wait_until(Duration::from_secs(5), "the idle connection closes", || {
        p.a_sidecar
            .admin_json("/pool")
            .as_array()
            .is_some_and(Vec::is_empty)
            && client_metric(&p.a_sidecar, "sidecar_hbone_connections") == 0.0
            && p.b_sidecar
                .metric("sidecar_hbone_connections", &[("side", "server")])
                == 0.0
    });
    // The next application connection opens a new one.
    assert_eq!(tally(&p.a, &p.dst, 1, 1, 10)["ok"], 1);
    assert_eq!(
        client_metric(&p.a_sidecar, "sidecar_hbone_connections_opened_total"),
        2.0
    );
}

/// The streams each pooled connection of `sidecar`'s carries, smallest first.
fn pooled_streams(sidecar: &Sidecar) -> Vec<u64> {
    let pool = sidecar.admin_json("/pool");
    let mut streams: Vec<u64> = pool
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| t["streams"].as_u64().unwrap_or(u64::MAX))
        .collect();
    streams.sort_unstable();
    streams
}

#[test]
fn overlapping_streams_spread_over_parallel_connections_then_share() {
    let p = pair(
        "hbone-spread",
        None,
        "  hbone:\n    parallel_connections: 2\n",
    );
    // `n` application connections held open (echoing slowly); `start` returns once
    // all are connected, so their streams are open.
    let slow = |n: usize| {
        let mut cmd = p.a.app(&pod_tool_bin());
        cmd.args(["slow", "--to", &p.dst, "--streams", &n.to_string()])
            .args(["--bytes", "4000", "--seconds", "3"]);
        InFlight::start(cmd)
    };
    // Two overlapping streams: one connection each (encryption on both cores).
    let first = slow(2);
    assert_eq!(pooled_streams(&p.a_sidecar), [1, 1]);
    // At `parallel_connections`, the next one shares the least loaded.
    let second = slow(1);
    assert_eq!(pooled_streams(&p.a_sidecar), [1, 2]);
    assert_eq!(first.finish()["ok"], 2);
    assert_eq!(second.finish()["ok"], 1);
    assert_eq!(
        client_metric(&p.a_sidecar, "sidecar_hbone_connections_opened_total"),
        2.0
    );
}

#[test]
fn the_server_closes_a_connection_that_carries_nothing() {
    let p = pair_with(
        "hbone-srv-idle",
        None,
        "",
        "mesh:\n  hbone:\n    idle_timeout: 1s\n",
    );
    assert_eq!(tally(&p.a, &p.dst, 3, 1, 10)["ok"], 3);
    // The client would keep it 5 minutes; the server closes it within two of its
    // idle periods, and the client's pool lets it go.
    wait_until(
        Duration::from_secs(5),
        "the server closes the idle connection",
        || {
            p.b_sidecar
                .metric("sidecar_hbone_connections", &[("side", "server")])
                == 0.0
                && p.a_sidecar
                    .admin_json("/pool")
                    .as_array()
                    .is_some_and(Vec::is_empty)
        },
    );
    // The next connection opens a new one.
    assert_eq!(tally(&p.a, &p.dst, 1, 1, 10)["ok"], 1);
    assert_eq!(
        client_metric(&p.a_sidecar, "sidecar_hbone_connections_opened_total"),
        2.0
    );
}

/// How many pooled connections presented our certificate with `serial`, and the
/// streams they carry.
fn with_serial(sidecar: &Sidecar, serial: &str) -> (usize, u64) {
    let pool = sidecar.admin_json("/pool");
    let matching: Vec<&serde_json::Value> = pool
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| {
            t["local_serial"]
                .as_str()
                .map(|s| s.trim_start_matches('0'))
                == Some(serial)
        })
        .collect();
    let streams = matching
        .iter()
        .map(|t| t["streams"].as_u64().unwrap_or(0))
        .sum();
    (matching.len(), streams)
}

#[test]
fn a_rotated_client_certificate_takes_new_streams_while_open_ones_finish() {
    let tag = "hbone-rotate";
    let mount = std::env::temp_dir().join(format!("sidecar-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&mount);
    std::fs::create_dir_all(&mount).expect("mount");
    let identity = format!(
        "identity:\n  cert: {m}/cert.pem\n  key: {m}/key.pem\n  bundle: {m}/bundle.pem\n  reload_interval: 200ms\n",
        m = mount.display()
    );
    // A's certificate lives in a Secret-like mount the kubelet rotates.
    let mounted = |certs: &Certs| {
        kubelet_write(&mount, 1, &certs.dir().join("good"));
        identity.clone()
    };
    let p = pair(tag, Some(&mounted), "  hbone:\n    idle_timeout: 2s\n");
    let first = serial_of(&p.certs.dir().join("good/cert.pem"));
    // 20 long-lived connections on the first pooled connections.
    let mut slow = p.a.app(&pod_tool_bin());
    slow.args([
        "slow",
        "--to",
        &p.dst,
        "--streams",
        "20",
        "--bytes",
        "20000",
        "--seconds",
        "5",
    ]);
    let slow = InFlight::start(slow);
    let (tunnels, streams) = with_serial(&p.a_sidecar, &first);
    assert!(
        tunnels >= 1 && streams == 20,
        "{tunnels} connections, {streams} streams"
    );

    // Rotate A: a new certificate from the same CA.
    let next = p.certs.reissue("next", "good=shop/web");
    kubelet_write(&mount, 2, &next.join("good"));
    let second = serial_of(&next.join("good/cert.pem"));
    assert_ne!(first, second);
    // New application connections go over a new pooled connection with the new
    // certificate, while the old one still carries its 20 streams.
    wait_until(
        Duration::from_secs(5),
        "a pooled connection with the new certificate",
        || {
            assert_eq!(tally(&p.a, &p.dst, 1, 1, 10)["ok"], 1);
            with_serial(&p.a_sidecar, &second).0 >= 1
        },
    );
    let (_, old) = with_serial(&p.a_sidecar, &first);
    assert_eq!(old, 20, "the old connections still carry every open stream");
    assert_eq!(
        slow.finish()["ok"],
        20,
        "every open stream survived the rotation"
    );
    // Their streams done, the old connections idle out.
    wait_until(Duration::from_secs(6), "the old connections close", || {
        with_serial(&p.a_sidecar, &first).0 == 0
    });
    let _ = std::fs::remove_dir_all(&mount);
}

#[test]
fn a_killed_server_sidecar_fails_closed_and_its_broken_connection_is_never_reused() {
    let p = pair("hbone-kill", None, "");
    // About 2 s of connections, one every 10 ms; B's sidecar dies under them.
    let stream = {
        let (a, dst) = (p.a.clone(), p.dst.clone());
        std::thread::spawn(move || {
            let mut cmd = a.app(&pod_tool_bin());
            cmd.args([
                "tally",
                "--to",
                &dst,
                "--count",
                "150",
                "--interval-ms",
                "10",
            ]);
            run_json(cmd)
        })
    };
    wait_until(Duration::from_secs(10), "the stream is under way", || {
        p.b_sidecar.opened() >= 30
    });
    let Pair {
        a,
        b,
        a_sidecar,
        b_sidecar,
        dst,
        certs,
        _echo,
        _net,
    } = p;
    b_sidecar.crash();
    let during = stream.join().expect("stream");
    let (ok, failed) = (
        during["ok"].as_u64().unwrap_or(0),
        during["failed"].as_u64().unwrap_or(0),
    );
    assert_eq!(ok + failed, 150, "{during}");
    assert!(ok >= 30 && failed >= 50, "{during}");
    // Nothing gets through while B's sidecar is gone: A never falls back to
    // plaintext, and B's kernel refuses what would go around its proxy.
    let after = tally(&a, &dst, 10, 1, 20);
    assert_eq!(after["failed"], 10, "{after}");
    let mut direct = a.outsider("timeout");
    direct
        .arg("20")
        .arg(pod_tool_bin())
        .args(["tally", "--to", &dst, "--count", "1"]);
    let direct = run_json(direct);
    assert_eq!(direct["failed"], 1, "{direct}");
    // B's sidecar is back: A's pool opens a new connection (the broken one was
    // dropped) and everything flows again.
    let _b_sidecar = Sidecar::start(
        &b,
        &format!("{}inbound:\n  mode: strict\n", certs.identity("b")),
        Placement::InPodCgroup,
    );
    let again = tally(&a, &dst, 20, 1, 20);
    assert_eq!(again["ok"], 20, "{again}");
    assert!(client_metric(&a_sidecar, "sidecar_hbone_connections_opened_total") >= 2.0);
    let pool = a_sidecar.admin_json("/pool");
    assert_eq!(pool.as_array().map(Vec::len), Some(1), "{pool}");
}

/// An `identity:` section with `name`'s certificate and key from `certs`, the
/// bundle at `bundle`, re-read every 200 ms (so the files are made readable by the
/// proxy's unprivileged user, as a Secret volume's are).
fn identity_with_bundle(certs: &Certs, name: &str, bundle: &std::path::Path) -> String {
    let chmod = sidecar_tests::tools::output_within(
        std::process::Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(certs.dir()),
        Duration::from_secs(10),
    );
    assert!(chmod.status.success());
    let d = certs.dir().join(name);
    format!(
        "identity:\n  cert: {}\n  key: {}\n  bundle: {}\n  reload_interval: 200ms\n",
        d.join("cert.pem").display(),
        d.join("key.pem").display(),
        bundle.display()
    )
}

#[test]
fn the_server_sends_goaway_at_a_clients_expiry_and_when_its_ca_leaves_the_bundle() {
    let mut net = Net::new("trust-end");
    let b = net.pod("b");
    let x = net.pod("x");
    let ours = Certs::new("trust-ours", &["b=shop/db", "good=shop/web"]);
    let theirs = Certs::new("trust-theirs", &["other=shop/web"]);
    let read = |c: &Certs| std::fs::read_to_string(c.dir().join("ca.pem")).expect("ca");
    let bundle = ours.dir().join("b-bundle.pem");
    std::fs::write(&bundle, format!("{}{}", read(&ours), read(&theirs))).expect("bundle");
    let short_dir = ours.dir().join("short");
    sidecar_tests::certs::reissue_valid_for(ours.dir(), &short_dir, "short=shop/web", Some(8));
    let (_echo, dst) = echo_server(&b, 8080);
    let server = Sidecar::start(
        &b,
        &format!(
            "{}inbound:\n  mode: strict\n",
            identity_with_bundle(&ours, "b", &bundle)
        ),
        Placement::InPodCgroup,
    );
    let hold = |cert: std::path::PathBuf, hold_ms: u64| {
        let mut cmd = x.outsider(&pod_tool_bin());
        cmd.args(["hbone-hold", "--to", &format!("{}:15008", b.ip4)])
            .arg("--cert")
            .arg(cert)
            .args(["--authority", &dst, "--count", "1"])
            .args(["--hold-ms", &hold_ms.to_string()]);
        InFlight::start(cmd)
    };
    let short = hold(short_dir.join("short"), 12_000);
    let other = hold(theirs.dir().join("other"), 4_000);
    // The other trust domain's CA leaves B's bundle: its connection is told to go.
    std::fs::write(&bundle, read(&ours)).expect("bundle without their CA");
    let other = other.finish();
    assert_eq!(other["ok"], 1, "{other}");
    assert_eq!(
        other["open_at_end"], 0,
        "a peer whose CA was removed kept its connection: {other}"
    );
    // A new connection under the new bundle is refused.
    let again = hold(theirs.dir().join("other"), 0).finish();
    assert_eq!(again["refused"], 1, "{again}");
    // The short certificate expires 8 s after it was issued: its connection ends
    // then (opened before the bundle change, it was also told to go by it; a
    // connection opened after the change must end at the expiry alone).
    let late = hold(short_dir.join("short"), 9_000).finish();
    assert_eq!(late["ok"], 1, "{late}");
    assert_eq!(
        late["open_at_end"], 0,
        "a peer kept its connection past its expiry: {late}"
    );
    let short = short.finish();
    assert_eq!(short["open_at_end"], 0, "{short}");
    // Our own workloads are served again over fresh handshakes.
    let good = hold(ours.dir().join("good"), 0).finish();
    assert_eq!(good["ok"], 1, "{good}");
    assert!(
        server.logs().contains("the peer is no longer trusted"),
        "{}",
        server.logs()
    );
}

#[test]
fn after_a_bundle_change_new_streams_go_over_a_new_pooled_connection() {
    let mut net = Net::new("pool-bundle");
    let a = net.pod("a");
    let b = net.pod("b");
    let ours = Certs::new("pool-ours", &["b=shop/db", "a=shop/web"]);
    let theirs = Certs::new("pool-theirs", &["other=shop/web"]);
    let read = |c: &Certs| std::fs::read_to_string(c.dir().join("ca.pem")).expect("ca");
    let bundle = ours.dir().join("a-bundle.pem");
    std::fs::write(&bundle, format!("{}{}", read(&ours), read(&theirs))).expect("bundle");
    let (_echo, dst) = echo_server(&b, 8080);
    let _server = Sidecar::start(
        &b,
        &format!("{}inbound:\n  mode: strict\n", ours.identity("b")),
        Placement::InPodCgroup,
    );
    let client = Sidecar::start(
        &a,
        &format!(
            "{}mesh:\n  cidrs: [198.18.0.0/24]\n",
            identity_with_bundle(&ours, "a", &bundle)
        ),
        Placement::InPodCgroup,
    );
    let opened = || {
        client.metric(
            "sidecar_hbone_connections_opened_total",
            &[("side", "client")],
        )
    };
    let echo = || {
        let mut cmd = a.app(&pod_tool_bin());
        cmd.args(["tally", "--to", &dst, "--count", "3"]);
        let t = run_json(cmd);
        assert_eq!(t["ok"], 3, "{t}");
    };
    echo();
    assert_eq!(opened(), 1.0);
    std::fs::write(&bundle, read(&ours)).expect("bundle without their CA");
    wait_until(Duration::from_secs(5), "the bundle is reloaded", || {
        client.logs().contains("identity rotated")
    });
    echo();
    assert_eq!(
        opened(),
        2.0,
        "the connection verified under the old bundle took new streams"
    );
}
