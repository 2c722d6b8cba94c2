//! `inbound.allow` entries and the names of inbound modes.

use serde::Deserialize;

use super::InboundMode;

/// One entry of `inbound.allow`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowEntry {
    /// Peers whose proven identity matches.
    Peer(crate::tls::IdentityMatcher),
    /// `unauthenticated`: clients without an identity (plaintext, on ports that are
    /// not strict).
    Unauthenticated,
}

impl AllowEntry {
    /// The literal naming clients without an identity.
    pub const UNAUTHENTICATED: &'static str = "unauthenticated";

    /// Whether `allow` admits clients without an identity: empty, or listing
    /// `unauthenticated`.
    pub fn admits_unauthenticated(allow: &[AllowEntry]) -> bool {
        allow.is_empty() || allow.contains(&AllowEntry::Unauthenticated)
    }
}

impl InboundMode {
    /// Its name in the configuration.
    pub const fn as_str(self) -> &'static str {
        match self {
            InboundMode::Strict => "strict",
            InboundMode::Permissive => "permissive",
            InboundMode::Disabled => "disabled",
        }
    }
}

impl<'de> Deserialize<'de> for AllowEntry {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if text == Self::UNAUTHENTICATED {
            return Ok(AllowEntry::Unauthenticated);
        }
        text.parse()
            .map(AllowEntry::Peer)
            .map_err(serde::de::Error::custom)
    }
}

impl std::fmt::Display for AllowEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AllowEntry::Peer(m) => m.fmt(f),
            AllowEntry::Unauthenticated => f.write_str(Self::UNAUTHENTICATED),
        }
    }
}
