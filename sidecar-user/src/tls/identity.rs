//! SPIFFE IDs (`spiffe://<trust-domain>/<path>`) and the allow-list entries that match
//! them: an exact ID, or every workload of a namespace (`spiffe://td/ns/<ns>/*`).

use std::{fmt, str::FromStr};

/// A workload identity, as carried in a certificate's URI SAN.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    path: String,
}

/// Why a SPIFFE ID or matcher did not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid SPIFFE ID {input:?}: {reason}")]
pub struct IdentityError {
    input: String,
    reason: &'static str,
}

/// An allow-list entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityMatcher {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID of a trust domain: `spiffe://<trust_domain>/*`.
    TrustDomain(String),
    /// Any `spiffe://<trust_domain>/ns/<namespace>/...`.
    Namespace {
        /// Trust domain.
        trust_domain: String,
        /// Kubernetes namespace.
        namespace: String,
    },
}

// === impl SpiffeId ===

impl SpiffeId {
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
    pub fn workload(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdentityError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The Kubernetes namespace, for `/ns/<ns>/...` paths.
    pub fn namespace(&self) -> Option<&str> {
        let mut segments = self.path.trim_start_matches('/').split('/');
        (segments.next() == Some("ns"))
            .then(|| segments.next())
            .flatten()
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason| IdentityError {
            input: input.to_string(),
            reason,
        };
        let rest = input
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("must start with spiffe://"))?;
        let (trust_domain, path) = rest.split_once('/').ok_or_else(|| err("has no path"))?;
        if trust_domain.is_empty() {
            return Err(err("empty trust domain"));
        }
        let td_ok = trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        if !td_ok {
            return Err(err(
                "trust domain may hold only lower-case letters, digits, '-', '.', '_'",
            ));
        }
        if path.is_empty() {
            return Err(err("has no path"));
        }
        for segment in path.split('/') {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(err("path segments must be non-empty and not '.' or '..'"));
            }
            let ok = segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
            if !ok {
                return Err(err("path may hold only letters, digits, '-', '.', '_'"));
            }
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            path: format!("/{path}"),
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

// === impl IdentityMatcher ===

impl IdentityMatcher {
    /// Whether `id` is allowed by this entry.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        match self {
            IdentityMatcher::Exact(want) => want == id,
            IdentityMatcher::TrustDomain(td) => id.trust_domain() == td,
            IdentityMatcher::Namespace {
                trust_domain,
                namespace,
            } => id.trust_domain() == trust_domain && id.namespace() == Some(namespace.as_str()),
        }
    }
}

impl FromStr for IdentityMatcher {
    type Err = IdentityError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if let Some(td) = input
            .strip_prefix("spiffe://")
            .and_then(|rest| rest.strip_suffix("/*"))
            .filter(|td| !td.contains('/'))
        {
            // Validate the trust domain by parsing an ID in it.
            format!("spiffe://{td}/x").parse::<SpiffeId>()?;
            return Ok(IdentityMatcher::TrustDomain(td.to_string()));
        }
        if let Some(prefix) = input.strip_suffix("/*") {
            // `spiffe://td/ns/<ns>/*`: parse the prefix as an ID to validate it.
            let id: SpiffeId = prefix.parse()?;
            let segments: Vec<&str> = id.path().trim_start_matches('/').split('/').collect();
            return match segments.as_slice() {
                ["ns", namespace] => Ok(IdentityMatcher::Namespace {
                    trust_domain: id.trust_domain().to_string(),
                    namespace: namespace.to_string(),
                }),
                _ => Err(IdentityError {
                    input: input.to_string(),
                    reason: "wildcards are only supported as spiffe://<td>/ns/<namespace>/* \
                             or spiffe://<td>/*",
                }),
            };
        }
        Ok(IdentityMatcher::Exact(input.parse()?))
    }
}

impl fmt::Display for IdentityMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityMatcher::Exact(id) => id.fmt(f),
            IdentityMatcher::TrustDomain(td) => write!(f, "spiffe://{td}/*"),
            IdentityMatcher::Namespace {
                trust_domain,
                namespace,
            } => {
                write!(f, "spiffe://{trust_domain}/ns/{namespace}/*")
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for IdentityMatcher {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().expect("valid ID")
    }

    #[test]
    fn parses_and_prints_workload_ids() {
        let w = SpiffeId::workload("cluster.local", "shop", "cart").expect("valid");
        assert_eq!(w.to_string(), "spiffe://cluster.local/ns/shop/sa/cart");
        assert_eq!(w, id("spiffe://cluster.local/ns/shop/sa/cart"));
        assert_eq!(w.namespace(), Some("shop"));
        assert_eq!(id("spiffe://td/other").namespace(), None);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "http://td/ns/a",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe:///ns/a",
            "spiffe://TD/ns/a",
            "spiffe://td/ns//a",
            "spiffe://td/ns/../a",
            "spiffe://td/ns/a?x=1",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn matchers_match_exactly_or_by_namespace() {
        let exact: IdentityMatcher = "spiffe://td/ns/shop/sa/cart".parse().expect("valid");
        let ns: IdentityMatcher = "spiffe://td/ns/shop/*".parse().expect("valid");
        assert!(exact.matches(&id("spiffe://td/ns/shop/sa/cart")));
        assert!(!exact.matches(&id("spiffe://td/ns/shop/sa/web")));
        assert!(ns.matches(&id("spiffe://td/ns/shop/sa/web")));
        assert!(!ns.matches(&id("spiffe://td/ns/shopping/sa/web")));
        assert!(!ns.matches(&id("spiffe://other/ns/shop/sa/web")));
        assert_eq!(ns.to_string(), "spiffe://td/ns/shop/*");
        assert!("spiffe://td/ns/*".parse::<IdentityMatcher>().is_err());
        let td: IdentityMatcher = "spiffe://td/*".parse().expect("valid");
        assert!(td.matches(&id("spiffe://td/ns/shop/sa/web")));
        assert!(!td.matches(&id("spiffe://other/ns/shop/sa/web")));
        assert_eq!(td.to_string(), "spiffe://td/*");
        assert!("spiffe://TD/*".parse::<IdentityMatcher>().is_err());
        assert!("spiffe://td/ns/a/sa/*".parse::<IdentityMatcher>().is_err());
    }
}
