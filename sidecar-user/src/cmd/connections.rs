//! `sidecar connections`: the admin listener's `/connections` as a terminal table.

use sidecar::proxy::connections::ConnView;

/// Renders connections as a terminal table (`sidecar connections`).
pub fn render_table(views: &[ConnView]) -> String {
    let header = [
        "ID",
        "DIR",
        "CLIENT",
        "DESTINATION",
        "ENDPOINT",
        "IDENTITY",
        "TLS",
        "SENT",
        "RECV",
        "AGE",
        "RTT",
        "RETRANS",
    ];
    let rows: Vec<[String; 12]> = views
        .iter()
        .map(|v| {
            let tcp = v.tcp.as_ref();
            [
                v.id.to_string(),
                v.direction.clone(),
                v.client.to_string(),
                v.orig_dst.to_string(),
                v.endpoint.to_string(),
                v.peer_identity.clone().unwrap_or_else(|| "-".into()),
                if v.tls { "yes" } else { "no" }.into(),
                v.bytes_sent.to_string(),
                v.bytes_received.to_string(),
                format!("{:.1}s", v.age_seconds),
                tcp.map(|t| {
                    let pooled = if t.shared { " (pooled)" } else { "" };
                    format!("{:.2}ms{pooled}", f64::from(t.rtt_us) / 1000.0)
                })
                .unwrap_or_else(|| "-".into()),
                tcp.map(|t| t.total_retransmits.to_string())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let padded: Vec<String> = cells.zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in &rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_per_connection_under_the_header() {
        let view: ConnView = serde_json::from_value(serde_json::json!({
            "id": 7, "direction": "outbound", "client": "127.0.0.1:1000",
            "orig_dst": "198.18.0.2:80", "endpoint": "198.18.0.2:80",
            "peer_identity": null, "tls": false, "bytes_sent": 5,
            "bytes_received": 9, "age_seconds": 1.5,
            "tcp": {"state": "established", "rtt_us": 1500, "rtt_var_us": 10,
                    "retransmits": 0, "total_retransmits": 2}
        }))
        .expect("a view as /connections serves it");
        let text = render_table(&[view]);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("ID  DIR"), "{text}");
        for cell in ["7", "outbound", "198.18.0.2:80", "1.50ms", "1.5s", "2"] {
            assert!(
                lines[1].split_whitespace().any(|c| c == cell),
                "{cell}: {text}"
            );
        }
    }
}
