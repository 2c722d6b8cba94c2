//! HBONE metrics, both sides: connections (pooled outbound, accepted inbound), the
//! streams they carry, and streams refused with the HTTP status that refused them.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

/// Which side of a tunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// Pooled connections this sidecar opened.
    Client,
    /// Connections other sidecars (or ztunnels) opened to us.
    Server,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }

    fn labels(self) -> SideLabels {
        SideLabels {
            side: self.as_str(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SideLabels {
    side: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AbuseLabels {
    kind: &'static str,
}

/// What a peer did to an inbound connection that the server had to push back on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abuse {
    /// A stream reset by the peer before it was answered (its delivery stopped).
    ResetBeforeAnswer,
    /// A stream refused (`REFUSED_STREAM`) because every stream slot of its
    /// connection was still held by a stream task.
    OverStreamCap,
    /// A connection closed with `GOAWAY ENHANCE_YOUR_CALM`: resets dominated it.
    EnhanceYourCalm,
}

impl Abuse {
    const ALL: [Abuse; 3] = [
        Abuse::ResetBeforeAnswer,
        Abuse::OverStreamCap,
        Abuse::EnhanceYourCalm,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Abuse::ResetBeforeAnswer => "reset_before_answer",
            Abuse::OverStreamCap => "over_stream_cap",
            Abuse::EnhanceYourCalm => "goaway_enhance_your_calm",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    side: &'static str,
    status: u16,
}

/// The HBONE counters and gauges.
#[derive(Debug, Default)]
pub struct HboneMetrics {
    connections: Family<SideLabels, Gauge>,
    connections_opened: Family<SideLabels, Counter>,
    streams: Family<SideLabels, Gauge>,
    streams_opened: Family<SideLabels, Counter>,
    streams_refused: Family<RefusedLabels, Counter>,
    server_abuse: Family<AbuseLabels, Counter>,
}

impl HboneMetrics {
    /// Registers the families in `registry`, every side declared at zero.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "hbone_connections",
            "HBONE mTLS connections open now, by side (client: pooled by us)",
            self.connections.clone(),
        );
        registry.register(
            "hbone_connections_opened",
            "HBONE mTLS connections opened, by side",
            self.connections_opened.clone(),
        );
        registry.register(
            "hbone_streams",
            "HBONE streams (application connections) open now, by side",
            self.streams.clone(),
        );
        registry.register(
            "hbone_streams_opened",
            "HBONE streams opened, by side",
            self.streams_opened.clone(),
        );
        registry.register(
            "hbone_streams_refused",
            "HBONE streams refused, by side and HTTP status (400 bad request, 401 peer not \
             allowed, 503 application refused)",
            self.streams_refused.clone(),
        );
        registry.register(
            "hbone_server_abuse",
            "What inbound HBONE peers did that the server pushed back on, by kind \
             (reset_before_answer, over_stream_cap, goaway_enhance_your_calm)",
            self.server_abuse.clone(),
        );
        for kind in Abuse::ALL {
            let _ = self.server_abuse.get_or_create(&AbuseLabels {
                kind: kind.as_str(),
            });
        }
        for side in [Side::Client, Side::Server] {
            let labels = side.labels();
            let _ = self.connections.get_or_create(&labels);
            let _ = self.connections_opened.get_or_create(&labels);
            let _ = self.streams.get_or_create(&labels);
            let _ = self.streams_opened.get_or_create(&labels);
        }
    }

    /// A connection opened; [`HboneMetrics::connection_closed`] follows.
    pub fn connection_opened(&self, side: Side) {
        self.connections.get_or_create(&side.labels()).inc();
        self.connections_opened.get_or_create(&side.labels()).inc();
    }

    /// A connection closed.
    pub fn connection_closed(&self, side: Side) {
        self.connections.get_or_create(&side.labels()).dec();
    }

    /// A stream opened; [`HboneMetrics::stream_closed`] follows.
    pub fn stream_opened(&self, side: Side) {
        self.streams.get_or_create(&side.labels()).inc();
        self.streams_opened.get_or_create(&side.labels()).inc();
    }

    /// A stream closed.
    pub fn stream_closed(&self, side: Side) {
        self.streams.get_or_create(&side.labels()).dec();
    }

    /// A stream refused with `status`.
    pub fn stream_refused(&self, side: Side, status: u16) {
        let labels = RefusedLabels {
            side: side.as_str(),
            status,
        };
        self.streams_refused.get_or_create(&labels).inc();
    }

    /// The server pushed back on a peer.
    pub fn abuse(&self, kind: Abuse) {
        self.server_abuse
            .get_or_create(&AbuseLabels {
                kind: kind.as_str(),
            })
            .inc();
    }
}
