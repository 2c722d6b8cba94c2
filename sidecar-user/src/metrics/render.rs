//! Encoding the registry as OpenMetrics text (what prometheus-client writes) or as the
//! classic Prometheus text format 0.0.4 (the default for scrapers that do not ask for
//! OpenMetrics).

use std::collections::HashSet;

use prometheus_client::registry::Registry;

/// Content type of OpenMetrics text.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The registry in OpenMetrics text.
pub fn openmetrics(registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4. The two differ only in framing:
/// a counter family `x` has samples `x_total` in both, but 0.0.4 names the family
/// `x_total` in `# HELP`/`# TYPE`; `# UNIT` and `# EOF` do not exist there, and
/// `unknown` is `untyped`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let rewritten = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            let tail = if tail == "unknown" { "untyped" } else { tail };
            let name = if counters.contains(name) {
                format!("{name}_total")
            } else {
                name.to_string()
            };
            Some(format!("{prefix}{name} {tail}"))
        });
        out.push_str(rewritten.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_renamed_and_openmetrics_framing_dropped() {
        let om = "# HELP sidecar_x Things.\n# TYPE sidecar_x counter\nsidecar_x_total{a=\"b\"} 3\n\
                  # HELP sidecar_d Duration.\n# TYPE sidecar_d histogram\n# UNIT sidecar_d seconds\n\
                  sidecar_d_bucket{le=\"+Inf\"} 1\n# HELP sidecar_g G.\n# TYPE sidecar_g gauge\nsidecar_g 2\n# EOF\n";
        let text = to_prometheus_text(om);
        assert_eq!(
            text,
            "# HELP sidecar_x_total Things.\n# TYPE sidecar_x_total counter\nsidecar_x_total{a=\"b\"} 3\n\
             # HELP sidecar_d Duration.\n# TYPE sidecar_d histogram\nsidecar_d_bucket{le=\"+Inf\"} 1\n\
             # HELP sidecar_g G.\n# TYPE sidecar_g gauge\nsidecar_g 2\n"
        );
    }

    #[test]
    fn negotiates_on_accept() {
        assert!(wants_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )));
        assert!(!wants_openmetrics(Some("text/plain")));
        assert!(!wants_openmetrics(None));
    }
}
